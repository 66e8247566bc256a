"""Faults the loader survives, or turns into a clean failure: issue 4, "Faults it survives".

Every network fault runs the installed `ckpt-agent` against the real SeaweedFS through
tests/support/faultproxy/ on 127.0.0.1; the proxy's byte accounting proves that a retried part
resumes where it stopped instead of starting the object again. docs/reliability.md maps each
fault to the test here that proves it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.seaweed import SeaweedServer
from ckpt_agent.disk.safefs import INCOMPLETE_SUFFIX
from ckpt_agent.stores import layout
from tests.support.faultproxy import FaultProxy
from tests.support.helpers import (
    AGENT,
    JOB,
    NAME,
    PART,
    agent_env,
    assert_exact,
    assert_one_line_failure,
    file_bytes,
    loaded,
    payload,
    put_object,
    run_agent,
    start_agent,
    upload_checkpoint,
    wait_for,
)
from tests.support.specs import latest, spec

pytestmark = pytest.mark.seaweed

KIB, MIB = 1 << 10, 1 << 20


@dataclass
class Checkpoint:
    server: SeaweedServer
    prefix: str
    files: dict[str, bytes]

    def env(self, folder: Path, proxy: FaultProxy | None = None, **extra: str) -> dict[str, str]:
        return agent_env(self.server, self.prefix, folder,
                         endpoint=proxy.endpoint if proxy else None, **extra)

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{layout.file_key(JOB, NAME, 0, rel)}"


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture
def one_big(s3_env: SeaweedServer, s3_prefix: str, tmp_path: Path) -> Checkpoint:
    """One 2 MiB file of eight 256 KiB parts, plus a small one."""
    files = {"model.safetensors": payload(2 * MIB, "big"), "trainer_state.json": b'{"global_step": 7}'}
    return Checkpoint(s3_env, s3_prefix, upload_checkpoint(s3_env, s3_prefix, tmp_path / "src", files))


@pytest.fixture
def four_files(s3_env: SeaweedServer, s3_prefix: str, tmp_path: Path) -> Checkpoint:
    """Four 2 MiB shards: enough for some to finish while others are still on the wire."""
    files = {f"shard-{i}.bin": payload(2 * MIB, f"shard{i}") for i in range(4)}
    files["trainer_state.json"] = b'{"global_step": 7}'
    return Checkpoint(s3_env, s3_prefix, upload_checkpoint(s3_env, s3_prefix, tmp_path / "src", files))


# ---- transient network faults: exact content, the retry resumes where it stopped ---------------

ENGINES = ["http", "boto3"]  # the native S3 engine (default) and CKPT_AGENT_S3_ENGINE=boto3
BIG = "model.safetensors"
CUT = 1 * MIB + 100 * KIB  # mid-part: parts 0-3 arrive whole, part 4 is cut short


def _on_disk(folder: Path, rel: str, size: int) -> bytes:
    """The first `size` bytes of a file still being downloaded (empty if it has no temporary file yet)."""
    try:
        with open(loaded(folder) / f"{rel}.ckpt-incomplete", "rb") as f:
            return f.read(size)
    except FileNotFoundError:
        return b""


def _retried_ranges(proxy: FaultProxy, rel: str) -> list[str | None]:
    return [e.range for e in proxy.exchanges if e.method == "GET" and e.target.split("?")[0].endswith(rel)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["reset", "truncate"])
def test_reset_or_truncated_body_is_retried_from_the_first_unverified_part(kind, engine, one_big, proxy, tmp_path):
    proxy.add_rule(kind, method="GET", path=BIG, offset=CUT)
    dl = tmp_path / "dl"
    result = run_agent(["load"], one_big.env(dl, proxy, CKPT_AGENT_S3_ENGINE=engine))
    assert result.returncode == 0, result.stderr
    assert_exact(dl, one_big.files)
    ranges = _retried_ranges(proxy, BIG)
    assert ranges == [f"bytes=0-{2 * MIB - 1}", f"bytes={4 * PART}-{2 * MIB - 1}"]
    # the cut request delivered CUT bytes, the retry only the parts from the cut one on
    assert file_bytes(proxy, BIG) == CUT + 2 * MIB - 4 * PART


def test_stalled_body_times_out_and_is_retried_from_the_first_unverified_part(one_big, proxy, tmp_path):
    proxy.add_rule("stall", method="GET", path=BIG, offset=CUT, seconds=30)
    dl = tmp_path / "dl"
    started = time.monotonic()
    result = run_agent(["load"], one_big.env(dl, proxy, CKPT_AGENT_READ_TIMEOUT="1"))
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 15  # the 30 s stall was cut short by the 1 s read timeout
    assert_exact(dl, one_big.files)
    assert _retried_ranges(proxy, BIG)[-1] == f"bytes={4 * PART}-{2 * MIB - 1}"
    assert file_bytes(proxy, BIG) == CUT + 2 * MIB - 4 * PART


STATUS_ENGINES = [(500, "http"), (503, "http"), (503, "boto3")]  # botocore's own backoff is slow: one case


@pytest.mark.parametrize(("status", "engine"), STATUS_ENGINES)
def test_http_500_and_503_slowdown_on_a_ranged_get_are_retried(status, engine, one_big, proxy, tmp_path):
    rule = proxy.add_rule("status", method="GET", path=BIG, status=status, count=3)
    dl = tmp_path / "dl"
    result = run_agent(["load"], one_big.env(dl, proxy, CKPT_AGENT_S3_ENGINE=engine))
    assert result.returncode == 0, result.stderr
    assert rule.fired == 3
    assert_exact(dl, one_big.files)
    assert file_bytes(proxy, BIG) == 2 * MIB  # error answers carry no file bytes


@pytest.mark.parametrize(("status", "engine"), STATUS_ENGINES)
def test_http_500_and_503_while_resolving_are_retried(status, engine, one_big, proxy, tmp_path):
    manifest = proxy.add_rule("status", method="GET", path=".manifest.json", status=status, count=2)
    listing = proxy.add_rule("status", method="GET", path="list-type=2", status=status, count=2)
    dl = tmp_path / "dl"
    result = run_agent(["load"], one_big.env(dl, proxy, BT_LOAD_CHECKPOINT_CONFIG=spec(dl, latest("proj")),
                                             CKPT_AGENT_S3_ENGINE=engine))
    assert result.returncode == 0, result.stderr
    assert (manifest.fired, listing.fired) == (2, 2)
    assert_exact(dl, one_big.files)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["reset", "truncate"])
def test_manifest_body_cut_short_while_resolving_is_retried(kind, engine, one_big, proxy, tmp_path):
    rule = proxy.add_rule(kind, method="GET", path=".manifest.json", offset=20, count=2)
    dl = tmp_path / "dl"
    result = run_agent(["load"], one_big.env(dl, proxy, CKPT_AGENT_S3_ENGINE=engine))
    assert result.returncode == 0, result.stderr
    assert rule.fired == 2
    assert_exact(dl, one_big.files)


def test_server_restarted_mid_download_resumes_and_loads_exact_content(four_files, proxy, tmp_path):
    for i in range(4):  # hold every shard mid-body until the "restart" drops the connections
        proxy.add_rule("stall", method="GET", path=f"shard-{i}.bin", offset=CUT, seconds=30)
    dl = tmp_path / "dl"
    agent = start_agent(["load"], four_files.env(dl, proxy, CKPT_AGENT_READ_TIMEOUT="20"))
    try:
        wait_for(lambda: sum(e.outcome == "stalled" for e in proxy.exchanges) == 4, 30, "four stalled shards")
        # A reset discards bytes still in the agent's socket buffer: restart only once every shard's
        # whole parts before the cut are on disk, which is what the resumed ranges below assume.
        wait_for(lambda: all(_on_disk(dl, f"shard-{i}.bin", 4 * PART) == four_files.files[f"shard-{i}.bin"][:4 * PART]
                             for i in range(4)), 30, "the whole parts before the cut on disk")
        proxy.pause_upstream(4)
        out, err = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert agent.returncode == 0, err
    assert_exact(dl, four_files.files)
    for i in range(4):
        assert _retried_ranges(proxy, f"shard-{i}.bin")[-1] == f"bytes={4 * PART}-{2 * MIB - 1}"
    assert file_bytes(proxy, "shard-") == 4 * (CUT + 2 * MIB - 4 * PART)
    assert proxy.stats.refused > 0 or any(e.outcome == "paused-reset" for e in proxy.exchanges)


def test_server_restarted_while_resolving_is_survived(one_big, proxy, tmp_path):
    proxy.add_rule("stall", method="GET", path=".manifest.json", seconds=30)  # hold the resolve phase
    dl = tmp_path / "dl"
    agent = start_agent(["load"], one_big.env(dl, proxy, CKPT_AGENT_READ_TIMEOUT="20"))
    try:
        wait_for(lambda: any(e.outcome == "stalled" for e in proxy.exchanges), 30, "the manifest GET to stall")
        proxy.pause_upstream(3)
        _, err = agent.communicate(timeout=60)
    finally:
        agent.kill()
    assert agent.returncode == 0, err
    assert_exact(dl, one_big.files)
    assert any(e.outcome == "paused-reset" for e in proxy.exchanges) or proxy.stats.refused > 0


# ---- persistent faults: a clean failure once the retry budget is spent ------------------------

def test_persistent_fault_on_a_file_fails_cleanly_with_exit_4_and_never_starts_training(one_big, proxy, tmp_path):
    rule = proxy.add_rule("reset", method="GET", path=BIG, count=None)  # every request, before any answer
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    result = run_agent(["run", "--", "touch", str(marker)], one_big.env(dl, proxy))
    assert_one_line_failure(result, 4, BIG, "gave up after")
    assert rule.fired >= 6  # the whole budget was tried
    assert not marker.exists()
    assert not (loaded(dl) / BIG).exists()


def test_persistent_503_while_resolving_fails_cleanly_with_exit_4(one_big, proxy, tmp_path):
    proxy.add_rule("status", method="GET", path=".manifest.json", status=503, count=None)
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    result = run_agent(["run", "--", "touch", str(marker)], one_big.env(dl, proxy))
    assert_one_line_failure(result, 4, "rank-0.manifest.json", "SlowDown")
    assert not marker.exists()
    assert not loaded(dl).exists()


# ---- killed, interrupted, raced -----------------------------------------------------------------

STALLED = ("shard-0.bin", "shard-1.bin")


def _stall_two_shards(proxy: FaultProxy) -> None:
    for rel in STALLED:
        proxy.add_rule("stall", method="GET", path=rel, offset=CUT, seconds=30)


def _parts_on_disk(dl: Path, files: dict[str, bytes], rel: str, parts: int) -> bool:
    """The first `parts` parts of `rel` are in its temporary file (so the agent verified them)."""
    tmp = loaded(dl) / (rel + INCOMPLETE_SUFFIX)
    try:
        with open(tmp, "rb") as f:
            return f.read(parts * PART) == files[rel][: parts * PART]
    except FileNotFoundError:
        return False


def _wait_mid_download(dl: Path, ckpt: Checkpoint, agent: subprocess.Popen) -> None:
    """Until the unstalled files are in place and the stalled ones hold their first four parts."""
    done = [rel for rel in ckpt.files if rel not in STALLED]
    wait_for(lambda: agent.poll() is not None or (
        all((loaded(dl) / rel).exists() for rel in done)
        and all(_parts_on_disk(dl, ckpt.files, rel, 4) for rel in STALLED)), 30, "a download half done")
    assert agent.poll() is None, agent.communicate()


def test_sigkill_mid_download_then_restart_fetches_only_what_is_missing(four_files, proxy, tmp_path):
    _stall_two_shards(proxy)
    dl = tmp_path / "dl"
    env = four_files.env(dl, proxy, CKPT_AGENT_WORKERS="8")
    first = start_agent(["load"], env)
    try:
        _wait_mid_download(dl, four_files, first)
        first.kill()
        first.wait(10)
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    assert not (loaded(dl) / STALLED[0]).exists() and not (loaded(dl) / STALLED[1]).exists()
    total = sum(len(d) for d in four_files.files.values())
    verified = total - sum(len(four_files.files[rel]) - 4 * PART for rel in STALLED)

    proxy.clear()
    proxy.reset_stats()
    second = run_agent(["load"], env)
    assert second.returncode == 0, second.stderr
    assert_exact(dl, four_files.files)
    # only the parts after the verified ones of the two stalled shards came over the wire
    assert file_bytes(proxy) == total - verified == 2 * (2 * MIB - 4 * PART)
    for rel in STALLED:
        assert _retried_ranges(proxy, rel) == [f"bytes={4 * PART}-{2 * MIB - 1}"]


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_sigint_mid_download_stops_within_2s_keeps_partial_files_and_never_trains(
        signum, code, four_files, proxy, tmp_path):
    _stall_two_shards(proxy)
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    env = four_files.env(dl, proxy, CKPT_AGENT_WORKERS="8", CKPT_AGENT_READ_TIMEOUT="20")
    agent = start_agent(["run", "--", "touch", str(marker)], env)
    try:
        _wait_mid_download(dl, four_files, agent)
        sent = time.monotonic()
        agent.send_signal(signum)
        _, err = agent.communicate(timeout=10)
        took = time.monotonic() - sent
    finally:
        agent.kill()
    assert agent.returncode == code, err
    assert took < 2, took
    assert "Traceback" not in err and signal.Signals(signum).name in err
    assert not marker.exists()
    for rel in STALLED:
        assert (loaded(dl) / (rel + INCOMPLETE_SUFFIX)).exists()
        assert not (loaded(dl) / rel).exists()

    proxy.clear()
    proxy.reset_stats()
    again = run_agent(["run", "--", "touch", str(marker)], env)
    assert again.returncode == 0, again.stderr
    assert marker.exists()
    assert_exact(dl, four_files.files)
    assert file_bytes(proxy) == 2 * (2 * MIB - 4 * PART)  # it resumed


def test_sigterm_while_resolving_stops_within_2s_with_143(one_big, proxy, tmp_path):
    proxy.add_rule("stall", method="GET", path=".manifest.json", seconds=30, count=None)
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    agent = start_agent(["run", "--", "touch", str(marker)], one_big.env(dl, proxy, CKPT_AGENT_READ_TIMEOUT="20"))
    try:
        wait_for(lambda: any(e.outcome == "stalled" for e in proxy.exchanges), 30, "the manifest GET to stall")
        sent = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=10)
        took = time.monotonic() - sent
    finally:
        agent.kill()
    assert (agent.returncode, "Traceback" in err) == (143, False), err
    assert took < 2, took
    assert not marker.exists()


def test_second_agent_on_the_same_folder_waits_for_the_first_and_both_end_correct(four_files, proxy, tmp_path):
    proxy.add_rule("stall", method="GET", path=STALLED[0], offset=CUT, seconds=30)  # holds the first agent
    dl = tmp_path / "dl"
    env = four_files.env(dl, proxy, CKPT_AGENT_READ_TIMEOUT="20")
    lock, second_err = dl / ".ckpt-agent" / "lock", tmp_path / "second.err"
    first = start_agent(["load"], env)
    try:
        wait_for(lambda: first.poll() is not None or (lock.exists() and lock.read_text() == str(first.pid)),
                 30, "the first agent to take the folder lock")
        with open(second_err, "w") as err:
            second = subprocess.Popen([AGENT, "load"], env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: second.poll() is not None or "waiting" in second_err.read_text(), 30,
                     "the second agent to wait")
            assert any(e.outcome == "stalled" for e in proxy.exchanges)  # the first is still downloading
            proxy.pause_upstream(0)  # drop the stalled connection: the first agent resumes and finishes
            _, err1 = first.communicate(timeout=60)
            second.wait(60)
        finally:
            second.kill()
    finally:
        first.kill()
    err2 = second_err.read_text()
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert f"in use by pid {first.pid}; waiting for it to finish" in err2
    # the second went on only after the first had placed every file: it found them all intact
    assert "fetched 0 files (0 B), 5 already intact" in err2
    assert_exact(dl, four_files.files)
    assert file_bytes(proxy, STALLED[0]) == CUT + 2 * MIB - 4 * PART


# ---- a changed object, the overall deadline ----------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("change", ["same size", "longer", "shorter"])
def test_object_changed_after_its_manifest_fails_with_exit_5_and_is_not_placed(change, engine, one_big, proxy,
                                                                                tmp_path):
    original = one_big.files[BIG]
    changed = {"same size": original[:PART] + payload(len(original) - PART, "changed"),
               "longer": original + b"more",
               "shorter": original[: 3 * PART + 7]}[change]
    put_object(one_big.server, one_big.prefix, layout.file_key(JOB, NAME, 0, BIG), changed)
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    result = run_agent(["run", "--", "touch", str(marker)], one_big.env(dl, proxy, CKPT_AGENT_S3_ENGINE=engine))
    assert_one_line_failure(result, 5, BIG)
    assert not marker.exists()
    assert not (loaded(dl) / BIG).exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_object_shrunk_below_a_resumed_range_fails_with_exit_5(engine, one_big, proxy, tmp_path):
    dl = tmp_path / "dl"
    env = one_big.env(dl, proxy, CKPT_AGENT_S3_ENGINE=engine)
    assert run_agent(["load"], env).returncode == 0
    with open(loaded(dl) / BIG, "r+b") as f:  # damage part 5: the next load refetches only that part
        f.seek(5 * PART)
        f.write(b"\0" * 10)
    put_object(one_big.server, one_big.prefix, layout.file_key(JOB, NAME, 0, BIG), one_big.files[BIG][: 3 * PART])
    result = run_agent(["load"], env)
    assert_one_line_failure(result, 5, BIG, "changed after it was committed")
    assert _retried_ranges(proxy, BIG)[-1] == f"bytes={5 * PART}-{6 * PART - 1}"  # answered 416
    assert not (loaded(dl) / BIG).exists()


def test_load_timeout_fails_with_exit_7_naming_the_files_still_missing(four_files, proxy, tmp_path):
    _stall_two_shards(proxy)
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    env = four_files.env(dl, proxy, CKPT_AGENT_WORKERS="8", CKPT_AGENT_READ_TIMEOUT="20", BT_LOAD_TIMEOUT="3")
    started = time.monotonic()
    result = run_agent(["run", "--", "touch", str(marker)], env)
    assert time.monotonic() - started < 8
    assert_one_line_failure(result, 7, "BT_LOAD_TIMEOUT", "still missing 2 files", *STALLED)
    assert "shard-2.bin" not in result.stderr.splitlines()[-1]
    assert not marker.exists()


def test_load_timeout_while_resolving_fails_with_exit_7(one_big, proxy, tmp_path):
    proxy.add_rule("stall", method="GET", path=".manifest.json", seconds=30, count=None)
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    env = one_big.env(dl, proxy, CKPT_AGENT_READ_TIMEOUT="20", BT_LOAD_TIMEOUT="2")
    started = time.monotonic()
    result = run_agent(["run", "--", "touch", str(marker)], env)
    assert time.monotonic() - started < 6
    assert_one_line_failure(result, 7, "BT_LOAD_TIMEOUT")
    assert not marker.exists()


# ---- not enough free disk ----------------------------------------------------------------------

_FAKE_DISK = """
import shutil, sys
from collections import namedtuple
shutil.disk_usage = lambda path: namedtuple("usage", "total used free")(1 << 40, (1 << 40) - 1000, 1000)
from ckpt_agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_not_enough_free_disk_fails_with_exit_6_before_any_download(four_files, proxy, tmp_path):
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    argv = [sys.executable, "-c", _FAKE_DISK, "run", "--", "touch", str(marker)]
    result = subprocess.run(argv, env=four_files.env(dl, proxy), capture_output=True, text=True, timeout=60)
    assert_one_line_failure(result, 6, f"download_folder {dl}", "needs 8.4 MB but only 1.0 KB is free")
    assert not marker.exists()
    assert file_bytes(proxy) == 0  # not one byte of a file was asked for
    assert not list(dl.rglob(f"*{INCOMPLETE_SUFFIX}")) and not loaded(dl).exists()


