"""Verified local sources before the store (issue 12): BT_CHECKPOINT_DIR, other ranks' folders and the
part cache, each used only for bytes that match the manifest, counted against the local store and
against SeaweedFS through the fault proxy's byte counter."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckpt_agent.config.settings import settings_from_env
from ckpt_agent.disk.cache import ENTRIES
from ckpt_agent.load import sources
from ckpt_agent.load.pipeline import LoadResult, load_checkpoints
from ckpt_agent.report import JsonReporter, Reporter
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.stores import layout, open_store
from ckpt_agent.upload.commit import CheckpointId, CommitRequest, commit_checkpoint
from tests.support.faultproxy import LOOPBACK, FaultProxy
from tests.support.helpers import AGENT, wait_for_fill
from tests.support.specs import named, spec

PART = 1 << 20  # small parts keep the files small; packs take files up to 1 MiB
JOB, NAME = "job-1", "checkpoint-7"
BIG = "model.bin"


@dataclass
class Rig:
    """A store as the agent sees it (env), what it served (ranged GET bytes), and a way to rewrite a key."""

    env: dict[str, str]
    proxy: FaultProxy | None
    write_key: Callable[[str, bytes], None]
    tmp: Path

    def served(self) -> int:
        assert self.proxy is not None
        return sum(e.body_bytes for e in self.proxy.exchanges if e.method == "GET" and e.range is not None)


@pytest.fixture(params=["local", "seaweedfs"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BT_", "CKPT_AGENT_"))}
    base.update(BT_TRAINING_PROJECT_NAME="proj", BT_CHECKPOINT_DIR=str(tmp_path / "no-trainer-here"))
    if request.param == "local":
        root = tmp_path / "store"
        yield Rig({**base, "BT_CHECKPOINT_STORE": f"file://{root}"}, None,
                  lambda key, data: (root / key).write_bytes(data), tmp_path)
        return
    server = request.getfixturevalue("s3_env")
    prefix = request.getfixturevalue("s3_prefix")
    client = server.client()
    with FaultProxy(LOOPBACK, server.s3_port) as proxy:
        env = {**base, **server.env(), "AWS_ENDPOINT_URL": proxy.endpoint,
               "BT_CHECKPOINT_STORE": f"s3://{server.bucket}/{prefix}"}
        yield Rig(env, proxy, lambda key, data: client.put_object(Bucket=server.bucket, Key=f"{prefix}/{key}",
                                                                  Body=data), tmp_path)


def make_checkpoint(folder: Path) -> dict[str, bytes]:
    files = {BIG: os.urandom(3 * PART + 7), "sub/state.pt": os.urandom(PART), "empty.txt": b""}
    files.update({f"shard/{i:02d}.bin": os.urandom(100 + i) for i in range(20)})  # enough to be packed
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


def saved(rig: Rig) -> tuple[Path, dict[str, bytes]]:
    """A checkpoint written by the 'trainer' into its checkpoint folder and committed to the store."""
    folder = rig.tmp / "trainer" / NAME
    files = make_checkpoint(folder)
    commit(rig, folder, NAME)
    return folder, files


def commit(rig: Rig, path: Path, name: str) -> None:
    store = open_store(settings_from_env(rig.env).store_config)
    try:
        commit_checkpoint(store, CommitRequest(path, CheckpointId("proj", JOB, name), 2, part_size=PART),
                          lambda n: None, Cancel())
    finally:
        store.close()


@dataclass
class Loaded:
    result: LoadResult
    served: int  # bytes the store served for this load
    log: str

    @property
    def bytes_from(self) -> dict[str, int]:
        return self.result.stats.bytes_from()


def load(rig: Rig, dl: Path, reporter: type[Reporter] = Reporter, workers: int = 4, **env: str) -> Loaded:
    """One load in this process; the part cache's filler it starts (a process of its own) is waited for."""
    before = rig.served() if rig.proxy else 0
    out = io.StringIO()
    settings = settings_from_env({**rig.env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, named(NAME, JOB)), **env},
                                 workers=workers)
    result = load_checkpoints(settings, reporter(out), Cancel())
    wait_for_fill(dl)
    served = rig.served() - before if rig.proxy else result.stats.bytes_fetched
    return Loaded(result, served, out.getvalue())


def placed(dl: Path) -> Path:
    return dl / "rank-0" / NAME


def exact(dl: Path, files: dict[str, bytes]) -> bool:
    on_disk = sorted(str(p.relative_to(placed(dl))) for p in placed(dl).rglob("*") if p.is_file())
    return on_disk == sorted(files) and all((placed(dl) / rel).read_bytes() == data for rel, data in files.items())


def cache_entries(cache: Path) -> list[Path]:
    return [p for p in (cache / ENTRIES).iterdir() if len(p.name) == 64]


