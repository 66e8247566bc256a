"""The native S3 engine: SigV4-signed requests over per-thread keep-alive `http.client` connections.

botocore spends milliseconds of CPU per request in its event machinery and copies every body
through urllib3; on a 2-core node that shares its CPU with the network stack, that halves
throughput. Here a request is one signature and one `readinto` straight from the socket into
our buffer. Credentials still come from botocore's chain (profiles, IMDS, web identity) unless
they are plain environment variables, in which case botocore is not imported at all.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import re
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

from agent.errors import AgentError, NotFoundError, StoreError, TransientError
from agent.stores.base import Listing, RangeReader, Store, Upload, upload_in_parts
from agent.stores.s3errors import content_range_size, store_error
from agent.stores.sigv4 import EMPTY_SHA256, UNSIGNED_PAYLOAD, Credentials, canonical_query, sign, uri_encode

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_CODE = re.compile(rb"<Code>([^<]+)</Code>")
ATTEMPTS = 6
MULTIPART_THRESHOLD = 64 << 20
UPLOAD_PART_SIZE = 64 << 20


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    path_style: bool
    region: str


def _env_region(env: Mapping[str, str]) -> str | None:
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None


def credentials_provider(env: Mapping[str, str]) -> tuple[Callable[[], Credentials], str]:
    """(a callable giving current credentials, the region), without botocore when env has both."""
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    region = _env_region(env)
    if key and secret and not env.get("AWS_PROFILE"):
        static = Credentials(key, secret, env.get("AWS_SESSION_TOKEN") or None)
        return (lambda: static), region or "us-east-1"
    import botocore.session

    session = botocore.session.Session()
    found = session.get_credentials()
    if found is None:
        raise StoreError("no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile")

    def current() -> Credentials:
        frozen = found.get_frozen_credentials()
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    return current, region or session.get_config_variable("region") or "us-east-1"


def resolve_endpoint(env: Mapping[str, str], bucket: str, region: str) -> Endpoint:
    """A custom endpoint (AWS_ENDPOINT_URL[_S3]) is path-style; AWS itself is virtual-hosted."""
    url = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StoreError("AWS_ENDPOINT_URL: expected http(s)://host[:port]")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return Endpoint(parts.scheme, parts.hostname, port, True, region)
    if "." in bucket:
        return Endpoint("https", f"s3.{region}.amazonaws.com", 443, True, region)
    return Endpoint("https", f"{bucket}.s3.{region}.amazonaws.com", 443, False, region)


class _Response:
    """A streaming body; the connection goes back to its thread only when fully read."""

    def __init__(self, client: S3Http, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        self._client, self._conn, self._response = client, conn, response

    def readinto(self, buffer: memoryview) -> int:
        try:
            return self._response.readinto(buffer)
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise TransientError(f"connection failed mid-body ({type(exc).__name__})") from None

    @property
    def object_size(self) -> int | None:
        """The whole object's size from `Content-Range: bytes a-b/size`, so a caller can tell that the
        object is not the one it expects even when the bytes it asked for are there."""
        return content_range_size(self._response.getheader("Content-Range"))

    def close(self) -> None:
        # http.client also marks a body cut short (EOF before Content-Length) as closed, with
        # `length` still > 0: that connection is dead and must not serve the next request.
        complete = self._response.isclosed() and not self._response.length
        if complete and not self._response.will_close:
            self._client._release(self._conn)
        else:
            self._conn.close()


class S3Http:
    """Signed requests with per-thread connections; small requests are retried here."""

    def __init__(self, bucket: str, endpoint: Endpoint, credentials: Callable[[], Credentials],
                 timeout: float, ca_bundle: str | None = None) -> None:
        self.bucket, self.endpoint, self._credentials, self._timeout = bucket, endpoint, credentials, timeout
        self._local = threading.local()
        self._ssl = ssl.create_default_context(cafile=ca_bundle) if endpoint.scheme == "https" else None
        self._host_header = endpoint.host if endpoint.port in (80, 443) else f"{endpoint.host}:{endpoint.port}"

    def _connect(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            return conn
        if self._ssl is not None:
            conn = http.client.HTTPSConnection(self.endpoint.host, self.endpoint.port, timeout=self._timeout,
                                               context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self.endpoint.host, self.endpoint.port, timeout=self._timeout)
        conn.blocksize = 1 << 20
        return conn

    def _release(self, conn: http.client.HTTPConnection) -> None:
        old = getattr(self._local, "conn", None)
        if old is not None:
            old.close()
        self._local.conn = conn

    def _path(self, key: str) -> str:
        encoded = uri_encode(key, safe="/")
        return f"/{self.bucket}/{encoded}" if self.endpoint.path_style else f"/{encoded}"

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def request(self, method: str, key: str, action: str, params: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, body: bytes | BinaryIO | None = None,
                length: int | None = None) -> _Response:
        """Send one request; raise our error for any non-2xx answer, leaving the body to the caller."""
        query = canonical_query(params or {})
        path = self._path(key)
        signed = sign(method, self._host_header, path, query, self._credentials(), self.endpoint.region,
                      payload_hash=UNSIGNED_PAYLOAD if body is not None else EMPTY_SHA256,
                      extra_headers={k: v for k, v in (headers or {}).items() if k.startswith("x-amz-")})
        all_headers = {**signed, **(headers or {})}
        if body is not None:
            all_headers["content-length"] = str(length if length is not None else len(body))
        conn = self._connect()
        try:
            conn.request(method, f"{path}?{query}" if query else path, body=body, headers=all_headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise TransientError(f"{self.where(key)}: {action} failed ({type(exc).__name__}); "
                                 "check AWS_ENDPOINT_URL and the network") from None
        if response.status >= 300:
            try:
                payload = response.read(64 << 10)
            except (OSError, http.client.HTTPException):
                payload = b""
            conn.close()
            match = _CODE.search(payload)
            code = match.group(1).decode(errors="replace") if match else ""
            raise store_error(code, response.status, self.where(key), action, self.bucket)
        return _Response(self, conn, response)

    def call(self, method: str, key: str, action: str, **kw) -> bytes:
        """A whole small request with its body read, retried with backoff on transient errors."""
        return self.call_with_etag(method, key, action, **kw)[0]

    def call_with_etag(self, method: str, key: str, action: str, **kw) -> tuple[bytes, str]:
        for attempt in range(ATTEMPTS):
            try:
                response = self.request(method, key, action, **kw)
                try:
                    return response._response.read(), response._response.getheader("ETag", "")
                except (OSError, http.client.HTTPException) as exc:
                    raise TransientError(f"{self.where(key)}: {action} body failed ({type(exc).__name__})") from None
                finally:
                    response.close()
            except TransientError:
                if attempt == ATTEMPTS - 1:
                    raise
                body = kw.get("body")
                if body is not None and not isinstance(body, bytes):
                    body.seek(0)
                time.sleep(min(4.0, 0.25 * 2**attempt) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")


def _text(element: ET.Element, tag: str) -> str:
    found = element.find(_NS + tag)
    return found.text or "" if found is not None else ""


class _Slice:
    """A file object limited to one byte range, so a multipart part streams from disk."""

    def __init__(self, source: BinaryIO, start: int, length: int) -> None:
        self._source, self._start, self._left = source, start, length
        self._pos = start
        self._length = length

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n < 0 else min(n, self._left)
        try:
            data = os.pread(self._source.fileno(), n, self._pos)
        except (OSError, AttributeError):
            self._source.seek(self._pos)
            data = self._source.read(n)
        self._pos += len(data)
        self._left -= len(data)
        return data

    def seek(self, offset: int) -> None:
        self._pos, self._left = self._start + offset, self._length - offset


class _SingleUpload(Upload):
    def __init__(self, http: S3Http, key: str, size: int) -> None:
        self._http, self._key, self.part_size = http, key, max(1, size)

    def put_part(self, index: int, source: BinaryIO, start: int, length: int) -> None:
        self._http.call("PUT", self._key, "PUT", body=_Slice(source, start, length), length=length)

    def complete(self) -> None:
        """The single PUT already made the object visible."""

    def abort(self) -> None:
        """A failed PUT leaves nothing behind."""


class _MultipartUpload(Upload):
    """S3 multipart upload; parts may be sent from many threads at once."""

    part_size = UPLOAD_PART_SIZE

    def __init__(self, http: S3Http, key: str) -> None:
        self._http, self._key = http, key
        created = ET.fromstring(http.call("POST", key, "upload", params={"uploads": ""}))
        self._upload_id = _text(created, "UploadId")
        self._etags: dict[int, str] = {}

    def put_part(self, index: int, source: BinaryIO, start: int, length: int) -> None:
        params = {"partNumber": str(index + 1), "uploadId": self._upload_id}
        _, etag = self._http.call_with_etag("PUT", self._key, "upload part", params=params,
                                            body=_Slice(source, start, length), length=length)
        self._etags[index + 1] = etag

    def complete(self) -> None:
        parts = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>"
                        for n, e in sorted(self._etags.items()))
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        answer = self._http.call("POST", self._key, "complete upload", params={"uploadId": self._upload_id},
                                 body=body)
        if b"<Error>" in answer:
            raise TransientError(f"{self._http.where(self._key)}: completing the upload failed")

    def abort(self) -> None:
        with contextlib.suppress(AgentError):
            self._http.call("DELETE", self._key, "abort upload", params={"uploadId": self._upload_id})


class S3HttpStore(Store):
    def __init__(self, bucket: str, root: str, env: Mapping[str, str], read_timeout: float = 20) -> None:
        credentials, region = credentials_provider(env)
        endpoint = resolve_endpoint(env, bucket, region)
        self.bucket, self.root = bucket, root.strip("/")
        self._http = S3Http(bucket, endpoint, credentials, read_timeout, env.get("AWS_CA_BUNDLE"))

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.root}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def read_bytes(self, key: str) -> bytes:
        return self._http.call("GET", self._key(key), "GET")

    def write_bytes(self, key: str, data: bytes) -> None:
        self._http.call("PUT", self._key(key), "PUT", body=data)

    def list_dir(self, prefix: str) -> Listing:
        full = self._key(prefix) if prefix else (self.root + "/" if self.root else "")
        files: list[str] = []
        dirs: list[str] = []
        params = {"list-type": "2", "prefix": full, "delimiter": "/"}
        while True:
            body = self._http.call("GET", "", "LIST", params=params)
            try:
                root = ET.fromstring(body)
            except ET.ParseError:
                raise TransientError(f"{self._http.where(full)}: LIST answer is not XML") from None
            files.extend(_text(c, "Key")[len(full):] for c in root.iter(_NS + "Contents"))
            dirs.extend(_text(p, "Prefix")[len(full):].rstrip("/") for p in root.iter(_NS + "CommonPrefixes"))
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated") != "true" or not token:
                break
            params = {**params, "continuation-token": token}
        return Listing(tuple(sorted(f for f in files if f)), tuple(sorted(d for d in dirs if d)))

    def open_range(self, key: str, start: int, length: int) -> RangeReader:
        if length <= 0:
            self._http.call("HEAD", self._key(key), "HEAD")
            return _Empty()
        return self._http.request("GET", self._key(key), "GET",
                                  headers={"range": f"bytes={start}-{start + length - 1}"})

    def upload_file(self, key: str, source: BinaryIO, size: int) -> None:
        upload_in_parts(self.start_upload(key, size), source, size)

    def start_upload(self, key: str, size: int) -> Upload:
        if size < MULTIPART_THRESHOLD:
            return _SingleUpload(self._http, self._key(key), size)
        return _MultipartUpload(self._http, self._key(key))

    def delete(self, key: str) -> None:
        with contextlib.suppress(NotFoundError):
            self._http.call("DELETE", self._key(key), "DELETE")

    def copy(self, src_key: str, dst_key: str) -> None:
        source = f"/{self.bucket}/{uri_encode(self._key(src_key), safe='/')}"
        self._http.call("PUT", self._key(dst_key), "COPY", headers={"x-amz-copy-source": source}, body=b"")


class _Empty:
    def readinto(self, buffer: memoryview) -> int:
        return 0

    def close(self) -> None:
        """Nothing was opened."""
