"""A fault-injecting HTTP/1.1 proxy for tests: client (boto3) -> FaultProxy -> S3 server.

Standalone (no pytest import). Listens on 127.0.0.1 only, on a free port, and forwards to an
upstream on 127.0.0.1 only. One daemon thread per client connection.

HTTP handling:
  * Client side keeps HTTP/1.1 keep-alive: request line + headers + body (Content-Length, or
    Transfer-Encoding: chunked passed through raw). ``Expect: 100-continue`` is answered by the
    proxy itself (and the header is dropped upstream), so botocore does not wait a second.
  * Upstream side: a NEW connection per request, sent with ``Connection: close`` (no stale
    keep-alive to upstream, and a restart of upstream never poisons a pooled connection). All
    other request headers, including Host, go unchanged, so SigV4 signatures (which cover
    Host=127.0.0.1:PROXYPORT) still verify.
  * Response bodies are decoded to payload bytes: Content-Length bodies are forwarded as they
    are; chunked bodies are re-chunked (one chunk per piece received; trailers dropped); bodies
    delimited by EOF are forwarded and the client connection is then closed. Offsets, byte
    counts and faults below always refer to payload bytes, never to chunk framing.

Faults are rules (``add_rule``), matched in the order added against method, a substring of
the request target (raw or percent-decoded) and optionally "GET with a Range header". Every
matching rule counts the request as ``seen``; the first matching rule with fires left fires
(at most one fault per request) and uses up one of its ``count`` fires (``count=None``: forever;
``count=0``: never fires, a pure per-rule counter). A rule fires on match even if the body turns
out shorter than its offset; the response then passes through intact. Kinds:

  reset     RST the client connection (SO_LINGER 0) once ``offset`` payload bytes were sent;
            ``offset=0``: reset right after reading the request head, before contacting
            upstream (so e.g. a PUT never reaches the server).
  truncate  Send the headers (original Content-Length) and ``offset`` payload bytes, then FIN.
  stall     Send the headers and ``offset`` payload bytes, then send nothing for ``seconds``
            with the socket open, then FIN.
  status    Answer ``status`` (default 503) with an S3 XML error body without contacting
            upstream: 503 -> SlowDown, 500 -> InternalError, others need ``error_code``.
  corrupt   XOR 0xFF the payload byte at ``offset``; Content-Length and headers unchanged.

``pause_upstream(seconds)`` simulates a restarted server: connections in flight (and idle
keep-alive ones) are reset, and for ``seconds`` every new connection or request is reset too
(botocore reports EndpointConnectionError / ConnectionClosedError, both retryable). If the real
upstream is unreachable the client connection is reset as well.

Every blocking socket call wakes every 0.2 s to notice stop()/pause and gives up after
``timeout`` (default 30 s); stop() ends all threads within about a second.

Usage::

    server = start_seaweed(tmp)
    with FaultProxy("127.0.0.1", server.s3_port) as proxy:
        env = {**server.env(), "AWS_ENDPOINT_URL": proxy.endpoint}
        proxy.add_rule("reset", method="GET", path="ckpt/shard-0", offset=1 << 20)
        proxy.add_rule("status", path="ckpt/", status=503, count=2)
        ...run the agent with env...
        assert proxy.body_bytes("GET", "ckpt/shard-0") < 2 * SHARD_SIZE

Accounting: ``stats`` (overall), ``rule.seen / fired / body_bytes`` (per rule), and the
``exchanges`` log with ``body_bytes(method, path)`` / ``requests(method, path)`` helpers.
``body_bytes`` counts payload bytes of upstream responses that were written to the client
socket (synthetic ``status`` bodies are not counted).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from urllib.parse import unquote

LOOPBACK = "127.0.0.1"
KINDS = ("reset", "truncate", "stall", "status", "corrupt")
_PIECE = 64 * 1024
_POLL = 0.2  # socket timeout: blocked sends/receives wake this often to notice stop()/pause
_MAX_LINE = 64 * 1024
_MAX_HEADERS = 200
_MAX_REQUESTS_PER_CONNECTION = 100_000
_MAX_CONNECTIONS = 512
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection"}
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            400: "Bad Request", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests"}
_ERROR_CODES = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


class ProtocolError(Exception):
    """Malformed HTTP or a peer that closed mid-message."""


class _Killed(Exception):
    """The connection was aborted by pause_upstream() or stop()."""


@dataclass
class Rule:
    """A fault rule. Counters are updated by the proxy under its lock; read them freely."""

    kind: str
    method: str | None = None
    path: str = ""
    range_only: bool = False
    count: int | None = 1
    offset: int = 0
    seconds: float = 0.0
    status: int = 503
    error_code: str | None = None
    seen: int = 0
    fired: int = 0
    body_bytes: int = 0

    @property
    def remaining(self) -> int | None:
        return None if self.count is None else max(0, self.count - self.fired)

    def matches(self, method: str, target: str, has_range: bool) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        if self.range_only and not (method == "GET" and has_range):
            return False
        return not self.path or self.path in target or self.path in unquote(target)


@dataclass
class Exchange:
    """One request seen by the proxy."""

    method: str
    target: str
    range: str | None
    status: int | None = None
    body_bytes: int = 0
    fault: str | None = None
    outcome: str = "pending"


@dataclass
class ProxyStats:
    requests: int = 0
    body_bytes: int = 0
    connections: int = 0
    refused: int = 0
    faults: dict[str, int] = field(default_factory=dict)


def _noop() -> None:
    pass


def _send_all(sock: socket.socket, data: bytes, check, timeout: float) -> None:
    """sendall() that wakes every _POLL seconds to call ``check`` and gives up after timeout."""
    view = memoryview(data)
    deadline = time.monotonic() + timeout
    while view:
        check()
        try:
            sent = sock.send(view)
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise
            continue
        view = view[sent:]


class _Reader:
    """Buffered reads from a socket (whose timeout is _POLL) with a bound on line length;
    ``check`` runs on every wake-up, a read waits ``timeout`` seconds at most."""

    def __init__(self, sock: socket.socket, check=_noop, timeout: float = 30.0) -> None:
        self.sock = sock
        self.check = check
        self.timeout = timeout
        self.buf = bytearray()

    def _fill(self) -> bool:
        deadline = time.monotonic() + self.timeout
        while True:
            self.check()
            try:
                data = self.sock.recv(_PIECE)
                break
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
        if not data:
            return False
        self.buf += data
        return True

    def readline(self) -> bytes:
        """A line including its newline; b"" at a clean EOF before any byte."""
        start = 0
        while True:
            idx = self.buf.find(b"\n", start)
            if idx >= 0:
                line = bytes(self.buf[: idx + 1])
                del self.buf[: idx + 1]
                return line
            if len(self.buf) > _MAX_LINE:
                raise ProtocolError("header line too long")
            start = len(self.buf)
            if not self._fill():
                if self.buf:
                    raise ProtocolError("EOF in the middle of a line")
                return b""

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (at least one); b"" at EOF."""
        if not self.buf and not self._fill():
            return b""
        data = bytes(self.buf[:limit])
        del self.buf[:limit]
        return data


