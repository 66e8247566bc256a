"""PyTorch Lightning with `ModelCheckpoint(every_n_train_steps, save_top_k=-1, save_last=True)`:
`epoch=E-step=S.ckpt` files and `last.ckpt` (a copy; `--save-last link` makes it a symlink), one
more `.ckpt` when Lightning reports SIGTERM, and resume with `trainer.fit(ckpt_path=...)`.

Lightning's SIGTERM handling stops training with an exception (and exit status 0); saving then
is the user's job, done here in `on_exception`.
"""

from __future__ import annotations

import contextlib
import os

import common
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = common.tiny_model()

    def training_step(self, batch, _index):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=common.LR)


class SaveOnSigterm(Callback):
    """Holds after `--hold-at` until Lightning saw SIGTERM, and saves when it stops training for it."""

    def __init__(self, folder: str, hold_at: int) -> None:
        self.folder, self.hold_at, self.latch = folder, hold_at, common.SigtermLatch()

    def on_train_batch_end(self, trainer, module, outputs, batch, index) -> None:
        if trainer.global_step == self.hold_at:
            self.latch.hold(self.hold_at, until=lambda: trainer.received_sigterm)

    def on_exception(self, trainer, module, exception) -> None:
        if isinstance(exception, SIGTERMException):
            name = f"epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt"
            trainer.save_checkpoint(os.path.join(self.folder, name))
            common.say(f"SAVED {name}")


def main() -> None:
    args = common.parse_args(__doc__, ("--save-last", "ModelCheckpoint's save_last: true or link"))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*common.dataset()), batch_size=common.BATCH)
    checkpoints = ModelCheckpoint(dirpath=args.dir, every_n_train_steps=args.every, save_top_k=-1,
                                  save_last=args.save_last or True)
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True,
                        callbacks=[checkpoints, SaveOnSigterm(args.dir, args.hold_at)])
    model = Regressor()
    with contextlib.suppress(SIGTERMException):  # stopped for SIGTERM and saved: report the weights anyway
        trainer.fit(model, data, ckpt_path=common.resume_from(args))
    common.finish(args, trainer.global_step, model.state_dict())


if __name__ == "__main__":
    main()
