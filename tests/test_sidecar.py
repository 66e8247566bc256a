"""The save side: `ckpt-agent sync` and `ckpt-agent run` in supervise mode, against the local store and SeaweedFS.

tests/fake_trainer.py writes HF-Trainer-like checkpoints; the installed `ckpt-agent` uploads them;
a second job's `ckpt-agent load` gets them back. Quiet periods are short so the file runs fast.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt_agent.config.settings import settings_from_env, sync_options
from ckpt_agent.config.sidecar import SyncOptions
from ckpt_agent.errors import ConfigError
from ckpt_agent.report import Reporter
from ckpt_agent.stores import layout
from ckpt_agent.stores.local import LocalStore
from ckpt_agent.sync.loop import Sidecar
from ckpt_agent.sync.observe import open_for_writing
from ckpt_agent.sync.readiness import NotReady, Why
from ckpt_agent.upload.commit import CheckpointId, CommitRequest, commit_checkpoint
from tests.support.helpers import (
    AGENT,
    StoreUnderTest,
    committed,
    in_thread,
    run_agent,
    same_tree,
    start,
    sync_env,
    trainer,
    wait_for,
)


def manifest(store: StoreUnderTest, name: str, job: str = "job-1") -> dict:
    return json.loads(store.read(layout.manifest_key(job, name, 0)))


def load_latest_as_second_job(store: StoreUnderTest, tmp_path: Path) -> Path:
    """`ckpt-agent load` of latest(project) from another job; returns rank-0 of the download folder."""
    dl = tmp_path / "dl"
    spec = {"enabled": True, "download_folder": str(dl),
            "checkpoints": [{"typ": "baseten_latest_checkpoint", "project_name": "proj", "job_id": None}]}
    env = {**sync_env(store, tmp_path / "unused", job="job-2"), "BT_LOAD_CHECKPOINT_CONFIG": json.dumps(spec)}
    result = run_agent(["load"], env)
    assert result.returncode == 0, result.stderr
    return dl / "rank-0"


def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    p.send_signal(sig)
    return p.wait(timeout)


# -- ckpt-agent sync --------------------------------------------------------------------------


def test_sync_commits_each_checkpoint_and_latest_by_project_loads_the_last_one_byte_for_byte(store, tmp_path, procs):
    ckpts = tmp_path / "ckpts"
    env = sync_env(store, ckpts)
    sync = start(procs, [AGENT, "sync"], env, tmp_path / "sync.log")
    train = start(procs, trainer(ckpts, "--checkpoints", 3, "--every", 0.3), env, tmp_path / "trainer.log")
    assert train.wait(60) == 0
    wait_for(lambda: committed(store, "checkpoint-30"), what="checkpoint-30 committed")
    assert stop(sync) == 0
    log = (tmp_path / "sync.log").read_text()
    assert all(f"committed checkpoint-{n}:" in log for n in (10, 20, 30)), log
    assert "NOT committed" not in log
    loaded = load_latest_as_second_job(store, tmp_path)
    assert sorted(p.name for p in loaded.iterdir()) == ["checkpoint-30"]
    assert same_tree(loaded / "checkpoint-30", ckpts / "checkpoint-30")


def test_trainer_killed_mid_checkpoint_never_commits_it_and_latest_is_the_one_before(store, tmp_path, procs):
    ckpts = tmp_path / "ckpts"
    env = sync_env(store, ckpts)
    sync = start(procs, [AGENT, "sync"], env, tmp_path / "sync.log")
    train = start(procs, trainer(ckpts, "--checkpoints", 3, "--every", 0.2, "--stall-at", 20), env,
                  tmp_path / "trainer.log")
    wait_for(lambda: "STALLED checkpoint-20" in (tmp_path / "trainer.log").read_text(), what="the stall")
    train.kill()
    train.wait()
    wait_for(lambda: committed(store, "checkpoint-10"), what="checkpoint-10 committed")
    wait_for(lambda: "checkpoint-20 has been quiet" in (tmp_path / "sync.log").read_text(),
             what="the sidecar to see the half-written checkpoint-20 quiet")
    assert stop(sync) == 0  # only its missing trainer_state.json keeps it from being committed
    log = (tmp_path / "sync.log").read_text()
    assert "checkpoint-20 NOT committed: incomplete: no trainer_state.json" in log, log
    assert not committed(store, "checkpoint-20")
    loaded = load_latest_as_second_job(store, tmp_path)
    assert sorted(p.name for p in loaded.iterdir()) == ["checkpoint-10"]
    assert same_tree(loaded / "checkpoint-10", ckpts / "checkpoint-10")


def test_restarted_sync_does_not_upload_committed_checkpoints_again(local_store, tmp_path, procs):
    ckpts, root = tmp_path / "ckpts", tmp_path / "store"
    env = sync_env(local_store, ckpts, CKPT_AGENT_QUIET_SECONDS="0")
    assert subprocess.run(trainer(ckpts, "--checkpoints", 2, "--every", 0), capture_output=True).returncode == 0
    first = run_agent(["sync", "--once"], env)
    assert first.returncode == 0 and first.stderr.count("sync: committed checkpoint-") == 2, first.stderr
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    (ckpts / "checkpoint-30").mkdir()
    for f in (ckpts / "checkpoint-20").iterdir():
        (ckpts / "checkpoint-30" / f.name).write_bytes(f.read_bytes())
    second = run_agent(["sync", "--once"], env)
    assert second.returncode == 0, second.stderr
    assert "checkpoint-10 is already committed; not uploading it again" in second.stderr
    assert "checkpoint-20 is already committed; not uploading it again" in second.stderr
    assert "committed checkpoint-30:" in second.stderr and second.stderr.count("sync: committed checkpoint-") == 1
    assert all((p.read_bytes(), p.stat().st_mtime_ns) == v for p, v in before.items())


def test_sync_without_a_job_id_is_a_config_error(local_store, tmp_path):
    env = sync_env(local_store, tmp_path / "ckpts")
    del env["BT_TRAINING_JOB_ID"]
    result = run_agent(["sync", "--once"], env)
    assert result.returncode == 2
    assert "BT_TRAINING_JOB_ID" in result.stderr and result.stderr.strip().count("\n") == 0


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="needs /proc")
def test_checkpoint_with_a_file_still_open_for_writing_is_committed_only_after_it_is_closed(
        local_store, tmp_path, procs):
    ckpts = tmp_path / "ckpts"
    env = sync_env(local_store, ckpts, CKPT_AGENT_QUIET_SECONDS="0.3")
    sync = start(procs, [AGENT, "sync"], env, tmp_path / "sync.log")
    # Everything, trainer_state.json included, is written and quiet for 2 s while the weights file
    # is held open; then more bytes are appended. Only the open handle can hold the commit back.
    train = start(procs, trainer(ckpts, "--checkpoints", 1, "--hold-open", 2), env, tmp_path / "trainer.log")
    assert train.wait(60) == 0
    wait_for(lambda: committed(local_store, "checkpoint-10"), what="checkpoint-10 committed")
    assert stop(sync) == 0
    entry = next(f for f in manifest(local_store, "checkpoint-10")["files"] if f["path"] == "model.safetensors")
    assert entry["size"] == (ckpts / "checkpoint-10" / "model.safetensors").stat().st_size
    assert "open for writing" not in (tmp_path / "sync.log").read_text().split("committed checkpoint-10")[1]


# -- ckpt-agent run, supervise mode -------------------------------------------------------------


def test_sigterm_to_supervising_run_reaches_the_trainer_flushes_its_final_checkpoint_and_exits_with_its_status(
        store, tmp_path, procs):
    ckpts, record = tmp_path / "ckpts", tmp_path / "record"
    env = sync_env(store, ckpts, BT_CHECKPOINTING_ENABLED="1")
    run = start(procs, [AGENT, "run", "--", *trainer(ckpts, "--checkpoints", 100, "--every", 60,
                                                      "--record", record, "--exit-on-sigterm", 17)],
                env, tmp_path / "run.log")
    wait_for(lambda: committed(store, "checkpoint-10"), what="checkpoint-10 committed while training runs")
    assert run.poll() is None
    assert stop(run) == 17
    assert record.read_text() == "got SIGTERM\n"
    log = (tmp_path / "run.log").read_text()
    assert "trainer exited with status 17" in log and "committed checkpoint-20:" in log, log
    assert committed(store, "checkpoint-20")
    loaded = load_latest_as_second_job(store, tmp_path)
    assert same_tree(loaded / "checkpoint-20", ckpts / "checkpoint-20")


def test_supervised_trainer_killed_mid_checkpoint_exits_137_and_that_checkpoint_stays_uncommitted(
        local_store, tmp_path, procs):
    ckpts = tmp_path / "ckpts"
    env = sync_env(local_store, ckpts, BT_CHECKPOINTING_ENABLED="1")
    run = start(procs, [AGENT, "run", "--", *trainer(ckpts, "--checkpoints", 3, "--every", 0.2, "--stall-at", 20)],
                env, tmp_path / "run.log")
    wait_for(lambda: "STALLED checkpoint-20" in (tmp_path / "run.log").read_text(), what="the stall")
    pid = int((tmp_path / "run.log").read_text().split("PID ")[1].split()[0])
    os.kill(pid, signal.SIGKILL)
    assert run.wait(60) == 137
    log = (tmp_path / "run.log").read_text()
    assert "committed checkpoint-10:" in log
    assert "checkpoint-20 NOT committed: incomplete: no trainer_state.json" in log, log
    assert committed(local_store, "checkpoint-10") and not committed(local_store, "checkpoint-20")


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="needs /proc")
def test_final_flush_waits_for_a_checkpoint_a_leftover_process_still_holds_open_for_writing(
        local_store, tmp_path, procs):
    ckpts, log = tmp_path / "ckpts", tmp_path / "trainer.log"
    env = sync_env(local_store, ckpts, BT_CHECKPOINTING_ENABLED="1", CKPT_AGENT_QUIET_SECONDS="0.3")
    # The command exits at once while its background trainer still holds the weights file open.
    script = (f"{' '.join(trainer(ckpts, '--checkpoints', 1, '--hold-open', 2))} > {log} & "
              f"while ! grep -q HOLDING {log}; do sleep 0.05; done; exit 0")
    run = start(procs, [AGENT, "run", "--", "sh", "-c", script], env, tmp_path / "run.log")
    assert run.wait(60) == 0
    assert "DONE checkpoint-10" in log.read_text()
    entry = next(f for f in manifest(local_store, "checkpoint-10")["files"] if f["path"] == "model.safetensors")
    assert entry["size"] == (ckpts / "checkpoint-10" / "model.safetensors").stat().st_size


def test_supervise_mode_exits_with_the_trainers_status_or_128_plus_its_signal(local_store, tmp_path):
    env = sync_env(local_store, tmp_path / "ckpts", BT_CHECKPOINTING_ENABLED="1")
    for command, status in (("exit 3", 3), ("kill -KILL $$", 137), ("true", 0)):
        result = subprocess.run([AGENT, "run", "--", "sh", "-c", command], env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == status, result.stderr


def test_checkpointing_without_a_job_id_fails_before_the_trainer_starts(local_store, tmp_path):
    env = sync_env(local_store, tmp_path / "ckpts", BT_CHECKPOINTING_ENABLED="1")
    del env["BT_TRAINING_JOB_ID"]
    marker = tmp_path / "trained"
    result = run_agent(["run", "--", "touch", str(marker)], env)
    assert result.returncode == 2 and "BT_TRAINING_JOB_ID" in result.stderr
    assert not marker.exists()


# -- the sync loop in-process: retention, changes during upload, grace periods ------------------


class RecordingStore(LocalStore):
    """A local store that records writes and deletes, and can run a hook as each upload starts."""

    def __init__(self, root: Path) -> None:
        super().__init__(str(root))
        self.log: list[tuple[str, str]] = []
        self.on_upload: Callable[[str], None] | None = None

    def write_bytes(self, key: str, data: bytes) -> None:
        self.log.append(("write", key))
        super().write_bytes(key, data)

    def start_upload(self, key: str, size: int):
        if self.on_upload:
            self.on_upload(key)
        self.log.append(("upload", key))
        return super().start_upload(key, size)

    def delete(self, key: str) -> None:
        self.log.append(("delete", key))
        super().delete(key)


def make_checkpoint(folder: Path, step: int, size: int = 300_000) -> None:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(size))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def sidecar_for(store, ckpts: Path, **options) -> tuple[Sidecar, io.StringIO]:
    out = io.StringIO()
    opts = SyncOptions(ckpts, **{"quiet_seconds": 0.2, "poll_seconds": 0.05, "grace_seconds": 5, **options})
    return Sidecar(store, CheckpointId("proj", "job-1", "", 0, 1), opts, 4, Reporter(out)), out


def test_keep_last_deletes_older_checkpoints_manifest_first_and_a_restart_does_not_upload_them_again(tmp_path):
    ckpts, store = tmp_path / "ckpts", RecordingStore(tmp_path / "store")
    for step in (10, 20, 30, 40):
        make_checkpoint(ckpts / f"checkpoint-{step}", step)
    sidecar, _ = sidecar_for(store, ckpts, keep_last=2, quiet_seconds=0)
    assert sidecar.run(once=True).committed == [f"checkpoint-{s}" for s in (10, 20, 30, 40)]
    for gone in ("checkpoint-10", "checkpoint-20"):
        deletes = [key for op, key in store.log if op == "delete" and f"/{gone}/" in key]
        assert deletes[0] == layout.manifest_key("job-1", gone, 0) and len(deletes) == 3  # manifest, then 2 files
        assert store.list_recursive(layout.checkpoint_prefix("job-1", gone)) == []
    for kept in ("checkpoint-30", "checkpoint-40"):
        assert store.exists(layout.manifest_key("job-1", kept, 0))
    restarted, out = sidecar_for(store, ckpts, keep_last=2, quiet_seconds=0)
    assert restarted.run(once=True).committed == []
    assert "checkpoint-10 is older than a checkpoint this job already committed" in out.getvalue()


def test_a_file_changed_during_upload_is_not_committed_in_that_state(tmp_path):
    ckpts, store = tmp_path / "ckpts", RecordingStore(tmp_path / "store")
    make_checkpoint(ckpts / "checkpoint-10", 10)
    weights = ckpts / "checkpoint-10" / "model.safetensors"
    changed = threading.Event()

    def change_once(key: str) -> None:
        if key.endswith("model.safetensors") and not changed.is_set():
            changed.set()
            with open(weights, "ab") as f:
                f.write(b"more bytes written while the upload runs")

    store.on_upload = change_once
    sidecar, out = sidecar_for(store, ckpts, quiet_seconds=0)
    thread = in_thread(sidecar)
    wait_for(lambda: "checkpoint-10" in sidecar.result.committed, what="the second attempt")
    sidecar.finish(None, wait_for_writers=True)
    thread.join(10)
    assert changed.is_set() and "changed while uploading" in out.getvalue()
    manifest_writes = [key for op, key in store.log if op == "write" and key.endswith(layout.MANIFEST_SUFFIX)]
    assert manifest_writes == [layout.manifest_key("job-1", "checkpoint-10", 0)]
    committed_entry = json.loads(store.read_bytes(manifest_writes[0]))["files"][0]
    assert committed_entry["size"] == weights.stat().st_size


def test_commit_checkpoint_refuses_to_write_the_manifest_when_a_file_changes_during_upload(tmp_path):
    from ckpt_agent.errors import CheckpointChanged
    from ckpt_agent.runtime.cancel import Cancel

    store = RecordingStore(tmp_path / "store")
    make_checkpoint(tmp_path / "checkpoint-10", 10)
    store.on_upload = lambda key: (tmp_path / "checkpoint-10" / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointChanged):
        request = CommitRequest(tmp_path / "checkpoint-10", CheckpointId("proj", "job-1", "checkpoint-10"), 1)
        commit_checkpoint(store, request, lambda n: None, Cancel())
    assert not store.exists(layout.manifest_key("job-1", "checkpoint-10", 0))


class HeldStore(RecordingStore):
    """Every part upload starts, then waits until the test releases it (in a pool worker, which
    a cancel does not wait for: start_upload runs in the pool's task source, which it does)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.started, self.release = threading.Event(), threading.Event()

    def start_upload(self, key: str, size: int):
        upload = super().start_upload(key, size)
        put_part = upload.put_part

        def held_put_part(*args):
            self.started.set()
            self.release.wait(30)
            return put_part(*args)

        upload.put_part = held_put_part
        return upload


@pytest.mark.parametrize("grace, is_committed", [(10.0, True), (0.2, False)])
def test_sigterm_finishes_the_upload_in_flight_only_within_the_grace_period(tmp_path, grace, is_committed):
    ckpts, store = tmp_path / "ckpts", HeldStore(tmp_path / "store")
    make_checkpoint(ckpts / "checkpoint-10", 10)
    sidecar, out = sidecar_for(store, ckpts, quiet_seconds=0)
    thread = in_thread(sidecar)
    assert store.started.wait(10)
    sidecar.finish(time.monotonic() + grace, wait_for_writers=False)  # what run_standalone does on SIGTERM
    if is_committed:
        store.release.set()  # the upload in flight ends well within the grace period
    thread.join(15)
    store.release.set()
    assert not thread.is_alive()
    assert store.exists(layout.manifest_key("job-1", "checkpoint-10", 0)) is is_committed
    if not is_committed:
        assert sidecar.result.not_committed == {"checkpoint-10": NotReady(Why.CUT)}
        assert f"checkpoint-10 NOT committed: {Why.CUT.value}" in out.getvalue()


def test_store_errors_while_watching_are_retried_and_do_not_stop_the_sidecar(tmp_path):
    from ckpt_agent.errors import TransientError

    class Flaky(RecordingStore):
        lists = uploads = 0

        def list_dir(self, prefix):
            Flaky.lists += 1
            if Flaky.lists <= 2:
                raise TransientError("connection reset (test)")
            return super().list_dir(prefix)

        def start_upload(self, key, size):
            Flaky.uploads += 1
            if Flaky.uploads == 1:
                raise TransientError("connection reset (test)")
            return super().start_upload(key, size)

    ckpts, store = tmp_path / "ckpts", Flaky(tmp_path / "store")
    make_checkpoint(ckpts / "checkpoint-10", 10)
    sidecar, out = sidecar_for(store, ckpts)
    thread = in_thread(sidecar)
    wait_for(lambda: "checkpoint-10" in sidecar.result.committed, timeout=20, what="the commit after retries")
    sidecar.finish(None, wait_for_writers=True)
    thread.join(10)
    assert "the store did not answer" in out.getvalue() and "upload failed" in out.getvalue()
    assert store.exists(layout.manifest_key("job-1", "checkpoint-10", 0))


def test_a_top_level_file_that_is_not_a_checkpoint_is_reported_once_and_counted(tmp_path):
    ckpts, store = tmp_path / "ckpts", RecordingStore(tmp_path / "store")
    make_checkpoint(ckpts / "checkpoint-10", 10)
    (ckpts / "notes.txt").write_text("not a checkpoint")
    sidecar, out = sidecar_for(store, ckpts)
    thread = in_thread(sidecar)
    wait_for(lambda: "checkpoint-10" in sidecar.result.committed)
    make_checkpoint(ckpts / "checkpoint-20", 20)  # more passes, each seeing notes.txt again, until
    wait_for(lambda: "checkpoint-20" in sidecar.result.committed)  # this one is quiet and committed
    sidecar.finish(None, wait_for_writers=True)
    thread.join(10)
    assert out.getvalue().count("notes.txt is not uploaded: a file that is not a checkpoint") == 1
    assert "left out (not uploaded): 1 (notes.txt)" in out.getvalue()
    assert sidecar.result.left_out.keys() == {"notes.txt"}
    assert not any("notes.txt" in key for _, key in store.log)


def test_identical_file_is_copied_inside_s3_instead_of_uploaded_again(seaweed, s3_prefix, tmp_path):
    from ckpt_agent.stores.s3native import NativeS3Store

    class Counting(NativeS3Store):
        copies: list[str] = []

        def copy(self, src_key: str, dst_key: str) -> None:
            self.copies.append(dst_key)
            super().copy(src_key, dst_key)

    store = Counting(seaweed.bucket, s3_prefix, seaweed.env())
    ckpts = tmp_path / "ckpts"
    for step in (10, 20):
        make_checkpoint(ckpts / f"checkpoint-{step}", step)
        (ckpts / f"checkpoint-{step}" / "config.json").write_text('{"same": true}')
    sidecar, out = sidecar_for(store, ckpts, quiet_seconds=0)
    assert sidecar.run(once=True).committed == ["checkpoint-10", "checkpoint-20"]
    assert store.copies == [layout.file_key("job-1", "checkpoint-20", 0, "config.json")]
    assert "copied inside the store, 1 files whole" in out.getvalue()
    key = layout.file_key("job-1", "checkpoint-20", 0, "config.json")
    assert store.read_bytes(key) == b'{"same": true}'


# -- small pieces ------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="needs /proc")
def test_open_for_writing_sees_write_handles_and_not_read_handles(tmp_path):
    (tmp_path / "r").write_bytes(b"x")
    with open(tmp_path / "w", "wb"), open(tmp_path / "r", "rb"):
        found = open_for_writing(tmp_path)
    assert found.paths == {os.path.realpath(tmp_path / "w")}
    assert open_for_writing(tmp_path).paths == set()


def test_checkpointing_settings_and_sync_flags_are_validated():
    settings = settings_from_env({})
    assert settings.checkpoint_dir == "/tmp/training_checkpoints" and settings.checkpointing_enabled is False
    assert settings_from_env({"BT_CHECKPOINTING_ENABLED": "1", "BT_CHECKPOINT_DIR": "/x"}).checkpoint_dir == "/x"
    with pytest.raises(ConfigError, match="BT_CHECKPOINTING_ENABLED"):
        settings_from_env({"BT_CHECKPOINTING_ENABLED": "maybe"})
    opts = sync_options({"CKPT_AGENT_QUIET_SECONDS": "1.5", "CKPT_AGENT_KEEP_LAST": "2"}, "/d", poll_seconds=0.5)
    assert (opts.quiet_seconds, opts.poll_seconds, opts.keep_last, opts.rules.markers) == (1.5, 0.5, 2, ())
    assert sync_options({}, "/d", complete_file=[""]).rules.markers == ()
    assert sync_options({"CKPT_AGENT_COMPLETE_FILE": "DONE, .metadata"}, "/d").rules.markers == ("DONE", ".metadata")
    assert sync_options({}, "/d", complete_file=["A,B", "C"]).rules.markers == ("A", "B", "C")
    assert sync_options({"CKPT_AGENT_COMMIT_ON_QUIET": "1"}, "/d").rules.commit_on_quiet is True
    for bad in ({"quiet_seconds": -1}, {"poll_seconds": 0}, {"keep_last": 0}, {"complete_file": ["../x"]}):
        with pytest.raises(ConfigError):
            sync_options({}, "/d", **bad)


# -- resume: what the agent loads is what the framework's resume call takes ---------------------


def test_a_single_file_checkpoint_loads_as_that_file_and_latest_local_checkpoint_returns_it(store, tmp_path):
    import zipfile

    from ckpt_agent.disk.resume import latest_local_checkpoint

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    with zipfile.ZipFile(ckpts / "ckpt-5.pt", "w") as z:  # the shape torch.save writes
        z.writestr("archive/data.pkl", os.urandom(3000))
    env = sync_env(store, ckpts, CKPT_AGENT_QUIET_SECONDS="0")
    result = run_agent(["sync", "--once"], env)
    assert result.returncode == 0 and "committed ckpt-5.pt: 1 files" in result.stderr, result.stderr
    assert manifest(store, "ckpt-5.pt")["kind"] == "file"
    loaded = load_latest_as_second_job(store, tmp_path)
    path = latest_local_checkpoint(env={"BT_LOAD_CHECKPOINT_DIR": str(loaded.parent)})
    assert path == str(loaded / "ckpt-5.pt" / "ckpt-5.pt")
    assert Path(path).read_bytes() == (ckpts / "ckpt-5.pt").read_bytes()


def test_a_folder_checkpoint_still_resumes_from_the_folder(local_store, tmp_path):
    from ckpt_agent.disk.resume import latest_local_checkpoint

    ckpts = tmp_path / "ckpts"
    make_checkpoint(ckpts / "checkpoint-10", 10)
    env = sync_env(local_store, ckpts, CKPT_AGENT_QUIET_SECONDS="0")
    assert subprocess.run([AGENT, "sync", "--once"], env=env, capture_output=True, timeout=60).returncode == 0
    assert "kind" not in manifest(local_store, "checkpoint-10")  # folder manifests are as older agents wrote them
    loaded = load_latest_as_second_job(local_store, tmp_path)
    assert latest_local_checkpoint(env={"BT_LOAD_CHECKPOINT_DIR": str(loaded.parent)}) == \
        str(loaded / "checkpoint-10")


# -- run: the sync options, the final flush ----------------------------------------------------


def test_run_takes_the_sync_flags_with_checkpointing_and_says_where_they_go_without(local_store, tmp_path):
    ckpts = tmp_path / "ckpts"
    script = f"mkdir -p {ckpts}/out && echo w > {ckpts}/out/w.bin && echo done > {ckpts}/out/DONE"
    env = sync_env(local_store, ckpts, BT_CHECKPOINTING_ENABLED="1")
    result = run_agent(["run", "--complete-file", "DONE", "--quiet-seconds", "0", "--", "sh", "-c",
                             script], env)
    assert result.returncode == 0 and "committed out:" in result.stderr, result.stderr
    del env["BT_CHECKPOINTING_ENABLED"]
    result = subprocess.run([AGENT, "run", "--complete-file", "DONE", "--", "true"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "--complete-file" in result.stderr
    assert "BT_CHECKPOINTING_ENABLED=1" in result.stderr and result.stderr.count("\n") == 1
    help_text = subprocess.run([AGENT, "run", "--help"], capture_output=True, text=True).stdout
    assert "--complete-file" in help_text and "BT_CHECKPOINTING_ENABLED" in help_text


UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]
CAN_UNSHARE = os.geteuid() == 0 and Path("/usr/bin/unshare").exists()


@pytest.mark.parametrize("prefix", [
    [], pytest.param(UNSHARE, marks=pytest.mark.skipif(not CAN_UNSHARE, reason="needs unshare as root"))],
    ids=["host", "own-pid-namespace"])
def test_final_flush_after_the_trainer_exits_does_not_wait_for_the_quiet_period(local_store, tmp_path, prefix):
    ckpts = tmp_path / "ckpts"
    # A quiet period of an hour: if the flush waited for it, run would not exit within the timeout. In its
    # own PID namespace nothing but the agent is left once the trainer exits: that is not being blind.
    env = sync_env(local_store, ckpts, BT_CHECKPOINTING_ENABLED="1", CKPT_AGENT_QUIET_SECONDS="3600")
    result = subprocess.run([*prefix, AGENT, "run", "--", *trainer(ckpts, "--checkpoints", 1, "--every", 0)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert committed(local_store, "checkpoint-10")


def test_a_supervised_folder_of_no_known_format_is_committed_after_exit_0_not_after_a_failure(
        local_store, tmp_path):
    ckpts = tmp_path / "ckpts"
    env = sync_env(local_store, ckpts, BT_CHECKPOINTING_ENABLED="1")
    for name, status in (("ok", 0), ("bad", 3)):
        script = f"mkdir -p {ckpts}/{name} && echo w > {ckpts}/{name}/w.npy && exit {status}"
        result = subprocess.run([AGENT, "run", "--", "sh", "-c", script], env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == status, result.stderr
    assert committed(local_store, "ok") and not committed(local_store, "bad")
    assert "bad NOT committed: a folder of no known format and the trainer exited with a failure" in result.stderr


@pytest.mark.skipif(not CAN_UNSHARE, reason="needs unshare as root")
def test_a_sidecar_in_its_own_pid_namespace_says_once_that_it_cannot_see_open_files(local_store, tmp_path):
    ckpts = tmp_path / "ckpts"
    make_checkpoint(ckpts / "checkpoint-10", 10)
    make_checkpoint(ckpts / "checkpoint-20", 20)
    env = sync_env(local_store, ckpts, CKPT_AGENT_QUIET_SECONDS="0")
    result = subprocess.run([*UNSHARE, AGENT, "sync", "--once"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("cannot see any other process's open files") == 1
    assert committed(local_store, "checkpoint-20")  # the HF rule still decides
    shared = subprocess.run([AGENT, "sync", "--once"], env={**env, "BT_TRAINING_JOB_ID": "job-2"},
                            capture_output=True, text=True, timeout=60)
    assert "committed checkpoint-20" in shared.stderr and "cannot see" not in shared.stderr
