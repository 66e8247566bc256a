"""--keep-last: which committed checkpoints go (ckpt_agent.sync.retention), and that only this rank's go."""

from __future__ import annotations

import io
from pathlib import Path

from ckpt_agent.report import Reporter
from ckpt_agent.stores import layout
from ckpt_agent.stores.local import LocalStore
from ckpt_agent.stores.manifest import FileEntry, Manifest
from ckpt_agent.sync.retention import beyond_keep, retain


def test_beyond_keep_deletes_all_but_the_newest_counting_the_one_just_committed():
    assert beyond_keep(["c4", "c3", "c2", "c1"], "c4", 2) == ["c2", "c1"]
    assert beyond_keep(["c3", "c2", "c1"], "c3", 1) == ["c2", "c1"]
    assert beyond_keep(["c2", "c1"], "c2", 3) == []


def test_the_checkpoint_just_committed_is_kept_even_when_the_store_orders_it_older():
    """A clock step back makes its committed_at older than the others': it is still the one kept."""
    assert beyond_keep(["c3", "c2", "c4"], "c4", 2) == ["c2"]


def commit(store: LocalStore, name: str, committed_at: str, rank: int = 0) -> None:
    """A committed checkpoint: one file and its manifest, where the layout puts them."""
    store.write_bytes(layout.file_key("job-1", name, rank, "model.bin"), b"x")
    manifest = Manifest("proj", "job-1", name, rank, committed_at, 8, (FileEntry("model.bin", 1, ("00000000",)),))
    store.write_bytes(layout.manifest_key("job-1", name, rank), manifest.to_json().encode())


def test_retain_in_a_single_node_job_deletes_the_oldest_manifests_and_files(tmp_path: Path):
    store = LocalStore(str(tmp_path / "store"))
    for step, at in ((10, "2026-01-01T00:00:01Z"), (20, "2026-01-01T00:00:02Z"), (30, "2026-01-01T00:00:03Z")):
        commit(store, f"checkpoint-{step}", at)
    out = io.StringIO()
    retain(store, "job-1", 1, "checkpoint-30", 2, Reporter(out))
    assert not store.exists(layout.manifest_key("job-1", "checkpoint-10", 0))
    assert store.list_recursive(layout.checkpoint_prefix("job-1", "checkpoint-10")) == []
    for step in (20, 30):
        assert store.exists(layout.manifest_key("job-1", f"checkpoint-{step}", 0))
    assert "keep-last 2: deleted checkpoint-10" in out.getvalue()


def test_retain_in_a_multi_node_job_counts_only_complete_checkpoints_and_deletes_every_nodes_data(tmp_path: Path):
    """checkpoint-40 is committed by the leader only (node 1 is slow or dead): it is neither counted
    nor deleted, so keep-last 1 keeps checkpoint-30, the newest a resume would choose; checkpoint-20
    (node 1 had nothing of it) and checkpoint-10 go with every node's manifest, record and files."""
    store = LocalStore(str(tmp_path / "store"))
    for step in (10, 20, 30, 40):
        commit(store, f"checkpoint-{step}", f"2026-01-01T00:00:{step}Z")
    for step in (10, 30):
        commit(store, f"checkpoint-{step}", f"2026-01-01T00:00:{step + 1}Z", rank=1)
    store.write_bytes(layout.nothing_key("job-1", "checkpoint-20", 1), b"{}")
    out = io.StringIO()
    retain(store, "job-1", 2, "checkpoint-40", 1, Reporter(out))
    for step in (10, 20):
        assert store.list_recursive(layout.checkpoint_prefix("job-1", f"checkpoint-{step}")) == []
    assert store.exists(layout.manifest_key("job-1", "checkpoint-30", 0))
    assert store.exists(layout.manifest_key("job-1", "checkpoint-30", 1))
    assert store.exists(layout.manifest_key("job-1", "checkpoint-40", 0))
    assert "keep-last 1: deleted checkpoint-20 (every node's files)" in out.getvalue()
