"""make_plan: which files a load fetches and which it trusts, where each lands, and what it refuses
before the first byte is written. Pure apart from stat calls, so these run on a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import VerifiedIndex
from ckpt_agent.disk.safefs import INCOMPLETE_SUFFIX
from ckpt_agent.errors import IntegrityError
from ckpt_agent.load.merge import single
from ckpt_agent.load.plan import make_plan
from ckpt_agent.stores import layout
from ckpt_agent.stores.manifest import FileEntry, Manifest, PackEntry

PART = 1 << 20


def manifest(*files: FileEntry, name: str = "checkpoint-7", rank: int = 0) -> Manifest:
    return Manifest(None, "job-a", name, rank, "2026-01-01T00:00:00Z", PART, files, packs=(PackEntry(0, 100),))


def entry(path: str, size: int = 10, crc: str = "0000000a", **pack: int) -> FileEntry:
    return FileEntry(path, size, (crc,), **pack)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "dl"


def place(root: Path, rel: str, size: int = 10) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def test_nothing_on_disk_fetches_every_file_into_the_node_rank_folder_from_the_manifest_rank_keys(root):
    m = manifest(entry("model.bin", 30), entry("sub/state.json", 5))
    plan = make_plan(root, None, (single(m),), 3, VerifiedIndex(None))
    assert plan.intact == ()
    assert [t.rel for t in plan.fetch] == ["rank-3/checkpoint-7/model.bin", "rank-3/checkpoint-7/sub/state.json"]
    assert [t.dest for t in plan.fetch] == [root / t.rel for t in plan.fetch]
    assert [t.key for t in plan.fetch] == [layout.file_key("job-a", "checkpoint-7", 0, p)
                                          for p in ("model.bin", "sub/state.json")]
    assert (plan.fetch_bytes, plan.total_bytes, plan.total_files) == (35, 35, 2)


def test_only_packed_files_carry_their_pack_key(root):
    m = manifest(entry("big.bin"), entry("small.json", pack=0, offset=40))
    plan = make_plan(root, None, (single(m),), 0, VerifiedIndex(None))
    assert [t.pack_key for t in plan.fetch] == [None, layout.pack_key("job-a", "checkpoint-7", 0, 0)]


def test_a_file_recorded_intact_with_the_same_stat_is_trusted_and_any_other_is_fetched(root):
    m = manifest(entry("a.bin"), entry("b.bin"), entry("c.bin"))
    for name in ("a.bin", "b.bin"):
        place(root, f"rank-0/checkpoint-7/{name}")
    with Folder(root) as folder:
        first = make_plan(root, folder, (single(m),), 0, VerifiedIndex(None))
        index = VerifiedIndex(None)
        for task in first.fetch[:2]:
            index.record(task.rel, task.fingerprint, os.stat(task.dest))
        place(root, "rank-0/checkpoint-7/b.bin", 11)  # changed after it was verified
        plan = make_plan(root, folder, (single(m),), 0, index)
    assert [t.rel for t in plan.intact] == ["rank-0/checkpoint-7/a.bin"]
    assert [t.rel for t in plan.fetch] == ["rank-0/checkpoint-7/b.bin", "rank-0/checkpoint-7/c.bin"]
    assert (plan.fetch_bytes, plan.total_bytes) == (20, 30)


def test_an_unchanged_file_is_fetched_again_when_the_checkpoint_was_recommitted_with_other_content(root):
    place(root, "rank-0/checkpoint-7/a.bin")
    with Folder(root) as folder:
        before = single(manifest(entry("a.bin", crc="0000000a")))
        (old,) = make_plan(root, folder, (before,), 0, VerifiedIndex(None)).fetch
        index = VerifiedIndex(None)
        index.record(old.rel, old.fingerprint, os.stat(old.dest))
        plan = make_plan(root, folder, (single(manifest(entry("a.bin", crc="0000000b"))),), 0, index)
    assert len(plan.fetch) == 1 and plan.intact == ()


def test_a_manifest_path_that_leaves_the_download_folder_is_refused(root):
    with pytest.raises(IntegrityError, match="lands outside the download folder"):
        make_plan(root, None, (single(manifest(entry("../../../outside"))),), 0, VerifiedIndex(None))


@pytest.mark.parametrize("rel", ["rank-0/checkpoint-7/a.bin", "rank-0/checkpoint-7/a.bin" + INCOMPLETE_SUFFIX])
def test_a_symlink_at_a_file_or_its_temporary_name_is_refused(root, tmp_path, rel):
    (tmp_path / "victim").write_bytes(b"x" * 10)
    (root / rel).parent.mkdir(parents=True)
    (root / rel).symlink_to(tmp_path / "victim")
    with Folder(root) as folder, pytest.raises(IntegrityError, match="symlink"):
        make_plan(root, folder, (single(manifest(entry("a.bin"))),), 0, VerifiedIndex(None))


def test_a_hardlink_at_a_file_is_refused(root, tmp_path):
    path = place(root, "rank-0/checkpoint-7/a.bin")
    os.link(path, tmp_path / "second-name")
    with Folder(root) as folder, pytest.raises(IntegrityError, match="2 hard links"):
        make_plan(root, folder, (single(manifest(entry("a.bin"))),), 0, VerifiedIndex(None))


def test_a_folder_where_a_file_is_needed_is_refused(root):
    (root / "rank-0" / "checkpoint-7" / "a.bin").mkdir(parents=True)
    with Folder(root) as folder, pytest.raises(IntegrityError, match="is a folder where a file is needed"):
        make_plan(root, folder, (single(manifest(entry("a.bin"))),), 0, VerifiedIndex(None))
