"""The same bytes, found locally: verified copies of a part before asking the store for it.

For each part not yet verified in the destination, in order: the trainer's own
`BT_CHECKPOINT_DIR/<checkpoint>/<path>` (a container restarted on the node where it saved), the
other ranks' `download_folder/rank-*/<checkpoint>/<path>`, then the part cache (format-2 manifests:
its keys are the parts' sha256). Only what none of them holds goes to the store.

Local files are as untrusted as the store. Each is opened read-only, relative to a folder fd,
without following a link at any depth and with O_NONBLOCK (a planted FIFO never blocks), and used
only if it is a regular file of the manifest's size. A part is copied by the kernel (a reflink
where the file system has them), then checked where it landed against the manifest's crc32c, the
check every byte from the store gets: what is placed is what was checked, whatever the source does
meanwhile. A file at the manifest's own path needs no more than crc32c (it catches corruption and
a stale version); the cache picks bytes by their content, so its hits are also re-hashed with
sha256 (ckpt_agent.disk.cache). The source's (dev, inode, size, mtime_ns, ctime_ns) must be the same
after each part as when it was opened, so a file rewritten under us is dropped even where a part
of it happens to match. Copies, never hardlinks: the trainer writes its folder again, another
rank's agent replaces its files, and safefs refuses a hardlinked file in the download folder anyway.

Local copies are bound by the CPU, not the network, so at most one per core runs at once, however
many workers the load has. Writes to one file queue on its inode lock however many threads write,
so more only add contention; a kernel copy is cheaper still when memory is cold (the measurements:
docs/benchmarks.md, "Numbers behind the code").
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckpt_agent.config.settings import Settings
from ckpt_agent.disk.cache import PartCache
from ckpt_agent.disk.digests import mapped_checksum
from ckpt_agent.disk.fileio import copy_range
from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import rank_dir
from ckpt_agent.disk.safefs import open_file
from ckpt_agent.errors import AgentError
from ckpt_agent.load.cachefill import FillList
from ckpt_agent.load.fetch import part_bounds
from ckpt_agent.load.plan import FileTask

CHECKPOINT_DIR, RANKS, CACHE = "checkpoint_dir", "ranks", "cache"
LOCAL_KINDS = (CHECKPOINT_DIR, RANKS, CACHE)
_RANK = re.compile(r"rank-\d+")

Placed = Callable[[str, int], None]  # (source kind, bytes) for every part placed from it
Warn = Callable[[str], None]


@dataclass(frozen=True)
class _Source:
    kind: str
    fd: int
    signature: tuple[int, ...]

    def unchanged(self) -> bool:
        return _signature(os.fstat(self.fd)) == self.signature


def _signature(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class LocalSources:
    """Shared by the workers of one load; `warn` tells the user once of a cache that stopped working."""

    def __init__(self, folder: Folder, rank: int, trainer: Folder | None, cache: PartCache | None,
                 warn: Warn) -> None:
        self._folder, self._trainer, self._cache, self._warn = folder, trainer, cache, warn
        self._ranks = _other_ranks(folder, rank)
        self._can_get = cache is not None
        self.noted = FillList()  # for the cache, after the load (ckpt_agent.load.cachefill)
        self._lock = threading.Lock()
        self._gate = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))

    def __enter__(self) -> LocalSources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def usable(self) -> bool:
        """Whether there is anywhere to look at all; if not, the load skips the lookups."""
        return self._trainer is not None or bool(self._ranks) or self._can_get

    def close(self) -> None:
        if self._cache is not None:
            if self._cache.stats.discarded:
                self._warn(f"part cache {self._cache.root}: {self._cache.stats.discarded} entries did not match "
                           "their sha256 and were removed; those parts came from the store")
            self._cache.close()
        if self._trainer is not None:
            self._trainer.close()

    def fill(self, fd: int, task: FileTask, parts: list[int], placed: Placed) -> list[int]:
        """Place what local copies hold of `parts` into `fd`; the parts still missing, for the store."""
        if not parts:
            return parts
        missing: list[int] = []
        sources = self._open(task, fd)
        try:
            for part in parts:
                with self._gate:
                    kind = self._place(fd, task, part, sources)
                if kind is None:
                    missing.append(part)
                else:
                    start, end = part_bounds(task, part)
                    placed(kind, end - start)
        finally:
            for source in sources:
                os.close(source.fd)
        return missing

    def keep(self, task: FileTask, first: int, last: int) -> None:
        """Parts [first, last) of the file, just verified from the store: noted for the cache, which is
        filled from the placed file after the load, off its critical path."""
        if self._cache is None or not task.entry.strong:
            return
        for part in range(first, last):
            start, end = part_bounds(task, part)
            self.noted.add(task.rel, start, end - start, task.entry.strong[part])

    def _place(self, fd: int, task: FileTask, part: int, sources: list[_Source]) -> str | None:
        for source in sources:
            if source.unchanged() and _copy_checked(source.fd, fd, task, part) and source.unchanged():
                return source.kind
        if self._can_get and task.entry.strong and self._from_cache(fd, task, part, task.entry.strong[part]):
            return CACHE
        return None

    def _from_cache(self, fd: int, task: FileTask, part: int, sha: str) -> bool:
        """A hit is re-hashed by the cache before it is copied; the crc32c of the placed range then
        covers the moment between that hash and the copy."""
        assert self._cache is not None
        start, end = part_bounds(task, part)
        try:
            if not self._cache.get_into(sha, fd, start, end - start):
                return False
        except (OSError, AgentError) as exc:
            self._cache_failed(exc)
            return False
        return mapped_checksum(fd, start, end) == task.entry.parts[part]

    def _cache_failed(self, exc: Exception) -> None:
        with self._lock:
            told, self._can_get = not self._can_get, False
        if not told:
            assert self._cache is not None
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._warn(f"part cache {self._cache.root}: cannot read it ({detail}); this load goes on without it")

    def _open(self, task: FileTask, dest: int) -> list[_Source]:
        """The local copies of this file worth reading: regular, the manifest's size, not `dest` itself."""
        here = os.fstat(dest)
        where = task.rel.split("/", 1)[1]  # <checkpoint>/<path>, below rank-<r>/
        name = where[: -len(task.entry.path) - 1]
        candidates: list[tuple[str, Folder, str]] = []
        if self._trainer is not None:
            candidates.append((CHECKPOINT_DIR, self._trainer, where))
            if name == task.entry.path:  # a single-file checkpoint sits in BT_CHECKPOINT_DIR as itself
                candidates.append((CHECKPOINT_DIR, self._trainer, name))
        candidates += [(RANKS, self._folder, f"{rank}/{where}") for rank in self._ranks]
        opened: list[_Source] = []
        for kind, folder, rel in candidates:
            fd = _open_regular(folder, rel)
            if fd is None:
                continue
            st = os.fstat(fd)
            if st.st_size != task.entry.size or (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino):
                os.close(fd)
                continue
            opened.append(_Source(kind, fd, _signature(st)))
        return opened


