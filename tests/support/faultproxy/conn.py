"""One client connection of the fault proxy, and the two ways to end it: RST or FIN.

Another thread may abort() a connection (pause_upstream, stop); the handler notices on its next
wake-up through check() and resets the client.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

from tests.support.faultproxy.wire import Reader, send_all


class Killed(Exception):
    """The connection was aborted by pause_upstream() or stop()."""


def rst_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def fin_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    with contextlib.suppress(OSError):
        sock.close()


def wait_sent(sock: socket.socket, timeout: float = 2.0) -> None:
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


class Conn:
    """A client connection and, while a request is forwarded, its upstream socket."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.reader = Reader(sock, self.check, timeout)
        self.upstream: socket.socket | None = None
        self.killed = threading.Event()
        self.lock = threading.Lock()
        self.closed = False
        self.thread: threading.Thread | None = None

    def check(self) -> None:
        if self.killed.is_set():
            raise Killed()

    def send(self, data: bytes) -> None:
        send_all(self.sock, data, self.check, self.timeout)

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
                rst_close(self.sock)
            else:
                fin_close(self.sock)
