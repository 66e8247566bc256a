"""DeepSpeed ZeRO stage 1 on the CPU (gloo, one process per node): `save_checkpoint` writes a
`global_stepN/` tag folder and then the top-level `latest` file that names it; resume with
`load_checkpoint` on what ckpt_agent.latest_local_checkpoint() returns.

On several nodes (WORLD_SIZE > 1, tests/support/multinode.py) each node writes its own
`zero_pp_rank_<r>_mp_rank_00_optim_states.pt`; the model states and `latest` are the leader's."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import common
import deepspeed
import torch
from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

CONFIG = {
    "train_micro_batch_size_per_gpu": common.BATCH,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 1},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**9,
}


def process_group() -> None:
    """The nodes' group when WORLD_SIZE > 1 (its env:// rendezvous is set), else a world of one on
    loopback: rank 0, a free port. DeepSpeed's shared-memory all-reduce op is switched off (the way
    DeepSpeed's ops module allows): nodes share no memory, and the op is C++ that DeepSpeed would
    compile at first use (minutes of CPU)."""
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        deepspeed.init_distributed(dist_backend="gloo")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="gloo")


def main() -> None:
    args = common.parse_args(__doc__)
    process_group()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = common.tiny_model()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=common.LR), config=CONFIG)
    start = 0
    if path := common.resume_from(args):
        _, client = engine.load_checkpoint(*os.path.split(path))  # the load folder, and the tag
        start = client["step"]

    def train_step(step: int) -> None:
        engine.backward(common.loss_of(engine, step, rank, world))
        engine.step()

    def save(step: int) -> str:
        engine.save_checkpoint(args.dir, client_state={"step": step})
        return Path(args.dir, "latest").read_text().strip() if rank == 0 else f"global_step{step}"  # the leader's

    step = common.run_loop(args, start, train_step, save)
    common.finish(args, step, engine.module.state_dict())


if __name__ == "__main__":
    main()
