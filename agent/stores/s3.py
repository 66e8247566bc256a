"""S3 and S3-compatible stores through boto3: the only module that imports it.

botocore's own messages can echo request details, so every botocore error is turned into one
of ours with a message built here from the error code, the operation and the key only.
"""

from __future__ import annotations

import random
import time
from typing import BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
)

from agent.errors import TransientError
from agent.stores.base import Listing, RangeReader, Store, check_listing_size, too_large
from agent.stores.s3errors import content_range_size, credentials_error, store_error

_CREDENTIAL_ERRORS = (CredentialRetrievalError, NoCredentialsError, PartialCredentialsError, ProfileNotFound)

_BODY_ATTEMPTS = 5


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


class _Empty:
    def readinto(self, buffer: memoryview) -> int:
        return 0

    def close(self) -> None:
        pass


class S3Store(Store):
    def __init__(self, bucket: str, root: str, max_connections: int = 32, read_timeout: float = 20) -> None:
        self.bucket = bucket
        self.root = root.strip("/")
        self._max_connections = max_connections
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

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.root}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def _error(self, exc: Exception, action: str, key: str) -> Exception:
        where = f"s3://{self.bucket}/{self._key(key)}"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return store_error(code, status, where, action, self.bucket)
        if isinstance(exc, _CREDENTIAL_ERRORS):
            return credentials_error(exc)
        name = type(exc).__name__
        return TransientError(f"{where}: {action} failed ({name}); check AWS_ENDPOINT_URL and the network")

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        for attempt in range(_BODY_ATTEMPTS):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, "GET", key) from None
            if limit is not None and response.get("ContentLength", 0) > limit:
                response["Body"].close()
                raise too_large(key, limit)
            try:
                return response["Body"].read()  # read() checks the length: a body cut short raises
            except (BotoCoreError, OSError) as exc:
                # botocore retries a request, not a body cut short after the headers arrived
                if attempt == _BODY_ATTEMPTS - 1:
                    raise self._error(exc, "GET", key) from None
                time.sleep(min(2.0, 0.2 * 2**attempt) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def write_bytes(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "PUT", key) from None

    def upload_file(self, key: str, source: BinaryIO, size: int) -> None:
        config = TransferConfig(
            multipart_threshold=64 << 20, multipart_chunksize=64 << 20,
            max_concurrency=4, use_threads=True,
        )
        try:
            self._client.upload_fileobj(source, self.bucket, self._key(key), Config=config)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "upload", key) from None

    def list_dir(self, prefix: str) -> Listing:
        full = self._key(prefix) if prefix else (self.root + "/" if self.root else "")
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
                return _Empty()
            response = self._client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}"
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "GET", key) from None
        return _Body(response["Body"], response.get("ContentRange"))

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "DELETE", key) from None

    def copy(self, src_key: str, dst_key: str) -> None:
        try:
            self._client.copy_object(
                Bucket=self.bucket, Key=self._key(dst_key),
                CopySource={"Bucket": self.bucket, "Key": self._key(src_key)},
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "COPY", src_key) from None

    def close(self) -> None:
        self._client.close()