def test_restart_with_the_checkpoint_in_bt_checkpoint_dir_takes_no_byte_from_the_store(rig):
    trainer, files = saved(rig)
    total = sum(map(len, files.values()))
    cold = load(rig, rig.tmp / "dl-cold")  # the control: without it, every byte comes from the store
    assert cold.served == total and exact(rig.tmp / "dl-cold", files)

    warm = load(rig, rig.tmp / "dl", BT_CHECKPOINT_DIR=str(trainer.parent))
    assert warm.served == 0
    assert warm.bytes_from == {"store": 0, "checkpoint_dir": total, "ranks": 0, "cache": 0, "reused": 0}
    assert exact(rig.tmp / "dl", files)
    record = json.loads((rig.tmp / "dl" / ".ckpt-agent" / "loaded-rank-0.json").read_text())
    assert record["bytes_from"] == warm.bytes_from
    assert "from BT_CHECKPOINT_DIR" in warm.log


def test_a_single_file_checkpoint_in_bt_checkpoint_dir_is_a_source(rig, tmp_path):
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    data = os.urandom(2 * PART + 3)
    (trainer / "ckpt-3.pt").write_bytes(data)
    commit(rig, trainer / "ckpt-3.pt", "ckpt-3.pt")
    settings = settings_from_env({**rig.env, "BT_CHECKPOINT_DIR": str(trainer),
                                  "BT_LOAD_CHECKPOINT_CONFIG": spec(tmp_path / "dl", named("ckpt-3.pt", JOB))})
    stats = load_checkpoints(settings, Reporter(io.StringIO()), Cancel()).stats
    assert stats.bytes_from()["checkpoint_dir"] == len(data) and stats.bytes_fetched == 0
    assert (tmp_path / "dl" / "rank-0" / "ckpt-3.pt" / "ckpt-3.pt").read_bytes() == data


def test_another_ranks_folder_is_a_source(rig):
    trainer, files = saved(rig)
    dl = rig.tmp / "dl"
    shutil.copytree(trainer, dl / "rank-1" / NAME)  # as if rank 1 on this node had loaded the same bytes
    loaded = load(rig, dl)
    assert loaded.served == 0 and loaded.bytes_from["ranks"] == sum(map(len, files.values()))
    assert exact(dl, files)


def test_second_load_on_a_node_with_a_warm_cache_takes_no_byte_from_the_store(rig):
    _, files = saved(rig)
    total = sum(map(len, files.values()))
    cache = rig.tmp / "cache"
    first = load(rig, rig.tmp / "dl-1", CKPT_AGENT_CACHE_DIR=str(cache))
    assert first.served == total and first.bytes_from["store"] == total
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in cache_entries(cache))

    second = load(rig, rig.tmp / "dl-2", JsonReporter, CKPT_AGENT_CACHE_DIR=str(cache))
    assert second.served == 0
    assert second.bytes_from == {"store": 0, "checkpoint_dir": 0, "ranks": 0, "cache": total, "reused": 0}
    assert exact(rig.tmp / "dl-2", files)
    events = [json.loads(line) for line in second.log.splitlines()]
    assert [e["fields"]["bytes_from"] for e in events if e["event"] == "loaded"] == [second.bytes_from]


