"""`run --start-early` (CKPT_AGENT_START_EARLY=1): the trainer starts at once while a child loads.

The trainer's own start-up (imports, CUDA and NCCL set-up, building the model, loading data)
then overlaps the download. The trainer learns that the load is done from
`ckpt_agent.latest_local_checkpoint()`, which waits for the status file the loader holds locked
(ckpt_agent.runtime.loadstatus) and raises if the load failed. A trainer that never asks is
stopped when the load fails: SIGTERM, then SIGKILL after CKPT_AGENT_GRACE_SECONDS (a trainer
waiting in the helper first gets RAISE_SECONDS to raise and exit on its own).

The loader is forked before any thread exists, and it is the only holder of the status file's
lock. Two shapes, as `run` has without an early start:

- exec (a plain command): the trainer keeps our PID. The loader is forked twice and its middle
  process reaped at once, so it is nobody's child (PID 1 or the nearest subreaper reaps it) and
  the trainer meets no stranger among its children. It holds a pidfd of our process, taken before
  the exec, so it signals the trainer and nothing else, and it stops loading if the trainer exits.
  The exit status is then the trainer's answer to SIGTERM (143 by default, 137 after SIGKILL).
- child (a shell, BT_START_COMMANDS, checkpointing on): the loader is our child; we stop the
  trainer's process group when the load fails and exit with the load's own exit code. With
  checkpointing, uploads start only once the load is verified, and nothing is uploaded when it
  failed, so a trainer that saved before it was stopped never becomes the job's latest checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from ckpt_agent.commands.context import Context
from ckpt_agent.commands.load import load_now
from ckpt_agent.config.selection import Selection
from ckpt_agent.disk.localstate import STATE_DIR, prepare_root
from ckpt_agent.errors import EXIT_INTERNAL, AgentError, ConfigError, LocalError
from ckpt_agent.report import Reporter
from ckpt_agent.runtime.loadstatus import RAISE_SECONDS, STATUS_ENV, create_status, status_name, write_status
from ckpt_agent.trainer.launch import exec_training
from ckpt_agent.trainer.procgroup import TrainerGroup


def _status_file(ctx: Context) -> tuple[int, str]:
    """The status file, created and locked; its path for the trainer."""
    root, rank = Path(ctx.settings.spec.download_folder), ctx.settings.node_rank
    with prepare_root(root) as folder:
        try:
            fd = create_status(folder.dir(STATE_DIR, create=True), rank)
        except OSError as exc:
            raise LocalError(f"{folder.shown(STATE_DIR)}/{status_name(rank)}: cannot take it for an early start "
                             f"({exc.strerror}); is another agent loading rank {rank} into this folder?") from None
    return fd, str((root / STATE_DIR / status_name(rank)).absolute())


def _load(ctx: Context, selection: Selection, status: int, stop_trainer: Callable[[], None]) -> int:
    """The load as the child runs it; the outcome goes into the status file, a failure stops the trainer."""
    try:
        load_now(ctx, selection)
        write_status(status)
        return 0
    except AgentError as exc:
        code, message = exc.exit_code, str(exc)
    except BaseException as exc:  # noqa: BLE001 - the child's last line, as the CLI's: only the class
        code, message = EXIT_INTERNAL, f"unexpected {type(exc).__name__}; this is a bug in ckpt-agent, please report it"
    ctx.reporter.error(f"the checkpoint load failed: {message}", exit_code=code, event="early_load_failed")
    write_status(status, message, code)
    stop_trainer()
    return code


class _Pidfd:
    """Our own process, which becomes the trainer: signalled and waited for by the loader, never a
    process that reuses the PID later."""

    def __init__(self) -> None:
        try:
            self.fd = os.pidfd_open(os.getpid())
        except (OSError, AttributeError):
            raise ConfigError("--start-early / CKPT_AGENT_START_EARLY: needs Linux 5.3 or newer (pidfd_open); "
                              "start without it") from None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.fd, signum)

    def exited(self, timeout: float | None) -> bool:
        return bool(select.select([self.fd], [], [], timeout)[0])


def _stop(trainer: _Pidfd, grace: float, reporter: Reporter) -> None:
    if trainer.exited(RAISE_SECONDS):  # it was waiting in latest_local_checkpoint(), which raised
        return
    reporter.error("stopping the trainer (SIGTERM): it must not train without its checkpoint")
    trainer.signal(signal.SIGTERM)
    if not trainer.exited(grace):
        reporter.error(f"the trainer did not exit within the {grace:g} s grace period; killing it")
        trainer.signal(signal.SIGKILL)


def _loader_in_exec_mode(ctx: Context, selection: Selection, status: int, trainer: _Pidfd, grace: float) -> int:
    """The grandchild: stops loading if the trainer exits first; stops the trainer if the load fails."""
    over = threading.Event()  # the load has an outcome: the trainer exiting now is no news
    gone = threading.Event()

    def watch() -> None:
        trainer.exited(None)
        gone.set()
        if not over.is_set():
            ctx.reporter.info("the trainer exited before the checkpoint load finished; stopping the load")
            ctx.cancel.signal(signal.SIGTERM)

    threading.Thread(target=watch, name="ckpt-trainer-watch", daemon=True).start()

    def stop() -> None:
        over.set()
        if not gone.is_set():
            _stop(trainer, grace, ctx.reporter)

    code = _load(ctx, selection, status, stop)
    over.set()
    return code


def exec_early(ctx: Context, argv: list[str], env: dict[str, str], selection: Selection, grace: float) -> NoReturn:
    """Fork the loader (twice, so nobody's child), then exec the trainer in this process."""
    trainer = _Pidfd()
    status, path = _status_file(ctx)
    sys.stdout.flush()
    sys.stderr.flush()
    middle = os.fork()
    if middle == 0:
        code = EXIT_INTERNAL
        try:
            os.setsid()
            code = _loader_in_exec_mode(ctx, selection, status, trainer, grace) if os.fork() == 0 else 0
        finally:
            os._exit(code)
    os.waitpid(middle, 0)
    os.close(status)
    os.close(trainer.fd)
    ctx.reporter.info("starting the trainer now; the checkpoint load goes on beside it "
                      "(ckpt_agent.latest_local_checkpoint() waits for it)", event="early_start")
    exec_training(argv, {**env, STATUS_ENV: path})


class EarlyChild:
    """Child mode: the loader is our child; `watch` is called from TrainerGroup.wait's loop."""

    def __init__(self, ctx: Context, selection: Selection) -> None:
        status, self.path = _status_file(ctx)
        self.reporter = ctx.reporter
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            code = EXIT_INTERNAL
            try:
                code = _load(ctx, selection, status, lambda: None)  # the agent stops the trainer
            finally:
                os._exit(code)
        os.close(status)
        self.code: int | None = None  # the loader's exit status, once reaped
        self.reaped_at = 0.0
        self.signalled = False  # we told the loader to stop: its failure is not the load's
        self.done = threading.Event()
        self._stopping = False

    def env(self, env: dict[str, str]) -> dict[str, str]:
        return {**env, STATUS_ENV: self.path}

    def _reap(self, block: bool) -> None:
        if self.code is None:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
                self.reaped_at = time.monotonic()
                self.done.set()

    @property
    def succeeded(self) -> bool:
        return self.code == 0

    @property
    def failed(self) -> bool:
        return self.code not in (None, 0) and not self.signalled

    def watch(self, group: TrainerGroup) -> None:
        """Stop the trainer once the load failed; pass a stop the platform sent us on to the loader."""
        self._reap(block=False)
        if self.failed and not self._stopping and time.monotonic() - self.reaped_at >= RAISE_SECONDS:
            self._stopping = True
            self.reporter.error("stopping the trainer (SIGTERM): it must not train without its checkpoint")
            group.stop(signal.SIGTERM)
        elif self.code is None and group.terminated_at is not None and not self.signalled:
            self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        self.signalled = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def wait_ok(self) -> bool:
        """Blocks until the loader has ended (another thread reaps it); whether the load succeeded."""
        self.done.wait()
        return self.succeeded

    def finish(self) -> int | None:
        """After the trainer is gone: a loader still running is stopped. The load's exit code when it
        failed on its own; None when it succeeded or we stopped it."""
        if self.code is None:
            self.reporter.error("the trainer exited before the checkpoint load finished; stopping the load")
            self._signal(signal.SIGTERM)
        self._reap(block=True)
        return self.code if self.failed else None
