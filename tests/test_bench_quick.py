"""The benchmark harness runs end to end in --quick mode (tiny sizes, one run each).

The numbers are noise at these sizes; the point is that every workload and contender runs
(both of ckpt-agent's S3 engines included), and that every download was verified byte for byte
by the harness itself. Also: the peak RSS it reports is the contender's own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench.checks import BenchError, verify_tree
from bench.datasets import checksum_file
from bench.goals import allowance
from bench.relay import Relay, Traffic
from bench.timing import run_timed
from tests.support.helpers import clean_env

REPO = Path(__file__).resolve().parent.parent

EXPECTED = {
    "big": {"ckpt-agent", "ckpt-agent boto3", "s5cmd", "boto3"},
    "sharded": {"ckpt-agent", "ckpt-agent boto3", "s5cmd", "boto3"},
    "small": {"ckpt-agent", "ckpt-agent boto3", "s5cmd", "boto3"},
    "warm-big": {"ckpt-agent", "ckpt-agent boto3", "s5cmd cp --if-size-differ"},
    "warm-small": {"ckpt-agent", "ckpt-agent boto3", "s5cmd cp --if-size-differ"},
    "noop": {"ckpt-agent run", "/bin/true"},
    "upload": {"ckpt-agent save", "ckpt-agent save boto3", "s5cmd cp"},
    "restart": {"ckpt-agent", "cp -r"},
    "warm-cache": {"ckpt-agent"},
    "incremental-upload": {"ckpt-agent save", "s5cmd cp"},
    "exclude-optimizer": {"ckpt-agent", "s5cmd cp --exclude"},
    "cache-fill": {"ckpt-agent", "ckpt-agent, no cache"},
    "early-start": {"ckpt-agent run", "ckpt-agent run --start-early"},
    "upload-1g": {"ckpt-agent save", "s5cmd cp"},
}
ENGINE_VAR = "CKPT_AGENT_S3_ENGINE="
PART = 8 << 20
INCLUDED = (4 << 20) + (4 << 10) + (1 << 10)  # trainer: all but optimizer.pt (8 MiB)
QUICK_BYTES = {"big": PART, "sharded": 4 * (2 << 20), "small": 50 * (4 << 10),
               "incremental": 4 * PART, "included": INCLUDED, "upload1g": PART}
QUICK_FILES = {"big": 1, "sharded": 4, "small": 50, "incremental": 1, "included": 3, "upload1g": 1}
DATASET = {"big": "big", "sharded": "sharded", "small": "small", "warm-big": "big",
           "warm-small": "small", "upload": "sharded", "restart": "big", "warm-cache": "big",
           "incremental-upload": "incremental", "exclude-optimizer": "included", "cache-fill": "big",
           "early-start": "big", "upload-1g": "upload1g"}
REUSE = ("restart", "warm-cache", "incremental-upload", "exclude-optimizer")  # counted through the relay


@pytest.mark.seaweed
def test_quick_benchmark_races_both_engines_in_every_s3_workload_and_verifies_every_byte(
        tmp_path: Path) -> None:
    out = tmp_path / "tmp" / "x.json"
    venv_bin = str(Path(sys.executable).parent)
    env = clean_env(PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
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
        # the boto3 rows run ckpt-agent with the boto3 engine; the reference keeps the default
        if contender.startswith("ckpt-agent") and contender.endswith(" boto3"):
            assert row["command"].startswith(ENGINE_VAR + "boto3 "), row["command"]
        else:
            assert ENGINE_VAR not in row["command"], row["command"]
        if workload == "noop":
            continue
        dataset = DATASET[workload]
        assert row["bytes"] == QUICK_BYTES[dataset]
        for run in row["runs"]:
            # the harness verified the destination (or the uploaded objects) byte for byte
            verified = {k: v for k, v in run["verified"].items() if k != "agent"}
            assert verified == {"files": QUICK_FILES[dataset],
                                "bytes": QUICK_BYTES[dataset], "contents": "crc32c",
                                **({"untouched": True} if workload in ("warm-big", "warm-small")
                                   else {})}, (workload, contender)
        # every S3 contender of the new workloads is counted by the relay, nobody else is
        assert ("store_bytes" in row) == (workload in REUSE and contender != "cp -r"), row
    for workload in EXPECTED:
        reference = next(r for r in result["rows"] if r["workload"] == workload)
        assert reference["contender"] in ("ckpt-agent", "ckpt-agent run", "ckpt-agent save")
        assert reference["ratio_vs_ckpt_agent"] == 1.0
    check_store_bytes(rows, result["goals"])
    # nothing left behind: the harness removes its temporary folder (server data included)
    assert list((tmp_path / "work").iterdir()) == []


def _data(row: dict) -> int:
    """Checkpoint data a load took from the store: relay bytes less its dry run's (metadata)."""
    (run,) = row["runs"]
    return run["store_bytes"] - row["metadata_bytes"]


def _agent(row: dict) -> dict:
    (run,) = row["runs"]
    return run["verified"]["agent"]


