"""`ckpt-agent sync`: the loop in a worker thread while the main thread notes signals.

SIGTERM/SIGINT: finish the upload in flight and whatever else is ready now within the grace
period, then exit 0 (what could not finish is reported). `once`: one pass, then exit.
"""

from __future__ import annotations

import signal
import time

from ckpt_agent.errors import StoreError
from ckpt_agent.report import Reporter
from ckpt_agent.runtime.cancel import Worker
from ckpt_agent.sync.loop import Sidecar
from ckpt_agent.sync.readiness import Why

HARD_STOP_SECONDS = 5.0  # past the grace period: the upload in flight did not stop, exit anyway


def run_standalone(sidecar: Sidecar, once: bool, reporter: Reporter) -> int:
    sidecar.check_job()
    signals: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        signals.append(signum)  # only note it: the main thread acts on it

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    worker = Worker(lambda: sidecar.run(once=once), "ckpt-sync")
    hard_stop: float | None = None
    while not worker.join(0.1):
        if signals and hard_stop is None:
            grace = sidecar.options.grace_seconds
            reporter.info(f"sync: {signal.Signals(signals[0]).name}: finishing what is ready within {grace:g} s")
            sidecar.finish(time.monotonic() + grace, wait_for_writers=False)
            hard_stop = time.monotonic() + grace + HARD_STOP_SECONDS
        if hard_stop is not None and time.monotonic() > hard_stop:
            reporter.warn("sync: the upload did not stop in time; exiting")
            return 0
    result = worker.result()
    if signals:
        return 0
    failed = [why for why in result.not_committed.values() if why.why is Why.FAILED]
    return StoreError.exit_code if failed else 0
