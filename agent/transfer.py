"""Runs a plan: ranged GETs on one bounded pool, every part verified before it counts.

Each file is written with `os.pwrite` into `<name>.ckpt-incomplete` next to its destination and
renamed into place only when all of its parts match the manifest. A temporary file left by an
earlier, killed run is kept (if it is a regular file with one link): its parts are checked
locally and only the bad ones are fetched. Every file and folder is reached through agent.safefs.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from agent.cancel import Cancel
from agent.errors import AgentError, IntegrityError, LoadTimeoutError, TransientError
from agent.localstate import INCOMPLETE_SUFFIX, VerifiedIndex
from agent.manifest import checksum, format_checksum, read_checksums
from agent.plan import FileTask, Plan
from agent.pool import run_tasks
from agent.safefs import Folder, open_file, open_or_create
from agent.stores.base import Store

Progress = Callable[[int], None]


@dataclass(frozen=True)
class TransferOptions:
    """`workers` and `chunk_size` come from Settings, the one place their defaults live."""

    workers: int
    chunk_size: int
    buffer_size: int = 1 << 20
    attempts: int = 6
    backoff_base: float = 0.2
    backoff_cap: float = 5.0


@dataclass
class TransferStats:
    files_fetched: int = 0
    files_reused: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0


class _ChecksumMismatch(TransientError):
    """A part did not match: retried once more in case the wire, not the store, was at fault."""


@dataclass
class _FileState:
    task: FileTask
    units_left: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    prepared: bool = False
    resumed: bool = False


class _Engine:
    def __init__(self, store: Store, plan: Plan, folder: Folder, options: TransferOptions, progress: Progress,
                 cancel: Cancel, index: VerifiedIndex) -> None:
        self.store, self.plan, self.folder, self.options = store, plan, folder, options
        self.progress, self.cancel, self.index = progress, cancel, index
        self.stats = TransferStats()
        self._stats_lock = threading.Lock()
        self._local = threading.local()
        self.placed: set[str] = set()

    def _buffer(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(self.options.buffer_size))
        return buf

    def units(self) -> Iterator[Callable[[], None]]:
        """Packed small files go as spans of their pack; large files as chunk-sized ranges."""
        packs: dict[str, list[FileTask]] = {}
        for task in self.plan.fetch:
            if task.pack_key is not None:
                packs.setdefault(task.pack_key, []).append(task)
        for key, members in packs.items():
            for span in _spans(sorted(members, key=lambda t: t.entry.offset), self.options.chunk_size):
                yield lambda k=key, s=span: self._retrying(k, 0, len(s), lambda a, _b: self._stream_span(k, s, a))
        for task in self.plan.fetch:
            if task.pack_key is not None:
                continue
            parts = len(task.entry.parts)
            per_unit = max(1, self.options.chunk_size // task.part_size)
            starts = range(0, parts, per_unit)
            state = _FileState(task, len(starts))
            for first in starts:
                last = min(parts, first + per_unit)
                yield lambda s=state, a=first, b=last: self._run_unit(s, a, b)

    def _prepare(self, state: _FileState) -> None:
        """Create or adopt the temporary file; an existing destination is adopted for re-checking."""
        task = state.task
        dfd, name = self.folder.parent(task.rel, create=True)
        existing = open_file(dfd, name, task.dest, write=True)
        if existing is not None:
            os.close(existing)
            os.replace(name, name + INCOMPLETE_SUFFIX, src_dir_fd=dfd, dst_dir_fd=dfd)
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
            for run_start, run_end in _runs(todo):
                self._fetch_parts(fd, task, run_start, run_end)
        finally:
            os.close(fd)
        with state.lock:
            state.units_left -= 1
            finished = state.units_left == 0
        if finished:
            self._finish(state)

    def _part_bounds(self, task: FileTask, part: int) -> tuple[int, int]:
        start = part * task.part_size
        return start, min(task.entry.size, start + task.part_size)

    def _part_ok(self, fd: int, task: FileTask, part: int) -> bool:
        start, end = self._part_bounds(task, part)
        if read_checksums(fd, start, end, task.part_size, self._buffer()) == [task.entry.parts[part]]:
            self.progress(end - start)
            return True
        return False

    def _fetch_parts(self, fd: int, task: FileTask, first: int, last: int) -> None:
        """Fetch parts [first, last) as one ranged GET, resuming at the first unverified part."""
        self._retrying(task.key, first, last, lambda a, b: self._stream(fd, task, a, b))

    def _retrying(self, key: str, first: int, last: int, step: Callable[[int, int], int]) -> None:
        """Run `step(first, last) -> next position` to the end, retrying transient failures with backoff.

        A failure carries `next_part`, the position reached before it; progress resets the budget.
        """
        attempt = mismatches = 0
        while first < last:
            try:
                first = step(first, last)
            except TransientError as exc:
                resumed_at = getattr(exc, "next_part", first)
                if resumed_at > first:  # parts arrived before the fault: the budget starts again
                    first, attempt, mismatches = resumed_at, 0, 0
                attempt += 1
                mismatches += isinstance(exc, _ChecksumMismatch)
                if mismatches >= 2:  # once may be the wire; twice is the store
                    raise IntegrityError(
                        f"{key}: {exc}; the object changed in the store or is corrupt"
                    ) from None
                if attempt >= self.options.attempts:
                    where = "" if key in str(exc) else f"{key}: "
                    raise TransientError(f"{where}{exc} (gave up after {attempt} attempts)") from None
                delay = min(self.options.backoff_cap, self.options.backoff_base * 2 ** attempt)
                self.cancel.sleep(delay * random.uniform(0.5, 1.0))

    def _stream(self, fd: int, task: FileTask, first: int, last: int) -> int:
        """Returns the first part not yet verified; raises TransientError with progress kept."""
        start, _ = self._part_bounds(task, first)
        _, end = self._part_bounds(task, last - 1)
        if end == start:
            return last
        reader = self.store.open_range(task.key, start, end - start)
        size = getattr(reader, "object_size", None)
        if size is not None and size != task.entry.size:
            reader.close()
            raise IntegrityError(f"{task.key}: is {size} bytes in the store but {task.entry.size} in its manifest; "
                                 "the object changed after it was committed")
        crc = offset = 0

        def sink(chunk: memoryview) -> None:
            nonlocal crc, offset
            crc = checksum(chunk, crc)
            os.pwrite(fd, chunk, offset)
            offset += len(chunk)

        part = first
        try:
            with _resumes_at(task.key, lambda: part):
                while part < last:
                    self.cancel.check()
                    p_start, p_end = self._part_bounds(task, part)
                    crc, offset, fetched = 0, p_start, p_end - p_start
                    self._read_exactly(reader, task.key, fetched, sink)
                    if format_checksum(crc) != task.entry.parts[part]:
                        raise _ChecksumMismatch(f"part {part} checksum mismatch")
                    with self._stats_lock:
                        self.stats.bytes_fetched += fetched
                    self.progress(fetched)
                    part += 1
        finally:
            reader.close()
        return part

    def _stream_span(self, key: str, members: list[FileTask], first: int) -> int:
        """Stream a pack range, writing and verifying each member; returns the first member not placed."""
        start = members[first].entry.offset
        end = members[-1].entry.offset + members[-1].entry.size
        if end == start:
            for task in members[first:]:
                self._write_member(task, None)
            return len(members)
        reader = self.store.open_range(key, start, end - start)
        position, index = start, first
        try:
            with _resumes_at(key, lambda: index):
                while index < len(members):
                    self.cancel.check()
                    task = members[index]
                    self._read_exactly(reader, key, task.entry.offset - position, None)
                    self._write_member(task, reader)
                    position = task.entry.offset + task.entry.size
                    index += 1
        finally:
            reader.close()
        return index

    def _read_exactly(self, reader, key: str, count: int, sink: Callable[[memoryview], None] | None) -> None:
        buf = self._buffer()
        while count > 0:
            n = reader.readinto(buf[: min(len(buf), count)])
            if not n:
                raise TransientError(f"{key}: body ended {count} bytes early")
            if sink is not None:
                sink(buf[:n])
            count -= n

    def _write_member(self, task: FileTask, reader) -> None:
        """One packed file: written whole to its temporary name, checked, then renamed into place."""
        fd, existed = self._open_temp(task)
        if existed:
            os.ftruncate(fd, 0)
        crc = 0

        def sink(chunk: memoryview) -> None:
            nonlocal crc
            crc = checksum(chunk, crc)
            os.write(fd, chunk)

        try:
            if reader is not None:
                self._read_exactly(reader, task.pack_key or task.key, task.entry.size, sink)
        finally:
            os.close(fd)
        if format_checksum(crc) != task.entry.parts[0]:
            raise _ChecksumMismatch(f"{task.rel} checksum mismatch in its pack")
        with self._stats_lock:
            self.stats.bytes_fetched += task.entry.size
        self.progress(task.entry.size)
        self._place(task)

    def _finish(self, state: _FileState) -> None:
        self._place(state.task)

    def _open_temp(self, task: FileTask) -> tuple[int, bool]:
        """(fd, existed) of the file's temporary twin, created in its folder if need be."""
        dfd, name = self.folder.parent(task.rel, create=True)
        return open_or_create(dfd, name + INCOMPLETE_SUFFIX, f"{task.dest}{INCOMPLETE_SUFFIX}")

    def _place(self, task: FileTask) -> None:
        """Rename into place and record the stat of the inode we wrote (fstat after the rename, which
        moves ctime), so a file swapped in by someone else never matches the record."""
        dfd, name = self.folder.parent(task.rel)
        tmp = name + INCOMPLETE_SUFFIX
        fd = open_file(dfd, tmp, f"{task.dest}{INCOMPLETE_SUFFIX}", write=True)
        if fd is None:
            raise IntegrityError(f"{task.dest}{INCOMPLETE_SUFFIX}: removed while it was being downloaded")
        try:
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            self.index.record(task.rel, task.fingerprint, os.fstat(fd))
        finally:
            os.close(fd)
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


@contextlib.contextmanager
def _resumes_at(key: str, position: Callable[[], int]) -> Iterator[None]:
    """Tag a failure with the position reached, so the retry resumes there instead of from the start."""
    try:
        yield
    except TransientError as exc:
        exc.next_part = position()
        raise
    except AgentError:
        raise
    except OSError as exc:
        error = TransientError(f"{key}: read failed ({type(exc).__name__})")
        error.next_part = position()
        raise error from None


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
             cancel: Cancel, index: VerifiedIndex) -> TransferStats:
    """Download and verify everything in `plan.fetch`; intact files are only counted."""
    started = time.monotonic()
    engine = _Engine(store, plan, folder, options, progress, cancel, index)
    engine.stats.files_reused = len(plan.intact)
    try:
        run_tasks(engine.units(), options.workers, cancel)
    except LoadTimeoutError as exc:
        missing = [t.rel for t in plan.fetch if t.rel not in engine.placed]
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LoadTimeoutError(f"{exc}; still missing {len(missing)} files: {shown}") from None
    finally:
        index.save()
    engine.stats.seconds = time.monotonic() - started
    return engine.stats
