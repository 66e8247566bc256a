"""Keep-alive `http.client` connections, one per thread and origin, through the proxy the
environment names: the one transport of the native S3 engine (s3http.py) and of Baseten's training
API and its presigned URLs (baseten.py).

A response's body is read straight into the caller's buffer (`readinto`); its connection goes back
to its thread only when the body was read to the end, so a connection cut short never serves the
next request.
"""

from __future__ import annotations

import http.client
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

from ckpt_agent.errors import TransientError
from ckpt_agent.stores.awsenv import Endpoint, Proxy, host_header, proxy_for
from ckpt_agent.stores.base import too_large
from ckpt_agent.stores.s3common import content_range_size

ANSWER_LIMIT = 16 << 20  # a LIST page, an upload answer, an API page; S3's are well under 1 MiB


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        return host_header(self.host, self.port)

    @classmethod
    def of(cls, endpoint: Endpoint) -> Origin:
        return cls(endpoint.scheme, endpoint.host, endpoint.port)


def split_url(url: str) -> tuple[Origin, str]:
    """(origin, path?query) of an http(s) URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, parts.hostname, port), target


class Answer:
    """A streaming response body."""

    def __init__(self, pool: Connections, origin: Origin, conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse) -> None:
        self._pool, self._origin, self._conn, self.response = pool, origin, conn, response

    @property
    def status(self) -> int:
        return self.response.status

    def header(self, name: str, default: str = "") -> str:
        return self.response.getheader(name, default) or default

    def readinto(self, buffer: memoryview) -> int:
        try:
            return self.response.readinto(buffer)
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise TransientError(f"connection failed mid-body ({type(exc).__name__})") from None

    @property
    def object_size(self) -> int | None:
        """The whole object's size from `Content-Range: bytes a-b/size`, so a caller can tell that the
        object is not the one it expects even when the bytes it asked for are there."""
        return content_range_size(self.response.getheader("Content-Range"))

    def read_all(self, limit: int | None, shown: str) -> bytes:
        """The whole body, at most `limit` bytes. A declared length is checked before reading and read with
        read(), which (unlike read(n)) raises on a body cut short; a chunked one is read to limit + 1."""
        declared = self.response.length
        if limit is not None and declared is not None and declared > limit:
            raise too_large(shown, limit)
        data = self.response.read() if limit is None or declared is not None else self.response.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise too_large(shown, limit)
        return data

    def discard(self, limit: int = 64 << 10) -> bytes:
        """Up to `limit` bytes of an error answer; the connection is not reused."""
        try:
            return self.response.read(limit)
        except (OSError, http.client.HTTPException):
            return b""
        finally:
            self._conn.close()

    def close(self) -> None:
        # http.client also marks a body cut short (EOF before Content-Length) as closed, with
        # `length` still > 0: that connection is dead and must not serve the next request.
        complete = self.response.isclosed() and not self.response.length
        if complete and not self.response.will_close:
            self._pool.release(self._origin, self._conn)
        else:
            self._conn.close()


class Connections:
    """Per-thread keep-alive connections; `cafile`: the certificates to trust for https (None: the system's)."""

    def __init__(self, env: Mapping[str, str], timeout: float, cafile: str | None = None) -> None:
        self._env, self._timeout, self._cafile = env, timeout, cafile
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None
        self._proxies: dict[Origin, Proxy | None] = {}

    def _kept(self) -> dict[Origin, http.client.HTTPConnection]:
        kept = getattr(self._local, "conns", None)
        if kept is None:
            kept = self._local.conns = {}
        return kept

    def _connect(self, origin: Origin) -> http.client.HTTPConnection:
        conn = self._kept().pop(origin, None)
        if conn is not None:
            return conn
        proxy = self._proxy(origin)
        host, port = (proxy.host, proxy.port) if proxy else (origin.host, origin.port)
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context(cafile=self._cafile)
            conn = http.client.HTTPSConnection(host, port, timeout=self._timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
        if proxy and origin.scheme == "https":
            conn.set_tunnel(origin.host, origin.port, headers=proxy.headers)
        conn.blocksize = 1 << 20
        return conn

    def _proxy(self, origin: Origin) -> Proxy | None:
        if origin not in self._proxies:
            self._proxies[origin] = proxy_for(self._env, Endpoint(origin.scheme, origin.host, origin.port, True, ""))
        return self._proxies[origin]

    def release(self, origin: Origin, conn: http.client.HTTPConnection) -> None:
        old = self._kept().pop(origin, None)
        if old is not None:
            old.close()
        self._kept()[origin] = conn

    def send(self, origin: Origin, method: str, target: str, headers: Mapping[str, str],
             body: bytes | BinaryIO | None = None) -> Answer:
        """One request; OSError and http.client's errors (the caller words them) leave no connection behind.

        A forward proxy (plain http) takes the absolute URL and its own headers; an https origin is
        reached through CONNECT."""
        proxy = self._proxy(origin) if origin.scheme == "http" else None
        if proxy is not None:
            target, headers = f"http://{origin.host_header}{target}", {**headers, **proxy.headers}
        conn = self._connect(origin)
        try:
            conn.request(method, target, body=body, headers=dict(headers))
            return Answer(self, origin, conn, conn.getresponse())
        except BaseException:
            conn.close()
            raise
