"""The small protocol every checkpoint store implements.

Backends write only per-object primitives; everything about layout, manifests and transfers
lives above them, so a new store is a few dozen lines and the conformance suite in
tests/test_store_conformance.py holds every backend to the same behaviour.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import BinaryIO, Protocol


class RangeReader(Protocol):
    """A readable stream over one byte range of an object."""

    def readinto(self, buffer: memoryview) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Listing:
    """Immediate children of a prefix: object names and sub-folder names, both sorted."""

    files: tuple[str, ...]
    dirs: tuple[str, ...]


class Store(ABC):
    """Keys are '/'-separated, relative to the store root, never starting with '/'."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object; NotFoundError when it does not exist."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Create or replace an object atomically: readers see the old or the new, never half."""

    @abstractmethod
    def list_dir(self, prefix: str) -> Listing:
        """Children of `prefix` (which ends with '/'); an empty Listing when there are none."""

    @abstractmethod
    def open_range(self, key: str, start: int, length: int) -> RangeReader:
        """Stream bytes [start, start+length) of an object."""

    @abstractmethod
    def upload_file(self, key: str, source: BinaryIO, size: int) -> None:
        """Store `size` bytes read from `source` under `key`."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; removing a missing one is not an error."""

    def copy(self, src_key: str, dst_key: str) -> None:
        """Copy inside the store; backends override where the store can do it server-side."""
        self.write_bytes(dst_key, self.read_bytes(src_key))

    def exists(self, key: str) -> bool:
        parent, _, name = key.rpartition("/")
        return name in self.list_dir(parent + "/" if parent else "").files

    def list_recursive(self, prefix: str) -> list[str]:
        """Every object key under `prefix`, sorted."""
        listing = self.list_dir(prefix)
        keys = [prefix + name for name in listing.files]
        for sub in listing.dirs:
            keys.extend(self.list_recursive(f"{prefix}{sub}/"))
        return sorted(keys)

    def describe(self) -> str:
        return type(self).__name__

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections; the default has none."""
