"""Two limits every transfer thread passes through: bytes per second, and requests at once.

`TokenBucket` caps the bytes all threads move together (CKPT_AGENT_MAX_RATE); `paced()` puts it in
front of a body stream and returns the stream itself when there is no cap, so an uncapped transfer
pays nothing. `ConcurrencyGate` lets at most `limit` requests run at once and moves that limit the
way TCP moves its window (additive increase, multiplicative decrease): a ThrottledError halves it,
pauses new requests for a backoff, and each window of successes adds one back up to the workers.
The pool's threads stay as they are; only how many of them are inside a request changes.
`Limiter` carries both through a transfer: one per load and one per upload, bound to its Cancel.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from ckpt_agent.errors import ThrottledError
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.runtime.retry import Backoff

Clock = Callable[[], float]
Sleep = Callable[[float], None]

BURST_SECONDS = 0.25  # the most a cap lets through at once, in seconds of its rate
GATE_BACKOFF = Backoff(base=0.5, cap=10.0)  # the whole pool's pause after the store said slow down


class TokenBucket:
    """A byte-rate cap shared by threads. Callers reserve bytes before moving them and wait their
    turn; the reservation is made under the lock and the wait outside it, so waits queue in order.

    Over any window of w seconds the bytes granted are at most `burst + rate * w` when no take is
    larger than the burst (`paced` reads in such pieces): the cap holds over short windows, not just
    on average. A larger take waits for all of it. `sleep` is `Cancel.sleep`: a signal ends a wait.
    """

    def __init__(self, rate: float, sleep: Sleep, *, burst: float | None = None,
                 clock: Clock = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate * BURST_SECONDS)
        self._sleep, self._clock = sleep, clock
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._stamp = clock()

    def take(self, n: int) -> None:
        """Block until `n` more bytes fit under the cap; a take larger than the burst waits it out."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate) - n
            self._stamp = now
            due = now - self._tokens / self.rate if self._tokens < 0 else now
        while (left := due - self._clock()) > 0:
            self._sleep(left)

    def refund(self, n: int) -> None:
        """Give back bytes reserved but not moved (a short read)."""
        with self._lock:
            self._tokens = min(self.burst, self._tokens + n)