def _copy_checked(src: int, dst: int, task: FileTask, part: int) -> bool:
    """Part `part` of `src` to the same place in `dst`; True if the bytes now in `dst` match the
    manifest's crc32c. One kernel copy and a read of the result through a mapping: copying through
    a buffer, checksummed on its way, took two copies and was slower (module docstring)."""
    start, end = part_bounds(task, part)
    try:
        return (copy_range(src, dst, start, end - start, src_offset=start)
                and mapped_checksum(dst, start, end) == task.entry.parts[part])
    except OSError:
        return False


def _open_regular(folder: Folder, rel: str) -> int | None:
    """A regular file at `rel`, read-only, reached without following any link; None for anything else."""
    try:
        dfd, name = folder.parent(rel)
        return None if dfd is None else open_file(dfd, name, folder.shown(rel))
    except (AgentError, OSError):
        return None


def _other_ranks(folder: Folder, rank: int) -> list[str]:
    try:
        names = os.listdir(folder.fd)
    except OSError:
        return []
    return sorted(n for n in names if _RANK.fullmatch(n) and n != rank_dir(rank))


def open_sources(settings: Settings, folder: Folder, warn: Warn) -> LocalSources:
    """The sources for one load; a cache that cannot be opened is warned about and left out."""
    trainer = None
    if os.path.isdir(settings.checkpoint_dir):
        try:
            trainer = Folder(Path(settings.checkpoint_dir))
        except AgentError:
            trainer = None
    cache = None
    if settings.cache is not None:
        try:
            cache = PartCache(settings.cache.root, settings.cache.max_bytes)
        except AgentError as exc:
            warn(f"{exc}; this load goes on without the part cache")
    return LocalSources(folder, settings.node_rank, trainer, cache, warn)
