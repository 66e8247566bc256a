"""The data sets the workloads move: file lists, and random files written once (not timed)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

KiB, MiB, GiB = 1024, 1024**2, 1024**3
MB = 1_000_000  # throughput is reported in MB/s (10^6 bytes per second)
CHUNK = 8 * MiB  # also ckpt-agent's upload part size
CHANGED_SHARE = 0.05  # incremental: the share of parts that checkpoint N+1 rewrites

# {relative path: (size, crc32c)}: what a correct copy of a data set holds.
Expected = dict[str, tuple[int, int]]


@dataclass(frozen=True)
class Dataset:
    name: str
    files: tuple[tuple[str, int], ...]  # (relative path, size)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        sizes = sorted({size for _, size in self.files})
        each = "/".join(human(s) for s in sizes)
        return f"{len(self.files)} x {each} = {human(self.total_bytes)}"


def human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def make_datasets(quick: bool) -> dict[str, Dataset]:
    big = 8 * MiB if quick else 2 * GiB
    shards, shard = (4, 2 * MiB) if quick else (16, 128 * MiB)
    smalls, small = (50, 4 * KiB) if quick else (2000, 64 * KiB)
    incremental = 4 * CHUNK if quick else 2 * GiB
    weights = 4 * MiB if quick else 2 * GiB // 3 // CHUNK * CHUNK
    upload = 8 * MiB if quick else 1 * GiB
    return {
        "big": Dataset("big", (("model.safetensors", big),)),
        "sharded": Dataset("sharded", tuple(
            (f"model-{i + 1:05d}-of-{shards:05d}.safetensors", shard) for i in range(shards))),
        # nested folders, 100 files each, so relative paths with '/' are exercised
        "small": Dataset("small", tuple(
            (f"part-{i // 100:02d}/file-{i:05d}.bin", small) for i in range(smalls))),
        # checkpoint N of a job; N+1 (`changed`) differs in CHANGED_SHARE of its 8 MiB parts
        "incremental": Dataset("incremental", (("model.safetensors", incremental),)),
        # an HF Trainer checkpoint folder: the weights a third, the optimizer state two thirds
        # a new checkpoint to upload (issue 19): one 1 GiB file
        "upload1g": Dataset("upload1g", (("model.safetensors", upload),)),
        "trainer": Dataset("trainer", (
            ("model.safetensors", weights), ("optimizer.pt", 2 * weights),
            ("trainer_state.json", 4 * KiB), ("scheduler.pt", 1 * KiB))),
    }


def crc32c_of(blocks: Iterable[bytes | memoryview]) -> int:
    import crc32c

    value = 0
    for block in blocks:
        value = crc32c.crc32c(block, value)
    return value


def _file_blocks(path: Path) -> Iterator[memoryview]:
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            yield view[:n]


def checksum_file(path: Path) -> int:
    return crc32c_of(_file_blocks(path))


def _write_random(path: Path, size: int) -> Iterator[bytes]:
    """Writes `size` random bytes to path, yielding each block as it is written."""
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(CHUNK, left))
            f.write(block)
            left -= len(block)
            yield block


def generate(dataset: Dataset, root: Path) -> Expected:
    """Random files under root; returns what a correct copy holds."""
    expected = {}
    for rel, size in dataset.files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        expected[rel] = (size, crc32c_of(_write_random(path, size)))
    return expected


def changed_parts(size: int) -> list[int]:
    """Which CHUNK-sized parts of a file of `size` bytes checkpoint N+1 rewrites: spread evenly,
    at least one."""
    parts = -(-size // CHUNK)
    count = max(1, round(parts * CHANGED_SHARE))
    return sorted({i * parts // count for i in range(count)})


def derive_changed(source: Path, root: Path, dataset: Dataset) -> Expected:
    """Checkpoint N+1 under root: the files of N at `source`, each with changed_parts() rewritten."""
    expected = {}
    for rel, size in dataset.files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, path)
        with open(path, "r+b") as dst:
            for part in changed_parts(size):
                dst.seek(part * CHUNK)
                dst.write(os.urandom(min(CHUNK, size - part * CHUNK)))
        expected[rel] = (size, checksum_file(path))
    return expected