@dataclass
class _Head:
    start: str
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def tokens(self, name: str) -> set[str]:
        name = name.lower()
        return {t.strip().lower() for key, value in self.headers if key.lower() == name
                for t in value.split(",")}

    def encode(self, drop: set[str] = frozenset(), add: list[tuple[str, str]] = ()) -> bytes:
        lines = [self.start]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in drop]
        lines += [f"{k}: {v}" for k, v in add]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _read_head(reader: _Reader) -> _Head | None:
    line = reader.readline()
    for _ in range(4):  # RFC 9112 2.2: ignore a few empty lines before a request line
        if line not in (b"\r\n", b"\n"):
            break
        line = reader.readline()
    if not line:
        return None
    headers: list[tuple[str, str]] = []
    for _ in range(_MAX_HEADERS):
        raw = reader.readline()
        if not raw:
            raise ProtocolError("EOF inside headers")
        if raw in (b"\r\n", b"\n"):
            return _Head(line.decode("latin-1").rstrip("\r\n"), headers)
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep:
            raise ProtocolError(f"bad header line {raw!r}")
        headers.append((name.strip(), value.strip()))
    raise ProtocolError("too many headers")


def _is_interim(response: _Head) -> bool:
    parts = response.start.split(" ", 2)
    return len(parts) > 1 and len(parts[1]) == 3 and parts[1].startswith("1")


def _framing(head: _Head) -> str | int:
    """"chunked", a Content-Length, or "eof" (only meaningful for responses)."""
    if "chunked" in head.tokens("transfer-encoding"):
        return "chunked"
    length = head.get("content-length")
    if length is not None:
        try:
            value = int(length)
        except ValueError:
            raise ProtocolError(f"bad Content-Length {length!r}") from None
        if value < 0:
            raise ProtocolError(f"bad Content-Length {length!r}")
        return value
    return "eof"


