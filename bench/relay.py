"""A counting TCP relay on 127.0.0.1: contender <-> Relay <-> SeaweedFS, bytes counted each way.

Why: "0 bytes from the store" must be measured outside the program under test, not taken from
its own summary. The relay knows nothing of HTTP: it counts every byte on the wire (request and
response heads, listings and manifests included), so a load that fetches no checkpoint data
still shows a few KiB (see bench/README.md, "Store bytes"). SigV4 signatures stay valid because
the Host header is forwarded unchanged. Bytes move with splice(2) through a pipe, never through
Python buffers, so the relay costs little CPU; it sits in the path of every contender of a
counted workload alike.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
import time
from dataclasses import dataclass

SPLICE = 1 << 20


@dataclass(frozen=True)
class Traffic:
    sent: int  # contender -> store (request heads and uploaded bodies)
    received: int  # store -> contender (response heads and downloaded bodies)

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.sent - other.sent, self.received - other.received)


class Relay:
    """Listens on a free loopback port; every accepted connection gets its own upstream one."""

    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self._upstream = (host, upstream_port)
        self._listener = socket.create_server((host, 0))
        self.endpoint = f"http://{host}:{self._listener.getsockname()[1]}"
        self._counts = [0, 0]  # [sent, received]
        self.first_request_at: float | None = None  # time.monotonic() of the first byte a client sent
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="relay", daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()  # accept() fails, the thread ends; open pumps end with their peers

    def traffic(self) -> Traffic:
        with self._lock:
            return Traffic(*self._counts)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            done = threading.Barrier(2, action=functools.partial(_close, client, server))
            for src, dst, way in ((client, server, 0), (server, client, 1)):
                threading.Thread(target=self._pump, args=(src, dst, way, done), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: int, done: threading.Barrier) -> None:
        """One direction until EOF or an error, then half-close; the last pump closes both."""
        r, w = os.pipe()
        try:
            while n := os.splice(src.fileno(), w, SPLICE):
                with self._lock:
                    self._counts[way] += n
                    if way == 0 and self.first_request_at is None:
                        self.first_request_at = time.monotonic()
                while n:
                    n -= os.splice(r, dst.fileno(), n)
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(threading.BrokenBarrierError):
                done.wait()


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        sock.close()
