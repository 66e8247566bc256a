"""What checking files the agent did not write costs: the same bytes loaded from an s3_prefix (each
file checked whole against its MD5 ETag, or its CRC32, after its parts land) and from the agent's own
store (every part checked against the manifest's crc32c as it arrives), on a SeaweedFS it starts.

    python bench/foreign_load.py [--mib 1024] [--files 4] [--rounds 3] [--dir /tmp/foreign-bench]

Prints per-round wall times and the medians of `ckpt-agent load` (own store, named reference) and
`ckpt-agent load --from s3://...` for objects put without a checksum (md5) and with boto3's CRC32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config

if not __package__:  # run as a script (python bench/foreign_load.py): make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.datasets import Dataset, generate  # noqa: E402
from bench.seaweed import clean_env, start_seaweed  # noqa: E402

AGENT = str(Path(sys.executable).parent / "ckpt-agent")


def timed(args: list[str], env: dict[str, str], folder: Path) -> tuple[float, dict[str, str]]:
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    subprocess.run([AGENT, *args], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    record = json.loads((folder / ".ckpt-agent" / "loaded-rank-0.json").read_text())
    return seconds, record["checkpoints"][0].get("verified_by", {})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024, help="MiB in all, split into --files files")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/foreign-bench"))
    args = parser.parse_args()
    top = args.dir
    shutil.rmtree(top, ignore_errors=True)
    src = top / "src" / "ckpt-1"
    generate(Dataset("foreign", tuple((f"shard-{i}.bin", (args.mib << 20) // args.files)
                                      for i in range(args.files))), src)
    with start_seaweed(top / "seaweed") as server:
        env = {**clean_env(), **server.env(), "BT_CHECKPOINT_STORE": f"s3://{server.bucket}/own"}
        subprocess.run([AGENT, "save", str(src), "--project", "p", "--job-id", "j1"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        plain = server.client()  # boto3 sends a CRC32 with each put, which S3 keeps
        keys = server.env()
        no_checksum = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                                   aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
                                   config=Config(request_checksum_calculation="when_required"))
        for client, prefix in ((no_checksum, "md5"), (plain, "crc32")):
            for path in sorted(src.iterdir()):
                client.put_object(Bucket=server.bucket, Key=f"{prefix}/ckpt-1/{path.name}", Body=path.read_bytes())
        dl = top / "dl"
        spec = json.dumps({"enabled": True, "download_folder": str(dl), "checkpoints": [
            {"typ": "baseten_named_checkpoint", "checkpoint_name": "ckpt-1", "job_id": "j1"}]})
        runs = {"own store (crc32c per part)": ["load"],
                "s3_prefix, md5": ["load", "--from", f"s3://{server.bucket}/md5/ckpt-1/"],
                "s3_prefix, crc32": ["load", "--from", f"s3://{server.bucket}/crc32/ckpt-1/"]}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(args.rounds):
            for name, cmd in (runs.items() if round_ % 2 == 0 else reversed(runs.items())):
                seconds, kinds = timed(cmd, {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec}, dl)
                times[name].append(seconds)
                print(f"round {round_ + 1} {name}: {seconds:.2f} s {sorted(set(kinds.values())) or ''}", flush=True)
        for name, values in times.items():
            print(f"median {name}: {statistics.median(values):.2f} s over {len(values)} rounds "
                  f"({args.mib} MiB in {args.files} files)")
    shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
