"""The native S3 engine's transport: SigV4-signed requests over per-thread keep-alive
`http.client` connections (the store on top of it is s3native.py).

botocore spends CPU per request in its event machinery and copies every body through urllib3;
on a small node that shares its CPU with the network stack, that costs throughput (the engines
compared: docs/benchmarks.md). Here a request is one signature and one `readinto` straight from the socket into
our buffer. The AWS environment (credentials, region, endpoint, proxies) is read in awsenv.py.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
from collections.abc import Mapping
from typing import Any, BinaryIO

from ckpt_agent.errors import TransientError
from ckpt_agent.runtime.retry import retry
from ckpt_agent.stores.awsenv import ca_bundle, credentials_provider, proxy_for, resolve_endpoint
from ckpt_agent.stores.base import too_large
from ckpt_agent.stores.s3common import REQUEST_BACKOFF, content_range_size, store_error
from ckpt_agent.stores.sigv4 import EMPTY_SHA256, UNSIGNED_PAYLOAD, canonical_query, sign, uri_encode

_CODE = re.compile(rb"<Code>([^<]+)</Code>")
_ENDPOINT = "ckpt_endpoint"
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
            self._ssl = ssl.create_default_context(cafile=ca_bundle(self._env))

    def _connect(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None and getattr(conn, _ENDPOINT) is self.endpoint:
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
        setattr(conn, _ENDPOINT, self.endpoint)  # a connection serves only the endpoint it was opened for
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
        all_headers = {**signed, **(headers or {}), **(self._proxy.headers if self._proxy and self._origin else {})}
        if isinstance(body, bytes):
            all_headers["content-length"] = str(len(body))
        elif body is not None:  # a stream: its caller knows the length
            all_headers["content-length"] = str(length)
        conn = self._connect()
        try:
            conn.request(method, self._origin + (f"{path}?{query}" if query else path), body=body,
                         headers=all_headers)
            return conn.getresponse(), conn
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise TransientError(f"{self.where(key)}: {action} failed ({type(exc).__name__}); "
                                 "check AWS_ENDPOINT_URL, the proxy variables and the network") from None

    def call(self, method: str, key: str, action: str, **kw: Any) -> bytes:
        """A whole small request with its body read, retried with backoff on transient errors."""
        return self.call_with_etag(method, key, action, **kw)[0]

    def call_with_etag(self, method: str, key: str, action: str, limit: int | None = ANSWER_LIMIT,
                       **kw: Any) -> tuple[bytes, str]:
        def attempt() -> tuple[bytes, str]:
            response = self.request(method, key, action, **kw)
            try:
                return _read_body(response._response, limit, key or self.where("")), \
                    response._response.getheader("ETag", "")
            except (OSError, http.client.HTTPException) as exc:
                raise TransientError(f"{self.where(key)}: {action} body failed ({type(exc).__name__})") from None
            finally:
                response.close()

        def rewind() -> None:
            body = kw.get("body")
            if body is not None and not isinstance(body, bytes):
                body.seek(0)

        return retry(attempt, REQUEST_BACKOFF, before_retry=rewind)


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
