"""What both S3 engines share: the bucket/prefix key space, S3's answers read into our error
family, the retry budget of a small request, and part bodies streamed from disk.

The engines differ only in how a request travels (botocore in s3boto.py, signed `http.client`
requests in s3native.py); everything a user can see of S3 is decided here, once, uploads included:
an engine sends the six requests an upload is made of, and the upload classes here use them.
"""

from __future__ import annotations

import contextlib
import os
from abc import abstractmethod
from collections.abc import Sequence
from typing import BinaryIO

from ckpt_agent.config.spec import StoreLocation
from ckpt_agent.errors import AgentError, IntegrityError, NotFoundError, StoreError, ThrottledError, TransientError
from ckpt_agent.runtime.retry import Backoff
from ckpt_agent.stores.base import Store, Upload, upload_in_parts

# Nominal 0.25 s x 2^n capped at 4 s over 6 attempts: a small request rides out about 3.9 s.
REQUEST_BACKOFF = Backoff(attempts=6, base=0.25, cap=4.0)
MULTIPART_THRESHOLD = 64 << 20
CHECKSUM_MODE = {"x-amz-checksum-mode": "ENABLED"}  # HEAD: answer with the checksum S3 keeps, if any
UPLOAD_PART_SIZE = 64 << 20

_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
           "ExpiredToken", "TokenRefreshRequired", "Forbidden"}
_RETRYABLE = {"RequestTimeout", "InternalError"}
# botocore's throttling codes that S3-compatible stores use; S3 answers 503 (with no body on HEAD)
# for both SlowDown and ServiceUnavailable, and its advice for both is "reduce your request rate".
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "ServiceUnavailable", "RequestLimitExceeded",
              "TooManyRequestsException", "RequestThrottled", "BandwidthLimitExceeded"}
_THROTTLED_STATUS = {429, 503}


