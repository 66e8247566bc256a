"""`torch.distributed.checkpoint` across nodes (one process per node, gloo): a replicated model
and optimizer, and a table sharded by rows over the nodes (a DTensor, `Shard(0)`). Each
`step-N/` save writes one `__<rank>_0.distcp` per node; the leader also writes `.metadata`, last,
after every node's data (DCP's commit). Replicated tensors are written once, by one node, so no
node's files alone are the whole checkpoint. Resumes with `dcp.load` from the folder
ckpt_agent.latest_local_checkpoint() returns.
"""

from __future__ import annotations

import os

import common
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

ROWS = 8  # rows of the sharded table: ROWS / world on each node


class TrainState(Stateful):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, table: torch.Tensor) -> None:
        self.model, self.optimizer, self.table, self.step = model, optimizer, table, 0

    def state_dict(self) -> dict:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state, "table": self.table, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.table.to_local().copy_(state["table"].to_local())
        self.step = state["step"]


def main() -> None:
    args = common.parse_args(__doc__)
    rank, world = common.init_nodes()
    mesh = init_device_mesh("cpu", (world,))
    model = common.tiny_model()
    table = distribute_tensor(torch.zeros(ROWS, common.FEATURES), mesh, [Shard(0)])
    state = TrainState(model, torch.optim.AdamW(model.parameters(), lr=common.LR), table)
    if path := common.resume_from(args):
        dcp.load({"train": state}, checkpoint_id=path)

    def train_step(step: int) -> None:
        state.optimizer.zero_grad()
        loss = common.loss_of(model, step, rank, world)
        loss.backward()
        common.average_gradients(model, world)
        state.optimizer.step()
        table.to_local().add_(loss.detach())  # this node's rows follow this node's losses

    def save(step: int) -> str:
        state.step = step
        dcp.save({"train": state}, checkpoint_id=os.path.join(args.dir, f"step-{step}"))
        return f"step-{step}"

    step = common.run_loop(args, state.step, train_step, save)
    first = rank * (ROWS // world)  # Shard(0): this node's rows of the table, by their index in the whole
    common.finish(args, step, {**model.state_dict(),
                               **{f"table.row{first + i}": row for i, row in enumerate(table.to_local())}})


if __name__ == "__main__":
    main()
