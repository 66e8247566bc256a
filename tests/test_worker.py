"""ckpt_agent.runtime.cancel.Worker: the one daemon thread whose result (or exception) the caller waits for."""

from __future__ import annotations

import signal
import threading

import pytest

from ckpt_agent.errors import Interrupted
from ckpt_agent.runtime.cancel import Cancel, Worker


def test_the_result_is_what_the_function_returned_even_none():
    worker = Worker(lambda: 42, "t")
    assert worker.join(10)
    assert worker.result() == 42
    none = Worker(lambda: None, "t")
    assert none.join(10) and none.result() is None


def test_the_functions_exception_is_raised_again_in_the_caller():
    def boom() -> None:
        raise KeyError("boom")

    worker = Worker(boom, "t")
    assert worker.join(10)
    with pytest.raises(KeyError, match="boom"):
        worker.result()


def test_asking_for_the_result_while_it_runs_is_an_error_not_a_none():
    release = threading.Event()
    worker = Worker(lambda: release.wait(10), "t")
    try:
        assert not worker.done
        with pytest.raises(RuntimeError):
            worker.result()
    finally:
        release.set()
    assert worker.join(10) and worker.result() is True


def test_cancel_call_stops_waiting_for_a_blocked_function_on_a_signal():
    release, started, finished = threading.Event(), threading.Event(), threading.Event()
    cancel = Cancel()

    def blocked() -> str:
        started.set()
        release.wait(30)
        finished.set()
        return "late"

    def signal_once_started() -> None:
        started.wait(10)
        cancel.signal(signal.SIGTERM)

    threading.Thread(target=signal_once_started, daemon=True).start()
    try:
        with pytest.raises(Interrupted):
            cancel.call(blocked, "resolving")
        assert not finished.is_set()  # it returned while the function was still blocked
    finally:
        release.set()
