"""Part digests: crc32c for every check, sha256 where equal hashes must mean equal bytes.

One read of the bytes gives both, so save hashes once and a load's check costs only the crc.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable


def _crc32c() -> Callable[[bytes | bytearray | memoryview, int], int]:
    """The crc32c package's C function, loaded without the package's __init__: that asks
    importlib.metadata for the package's own version, about 40 ms of every start before the first
    store request (issue 19). Where the extension is not where the package keeps it, the package."""
    from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader
    from importlib.util import find_spec, module_from_spec, spec_from_loader

    spec = find_spec("crc32c")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        for suffix in EXTENSION_SUFFIXES:
            path = os.path.join(folder, "_crc32c" + suffix)
            if os.path.isfile(path):
                loader = ExtensionFileLoader("crc32c._crc32c", path)
                found = spec_from_loader("crc32c._crc32c", loader)
                if found is not None:
                    module = module_from_spec(found)
                    loader.exec_module(module)
                    return module.crc32c
    import crc32c

    return crc32c.crc32c


_CRC32C = _crc32c()


def checksum(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """crc32c runs at >10 GB/s and releases the GIL, so verification never bottlenecks I/O."""
    return _CRC32C(data, value)


def format_checksum(value: int) -> str:
    return f"{value:08x}"


def read_part_digests(fd: int, start: int, end: int, part_size: int, buf: memoryview,
                      strong: bool = True, also: Callable[[memoryview], object] | None = None,
                      ) -> list[tuple[str, str]] | None:
    """(crc32c, sha256) of each part in [start, end) of an open file, in one read of its bytes.

    `start` is a multiple of part_size; None when the file ends before `end`; an empty range is
    one part, the digests of nothing. strong=False leaves the sha256 "" (crc32c is much cheaper).
    `also` is handed every byte in order, for a digest of the whole range in the same read.
    """
    digests: list[tuple[str, str]] = []
    for p_start in range(start, max(end, start + 1), part_size):
        p_end = min(end, p_start + part_size)
        crc, offset = 0, p_start
        sha = hashlib.sha256() if strong else None
        while offset < p_end:
            n = os.preadv(fd, [buf[: min(len(buf), p_end - offset)]], offset)
            if n <= 0:
                return None
            crc = checksum(buf[:n], crc)
            if sha is not None:
                sha.update(buf[:n])
            if also is not None:
                also(buf[:n])
            offset += n
        digests.append((format_checksum(crc), sha.hexdigest() if sha is not None else ""))
    return digests


def read_checksums(fd: int, start: int, end: int, part_size: int, buf: memoryview,
                   also: Callable[[memoryview], object] | None = None) -> list[str] | None:
    """The crc32c checksums of read_part_digests, for checks that need no strong hash."""
    digests = read_part_digests(fd, start, end, part_size, buf, strong=False, also=also)
    return None if digests is None else [crc for crc, _ in digests]


def mapped_checksum(fd: int, start: int, end: int) -> str | None:
    """crc32c of [start, end) of a file we just wrote, read through a mapping rather than copied out.

    A kernel copy then this check beats the same check by pread and a copy through a buffer
    (docs/benchmarks.md, "Numbers behind the code"). None if the file ends
    before `end`. Only for our own files: a mapping of a file truncated while it is read faults
    the process, and only a process that can already write our file can do that. A file system
    that cannot map files is read with pread instead.
    """
    if os.fstat(fd).st_size < end:
        return None
    if start == end:
        return format_checksum(0)
    base = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        mapped = mmap.mmap(fd, end - base, prot=mmap.PROT_READ, offset=base)
    except OSError:
        sums = read_checksums(fd, start, end, end - start, memoryview(bytearray(min(end - start, 1 << 20))))
        return None if sums is None else sums[0]
    with mapped, memoryview(mapped)[start - base:] as view:
        return format_checksum(checksum(view))
