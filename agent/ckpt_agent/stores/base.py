"""The small protocol every checkpoint store implements.

Backends write only per-object primitives; everything about layout, manifests and transfers
lives above them, so a backend is only its protocol's plumbing (an S3 engine also carries its
connections and retries; the two share their multipart uploads in s3common.py), and the
conformance suite in tests/test_store_conformance.py holds every backend to the same behaviour.
"""

from __future__ import annotations

import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import BinaryIO, Protocol

from ckpt_agent.errors import IntegrityError, StoreError

MAX_LISTING_ENTRIES = 1_000_000
# S3's rules for a multipart object, which every store keeps: every part but the last at least
# 5 MiB, at most 10,000 parts, at most 5 GiB copied inside the store by one CopyObject or UploadPartCopy.
MIN_PART = 5 << 20
MAX_PARTS = 10_000
MAX_COPY = 5 << 30


class RangeReader(Protocol):
    """A readable stream over one byte range of an object.

    Readers may also offer `object_size`: the whole object's size as the store reports it (None if
    unknown), so the loader can tell an object that changed after its manifest was written.
    """

    def readinto(self, buffer: memoryview) -> int: ...

    def close(self) -> None: ...


class Upload(ABC):
    """One object written in parts, possibly from many threads; invisible until complete()."""

    part_size: int

    @abstractmethod
    def put_part(self, index: int, source: BinaryIO, start: int, length: int) -> None:
        """Store bytes [start, start+length) of `source` as part `index` (0-based, part_size each)."""

    def copy_part(self, index: int, src_key: str, start: int, length: int) -> None:
        """Part `index` is bytes [start, start+length) of `src_key`, an object of the same store, so
        they are not sent again: NotFoundError when it is gone, IntegrityError when it is shorter.
        Only uploads started with `lengths` take copied parts."""
        raise NotImplementedError(f"{type(self).__name__} takes no copied parts")

    @abstractmethod
    def complete(self) -> None:
        """Make the object visible, all parts at once."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what was stored; safe to call after a failure."""


class _WholeUpload(Upload):
    """For stores without parallel parts: one part, handed to upload_file."""

    def __init__(self, store: Store, key: str, size: int) -> None:
        self.store, self.key, self.size, self.part_size = store, key, size, max(1, size)

    def put_part(self, index: int, source: BinaryIO, start: int, length: int) -> None:
        source.seek(start)
        self.store.upload_file(self.key, source, length)

    def complete(self) -> None:
        """upload_file already made the object visible."""

    def abort(self) -> None:
        """Nothing half-written is visible."""


class _SpooledUpload(Upload):
    """For stores that can't copy server-side: parts, copied ones read back from the store, are
    assembled in a temporary file (not memory), which is then uploaded whole."""

    def __init__(self, store: Store, key: str, lengths: Sequence[int]) -> None:
        self.store, self.key, self.part_size = store, key, max(lengths, default=1)
        self._offsets = [0, *accumulate(lengths)]
        self._spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by complete() or abort()

    def put_part(self, index: int, source: BinaryIO, start: int, length: int) -> None:
        source.seek(start)
        self._spool.seek(self._offsets[index])
        limited = _Limited(source, length)
        shutil.copyfileobj(limited, self._spool)
        if limited.left:
            raise StoreError(f"{self.key}: source ended early")

    def copy_part(self, index: int, src_key: str, start: int, length: int) -> None:
        reader = self.store.open_range(src_key, start, length)
        try:
            self._spool.seek(self._offsets[index])
            buffer, left = memoryview(bytearray(1 << 20)), length
            while left > 0:
                n = reader.readinto(buffer[: min(left, len(buffer))])
                if n <= 0:
                    raise IntegrityError(f"{src_key}: shorter than the range copied from it")
                self._spool.write(buffer[:n])
                left -= n
        finally:
            reader.close()

    def complete(self) -> None:
        try:
            self._spool.seek(0)
            self.store.upload_file(self.key, self._spool, self._offsets[-1])
        finally:
            self._spool.close()

    def abort(self) -> None:
        self._spool.close()


class _Limited:
    """The next `length` bytes of a file object, for copyfileobj."""

    def __init__(self, source: BinaryIO, length: int) -> None:
        self._source, self.left = source, length

    def read(self, n: int = -1) -> bytes:
        data = self._source.read(self.left if n < 0 else min(n, self.left))
        self.left -= len(data)
        return data


def upload_in_parts(upload: Upload, source: BinaryIO, size: int) -> None:
    """Sequential use of an Upload, for callers that have one file object and no pool."""
    try:
        for index, start in enumerate(range(0, max(size, 1), upload.part_size)):
            upload.put_part(index, source, start, min(upload.part_size, size - start))
        upload.complete()
    except BaseException:
        upload.abort()
        raise


def too_large(key: str, limit: int) -> IntegrityError:
    return IntegrityError(f"{key}: larger than {limit} bytes, more than the agent ever writes there; "
                          "the store holds a damaged or planted object")


def check_listing_size(prefix: str, count: int) -> None:
    """A listing is buffered whole (and a hostile store may never end one): bound it."""
    if count > MAX_LISTING_ENTRIES:
        raise IntegrityError(f"{prefix}: lists more than {MAX_LISTING_ENTRIES} entries; "
                             "the store holds planted objects or BT_CHECKPOINT_STORE is the wrong prefix")


@dataclass(frozen=True)
class Listing:
    """Immediate children of a prefix: object names and sub-folder names, both sorted."""

    files: tuple[str, ...]
    dirs: tuple[str, ...]


class Store(ABC):
    """Keys are '/'-separated, relative to the store root, never starting with '/'."""

    @abstractmethod
    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        """The whole object; NotFoundError when it does not exist; `too_large` when it holds more than
        `limit` bytes, read no further, so a hostile store can't make us buffer without end."""

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

    def start_upload(self, key: str, size: int, lengths: Sequence[int] | None = None) -> Upload:
        """Begin a parallel upload; backends that can write parts concurrently override this.

        `lengths`: the sizes of the parts in order, when they are not all `part_size`: an object
        assembled from ranges copied inside the store (copy_part) and uploaded ones (put_part)."""
        if lengths is not None:
            return _SpooledUpload(self, key, lengths)
        return _WholeUpload(self, key, size)

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

    def head(self, key: str) -> dict[str, str]:
        """An object's response headers (lower-case names) with S3's checksum mode on: its size, ETag and
        any checksum it keeps, for objects the agent did not write. Only S3 stores have them."""
        raise StoreError(f"{self.describe()}: keeps no object checksums; an s3_prefix reference needs S3")

    def describe(self) -> str:
        return type(self).__name__

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections; the default has none."""