def test_free_space_check_counts_what_partial_files_already_hold(tmp_path, monkeypatch):
    from ckpt_agent.disk.folder import Folder
    from ckpt_agent.errors import EXIT_LOCAL, LocalError
    from ckpt_agent.load import pipeline as load
    from ckpt_agent.load.plan import FileTask, Plan
    from ckpt_agent.stores.manifest import FileEntry

    dest = tmp_path / "rank-0" / NAME / "model.bin"
    dest.parent.mkdir(parents=True)
    (dest.parent / ("model.bin" + INCOMPLETE_SUFFIX)).write_bytes(os.urandom(4 * MIB))  # a killed run's
    task = FileTask("k", dest, f"rank-0/{NAME}/model.bin", FileEntry("model.bin", 10 * MIB, ("0",) * 40), PART)
    plan = Plan(tmp_path, (task,), (), ())

    def free(n: int) -> None:
        usage = shutil.disk_usage(tmp_path)._replace(free=n)
        monkeypatch.setattr(load.shutil, "disk_usage", lambda path: usage)

    folder = Folder(tmp_path)
    free(6 * MIB + 1)
    load.check_free_space(plan, folder)  # 10 MiB minus the 4 MiB already on disk fits
    free(5 * MIB)
    with pytest.raises(LocalError) as info:
        load.check_free_space(plan, folder)
    folder.close()
    assert info.value.exit_code == EXIT_LOCAL == 6
    assert "needs 6.3 MB but only 5.2 MB is free" in str(info.value)
