"""`ckpt-agent sync`: uploads checkpoints from BT_CHECKPOINT_DIR as training writes them.

Each top-level folder of the watched directory is one checkpoint, named by the folder. A
checkpoint is committed (agent.save.commit_checkpoint: files first, the manifest last) once it
is ready:

- quiet: no file in it changed for `quiet_seconds`, either seen across polls or by every
  ctime being that old (so a sidecar that starts late or runs `--once` needs no history);
- no process we can see holds a file in it open for writing (Linux: /proc/*/fd + fdinfo);
- its complete file (`trainer_state.json` by default, the file the HF Trainer writes last) is
  there and, if it is JSON, parses: a checkpoint whose writer died half-way stays quiet forever,
  and this is what keeps it from ever being committed.

A file that changes during the upload makes commit_checkpoint refuse to write the manifest;
the checkpoint waits to be quiet again and starts over. Checkpoints are committed one at a
time in natural name order, so "latest" (by commit time) follows the training steps; for the
same reason a folder older than one this job has already committed (`checkpoint-20` once
`checkpoint-30` is in the store, e.g. after --keep-last deleted it and the sidecar restarted)
is never uploaded: it would become "latest".

The loop never reads os.environ: SyncOptions come from cli.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent import layout
from agent.cancel import Cancel
from agent.errors import AgentError, ConfigError, Interrupted, StoreError
from agent.manifest import Manifest, natural_key
from agent.report import Reporter, human_bytes
from agent.resolve import read_job, read_manifest
from agent.save import CheckpointChanged, CheckpointId, LocalFile, commit_checkpoint, scan_folder
from agent.stores.base import Store

DEFAULT_QUIET_SECONDS = 5.0
DEFAULT_POLL_SECONDS = 2.0
DEFAULT_GRACE_SECONDS = 25.0
DEFAULT_COMPLETE_FILE = "trainer_state.json"
# In a final flush a checkpoint whose upload keeps failing is given up after this many tries.
FLUSH_ATTEMPTS = 3

# Why a checkpoint is not committed (yet).
WRITING = "still being written"
OPEN = "a file in it is open for writing"
CHANGED = "changed while uploading; starts over once quiet"
EMPTY = "empty folder"
FAILED = "upload failed"
CUT = "grace period ended during the upload"
NOT_STARTED = "grace period ended before its upload"
_MAY_STILL_FINISH = (WRITING, OPEN, CHANGED)  # reasons start with these


@dataclass(frozen=True)
class SyncOptions:
    checkpoint_dir: Path
    quiet_seconds: float = DEFAULT_QUIET_SECONDS
    poll_seconds: float = DEFAULT_POLL_SECONDS
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    keep_last: int | None = None
    complete_file: str | None = DEFAULT_COMPLETE_FILE


def _seconds(flag: float | None, flag_name: str, env: Mapping[str, str], var: str, default: float,
             positive: bool = False) -> float:
    """A flag, else the variable, else the default; never negative (zero only if not `positive`)."""
    raw = env.get(var, "").strip()
    if flag is not None:
        value, where = flag, flag_name
    elif raw:
        try:
            value, where = float(raw), var
        except ValueError:
            raise ConfigError(f"{var}: expected seconds, got {raw!r}") from None
    else:
        return default
    if value < 0 or (positive and value == 0) or value != value:
        raise ConfigError(f"{where}: must be {'above' if positive else 'at least'} 0 seconds, got {value:g}")
    return value


def sync_options(env: Mapping[str, str], checkpoint_dir: str, *, quiet_seconds: float | None = None,
                 poll_seconds: float | None = None, grace_seconds: float | None = None,
                 keep_last: int | None = None, complete_file: str | None = None) -> SyncOptions:
    """Flags win over CKPT_AGENT_* variables, which win over the defaults."""
    quiet = _seconds(quiet_seconds, "--quiet-seconds", env, "CKPT_AGENT_QUIET_SECONDS", DEFAULT_QUIET_SECONDS)
    poll = _seconds(poll_seconds, "--poll-seconds", env, "CKPT_AGENT_POLL_SECONDS", DEFAULT_POLL_SECONDS, True)
    grace = _seconds(grace_seconds, "--grace-seconds", env, "CKPT_AGENT_GRACE_SECONDS", DEFAULT_GRACE_SECONDS)
    if keep_last is None:
        raw = env.get("CKPT_AGENT_KEEP_LAST", "").strip()
        if raw:
            if not raw.isdecimal():
                raise ConfigError(f"CKPT_AGENT_KEEP_LAST: expected a whole number, got {raw!r}")
            keep_last = int(raw)
            if keep_last < 1:
                raise ConfigError("CKPT_AGENT_KEEP_LAST: must be at least 1")
    elif keep_last < 1:
        raise ConfigError(f"--keep-last: must be at least 1, got {keep_last}")
    if complete_file is None:
        complete_file = env.get("CKPT_AGENT_COMPLETE_FILE", DEFAULT_COMPLETE_FILE)
    complete_file = complete_file.strip() or None
    if complete_file and (complete_file.startswith("/") or ".." in complete_file.split("/") or "\0" in complete_file):
        raise ConfigError(f"complete file {complete_file!r}: must be a path inside the checkpoint folder")
    return SyncOptions(Path(checkpoint_dir), quiet, poll, grace, keep_last, complete_file)


def open_for_writing(root: Path) -> set[str] | None:
    """Real paths under `root` that a process we may inspect holds open for writing.

    None where this cannot be seen (no /proc). Processes of other users are invisible without
    privileges; the quiet period still covers them.
    """
    if not os.path.isdir("/proc/self/fd"):
        return None
    prefix = os.path.realpath(root) + os.sep
    found: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdecimal():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if not target.startswith(prefix) or target.endswith(" (deleted)"):
                continue
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = next((int(line.split()[1], 8) for line in info if line.startswith("flags:")), 0)
            except (OSError, ValueError, IndexError):
                continue
            if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                found.add(target)
    return found


@dataclass
class _Seen:
    """One checkpoint folder as the last poll saw it."""

    files: tuple[LocalFile, ...]
    newest_ctime_ns: int
    since: float  # monotonic time this exact state was first seen
    failures: int = 0
    retry_at: float = 0.0
    warned: bool = False


@dataclass
class SyncResult:
    committed: list[str] = field(default_factory=list)
    not_committed: dict[str, str] = field(default_factory=dict)
    failed: AgentError | None = None


def _shape(name: str) -> str:
    """checkpoint-20 and checkpoint-300 have one shape, so their steps can be compared."""
    return re.sub(r"\d+", "#", name)


def _snapshot(folder: Path) -> tuple[tuple[LocalFile, ...], int] | None:
    """The folder's files and the newest ctime of any file or folder in it; None if it vanished."""
    try:
        files = tuple(scan_folder(folder))
        newest = folder.stat().st_ctime_ns
        for dirpath, _dirs, _files in os.walk(folder):
            newest = max(newest, os.stat(dirpath).st_ctime_ns)
    except (FileNotFoundError, NotADirectoryError, ConfigError):
        return None
    return files, max([newest, *(f.ctime_ns for f in files)])


