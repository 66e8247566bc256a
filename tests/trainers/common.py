"""What the real-trainer scripts share: arguments, a tiny deterministic model and data set, a
SIGTERM latch that keeps the framework's own handler, and the digest of the final weights.

The scripts print one line per event (`HOLDING 12`, `SAVED ckpt-12.pt`) for the tests to wait
on, and write the digest to `--out` so the test process never imports torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

FEATURES = 4
SAMPLES = 32
BATCH = 4
LR = 0.05
HOLD_TIMEOUT = 120.0

torch.set_num_threads(1)  # two shared cores: no thread pool fights, and bit-stable sums


def say(message: str) -> None:
    print(message, flush=True)


def parse_args(description: str, *extra: tuple[str, str]) -> argparse.Namespace:
    """The shared options, plus `extra` (flag, help) string options of one script."""
    parser = argparse.ArgumentParser(description=description)
    for flag, text in extra:
        parser.add_argument(flag, help=text)
    parser.add_argument("--dir", default=os.environ.get("BT_CHECKPOINT_DIR"), help="where checkpoints are written")
    parser.add_argument("--steps", type=int, default=20, help="train until this step")
    parser.add_argument("--every", type=int, default=5, help="save every this many steps")
    parser.add_argument("--hold-at", type=int, default=-1, help="after this step, wait for SIGTERM")
    parser.add_argument("--resume",
                        help="a checkpoint to resume from; 'agent' for ckpt_agent.latest_local_checkpoint()")
    parser.add_argument("--out", required=True, help="JSON file for the step and the final weights' digest")
    parser.add_argument("--exit-status", type=int, default=0, help="exit status after training")
    parser.add_argument("--crash-in-save", type=int, default=-1, help="the step whose save dies half-way")
    args = parser.parse_args()
    if not args.dir:
        parser.error("--dir or BT_CHECKPOINT_DIR is required")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    return args


def resume_from(args: argparse.Namespace) -> str | None:
    """The checkpoint to hand to the framework's resume call; with `agent`, the one ckpt-agent loaded."""
    if args.resume != "agent":
        return args.resume
    import ckpt_agent

    path = ckpt_agent.latest_local_checkpoint()
    if path is None:
        sys.exit("ckpt_agent.latest_local_checkpoint() is None: nothing was loaded")
    say(f"RESUMING {Path(path).name}")
    return path


def init_nodes() -> tuple[int, int]:
    """(rank, world size): a gloo process group when WORLD_SIZE > 1, one process per node
    (tests/support/multinode.py sets the env:// rendezvous); (0, 1) and no group otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return dist.get_rank(), world


def average_gradients(model: torch.nn.Module, world: int) -> None:
    """What DDP does after backward, by hand: every rank steps with the mean of all ranks' gradients."""
    if world == 1:
        return
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch for a 0-based step: the order depends on the step alone, so resuming is exact."""
    x, y = dataset()
    start = (step * BATCH) % SAMPLES
    return x[start:start + BATCH], y[start:start + BATCH]


def loss_of(model: torch.nn.Module, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The loss on rank `rank`'s batch of a 0-based step (with `world` ranks, each its own batch)."""
    x, y = batch(step * world + rank)
    return torch.nn.functional.mse_loss(model(x), y)


class SigtermLatch:
    """Records SIGTERM, then calls the handler that was there before (the framework's, if any)."""

    def __init__(self) -> None:
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = True
        say("SIGTERM")
        if callable(self._previous):
            self._previous(signum, frame)

    def hold(self, step: int, until: Callable[[], bool] | None = None) -> None:
        """Stand still after `step` until SIGTERM (and `until`, the framework's reaction) arrive:
        the test signals once a given checkpoint is committed, so where training stops is fixed."""
        say(f"HOLDING {step}")
        deadline = time.monotonic() + HOLD_TIMEOUT
        while not (self.received and (until is None or until())):
            if time.monotonic() > deadline:
                sys.exit(f"no SIGTERM within {HOLD_TIMEOUT:g} s of step {step}")
            time.sleep(0.01)


def run_loop(args: argparse.Namespace, start: int, train_step: Callable[[int], None],
             save: Callable[[int], str]) -> int:
    """A hand-written training loop: steps `start`..`--steps`, a save every `--every` steps and
    one more on SIGTERM (then it stops). Returns the step reached."""
    latch = SigtermLatch()
    step = start
    while step < args.steps:
        train_step(step)
        step += 1
        saved = step % args.every == 0
        if saved:
            say(f"SAVED {save(step)}")
        if step == args.hold_at:
            latch.hold(step)
        if latch.received:
            if not saved:
                say(f"SAVED {save(step)}")
            break
    return step


def die_mid_write(path: str, data: bytes) -> None:
    """What a trainer killed in the middle of an in-place save leaves: the first half of the bytes
    the library produced, then the process is gone (status 1)."""
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    say(f"CRASHING in the save of {os.path.basename(path)}")
    os._exit(1)


def finish(args: argparse.Namespace, step: int, state: dict[str, torch.Tensor]) -> None:
    """Write the step and a digest of every tensor's bytes (bit-equal weights, equal digests), then exit."""
    digest = {name: hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
              for name, t in sorted(state.items())}
    Path(args.out).write_text(json.dumps({"step": step, "weights": digest}))
    say(f"FINISHED {step}")
    leave_nodes()
    sys.exit(args.exit_status)


def leave_nodes() -> None:
    """Every node leaves the process group together: a node whose peer has already gone may abort
    in gloo's teardown at exit (`terminate called without an active exception`, status 134)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
