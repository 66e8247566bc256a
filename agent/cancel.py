"""One cancellation token shared by every worker: a signal or the overall deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from agent.errors import Interrupted, LoadTimeoutError

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
        box: dict = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc

        thread = threading.Thread(target=target, daemon=True, name="ckpt-cancellable")
        thread.start()
        while thread.is_alive() and not self.is_set:
            thread.join(0.1)
        if "error" in box:
            raise box["error"]
        if "value" in box:
            return box["value"]
        try:
            self.check()
        except LoadTimeoutError as exc:
            raise LoadTimeoutError(f"{exc}; {pending}") from None
        raise AssertionError("unreachable: cancelled without a signal or a deadline")
