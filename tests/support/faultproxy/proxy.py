"""FaultProxy: accepts client connections on 127.0.0.1 and forwards each request upstream,
applying the Ledger's fault rules to the response on the way back."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from tests.support.faultproxy.conn import Conn, Killed, rst_close, wait_sent
from tests.support.faultproxy.ledger import Exchange, Ledger, Rule, status_response
from tests.support.faultproxy.wire import (
    POLL,
    Head,
    ProtocolError,
    Reader,
    body_framing,
    is_interim,
    iter_body,
    read_head,
    send_all,
)

LOOPBACK = "127.0.0.1"
_MAX_REQUESTS_PER_CONNECTION = 100_000
_MAX_CONNECTIONS = 512
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection"}


class FaultProxy(Ledger):
    """See the package docstring. ``FaultProxy(LOOPBACK, server.s3_port)``."""

    def __init__(self, upstream_host: str, upstream_port: int, *, timeout: float = 30.0) -> None:
        if upstream_host not in (LOOPBACK, "localhost"):
            raise ValueError("FaultProxy only forwards to 127.0.0.1")
        super().__init__()
        self.upstream = (LOOPBACK, int(upstream_port))
        self.timeout = timeout
        self.port: int | None = None
        self._conns: set[Conn] = set()
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
            sock.settimeout(POLL)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._stats.connections += 1
                refuse = self.paused or len(self._conns) >= _MAX_CONNECTIONS
                if refuse:
                    self._stats.refused += 1
                else:
                    conn = Conn(sock, self.timeout)
                    self._conns.add(conn)
            if refuse:
                rst_close(sock)
                continue
            conn.thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                           name=f"faultproxy-conn-{self.port}")
            conn.thread.start()

    def _serve(self, conn: Conn) -> None:
        how = "rst"
        try:
            for _ in range(_MAX_REQUESTS_PER_CONNECTION):
                try:
                    head = read_head(conn.reader)
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
        except (Killed, ProtocolError, OSError):
            how = "rst"
        finally:
            if conn.killed.is_set():
                how = "rst"
            conn.close("fin" if how == "keep" else how)
            with self._lock:
                self._conns.discard(conn)

    def _handle(self, conn: Conn, head: Head) -> str:
        """Serve one request; return "keep", "fin" or "rst" for the client connection."""
        parts = head.start.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ProtocolError(f"bad request line {head.start!r}")
        method, target, version = parts[0].upper(), parts[1], parts[2]
        keep_alive = version == "HTTP/1.1" and "close" not in head.tokens("connection")
        paused = self.paused
        rule, matched, record = self._begin(method, target, head.get("range"), paused)
        if paused:
            record.outcome = "paused-reset"
            return "rst"
        if rule is not None and rule.kind == "reset" and rule.offset == 0:
            record.outcome = "reset-before-response"
            return "rst"
        request_framing = body_framing(head)
        if request_framing == "eof":
            request_framing = 0  # a request without a length has no body
        if "100-continue" in head.tokens("expect") and request_framing != 0:
            conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")

        if rule is not None and rule.kind == "status":
            for _ in iter_body(conn.reader, request_framing, raw=True):
                conn.check()
            conn.send(status_response(rule, method, target, keep_alive))
            record.status = rule.status
            record.outcome = "status"
            return "keep" if keep_alive else "fin"
        return self._forward(conn, head, request_framing, rule, matched, keep_alive, record)

    def _forward(self, conn: Conn, head: Head, request_framing: int | str, rule: Rule | None,
                 matched: list[Rule], keep_alive: bool, record: Exchange) -> str:
        """Send the request upstream on a new connection; relay the response, faults applied."""
        try:
            upstream = socket.create_connection(self.upstream, timeout=self.timeout)
        except OSError:
            record.outcome = "upstream-unreachable"
            return "rst"
        conn.set_upstream(upstream)
        conn.check()
        upstream.settimeout(POLL)
        up_reader = Reader(upstream, conn.check, self.timeout)
        try:
            send_all(upstream, head.encode(drop=_HOP_BY_HOP | {"expect"},
                                            add=[("Connection", "close")]),
                      conn.check, self.timeout)
            for data in iter_body(conn.reader, request_framing, raw=True):
                send_all(upstream, data, conn.check, self.timeout)
                self._count_sent(record, len(data))
            response = read_head(up_reader)
            for _ in range(16):  # skip interim 1xx responses: we answered 100 ourselves
                if response is None or not is_interim(response):
                    break
                response = read_head(up_reader)
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

        bodiless = record.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        framing = 0 if bodiless else body_framing(response)
        if framing == "eof":
            keep_alive = False
        add = [] if keep_alive else [("Connection", "close")]
        conn.send(response.encode(drop=_HOP_BY_HOP, add=add))
        try:
            return self._send_body(conn, rule, matched, iter_body(up_reader, framing, raw=False),
                                   framing == "chunked", keep_alive, record)
        finally:
            conn.set_upstream(None)

    def _send_body(self, conn: Conn, rule: Rule | None, matched: list[Rule], pieces: Iterator[bytes],
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
                    # counted first: the client may act on these bytes before send() returns here
                    self._count_bytes(record, matched, len(piece))
                    try:
                        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    except BaseException:
                        self._count_bytes(record, matched, -len(piece))
                        raise
                    sent += len(piece)
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

    def _cut(self, conn: Conn, rule: Rule, record: Exchange) -> str:
        if rule.kind == "reset":
            wait_sent(conn.sock)
            record.outcome = "reset"
            return "rst"
        if rule.kind == "stall":
            record.outcome = "stalled"
            if conn.killed.wait(rule.seconds) or self._stopping.is_set():
                return "rst"
            return "fin"
        record.outcome = "truncated"
        return "fin"