class Sidecar:
    """The sync loop. `run()` blocks; `finish()` (from another thread) turns it into a final flush."""

    def __init__(self, store: Store, ident: CheckpointId, options: SyncOptions, workers: int,
                 reporter: Reporter) -> None:
        self.store, self.ident, self.options = store, ident, options
        self.workers, self.reporter = workers, reporter
        self.result = SyncResult()
        self._seen: dict[str, _Seen] = {}
        self._checked: set[str] = set()  # looked up in the store once: not committed before we started
        self._done: set[str] = set()  # committed (by us or before a restart), or superseded
        self._newest: dict[str, tuple] | None = None  # name shape -> natural key of the newest committed
        self._previous: Manifest | None = None
        self._warned_loose = self._warned_missing = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._finishing = False
        self._wait_for_writers = False
        self._deadline: float | None = None
        self._expired = False
        self._timer: threading.Timer | None = None
        self._cancel: Cancel | None = None

    # -- control, from other threads ------------------------------------------------------

    def check_job(self) -> None:
        """Fail early (ConfigError/StoreError) if the job belongs to another project or the store is unreachable."""
        job = read_job(self.store, self.ident.job_id)
        if job and self.ident.project_name and job.project_name not in (None, self.ident.project_name):
            raise ConfigError(f"BT_TRAINING_PROJECT_NAME={self.ident.project_name}: job {self.ident.job_id} "
                              f"already belongs to project {job.project_name}")

    def finish(self, deadline: float | None, wait_for_writers: bool) -> None:
        """Stop watching and flush. `deadline` (monotonic) bounds the flush and the upload in flight.

        wait_for_writers: keep going while checkpoints are still being written (the trainer has
        exited and may have left writers behind); otherwise one last pass over what is ready now.
        """
        with self._lock:
            self._finishing = True
            self._wait_for_writers = self._wait_for_writers or wait_for_writers
            if deadline is not None and (self._deadline is None or deadline < self._deadline):
                self._deadline = deadline
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire)
                self._timer.daemon = True
                self._timer.start()
        self._wake.set()

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            if self._cancel is not None:
                self._cancel.signal(signal.SIGTERM)
        self._wake.set()

    # -- the loop ---------------------------------------------------------------------------

    def run(self, once: bool = False) -> SyncResult:
        o = self.options
        marker = f"complete when {o.complete_file} is there" if o.complete_file else "no complete file"
        self.reporter.info(
            f"sync: watching {o.checkpoint_dir} for job {self.ident.job_id} (project {self.ident.project_name}, "
            f"rank {self.ident.rank} of {self.ident.num_nodes}) -> {self.store.describe()}; quiet "
            f"{o.quiet_seconds:g} s, {marker}" + (f", keep last {o.keep_last}" if o.keep_last else ""))
        if once:
            self.finish(None, wait_for_writers=False)
        pending: dict[str, str] = {}
        store_failures = 0
        try:
            while True:
                with self._lock:
                    finishing, waiting = self._finishing, self._wait_for_writers
                try:
                    pending = self._pass(finishing)
                    store_failures = 0
                except StoreError as exc:  # listing or looking up the store: the network, not a checkpoint
                    store_failures += 1
                    if finishing and store_failures >= FLUSH_ATTEMPTS:
                        raise
                    self.reporter.warn(f"sync: the store did not answer ({exc}); trying again")
                    self._wake.wait(min(60.0, o.poll_seconds * 2 ** store_failures))
                    continue
                if self._expired:
                    break
                if finishing:
                    if not waiting:
                        break
                    if not any(why.startswith(_MAY_STILL_FINISH) or self._retry(name, why)
                               for name, why in pending.items()):
                        break
                self._wake.wait(o.poll_seconds)
                self._wake.clear()
        except AgentError as exc:
            self.result.failed = exc
            raise
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self.result.not_committed = dict(pending)
            self._summary()
        return self.result

    def _retry(self, name: str, why: str) -> bool:
        seen = self._seen.get(name)
        return why.startswith(FAILED) and seen is not None and seen.failures < FLUSH_ATTEMPTS

    def _summary(self) -> None:
        for name, why in sorted(self.result.not_committed.items(), key=lambda kv: natural_key(kv[0])):
            self.reporter.warn(f"sync: {name} NOT committed: {why}", event="sync_not_committed",
                               checkpoint=name, reason=why)
        done = ", ".join(self.result.committed) or "none"
        self.reporter.info(f"sync: stopped; committed this run: {done}; "
                           f"not committed: {len(self.result.not_committed)}")

    def _folders(self) -> list[str]:
        root = self.options.checkpoint_dir
        try:
            entries = list(os.scandir(root))
        except FileNotFoundError:
            if not self._warned_missing:
                self.reporter.info(f"sync: {root} does not exist yet; waiting for checkpoints")
                self._warned_missing = True
            return []
        except OSError as exc:
            raise ConfigError(f"BT_CHECKPOINT_DIR={root}: cannot be read: {exc.strerror}") from None
        loose = sorted(e.name for e in entries if not e.name.startswith(".") and not e.is_dir())
        if loose and not self._warned_loose:
            self._warned_loose = True
            self.reporter.warn(f"sync: ignoring files at the top level of {root} (each checkpoint is a folder): "
                               + ", ".join(loose[:5]) + (" ..." if len(loose) > 5 else ""))
        names = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        return sorted(names, key=natural_key)

    def _pass(self, finishing: bool) -> dict[str, str]:
        """One look at every checkpoint folder; commits the ready ones. Returns name -> why not yet."""
        pending: dict[str, str] = {}
        for name in self._folders():
            if name in self._done:
                continue
            if self._expired:
                pending[name] = NOT_STARTED
                continue
            if name not in self._checked:
                if self._already_committed(name):
                    continue
                self._checked.add(name)
            if self._superseded(name):
                continue
            folder = self.options.checkpoint_dir / name
            snap = _snapshot(folder)
            if snap is None:  # deleted (e.g. the trainer's own rotation)
                self._seen.pop(name, None)
                continue
            now = time.monotonic()
            seen = self._seen.get(name)
            if seen is None:
                seen = self._seen[name] = _Seen(*snap, since=now)
            elif seen.files != snap[0]:
                seen.files, seen.newest_ctime_ns, seen.since = snap[0], snap[1], now
            if not finishing and now < seen.retry_at:
                pending[name] = FAILED
                continue
            writers = open_for_writing(self.options.checkpoint_dir) if self._quiet(seen, now) else None
            why = self._not_ready(name, folder, seen, now, writers, finishing)
            if why:
                pending[name] = why
                continue
            why = self._commit(name, folder, seen, finishing)
            if why:
                pending[name] = why
        return pending

    def _already_committed(self, name: str) -> bool:
        key = layout.manifest_key(self.ident.job_id, name, self.ident.rank)
        if not self.store.exists(key):
            return False
        self._done.add(name)
        self.reporter.info(f"sync: {name} is already committed; not uploading it again",
                           event="sync_already_committed", checkpoint=name)
        with contextlib.suppress(AgentError):
            manifest = read_manifest(self.store, self.ident.job_id, name, self.ident.rank)
            if self._previous is None or natural_key(name) > natural_key(self._previous.checkpoint_name):
                self._previous = manifest
        return True

    def _superseded(self, name: str) -> bool:
        """True (and reported once) for a folder older than a checkpoint of the same shape already committed."""
        if self._newest is None:
            self._newest = {}
            job_id, rank = self.ident.job_id, self.ident.rank
            for other in sorted(self.store.list_dir(layout.checkpoints_prefix(job_id)).dirs,
                                key=natural_key, reverse=True):
                if _shape(other) not in self._newest and self.store.exists(layout.manifest_key(job_id, other, rank)):
                    self._newest[_shape(other)] = natural_key(other)
        newest = self._newest.get(_shape(name))
        if newest is None or natural_key(name) >= newest:
            return False
        self._done.add(name)
        self.reporter.warn(f"sync: {name} is older than a checkpoint this job already committed; not uploading it "
                           "(it would become the latest)", event="sync_superseded", checkpoint=name)
        return True

    def _quiet(self, seen: _Seen, now: float) -> bool:
        q = self.options.quiet_seconds
        return now - seen.since >= q or time.time_ns() - seen.newest_ctime_ns >= q * 1e9

    def _not_ready(self, name: str, folder: Path, seen: _Seen, now: float, writers: set[str] | None,
                   finishing: bool) -> str | None:
        if not self._quiet(seen, now):
            return WRITING
        if writers:
            prefix = os.path.realpath(folder) + os.sep
            held = sorted(w[len(prefix):] for w in writers if w.startswith(prefix))
            if held:
                return f"{OPEN} ({held[0]})"
        if not seen.files:
            return EMPTY
        marker = self.options.complete_file
        if marker:
            problem = None
            path = folder / marker
            if not path.is_file():
                problem = f"incomplete: no {marker}"
            elif marker.endswith(".json"):
                try:
                    json.loads(path.read_bytes())
                except (OSError, ValueError):
                    problem = f"incomplete: {marker} is not valid JSON"
            if problem:
                if not seen.warned and not finishing:
                    seen.warned = True
                    self.reporter.warn(
                        f"sync: {name} has been quiet for {self.options.quiet_seconds:g} s but is {problem}; "
                        "waiting for it (CKPT_AGENT_COMPLETE_FILE= / --complete-file '' uploads on quiet alone)")
                return problem
        return None

    def _commit(self, name: str, folder: Path, seen: _Seen, finishing: bool) -> str | None:
        ident = replace(self.ident, name=name)
        cancel = Cancel()
        with self._lock:
            if self._expired:
                return NOT_STARTED
            self._cancel = cancel
        total = sum(f.size for f in seen.files)
        copied: list[str] = []
        started = time.monotonic()
        sink = self.reporter.progress(total, f"upload {name}")
        try:
            manifest = commit_checkpoint(self.store, folder, ident, self.workers, sink, cancel,
                                         previous=self._previous, expected=seen.files, copied=copied)
        except CheckpointChanged as exc:
            self.reporter.info(f"sync: {name}: {exc}; it starts over once quiet")
            seen.files, seen.since = (), time.monotonic()  # differs from any scan: quiet starts again
            return CHANGED
        except Interrupted:
            return CUT
        except StoreError as exc:
            seen.failures += 1
            seen.retry_at = time.monotonic() + min(60.0, 2.0 ** (seen.failures - 1))
            self.reporter.warn(f"sync: {name}: upload failed ({exc}); will retry")
            return f"{FAILED}: {exc}"
        finally:
            sink.close()
            with self._lock:
                self._cancel = None
        seconds = time.monotonic() - started
        self._done.add(name)
        self._seen.pop(name, None)
        self._previous = manifest
        self.result.committed.append(name)
        if self._newest is not None:
            shape = _shape(name)
            self._newest[shape] = max(self._newest.get(shape, ()), natural_key(name))
        extra = f", {len(copied)} copied inside the store" if copied else ""
        self.reporter.info(f"sync: committed {name}: {len(manifest.files)} files, "
                           f"{human_bytes(manifest.total_bytes)} in {seconds:.1f} s{extra}",
                           event="sync_committed", checkpoint=name, files=len(manifest.files),
                           bytes=manifest.total_bytes, seconds=round(seconds, 3), copied=len(copied))
        if self.options.keep_last:
            self._retain(name)
        return None

    def _retain(self, just_committed: str) -> None:
        """Delete this rank's older committed checkpoints beyond keep_last: manifest first, then files."""
        job_id, rank = self.ident.job_id, self.ident.rank
        try:
            names = self.store.list_dir(layout.checkpoints_prefix(job_id)).dirs
            committed = []
            for name in names:
                if name == just_committed:
                    continue
                if self.store.exists(layout.manifest_key(job_id, name, rank)):
                    manifest = read_manifest(self.store, job_id, name, rank)
                    committed.append((manifest.committed_at, natural_key(name), name))
            committed.sort(reverse=True)
            for _, _, name in committed[self.options.keep_last - 1:]:
                self.store.delete(layout.manifest_key(job_id, name, rank))
                for prefix in (layout.rank_prefix(job_id, name, rank), layout.packs_prefix(job_id, name, rank)):
                    for key in self.store.list_recursive(prefix):
                        self.store.delete(key)
                self.reporter.info(f"sync: keep-last {self.options.keep_last}: deleted {name} (rank {rank})",
                                   event="sync_deleted", checkpoint=name)
        except AgentError as exc:
            self.reporter.warn(f"sync: keep-last: could not delete older checkpoints ({exc}); will try again")


