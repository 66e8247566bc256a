"""A save streams each part from disk: the resident memory it needs does not grow with the file.

Measured in a child process from /proc/self/status (VmRSS before the save, VmHWM after): both are
of the child's own address space, which exec starts afresh, so the test process does not count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MIB = 1 << 20
FILE_SIZE = 320 * MIB
GROWTH_LIMIT = 128 * MIB  # several 64 MiB parts in memory at once would exceed it; streaming stays far below

CHILD = r"""
import json, sys
from pathlib import Path
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.upload.commit import CheckpointId, CommitRequest, commit_checkpoint
from ckpt_agent.stores.s3boto import Boto3Store
from ckpt_agent.stores.s3native import NativeS3Store
import os

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

engine, bucket, prefix, folder = sys.argv[1:5]
store = Boto3Store(bucket, prefix) if engine == "boto3" else NativeS3Store(bucket, prefix, dict(os.environ))
store.list_dir("")  # the client is built and connected before the baseline
before = status("VmRSS")
commit_checkpoint(store, CommitRequest(Path(folder), CheckpointId(None, "job", "checkpoint-1"), 4), lambda n: None,
                  Cancel())
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


@pytest.mark.parametrize("engine", ["boto3", "http"])
def test_saving_a_large_file_keeps_resident_memory_bounded_by_parts_not_the_file(
        engine: str, seaweed, s3_prefix: str, tmp_path: Path):
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    with open(folder / "model.bin", "wb") as f:
        f.truncate(FILE_SIZE)  # sparse: zeros on read, no disk and no page cache of ours to count
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(Path(__file__).parent.parent), **seaweed.env()}
    done = subprocess.run([sys.executable, "-c", CHILD, engine, seaweed.bucket, s3_prefix, str(folder)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    growth = memory["peak"] - memory["before"]
    assert growth < GROWTH_LIMIT, f"{engine}: resident memory grew {growth / MIB:.0f} MiB for a 320 MiB file"
    uploaded = seaweed.client().list_objects_v2(Bucket=seaweed.bucket, Prefix=s3_prefix)["Contents"]
    assert any(o["Key"].endswith("/model.bin") and o["Size"] == FILE_SIZE for o in uploaded)
