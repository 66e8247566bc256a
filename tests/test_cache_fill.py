"""The part cache is filled after the load, by a detached process (issue 19): the load never waits
for it, a filler killed or out of disk never harms a load, and a finished fill serves the next
load every byte."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckpt_agent.config.settings import settings_from_env
from ckpt_agent.disk.cache import ENTRIES, PartCache
from ckpt_agent.disk.safefs import TEMP_PREFIX
from ckpt_agent.load import cachefill
from ckpt_agent.load.pipeline import load_checkpoints
from ckpt_agent.report import Reporter
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.stores import open_store
from ckpt_agent.upload.commit import CheckpointId
from tests.support.helpers import AGENT, clean_env, commit_files, load_record, wait_for, wait_for_fill
from tests.support.specs import named, spec

PART = 1 << 20
PARTS = 48
JOB, NAME = "job-1", "checkpoint-3"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = clean_env(BT_CHECKPOINT_STORE=f"file://{tmp_path / 'store'}", BT_TRAINING_PROJECT_NAME="proj",
                    BT_CHECKPOINT_DIR=str(tmp_path / "no-trainer-here"))
    store = open_store(settings_from_env(env).store_config)
    try:
        commit_files(store, tmp_path / "trainer" / NAME,
                     {"model.bin": os.urandom(PARTS * PART - 5), "config.json": b'{"layers": 2}'},
                     CheckpointId("proj", JOB, NAME), part_size=PART, workers=2)
    finally:
        store.close()
    return env


def source(tmp_path: Path) -> dict[str, bytes]:
    folder = tmp_path / "trainer" / NAME
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def load(env: dict[str, str], dl: Path, cache: Path) -> tuple[dict[str, int], str]:
    out = io.StringIO()
    settings = settings_from_env({**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, named(NAME, JOB)),
                                  "CKPT_AGENT_CACHE_DIR": str(cache)}, workers=4)
    result = load_checkpoints(settings, Reporter(out), Cancel())
    return result.stats.bytes_from(), out.getvalue()


def load_without_filler(env: dict[str, str], dl: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A load that writes its fill job but starts no filler: the test runs the filler itself."""
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: None)
    load(env, dl, cache)
    monkeypatch.undo()
    job = dl / ".ckpt-agent" / cachefill.fill_job_name(0)
    assert job.exists()
    return job


def entries(cache: Path) -> list[Path]:
    folder = cache / ENTRIES
    return [p for p in folder.iterdir() if len(p.name) == 64] if folder.exists() else []


def exact(dl: Path, files: dict[str, bytes]) -> bool:
    placed = dl / "rank-0" / NAME
    return sorted(p.name for p in placed.iterdir()) == sorted(files) and all(
        (placed / name).read_bytes() == data for name, data in files.items())


def kill_mid_fill(job: Path, cache: Path) -> subprocess.Popen:
    filler = subprocess.Popen([sys.executable, "-m", "ckpt_agent.load.cachefill", str(job)],
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not entries(cache) and filler.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    filler.send_signal(signal.SIGKILL)
    filler.communicate(timeout=30)
    return filler


def test_a_fill_killed_by_sigkill_leaves_no_entry_a_later_load_would_trust_and_the_next_load_succeeds(
        env, tmp_path, monkeypatch):
    files = source(tmp_path)
    for attempt in range(5):  # the kill must land mid-fill; a filler that already finished is tried again
        cache = tmp_path / f"cache-{attempt}"
        job = load_without_filler(env, tmp_path / f"dl-{attempt}", cache, monkeypatch)
        filler = kill_mid_fill(job, cache)
        if filler.returncode == -signal.SIGKILL and 0 < len(entries(cache)) < PARTS:
            break
    else:
        pytest.fail("the SIGKILL never landed while the filler was filling")
    assert job.exists()  # the killed filler never finished its job
    kept = entries(cache)
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in kept)

    dl = tmp_path / "dl-next"
    bytes_from, log = load(env, dl, cache)
    assert exact(dl, files)
    assert bytes_from["cache"] == sum(p.stat().st_size for p in kept)
    assert bytes_from["store"] == sum(map(len, files.values())) - bytes_from["cache"] > 0
    assert "entries did not match" not in log
    wait_for_fill(dl)  # the next load's own filler completes the cache
    assert len(entries(cache)) == PARTS + 1


def test_a_fill_that_finds_the_disk_full_stops_says_why_and_leaves_the_load_intact(env, tmp_path, monkeypatch):
    files = source(tmp_path)
    dl, cache = tmp_path / "dl", tmp_path / "cache"
    job = load_without_filler(env, dl, cache, monkeypatch)
    real_put = PartCache.put_span
    puts = []

    def full_after_one(self, *args):
        puts.append(args[0])
        if len(puts) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(self, *args)

    monkeypatch.setattr(PartCache, "put_span", full_after_one)
    out = io.StringIO()
    assert cachefill.fill(job, Reporter(out)) == 1
    assert len(puts) == 2
    assert "filling stopped after 1 parts" in out.getvalue() and "No space left on device" in out.getvalue()
    assert not job.exists()
    assert exact(dl, files)
    assert len(entries(cache)) == 1 and not [p for p in (cache / ENTRIES).iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_a_file_changed_after_the_load_is_left_out_of_the_fill(env, tmp_path, monkeypatch):
    dl, cache = tmp_path / "dl", tmp_path / "cache"
    job = load_without_filler(env, dl, cache, monkeypatch)
    model = dl / "rank-0" / NAME / "model.bin"
    with open(model, "r+b") as f:  # the trainer writes into its loaded checkpoint
        f.write(b"x")
    out = io.StringIO()
    assert cachefill.fill(job, Reporter(out)) == 0
    assert "1 files changed since the load and were left out" in out.getvalue()
    assert len(entries(cache)) <= 1  # config.json's one part at most; nothing of model.bin
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in entries(cache))


def test_the_log_says_when_the_fill_is_done_and_the_next_load_takes_nothing_from_the_store(
        env, tmp_path):
    total = sum(map(len, source(tmp_path).values()))
    project = tmp_path / "project-cache"
    run_env = {**env, "BT_PROJECT_CACHE_DIR": str(project), "BT_LOG_FORMAT": "json"}
    first = tmp_path / "dl-1"
    with open(tmp_path / "first.log", "w+") as log:
        first_env = {**run_env, "BT_LOAD_CHECKPOINT_CONFIG": spec(first, named(NAME, JOB))}
        done = subprocess.run([AGENT, "load"], env=first_env, stderr=log, timeout=120, check=False)
        assert done.returncode == 0
        record = load_record(first)
        assert record["bytes_from"]["store"] == total

        def fill_events() -> list[dict]:
            log.seek(0)
            return [e for e in map(json.loads, log.read().splitlines()) if e["event"] == "cache_fill"]

        wait_for(lambda: len(fill_events()) == 2, 60, "the fill's last line")
        started, finished = fill_events()
    assert started["fields"]["state"] == "started" and finished["fields"]["state"] == "done"
    assert finished["fields"]["parts"] == PARTS + 1 and finished["fields"]["bytes"] == total

    second = tmp_path / "dl-2"
    second_env = {**run_env, "BT_LOAD_CHECKPOINT_CONFIG": spec(second, named(NAME, JOB))}
    done = subprocess.run([AGENT, "load"], env=second_env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    record = load_record(second)
    assert record["bytes_from"]["store"] == 0 and record["bytes_from"]["cache"] == total
