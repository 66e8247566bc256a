"""Byte ranges between open files: chunked reads, complete writes, in-kernel copies.

Shared by the part cache, the local sources and the local store, which all move bytes between
files they opened themselves (never by path): the one byte copy.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

BUFFER = 1 << 20


def read_span(fd: int, offset: int, length: int, buf: memoryview | None = None) -> Iterator[memoryview]:
    """The bytes of [offset, offset + length) in buffer-sized chunks; stops early if the file is shorter.

    Each chunk is a view of `buf` (one is allocated if none is given), valid until the next."""
    if buf is None:
        buf = memoryview(bytearray(min(BUFFER, max(length, 1))))
    end = offset + length
    while offset < end:
        n = os.preadv(fd, [buf[: min(len(buf), end - offset)]], offset)
        if n <= 0:
            return
        yield buf[:n]
        offset += n


def write_all(fd: int, data: memoryview, offset: int | None = None) -> None:
    """All of `data`, at `offset` (pwrite) or at the file position."""
    while data:
        n = os.write(fd, data) if offset is None else os.pwrite(fd, data, offset)
        data = data[n:]
        if offset is not None:
            offset += n


@dataclass
class KernelCopy:
    """Whether the kernel may still be asked to copy between the same two files: once it said no, it
    will say no again, so a copy made of many ranges (an upload's parts) asks it only once."""

    allowed: bool = True


def copy_range(src: int, dst: int, offset: int, length: int, src_offset: int = 0,
               kernel: KernelCopy | None = None) -> bool:
    """`length` bytes of `src` from `src_offset` to `offset` of `dst`, in the kernel where the file
    systems allow it (a reflink on some); False if `src` is shorter."""
    done = 0
    if kernel is None or kernel.allowed:
        try:
            while done < length:
                n = os.copy_file_range(src, dst, length - done, src_offset + done, offset + done)
                if n == 0:
                    return False
                done += n
            return True
        except OSError as exc:
            # "not between these two files": across filesystems (EXDEV), or a kernel or filesystem
            # (FUSE, some network mounts) that lacks it. An ordinary copy works there.
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            if kernel is not None:
                kernel.allowed = False
    for chunk in read_span(src, src_offset + done, length - done):
        write_all(dst, chunk, offset + done)
        done += len(chunk)
    return done == length
