"""Timing one whole process: wall time and the process's own peak RSS, via bench/trampoline.py."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.checks import BenchError

TRAMPOLINE = Path(__file__).resolve().parent / "trampoline.py"
TAIL_LINES = 40


@dataclass(frozen=True)
class Measurement:
    wall_s: float
    maxrss_kib: int
    returncode: int
    timed_out: bool
    outer_wall_s: float  # as seen from here, including the trampoline's own start-up


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int, bool]:
    """Reap proc (exit status, whether it timed out); on timeout or interruption kill its group."""
    timed_out = threading.Event()

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def expire() -> None:
        timed_out.set()
        kill()

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        _, status, _ = os.wait4(proc.pid, 0)
    except BaseException:
        kill()
        proc.wait()
        raise
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, tell Popen
    kill()  # nothing it started may outlive it
    return proc.returncode, timed_out.is_set()


def run_timed(argv: list[str], env: dict[str, str], log: Path, timeout: float) -> Measurement:
    """Run one whole process; wall time from just before fork to after reaping, and its peak RSS.

    stdout and stderr go to `log`; the process gets its own session so a timeout (or our own
    interruption) kills it and anything it started.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    result = log.with_suffix(".rusage")
    result.unlink(missing_ok=True)
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-I", str(TRAMPOLINE), str(result), *argv],
                                env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        status, timed_out = _wait(proc, timeout)
        outer = time.perf_counter() - start
    if timed_out:
        return Measurement(outer, 0, -9, True, outer)
    try:
        wall, maxrss, code = result.read_text().split()
    except (OSError, ValueError):
        raise BenchError(f"the trampoline for {shlex.join(argv)} failed (exit status "
                         f"{status}):\n{tail(log)}") from None
    return Measurement(float(wall), int(maxrss), int(code), False, outer)


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def check_exit(m: Measurement, what: str, argv: list[str], log: Path) -> None:
    """A run that timed out or failed makes the whole benchmark fail, with the log's tail."""
    if m.timed_out:
        raise BenchError(f"{what}: timed out after {m.wall_s:.0f}s: {shlex.join(argv)}\n"
                         f"--- last lines of {log}:\n{tail(log)}")
    if m.returncode != 0:
        raise BenchError(f"{what}: exit status {m.returncode}: {shlex.join(argv)}\n"
                         f"--- last lines of {log}:\n{tail(log)}")