class _Paced:
    """A body stream whose reads pass through a TokenBucket; everything else goes to the stream."""

    def __init__(self, raw: Any, bucket: TokenBucket) -> None:
        self._raw, self._bucket = raw, bucket
        self._piece = max(1, int(bucket.burst))

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """A short read of at most one burst; the callers' read loops ask again for the rest."""
        view = memoryview(buffer)[: self._piece]
        self._bucket.take(len(view))
        n = self._raw.readinto(view) or 0
        if n < len(view):
            self._bucket.refund(len(view) - n)
        return n

    def fileno(self) -> int:
        """No fd: a caller holding one would read around the cap (os.pread, copy_file_range), so
        it falls back to read()."""
        raise io.UnsupportedOperation("a paced stream is read through read()")

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            data = self._raw.read()
            self._bucket.take(len(data))
            return data
        size = min(size, self._piece)
        self._bucket.take(size)
        data = self._raw.read(size)
        if len(data) < size:
            self._bucket.refund(size - len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def paced(raw: Any, bucket: TokenBucket | None) -> Any:
    """`raw` read under the cap: a store's range reader, or an upload body. No cap: `raw` itself."""
    return raw if bucket is None else _Paced(raw, bucket)


@dataclass
class Aimd:
    """The permitted concurrency as a pure state machine, so its rules are tested without threads.

    A throttle only cuts if its request started after the last cut (`epoch`): the requests already
    in flight when the store pushed back answer for the same overload, and must not cut again.
    """

    ceiling: int
    backoff: Backoff = GATE_BACKOFF
    limit: int = field(init=False)
    epoch: int = 0
    hold_until: float = 0.0
    _successes: int = 0
    _cuts_in_a_row: int = 0

    def __post_init__(self) -> None:
        if self.ceiling < 1:
            raise ValueError(f"ceiling must be at least 1, not {self.ceiling}")
        self.limit = self.ceiling

    def throttled(self, started_epoch: int, now: float) -> bool:
        """True when this throttle cut the limit (it is the first since its request started)."""
        if started_epoch != self.epoch:
            return False
        self.limit = max(1, self.limit // 2)
        self.epoch += 1
        self._successes = 0
        self._cuts_in_a_row += 1
        self.hold_until = now + self.backoff.delay(self._cuts_in_a_row)
        return True

    def succeeded(self) -> None:
        """One more success; a full window of them (as many as the limit) raises the limit by one."""
        if self.limit >= self.ceiling:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self.limit += 1
            self._successes = 0
            self._cuts_in_a_row = 0


class ConcurrencyGate:
    """`with gate.slot(): request()` in each worker thread: waits while `limit` requests are in
    flight or the pool is paused after a throttle. `check` is `Cancel.check`: a signal or the
    deadline ends a wait by raising, within `poll` seconds. `on_cut(limit)` hears of every cut,
    outside the lock, so the user learns once per cut that the store pushed back."""

    def __init__(self, workers: int, *, check: Callable[[], None] = lambda: None, clock: Clock = time.monotonic,
                 backoff: Backoff = GATE_BACKOFF, poll: float = 0.05,
                 on_cut: Callable[[int], None] = lambda limit: None) -> None:
        self._aimd = Aimd(workers, backoff)
        self._check, self._clock, self._poll, self._on_cut = check, clock, poll, on_cut
        self._cond = threading.Condition()
        self.active = 0
        self.waiting = 0

    @property
    def limit(self) -> int:
        return self._aimd.limit

    @property
    def cuts(self) -> int:
        """How many times a throttle has cut the limit."""
        return self._aimd.epoch

    @contextmanager
    def slot(self) -> Iterator[None]:
        epoch = self._enter()
        try:
            yield
        except ThrottledError:
            cut = self._leave(lambda: self._aimd.throttled(epoch, self._clock()))
            if cut:
                self._on_cut(self.limit)
            raise
        except BaseException:
            self._leave(lambda: None)
            raise
        self._leave(self._aimd.succeeded)

    def _enter(self) -> int:
        with self._cond:
            self.waiting += 1
            try:
                while True:
                    self._check()
                    pause = self._aimd.hold_until - self._clock()
                    if pause <= 0 and self.active < self._aimd.limit:
                        self.active += 1
                        return self._aimd.epoch
                    self._cond.wait(min(self._poll, pause) if pause > 0 else self._poll)
            finally:
                self.waiting -= 1

    def _leave(self, outcome: Callable[[], bool | None]) -> bool | None:
        with self._cond:
            self.active -= 1
            result = outcome()
            self._cond.notify_all()
            return result


@dataclass(frozen=True)
class Limiter:
    """What every request of one transfer passes through: the byte cap (None: none) and the gate
    (None: requests at once are only bounded by the pool)."""

    bucket: TokenBucket | None = None
    gate: ConcurrencyGate | None = None

    def slot(self) -> AbstractContextManager[None]:
        return self.gate.slot() if self.gate is not None else nullcontext()

    def paced(self, raw: Any) -> Any:
        return paced(raw, self.bucket)


NO_LIMITS = Limiter()


def limiter(max_rate: int | None, workers: int, cancel: Cancel, tell: Callable[..., None]) -> Limiter:
    """The limits of one load or one upload: CKPT_AGENT_MAX_RATE (None: no cap) and a gate whose
    ceiling is the workers. `tell` is `Reporter.info`: it hears of each cut once."""

    def cut(limit: int) -> None:
        tell(f"store asked to slow down: {limit} request{'s' if limit > 1 else ''} at once",
             event="throttled", requests=limit)

    bucket = TokenBucket(max_rate, cancel.sleep) if max_rate else None
    return Limiter(bucket, ConcurrencyGate(workers, check=cancel.check, on_cut=cut))
