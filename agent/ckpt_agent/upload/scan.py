"""What a checkpoint on local disk holds, read safely: the scan, its part digests, and changes.

Files are read only through open_regular: never through a link out of the checkpoint, never
blocking on a FIFO, and a file replaced since the scan is an error, so a commit describes the
bytes that were scanned or nothing.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ckpt_agent.disk import safefs
from ckpt_agent.disk.digests import read_part_digests
from ckpt_agent.errors import ConfigError, NotFoundError, UnsafeEntry

# Files are checksummed in regions of this size, so one huge file keeps every core busy.
CHECKSUM_REGION = 64 << 20


@dataclass(frozen=True)
class LocalFile:
    rel: str
    path: Path
    size: int
    mtime_ns: int
    ino: int = 0
    ctime_ns: int = 0
    dev: int = 0


def kind_of(mode: int) -> str:
    """What a non-regular entry is, for messages that name it."""
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return what
    return "a special file"


def _entry(root_real: str, path: Path, rel: str) -> LocalFile:
    """A regular file, or a symlink to one inside the checkpoint (uploaded as a copy of it);
    anything else is an UnsafeEntry. Only lstat and stat: a FIFO is never opened here."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        if not (target + os.sep).startswith(root_real + os.sep) or target == root_real:
            raise UnsafeEntry(f"{path}: a symlink to outside the checkpoint; it is never followed out "
                              "(copy the file in, or remove the link)")
        try:
            st = os.stat(target)
        except FileNotFoundError:
            raise UnsafeEntry(f"{path}: a symlink to nothing; remove it or point it at a file") from None
        path = Path(target)
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeEntry(f"{path}: a symlinked folder; links to folders are not uploaded (copy it in)")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeEntry(f"{path}: {kind_of(st.st_mode)}, not a regular file; remove it from the checkpoint")
    return LocalFile(rel, path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev)


def scan_checkpoint(path: Path) -> list[LocalFile]:
    """The files of a checkpoint, sorted: a folder's files, or a single-file checkpoint itself.

    A symlink to a file inside the checkpoint is uploaded as a copy of that file; links that lead
    out, dangling links, symlinked folders and special files (FIFOs, sockets, devices) raise
    UnsafeEntry naming the entry.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:  # a FileNotFoundError: the sidecar takes it as a checkpoint that vanished
        raise NotFoundError(f"{path}: does not exist; give the checkpoint folder or file to upload") from None
    if stat.S_ISREG(mode):
        return [_entry(os.path.realpath(path.parent), path, path.name)]
    if not stat.S_ISDIR(mode):
        raise UnsafeEntry(f"{path}: {kind_of(mode)}; give the checkpoint folder or file to upload")
    root_real = os.path.realpath(path)
    found: list[LocalFile] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        base = Path(dirpath)
        for name in dirnames:
            if os.path.islink(base / name):
                raise UnsafeEntry(f"{base / name}: a symlinked folder; links to folders are not uploaded "
                                  "(copy it in, or remove the link)")
        for name in filenames:
            found.append(_entry(root_real, base / name, (base / name).relative_to(path).as_posix()))
    return sorted(found, key=lambda f: f.rel)


def open_regular(f: LocalFile) -> int:
    """A read-only fd of the very file the scan saw: never through a symlink, never blocking on a
    FIFO, and a file replaced since the scan is an OSError (the commit then sees the change)."""
    opened = safefs.open_regular(f.path)
    if opened is None or (f.dev and (opened[1].st_dev, opened[1].st_ino) != (f.dev, f.ino)):
        if opened is not None:
            os.close(opened[0])
        raise OSError(errno.ESTALE, "replaced since it was scanned", str(f.path))
    return opened[0]


Digests = dict[str, tuple[str, ...]]


@dataclass
class PartDigests:
    """Every file's part crc32c and sha256 (one read), in regions, so one huge file uses every core.

    `tasks()` go on a pool, alone or beside the upload of the same files, so the hash of one region
    runs while another is sent; `result()` once they have all run."""

    files: Sequence[LocalFile]
    part_size: int

    def __post_init__(self) -> None:
        self._region = self.part_size * max(1, CHECKSUM_REGION // self.part_size)
        self._found: dict[tuple[str, int], list[tuple[str, str]]] = {}

    def _starts(self, f: LocalFile) -> range:
        return range(0, max(f.size, 1), self._region)

    def _one(self, f: LocalFile, start: int) -> None:
        fd = open_regular(f)
        try:
            sums = read_part_digests(fd, start, min(f.size, start + self._region), self.part_size,
                                     memoryview(bytearray(min(1 << 20, self.part_size))))
        finally:
            os.close(fd)
        if sums is None:
            raise FileNotFoundError(errno.ENOENT, "shrank while reading", str(f.path))
        self._found[(f.rel, start)] = sums

    def tasks(self) -> Iterator[Callable[[], None]]:
        return (partial(self._one, f, s) for f in self.files for s in self._starts(f))

    def result(self) -> tuple[Digests, Digests]:
        """(crc32c, sha256) per file, in part order."""
        both = {f.rel: [d for s in self._starts(f) for d in self._found[(f.rel, s)]] for f in self.files}
        return ({rel: tuple(crc for crc, _ in d) for rel, d in both.items()},
                {rel: tuple(sha for _, sha in d) for rel, d in both.items()})


def difference(before: Sequence[LocalFile], after: Sequence[LocalFile]) -> str | None:
    """The first path that differs between two scans (size, mtime, ctime, inode, added or removed)."""
    old, new = {f.rel: f for f in before}, {f.rel: f for f in after}
    for rel in sorted(old.keys() | new.keys()):
        if old.get(rel) != new.get(rel):
            return rel
    return None


def rescan(folder: Path) -> list[LocalFile]:
    """scan_checkpoint, with a folder that vanished (or a file that vanished mid-scan) as no files."""
    try:
        return scan_checkpoint(folder) if os.path.lexists(folder) else []
    except (FileNotFoundError, ConfigError):
        return []
