"""The issue-19 workloads: from container start to the trainer's first step.

early-start   `ckpt-agent run -- python bench/slow_trainer.py S` against the same with
              `--start-early`, a cold load of `big` each; the trainer's start-up takes S seconds,
              as long as an untimed cold load of `big` took just before (the median of
              three, calibrated per benchmark, shown in the command), and
              its first step is `ckpt_agent.latest_local_checkpoint()` returning: the process exits
              there, so the wall time is the time to the first step
upload-1g     `ckpt-agent save` of a new 1 GiB checkpoint (one file) against `s5cmd cp`

cache-fill and warm-cache (bench/reuse.py) wait, untimed, for the part cache's filler a load
starts in the background (load/cachefill.py), so a fill never runs during the next timed run.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import contenders as c
from bench.checks import BenchError, remove, verify_tree
from bench.harness import Harness
from bench.timing import check_exit, run_timed

SLOW_TRAINER = Path(__file__).resolve().parent / "slow_trainer.py"
START_WORKLOADS = ("early-start", "upload-1g")
FILL_TIMEOUT_S = 600


def wait_for_fill(download_folder: Path, what: str) -> None:
    """Until the filler a load started has finished its job (it removes the job file when done)."""
    job = download_folder / ".ckpt-agent" / "cache-fill-rank-0.json"
    deadline = time.monotonic() + FILL_TIMEOUT_S
    while job.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: the part cache fill did not finish in {FILL_TIMEOUT_S} s")
        time.sleep(0.05)


def lineup(h: Harness, workload: str, dest: Path) -> tuple[list[c.Contender], int]:
    if workload == "early-start":
        return _early_start(h, dest), h.datasets["big"].total_bytes
    if workload == "upload-1g":
        return [c.ckpt_save(h, "http", "upload1g"), c.s5cmd_put(h, "upload1g")], h.datasets["upload1g"].total_bytes
    raise BenchError(f"unknown workload {workload}")


def _calibrate(h: Harness, dest: Path) -> float:
    """The seconds of an untimed cold load of `big`, the median of three: the trainer's start-up
    takes as long."""
    probe = c.ckpt_load(h, "big", dest / "calibrate")
    argv = probe.argv(0)
    walls = []
    for attempt in range(3):
        log = h.log(f"early-start-calibrate-{attempt}")
        measured = run_timed(argv, probe.env, log, h.timeout(h.datasets["big"].total_bytes))
        check_exit(measured, "early-start calibration load (untimed)", argv, log)
        probe.check(0)
        remove(dest / "calibrate")
        walls.append(measured.wall_s)
    return round(statistics.median(walls), 2)


def _fixed(argv: list[str]) -> Callable[[int], list[str]]:
    return lambda _round: argv


def _checks(h: Harness, tree: Path, name: str) -> Callable[[int], dict]:
    return lambda _round: verify_tree(tree, h.expected["big"], h.full, name)


def _early_start(h: Harness, dest: Path) -> list[c.Contender]:
    startup = _calibrate(h, dest)
    rows = []
    for name, flags in (("ckpt-agent run", []), ("ckpt-agent run --start-early", ["--start-early"])):
        folder = dest / c.slug(name)
        load = c.ckpt_load(h, "big", folder)
        argv = [h.ckpt_agent, "run", *flags, "--", sys.executable, str(SLOW_TRAINER), str(startup)]
        rows.append(c.cold(dataclasses.replace(load, name=name, argv=_fixed(argv),
                                               check=_checks(h, folder / "rank-0" / "big", name)), folder))
    return rows
