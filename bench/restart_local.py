"""A restart with the checkpoint still in BT_CHECKPOINT_DIR, against a local `cp -r` of the same files.

    python bench/restart_local.py [--gib 2] [--rounds 5] [--dir /tmp/restart-bench]

Writes G GiB of random shards into a trainer folder, commits them to a local store, then runs
paired rounds (`cp -r` and `ckpt-agent load`, alternating which goes first, each into a fresh
folder after a `sync`) and prints per-round wall times, the medians, their ratio and the bytes the
load took from the store (which must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

AGENT = str(Path(sys.executable).parent / "ckpt-agent")
SHARD = 512 << 20


def timed(cmd: list[str], env: dict[str, str]) -> float:
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/restart-bench"))
    args = parser.parse_args()
    top = args.dir
    shutil.rmtree(top, ignore_errors=True)
    trainer = top / "trainer" / "checkpoint-1"
    trainer.mkdir(parents=True)
    for i in range(args.gib * (1 << 30) // SHARD):
        (trainer / f"shard-{i}.bin").write_bytes(os.urandom(SHARD))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BT_", "CKPT_AGENT_"))}
    env.update(BT_CHECKPOINT_STORE=f"file://{top / 'store'}", BT_CHECKPOINT_DIR=str(trainer.parent),
               BT_LOAD_CHECKPOINT_CONFIG=json.dumps({"enabled": True, "download_folder": str(top / "dl"),
                                                     "checkpoints": [{"typ": "baseten_named_checkpoint",
                                                                      "checkpoint_name": "checkpoint-1",
                                                                      "job_id": "job-1"}]}))
    subprocess.run([AGENT, "save", str(trainer), "--project", "proj", "--job-id", "job-1", "--name",
                    "checkpoint-1"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cp_times: list[float] = []
    load_times: list[float] = []
    for r in range(args.rounds):
        runs = [("cp", ["cp", "-r", str(trainer), str(top / "cp")]), ("load", [AGENT, "load"])]
        for name, cmd in runs if r % 2 == 0 else runs[::-1]:
            shutil.rmtree(top / "cp", ignore_errors=True)
            shutil.rmtree(top / "dl", ignore_errors=True)
            (cp_times if name == "cp" else load_times).append(timed(cmd, env))
        print(f"round {r}: cp {cp_times[-1]:.2f} s, load {load_times[-1]:.2f} s", flush=True)
    record = json.loads((top / "dl" / ".ckpt-agent" / "loaded-rank-0.json").read_text())
    cp, load = statistics.median(cp_times), statistics.median(load_times)
    print(f"median cp {cp:.2f} s, load {load:.2f} s, ratio {load / cp:.2f}; bytes_from {record['bytes_from']}")
    shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
