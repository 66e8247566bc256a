import pytest

from ckpt_agent.errors import IntegrityError, TransientError
from ckpt_agent.runtime.retry import Backoff, retry


def failing(times: int, calls: list[int]):
    def fn() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise TransientError("reset")
        return "ok"
    return fn


def test_retry_returns_once_a_transient_failure_clears():
    calls: list[int] = []
    waits: list[float] = []
    assert retry(failing(2, calls), Backoff(attempts=3), sleep=waits.append) == "ok"
    assert len(calls) == 3 and len(waits) == 2


def test_retry_gives_up_after_the_attempt_budget():
    calls: list[int] = []
    with pytest.raises(TransientError):
        retry(failing(10, calls), Backoff(attempts=4), sleep=lambda _s: None)
    assert len(calls) == 4


def test_retry_does_not_retry_errors_that_are_not_transient():
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        raise IntegrityError("bad bytes")

    with pytest.raises(IntegrityError):
        retry(fn, Backoff(attempts=5), sleep=lambda _s: None)
    assert calls == [1]


def test_retry_rewinds_before_each_new_attempt():
    calls: list[int] = []
    rewinds: list[int] = []
    retry(failing(2, calls), Backoff(attempts=3), sleep=lambda _s: None,
          before_retry=lambda: rewinds.append(len(calls)))
    assert rewinds == [1, 2]


def test_retry_waits_through_the_given_sleep_so_a_cancel_ends_it():
    class Cancelled(Exception):
        pass

    def cancelled_sleep(_seconds: float) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        retry(failing(1, []), Backoff(attempts=3), sleep=cancelled_sleep)


def test_backoff_grows_to_its_cap_with_jitter_below_the_nominal_delay():
    backoff = Backoff(attempts=10, base=0.5, cap=3.0)
    delays = [backoff.delay(n) for n in range(1, 8)]
    nominal = [0.5, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    assert all(n / 2 <= d <= n for d, n in zip(delays, nominal, strict=True))


def test_retry_on_narrows_the_retried_failures_to_one_kind():
    class BodyCut(TransientError):
        pass

    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        raise TransientError("503 after the client's own retries")

    with pytest.raises(TransientError):
        retry(fn, Backoff(attempts=5), sleep=lambda _s: None, retry_on=BodyCut)
    assert calls == [1]
    assert retry(failing(2, []), Backoff(attempts=3), sleep=lambda _s: None, retry_on=TransientError) == "ok"
