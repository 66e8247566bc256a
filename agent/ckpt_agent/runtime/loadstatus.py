"""Whether an early-started load is done: a file the loader holds locked while it loads.

With an early start (`run --start-early`) the trainer runs while a child of the agent is still
loading. The agent creates `<download_folder>/.ckpt-agent/load-status-rank-<r>`, takes an
exclusive flock on it and hands the trainer its path in CKPT_AGENT_LOAD_STATUS; only the loader
keeps the lock. When the load ends the loader writes the outcome into the file and exits, and the
kernel drops the lock when its last holder is gone, even after SIGKILL. So a reader that gets
the lock knows the load is over: an outcome of `ok` means everything is verified and in place; a
failure carries its message; an empty file means the loader died without saying.

Training code imports this through `ckpt_agent.latest_local_checkpoint()`, in any Python from 3.9
up: it uses the standard library only and no syntax newer than 3.9.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

STATUS_ENV = "CKPT_AGENT_LOAD_STATUS"
POLL_SECONDS = 0.05
RAISE_SECONDS = 1.0  # after a failed load, a trainer waiting in wait_for_load has this long to raise and exit
PROGRESS_SECONDS = 5.0


class CheckpointLoadError(RuntimeError):
    """The checkpoint load this trainer was started beside failed: never train from scratch instead."""


def status_name(rank: int) -> str:
    """Relative to the download folder's `.ckpt-agent/`."""
    return f"load-status-rank-{rank}"


def create_status(dir_fd: int, rank: int) -> int:
    """The status file, emptied and locked by us: `loading` for every reader until the lock's last
    holder is gone. The fd is close-on-exec, so an exec'd trainer never holds the lock."""
    fd = os.open(status_name(rank), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_status(fd: int, error: str | None = None, exit_code: int = 0) -> None:
    """The outcome, written while we still hold the lock, which is then released: readers see it at once."""
    body = json.dumps({"ok": error is None, "error": error, "exit_code": exit_code}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, body, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)


def _outcome(fd: int, path: str) -> None:
    """Raises unless the finished load succeeded."""
    raw = os.pread(fd, 1 << 16, 0)
    try:
        status = json.loads(raw) if raw else None
    except ValueError:
        status = None
    if not isinstance(status, dict):
        raise CheckpointLoadError(f"the checkpoint load stopped before it finished ({path} holds no outcome); "
                                  "see the agent's log above")
    if not status.get("ok"):
        raise CheckpointLoadError(f"the checkpoint load failed: {status.get('error')}")


def wait_for_load(env: Mapping[str, str], stream: TextIO | None = None,
                  progress_seconds: float = PROGRESS_SECONDS) -> None:
    """Returns at once without an early start; else once the load is complete and verified, with a
    line on `stream` (stderr) at most every `progress_seconds` while it waits. Raises
    CheckpointLoadError when the load failed or its process died."""
    path = env.get(STATUS_ENV)
    if not path:
        return
    out = sys.stderr if stream is None else stream
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointLoadError(f"{STATUS_ENV}={path}: cannot open it ({exc.strerror})") from None
    try:
        started, last = time.monotonic(), None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            now = time.monotonic()
            if last is None or now - last >= progress_seconds:
                out.write(f"ckpt-agent: waiting for the checkpoint load to finish ({now - started:.0f} s so far)\n")
                out.flush()
                last = now
            time.sleep(POLL_SECONDS)
        _outcome(fd, path)
    finally:
        os.close(fd)
