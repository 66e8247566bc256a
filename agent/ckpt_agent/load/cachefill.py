"""Fills the part cache after a load, in a process of its own, so the cache costs a load nothing.

While a load runs, the parts it verified from the store are only noted (FillList). Once every file
is verified and in place, the load writes that list to `.ckpt-agent/cache-fill-rank-<r>.json` and
starts `python -m ckpt_agent.load.cachefill` through `/bin/sh -c '... &'` in a session of its own:
the shell exits at once and is reaped by the load, so the filler is nobody's child. The kernel
hands it to the nearest subreaper or PID 1, which reaps it when it ends: `tini` in our image
(docs/containers.md). Only when the agent itself is PID 1 and execs the trainer does the filler
become the trainer's child; a trainer that never waits leaves it a zombie (no memory, one process
slot) until the container ends.

The filler runs at the lowest CPU and I/O priority, copies each noted part from the placed file
into the cache (PartCache.put_span: a unique temporary file renamed into place, so a filler killed
at any moment leaves no entry with torn bytes) and stops a file at the first sign that it changed
since the load placed it. Whatever stops it (a full disk, a cache folder it cannot use, SIGKILL) the
load has already finished; it says in the log when it is done or why it stopped, and the next
load fetches what is missing from the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_agent.config.settings import CacheSettings
from ckpt_agent.disk.cache import PartCache
from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import STATE_DIR, stat_signature
from ckpt_agent.disk.safefs import open_file, record_bytes
from ckpt_agent.errors import AgentError
from ckpt_agent.report import JsonReporter, Reporter, human_bytes, make_reporter

# The filler's whole environment: where this very ckpt_agent lives, nothing else (never the secrets).
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}  # syscall numbers
_IOPRIO_IDLE = 3 << 13


def fill_job_name(rank: int) -> str:
    """Relative to STATE_DIR: the parts the last load of this rank leaves for the filler."""
    return f"cache-fill-rank-{rank}.json"


@dataclass
class FillList:
    """The parts a load verified from the store, by file: (offset, length, sha256) each."""

    spans: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, rel: str, offset: int, length: int, sha256: str) -> None:
        with self._lock:
            self.spans.setdefault(rel, []).append((offset, length, sha256))

    def count(self) -> tuple[int, int]:
        """(parts, bytes)."""
        spans = [s for file in self.spans.values() for s in file]
        return len(spans), sum(length for _, length, _ in spans)


def start_fill(folder: Folder, rank: int, cache: CacheSettings, noted: FillList, reporter: Reporter) -> None:
    """After the load: hand the noted parts to a detached filler; a filler that cannot start is a warning."""
    parts, size = noted.count()
    if not parts:
        return
    files = {}
    for rel, spans in noted.spans.items():
        st = folder.lstat(rel)
        if st is not None:
            files[rel] = {"signature": stat_signature(st), "spans": sorted(spans)}
    job = {"cache": cache.root, "max_bytes": cache.max_bytes, "download_folder": str(folder.root.absolute()),
           "files": files}
    import subprocess  # here: every load imports this module, few start a filler

    job_rel = f"{STATE_DIR}/{fill_job_name(rank)}"
    log_format = "json" if isinstance(reporter, JsonReporter) else "human"
    try:
        folder.write_atomic(job_rel, record_bytes(job, compact=True))
        isolated = ["-I"] if sys.flags.isolated else []  # as the self-contained agent runs (packaging/)
        subprocess.run(["/bin/sh", "-c", '"$@" </dev/null >/dev/null &', "sh", sys.executable, *isolated, "-m",
                        "ckpt_agent.load.cachefill", str(folder.shown(job_rel).absolute()), log_format],
                       env={"PYTHONPATH": _PACKAGE_PARENT}, start_new_session=True, check=True)
    except (OSError, AgentError, subprocess.CalledProcessError) as exc:
        reporter.warn(f"part cache {cache.root}: cannot start filling it ({exc}); the next load fetches these "
                      "parts from the store", event="cache_fill")
        return
    reporter.info(f"part cache {cache.root}: filling {parts} parts ({human_bytes(size)}) in the background; "
                  "a line says when it is done", event="cache_fill", state="started", parts=parts, bytes=size)


def _lowest_priority() -> None:
    """Nice 19 and the idle I/O class: the trainer starting meanwhile goes first."""
    import ctypes
    import platform

    try:
        os.nice(19)
        number = _IOPRIO_SET.get(platform.machine())
        if number is not None:
            ctypes.CDLL(None, use_errno=True).syscall(number, 1, 0, _IOPRIO_IDLE)  # IOPRIO_WHO_PROCESS, self
    except (OSError, AttributeError):
        pass


@dataclass
class _Filled:
    parts: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # files changed or gone since the load placed them


def _fill_file(cache: PartCache, folder: Folder, rel: str, entry: dict, done: _Filled) -> None:
    dfd, name = folder.parent(rel)
    fd = None if dfd is None else open_file(dfd, name, folder.shown(rel))
    if fd is None:
        done.skipped.append(rel)
        return
    try:
        for offset, length, sha in entry["spans"]:
            if stat_signature(os.fstat(fd)) != entry["signature"]:
                done.skipped.append(rel)
                return
            if cache.put_span(sha, fd, offset, length):
                done.parts += 1
                done.bytes += length
    finally:
        os.close(fd)


def fill(job_path: Path, reporter: Reporter) -> int:
    """Runs the job at `job_path`, holding an flock on it, and removes it when done or stopped (a
    filler killed leaves it, unlocked); 0 when every part was handled, 1 when it stopped."""
    started, done = time.monotonic(), _Filled()
    cache_root = "the part cache"
    try:
        with open(job_path, "rb") as job_file:
            fcntl.flock(job_file, fcntl.LOCK_EX)
            try:
                job = json.loads(job_file.read())
                cache_root = job["cache"]
                with Folder(Path(job["download_folder"])) as folder, PartCache(cache_root, job["max_bytes"]) as cache:
                    for rel, entry in job["files"].items():
                        _fill_file(cache, folder, rel, entry, done)
            finally:
                _remove_if_same(job_path, os.fstat(job_file.fileno()))
    except (OSError, AgentError, ValueError, KeyError, TypeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        reporter.warn(f"part cache {cache_root}: filling stopped after {done.parts} parts "
                      f"({human_bytes(done.bytes)}): {detail}; the next load fetches the rest from the store",
                      event="cache_fill", state="stopped", parts=done.parts, bytes=done.bytes, reason=detail)
        return 1
    skipped = f"; {len(done.skipped)} files changed since the load and were left out" if done.skipped else ""
    reporter.info(f"part cache {cache_root}: filled with {done.parts} parts ({human_bytes(done.bytes)}) in "
                  f"{time.monotonic() - started:.1f} s{skipped}", event="cache_fill", state="done",
                  parts=done.parts, bytes=done.bytes, skipped=done.skipped)
    return 0


def _remove_if_same(path: Path, mine: os.stat_result) -> None:
    """The job is done with; a newer load's job, renamed into its place meanwhile, stays."""
    with contextlib.suppress(OSError):
        now = os.lstat(path)
        if (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            os.unlink(path)


def main(argv: list[str]) -> int:
    """argv: the job's path, the log format of the load that wrote it."""
    _lowest_priority()
    return fill(Path(argv[0]), make_reporter(argv[1] if len(argv) > 1 else None))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
