"""Streaming bytes: one ranged GET into an open file, every part checksummed as it arrives.

A failure carries the position reached before it (`next_part`), so the retry asks only for what
is not yet verified; where the bytes go once verified is transfer.py's business.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from ckpt_agent.disk.digests import checksum, format_checksum
from ckpt_agent.errors import AgentError, ChecksumMismatch, IntegrityError, TransientError
from ckpt_agent.load.plan import FileTask
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.runtime.ratelimit import NO_LIMITS, Limiter
from ckpt_agent.runtime.retry import Backoff, retry
from ckpt_agent.stores.base import RangeReader, Store

# 0.4 s x 2^n capped at 5 s: a range rides out at least 5.5 s without a byte (docs/reliability.md).
DOWNLOAD_BACKOFF = Backoff(attempts=6, base=0.4, cap=5.0)

Sink = Callable[[memoryview], None]


def part_bounds(task: FileTask, part: int) -> tuple[int, int]:
    start = part * task.part_size
    return start, min(task.entry.size, start + task.part_size)


def _check(crc: int, expected: str, message: str) -> None:
    if format_checksum(crc) != expected:
        raise ChecksumMismatch(message)


class ForeignFiles(Protocol):
    """Told about files the agent did not write (load/storagecheck.py), whose parts have no checksums
    of ours: every response (its storage check comes with it), and each part once written."""

    def observe(self, task: FileTask, reader: RangeReader) -> None: ...

    def wrote(self, task: FileTask, part: int, crc: str) -> None: ...


class Fetcher:
    """Ranged reads from one store; `fetched(task, n)` is told of every verified byte. Every attempt
    holds a slot of `limiter`'s gate and reads under its rate cap."""

    def __init__(self, store: Store, cancel: Cancel, backoff: Backoff, buffer_size: int,
                 fetched: Callable[[FileTask, int], None], limiter: Limiter = NO_LIMITS,
                 foreign: ForeignFiles | None = None) -> None:
        self.store, self.cancel, self.backoff = store, cancel, backoff
        self.buffer_size, self.fetched, self.limiter, self.foreign = buffer_size, fetched, limiter, foreign
        self._local = threading.local()

    def buffer(self) -> memoryview:
        """One buffer per worker thread, reused for every read."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(self.buffer_size))
        return buf

    def resuming(self, key: str, first: int, last: int, step: Callable[[int, int], int]) -> None:
        """Run `step(first, last) -> next position` to the end, retrying transient failures.

        Progress (a failure's `next_part` past the position) starts the attempt budget again; a
        second checksum mismatch at the same place is the store's fault, not the wire's. An attempt
        holds a slot at the gate, the backoff after it does not.
        """
        at, mismatches = first, 0

        def attempt() -> None:
            nonlocal at
            while at < last:
                with self.limiter.slot():
                    at = step(at, last)

        def progressed(exc: TransientError) -> bool:
            nonlocal at, mismatches
            resumed_at = getattr(exc, "next_part", at)
            moved = resumed_at > at
            if moved:
                at, mismatches = resumed_at, 0
            mismatches += isinstance(exc, ChecksumMismatch)
            if mismatches >= 2:
                raise IntegrityError(f"{key}: {exc}; the object changed in the store or is corrupt") from None
            return moved

        try:
            retry(attempt, self.backoff, sleep=self.cancel.sleep, progressed=progressed)
        except TransientError as exc:
            where = "" if key in str(exc) else f"{key}: "
            raise TransientError(f"{where}{exc} (gave up after {self.backoff.attempts} attempts)") from None

    def parts(self, fd: int, task: FileTask, first: int, last: int) -> int:
        """Parts [first, last) of `task` into `fd` at their offsets, as one ranged GET.

        Returns the first part not yet verified; raises TransientError with that position kept.
        """
        start, _ = part_bounds(task, first)
        _, end = part_bounds(task, last - 1)
        if end == start:
            return last
        reader = self.limiter.paced(self._open(task, start, end - start))
        crc = offset = 0

        def sink(chunk: memoryview) -> None:
            nonlocal crc, offset
            crc = checksum(chunk, crc)
            os.pwrite(fd, chunk, offset)
            offset += len(chunk)

        part = first
        try:
            with resumes_at(task.key, lambda: part):
                while part < last:
                    self.cancel.check()
                    p_start, p_end = part_bounds(task, part)
                    crc, offset = 0, p_start
                    self.read_exactly(reader, task.key, p_end - p_start, sink)
                    if task.entry.foreign is None:
                        _check(crc, task.entry.parts[part], f"part {part} checksum mismatch")
                    elif self.foreign is not None:  # checked whole once in place; noted so a kill resumes here
                        self.foreign.wrote(task, part, format_checksum(crc))
                    self.fetched(task, p_end - p_start)
                    part += 1
        finally:
            reader.close()
        return part

    def _open(self, task: FileTask, start: int, length: int) -> RangeReader:
        reader = self.store.open_range(task.key, start, length)
        size = getattr(reader, "object_size", None)
        listed = "manifest" if task.entry.foreign is None else "listing"
        if size is not None and size != task.entry.size:
            reader.close()
            raise IntegrityError(f"{task.key}: is {size} bytes in the store but {task.entry.size} in its {listed}; "
                                 f"the object changed after it was {'committed' if listed == 'manifest' else 'listed'}")
        if task.entry.foreign is not None and self.foreign is not None:
            try:
                self.foreign.observe(task, reader)
            except BaseException:
                reader.close()
                raise
        return reader

    def span(self, key: str, members: list[FileTask], first: int,
             place: Callable[[FileTask, RangeReader | None], None]) -> int:
        """Members [first:] of a pack, in offset order, as one ranged GET; `place(member, reader)`
        consumes each member's bytes. Returns the first member not placed."""
        start = members[first].entry.offset
        end = members[-1].entry.offset + members[-1].entry.size
        if end == start:
            for task in members[first:]:
                place(task, None)
            return len(members)
        reader = self.limiter.paced(self.store.open_range(key, start, end - start))
        position, index = start, first
        try:
            with resumes_at(key, lambda: index):
                while index < len(members):
                    self.cancel.check()
                    task = members[index]
                    self.read_exactly(reader, key, task.entry.offset - position, None)
                    place(task, reader)
                    position = task.entry.offset + task.entry.size
                    index += 1
        finally:
            reader.close()
        return index

    def member(self, fd: int, task: FileTask, reader: RangeReader | None) -> None:
        """One packed file's bytes appended to `fd` and checked against its one checksum."""
        crc = 0

        def sink(chunk: memoryview) -> None:
            nonlocal crc
            crc = checksum(chunk, crc)
            os.write(fd, chunk)

        if reader is not None:
            self.read_exactly(reader, task.pack_key or task.key, task.entry.size, sink)
        _check(crc, task.entry.parts[0], f"{task.rel} checksum mismatch in its pack")
        self.fetched(task, task.entry.size)

    def read_exactly(self, reader: RangeReader, key: str, count: int, sink: Sink | None) -> None:
        buf = self.buffer()
        while count > 0:
            n = reader.readinto(buf[: min(len(buf), count)])
            if not n:
                raise TransientError(f"{key}: body ended {count} bytes early")
            if sink is not None:
                sink(buf[:n])
            count -= n


@contextlib.contextmanager
def resumes_at(key: str, position: Callable[[], int]) -> Iterator[None]:
    """Tag a failure with the position reached, so the retry resumes there instead of from the start."""
    try:
        yield
    except TransientError as exc:
        exc.next_part = position()  # type: ignore[attr-defined]
        raise
    except AgentError:
        raise
    except OSError as exc:
        error = TransientError(f"{key}: read failed ({type(exc).__name__})")
        error.next_part = position()  # type: ignore[attr-defined]
        raise error from None
