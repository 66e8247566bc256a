"""resolve.committed_checkpoints: a job's committed checkpoints in latest order, the one order for
resolve, the sidecar (superseded, keep-last) and the load record."""

from __future__ import annotations

from pathlib import Path

from ckpt_agent.config.spec import NamedRef
from ckpt_agent.load.pipeline import store_order
from ckpt_agent.load.resolve import Resolved
from ckpt_agent.stores import layout
from ckpt_agent.stores.catalog import committed_checkpoints
from ckpt_agent.stores.local import LocalStore
from ckpt_agent.stores.manifest import FileEntry, Manifest


def manifest(store: LocalStore, name: str, committed_at: str, rank: int = 0) -> Manifest:
    m = Manifest("proj", "job-1", name, rank, committed_at, 8, (FileEntry("f", 0, ("00000000",)),))
    store.write_bytes(layout.manifest_key("job-1", name, rank), m.to_json().encode())
    return m


def test_newest_commit_first_with_ties_in_natural_name_order(tmp_path: Path):
    store = LocalStore(str(tmp_path / "store"))
    manifest(store, "checkpoint-9", "2026-01-01T00:00:01Z")
    manifest(store, "checkpoint-100", "2026-01-01T00:00:01Z")
    manifest(store, "checkpoint-20", "2026-01-01T00:00:00Z")
    manifest(store, "checkpoint-5", "2026-01-01T00:00:02Z")
    names = [m.checkpoint_name for m in committed_checkpoints(store, "job-1", 0)]
    assert names == ["checkpoint-5", "checkpoint-100", "checkpoint-9", "checkpoint-20"]


def test_only_the_ranks_own_commits_count_and_a_folder_without_a_manifest_is_not_committed(tmp_path: Path):
    store = LocalStore(str(tmp_path / "store"))
    manifest(store, "checkpoint-10", "2026-01-01T00:00:01Z", rank=0)
    manifest(store, "checkpoint-20", "2026-01-01T00:00:02Z", rank=1)
    store.write_bytes(layout.file_key("job-1", "checkpoint-30", 0, "model.bin"), b"half")
    assert [m.checkpoint_name for m in committed_checkpoints(store, "job-1", 0)] == ["checkpoint-10"]
    assert [m.checkpoint_name for m in committed_checkpoints(store, "job-1", 1)] == ["checkpoint-20"]


def test_a_planted_name_is_skipped_with_a_warning(tmp_path: Path):
    store = LocalStore(str(tmp_path / "store"))
    manifest(store, "checkpoint-10", "2026-01-01T00:00:01Z")
    planted = tmp_path / "store" / layout.checkpoints_prefix("job-1") / "bad\nname"
    planted.mkdir()
    warnings: list[str] = []
    found = committed_checkpoints(store, "job-1", 0, warnings.append)
    assert [m.checkpoint_name for m in found] == ["checkpoint-10"]
    assert len(warnings) == 1 and "ignoring" in warnings[0]


def test_the_load_record_numbers_checkpoints_in_the_same_order(tmp_path: Path):
    store = LocalStore(str(tmp_path / "store"))
    for name, at in (("checkpoint-9", "2026-01-01T00:00:01Z"), ("checkpoint-100", "2026-01-01T00:00:01Z"),
                     ("checkpoint-5", "2026-01-01T00:00:02Z")):
        manifest(store, name, at)
    newest_first = committed_checkpoints(store, "job-1", 0)
    resolved = tuple(Resolved(NamedRef("job-1", m.checkpoint_name), m, "named") for m in reversed(newest_first))
    order = store_order(resolved)
    assert [order[("job-1", m.checkpoint_name)] for m in newest_first] == [0, 1, 2]
