"""`ckpt-agent run` with checkpointing enabled: the trainer runs as a child, the sidecar alongside.

`run` cannot exec here, because the trainer's last checkpoint must still be uploaded after it
exits. The trainer runs through ckpt_agent.trainer.procgroup (signals forwarded to its process group, which
is waited for as a whole); then the sync loop does a final flush and we exit with the trainer's
status (see TrainerGroup.exit_code). The grace period for the flush counts from the first
SIGTERM/SIGINT, since that is when the platform's own deadline started.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from ckpt_agent.report import Reporter
from ckpt_agent.runtime.cancel import Worker
from ckpt_agent.sync.loop import Sidecar
from ckpt_agent.trainer.procgroup import TrainerGroup


class EarlyLoad(Protocol):
    """An early start's loader (ckpt_agent.commands.early.EarlyChild), as supervise sees it."""

    def watch(self, group: TrainerGroup) -> None: ...
    def wait_ok(self) -> bool: ...
    def finish(self) -> int | None: ...
    @property
    def succeeded(self) -> bool: ...


def supervise(argv: Sequence[str], env: Mapping[str, str], sidecar: Sidecar, reporter: Reporter,
              early: EarlyLoad | None = None) -> int:
    """With an early start, uploads begin once the load is verified; when it failed (or the trainer
    exited first) nothing is uploaded: what such a trainer saved did not start from its checkpoint."""
    sidecar.check_job()
    grace = sidecar.options.grace_seconds
    with TrainerGroup(argv, env, grace, reporter) as group:
        sidecar.trainer_started(group.pid)

        def work() -> None:
            try:
                if early is None or early.wait_ok():
                    sidecar.run()
            except BaseException as exc:  # noqa: BLE001 - the trainer keeps going; reported when it happens
                reporter.error(f"checkpoint sync stopped: {exc}; training continues without uploads")

        worker = Worker(work, "ckpt-sync")
        reporter.info(f"supervising the trainer (pid {group.pid}); checkpoints are uploaded as they appear")
        status = group.wait(early.watch if early is not None else None)
        if early is not None:
            failed = early.finish()
            if not early.succeeded:
                reporter.error("the checkpoint load did not complete: nothing the trainer wrote is uploaded")
                return failed if failed is not None else group.exit_code(status)
        reporter.info(f"trainer exited with status {status}; flushing the last checkpoints")
        handled = len(group.received)
        started = group.terminated_at
        sidecar.finish(started + grace if started is not None else None, wait_for_writers=True, trainer_status=status)
        while not worker.join(0.1):
            if len(group.received) > handled:  # a signal during the flush: bound it by the grace period
                handled = len(group.received)
                sidecar.finish(time.monotonic() + grace, wait_for_writers=True)
        return group.exit_code(status)
