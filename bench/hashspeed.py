"""Throughput of the candidate per-part hashes on this machine: 256 MiB in 8 MiB parts, one core.

Run: .venv/bin/python -m bench.hashspeed [rounds]   (MB/s per algorithm, median of interleaved rounds)
"""

from __future__ import annotations

import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import crc32c

TOTAL, PART = 256 << 20, 8 << 20


def _crc(part: memoryview) -> object:
    return crc32c.crc32c(part)


CANDIDATES: dict[str, Callable[[memoryview], object]] = {
    "crc32c": _crc,
    "sha256": lambda part: hashlib.sha256(part).digest(),
    "blake2b": lambda part: hashlib.blake2b(part).digest(),
    "blake2b-256": lambda part: hashlib.blake2b(part, digest_size=32).digest(),
    "sha512": lambda part: hashlib.sha512(part).digest(),
}


def one_pass(fn: Callable[[memoryview], object], data: memoryview) -> float:
    """Seconds to hash every part of `data`."""
    start = time.perf_counter()
    for offset in range(0, len(data), PART):
        fn(data[offset:offset + PART])
    return time.perf_counter() - start


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    data = memoryview(os.urandom(TOTAL))
    times: dict[str, list[float]] = {name: [] for name in CANDIDATES}
    for _ in range(rounds):  # interleaved, so a busy neighbour slows every candidate alike
        for name, fn in CANDIDATES.items():
            times[name].append(one_pass(fn, data))
    for name, taken in times.items():
        print(f"{name:12s} {TOTAL / statistics.median(taken) / 1e6:8.0f} MB/s")


if __name__ == "__main__":
    main()
