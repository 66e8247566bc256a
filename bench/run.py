"""Benchmark: ckpt-agent (both S3 engines) against s5cmd and a hand-written boto3 script.

    python bench/run.py [--quick] [--runs N] [--warmup N] [--settle S] [--workloads big,sharded,...]
                        [--out results.json]

Starts SeaweedFS (127.0.0.1 only) in a temporary folder, fills it with `ckpt-agent save`, then
times whole processes (wall time and the contender's own peak RSS), alternating the contenders
round by round, rotating who goes first (ABC BCA CAB ...). Every download is verified
afterwards (file set, sizes and, by default, crc32c of every byte); a mismatch stops the
benchmark with an error. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a script (python bench/run.py): make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.checks import BenchError  # noqa: E402
from bench.datasets import human, make_datasets  # noqa: E402
from bench.goals import judge  # noqa: E402
from bench.harness import Harness  # noqa: E402
from bench.machine import machine_info  # noqa: E402
from bench.relay import Relay  # noqa: E402
from bench.report import render  # noqa: E402
from bench.rounds import Pacing, run_workload  # noqa: E402
from bench.seaweed import start_seaweed  # noqa: E402
from bench.workloads import (  # noqa: E402
    ALL_WORKLOADS,
    datasets_filled,
    datasets_used,
    needed_disk,
    parse_workloads,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark ckpt-agent against s5cmd and boto3 on a local SeaweedFS.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and 1 run each (exercises the harness; numbers are noise)")
    parser.add_argument("--runs", type=int, default=None, help="runs per contender (default 5; "
                        "1 with --quick)")
    parser.add_argument("--workloads", type=parse_workloads, default=list(ALL_WORKLOADS),
                        help=f"comma-separated: {','.join(ALL_WORKLOADS)} (warm = both warm "
                        "workloads; default: all)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--verify", choices=("full", "size"), default="full",
                        help="after each run check every byte (crc32c, default) or sizes only")
    parser.add_argument("--run-timeout", type=float, default=None,
                        help="seconds before a single run is killed (default: scaled by size)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="parent folder for the temporary data (default: the system temp "
                        "folder; it must be on the disk you want to measure)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds of every contender before the timed ones (default 1; "
                        "0 with --quick; see bench/README.md)")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to wait after the sync before each run, so every contender "
                        "meets memory in the same settled state (default 0; see bench/README.md)")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    return args


def benchmark(args: argparse.Namespace, work: Path, result: dict) -> None:
    """Fill `result` as the benchmark goes, so a failure still leaves what was measured."""
    need = needed_disk(make_datasets(args.quick), args.workloads)
    free = shutil.disk_usage(work).free
    if free < need:
        raise BenchError(f"{work} has {human(free)} free, the benchmark needs about {human(need)}")
    with start_seaweed(work / "seaweed") as server, Relay(server.s3_port) as relay:
        h = Harness(work, server, relay, args.quick, args.verify == "full", args.run_timeout)
        result["tools"] = h.tools()
        result["datasets"] = {k: v.describe() for k, v in h.datasets.items()}
        print(f"ckpt-agent benchmark in {work}; SeaweedFS at {server.endpoint}; "
              f"{args.runs} run(s) per contender", flush=True)
        h.prepare_data(datasets_used(args.workloads))
        h.fill_store(datasets_filled(args.workloads))
        result["fill"] = h.fill
        result["rows"] = []
        for workload in args.workloads:
            result["rows"] += run_workload(h, workload, args.runs, Pacing(args.warmup, args.settle))
        result["goals"] = judge(result["rows"])
    result["machine"]["loadavg_at_end"] = os.getloadavg()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def terminate(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=parent)).resolve()
    result: dict = {"machine": machine_info(work), "config": {
        "quick": args.quick, "runs": args.runs, "workloads": args.workloads,
        "verify": args.verify, "warmup": args.warmup, "settle_s": args.settle, "workdir": str(work)}}
    status = 0
    try:
        benchmark(args, work, result)
        print()
        print(render(result))
    except BenchError as exc:
        result["error"] = str(exc)
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr, flush=True)
        status = 2
    finally:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
