"""HTTP/1.1 framing for the fault proxy: bounded reads of heads and bodies from a socket.

Every blocking call wakes every POLL seconds to run a `check` (so stop()/pause can abort it)
and gives up after its timeout; lines, headers and trailers are bounded.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

PIECE = 64 * 1024
POLL = 0.2  # socket timeout: blocked sends/receives wake this often to notice stop()/pause
_MAX_LINE = 64 * 1024
_MAX_HEADERS = 200


class ProtocolError(Exception):
    """Malformed HTTP or a peer that closed mid-message."""


def _noop() -> None:
    pass


def send_all(sock: socket.socket, data: bytes, check: Callable[[], None], timeout: float) -> None:
    """sendall() that wakes every POLL seconds to call ``check`` and gives up after timeout."""
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


class Reader:
    """Buffered reads from a socket (whose timeout is POLL) with a bound on line length;
    ``check`` runs on every wake-up, a read waits ``timeout`` seconds at most."""

    def __init__(self, sock: socket.socket, check: Callable[[], None] = _noop, timeout: float = 30.0) -> None:
        self.sock = sock
        self.check = check
        self.timeout = timeout
        self.buf = bytearray()

    def _fill(self) -> bool:
        deadline = time.monotonic() + self.timeout
        while True:
            self.check()
            try:
                data = self.sock.recv(PIECE)
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
class Head:
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


def read_head(reader: Reader) -> Head | None:
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
            return Head(line.decode("latin-1").rstrip("\r\n"), headers)
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep:
            raise ProtocolError(f"bad header line {raw!r}")
        headers.append((name.strip(), value.strip()))
    raise ProtocolError("too many headers")


def is_interim(response: Head) -> bool:
    parts = response.start.split(" ", 2)
    return len(parts) > 1 and len(parts[1]) == 3 and parts[1].startswith("1")


def body_framing(head: Head) -> str | int:
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


def _exactly(reader: Reader, count: int, short: str) -> Iterator[bytes]:
    """`count` bytes in pieces; ProtocolError(`short`) if the stream ends first."""
    while count > 0:
        data = reader.read_some(min(count, PIECE))
        if not data:
            raise ProtocolError(short)
        count -= len(data)
        yield data


def iter_body(reader: Reader, framing: str | int, raw: bool) -> Iterator[bytes]:
    """Yield body bytes: raw framing bytes (raw=True) or decoded payload pieces (raw=False)."""
    if isinstance(framing, int):
        yield from _exactly(reader, framing, "EOF inside a Content-Length body")
    elif framing == "eof":
        while True:
            data = reader.read_some(PIECE)
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
            yield from _exactly(reader, size, "EOF inside a chunk")
            crlf = reader.readline()
            if crlf not in (b"\r\n", b"\n"):
                raise ProtocolError("missing CRLF after a chunk")
            if raw:
                yield crlf

