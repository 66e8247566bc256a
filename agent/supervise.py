"""`ckpt-agent run` with checkpointing enabled: the trainer runs as a child, the sidecar alongside.

`run` cannot exec here, because the trainer's last checkpoint must still be uploaded after it
exits. The trainer gets its own process group; SIGTERM, SIGINT and SIGHUP are forwarded to that
group (so `sh -c` wrappers and launcher workers get them too). After the trainer exits, the
sync loop does a final flush and we exit with the trainer's status, or 128+signal if a signal
killed it. The grace period for the flush counts from the first SIGTERM/SIGINT, since that is
when the platform's own deadline started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

from agent.launch import CommandNotFound
from agent.report import Reporter
from agent.sidecar import Sidecar

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_STARTS_GRACE = (signal.SIGTERM, signal.SIGINT)


def exit_status(returncode: int) -> int:
    """Popen's returncode (negative for a signal) as a shell would report it."""
    return returncode if returncode >= 0 else 128 - returncode


def supervise(argv: Sequence[str], env: Mapping[str, str], sidecar: Sidecar, reporter: Reporter) -> int:
    sidecar.check_job()
    grace = sidecar.options.grace_seconds
    received: list[tuple[int, float]] = []
    child: subprocess.Popen | None = None

    def forward(signum: int) -> None:
        if child is None or child.returncode is not None:
            return
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:  # the child has not made its group yet
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)
        except PermissionError:
            pass

    def handler(signum: int, _frame) -> None:
        received.append((signum, time.monotonic()))
        forward(signum)

    previous = {signum: signal.signal(signum, handler) for signum in FORWARDED}
    try:
        try:
            child = subprocess.Popen(list(argv), env=dict(env), process_group=0)
        except FileNotFoundError:
            raise CommandNotFound(f"training command not found: {argv[0]!r}; check the command or PATH") from None
        except PermissionError:
            raise CommandNotFound(f"training command not executable: {argv[0]!r}") from None
        sidecar.trainer_started(child.pid)
        if received:  # arrived while the child was being started
            forward(received[-1][0])
        box: dict = {}

        def work() -> None:
            try:
                sidecar.run()
            except BaseException as exc:  # noqa: BLE001 - the trainer keeps going; reported below
                box["error"] = exc
                reporter.error(f"checkpoint sync stopped: {exc}; training continues without uploads")

        worker = threading.Thread(target=work, name="ckpt-sync", daemon=True)
        worker.start()
        reporter.info(f"supervising the trainer (pid {child.pid}); checkpoints are uploaded as they appear")
        status = exit_status(child.wait())
        reporter.info(f"trainer exited with status {status}; flushing the last checkpoints")
        handled = len(received)
        starts = [t for signum, t in received if signum in _STARTS_GRACE]
        sidecar.finish(starts[0] + grace if starts else None, wait_for_writers=True, trainer_status=status)
        while worker.is_alive():
            worker.join(0.1)
            if len(received) > handled:  # a signal during the flush: bound it by the grace period
                handled = len(received)
                sidecar.finish(time.monotonic() + grace, wait_for_writers=True)
        return status
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
