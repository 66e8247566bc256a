"""The native S3 engine: SigV4-signed requests over per-thread keep-alive `http.client` connections.

botocore spends milliseconds of CPU per request in its event machinery and copies every body
through urllib3; on a 2-core node that shares its CPU with the network stack, that halves
throughput. Here a request is one signature and one `readinto` straight from the socket into
our buffer. The AWS environment (credentials, region, endpoint, proxies) is read in awsenv.py.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import random
import re
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import BinaryIO

from agent.errors import AgentError, NotFoundError, TransientError
from agent.stores.awsenv import credentials_provider, proxy_for, resolve_endpoint
from agent.stores.base import Listing, RangeReader, Store, Upload, check_listing_size, too_large, upload_in_parts
from agent.stores.s3errors import content_range_size, store_error
from agent.stores.sigv4 import EMPTY_SHA256, UNSIGNED_PAYLOAD, canonical_query, sign, uri_encode

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_CODE = re.compile(rb"<Code>([^<]+)</Code>")
ATTEMPTS = 6
MULTIPART_THRESHOLD = 64 << 20
UPLOAD_PART_SIZE = 64 << 20
ANSWER_LIMIT = 16 << 20  # a LIST page or an upload answer; S3's are well under 1 MiB


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

    def __init__(self, bucket: str, env: Mapping[str, str], timeout: float) -> None:
        self._credentials, region = credentials_provider(env)
        self.bucket, self._env, self._timeout = bucket, env, timeout
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None
        self._moved(region)

    def _moved(self, region: str) -> None:
        """Point at the bucket's region (first, or after S3 said the bucket lives elsewhere)."""
        self.endpoint = resolve_endpoint(self._env, self.bucket, region)
        self._proxy = proxy_for(self._env, self.endpoint)
        # A forward proxy (plain HTTP) takes the absolute URL; an HTTPS one is reached through CONNECT.
        self._origin = f"http://{self.endpoint.host_header}" if self._proxy and self.endpoint.scheme == "http" else ""
        if self.endpoint.scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=self._env.get("AWS_CA_BUNDLE"))

    def _connect(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and conn.ckpt_endpoint is self.endpoint:
            return conn
        if conn is not None:  # kept from before the bucket's region was learnt
            conn.close()
        host, port = (self._proxy.host, self._proxy.port) if self._proxy else (self.endpoint.host, self.endpoint.port)
        if self.endpoint.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self._timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
        if self._proxy and self.endpoint.scheme == "https":
            conn.set_tunnel(self.endpoint.host, self.endpoint.port, headers=self._proxy.headers)
        conn.blocksize = 1 << 20
        conn.ckpt_endpoint = self.endpoint
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
        """Send one request; raise our error for any non-2xx answer, leaving the body to the caller.

        S3 answers a request signed for the wrong region with the bucket's region in a header
        (301 PermanentRedirect, 400): botocore follows it once, and so do we."""
        for redirected in (False, True):
            signed_for = self.endpoint.region
            response, conn = self._send(method, key, action, params, headers, body, length)
            region = response.getheader("x-amz-bucket-region")
            if redirected or response.status not in (301, 307, 400) or region in (None, signed_for):
                break
            conn.close()
            if region != self.endpoint.region:
                self._moved(region)
            if body is not None and not isinstance(body, bytes):
                body.seek(0)
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

    def _send(self, method: str, key: str, action: str, params: dict[str, str] | None,
              headers: dict[str, str] | None, body: bytes | BinaryIO | None,
              length: int | None) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        query = canonical_query(params or {})
        path = self._path(key)
        signed = sign(method, self.endpoint.host_header, path, query, self._credentials(), self.endpoint.region,
                      payload_hash=UNSIGNED_PAYLOAD if body is not None else EMPTY_SHA256,
                      extra_headers={k: v for k, v in (headers or {}).items() if k.startswith("x-amz-")})
        all_headers = {**signed, **(headers or {}), **(self._proxy.headers if self._origin else {})}
        if body is not None:
            all_headers["content-length"] = str(length if length is not None else len(body))
        conn = self._connect()
        try:
            conn.request(method, self._origin + (f"{path}?{query}" if query else path), body=body,
                         headers=all_headers)
            return conn.getresponse(), conn
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise TransientError(f"{self.where(key)}: {action} failed ({type(exc).__name__}); "
                                 "check AWS_ENDPOINT_URL, the proxy variables and the network") from None

    def call(self, method: str, key: str, action: str, **kw) -> bytes:
        """A whole small request with its body read, retried with backoff on transient errors."""
        return self.call_with_etag(method, key, action, **kw)[0]

    def call_with_etag(self, method: str, key: str, action: str, limit: int | None = ANSWER_LIMIT,
                       **kw) -> tuple[bytes, str]:
        for attempt in range(ATTEMPTS):
            try:
                response = self.request(method, key, action, **kw)
                try:
                    return _read_body(response._response, limit, key or self.where("")), \
                        response._response.getheader("ETag", "")
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


def _read_body(response: http.client.HTTPResponse, limit: int | None, key: str) -> bytes:
    """At most `limit` bytes. A declared length is checked before reading and read with read(),
    which (unlike read(n)) raises on a body cut short; a chunked one is read to limit + 1 bytes."""
    declared = response.length
    if limit is not None and declared is not None and declared > limit:
        raise too_large(key, limit)
    data = response.read() if limit is None or declared is not None else response.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise too_large(key, limit)
    return data


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
        self.bucket, self.root = bucket, root.strip("/")
        self._http = S3Http(bucket, env, read_timeout)

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.root}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        return self._http.call("GET", self._key(key), "GET", limit=limit)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._http.call("PUT", self._key(key), "PUT", body=data)

    def list_dir(self, prefix: str) -> Listing:
        full = self._key(prefix) if prefix else (self.root + "/" if self.root else "")
        files: list[str] = []
        dirs: list[str] = []
        params = {"list-type": "2", "prefix": full, "delimiter": "/"}
        for pages in itertools.count(1):
            body = self._http.call("GET", "", "LIST", params=params)
            try:
                root = ET.fromstring(body)
            except ET.ParseError:
                raise TransientError(f"{self._http.where(full)}: LIST answer is not XML") from None
            files.extend(_text(c, "Key")[len(full):] for c in root.iter(_NS + "Contents"))
            dirs.extend(_text(p, "Prefix")[len(full):].rstrip("/") for p in root.iter(_NS + "CommonPrefixes"))
            check_listing_size(full, len(files) + len(dirs) + pages)  # pages: empty ones must end too
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
