"""Manifests + what is already on disk -> the work to do; skips are values, not branches.

Pure except for stat calls: nothing is written here, so an unsafe manifest path or a planted
symlink is refused before the first byte lands.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent import layout
from agent.errors import IntegrityError
from agent.localstate import INCOMPLETE_SUFFIX, VerifiedIndex
from agent.manifest import FileEntry, Manifest, checksum


@dataclass(frozen=True)
class FileTask:
    key: str
    dest: Path
    rel: str
    entry: FileEntry
    part_size: int
    pack_key: str | None = None

    @property
    def fingerprint(self) -> str:
        """Identifies the committed content, so a re-committed checkpoint is not mistaken for intact."""
        return f"{self.entry.size}:{checksum(','.join(self.entry.parts).encode()):08x}"


@dataclass(frozen=True)
class Plan:
    root: Path
    fetch: tuple[FileTask, ...]
    intact: tuple[FileTask, ...]
    manifests: tuple[Manifest, ...]

    @property
    def fetch_bytes(self) -> int:
        return sum(t.entry.size for t in self.fetch)

    @property
    def total_bytes(self) -> int:
        return self.fetch_bytes + sum(t.entry.size for t in self.intact)

    @property
    def total_files(self) -> int:
        return len(self.fetch) + len(self.intact)


class _SafePaths:
    """Refuses a symlink (or a non-folder) planted anywhere between the root and a file.

    Folders already checked are remembered, so a checkpoint of thousands of files costs about
    one lstat per file; the final lstat doubles as the stat the plan needs.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._prefix = f"{root}/"
        self._dirs: set[str] = set()

    def lstat_file(self, rel: str) -> os.stat_result | None:
        """The file's lstat, None when it (or a folder above it) does not exist yet."""
        parts = rel.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in self._dirs:
                continue
            st = self._lstat(folder)
            if st is None:
                return None
            if not stat.S_ISDIR(st.st_mode):
                raise IntegrityError(f"{self.root / folder}: is a file where a folder is needed; remove it")
            self._dirs.add(folder)
        st = self._lstat(rel)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{self.root / rel}: is not a regular file; remove it")
        return st

    def _lstat(self, rel: str) -> os.stat_result | None:
        try:
            st = os.lstat(self._prefix + rel)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise IntegrityError(
                f"{self.root / rel}: is a symlink inside the download folder; remove it "
                "(ckpt-agent never writes through links)"
            )
        return st


def make_plan(root: Path, manifests: tuple[Manifest, ...], rank: int, index: VerifiedIndex) -> Plan:
    fetch: list[FileTask] = []
    intact: list[FileTask] = []
    paths = _SafePaths(root)
    for m in manifests:
        folder = layout.local_checkpoint_dir(rank, m.checkpoint_name)
        for entry in m.files:
            rel = f"{folder}/{entry.path}"
            dest = root / rel
            if not os.path.normpath(dest).startswith(os.path.normpath(root) + os.sep):
                raise IntegrityError(
                    f"{m.job_id}/{m.checkpoint_name}: path {entry.path!r} lands outside the download folder"
                )
            st = paths.lstat_file(rel)
            paths.lstat_file(rel + INCOMPLETE_SUFFIX)
            pack_key = None if entry.pack is None else layout.pack_key(m.job_id, m.checkpoint_name, m.rank, entry.pack)
            task = FileTask(layout.file_key(m.job_id, m.checkpoint_name, m.rank, entry.path),
                            dest, rel, entry, m.part_size, pack_key)
            if st is not None and index.is_intact(rel, task.fingerprint, st):
                intact.append(task)
            else:
                fetch.append(task)
    return Plan(root, tuple(fetch), tuple(intact), manifests)
