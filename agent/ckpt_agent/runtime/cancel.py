"""One cancellation token shared by every worker (a signal or the overall deadline), and the one
daemon thread whose result the caller waits for while it watches for signals."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from ckpt_agent.errors import Interrupted, LoadTimeoutError

T = TypeVar("T")


class Cancel:
    def __init__(self, timeout: float | None = None) -> None:
        self._event = threading.Event()
        self._signum: int | None = None
        self._deadline = time.monotonic() + timeout if timeout else None
        self._timeout = timeout

    def signal(self, signum: int) -> None:
        """Safe to call from a signal handler."""
        self._signum = signum
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set() or self._expired()

    def _expired(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def check_signal(self) -> None:
        if self._signum is not None:
            raise Interrupted(self._signum)

    def check(self) -> None:
        self.check_signal()
        if self._expired():
            raise LoadTimeoutError(f"BT_LOAD_TIMEOUT: {self._timeout:g} s passed")

    def sleep(self, seconds: float) -> None:
        """Sleep that wakes at once when cancelled; raises if it was."""
        if self._deadline is not None:
            seconds = max(0.0, min(seconds, self._deadline - time.monotonic()))
        self._event.wait(seconds)
        self.check()

    def call(self, fn: Callable[[], T], pending: str) -> T:
        """Run `fn` on a daemon thread and return its result, or raise as soon as we are cancelled.

        For work that does not check the token itself (resolving reads the store with blocking
        requests): a signal or the deadline ends the wait at once, and the thread dies with the
        process. `pending` says what was left undone, for the timeout message.
        """
        worker = Worker(fn, "ckpt-cancellable")
        while not worker.done and not self.is_set:
            worker.join(0.1)
        if worker.done:
            return worker.result()
        try:
            self.check()
        except LoadTimeoutError as exc:
            raise LoadTimeoutError(f"{exc}; {pending}") from None
        raise AssertionError("unreachable: cancelled without a signal or a deadline")


class Worker(Generic[T]):
    """`fn` on a daemon thread, its return value or exception kept for the caller.

    The main thread stays free to notice signals and deadlines (it joins in short steps); a
    worker that never returns dies with the process."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._fn = fn
        self._value: list[T] = []  # a box: T may itself be None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value.append(self._fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._error = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, seconds: float) -> bool:
        """Wait up to `seconds`; True once `fn` has returned or raised."""
        self._thread.join(seconds)
        return self.done

    def result(self) -> T:
        """What `fn` returned, or its exception raised again; only once done."""
        if not self.done:
            raise RuntimeError("Worker.result() before the worker finished")
        if self._error is not None:
            raise self._error
        return self._value[0]
