"""A stand-in for an HF Trainer run: writes `checkpoint-N/` folders the way the Trainer does.

Each checkpoint: `model.safetensors` (random bytes, written in several chunks with small sleeps,
so it is visibly "being written" for a while), `optimizer.pt`, a `config.json` that is the same
in every checkpoint, and `trainer_state.json` last. Between checkpoints it sleeps `--every`.

On SIGTERM it finishes the file it is writing, records the signal in `--record`, writes one
final checkpoint and exits with `--exit-on-sigterm`. `--stall-at N` stops half-way through
checkpoint N's weights, prints STALLED and sleeps (for a test to SIGKILL it). `--hold-open S`
keeps the weights file open for writing S seconds after everything else is written, then
appends to it before closing. Prints one line per event on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

stop = {"signal": None}


def say(message: str) -> None:
    print(message, flush=True)


def write_checkpoint(root: Path, step: int, args: argparse.Namespace) -> None:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    say(f"WRITING {folder.name}")
    chunk = max(1, args.size // args.chunks)
    weights = open(folder / "model.safetensors", "wb")  # noqa: SIM115 - closed below, maybe late
    for i in range(args.chunks):
        weights.write(os.urandom(chunk))
        weights.flush()
        if step == args.stall_at and i == args.chunks // 2:
            say(f"STALLED {folder.name}")
            time.sleep(3600)
        time.sleep(args.chunk_sleep)
    (folder / "optimizer.pt").write_bytes(os.urandom(args.size // 4 + step))
    (folder / "config.json").write_text(json.dumps({"model_type": "fake", "hidden_size": 8}))
    if args.hold_open:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        say(f"HOLDING {folder.name}")
        time.sleep(args.hold_open)
        weights.write(b"tail written after the hold")
        weights.close()
    else:
        weights.close()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    say(f"DONE {folder.name}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, help="BT_CHECKPOINT_DIR")
    parser.add_argument("--checkpoints", type=int, default=3, help="how many checkpoints before exiting")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between checkpoints")
    parser.add_argument("--step-size", type=int, default=10)
    parser.add_argument("--size", type=int, default=2 << 20, help="bytes of weights")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-sleep", type=float, default=0.05)
    parser.add_argument("--stall-at", type=int, default=-1, help="step whose weights stop half-way")
    parser.add_argument("--hold-open", type=float, default=0.0)
    parser.add_argument("--record", help="file that records a SIGTERM")
    parser.add_argument("--exit-on-sigterm", type=int, default=0)
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda signum, _frame: stop.update(signal=signum))
    root = Path(args.dir)
    say(f"PID {os.getpid()}")
    step = 0
    for _ in range(args.checkpoints):
        step += args.step_size
        write_checkpoint(root, step, args)
        deadline = time.monotonic() + args.every
        while stop["signal"] is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if stop["signal"] is not None:
            break
    if stop["signal"] is not None:
        if args.record:
            Path(args.record).write_text(f"got {signal.Signals(stop['signal']).name}\n")
        say("SIGTERM: writing a final checkpoint")
        step += args.step_size
        write_checkpoint(root, step, args)
        return args.exit_on_sigterm
    return 0


if __name__ == "__main__":
    sys.exit(main())
