"""The benchmark harness runs end to end in --quick mode (tiny sizes, one run each).

The numbers are noise at these sizes; the point is that every workload and contender runs,
is timed, and that every download was verified by the harness itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

EXPECTED = {
    "big": {"ckpt-agent", "s5cmd", "boto3"},
    "sharded": {"ckpt-agent", "s5cmd", "boto3"},
    "small": {"ckpt-agent", "s5cmd", "boto3"},
    "warm-big": {"ckpt-agent", "s5cmd cp --if-size-differ"},
    "warm-small": {"ckpt-agent", "s5cmd cp --if-size-differ"},
    "noop": {"ckpt-agent run", "/bin/true"},
    "upload": {"ckpt-agent save", "s5cmd cp"},
}
QUICK_BYTES = {"big": 8 << 20, "sharded": 4 * (2 << 20), "small": 50 * (4 << 10)}
QUICK_FILES = {"big": 1, "sharded": 4, "small": 50}
DATASET = {"big": "big", "sharded": "sharded", "small": "small", "warm-big": "big",
           "warm-small": "small", "upload": "sharded"}


@pytest.mark.seaweed
def test_quick_benchmark_runs_every_workload_and_verifies(tmp_path: Path) -> None:
    out = tmp_path / "tmp" / "x.json"
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BT_"))}
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "| workload | contender |" in proc.stdout

    result = json.loads(out.read_text())
    assert "error" not in result
    assert result["machine"]["nproc"] >= 1
    rows = {(r["workload"], r["contender"]): r for r in result["rows"]}
    assert set(rows) == {(w, c) for w, cs in EXPECTED.items() for c in cs}
    for (workload, contender), row in rows.items():
        assert len(row["runs"]) == 1, (workload, contender)
        assert row["median_s"] > 0 and row["min_s"] > 0 and row["max_s"] >= row["min_s"]
        assert row["peak_rss_mib"] > 0
        assert row["ratio_vs_ckpt_agent"] > 0
        assert row["command"]
        if workload == "noop":
            continue
        dataset = DATASET[workload]
        assert row["bytes"] == QUICK_BYTES[dataset]
        for run in row["runs"]:
            # the harness verified the destination (or the uploaded objects) byte for byte
            assert run["verified"] == {"files": QUICK_FILES[dataset],
                                       "bytes": QUICK_BYTES[dataset], "contents": "crc32c",
                                       **({"untouched": True} if workload.startswith("warm")
                                          else {})}, (workload, contender)
    for workload in EXPECTED:
        reference = next(r for r in result["rows"] if r["workload"] == workload)
        assert reference["contender"].startswith("ckpt-agent")
        assert reference["ratio_vs_ckpt_agent"] == 1.0
    # nothing left behind: the harness removes its temporary folder (server data included)
    assert list((tmp_path / "work").iterdir()) == []


def test_verification_fails_loudly_on_a_wrong_download(tmp_path: Path) -> None:
    from bench.run import BenchError, checksum_file, verify_tree

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"0123456789")
    (tmp_path / "y.bin").write_bytes(b"abc")
    expected = {"a/x.bin": (10, checksum_file(tmp_path / "a" / "x.bin")),
                "y.bin": (3, checksum_file(tmp_path / "y.bin"))}
    assert verify_tree(tmp_path, expected, True, "t") == {"files": 2, "bytes": 13,
                                                          "contents": "crc32c"}

    (tmp_path / "y.bin").write_bytes(b"abd")  # same size, other bytes
    assert verify_tree(tmp_path, expected, False, "t")["bytes"] == 13
    with pytest.raises(BenchError, match="wrong contents"):
        verify_tree(tmp_path, expected, True, "t")
    (tmp_path / "y.bin").write_bytes(b"ab")
    with pytest.raises(BenchError, match="has 2 bytes, expected 3"):
        verify_tree(tmp_path, expected, False, "t")
    (tmp_path / "y.bin").unlink()
    with pytest.raises(BenchError, match="missing \\['y.bin'\\]"):
        verify_tree(tmp_path, expected, False, "t")
    (tmp_path / "y.bin").write_bytes(b"abc")
    (tmp_path / "extra").write_bytes(b"")
    with pytest.raises(BenchError, match="unexpected \\['extra'\\]"):
        verify_tree(tmp_path, expected, False, "t")