def _iter_body(reader: _Reader, framing: str | int, raw: bool):
    """Yield body bytes: raw framing bytes (raw=True) or decoded payload pieces (raw=False)."""
    if isinstance(framing, int):
        remaining = framing
        while remaining > 0:
            data = reader.read_some(min(remaining, _PIECE))
            if not data:
                raise ProtocolError("EOF inside a Content-Length body")
            remaining -= len(data)
            yield data
    elif framing == "eof":
        while True:
            data = reader.read_some(_PIECE)
            if not data:
                return
            yield data
    else:
        while True:
            size_line = reader.readline()
            if not size_line:
                raise ProtocolError("EOF before a chunk size")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size line {size_line!r}") from None
            if raw:
                yield size_line
            if size == 0:
                for _ in range(_MAX_HEADERS):  # trailers up to the empty line
                    line = reader.readline()
                    if not line:
                        raise ProtocolError("EOF inside chunk trailers")
                    if raw:
                        yield line
                    if line in (b"\r\n", b"\n"):
                        return
                raise ProtocolError("too many chunk trailers")
            remaining = size
            while remaining > 0:
                data = reader.read_some(min(remaining, _PIECE))
                if not data:
                    raise ProtocolError("EOF inside a chunk")
                remaining -= len(data)
                yield data
            crlf = reader.readline()
            if crlf not in (b"\r\n", b"\n"):
                raise ProtocolError("missing CRLF after a chunk")
            if raw:
                yield crlf


def _rst_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _fin_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        sock.close()


def _wait_sent(sock: socket.socket, timeout: float = 2.0) -> None:
    """Wait (bounded) until the kernel send queue is empty, so an RST does not discard bytes
    we already counted as sent. Linux SIOCOUTQ; elsewhere a short sleep."""
    try:
        import fcntl
        import termios

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))
            if queued[0] == 0:
                return
            time.sleep(0.002)
    except (ImportError, OSError, AttributeError):
        time.sleep(0.05)


class _Conn:
    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.reader = _Reader(sock, self.check, timeout)
        self.upstream: socket.socket | None = None
        self.killed = threading.Event()
        self.lock = threading.Lock()
        self.closed = False
        self.thread: threading.Thread | None = None

    def check(self) -> None:
        if self.killed.is_set():
            raise _Killed()

    def send(self, data: bytes) -> None:
        _send_all(self.sock, data, self.check, self.timeout)

    def abort(self) -> None:
        """From another thread: wake the handler; it then resets the client connection."""
        self.killed.set()
        with self.lock:
            if self.closed:
                return
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RD)
            if self.upstream is not None:
                with contextlib.suppress(OSError):
                    self.upstream.shutdown(socket.SHUT_RDWR)

    def set_upstream(self, sock: socket.socket | None) -> None:
        with self.lock:
            old, self.upstream = self.upstream, sock
        if old is not None:
            with contextlib.suppress(OSError):
                old.close()

    def close(self, how: str) -> None:
        self.set_upstream(None)
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if how == "rst":
                _rst_close(self.sock)
            else:
                _fin_close(self.sock)


