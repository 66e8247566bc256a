"""ckpt_agent.sync.ledger: what this job has committed, read from the store once, never fatal to the sidecar."""

from __future__ import annotations

import io
from pathlib import Path

from ckpt_agent.config.sidecar import SyncOptions
from ckpt_agent.report import Reporter
from ckpt_agent.stores import layout
from ckpt_agent.stores.local import LocalStore
from ckpt_agent.stores.manifest import FileEntry, Manifest
from ckpt_agent.sync.loop import Sidecar
from ckpt_agent.upload.commit import CheckpointId


def hf_checkpoint(root: Path, name: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "model.safetensors").write_bytes(b"weights")
    (root / name / "trainer_state.json").write_text("{}")


def sidecar(tmp_path: Path, store: LocalStore) -> tuple[Sidecar, io.StringIO]:
    out = io.StringIO()
    options = SyncOptions(tmp_path / "ckpts", quiet_seconds=0, poll_seconds=0.05, grace_seconds=5)
    return Sidecar(store, CheckpointId("proj", "job-1", "", 0, 1), options, 2, Reporter(out)), out


def test_a_damaged_manifest_in_the_job_is_reported_and_does_not_stop_the_uploads(tmp_path: Path):
    store = LocalStore(str(tmp_path / "store"))
    store.write_bytes(layout.manifest_key("job-1", "checkpoint-5", 0), b"not json")
    hf_checkpoint(tmp_path / "ckpts", "checkpoint-10")
    side, out = sidecar(tmp_path, store)
    assert side.run(once=True).committed == ["checkpoint-10"]
    assert "checkpoint-5/rank-0.manifest.json: manifest is not valid JSON" in out.getvalue()


def test_an_older_step_than_one_committed_before_a_restart_is_not_uploaded(tmp_path: Path):
    store = LocalStore(str(tmp_path / "store"))
    manifest = Manifest("proj", "job-1", "checkpoint-20", 0, "2026-01-01T00:00:00Z", 8,
                        (FileEntry("f", 0, ("00000000",)),))
    store.write_bytes(layout.manifest_key("job-1", "checkpoint-20", 0), manifest.to_json().encode())
    hf_checkpoint(tmp_path / "ckpts", "checkpoint-10")
    hf_checkpoint(tmp_path / "ckpts", "checkpoint-30")
    side, out = sidecar(tmp_path, store)
    assert side.run(once=True).committed == ["checkpoint-30"]
    assert not store.exists(layout.manifest_key("job-1", "checkpoint-10", 0))
    assert "checkpoint-10 is older than a checkpoint this job already committed" in out.getvalue()
