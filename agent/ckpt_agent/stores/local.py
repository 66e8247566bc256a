"""The local directory store: the embedded default, and the model the S3 store must match."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from itertools import accumulate
from pathlib import Path
from typing import BinaryIO

from ckpt_agent.disk.fileio import KernelCopy, copy_range, write_all
from ckpt_agent.disk.safefs import INCOMPLETE_SUFFIX, AtomicFile, write_atomic
from ckpt_agent.errors import IntegrityError, NotFoundError, StoreError
from ckpt_agent.stores.base import Listing, RangeReader, Store, Upload, too_large, upload_in_parts

_MODE = 0o666  # less the umask, as open() would: mkstemp's 0600 would lock other users out


def _open_parent(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _read_copy(source: BinaryIO, dst: int, start: int, offset: int, length: int) -> None:
    """From a file object with no fd to copy from; its reads may come back short."""
    source.seek(start)
    while length > 0:
        data = source.read(length)
        if not data:
            raise EOFError
        write_all(dst, memoryview(data), offset)
        offset, length = offset + len(data), length - len(data)


class _FileRange:
    def __init__(self, path: Path, start: int, length: int) -> None:
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self._file.seek(start)
        self._left = length
        self.object_size = os.fstat(self._file.fileno()).st_size

    def readinto(self, buffer: memoryview) -> int:
        if self._left <= 0:
            return 0
        n = self._file.readinto(buffer[: self._left])
        self._left -= n
        return n

    def close(self) -> None:
        self._file.close()


class _LocalUpload(Upload):
    """Parts are copied into a hidden temporary file, renamed into place at the end.

    In the kernel (ckpt_agent.disk.fileio.copy_range) where it can; by reading and writing where it can't.
    """

    part_size = 64 << 20

    def __init__(self, path: Path, key: str, size: int, lengths: Sequence[int] | None,
                 path_of: Callable[[str], Path]) -> None:
        self._offsets = None if lengths is None else [0, *accumulate(lengths)]
        self._path_of = path_of
        self._dfd = _open_parent(path)
        try:
            self._file = AtomicFile(self._dfd, path.name, _MODE)
        except BaseException:
            os.close(self._dfd)
            raise
        self._fd, self._key = self._file.fd, key
        self._kernel = KernelCopy()
        try:
            os.ftruncate(self._fd, size)
        except BaseException:
            self.abort()
            raise

    def put_part(self, index: int, source: BinaryIO, start: int, length: int) -> None:
        offset = index * self.part_size if self._offsets is None else self._offsets[index]
        try:
            try:
                src = source.fileno()
            except (OSError, AttributeError):  # a pack, or a body paced by the rate cap
                src = None
            if src is None:
                _read_copy(source, self._fd, start, offset, length)
            elif not copy_range(src, self._fd, offset, length, src_offset=start, kernel=self._kernel):
                raise EOFError
        except EOFError:
            raise StoreError(f"{self._key}: source ended early") from None
        except OSError as exc:
            raise StoreError(f"{self._key}: cannot write to the local store: {exc.strerror}") from None

    def copy_part(self, index: int, src_key: str, start: int, length: int) -> None:
        """A range of another file of the store, copied locally (in the kernel where it can)."""
        try:
            source = open(self._path_of(src_key), "rb", buffering=0)  # noqa: SIM115 - closed below
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"{src_key}: not found in the local store") from None
        with source:
            if os.fstat(source.fileno()).st_size < start + length:
                raise IntegrityError(f"{src_key}: shorter than the range copied from it")
            self.put_part(index, source, start, length)

    def complete(self) -> None:
        try:
            self._file.commit()
        finally:
            self._close_folder()

    def abort(self) -> None:
        """Also after a failed complete(): both steps are no-ops the second time."""
        try:
            self._file.discard()
        finally:
            self._close_folder()

    def _close_folder(self) -> None:
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1


class LocalStore(Store):
    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return f"local store {self.root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as source:
                data = source.read() if limit is None else source.read(limit + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"{key}: not found in {self.describe()}") from None
        except OSError as exc:
            raise StoreError(f"{key}: cannot read from {self.describe()}: {exc.strerror}") from None
        if limit is not None and len(data) > limit:
            raise too_large(key, limit)
        return data

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            dfd = _open_parent(path)
            try:
                write_atomic(dfd, path.name, data, _MODE)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise StoreError(f"{key}: cannot write to {self.describe()}: {exc.strerror}") from None

    def upload_file(self, key: str, source: BinaryIO, size: int) -> None:
        upload_in_parts(self.start_upload(key, size), source, size)

    def start_upload(self, key: str, size: int, lengths: Sequence[int] | None = None) -> Upload:
        try:
            return _LocalUpload(self._path(key), key, size, lengths, self._path)
        except OSError as exc:
            raise StoreError(f"{key}: cannot write to {self.describe()}: {exc.strerror}") from None

    def copy(self, src_key: str, dst_key: str) -> None:
        """A local copy of the file (in the kernel where it can), never read into memory."""
        try:
            size = self._path(src_key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"{src_key}: not found in {self.describe()}") from None
        upload = self.start_upload(dst_key, size, [size])
        try:
            upload.copy_part(0, src_key, 0, size)
            upload.complete()
        except BaseException:
            upload.abort()
            raise

    def list_dir(self, prefix: str) -> Listing:
        try:
            entries = list(os.scandir(self._path(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return Listing((), ())
        except OSError as exc:
            raise StoreError(f"{prefix}: cannot list {self.describe()}: {exc.strerror}") from None
        files = sorted(e.name for e in entries if e.is_file() and not e.name.endswith(INCOMPLETE_SUFFIX))
        dirs = sorted(e.name for e in entries if e.is_dir())
        return Listing(tuple(files), tuple(dirs))

    def open_range(self, key: str, start: int, length: int) -> RangeReader:
        try:
            return _FileRange(self._path(key), start, length)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"{key}: not found in {self.describe()}") from None

    def delete(self, key: str) -> None:
        """Also removes folders left empty, as an object store has no folders of its own."""
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"{key}: cannot delete from {self.describe()}: {exc.strerror}") from None
        for parent in path.parents:
            if parent == self.root or self.root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break