class FaultProxy:
    """See the module docstring. ``FaultProxy(LOOPBACK, server.s3_port)``."""

    def __init__(self, upstream_host: str, upstream_port: int, *, timeout: float = 30.0) -> None:
        if upstream_host not in (LOOPBACK, "localhost"):
            raise ValueError("FaultProxy only forwards to 127.0.0.1")
        self.upstream = (LOOPBACK, int(upstream_port))
        self.timeout = timeout
        self.port: int | None = None
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._stats = ProxyStats()
        self._exchanges: list[Exchange] = []
        self._conns: set[_Conn] = set()
        self._paused_until = 0.0
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("FaultProxy not started")
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> FaultProxy:
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, 0))
        listener.listen(128)
        listener.settimeout(0.1)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._stopping.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True,
                                               name=f"faultproxy-accept-{self.port}")
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(5)
            self._accept_thread = None
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.abort()
        deadline = time.monotonic() + 5
        for conn in conns:
            if conn.thread is not None:
                conn.thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- rules and accounting --------------------------------------------------------------

    def add_rule(self, kind: str, *, method: str | None = None, path: str = "",
                 range_only: bool = False, count: int | None = 1, offset: int = 0,
                 seconds: float = 0.0, status: int = 503, error_code: str | None = None) -> Rule:
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {KINDS}")
        if offset < 0 or seconds < 0 or (count is not None and count < 0):
            raise ValueError("offset, seconds and count must be >= 0")
        if kind == "status" and error_code is None and status not in _ERROR_CODES:
            raise ValueError(f"status {status} needs an error_code")
        rule = Rule(kind, method.upper() if method else None, path, range_only, count, offset,
                    seconds, status, error_code)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove_rule(self, rule: Rule) -> None:
        with self._lock:
            self._rules = [r for r in self._rules if r is not rule]

    def clear(self) -> None:
        """Remove all rules (counters and the exchange log stay; see reset_stats)."""
        with self._lock:
            self._rules = []

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = ProxyStats()
            self._exchanges = []

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    @property
    def stats(self) -> ProxyStats:
        with self._lock:
            return replace(self._stats, faults=dict(self._stats.faults))

    @property
    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return [replace(e) for e in self._exchanges]

    def _select(self, method: str | None, path: str) -> list[Exchange]:
        probe = Rule("reset", method.upper() if method else None, path)
        return [e for e in self.exchanges if probe.matches(e.method, e.target, e.range is not None)]

    def requests(self, method: str | None = None, path: str = "") -> int:
        """How many requests matched ``method`` and the target substring ``path``."""
        return len(self._select(method, path))

    def body_bytes(self, method: str | None = None, path: str = "") -> int:
        """Response payload bytes forwarded to the client for the matching requests."""
        return sum(e.body_bytes for e in self._select(method, path))

    # ---- upstream restart ------------------------------------------------------------------

    def pause_upstream(self, seconds: float, *, drop_active: bool = True) -> None:
        """Act as if the server restarted: reset current client connections (drop_active) and,
        for ``seconds``, reset every new connection and every new request."""
        with self._lock:
            self._paused_until = time.monotonic() + seconds
            conns = list(self._conns) if drop_active else []
        for conn in conns:
            conn.abort()

    def resume_upstream(self) -> None:
        with self._lock:
            self._paused_until = 0.0

    @property
    def paused(self) -> bool:
        return time.monotonic() < self._paused_until

    # ---- internals -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(_POLL)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._stats.connections += 1
                refuse = self.paused or len(self._conns) >= _MAX_CONNECTIONS
                if refuse:
                    self._stats.refused += 1
                else:
                    conn = _Conn(sock, self.timeout)
                    self._conns.add(conn)
            if refuse:
                _rst_close(sock)
                continue
            conn.thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                           name=f"faultproxy-conn-{self.port}")
            conn.thread.start()

    def _serve(self, conn: _Conn) -> None:
        how = "rst"
        try:
            for _ in range(_MAX_REQUESTS_PER_CONNECTION):
                try:
                    head = _read_head(conn.reader)
                except TimeoutError:
                    if conn.reader.buf:
                        raise
                    how = "fin"  # idle keep-alive connection: close it like a server would
                    break
                conn.check()
                if head is None:
                    how = "fin"
                    break
                how = self._handle(conn, head)
                if how != "keep":
                    break
            else:
                how = "fin"
        except (_Killed, ProtocolError, OSError):
            how = "rst"
        finally:
            if conn.killed.is_set():
                how = "rst"
            conn.close("fin" if how == "keep" else how)
            with self._lock:
                self._conns.discard(conn)

    def _match(self, method: str, target: str, has_range: bool) -> tuple[Rule | None, list[Rule]]:
        fired = None
        matched = []
        for rule in self._rules:
            if rule.matches(method, target, has_range):
                rule.seen += 1
                matched.append(rule)
                if fired is None and (rule.count is None or rule.fired < rule.count):
                    rule.fired += 1
                    fired = rule
        if fired is not None:
            self._stats.faults[fired.kind] = self._stats.faults.get(fired.kind, 0) + 1
        return fired, matched

    def _count_bytes(self, record: Exchange, matched: list[Rule], n: int) -> None:
        with self._lock:
            record.body_bytes += n
            self._stats.body_bytes += n
            for rule in matched:
                rule.body_bytes += n

    def _handle(self, conn: _Conn, head: _Head) -> str:
        """Serve one request; return "keep", "fin" or "rst" for the client connection."""
        parts = head.start.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ProtocolError(f"bad request line {head.start!r}")
        method, target, version = parts[0].upper(), parts[1], parts[2]
        keep_alive = version == "HTTP/1.1" and "close" not in head.tokens("connection")
        range_value = head.get("range")
        with self._lock:
            paused = self.paused
            rule, matched = (None, []) if paused else self._match(method, target,
                                                                  range_value is not None)
            record = Exchange(method, target, range_value, fault=rule.kind if rule else None)
            self._stats.requests += 1
            if len(self._exchanges) < 100_000:
                self._exchanges.append(record)
        if paused:
            record.outcome = "paused-reset"
            return "rst"
        if rule is not None and rule.kind == "reset" and rule.offset == 0:
            record.outcome = "reset-before-response"
            return "rst"
        request_framing = _framing(head)
        if request_framing == "eof":
            request_framing = 0  # a request without a length has no body
        if "100-continue" in head.tokens("expect") and request_framing != 0:
            conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")

        if rule is not None and rule.kind == "status":
            for _ in _iter_body(conn.reader, request_framing, raw=True):
                conn.check()
            return self._send_status(conn, rule, method, target, keep_alive, record)

        try:
            upstream = socket.create_connection(self.upstream, timeout=self.timeout)
        except OSError:
            record.outcome = "upstream-unreachable"
            return "rst"
        conn.set_upstream(upstream)
        conn.check()
        upstream.settimeout(_POLL)
        up_reader = _Reader(upstream, conn.check, self.timeout)
        try:
            _send_all(upstream, head.encode(drop=_HOP_BY_HOP | {"expect"},
                                            add=[("Connection", "close")]),
                      conn.check, self.timeout)
            for data in _iter_body(conn.reader, request_framing, raw=True):
                _send_all(upstream, data, conn.check, self.timeout)
            response = _read_head(up_reader)
            for _ in range(16):  # skip interim 1xx responses: we answered 100 ourselves
                if response is None or not _is_interim(response):
                    break
                response = _read_head(up_reader)
        except (ProtocolError, OSError):
            conn.check()
            record.outcome = "upstream-error"
            return "rst"
        if response is None:
            record.outcome = "upstream-closed"
            return "rst"
        status_parts = response.start.split(" ", 2)
        try:
            status = int(status_parts[1])
        except (IndexError, ValueError):
            raise ProtocolError(f"bad status line {response.start!r}") from None
        record.status = status

        bodiless = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        framing = 0 if bodiless else _framing(response)
        if framing == "eof":
            keep_alive = False
        add = [] if keep_alive else [("Connection", "close")]
        conn.send(response.encode(drop=_HOP_BY_HOP, add=add))
        try:
            return self._send_body(conn, rule, matched, _iter_body(up_reader, framing, raw=False),
                                   framing == "chunked", keep_alive, record)
        finally:
            conn.set_upstream(None)

    def _send_body(self, conn: _Conn, rule: Rule | None, matched: list[Rule], pieces,
                   chunked: bool, keep_alive: bool, record: Exchange) -> str:
        cut = rule.offset if rule is not None and rule.kind in ("reset", "truncate",
                                                                "stall") else None
        flip = rule.offset if rule is not None and rule.kind == "corrupt" else None
        sent = 0
        try:
            for piece in pieces:
                conn.check()
                if not piece:
                    continue
                if flip is not None and sent <= flip < sent + len(piece):
                    mutable = bytearray(piece)
                    mutable[flip - sent] ^= 0xFF
                    piece = bytes(mutable)
                    record.outcome = "corrupted"
                stop_here = cut is not None and sent + len(piece) >= cut
                if stop_here:
                    piece = piece[: cut - sent]
                if piece:
                    conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    sent += len(piece)
                    self._count_bytes(record, matched, len(piece))
                if stop_here:
                    return self._cut(conn, rule, record)
        except ProtocolError:
            conn.check()
            record.outcome = "upstream-broke-mid-body"
            return "rst"
        if chunked:
            conn.send(b"0\r\n\r\n")
        if record.outcome == "pending":
            record.outcome = "ok" if rule is None or rule.kind == "corrupt" else "body-too-short"
        return "keep" if keep_alive else "fin"

    def _cut(self, conn: _Conn, rule: Rule, record: Exchange) -> str:
        if rule.kind == "reset":
            _wait_sent(conn.sock)
            record.outcome = "reset"
            return "rst"
        if rule.kind == "stall":
            record.outcome = "stalled"
            if conn.killed.wait(rule.seconds) or self._stopping.is_set():
                return "rst"
            return "fin"
        record.outcome = "truncated"
        return "fin"

    def _send_status(self, conn: _Conn, rule: Rule, method: str, target: str, keep_alive: bool,
                     record: Exchange) -> str:
        code, message = _ERROR_CODES.get(rule.status, (rule.error_code, "Injected fault."))
        if rule.error_code is not None:
            code = rule.error_code
        resource = target.split("?", 1)[0]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{resource}</Resource><RequestId>faultproxy</RequestId></Error>"
        ).encode()
        reason = _REASONS.get(rule.status, "Error")
        lines = [f"HTTP/1.1 {rule.status} {reason}", "Content-Type: application/xml",
                 f"Content-Length: {len(body)}", "x-amz-request-id: faultproxy",
                 "Server: faultproxy"]
        if not keep_alive:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode()
        conn.send(data if method == "HEAD" else data + body)
        record.status = rule.status
        record.outcome = "status"
        return "keep" if keep_alive else "fin"
