"""Runs a plan: schedules ranged fetches on one bounded pool and places each file once verified.

Each file is written with `os.pwrite` into `<name>.ckpt-incomplete` next to its destination and
renamed into place only when all of its parts match the manifest. A temporary file left by an
earlier, killed run is kept (if it is a regular file with one link): its parts are checked
locally. A part still missing is then looked for in ckpt_agent.load.sources (BT_CHECKPOINT_DIR, other ranks,
the part cache), and only the rest is fetched, in contiguous runs so misses still combine into
few ranged GETs. Every file and folder is reached through ckpt_agent.disk.safefs; the bytes from the store
stream through ckpt_agent.load.fetch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

from ckpt_agent.disk.digests import read_checksums
from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import VerifiedIndex
from ckpt_agent.disk.safefs import open_or_create, partial_name, place
from ckpt_agent.errors import IntegrityError, LoadTimeoutError
from ckpt_agent.load.fetch import DOWNLOAD_BACKOFF, Fetcher, part_bounds
from ckpt_agent.load.journal import PartJournal
from ckpt_agent.load.plan import FileTask, Plan
from ckpt_agent.load.sources import LOCAL_KINDS, LocalSources
from ckpt_agent.load.storagecheck import Checked, StorageChecks
from ckpt_agent.report import Progress
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.runtime.pool import run_tasks
from ckpt_agent.runtime.ratelimit import NO_LIMITS, Limiter
from ckpt_agent.runtime.retry import Backoff
from ckpt_agent.stores.base import RangeReader, Store


@dataclass(frozen=True)
class TransferOptions:
    """`workers` and `chunk_size` come from Settings, the one place their defaults live."""

    workers: int
    chunk_size: int
    buffer_size: int = 1 << 20
    backoff: Backoff = DOWNLOAD_BACKOFF


STORE, REUSED = "store", "reused"


@dataclass
class TransferStats:
    """`bytes_fetched` came from the store; `bytes_local` by ckpt_agent.load.sources kind; `bytes_reused` were
    already verified in the download folder (intact files, parts of a resumed file). `by_origin`: the
    same split for the files of each (checkpoint, node manifest) (FileTask.origin), so a merged load
    can say where each node's files came from."""

    files_fetched: int = 0
    files_reused: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0
    bytes_local: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LOCAL_KINDS, 0))
    bytes_reused: int = 0
    by_origin: dict[tuple[str, int], dict[str, int]] = field(default_factory=dict)
    checked: dict[str, Checked] = field(default_factory=dict)  # files the agent did not write, by rel

    def bytes_from(self) -> dict[str, int]:
        """Every byte of the load by where it came from, as the summary and loaded-rank-<r>.json show it."""
        return {STORE: self.bytes_fetched, **self.bytes_local, REUSED: self.bytes_reused}

    def from_node(self, checkpoint: str, rank: int) -> dict[str, int]:
        """Where the bytes of node `rank`'s files of `checkpoint` came from, as bytes_from() splits them."""
        return dict(self.by_origin.get((checkpoint, rank), dict.fromkeys((STORE, *LOCAL_KINDS, REUSED), 0)))

    def count(self, origin: tuple[str, int], kind: str, n: int) -> None:
        """`n` bytes of the files of `origin` (checkpoint, node) placed from `kind`; the caller holds the lock."""
        if kind == STORE:
            self.bytes_fetched += n
        elif kind == REUSED:
            self.bytes_reused += n
        else:
            self.bytes_local[kind] += n
        per_origin = self.by_origin.setdefault(origin, dict.fromkeys((STORE, *LOCAL_KINDS, REUSED), 0))
        per_origin[kind] += n


@dataclass
class _FileState:
    task: FileTask
    units_left: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    prepared: bool = False
    resumed: bool = False


