"""The bytes a 2-node resume moves, against the sum of the nodes' files (issue 17).

    python bench/multinode.py [--mib 128] [--dir /tmp/multinode-bench]

Starts SeaweedFS on 127.0.0.1 and saves two 2-node checkpoints with `ckpt-agent save`
(BT_NODE_RANK=0/1), shaped as the frameworks write them:

- `dcp`: every node a shard of the state (`__0_0.distcp`, `__1_0.distcp`, MIB MiB each) and the
  leader's `.metadata`;
- `hf`: the leader's weights (MIB MiB), optimizer (2 x MIB MiB), `trainer_state.json` and
  `rng_state_0.pth`; node 1 only `rng_state_1.pth`.

Then each node resumes, one after the other, each with its own download folder, through
bench/relay.py, which counts the bytes on the wire (not the agent's own summary):

- `new nodes`: a resumed job on other machines: nothing of the checkpoint on the node;
- `same nodes`: the job restarted where it saved: each node's BT_CHECKPOINT_DIR still holds its
  own files, which are a verified local source;
- `own`: CKPT_AGENT_LOAD_RANKS=own, each node only its own files (the per-rank layout).

"data" is the relay's bytes received by the load less what the same load's `--dry-run` received
(listings and manifests), so one response head per ranged GET is left in it. Prints one Markdown
row per (shape, scenario) and the commands, and writes JSON to --out if given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a script (python bench/multinode.py): make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.datasets import Dataset, generate  # noqa: E402
from bench.relay import Relay  # noqa: E402
from bench.seaweed import clean_env, start_seaweed  # noqa: E402

AGENT = str(Path(sys.executable).parent / "ckpt-agent")
MIB = 1 << 20
JOB, NAME = "job-{shape}", "step-20"


def shapes(mib: int) -> dict[str, dict[int, dict[str, int]]]:
    """shape -> node -> file -> size."""
    big = mib * MIB
    return {
        "dcp": {0: {".metadata": 4096, "__0_0.distcp": big}, 1: {"__1_0.distcp": big}},
        "hf": {0: {"model.safetensors": big, "optimizer.pt": 2 * big, "trainer_state.json": 2048,
                   "rng_state_0.pth": 14000},
               1: {"rng_state_1.pth": 14000}},
    }


def agent(argv: list[str], env: dict[str, str]) -> None:
    result = subprocess.run([AGENT, *argv], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr[-2000:]}")


def received(relay: Relay, argv: list[str], env: dict[str, str]) -> int:
    before = relay.traffic()
    agent(argv, env)
    return (relay.traffic() - before).received


def resume(relay: Relay, base: dict[str, str], top: Path, shape: str, scenario: str) -> dict:
    """Both nodes load latest of the shape's job, one after the other; bytes per node."""
    nodes = []
    for rank in (0, 1):
        dl = top / "resume" / shape / scenario / f"node-{rank}"
        env = {**base, "BT_NODE_RANK": str(rank), "BT_GROUP_SIZE": "2",
               "BT_CHECKPOINT_DIR": str(top / "trainers" / shape / f"node-{rank}" if scenario == "same nodes"
                                        else top / "no-trainer-folder"),
               "BT_LOAD_CHECKPOINT_CONFIG": json.dumps({"enabled": True, "download_folder": str(dl), "checkpoints": [
                   {"typ": "baseten_latest_checkpoint", "job_id": JOB.format(shape=shape)}]})}
        if scenario == "own":
            env["CKPT_AGENT_LOAD_RANKS"] = "own"
        metadata = received(relay, ["load", "--dry-run"], env)
        total = received(relay, ["load"], env)
        record = json.loads((dl / ".ckpt-agent" / f"loaded-rank-{rank}.json").read_text())
        nodes.append({"rank": rank, "relay_received": total, "metadata": metadata, "data": total - metadata,
                      "placed_bytes": record["bytes_total"], "agent_bytes_from": record["bytes_from"]})
        shutil.rmtree(dl)
    return {"shape": shape, "scenario": scenario, "nodes": nodes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=128, help="MiB of each large file")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    top = args.dir or Path(tempfile.mkdtemp(prefix="multinode-bench-"))
    shutil.rmtree(top, ignore_errors=True)
    top.mkdir(parents=True)
    server = start_seaweed(top / "seaweed")
    try:
        base = clean_env()
        base.update(server.env(), BT_CHECKPOINT_STORE=f"s3://{server.bucket}/bench", CKPT_AGENT_CACHE_MAX_BYTES="0")
        layouts = shapes(args.mib)
        for shape, nodes in layouts.items():
            for rank, files in nodes.items():
                folder = top / "trainers" / shape / f"node-{rank}" / NAME
                generate(Dataset(f"{shape}-{rank}", tuple(files.items())), folder)
                agent(["save", str(folder), "--project", "bench", "--job-id", JOB.format(shape=shape),
                       "--num-nodes", "2"], {**base, "BT_NODE_RANK": str(rank)})
        with Relay(server.s3_port) as relay:
            counted = {**base, "AWS_ENDPOINT_URL": relay.endpoint}
            rows = [resume(relay, counted, top, shape, scenario)
                    for shape in layouts for scenario in ("new nodes", "same nodes", "own")]
    finally:
        server.stop()
        shutil.rmtree(top, ignore_errors=True)
    report(rows, layouts)
    if args.out:
        args.out.write_text(json.dumps({"mib": args.mib, "rows": rows}, indent=1))


def report(rows: list[dict], layouts: dict[str, dict[int, dict[str, int]]]) -> None:
    print("| checkpoint | resume | node 0 data | node 1 data | both nodes | sum of the nodes' files | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        files = sum(sum(f.values()) for f in layouts[row["shape"]].values())
        data = [n["data"] for n in row["nodes"]]
        print(f"| {row['shape']} | {row['scenario']} | {data[0] / MIB:.1f} MiB | {data[1] / MIB:.1f} MiB | "
              f"{sum(data) / MIB:.1f} MiB | {files / MIB:.1f} MiB | {sum(data) / files:.2f} |")
    print(f"\ncommand: {' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
