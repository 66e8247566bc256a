"""The workloads: which data set each one moves and which contenders race on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import contenders as c
from bench import reuse, start
from bench.checks import BenchError
from bench.datasets import Dataset
from bench.harness import Harness

ALL_WORKLOADS = ("big", "sharded", "small", "warm-big", "warm-small", "noop", "upload",
                 *reuse.REUSE_WORKLOADS, *start.START_WORKLOADS)
# issue 19: from container start to the trainer's first step
START = ("noop", "warm-cache", "cache-fill", *start.START_WORKLOADS)
ALIASES = {"warm": ("warm-big", "warm-small"), "reuse": reuse.REUSE_WORKLOADS, "start": START,
           "all": ALL_WORKLOADS}
COLD = ("big", "sharded", "small")
WARM = ("warm-big", "warm-small")
# Which generated data set each workload uses, and whether it must be in the store first.
DATASET_OF = {"big": "big", "sharded": "sharded", "small": "small", "warm-big": "big",
              "warm-small": "small", "upload": "sharded", "restart": "big", "warm-cache": "big",
              "incremental-upload": "incremental", "exclude-optimizer": "trainer", "cache-fill": "big",
              "early-start": "big", "upload-1g": "upload1g"}
# incremental-upload: checkpoint N
NEEDS_FILL = {"big", "sharded", "small", "warm-big", "warm-small", "restart", "warm-cache",
              "incremental-upload", "exclude-optimizer", "cache-fill", "early-start"}
WARM_COPIES = len(c.ENGINES) + 1  # each ckpt-agent engine and s5cmd keep a warm copy


def parse_workloads(text: str) -> list[str]:
    """Comma-separated workload names or aliases, in the canonical order."""
    chosen: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        for name in ALIASES.get(item, (item,)):
            if name not in ALL_WORKLOADS:
                raise argparse.ArgumentTypeError(
                    f"unknown workload {item!r} (choose from {', '.join(ALL_WORKLOADS)}, "
                    "warm, reuse, all)")
            if name not in chosen:
                chosen.append(name)
    if not chosen:
        raise argparse.ArgumentTypeError("no workloads given")
    return [w for w in ALL_WORKLOADS if w in chosen]


def datasets_used(workloads: list[str]) -> list[str]:
    return list(dict.fromkeys(DATASET_OF[w] for w in workloads if w in DATASET_OF))


def datasets_filled(workloads: list[str]) -> list[str]:
    return list(dict.fromkeys(DATASET_OF[w] for w in workloads if w in NEEDS_FILL))


def needed_disk(datasets: dict[str, Dataset], workloads: list[str]) -> int:
    total = sum(datasets[d].total_bytes for d in datasets_used(workloads))  # sources
    total += sum(datasets[d].total_bytes for d in datasets_filled(workloads))  # the store
    largest = max((datasets[d].total_bytes for d in datasets_used(workloads)), default=0)
    total += 2 * largest  # one cold destination or one upload, plus slack
    total += WARM_COPIES * sum(datasets[DATASET_OF[w]].total_bytes
                               for w in workloads if w in WARM)
    total += sum(datasets["big"].total_bytes for w in ("warm-cache", "cache-fill") if w in workloads)  # caches
    if "incremental-upload" in workloads:
        total += datasets["incremental"].total_bytes  # checkpoint N+1 next to N
    return total


def files_of(h: Harness, workload: str) -> int:
    return len(h.datasets[DATASET_OF[workload]].files) if workload in DATASET_OF else 0


def lineup(h: Harness, workload: str) -> tuple[list[c.Contender], int]:
    """The contenders (reference first: ckpt-agent's default engine) and the bytes moved."""
    dest = h.work / "dest" / workload
    if workload in COLD:
        return _cold_lineup(h, workload, dest), h.datasets[workload].total_bytes
    if workload in WARM:
        return _warm_lineup(h, workload, dest)
    if workload == "noop":
        return c.noop(h), 0
    if workload in reuse.REUSE_WORKLOADS:
        dest.mkdir(parents=True, exist_ok=True)
        return reuse.lineup(h, workload, dest)
    if workload in start.START_WORKLOADS:
        dest.mkdir(parents=True, exist_ok=True)
        return start.lineup(h, workload, dest)
    if workload == "upload":
        return ([*(c.ckpt_save(h, engine) for engine in c.ENGINES), c.s5cmd_put(h)],
                h.datasets["sharded"].total_bytes)
    raise BenchError(f"unknown workload {workload}")


def _cold_lineup(h: Harness, dataset: str, dest: Path) -> list[c.Contender]:
    out = []
    for engine in c.ENGINES:
        folder = c.ckpt_folder(dest, engine)
        out.append(c.cold(c.ckpt_load(h, dataset, folder, engine), folder))
    out.append(c.cold(c.s5cmd_get(h, dataset, dest / "s5cmd"), dest / "s5cmd"))
    out.append(c.cold(c.boto3_get(h, dataset, dest / "boto3"), dest / "boto3"))
    return out


def _warm_lineup(h: Harness, workload: str, dest: Path) -> tuple[list[c.Contender], int]:
    data = DATASET_OF[workload]
    nbytes = h.datasets[data].total_bytes
    out = []
    for engine in c.ENGINES:
        folder = c.ckpt_folder(dest, engine)
        out.append(c.warm(h, c.ckpt_load(h, data, folder, engine), folder, workload, nbytes,
                          folder / "rank-0" / data))
    s5cmd = c.s5cmd_get(h, data, dest / "s5cmd", "s5cmd cp --if-size-differ", ("--if-size-differ",))
    out.append(c.warm(h, s5cmd, dest / "s5cmd", workload, nbytes))
    return out, nbytes
