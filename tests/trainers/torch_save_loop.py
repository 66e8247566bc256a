"""A hand-written loop that saves one file per checkpoint with `torch.save` (`ckpt-N.pt`) and
resumes with `torch.load` of the path ckpt_agent.latest_local_checkpoint() returns.

On several nodes (WORLD_SIZE > 1, tests/support/multinode.py) gradients are averaged over the
nodes and only the leader saves (`torch.save` under `if rank == 0`): the other nodes have no file
of any checkpoint.

`--crash-in-save N` leaves the first half of step N's torch.save bytes in `ckpt-N.pt` and dies:
torch.save writes in place, so that is what a trainer killed mid-save leaves.
"""

from __future__ import annotations

import io
import os

import common
import torch


def main() -> None:
    args = common.parse_args(__doc__)
    rank, world = common.init_nodes()
    model = common.tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=common.LR)
    start = 0
    if path := common.resume_from(args):
        state = torch.load(path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]

    def train_step(step: int) -> None:
        optimizer.zero_grad()
        common.loss_of(model, step, rank, world).backward()
        common.average_gradients(model, world)
        optimizer.step()

    def save(step: int) -> str:
        name = f"ckpt-{step}.pt"
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
        if step == args.crash_in_save:
            data = io.BytesIO()
            torch.save(state, data)
            common.die_mid_write(os.path.join(args.dir, name), data.getvalue())
        if rank == 0:
            torch.save(state, os.path.join(args.dir, name))
        return name

    step = common.run_loop(args, start, train_step, save)
    common.finish(args, step, model.state_dict())


if __name__ == "__main__":
    main()
