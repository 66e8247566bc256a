"""Which small files go into which pack, and a reader that streams a pack from its members.

A checkpoint of thousands of small files costs thousands of requests, and per-request CPU is
what limits loading them. At save time small files are also written, concatenated, as a few
pack objects (the individual objects stay, so other tools still see every file); a load then
fetches each pack with a few ranged GETs.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PACK_MAX_FILE = 1 << 20
PACK_SIZE = 16 << 20
PACK_MIN_FILES = 16


@dataclass(frozen=True)
class Member:
    rel: str
    path: Path
    size: int
    offset: int


@dataclass(frozen=True)
class Pack:
    id: int
    members: tuple[Member, ...]

    @property
    def size(self) -> int:
        last = self.members[-1]
        return last.offset + last.size


def assign_packs(files: Sequence[tuple[str, Path, int]], max_file: int = PACK_MAX_FILE,
                 pack_size: int = PACK_SIZE, min_files: int = PACK_MIN_FILES) -> list[Pack]:
    """Packs of the files no larger than `max_file`, in path order; none when there are few."""
    small = [(rel, path, size) for rel, path, size in files if size <= max_file]
    if len(small) < min_files:
        return []
    packs: list[Pack] = []
    members: list[Member] = []
    offset = 0
    for rel, path, size in small:
        if members and offset + size > pack_size:
            packs.append(Pack(len(packs), tuple(members)))
            members, offset = [], 0
        members.append(Member(rel, path, size, offset))
        offset += size
    if members:
        packs.append(Pack(len(packs), tuple(members)))
    return packs


class PackReader:
    """A file-like view of a pack: the members' bytes one after another, read from disk.

    `opener` returns a read-only fd for a member; the save side passes one that never follows a
    link and checks the file is the one it scanned."""

    def __init__(self, pack: Pack, opener: Callable[[Member], int]) -> None:
        self._open = opener
        self._members = [m for m in pack.members if m.size]
        self._starts = [m.offset for m in self._members]
        self.seek(0)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset < 0:
            raise OSError("a pack reader seeks only to an absolute offset")
        self._index = max(0, bisect.bisect_right(self._starts, offset) - 1)
        self._within = offset - self._starts[self._index] if self._members else 0
        return offset

    def read(self, n: int = -1) -> bytes:
        chunks: list[bytes] = []
        want = n if n >= 0 else float("inf")
        while want > 0 and self._index < len(self._members):
            member = self._members[self._index]
            take = int(min(want, member.size - self._within))
            fd = self._open(member)
            try:
                data = os.pread(fd, take, self._within) if take else b""
            finally:
                os.close(fd)
            if len(data) != take:
                raise OSError(f"{member.path}: changed while packing")
            chunks.append(data)
            self._within += take
            want -= take
            if self._within >= member.size:
                self._index, self._within = self._index + 1, 0
        return b"".join(chunks)
