"""`ckpt-agent sync`: uploads checkpoints from BT_CHECKPOINT_DIR as training writes them.

Each top-level folder, and each top-level `*.ckpt`/`*.pt`/`*.pth`/`*.safetensors`/`*.bin` file,
is one checkpoint, named after it. agent.formats recognises its format and says when it is
complete; on top of that it must be quiet (no change for `quiet_seconds`, seen across polls or
by every ctime being that old, so `--once` needs no history) and no process we can see may
hold a file in it open for writing. Every other top-level entry is reported once, with why it
is left out, and counted in the summary.

A file that changes during the upload makes commit_checkpoint refuse to write the manifest;
the checkpoint waits to be quiet again and starts over. Checkpoints are committed one at a
time in natural name order, so "latest" (by commit time) follows the training steps; for the
same reason a checkpoint older than one of the same shape this job has already committed is
never uploaded: it would become "latest".

The loop never reads os.environ: SyncOptions come from cli.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent import layout, observe
from agent.cancel import Cancel
from agent.errors import AgentError, ConfigError, Interrupted, StoreError
from agent.formats import (
    DCP_METADATA,
    HF_STATE,
    Candidate,
    Facts,
    Format,
    NotReady,
    Trainer,
    Why,
    classify,
    folder_format,
    readiness,
)
from agent.manifest import FILE_KIND, Manifest, natural_key
from agent.report import Reporter, human_bytes
from agent.resolve import read_job, read_manifest
from agent.save import CheckpointChanged, CheckpointId, LocalFile, UnsafeEntry, commit_checkpoint
from agent.stores.base import Store
from agent.syncopts import SyncOptions

# In a final flush a checkpoint whose upload keeps failing is given up after this many tries.
FLUSH_ATTEMPTS = 3


@dataclass
class _Seen:
    """One checkpoint as the last poll saw it."""

    files: tuple[LocalFile, ...]
    newest_ctime_ns: int
    since: float  # monotonic time this exact state was first seen
    failures: int = 0
    retry_at: float = 0.0
    warned: bool = False


@dataclass
class SyncResult:
    committed: list[str] = field(default_factory=list)
    not_committed: dict[str, NotReady] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # top-level entries not uploaded, and why
    failed: AgentError | None = None


def _shape(name: str) -> str:
    """checkpoint-20 and checkpoint-300 have one shape, so their steps can be compared."""
    return re.sub(r"\d+", "#", name)


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
        self._committed_files: dict[str, tuple[int, int]] = {}  # single files we committed: (size, mtime)
        self._warned_missing = self._warned_blind = False
        self._sighted = False  # once another process's open files were visible, they stay visible
        self._trainer = Trainer.UNSUPERVISED
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

    def trainer_started(self, pid: int) -> None:
        """Supervise mode: from now on the trainer's exit status decides folders of no known format.

        Seeing the trainer's open files once means we are not blind, even when, after it exits,
        no other process is left to see (the fast final flush relies on that)."""
        self._trainer = Trainer.RUNNING
        self._sighted = observe.can_see(pid)

    def finish(self, deadline: float | None, wait_for_writers: bool, trainer_status: int | None = None) -> None:
        """Stop watching and flush. `deadline` (monotonic) bounds the flush and the upload in flight.

        wait_for_writers: keep going while checkpoints are still being written (the trainer has
        exited and may have left writers behind); otherwise one last pass over what is ready now.
        trainer_status: the supervised trainer's exit status (0 completes folders of no known format).
        """
        with self._lock:
            if trainer_status is not None:
                self._trainer = Trainer.EXITED_OK if trainer_status == 0 else Trainer.FAILED
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
        marker = (f"folders complete when {' or '.join(o.rules.markers)} is there" if o.rules.markers
                  else "HF Trainer, DCP, DeepSpeed folders and single files recognised")
        if o.rules.commit_on_quiet:
            marker += "; folders of no known format on quiet alone"
        self.reporter.info(
            f"sync: watching {o.checkpoint_dir} for job {self.ident.job_id} (project {self.ident.project_name}, "
            f"rank {self.ident.rank} of {self.ident.num_nodes}) -> {self.store.describe()}; quiet "
            f"{o.quiet_seconds:g} s, {marker}" + (f", keep last {o.keep_last}" if o.keep_last else ""))
        if once:
            self.finish(None, wait_for_writers=False)
        pending: dict[str, NotReady] = {}
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
                    if not any(why.may_still_finish(self._trainer) or self._retry(name, why)
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

    def _retry(self, name: str, why: NotReady) -> bool:
        seen = self._seen.get(name)
        return why.why is Why.FAILED and seen is not None and seen.failures < FLUSH_ATTEMPTS

    def _summary(self) -> None:
        for name, why in sorted(self.result.not_committed.items(), key=lambda kv: natural_key(kv[0])):
            self.reporter.warn(f"sync: {name} NOT committed: {why}", event="sync_not_committed",
                               checkpoint=name, reason=str(why), why=why.why.name)
        done = ", ".join(self.result.committed) or "none"
        left = self.result.left_out
        shown = ", ".join(sorted(left, key=natural_key)[:5]) + (" ..." if len(left) > 5 else "")
        self.reporter.info(f"sync: stopped; committed this run: {done}; "
                           f"not committed: {len(self.result.not_committed)}; "
                           f"left out (not uploaded): {len(left)}" + (f" ({shown})" if left else ""),
                           event="sync_stopped", committed=list(self.result.committed),
                           not_committed=len(self.result.not_committed), left_out=sorted(left))

    def _entries(self) -> list[Candidate]:
        """The checkpoints at the top level; every other entry is reported once, when it appears."""
        root = self.options.checkpoint_dir
        try:
            entries = observe.top_entries(root)
        except FileNotFoundError:
            if not self._warned_missing:
                self.reporter.info(f"sync: {root} does not exist yet; waiting for checkpoints")
                self._warned_missing = True
            return []
        except OSError as exc:
            raise ConfigError(f"BT_CHECKPOINT_DIR={root}: cannot be read: {exc.strerror}") from None
        found, skipped = classify(entries, str(root))
        for s in skipped:
            if s.name not in self.result.left_out:
                self.result.left_out[s.name] = str(s)
                self.reporter.warn(f"sync: {s.name} is not uploaded: {s}", event="sync_left_out",
                                   entry=s.name, reason=str(s), why=s.skip.name)
        return found

    def _pass(self, finishing: bool) -> dict[str, NotReady]:
        """One look at every checkpoint; commits the ready ones. Returns name -> why not yet."""
        pending: dict[str, NotReady] = {}
        root = self.options.checkpoint_dir
        latest = None
        for entry in self._entries():
            name = entry.name
            if name in self._done:
                self._rewritten(name)
                continue
            if self._expired:
                pending[name] = NotReady(Why.NOT_STARTED)
                continue
            if name not in self._checked:
                if self._already_committed(name):
                    continue
                self._checked.add(name)
            if self._superseded(name):
                continue
            path = root / name
            try:
                snap = observe.snapshot(path)
            except UnsafeEntry as exc:
                pending[name] = self._unsafe(name, str(exc))
                continue
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
                pending[name] = NotReady(Why.FAILED, "waiting to retry")
                continue
            if latest is None:
                latest = observe.deepspeed_latest(root) or ""
            why = self._not_ready(entry, path, seen, now, latest or None, finishing)
            if why is None:
                why = self._commit(name, path, seen)
            if why is not None:
                pending[name] = why
        return pending

    def _rewritten(self, name: str) -> None:
        """A single file saved again under a committed name (a `last.ckpt` copy): reported once, not lost silently."""
        state = self._committed_files.get(name)
        if state is None:
            return
        try:
            st = os.lstat(self.options.checkpoint_dir / name)
        except OSError:
            return
        if (st.st_size, st.st_mtime_ns) != state:
            del self._committed_files[name]
            why = "rewritten after it was committed; a name is committed once (save each checkpoint under a new name)"
            self.result.left_out[name] = why
            self.reporter.warn(f"sync: {name} is not uploaded again: {why}", event="sync_left_out",
                               entry=name, reason=why, why="REWRITTEN")

    def _unsafe(self, name: str, problem: str) -> NotReady:
        """A link out, a FIFO or a symlinked folder inside: reported once, never read through."""
        if name not in self._seen or not self._seen[name].warned:
            self._seen[name] = _Seen((), 0, time.monotonic(), warned=True)
            self.reporter.warn(f"sync: {name} is not uploaded while it holds {problem}",
                               event="sync_unsafe", checkpoint=name, reason=problem)
        return NotReady(Why.UNSAFE, problem)

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

    def _facts(self, entry: Candidate, path: Path, seen: _Seen, quiet: bool, latest: str | None) -> Facts:
        files = tuple(f.rel for f in seen.files)
        look = quiet or self._finishing  # otherwise it is still being written: no need to look closer
        writers = observe.open_for_writing(self.options.checkpoint_dir) if look else None
        held = None
        if writers is not None:
            self._sighted = self._sighted or not writers.blind
            if not self._sighted and not self._warned_blind:
                self._warned_blind = True
                self.reporter.warn(
                    "sync: cannot see any other process's open files (a separate container or PID namespace, "
                    "or another user): the open-file check is blind, so each format's own completion rule "
                    "decides (docs/sidecar.md, formats table)", event="sync_blind")
            real = os.path.realpath(path)
            held = next((w[len(real):].lstrip(os.sep) or entry.name for w in sorted(writers.paths)
                         if w == real or w.startswith(real + os.sep)), None)
        fmt = Format.FILE if entry.is_file else folder_format(entry.name, files, self.options.rules, latest)
        wanted = {Format.MARKER: self.options.rules.markers, Format.HF: (HF_STATE,),
                  Format.DCP: (DCP_METADATA,)}.get(fmt, ())
        return Facts(
            format=fmt, files=files, quiet=quiet, writing=held, blind=not self._sighted,
            markers=observe.markers(path, wanted) if wanted and look else None,
            structure=observe.structure(seen.files[0]) if entry.is_file and seen.files else None,
            deepspeed_latest=latest, name=entry.name)

    def _not_ready(self, entry: Candidate, path: Path, seen: _Seen, now: float, latest: str | None,
                   finishing: bool) -> NotReady | None:
        quiet = self._quiet(seen, now)
        if not quiet and not finishing:
            return NotReady(Why.WRITING)
        facts = self._facts(entry, path, seen, quiet, latest)
        why = readiness(facts, self.options.rules, self._trainer, flushing=finishing and self._wait_for_writers)
        if (why is not None and quiet and not seen.warned and not finishing
                and why.why not in (Why.WRITING, Why.OPEN)):
            seen.warned = True
            self.reporter.warn(f"sync: {entry.name} has been quiet for {self.options.quiet_seconds:g} s but is "
                               f"not committed yet: {why}", event="sync_waiting", checkpoint=entry.name,
                               reason=str(why), why=why.why.name)
        return why

    def _commit(self, name: str, folder: Path, seen: _Seen) -> NotReady | None:
        ident = replace(self.ident, name=name)
        cancel = Cancel()
        with self._lock:
            if self._expired:
                return NotReady(Why.NOT_STARTED)
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
            return NotReady(Why.CHANGED)
        except UnsafeEntry as exc:
            return self._unsafe(name, str(exc))
        except Interrupted:
            return NotReady(Why.CUT)
        except StoreError as exc:
            seen.failures += 1
            seen.retry_at = time.monotonic() + min(60.0, 2.0 ** (seen.failures - 1))
            self.reporter.warn(f"sync: {name}: upload failed ({exc}); will retry")
            return NotReady(Why.FAILED, str(exc))
        finally:
            sink.close()
            with self._lock:
                self._cancel = None
        seconds = time.monotonic() - started
        self._done.add(name)
        self._seen.pop(name, None)
        self._previous = manifest
        self.result.committed.append(name)
        if manifest.kind == FILE_KIND:
            self._committed_files[name] = (seen.files[0].size, seen.files[0].mtime_ns)
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
    failed = [why for why in result.not_committed.values() if why.why is Why.FAILED]
    return StoreError.exit_code if failed else 0
