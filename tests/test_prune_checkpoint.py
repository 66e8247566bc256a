"""prune_checkpoint: a checkpoint folder ends up holding exactly what its manifest lists, and a folder
that changes under it is refused, never followed elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import prune_checkpoint
from ckpt_agent.errors import IntegrityError

CKPT = "rank-0/checkpoint-1"


def place(root: Path, *rels: str) -> None:
    for rel in rels:
        path = root / CKPT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_entries_the_manifest_does_not_list_are_removed_and_named(tmp_path):
    place(tmp_path, "model.bin", "sub/state.json", "stray.txt", "sub/old.json", "gone/deep.bin")
    with Folder(tmp_path) as folder:
        removed = prune_checkpoint(folder, CKPT, {"model.bin", "sub/state.json"})
    assert removed == ["gone", "stray.txt", "sub/old.json"]
    assert sorted(p.relative_to(tmp_path / CKPT).as_posix() for p in (tmp_path / CKPT).rglob("*")) == \
        ["model.bin", "sub", "sub/state.json"]


def test_a_subfolder_that_vanishes_while_pruning_is_refused_and_nothing_outside_is_touched(
        tmp_path, monkeypatch):
    """The folder is listed, then gone when opened: its files count as disappeared. The walk must not
    fall back to another folder (the working directory), let alone remove what is there."""
    root, elsewhere = tmp_path / "dl", tmp_path / "cwd"
    place(root, "model.bin", "sub/state.json")
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_bytes(b"mine")
    monkeypatch.chdir(elsewhere)
    with Folder(root) as folder:
        real_dir = folder.dir

        def vanishing(rel: str, create: bool = False):
            return None if rel == f"{CKPT}/sub" else real_dir(rel, create)

        monkeypatch.setattr(folder, "dir", vanishing)
        with pytest.raises(IntegrityError, match="sub/state.json: disappeared during the load"):
            prune_checkpoint(folder, CKPT, {"model.bin", "sub/state.json"})
    assert (elsewhere / "keep.txt").read_bytes() == b"mine"