def run_standalone(sidecar: Sidecar, once: bool, reporter: Reporter) -> int:
    """`ckpt-agent sync`: the loop in a worker thread, signals noted by the main thread.

    SIGTERM/SIGINT: finish the upload in flight and whatever else is ready now within the grace
    period, then exit 0 (what could not finish is reported). `once`: one pass, then exit.
    """
    sidecar.check_job()
    box: dict = {}
    signals: list[int] = []

    def handler(signum: int, _frame) -> None:
        signals.append(signum)  # only note it: the main thread acts on it

    def work() -> None:
        try:
            box["result"] = sidecar.run(once=once)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread
            box["error"] = exc

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    worker = threading.Thread(target=work, name="ckpt-sync", daemon=True)
    worker.start()
    hard_stop: float | None = None
    while worker.is_alive():
        worker.join(0.1)
        if signals and hard_stop is None:
            grace = sidecar.options.grace_seconds
            reporter.info(f"sync: {signal.Signals(signals[0]).name}: finishing what is ready within {grace:g} s")
            sidecar.finish(time.monotonic() + grace, wait_for_writers=False)
            hard_stop = time.monotonic() + grace + 5
        if hard_stop is not None and time.monotonic() > hard_stop:
            reporter.warn("sync: the upload did not stop in time; exiting")
            return 0
    if "error" in box:
        raise box["error"]
    if signals:
        return 0
    result: SyncResult = box["result"]
    failed = [why for why in result.not_committed.values() if why.startswith(FAILED)]
    return StoreError.exit_code if failed else 0
