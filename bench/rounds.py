"""Racing one workload's contenders round by round, and summarising each into a result row."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

from bench.checks import remove
from bench.contenders import Contender, slug
from bench.datasets import MB
from bench.harness import Harness
from bench.reuse import REUSE_WORKLOADS
from bench.timing import check_exit, run_timed
from bench.workloads import files_of, lineup


@dataclass(frozen=True)
class Pacing:
    """`warmup` untimed rounds before the timed ones: on this VM the first run after a while meets
    memory the balloon driver gave back to the host (free page reporting), and round 0 always starts
    with ckpt-agent. `settle` seconds after each sync put every run in that cold state instead."""

    warmup: int = 0
    settle: float = 0.0


def run_workload(h: Harness, workload: str, runs: int, pacing: Pacing = Pacing()) -> list[dict]:
    """Every contender `runs` times, alternating, each round starting with the next one."""
    contenders, nbytes = lineup(h, workload)
    timeout = h.timeout(nbytes)
    for w in range(pacing.warmup):  # round numbers past the timed ones: names a check deletes again
        for c in contenders:
            _one_run(h, workload, c, runs + w, timeout, pacing.settle, "warm-up")
    results: dict[str, list[dict]] = {c.name: [] for c in contenders}
    for r in range(runs):
        shift = r % len(contenders)  # ABC BCA CAB...: no contender always runs right after another's cleanup
        for c in contenders[shift:] + contenders[:shift]:
            results[c.name].append(_one_run(h, workload, c, r, timeout, pacing.settle, f"round {r}"))
    if workload.startswith("warm") or workload in REUSE_WORKLOADS:
        remove(h.work / "dest" / workload)
        remove(h.work / "cache" / workload)
    reference = results[contenders[0].name]
    return [summarise(workload, c, contenders[0].name, results[c.name], reference, nbytes,
                      files_of(h, workload)) for c in contenders]


def _one_run(h: Harness, workload: str, c: Contender, r: int, timeout: float, settle: float,
             label: str) -> dict:
    c.prepare(r)
    os.sync()  # flush the previous run's dirty pages so they are not billed here
    time.sleep(settle)
    argv = c.argv(r)
    log = h.log(f"{workload}-{slug(c.name)}-{r}")
    before = h.relay.traffic()
    m = run_timed(argv, c.env, log, timeout)
    traffic = h.relay.traffic() - before  # the process has exited: its connections are closed
    check_exit(m, f"{workload}/{c.name} {label}", argv, log)
    verified = c.check(r)
    counted = {}
    if c.counted:
        counted = {"store_bytes": getattr(traffic, c.counted), "store_traffic": {
            "sent": traffic.sent, "received": traffic.received}}
    shown = f" {counted['store_bytes'] / MB:10.3f} MB {c.counted}" if counted else ""
    print(f"  {workload:<10} {c.name:<28} {label}: {m.wall_s:8.3f}s "
          f"{m.maxrss_kib / 1024:8.1f} MiB{shown}", flush=True)
    return {"round": r, "wall_s": m.wall_s, "outer_wall_s": m.outer_wall_s,
            "peak_rss_mib": m.maxrss_kib / 1024, "verified": verified, **counted}


def summarise(workload: str, c: Contender, reference_name: str, runs: list[dict],
              reference: list[dict], nbytes: int, files: int) -> dict:
    """One result row: medians, spread, throughput, peak RSS and the paired ratio per round."""
    walls = [x["wall_s"] for x in runs]
    ratios = [x["wall_s"] / ref["wall_s"] for x, ref in zip(runs, reference, strict=True)]
    median = statistics.median(walls)
    counted = {}
    if c.counted:
        counted = {"store_bytes": statistics.median(x["store_bytes"] for x in runs),
                   "store_direction": c.counted, "metadata_bytes": c.metadata_bytes}
    return {
        "workload": workload,
        "contender": c.name,
        "reference": reference_name,
        "command": c.command(),
        "bytes": nbytes,
        "files": files,
        "runs": runs,
        "median_s": median,
        "min_s": min(walls),
        "max_s": max(walls),
        "mb_per_s": nbytes / MB / median if nbytes else None,
        "peak_rss_mib": max(x["peak_rss_mib"] for x in runs),
        "ratio_vs_ckpt_agent": statistics.median(ratios),
        "ratios": ratios,
        **counted,
    }