class _Engine:
    def __init__(self, store: Store, plan: Plan, folder: Folder, options: TransferOptions, progress: Progress,
                 cancel: Cancel, index: VerifiedIndex, limiter: Limiter, sources: LocalSources | None) -> None:
        self.plan, self.folder, self.options = plan, folder, options
        self.progress, self.cancel, self.index, self.sources = progress, cancel, index, sources
        self.stats = TransferStats()
        self._stats_lock = threading.Lock()
        self.checks = StorageChecks(PartJournal(folder, index.save))
        self.fetcher = Fetcher(store, cancel, options.backoff, options.buffer_size, self._fetched, limiter,
                               self.checks)
        self.placed: set[str] = set()

    def _fetched(self, task: FileTask, count: int) -> None:
        self._placed(task, STORE, count)

    def _placed(self, task: FileTask, kind: str, count: int) -> None:
        """Bytes of `task` placed from `kind`: the store, a local source (ckpt_agent.load.sources), or reused."""
        with self._stats_lock:
            self.stats.count(task.origin, kind, count)
        self.progress(count)

    def _missing(self, fd: int, task: FileTask, parts: list[int]) -> list[int]:
        """The parts no local source could supply, for the store (all of a foreign file's: no part checksums)."""
        if self.sources is None or task.entry.foreign is not None:
            return parts
        return self.sources.fill(fd, task, parts, partial(self._placed, task))

    def units(self) -> Iterator[Callable[[], None]]:
        """Packed small files go as spans of their pack; large files as chunk-sized ranges."""
        packs: dict[str, list[FileTask]] = {}
        for task in self.plan.fetch:
            if task.pack_key is not None:
                packs.setdefault(task.pack_key, []).append(task)
        for key, members in packs.items():
            for span in _spans(sorted(members, key=lambda t: t.entry.offset), self.options.chunk_size):
                yield functools.partial(self._run_span, key, span)
        for task in self.plan.fetch:
            if task.pack_key is not None:
                continue
            task = task if task.entry.foreign is None else self.checks.resume(task)
            parts = len(task.entry.parts)
            per_unit = max(1, self.options.chunk_size // task.part_size)
            starts = range(0, parts, per_unit)
            state = _FileState(task, len(starts))
            for first in starts:
                last = min(parts, first + per_unit)
                yield functools.partial(self._run_unit, state, first, last)

    def _run_span(self, key: str, members: list[FileTask]) -> None:
        """Members found locally are placed first; the others come from the pack, regrouped so a
        hole left by local ones splits the range only where it is large."""
        wanted = [task for task in members if not self._member_local(task)]
        for span in _spans(wanted, self.options.chunk_size):
            self.fetcher.resuming(key, 0, len(span), partial(self._span_step, key, span))

    def _span_step(self, key: str, span: list[FileTask], first: int, _last: int) -> int:
        return self.fetcher.span(key, span, first, self._write_member)

    def _member_local(self, task: FileTask) -> bool:
        if self.sources is None:
            return False
        fd, _ = self._open_temp(task)
        try:
            os.ftruncate(fd, task.entry.size)
            found = not self._missing(fd, task, [0])
        finally:
            os.close(fd)
        if found:
            self._place(task)
        return found

    def _prepare(self, state: _FileState) -> None:
        """Create or adopt the temporary file; an existing destination is adopted for re-checking."""
        task = state.task
        dfd, name = self.folder.parent(task.rel, create=True)
        place(dfd, name, partial_name(name), task.dest)  # an existing destination becomes the temporary file
        fd, state.resumed = self._open_temp(task)
        try:
            if os.fstat(fd).st_size != task.entry.size:
                os.ftruncate(fd, task.entry.size)
                _preallocate(fd, task.entry.size)
        finally:
            os.close(fd)
        state.prepared = True

    def _run_unit(self, state: _FileState, first: int, last: int) -> None:
        self.cancel.check()
        task = state.task
        with state.lock:
            if not state.prepared:
                self._prepare(state)
        fd, _ = self._open_temp(task)
        try:
            todo = [p for p in range(first, last) if not (state.resumed and self._part_ok(fd, task, p))]
            for run_start, run_end in _runs(self._missing(fd, task, todo)):
                self.fetcher.resuming(task.key, run_start, run_end,
                                      lambda a, b: self.fetcher.parts(fd, task, a, b))
                if self.sources is not None:
                    self.sources.keep(task, run_start, run_end)
        finally:
            os.close(fd)
        with state.lock:
            state.units_left -= 1
            finished = state.units_left == 0
        if finished:
            if task.entry.foreign is not None:
                self._check_whole(task)
            self._place(task)

    def _check_whole(self, task: FileTask) -> None:
        fd, _ = self._open_temp(task)
        try:
            self.checks.check_whole(fd, task, self.fetcher.buffer(), lambda: self.fetcher.resuming(
                task.key, 0, len(task.entry.parts), lambda a, b: self.fetcher.parts(fd, task, a, b)))
        finally:
            os.close(fd)

    def _part_ok(self, fd: int, task: FileTask, part: int) -> bool:
        """A part on disk matches its checksum (a foreign file's: one noted as a killed load wrote it)."""
        start, end = part_bounds(task, part)
        expected = task.entry.parts[part]
        if expected and read_checksums(fd, start, end, task.part_size, self.fetcher.buffer()) == [expected]:
            self._placed(task, REUSED, end - start)
            return True
        return False

    def _write_member(self, task: FileTask, reader: RangeReader | None) -> None:
        """One packed file: written whole to its temporary name, checked, then renamed into place."""
        fd, existed = self._open_temp(task)
        try:
            if existed:
                os.ftruncate(fd, 0)
            self.fetcher.member(fd, task, reader)
            if self.sources is not None:
                self.sources.keep(task, 0, 1)
        finally:
            os.close(fd)
        self._place(task)

    def _open_temp(self, task: FileTask) -> tuple[int, bool]:
        """(fd, existed) of the file's temporary twin, created in its folder if need be."""
        dfd, name = self.folder.parent(task.rel, create=True)
        return open_or_create(dfd, partial_name(name), partial_name(str(task.dest)))

    def _place(self, task: FileTask) -> None:
        """Rename into place and record the stat of the inode we wrote."""
        dfd, name = self.folder.parent(task.rel)
        shown = partial_name(str(task.dest))
        placed = None if dfd is None else place(dfd, partial_name(name), name, shown)
        if placed is None:
            raise IntegrityError(f"{shown}: removed while it was being downloaded")
        checked = self.checks.results.get(task.rel)
        self.index.record(task.rel, task.fingerprint, placed,
                          None if checked is None else [checked.kind, list(checked.parts)])
        if checked is not None:  # saved soon with the index: a killed load can trust only a foreign file recorded
            self.checks.journal.drop(task.rel)
        with self._stats_lock:
            self.stats.files_fetched += 1
            self.placed.add(task.rel)


def _spans(members: list[FileTask], max_bytes: int, max_gap: int = 1 << 20) -> Iterator[list[FileTask]]:
    """Group members in offset order into ranges of about `max_bytes`, splitting at large gaps."""
    span: list[FileTask] = []
    for task in members:
        if span:
            gap = task.entry.offset - (span[-1].entry.offset + span[-1].entry.size)
            if gap > max_gap or task.entry.offset + task.entry.size - span[0].entry.offset > max_bytes:
                yield span
                span = []
        span.append(task)
    if span:
        yield span


def _preallocate(fd: int, size: int) -> None:
    """Contiguous extents up front: parallel ranged writes into a sparse file fragment it and slow writeback."""
    if size > 0:
        with contextlib.suppress(OSError):
            os.posix_fallocate(fd, 0, size)


def _runs(parts: list[int]) -> Iterator[tuple[int, int]]:
    """Contiguous runs [a, b) of part numbers, so a resumed file needs few ranged GETs."""
    i = 0
    while i < len(parts):
        j = i
        while j + 1 < len(parts) and parts[j + 1] == parts[j] + 1:
            j += 1
        yield parts[i], parts[j] + 1
        i = j + 1


def run_plan(store: Store, plan: Plan, folder: Folder, options: TransferOptions, progress: Progress,
             cancel: Cancel, index: VerifiedIndex, limiter: Limiter = NO_LIMITS,
             sources: LocalSources | None = None) -> TransferStats:
    """Download and verify everything in `plan.fetch`, from `sources` where they hold the bytes;
    intact files are only counted. Every ranged GET goes through `limiter`: the rate cap and the
    throttle-aware gate."""
    started = time.monotonic()
    engine = _Engine(store, plan, folder, options, progress, cancel, index, limiter,
                     sources if sources is not None and sources.usable else None)
    engine.stats.files_reused = len(plan.intact)
    for task in plan.intact:
        engine.stats.count(task.origin, REUSED, task.entry.size)
    try:
        run_tasks(engine.units(), options.workers, cancel)
        engine.checks.journal.clear()
    except LoadTimeoutError as exc:
        missing = [t.rel for t in plan.fetch if t.rel not in engine.placed]
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LoadTimeoutError(f"{exc}; still missing {len(missing)} files: {shown}") from None
    finally:
        engine.checks.journal.save()  # and the index
    engine.stats.seconds = time.monotonic() - started
    engine.stats.checked = dict(engine.checks.results)
    return engine.stats
