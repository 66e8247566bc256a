"""Hugging Face `Trainer` on a tiny regression model: `checkpoint-N/` folders every `--every`
steps, its own SIGTERM checkpoint (`enable_jit_checkpoint`), resume with `resume_from_checkpoint`.

On several nodes (WORLD_SIZE > 1, tests/support/multinode.py) it trains with DDP over gloo, one
process per node: the leader's `checkpoint-N/` holds the weights, optimizer and
trainer_state.json, every other node's only its `rng_state_<rank>.pth`.

`--final` also saves the trained model with `save_model` into that folder of the checkpoint dir
(a folder with no trainer_state.json: complete only because the trainer exits 0).
"""

from __future__ import annotations

import os

import common
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_jit_checkpoint import JITCheckpointCallback


class Regressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = common.tiny_model()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.net(x)
        return {"logits": out} if labels is None else {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = common.dataset()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class HoldForSigterm(TrainerCallback):
    """Stands still after `--hold-at` until HF's own SIGTERM handler has asked for its checkpoint."""

    def __init__(self, step: int, jit: JITCheckpointCallback) -> None:
        self.step, self.jit, self.latch = step, jit, common.SigtermLatch()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.latch.hold(self.step, until=lambda: self.jit.jit_manager.is_checkpoint_requested)


def main() -> None:
    args = common.parse_args(__doc__, ("--final", "a folder name for save_model after training"))
    training = TrainingArguments(
        output_dir=args.dir, max_steps=args.steps, save_strategy="steps", save_steps=args.every,
        per_device_train_batch_size=common.BATCH, learning_rate=common.LR, lr_scheduler_type="constant",
        seed=0, data_seed=0, use_cpu=True, report_to="none", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, enable_jit_checkpoint=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    trainer = Trainer(model=Regressor(), args=training, train_dataset=Rows())
    if args.hold_at > 0:
        jit = next(c for c in trainer.callback_handler.callbacks if isinstance(c, JITCheckpointCallback))
        trainer.add_callback(HoldForSigterm(args.hold_at, jit))
    trainer.train(resume_from_checkpoint=common.resume_from(args))
    if args.final:
        trainer.save_model(os.path.join(args.dir, args.final))
        common.say(f"SAVED {args.final}")
    common.finish(args, trainer.state.global_step, trainer.model.state_dict())


if __name__ == "__main__":
    main()
