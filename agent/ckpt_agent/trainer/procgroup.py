"""The training command as our child, in its own process group, for when exec would lose signals.

A shell between us and the trainer breaks the exec hand-off: dash does not exec the last command
of `cd /x && python train.py`, and on SIGTERM the shell dies at once without passing the signal
on, so the container ends and the trainer is killed before its save-on-SIGTERM handler finishes.
As the parent instead we forward SIGTERM, SIGINT and SIGHUP to the whole group, then wait until
every process of the group has exited (the trainer outlives the shell that started it), bounded
by the grace period, before we exit. As a child subreaper (Linux) the trainer is reparented to us
when its shell dies, so its own exit status is what we report. `supervise` (checkpointing on)
runs the trainer through this too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from ckpt_agent.report import Reporter
from ckpt_agent.trainer.launch import starting

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
TERMINATING = (signal.SIGTERM, signal.SIGINT)  # a platform stopping the job; starts the grace period
_PR_SET_CHILD_SUBREAPER = 36
_POLL_SECONDS = 0.05


def exit_status(returncode: int) -> int:
    """Popen's returncode (negative for a signal) as a shell would report it."""
    return returncode if returncode >= 0 else 128 - returncode


def _become_subreaper() -> None:
    """Orphaned descendants are reparented to us, not PID 1, so we can reap them and see their status."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap(pgid: int) -> list[tuple[int, int]]:
    """(pid, returncode) of every process of the group that is our child and has exited.

    The group leader is asked for by pid too: it may have moved itself to another group.
    """
    done = []
    for target in (pgid, -pgid):
        with contextlib.suppress(ChildProcessError):
            while (reaped := os.waitpid(target, os.WNOHANG))[0]:
                done.append((reaped[0], os.waitstatus_to_exitcode(reaped[1])))
    return done


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # what is left runs as another user: we cannot wait for it
        return False
    return True


class TrainerGroup:
    """`with TrainerGroup(...) as group: status = group.wait()`; signal handlers live as long as the block."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], grace_seconds: float,
                 reporter: Reporter) -> None:
        self.argv, self.env, self.grace, self.reporter = list(argv), dict(env), grace_seconds, reporter
        self.received: list[tuple[int, float]] = []
        self._child: subprocess.Popen | None = None
        self._wake = threading.Event()
        self._previous: dict = {}

    @property
    def pid(self) -> int:
        assert self._child is not None
        return self._child.pid

    @property
    def terminated_at(self) -> float | None:
        """When the first SIGTERM/SIGINT arrived: the platform's grace period runs from then."""
        return next((t for signum, t in self.received if signum in TERMINATING), None)

    def __enter__(self) -> TrainerGroup:
        self._previous = {signum: signal.signal(signum, self._handler) for signum in FORWARDED}
        try:
            _become_subreaper()
            with starting(self.argv[0]):
                self._child = subprocess.Popen(self.argv, env=self.env, process_group=0)
            if self.received:  # arrived while the child was being started
                self._forward(self.received[-1][0])
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, old in self._previous.items():
            signal.signal(signum, old)

    def _handler(self, signum: int, _frame) -> None:
        self.received.append((signum, time.monotonic()))
        self._forward(signum)
        self._wake.set()

    def stop(self, signum: int) -> None:
        """Stop the trainer as if the platform had sent us `signum`: forwarded, and the grace period runs."""
        self._handler(signum, None)

    def _forward(self, signum: int) -> None:
        if self._child is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._child.pid, signum)

    def wait(self, watch: Callable[[TrainerGroup], None] | None = None) -> int:
        """The trainer's exit status, once every process of its group is gone; `watch` is called on
        every round of the loop (an early start's loader is checked there).

        That is the direct child's, unless a signal we forwarded killed it (a shell) and another
        process of the group exited after it: then the last one's, the trainer's. After the first
        SIGTERM/SIGINT, or once the direct child has exited, the group has the grace period to
        finish; what is left then is killed.
        """
        assert self._child is not None
        pgid = self._child.pid
        direct: int | None = None
        exited_at: float | None = None
        last: int | None = None
        killed = False
        while True:
            for pid, code in _reap(pgid):
                if pid == pgid:
                    direct, exited_at = code, time.monotonic()
                    self._child.returncode = code
                else:
                    last = exit_status(code)
            if direct is not None and not _group_alive(pgid):
                break
            if watch is not None:
                watch(self)
            deadline = self._deadline(exited_at)
            if not killed and deadline is not None and time.monotonic() >= deadline:
                self.reporter.error(f"the trainer's processes did not exit within the {self.grace:g} s grace "
                                    "period; killing them")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                killed = True
            self._wake.wait(_POLL_SECONDS)
            self._wake.clear()
        if direct < 0 and -direct in {signum for signum, _ in self.received} and last is not None:
            return last
        return exit_status(direct)

    def _deadline(self, exited_at: float | None) -> float | None:
        starts = [t for signum, t in self.received if signum in TERMINATING]
        if exited_at is not None:
            starts.append(exited_at)
        return min(starts) + self.grace if starts else None

    def exit_code(self, status: int) -> int:
        """Our exit status: the trainer's, but never success for a job that was told to stop.

        A trainer that catches SIGTERM, saves and exits 0 (Lightning does) would otherwise make a
        preempted job look finished, and a platform would not run it again to resume.
        """
        signum = next((s for s, _ in self.received if s in TERMINATING), None)
        if status != 0 or signum is None:
            return status
        self.reporter.info(f"the trainer exited with status 0 after {signal.Signals(signum).name}; exiting "
                           f"{128 + signum} so the stopped job is not taken for a finished one")
        return 128 + signum