def test_a_cache_entry_corrupted_on_disk_is_detected_and_refetched(rig):
    _, files = saved(rig)
    cache = rig.tmp / "cache"
    load(rig, rig.tmp / "dl-1", CKPT_AGENT_CACHE_DIR=str(cache))
    victim = max(cache_entries(cache), key=lambda p: p.stat().st_size)
    damaged = bytearray(victim.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    victim.write_bytes(damaged)

    second = load(rig, rig.tmp / "dl-2", CKPT_AGENT_CACHE_DIR=str(cache))
    assert second.served == len(damaged) == second.bytes_from["store"]
    assert exact(rig.tmp / "dl-2", files)
    assert "1 entries did not match their sha256" in second.log
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == victim.name  # put back from the store's bytes


def test_a_part_of_a_local_source_that_differs_comes_from_the_store(rig):
    trainer, files = saved(rig)
    with open(trainer / BIG, "r+b") as f:  # the trainer rewrote part 1 after the commit; same size
        f.seek(PART + 10)
        f.write(b"\x00" * 100)
    loaded = load(rig, rig.tmp / "dl", BT_CHECKPOINT_DIR=str(trainer.parent))
    assert loaded.served == PART == loaded.bytes_from["store"]
    assert loaded.bytes_from["checkpoint_dir"] == sum(map(len, files.values())) - PART
    assert exact(rig.tmp / "dl", files)


def test_a_local_source_changed_after_its_part_was_verified_is_not_reused(rig, monkeypatch):
    """The source is rewritten (with the very same bytes) right after a part of it was copied and
    checked: its stat moved, so that part and the rest of the file come from the store."""
    trainer, files = saved(rig)
    source = trainer / BIG
    ino = source.stat().st_ino
    copy, rewritten = sources._copy_checked, []

    def copy_then_rewrite(src: int, dst: int, task, part: int) -> bool:
        ok = copy(src, dst, task, part)
        if os.fstat(src).st_ino == ino and not rewritten:
            start, end = sources.part_bounds(task, part)
            with open(source, "r+b") as f:
                f.seek(start)
                f.write(files[BIG][start:end])
            rewritten.append(start)
        return ok

    monkeypatch.setattr(sources, "_copy_checked", copy_then_rewrite)
    loaded = load(rig, rig.tmp / "dl", BT_CHECKPOINT_DIR=str(trainer.parent))
    assert rewritten == [0]
    assert loaded.served == len(files[BIG]) == loaded.bytes_from["store"]
    assert loaded.bytes_from["checkpoint_dir"] == sum(map(len, files.values())) - len(files[BIG])
    assert exact(rig.tmp / "dl", files)


def test_local_copies_run_at_most_one_per_core_however_many_workers(rig, monkeypatch):
    """Copies on one disk are bound by the CPU: more at once only queue on a file's lock."""
    folder = rig.tmp / "trainer" / NAME
    files = {f"shard-{i}.bin": os.urandom(2 * PART) for i in range(8)}  # 8 files: 8 units at once
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    commit(rig, folder, NAME)
    monkeypatch.setattr(sources.os, "cpu_count", lambda: 2)
    copy, lock, active, most = sources._copy_checked, threading.Lock(), [0], [0]
    both = threading.Event()

    def counted(src: int, dst: int, task, part: int) -> bool:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            if active[0] == 2:
                both.set()
        both.wait(5)  # two copies meet and linger, so only the gate keeps a third out
        time.sleep(0.05)
        try:
            return copy(src, dst, task, part)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(sources, "_copy_checked", counted)
    loaded = load(rig, rig.tmp / "dl", workers=8, BT_CHECKPOINT_DIR=str(folder.parent))
    assert most[0] == 2
    assert loaded.served == 0 and exact(rig.tmp / "dl", files)


def test_a_symlink_or_fifo_planted_as_a_local_source_is_not_followed(rig):
    trainer, files = saved(rig)
    outside = rig.tmp / "outside"
    outside.mkdir()
    (outside / BIG).write_bytes(files[BIG])  # the right bytes, but reached only through a link
    (trainer / BIG).unlink()
    (trainer / BIG).symlink_to(outside / BIG)
    (trainer / "shard" / "05.bin").unlink()
    os.mkfifo(trainer / "shard" / "05.bin")  # opening it for reading would block without O_NONBLOCK
    dl = rig.tmp / "dl"
    (dl / "rank-1").mkdir(parents=True)
    (dl / "rank-1" / NAME).symlink_to(outside)  # another rank's folder, as a link

    loaded = load(rig, dl, BT_CHECKPOINT_DIR=str(trainer.parent))
    linked = len(files[BIG]) + len(files["shard/05.bin"])
    assert loaded.served == linked == loaded.bytes_from["store"]
    assert loaded.bytes_from["checkpoint_dir"] == sum(map(len, files.values())) - linked
    assert loaded.bytes_from["ranks"] == 0
    assert exact(dl, files)


def test_two_agents_filling_one_cache_at_once_both_end_byte_exact(rig):
    _, files = saved(rig)
    cache = rig.tmp / "cache"
    env = {**rig.env, "CKPT_AGENT_CACHE_DIR": str(cache), "CKPT_AGENT_WORKERS": "4"}
    agents = [subprocess.Popen([AGENT, "load"], env={**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, named(NAME, JOB))},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for dl in (rig.tmp / "dl-a", rig.tmp / "dl-b")]
    for agent in agents:
        _, err = agent.communicate(timeout=120)
        assert agent.returncode == 0, err
    assert exact(rig.tmp / "dl-a", files) and exact(rig.tmp / "dl-b", files)
    entries = cache_entries(cache)
    assert entries and all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in entries)
    third = load(rig, rig.tmp / "dl-c", CKPT_AGENT_CACHE_DIR=str(cache))
    assert third.served == 0 and exact(rig.tmp / "dl-c", files)


def test_a_format_1_manifest_loads_without_the_cache(rig):
    _, files = saved(rig)
    key = layout.manifest_key(JOB, NAME, 0)
    store = open_store(settings_from_env(rig.env).store_config)
    try:
        body = json.loads(store.read_bytes(key))
    finally:
        store.close()
    body["format"] = 1  # what an agent before format 2 wrote: no sha256, so no cache keys
    for entry in body["files"]:
        del entry["sha256"]
    rig.write_key(key, json.dumps(body).encode())
    cache = rig.tmp / "cache"
    total = sum(map(len, files.values()))
    for dl in (rig.tmp / "dl-1", rig.tmp / "dl-2"):
        loaded = load(rig, dl, CKPT_AGENT_CACHE_DIR=str(cache))
        assert loaded.served == total and loaded.bytes_from["cache"] == 0
        assert exact(dl, files)
    assert cache_entries(cache) == []


def test_a_cache_folder_that_cannot_be_used_is_warned_about_and_the_load_goes_on(rig):
    _, files = saved(rig)
    blocker = rig.tmp / "a-file"
    blocker.write_bytes(b"")
    loaded = load(rig, rig.tmp / "dl", CKPT_AGENT_CACHE_DIR=str(blocker / "cache"))
    assert exact(rig.tmp / "dl", files)
    assert "this load goes on without the part cache" in loaded.log
