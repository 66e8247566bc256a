"""Start-up (issue 19): `ckpt-agent run -- true` against `true`, and the first store request.

    python bench/startup.py [--rounds 30] [--load-rounds 7]

1. `run -- true` with loading disabled and `/bin/true`, alternated round by round (which goes first
   alternates too), each a whole process timed from just before fork to after reaping; prints the
   medians and the median of the paired differences (the goal: at most 50 ms).
2. The first store request: SeaweedFS on 127.0.0.1 behind the counting relay (bench/relay.py), a
   1 MiB checkpoint saved with `ckpt-agent save`; each round times `ckpt-agent load` from just
   before fork to the first byte the relay receives from it (time.monotonic, one clock for both
   processes), and to its exit.

The machine is shared: run it on a quiet one and read the spread, not only the median.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.relay import Relay  # noqa: E402
from bench.seaweed import clean_env, start_seaweed  # noqa: E402

AGENT = str(Path(sys.executable).parent / "ckpt-agent")
TRUE = "/bin/true" if os.path.exists("/bin/true") else shutil.which("true") or "true"


def wall(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def noop(rounds: int) -> dict:
    env = clean_env()
    agent: list[float] = []
    true: list[float] = []
    for r in range(rounds):
        order = [(agent, [AGENT, "run", "--", TRUE]), (true, [TRUE])]
        for times, argv in order if r % 2 == 0 else order[::-1]:
            times.append(wall(argv, env))
    over = [a - t for a, t in zip(agent, true, strict=True)]
    return {"rounds": rounds, "run_true_ms": _ms(agent), "true_ms": _ms(true), "over_ms": _ms(over),
            "over_median_ms": round(statistics.median(over) * 1000, 1)}


def first_request(rounds: int, work: Path) -> dict:
    with start_seaweed(work / "seaweed") as server:
        env = {**clean_env(), **server.env(), "BT_CHECKPOINT_STORE": f"s3://{server.bucket}/startup",
               "BT_TRAINING_PROJECT_NAME": "bench"}
        source = work / "source" / "checkpoint-1"
        source.mkdir(parents=True)
        (source / "model.bin").write_bytes(os.urandom(1 << 20))
        subprocess.run([AGENT, "save", str(source), "--job-id", "startup"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        firsts, totals = [], []
        for r in range(rounds):
            folder = work / f"dl-{r}"
            spec = json.dumps({"enabled": True, "download_folder": str(folder)})
            with Relay(server.s3_port) as relay:
                run_env = {**env, "AWS_ENDPOINT_URL": relay.endpoint, "BT_LOAD_CHECKPOINT_CONFIG": spec}
                started = time.monotonic()
                subprocess.run([AGENT, "load"], env=run_env, check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                totals.append(time.monotonic() - started)
                assert relay.first_request_at is not None
                firsts.append(relay.first_request_at - started)
            shutil.rmtree(folder)
    return {"rounds": rounds, "first_request_ms": _ms(firsts), "load_ms": _ms(totals),
            "first_request_median_ms": round(statistics.median(firsts) * 1000, 1)}


def _ms(values: list[float]) -> dict:
    return {"median": round(statistics.median(values) * 1000, 1), "min": round(min(values) * 1000, 1),
            "max": round(max(values) * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="paired rounds of `run -- true` and `true`")
    parser.add_argument("--load-rounds", type=int, default=7, help="rounds of the first-request load")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt-startup-"))
    try:
        result = {"noop": noop(args.rounds), "first_request": first_request(args.load_rounds, work),
                  "load_average": os.getloadavg()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