def check_store_bytes(rows: dict, goals: list[dict]) -> None:
    """Counts, never timings: what crossed the relay, against the data and the agent's own count."""
    slack = allowance(PART)  # request and response heads: far below the 8 MiB a part would add
    # s5cmd moves exactly the files: the relay sees all of them and little else
    assert 4 * PART <= rows["incremental-upload", "s5cmd cp"]["store_bytes"] <= 4 * PART + slack
    assert abs(_data(rows["exclude-optimizer", "s5cmd cp --exclude"]) - INCLUDED) <= slack

    # a load without the optimizer fetches exactly the other files, not its 8 MiB
    excluding = rows["exclude-optimizer", "ckpt-agent"]
    assert abs(_data(excluding) - INCLUDED) <= slack
    assert _agent(excluding)["bytes_fetched"] == INCLUDED
    met = {(g["workload"], g["what"]): g["met"] for g in goals}
    assert met["exclude-optimizer", "ckpt-agent: checkpoint data from the store"]
    assert all(ok for (_, what), ok in met.items() if what.endswith("peak RSS"))

    # restart and warm cache: nothing of the checkpoint comes from the store, by the relay's
    # count and by loaded-rank-<r>.json's
    for workload, source in (("restart", "checkpoint_dir"), ("warm-cache", "cache")):
        row = rows[workload, "ckpt-agent"]
        assert _agent(row)["bytes_fetched"] == 0 and abs(_data(row)) <= slack, workload
        assert _agent(row)["bytes_from"][source] == PART, workload
        assert met[workload, "ckpt-agent: checkpoint data from the store"]

    # checkpoint N+1 differs from N in one of its four parts: at least that part goes up; all of
    # it only where the agent copies the rest inside the store (its summary then says "copied")
    save = rows["incremental-upload", "ckpt-agent save"]
    (run,) = save["runs"]
    assert run["store_bytes"] >= PART
    if any("copied" in key for key in _agent(save)):
        assert run["store_bytes"] <= PART + slack


def test_relay_counts_every_byte_each_way_and_changes_none() -> None:
    request, reply = os.urandom(3 << 20), os.urandom(5 << 20)
    heard = bytearray()
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        def serve() -> None:
            conn, _ = upstream.accept()
            with conn:
                conn.settimeout(30)
                while len(heard) < len(request) and (data := conn.recv(1 << 20)):
                    heard.extend(data)
                conn.sendall(reply)

        server = threading.Thread(target=serve)
        server.start()
        with Relay(upstream.getsockname()[1]) as relay:
            before = relay.traffic()
            url = urlsplit(relay.endpoint)
            with socket.create_connection((url.hostname, url.port), timeout=30) as client:
                client.sendall(request)
                client.shutdown(socket.SHUT_WR)
                received = b"".join(iter(lambda: client.recv(1 << 20), b""))
            server.join(30)
            assert bytes(heard) == request and received == reply
            assert relay.traffic() - before == Traffic(len(request), len(reply))


def test_verification_fails_loudly_on_a_wrong_download(tmp_path: Path) -> None:
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


def test_peak_rss_is_the_contenders_own_not_the_benchmarks(tmp_path: Path) -> None:
    """Linux carries the RSS high-water mark across exec: the trampoline keeps ours out."""
    ballast = b"\x01" * (256 << 20)  # the benchmark process holds 256 MiB (every page written)
    true = shutil.which("true")
    assert true
    env = {"PATH": os.environ.get("PATH", "")}

    # Control: exec'd straight from this process, `true` is billed for our 256 MiB.
    pid = os.posix_spawn(true, [true], env)
    _, status, usage = os.wait4(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert usage.ru_maxrss >= 256 << 10

    tiny = run_timed([true], env, tmp_path / "true.log", timeout=60)
    assert (tiny.returncode, tiny.timed_out) == (0, False)
    assert tiny.maxrss_kib < 32 << 10  # the trampoline's floor is a few MiB

    # A contender that really uses memory is still measured, and without our ballast.
    hungry = run_timed([sys.executable, "-S", "-c", "b = b'x' * (96 << 20)"], env,
                       tmp_path / "hungry.log", timeout=60)
    assert hungry.returncode == 0
    assert 96 << 10 <= hungry.maxrss_kib < 256 << 10
    assert len(ballast) == 256 << 20  # held until here


def _message(*fields: tuple[int, int | bytes]) -> bytes:
    """A protobuf message of varint and length-delimited fields, as Go's pprof writes them."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([n & 0x7F | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    return b"".join(varint(number << 3) + varint(value) if isinstance(value, int)
                    else varint(number << 3 | 2) + varint(len(value)) + value for number, value in fields)


def test_store_profile_reader_charges_each_sample_to_its_innermost_function(tmp_path: Path) -> None:
    """bench/pprof.py, which says where SeaweedFS spends its CPU (bench/upload_cpu.py --profile)."""
    import gzip

    from bench import pprof

    strings = [b"", b"samples", b"cpu", b"crypto/md5.block", b"io.Copy", b"main"]
    profile = _message(
        *[(6, s) for s in strings],
        (5, _message((1, 1), (2, 3))), (5, _message((1, 2), (2, 4))), (5, _message((1, 3), (2, 5))),
        (4, _message((1, 10), (4, _message((1, 1))))), (4, _message((1, 11), (4, _message((1, 2))))),
        (4, _message((1, 12), (4, _message((1, 3))))),
        (2, _message((1, bytes([10, 11, 12])), (2, bytes([3, 120])))),  # packed ids; 120 ns
        (2, _message((1, 11), (1, 12), (2, 1), (2, 40))),  # unpacked; 40 ns
    )
    path = tmp_path / "weed.pprof"
    path.write_bytes(gzip.compress(profile))
    assert list(pprof.stacks(path)) == [(["crypto/md5.block", "io.Copy", "main"], 120), (["io.Copy", "main"], 40)]
    seconds, functions = pprof.top(path)
    assert seconds == 160e-9 and functions == [("crypto/md5.block", 0.75), ("io.Copy", 0.25)]
