"""A hand-written loop that saves with `torch.distributed.checkpoint` (one `step-N/` folder per
checkpoint, `.metadata` written last) and resumes with `dcp.load` from the folder
ckpt_agent.latest_local_checkpoint() returns. Single process, no process group (DCP allows that).

`--crash-in-save N` makes the save of step N die the way a killed trainer does: the shard files
are written, the process exits with status 1 before `.metadata` (DCP's commit) is written.
"""

from __future__ import annotations

import os

import common
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful


class TrainState(Stateful):
    """Model, optimizer and step in the shape DCP saves and loads in place."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer, self.step = model, optimizer, 0

    def state_dict(self) -> dict:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.step = state["step"]


class CrashBeforeMetadata(FileSystemWriter):
    """Writes the shards, then dies where DCP would write `.metadata`."""

    def finish(self, metadata, results) -> None:
        common.say("CRASHING in the save, before .metadata")
        os._exit(1)


def main() -> None:
    args = common.parse_args(__doc__)
    model = common.tiny_model()
    state = TrainState(model, torch.optim.AdamW(model.parameters(), lr=common.LR))
    if path := common.resume_from(args):
        dcp.load({"train": state}, checkpoint_id=path)

    def train_step(step: int) -> None:
        state.optimizer.zero_grad()
        common.loss_of(model, step).backward()
        state.optimizer.step()

    def save(step: int) -> str:
        state.step = step
        folder = os.path.join(args.dir, f"step-{step}")
        writer = CrashBeforeMetadata if step == args.crash_in_save else FileSystemWriter
        dcp.save({"train": state}, storage_writer=writer(folder))
        return f"step-{step}"

    step = common.run_loop(args, state.step, train_step, save)
    common.finish(args, step, model.state_dict())


if __name__ == "__main__":
    main()
