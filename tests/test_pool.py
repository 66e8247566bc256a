"""The worker pool runs every task, bounds concurrency, and never swallows a failure."""

from __future__ import annotations

import threading
import time

import pytest

from ckpt_agent.errors import Interrupted
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.runtime.pool import run_tasks


def test_every_task_runs_with_exactly_the_given_number_at_once():
    workers = 4
    meet = threading.Barrier(workers, timeout=10)  # broken (and the pool fails) unless 4 run at once
    running, peak, done = [0], [0], []
    lock = threading.Lock()

    def task(i: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if i < workers:  # the pool takes tasks in order: the first ones are on every worker at once
            meet.wait()
        with lock:
            running[0] -= 1
            done.append(i)

    run_tasks((lambda i=i: task(i) for i in range(40)), workers, Cancel())
    assert sorted(done) == list(range(40)) and peak[0] == workers


def test_a_failing_task_stops_new_tasks_and_its_error_reaches_the_caller():
    started = []

    def task(i: int) -> None:
        started.append(i)
        if i == 3:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_tasks((lambda i=i: task(i) for i in range(1000)), 1, Cancel())
    assert started == [0, 1, 2, 3]


def test_an_error_raised_by_the_task_source_reaches_the_caller():
    def source():
        yield lambda: None
        raise OSError("the source failed")

    with pytest.raises(OSError, match="the source failed"):
        run_tasks(source(), 3, Cancel())


def test_a_signal_returns_at_once_even_while_a_task_is_blocked():
    cancel = Cancel()
    release = threading.Event()
    threading.Timer(0.1, cancel.signal, args=(15,)).start()
    started = time.monotonic()
    with pytest.raises(Interrupted) as info:
        run_tasks(iter([release.wait]), 1, cancel)
    release.set()
    assert time.monotonic() - started < 2 and info.value.exit_code == 143