class S3StoreBase(Store):
    """Keys relative to `s3://bucket/root`; both engines derive from this."""

    def __init__(self, bucket: str, root: str) -> None:
        self.bucket, self.root = bucket, root.strip("/")

    def describe(self) -> str:
        return str(StoreLocation("s3", self.bucket, self.root))

    def _key(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def _list_prefix(self, prefix: str) -> str:
        """The full prefix a LIST of `prefix` asks for; the store root itself when `prefix` is empty."""
        return self._key(prefix) if prefix else (self.root + "/" if self.root else "")

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def upload_file(self, key: str, source: BinaryIO, size: int) -> None:
        upload_in_parts(self.start_upload(key, size), source, size)

    def start_upload(self, key: str, size: int, lengths: Sequence[int] | None = None) -> Upload:
        if lengths is None and size < MULTIPART_THRESHOLD:
            return _SingleUpload(self, key, size)
        return _MultipartUpload(self, key)

    # The requests an upload is made of, each engine's own way; keys are relative to the store.

    @abstractmethod
    def _put_object(self, key: str, body: FileSlice, length: int) -> None: ...

    @abstractmethod
    def _create_multipart(self, key: str) -> str:
        """The new upload's id."""

    @abstractmethod
    def _upload_part(self, key: str, upload_id: str, number: int, body: FileSlice, length: int) -> str:
        """The part's ETag."""

    @abstractmethod
    def _upload_part_copy(self, key: str, upload_id: str, number: int, src_key: str, start: int, length: int) -> str:
        """The copied part's ETag; "" when S3 answered without one (a 200 with an error in the body)."""

    @abstractmethod
    def _complete_multipart(self, key: str, upload_id: str, etags: Sequence[tuple[int, str]]) -> None: ...

    @abstractmethod
    def _abort_multipart(self, key: str, upload_id: str) -> None: ...


class _SingleUpload(Upload):
    def __init__(self, store: S3StoreBase, key: str, size: int) -> None:
        self._store, self._key, self.part_size = store, key, max(1, size)

    def put_part(self, index: int, source: BinaryIO, start: int, length: int) -> None:
        self._store._put_object(self._key, FileSlice(source, start, length), length)

    def complete(self) -> None:
        """The single PUT already made the object visible."""

    def abort(self) -> None:
        """A failed PUT leaves nothing behind."""


class _MultipartUpload(Upload):
    """S3 multipart upload; parts may be sent from many threads at once, each streamed from disk."""

    part_size = UPLOAD_PART_SIZE

    def __init__(self, store: S3StoreBase, key: str) -> None:
        self._store, self._key = store, key
        self._upload_id = store._create_multipart(key)
        self._etags: dict[int, str] = {}

    def put_part(self, index: int, source: BinaryIO, start: int, length: int) -> None:
        body = FileSlice(source, start, length)
        self._etags[index + 1] = self._store._upload_part(self._key, self._upload_id, index + 1, body, length)

    def copy_part(self, index: int, src_key: str, start: int, length: int) -> None:
        """UploadPartCopy: only an answer with an ETag counts; the bytes themselves are S3's to copy
        (the caller checked the source's size)."""
        etag = self._store._upload_part_copy(self._key, self._upload_id, index + 1, src_key, start, length)
        if not etag:
            raise TransientError(f"{self._store._where(self._key)}: copying part {index + 1} failed")
        self._etags[index + 1] = etag

    def complete(self) -> None:
        self._store._complete_multipart(self._key, self._upload_id, sorted(self._etags.items()))

    def abort(self) -> None:
        with contextlib.suppress(AgentError):
            self._store._abort_multipart(self._key, self._upload_id)


def store_error(code: str, status: int, where: str, action: str, bucket: str) -> AgentError:
    """One mapping from an S3 error code to our error family, shared by both S3 engines."""
    if code in _NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
        return NotFoundError(f"{where}: not found")
    if code == "NoSuchBucket":
        return StoreError(f"s3://{bucket}: bucket does not exist; check BT_CHECKPOINT_STORE")
    if code == "InvalidRange" or status == 416:
        return IntegrityError(f"{where}: shorter than the range asked for; the object changed after it was committed")
    if code in _DENIED or status == 403:
        return StoreError(
            f"{where}: access denied ({code or status}) on {action}; check the AWS credentials and their permissions"
        )
    kind: type[StoreError] = StoreError
    if code in _THROTTLED or status in _THROTTLED_STATUS:
        kind = ThrottledError
    elif status >= 500 or code in _RETRYABLE:
        kind = TransientError
    return kind(f"{where}: {action} failed with {code or status}")


def credentials_error(exc: Exception) -> StoreError:
    """botocore's credential errors quote config files and a credential_process's stderr, which may
    hold a secret: only the error's class is kept."""
    if type(exc).__name__ == "NoCredentialsError":
        return StoreError("no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")
    return StoreError(f"AWS credentials could not be loaded ({type(exc).__name__}); check AWS_PROFILE, "
                      "the AWS config and credentials files and any credential_process they name")


def content_range_size(header: str | None) -> int | None:
    """`bytes 0-99/1234` -> 1234; None when absent or the size is unknown (`*`)."""
    total = (header or "").rpartition("/")[2].strip()
    return int(total) if total.isdecimal() else None


class EmptyReader:
    """The reader of a zero-length range: S3 answers an invalid range such as `bytes=3-2` with the
    whole object, so such a range is never asked for."""

    def readinto(self, buffer: memoryview) -> int:
        return 0

    def close(self) -> None:
        """Nothing was opened."""


class FileSlice:
    """A read-only file object over bytes [start, start+length) of `source`, so a part streams from
    disk instead of being read into memory. Positions are relative to the slice; `seek`/`tell`
    let an HTTP client measure, checksum and rewind it for a retry."""

    def __init__(self, source: BinaryIO, start: int, length: int) -> None:
        self._source, self._start, self._length = source, start, length
        self._offset = 0

    def read(self, n: int = -1) -> bytes:
        left = self._length - self._offset
        if left <= 0:
            return b""
        n = left if n is None or n < 0 else min(n, left)
        try:
            data = os.pread(self._source.fileno(), n, self._start + self._offset)
        except (OSError, AttributeError):  # not a real file (a pack reader): seek and read
            self._source.seek(self._start + self._offset)
            data = self._source.read(n)
        self._offset += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._offset, os.SEEK_END: self._length}[whence]
        self._offset = max(0, base + offset)
        return self._offset

    def tell(self) -> int:
        return self._offset

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True
