"""Checkpoints (ckpt_agent.load.merge: one node's manifest, or every node's in one folder) + what
is already on disk -> the work to do; skips are values, not branches.

Pure except for stat calls (through ckpt_agent.disk.safefs): nothing is written here, so an unsafe manifest
path or a planted symlink, hardlink or special file is refused before the first byte lands.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ckpt_agent.config.selection import EVERY_FILE, Selection
from ckpt_agent.disk.digests import checksum
from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import VerifiedIndex, checkpoint_dir
from ckpt_agent.disk.safefs import INCOMPLETE_SUFFIX, refuse_hardlink
from ckpt_agent.errors import ConfigError, IntegrityError
from ckpt_agent.load.merge import Merged
from ckpt_agent.stores import layout
from ckpt_agent.stores.manifest import FileEntry


@dataclass(frozen=True)
class FileTask:
    key: str
    dest: Path
    rel: str
    entry: FileEntry
    part_size: int
    pack_key: str | None = None
    origin: tuple[str, int] = ("", 0)  # (checkpoint, the rank whose manifest lists it and whose keys hold it)

    @property
    def fingerprint(self) -> str:
        """Identifies the committed content, so a re-committed checkpoint is not mistaken for intact; a
        foreign file by its key and what its storage said of it before the load (for a Baseten file,
        whose storage speaks only in the answer, its key alone)."""
        foreign = self.entry.foreign
        if foreign is None:
            return f"{self.entry.size}:{checksum(','.join(self.entry.parts).encode()):08x}"
        check = foreign.check
        identity = f"{foreign.key}|{check.kind}:{check.value}:{check.etag}" if check else foreign.key
        return f"{self.entry.size}:foreign:{checksum(identity.encode()):08x}"


@dataclass(frozen=True)
class Plan:
    root: Path
    fetch: tuple[FileTask, ...]
    intact: tuple[FileTask, ...]
    checkpoints: tuple[Merged, ...]
    excluded: tuple[FileTask, ...] = ()  # listed by a manifest, left out by the selection: never fetched
    selection: Selection = EVERY_FILE

    @property
    def excluded_bytes(self) -> int:
        return sum(t.entry.size for t in self.excluded)

    @property
    def fetch_bytes(self) -> int:
        return sum(t.entry.size for t in self.fetch)

    @property
    def total_bytes(self) -> int:
        return self.fetch_bytes + sum(t.entry.size for t in self.intact)

    @property
    def total_files(self) -> int:
        return len(self.fetch) + len(self.intact)


def make_plan(root: Path, folder: Folder | None, checkpoints: tuple[Merged, ...], rank: int,
              index: VerifiedIndex, selection: Selection = EVERY_FILE) -> Plan:
    """`folder` is None when the download folder does not exist yet (a dry run): nothing is there.
    A file the selection leaves out is not even looked at: the load removes any copy of it. Every
    file lands in this node's `rank-<rank>/<name>/`, whichever node's manifest lists it."""
    fetch: list[FileTask] = []
    intact: list[FileTask] = []
    excluded: list[FileTask] = []
    for checkpoint in checkpoints:
        folder_rel = checkpoint_dir(rank, checkpoint.checkpoint_name)
        for m, entry in ((p.manifest, p.entry) for p in checkpoint.files):
            rel = f"{folder_rel}/{entry.path}"
            dest = root / rel
            if not os.path.normpath(dest).startswith(os.path.normpath(root) + os.sep):
                raise IntegrityError(
                    f"{m.job_id}/{m.checkpoint_name}: path {entry.path!r} lands outside the download folder"
                )
            pack_key = None if entry.pack is None else layout.pack_key(m.job_id, m.checkpoint_name, m.rank, entry.pack)
            key = entry.foreign.key if entry.foreign else layout.file_key(m.job_id, m.checkpoint_name, m.rank,
                                                                         entry.path)
            task = FileTask(key, dest, rel, entry, m.part_size, pack_key, (m.checkpoint_name, m.rank))
            if not selection.wants(entry.path):
                excluded.append(task)
                continue
            st = _regular(folder, rel)
            _regular(folder, rel + INCOMPLETE_SUFFIX)
            if st is not None and index.is_intact(rel, task.fingerprint, st):
                intact.append(task)
            else:
                fetch.append(task)
    return Plan(root, tuple(fetch), tuple(intact), checkpoints, tuple(excluded), selection)


def check_selection(checkpoints: tuple[Merged, ...], selection: Selection, required: bool) -> tuple[str, ...]:
    """Before anything is touched: a required load that would place no file of a checkpoint is a
    ConfigError (never train without the weights because of a typo); otherwise warnings to print."""
    warnings: list[str] = []
    for c in checkpoints:
        paths = [p.entry.path for p in c.files]
        unmatched = selection.unmatched_includes(paths)
        shown = f"checkpoint {c.checkpoint_name} of job {c.job_id}"
        if paths and not any(selection.wants(p) for p in paths):
            listing = ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
            why = (f"{selection.include_field}: {', '.join(map(repr, unmatched))} matches no file of {shown}"
                   if unmatched == selection.include and unmatched
                   else f"{selection.source()} leaves no file of {shown}")
            if required:
                raise ConfigError(f"{why} (it has {listing}); fix the patterns, so training does not start "
                                  "without the checkpoint")
            warnings.append(f"{why} (it has {listing}); loading none of its files")
        elif unmatched:
            warnings.append(f"{selection.include_field}: {', '.join(map(repr, unmatched))} matches no file of "
                            f"{shown}; the other patterns chose what is loaded")
    return tuple(warnings)


def _regular(folder: Folder | None, rel: str) -> os.stat_result | None:
    """The lstat of a regular file with one link; a link, special file or hardlink is refused."""
    if folder is None:
        return None
    st = folder.lstat(rel)
    if st is not None and st.st_nlink != 1:
        raise refuse_hardlink(folder.shown(rel), st.st_nlink)
    return st
