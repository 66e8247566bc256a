"""The report: the machine, a Markdown table of the rows, and the exact commands."""

from __future__ import annotations

from bench import goals


def markdown(rows: list[dict]) -> str:
    lines = ["| workload | contender | median s | min-max s | MB/s | peak RSS MiB | "
             "ratio vs ckpt-agent | store MB/run |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        mbps = f"{row['mb_per_s']:.0f}" if row["mb_per_s"] else "-"
        lines.append(
            f"| {row['workload']} | {row['contender']} | {row['median_s']:.3f} | "
            f"{row['min_s']:.3f}-{row['max_s']:.3f} | {mbps} | {row['peak_rss_mib']:.0f} | "
            f"{row['ratio_vs_ckpt_agent']:.2f} | {goals.store_mb(row)} |")
    return "\n".join(lines)


def describe_machine(info: dict) -> str:
    disk = info["disk"]
    kind = {True: "rotational", False: "non-rotational", None: "unknown"}[disk["rotational"]]
    busy = info["loadavg_at_start"][0] > (info["nproc"] or 1) / 2  # before we added any load
    return (f"- nproc: {info['nproc']} (usable: {info['usable_cpus']}), "
            f"CPU: {info['cpu_model']}, memory: {info['memory_gib']} GiB\n"
            f"- Python {info['python']}, kernel {info['kernel']}, load average "
            f"{info['loadavg_at_start'][0]:.1f} at start, {info['loadavg_at_end'][0]:.1f} at end"
            f"{' (machine busy before the benchmark started: expect noise)' if busy else ''}\n"
            f"- temp folder {disk['folder']} on {disk['device']} ({disk['fstype']}, {kind}, "
            f"mounted at {disk['mountpoint']}, {disk['free_gib']} GiB free)")


def commands(rows: list[dict]) -> str:
    """Each row's round-0 command line, once."""
    seen: set[tuple[str, str]] = set()
    lines = []
    for row in rows:
        key = (row["workload"], row["contender"])
        if key not in seen:
            seen.add(key)
            lines.append(f"- {row['workload']} / {row['contender']}: `{row['command']}`")
    return "\n".join(lines)


def render(result: dict) -> str:
    tools = result["tools"]
    runs = result["config"]["runs"]
    return "\n".join([
        "## Machine\n",
        describe_machine(result["machine"]),
        f"- tools: {tools['s5cmd']}; {tools['weed']}; {tools['boto3']}",
        "- data sets: " + "; ".join(f"{k}: {v}" for k, v in result["datasets"].items()),
        f"\n## Results ({runs} run(s) each, contenders alternated per round)\n",
        markdown(result["rows"]),
        "\nratio = contender wall / ckpt-agent wall (default http engine) in the same round (median "
        "over rounds); "
        "> 1 means ckpt-agent was faster. MB = 10^6 bytes. store MB/run: bytes through the "
        "counting relay (median per run; recv for loads, sent for uploads; every request and "
        "response head included).\n",
        *([f"## Goals (issues 12 and 19)\n\n{goals.markdown(result['goals'])}\n"]
          if result.get("goals") else []),
        "## Commands (round 0)\n",
        commands(result["rows"]),
    ])
