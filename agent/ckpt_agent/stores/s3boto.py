"""The boto3 S3 engine (CKPT_AGENT_S3_ENGINE=boto3): the only module that imports boto3.

Uploads go part by part through `upload_part`, each body streamed from disk (FileSlice), never
through s3transfer, whose `upload_fileobj` reads the parts of a file object into memory (a save
then holds about the whole file resident: docs/benchmarks.md). botocore's own messages can echo
request details, so every botocore error is turned into one of ours with a message built here
from the error code, the operation and the key only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
)

from ckpt_agent.errors import TransientError
from ckpt_agent.runtime.retry import retry
from ckpt_agent.stores.base import Listing, RangeReader, check_listing_size, too_large
from ckpt_agent.stores.s3common import (
    REQUEST_BACKOFF,
    EmptyReader,
    FileSlice,
    S3StoreBase,
    content_range_size,
    credentials_error,
    store_error,
)

_CREDENTIAL_ERRORS = (CredentialRetrievalError, NoCredentialsError, PartialCredentialsError, ProfileNotFound)


class _BodyCut(TransientError):
    """A body cut short after the headers: botocore retried the request, never this."""


class _Body:
    """readinto straight from the HTTP response, so bytes are not copied through Python."""

    def __init__(self, body, content_range: str | None = None) -> None:
        self._body = body
        self._raw = body._raw_stream
        self.object_size = content_range_size(content_range)

    def readinto(self, buffer: memoryview) -> int:
        try:
            return self._raw.readinto(buffer)
        except Exception as exc:  # noqa: BLE001 - urllib3 and socket errors alike are retryable
            raise TransientError(f"connection failed mid-body ({type(exc).__name__})") from None

    def close(self) -> None:
        self._body.close()


class Boto3Store(S3StoreBase):
    """S3 through botocore, for what the native engine does not speak (SSO, other proxies)."""

    def __init__(self, bucket: str, root: str, max_connections: int = 32, read_timeout: float = 20) -> None:
        super().__init__(bucket, root)
        config = Config(
            max_pool_connections=max_connections,
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=10,
            read_timeout=read_timeout,
            tcp_keepalive=True,
        )
        try:
            self._client = boto3.session.Session().client("s3", config=config)
        except BotoCoreError as exc:
            raise credentials_error(exc) from None

    def _error(self, exc: Exception, action: str, key: str) -> Exception:
        where = self._where(key)
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return store_error(code, status, where, action, self.bucket)
        if isinstance(exc, _CREDENTIAL_ERRORS):
            return credentials_error(exc)
        name = type(exc).__name__
        return TransientError(f"{where}: {action} failed ({name}); check AWS_ENDPOINT_URL and the network")

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        """Only a body cut short is retried here: botocore has already retried the request."""

        def attempt() -> bytes:
            response = self._call("get_object", "GET", key, Key=self._key(key))
            if limit is not None and response.get("ContentLength", 0) > limit:
                response["Body"].close()
                raise too_large(key, limit)
            try:
                return response["Body"].read()  # read() checks the length: a body cut short raises
            except (BotoCoreError, OSError) as exc:
                raise _BodyCut(f"{self._where(key)}: GET body failed ({type(exc).__name__})") from None

        return retry(attempt, REQUEST_BACKOFF, retry_on=_BodyCut)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("put_object", "PUT", key, Key=self._key(key), Body=data)

    def _put_object(self, key: str, body: FileSlice, length: int) -> None:
        self._call("put_object", "PUT", key, Key=self._key(key), Body=body, ContentLength=length)

    def _create_multipart(self, key: str) -> str:
        return self._call("create_multipart_upload", "upload", key, Key=self._key(key))["UploadId"]

    def _upload_part(self, key: str, upload_id: str, number: int, body: FileSlice, length: int) -> str:
        return self._call("upload_part", "upload part", key, Key=self._key(key), UploadId=upload_id,
                          PartNumber=number, Body=body, ContentLength=length)["ETag"]

    def _upload_part_copy(self, key: str, upload_id: str, number: int, src_key: str, start: int, length: int) -> str:
        """botocore turns S3's 200-with-an-error answer into a ClientError."""
        answer = self._call("upload_part_copy", "copy part", src_key, Key=self._key(key), UploadId=upload_id,
                            PartNumber=number, CopySource={"Bucket": self.bucket, "Key": self._key(src_key)},
                            CopySourceRange=f"bytes={start}-{start + length - 1}")
        return answer.get("CopyPartResult", {}).get("ETag") or ""

    def _complete_multipart(self, key: str, upload_id: str, etags: Sequence[tuple[int, str]]) -> None:
        parts = [{"PartNumber": n, "ETag": e} for n, e in etags]
        self._call("complete_multipart_upload", "complete upload", key, Key=self._key(key), UploadId=upload_id,
                   MultipartUpload={"Parts": parts})

    def _abort_multipart(self, key: str, upload_id: str) -> None:
        self._call("abort_multipart_upload", "abort upload", key, Key=self._key(key), UploadId=upload_id)

    def _call(self, operation: str, action: str, key: str, **params: Any) -> Any:
        """One botocore call on this bucket; its errors become ours, named for `key`."""
        try:
            return getattr(self._client, operation)(Bucket=self.bucket, **params)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, action, key) from None

    def list_dir(self, prefix: str) -> Listing:
        full = self._list_prefix(prefix)
        files: list[str] = []
        dirs: list[str] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/"
            )
            for count, page in enumerate(pages, 1):
                files.extend(o["Key"][len(full):] for o in page.get("Contents", ()))
                dirs.extend(p["Prefix"][len(full):].rstrip("/") for p in page.get("CommonPrefixes", ()))
                check_listing_size(full, len(files) + len(dirs) + count)  # pages: empty ones must end too
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "LIST", prefix) from None
        return Listing(tuple(sorted(f for f in files if f)), tuple(sorted(dirs)))

    def open_range(self, key: str, start: int, length: int) -> RangeReader:
        try:
            if length <= 0:
                # S3 answers an invalid range such as "bytes=3-2" with the whole object, so
                # only check that the key exists (a missing one is still NotFoundError).
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
                return EmptyReader()
            response = self._client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}"
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "GET", key) from None
        return _Body(response["Body"], response.get("ContentRange"))

    def head(self, key: str) -> dict[str, str]:
        answer = self._call("head_object", "HEAD", key, Key=self._key(key), ChecksumMode="ENABLED")
        return {k.lower(): v for k, v in answer["ResponseMetadata"]["HTTPHeaders"].items()}

    def delete(self, key: str) -> None:
        self._call("delete_object", "DELETE", key, Key=self._key(key))

    def copy(self, src_key: str, dst_key: str) -> None:
        self._call("copy_object", "COPY", src_key, Key=self._key(dst_key),
                   CopySource={"Bucket": self.bucket, "Key": self._key(src_key)})

    def close(self) -> None:
        self._client.close()
