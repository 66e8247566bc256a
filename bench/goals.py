"""Issue 12's and issue 19's goals, judged from the result rows: each one measured value, its goal and a verdict.

A missed goal is a finding, not a benchmark failure: the benchmark fails only when a contender
fails or leaves wrong bytes behind. Byte goals use the relay's counts (bench/relay.py); the
agent's own count is shown next to them as a cross-check.
"""

from __future__ import annotations

import statistics

from bench.datasets import CHUNK, MB, KiB, human

PEAK_RSS_MIB = 256
RESTART_VS_CP = 1.5
SENT_SHARE = 0.10
CACHE_FILL_VS_NO_CACHE = 1.05  # issue 19
EARLY_VS_SEQUENTIAL = 0.6
NOOP_OVER_TRUE_S = 0.050
UPLOAD_VS_S5CMD = 1.2  # s5cmd wall / ckpt-agent save wall


def allowance(data_bytes: int) -> int:
    """Response heads the relay counts besides the data: a ranged GET or a part each (<2 KiB)."""
    return 64 * KiB + 2 * KiB * -(-data_bytes // CHUNK)


def data_bytes(row: dict, run: dict) -> int:
    """Checkpoint data a load received: the relay's count less its dry run's (metadata)."""
    return run["store_bytes"] - (row.get("metadata_bytes") or 0)


def _goal(workload: str, what: str, value: str, goal: str, met: bool, **extra: object) -> dict:
    return {"workload": workload, "what": what, "value": value, "goal": goal, "met": met, **extra}


def _agent(row: dict, key: str) -> list:
    return [run["verified"].get("agent", {}).get(key) for run in row["runs"]]


def _fetched(workload: str, row: dict, expected: int, goal: str) -> dict:
    """Worst run: checkpoint data from the store, against `expected` bytes (within allowance)."""
    worst = max((data_bytes(row, run) for run in row["runs"]), key=lambda n: abs(n - expected))
    own = [n for n in _agent(row, "bytes_fetched") if n is not None]
    shown = human(worst) + (f" (loaded-rank-<r>.json: {human(max(own))})" if own else "")
    return _goal(workload, f"{row['contender']}: checkpoint data from the store", shown,
                 goal, abs(worst - expected) <= allowance(expected), measured_bytes=worst,
                 expected_bytes=expected, allowance_bytes=allowance(expected),
                 store_bytes=[run["store_bytes"] for run in row["runs"]],
                 metadata_bytes=row.get("metadata_bytes"),
                 agent_bytes_fetched=_agent(row, "bytes_fetched"))


def _paired(row: dict, other: dict) -> float:
    """Median over rounds of row's wall / other's wall."""
    return statistics.median(a["wall_s"] / b["wall_s"]
                             for a, b in zip(row["runs"], other["runs"], strict=True))


def judge(rows: list[dict]) -> list[dict]:
    by = {(r["workload"], r["contender"]): r for r in rows}
    goals = []
    if (agent := by.get(("restart", "ckpt-agent"))) and (cp := by.get(("restart", "cp -r"))):
        goals.append(_fetched("restart", agent, 0, "0"))
        ratio = _paired(agent, cp)
        goals.append(_goal("restart", "ckpt-agent wall / cp -r wall", f"{ratio:.2f}x",
                           f"<= {RESTART_VS_CP}x", ratio <= RESTART_VS_CP))
    if agent := by.get(("warm-cache", "ckpt-agent")):
        goals.append(_fetched("warm-cache", agent, 0, "0"))
    if (save := by.get(("incremental-upload", "ckpt-agent save"))) and \
            (s5cmd := by.get(("incremental-upload", "s5cmd cp"))):
        sent = max(run["store_bytes"] for run in save["runs"])
        share = sent / save["bytes"]
        goals.append(_goal("incremental-upload", "ckpt-agent save: bytes sent (all requests) / file",
                           f"{human(sent)} = {share:.1%}", f"<= {SENT_SHARE:.0%}",
                           share <= SENT_SHARE, measured_bytes=sent,
                           agent_summary=[run["verified"].get("agent") for run in save["runs"]]))
        ratio = _paired(save, s5cmd)
        goals.append(_goal("incremental-upload", "ckpt-agent save wall / s5cmd cp wall",
                           f"{ratio:.2f}x", "< 1x", ratio < 1))
    if agent := by.get(("exclude-optimizer", "ckpt-agent")):
        goals.append(_fetched("exclude-optimizer", agent, agent["bytes"],
                              f"= the included files ({human(agent['bytes'])})"))
    goals += _start_goals(rows, by)
    for row in rows:
        if row["contender"].startswith("ckpt-agent"):
            peak = row["peak_rss_mib"]
            goals.append(_goal(row["workload"], f"{row['contender']}: peak RSS", f"{peak:.0f} MiB",
                               f"<= {PEAK_RSS_MIB} MiB", peak <= PEAK_RSS_MIB))
    return goals


def _start_goals(rows: list[dict], by: dict[tuple[str, str], dict]) -> list[dict]:
    """Issue 19: the cache off the critical path, the early start, start-up, uploads."""
    goals = []
    if (cached := by.get(("cache-fill", "ckpt-agent"))) and (plain := by.get(("cache-fill", "ckpt-agent, no cache"))):
        ratio = _paired(cached, plain)
        goals.append(_goal("cache-fill", "cold load with BT_PROJECT_CACHE_DIR / without a cache", f"{ratio:.2f}x",
                           f"<= {CACHE_FILL_VS_NO_CACHE}x", ratio <= CACHE_FILL_VS_NO_CACHE))
    early = [r for r in rows if r["workload"] == "early-start"]
    if len(early) == 2:
        sequential, started = sorted(early, key=lambda r: "--start-early" in r["contender"])
        ratio = _paired(started, sequential)
        goals.append(_goal("early-start", "time to the first step: --start-early / sequential", f"{ratio:.2f}x",
                           f"<= {EARLY_VS_SEQUENTIAL}x", ratio <= EARLY_VS_SEQUENTIAL))
    if (agent := by.get(("noop", "ckpt-agent run"))) and (true := by.get(("noop", "/bin/true"))):
        over = statistics.median(a["wall_s"] - b["wall_s"] for a, b in zip(agent["runs"], true["runs"], strict=True))
        goals.append(_goal("noop", "`run -- true` wall - `true` wall (paired)", f"{over * 1000:.0f} ms",
                           f"<= {NOOP_OVER_TRUE_S * 1000:.0f} ms", over <= NOOP_OVER_TRUE_S))
    if (save := by.get(("upload-1g", "ckpt-agent save"))) and (s5cmd := by.get(("upload-1g", "s5cmd cp"))):
        ratio = _paired(s5cmd, save)
        goals.append(_goal("upload-1g", "s5cmd cp wall / ckpt-agent save wall", f"{ratio:.2f}x",
                           f">= {UPLOAD_VS_S5CMD}x", ratio >= UPLOAD_VS_S5CMD))
    return goals


def markdown(goals: list[dict]) -> str:
    lines = ["| workload | measured | value | goal | met |", "|---|---|---:|---:|---|"]
    lines += [f"| {g['workload']} | {g['what']} | {g['value']} | {g['goal']} | "
              f"{'yes' if g['met'] else 'NO'} |" for g in goals]
    return "\n".join(lines)


def store_mb(row: dict) -> str:
    """The report's store column: median bytes through the relay per run, where counted."""
    if "store_bytes" not in row:
        return "-"
    return f"{row['store_bytes'] / MB:.1f} {'sent' if row['store_direction'] == 'sent' else 'recv'}"
