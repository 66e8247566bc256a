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


def test_retain_deletes_this_ranks_oldest_manifests_and_files_and_leaves_other_ranks(tmp_path: Path):
    store = LocalStore(str(tmp_path / "store"))
    for step, at in ((10, "2026-01-01T00:00:01Z"), (20, "2026-01-01T00:00:02Z"), (30, "2026-01-01T00:00:03Z")):
        commit(store, f"checkpoint-{step}", at)
        commit(store, f"checkpoint-{step}", at, rank=1)
    out = io.StringIO()
    retain(store, "job-1", 0, "checkpoint-30", 2, Reporter(out))
    assert not store.exists(layout.manifest_key("job-1", "checkpoint-10", 0))
    assert list(store.list_recursive(layout.rank_prefix("job-1", "checkpoint-10", 0))) == []
    for step in (20, 30):
        assert store.exists(layout.manifest_key("job-1", f"checkpoint-{step}", 0))
    for step in (10, 20, 30):
        assert store.exists(layout.manifest_key("job-1", f"checkpoint-{step}", 1))
    assert "keep-last 2: deleted checkpoint-10 (rank 0)" in out.getvalue()
