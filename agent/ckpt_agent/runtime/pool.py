"""The one bounded worker pool; it knows nothing about stores: it runs `task() -> None`.

Daemon threads, so a signal can end the process at once even while a worker sits in a socket
read; the first failure stops new tasks from starting and is re-raised in the caller. `map_tasks`
is the same pool for work that returns a value (the store's small reads, verify's file checks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TypeVar

from ckpt_agent.runtime.cancel import Cancel

Task = Callable[[], None]
T = TypeVar("T")
R = TypeVar("R")

READ_WORKERS = 16  # small store reads at once (manifests, job records): each is one round trip


def run_tasks(tasks: Iterable[Task], workers: int, cancel: Cancel) -> None:
    iterator = iter(tasks)
    lock = threading.Lock()
    done = threading.Condition(lock)
    state: dict = {"error": None, "running": 0}

    def next_task() -> Task | None:
        with lock:
            if state["error"] is not None or cancel.is_set:
                return None
            return next(iterator, None)

    def worker() -> None:
        try:
            while (task := next_task()) is not None:
                task()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, from a task or the task source
            with lock:
                if state["error"] is None:
                    state["error"] = exc
        finally:
            with lock:
                state["running"] -= 1
                done.notify_all()

    threads = [threading.Thread(target=worker, daemon=True, name=f"ckpt-{i}") for i in range(workers)]
    state["running"] = len(threads)
    for t in threads:
        t.start()
    with lock:
        while state["running"] and not cancel.is_set:
            done.wait(0.1)
    cancel.check()
    if state["error"] is not None:
        raise state["error"]


def map_tasks(fn: Callable[[T], R], items: Sequence[T], workers: int = READ_WORKERS,
              cancel: Cancel | None = None) -> list[R]:
    """`fn(item)` for every item on the pool, the results in the items' order."""
    results: dict[int, R] = {}

    def task(index: int, item: T) -> None:
        results[index] = fn(item)

    run_tasks((partial(task, i, item) for i, item in enumerate(items)),
              min(workers, len(items)), cancel or Cancel())
    return [results[i] for i in range(len(items))]
