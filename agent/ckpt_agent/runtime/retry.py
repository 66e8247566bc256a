"""One backoff rule and one retry loop, so every caller waits the same way and a signal ends the wait.

`retry` is the loop for every blocking retry (a small request, an upload part, a resumed download,
the sidecar's passes over an unanswering store); callers that schedule instead of waiting (the
rate limiter's pause, the sidecar's next try at a failed upload) use `Backoff.delay` alone.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ckpt_agent.errors import TransientError

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter; jitter keeps many ranks from retrying in lockstep."""

    attempts: int = 6
    base: float = 0.2
    cap: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1 is the first failure)."""
        doublings = min(attempt - 1, 64)  # past the cap long before; an endless retry must not overflow
        return min(self.cap, self.base * 2 ** doublings) * random.uniform(0.5, 1.0)


def retry(
    fn: Callable[[], T],
    backoff: Backoff,
    *,
    sleep: Callable[[float], object] = time.sleep,
    before_retry: Callable[[], None] | None = None,
    retry_on: type[TransientError] = TransientError,
    progressed: Callable[[TransientError], bool] | None = None,
) -> T:
    """Call `fn` until it returns, retrying `retry_on` up to `backoff.attempts` times in all.

    `sleep` is `Cancel.sleep` where a signal or deadline must end the wait; `before_retry` rewinds
    whatever the failed attempt consumed (an upload body, say); `retry_on` narrows the retried
    failures where a lower layer has already retried the others. `progressed(error)` says whether
    the failed attempt got further than the one before (a resumed download): then the budget starts
    again, so a long transfer on a flaky link is not given up while it advances. It may raise to stop.
    """
    if backoff.attempts < 1:
        raise ValueError(f"Backoff.attempts must be at least 1, not {backoff.attempts}")
    attempt = 0
    while True:
        try:
            return fn()
        except retry_on as exc:
            attempt = 1 if progressed is not None and progressed(exc) else attempt + 1
            if attempt >= backoff.attempts:
                raise
            sleep(backoff.delay(attempt))
            if before_retry is not None:
                before_retry()
