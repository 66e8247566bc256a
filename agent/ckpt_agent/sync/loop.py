"""The sync loop: polls BT_CHECKPOINT_DIR, commits each checkpoint once it is ready, flushes at the end.

Each top-level folder, and each top-level `*.ckpt`/`*.pt`/`*.pth`/`*.safetensors`/`*.bin` file,
is one checkpoint, named after it (ckpt_agent.sync.formats). ckpt_agent.sync.readiness says when it may be
committed; every other top-level entry is reported once, with why it is left out, and counted in
the summary. A file that changes during the upload makes commit_checkpoint refuse to write the
manifest; the checkpoint waits to be quiet again and starts over.

The loop never reads os.environ: SyncOptions come from ckpt_agent.config.settings.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from ckpt_agent.config.sidecar import SyncOptions
from ckpt_agent.errors import (
    AgentError,
    CheckpointChanged,
    ConfigError,
    Interrupted,
    StoreError,
    TransientError,
    UnsafeEntry,
)
from ckpt_agent.report import Reporter, human_bytes
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.runtime.ratelimit import limiter
from ckpt_agent.runtime.retry import Backoff, retry
from ckpt_agent.stores.base import Store
from ckpt_agent.stores.catalog import read_job
from ckpt_agent.sync import observe
from ckpt_agent.sync.formats import Candidate, classify
from ckpt_agent.sync.ledger import REWRITTEN, Ledger
from ckpt_agent.sync.nodes import Nodes, leader_mark
from ckpt_agent.sync.readiness import NotReady, Trainer, Why, is_quiet, readiness
from ckpt_agent.sync.retention import retain
from ckpt_agent.sync.summary import SyncResult, announce, summarize
from ckpt_agent.sync.watch import Seen, Watch
from ckpt_agent.upload.commit import CheckpointId, CommitRequest, check_job, commit_checkpoint
from ckpt_agent.upload.incremental import Transferred, describe

# In a final flush a checkpoint whose upload (or the store's listing) keeps failing is given up after this many tries.
FLUSH_ATTEMPTS = 3
UPLOAD_BACKOFF = Backoff(attempts=FLUSH_ATTEMPTS, base=1.0, cap=60.0)


class _Unanswered(TransientError):
    """The store did not answer a pass while the sidecar may still wait for it: retried."""


class Sidecar:
    """The sync loop. `run()` blocks; `finish()` (from another thread) turns it into a final flush."""

    def __init__(self, store: Store, ident: CheckpointId, options: SyncOptions, workers: int,
                 reporter: Reporter, *, max_rate: int | None = None) -> None:
        self.store, self.ident, self.options = store, ident, options
        self.workers, self.reporter, self.max_rate = workers, reporter, max_rate
        self.result = SyncResult()
        self._ledger = Ledger(store, ident, reporter)
        self._watch = Watch(options, reporter)
        self._warned_missing = self._finishing = self._wait_for_writers = self._expired = False
        self._trainer = Trainer.UNSUPERVISED
        self._lock, self._wake = threading.Lock(), threading.Event()
        self._deadline: float | None = None
        self._timer: threading.Timer | None = None
        self._cancel: Cancel | None = None
        self._pending: dict[str, NotReady] = {}  # the last pass: name -> why not committed yet
        # node r > 0 of a multi-node job: the leader's commits, and until when a flush keeps watching them
        self._nodes = Nodes(store, ident, options, reporter) if ident.rank > 0 else None
        self._linger_until = 0.0
        self._leads = ident.rank == 0 and ident.num_nodes > 1  # the leader of a multi-node job

    # -- control, from other threads ------------------------------------------------------

    def check_job(self) -> None:
        """Fail early (ConfigError/StoreError) if the job belongs to another project or has another node
        count, or the store is unreachable. Before the trainer starts (Nodes.start, leader_mark)."""
        check_job(read_job(self.store, self.ident.job_id), self.ident, "BT_TRAINING_PROJECT_NAME", "BT_GROUP_SIZE")
        if self._nodes is not None:
            self._nodes.start()
        if self._leads:
            leader_mark(self.store, self.ident, stopped=False)

    def trainer_started(self, pid: int) -> None:
        """Supervise mode: from now on the trainer's exit status decides folders of no known format.

        Seeing the trainer's open files once means we are not blind, even when, after it exits,
        no other process is left to see (the fast final flush relies on that)."""
        self._trainer = Trainer.RUNNING
        self._watch.sighted = observe.can_see(pid)

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
            if self._nodes is not None and (wait_for_writers or deadline is not None) and not self._linger_until:
                # the leader commits its last checkpoints after its trainer exits, maybe after ours did
                self._linger_until = time.monotonic() + self.options.grace_seconds
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
        announce(self.reporter, self.store.describe(), self.ident, self.options)
        if once:
            self.finish(None, wait_for_writers=False)
        try:
            self._loop()
        except AgentError as exc:
            self.result.failed = exc
            raise
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self.result.not_committed = dict(self._pending)
            if self._nodes is not None:
                self.result.nothing_here, self.result.nothing_waiting = self._nodes.recorded, self._nodes.waiting()
            summarize(self.reporter, self.result)
            if self._leads:
                leader_mark(self.store, self.ident, stopped=True)
        return self.result

    def _loop(self) -> None:
        while True:
            # before the pass, so the pass sees every commit the leader made before it stopped
            lingering = self._nodes is not None and self._nodes.lingering(self._linger_until)
            self._pending, finishing, waiting = self._look()
            if self._expired or (finishing and not (waiting and self._may_still_commit()) and not lingering):
                return
            self._wake.wait(self.options.poll_seconds)
            self._wake.clear()

    def _look(self) -> tuple[dict[str, NotReady], bool, bool]:
        """One pass, and whether it was a flush (waiting for writers). A store that does not answer
        (listing or looking it up: the network, not a checkpoint) is asked again after a backoff
        for as long as the sidecar watches, and FLUSH_ATTEMPTS times in all once it flushes."""
        failures = 0

        def attempt() -> tuple[dict[str, NotReady], bool, bool]:
            nonlocal failures
            with self._lock:
                finishing, waiting = self._finishing, self._wait_for_writers
            try:
                return self._pass(finishing), finishing, waiting
            except StoreError as exc:
                failures += 1
                if finishing and failures >= FLUSH_ATTEMPTS:
                    raise
                self.reporter.warn(f"sync: the store did not answer ({exc}); trying again")
                raise _Unanswered(str(exc)) from exc

        store_backoff = Backoff(attempts=sys.maxsize, base=2 * self.options.poll_seconds, cap=60.0)
        return retry(attempt, store_backoff, sleep=self._wake.wait, retry_on=_Unanswered)

    def _may_still_commit(self) -> bool:
        """In a flush that waits for writers: is any checkpoint still worth another pass?"""
        return any(why.may_still_finish(self._trainer)
                   or (why.why is Why.FAILED and self._watch.may_retry(name, FLUSH_ATTEMPTS))
                   for name, why in self._pending.items())

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
            self._left_out(s.name, str(s), s.skip.name)
        return found

    def _left_out(self, name: str, why: str, code: str, again: bool = False) -> None:
        if name in self.result.left_out and not again:
            return
        self.result.left_out[name] = why
        self.reporter.warn(f"sync: {name} is not uploaded{' again' if again else ''}: {why}", event="sync_left_out",
                           entry=name, reason=why, why=code)

    def _pass(self, finishing: bool) -> dict[str, NotReady]:
        """One look at every checkpoint; commits the ready ones. Returns name -> why not yet."""
        pending: dict[str, NotReady] = {}
        here: dict[str, bool] = {}  # every checkpoint on this node -> whether it holds files
        latest: str | None = None
        looked_for_latest = False
        for entry in self._entries():
            name, path = entry.name, self.options.checkpoint_dir / entry.name
            here[name] = True
            if self._ledger.done(name):
                if self._ledger.rewritten(name, path):
                    self._left_out(name, REWRITTEN, "REWRITTEN", again=True)
                continue
            if self._expired:
                pending[name] = NotReady(Why.NOT_STARTED)
                continue
            if self._ledger.committed_before(name) or self._ledger.superseded(name):
                continue
            try:
                seen = self._watch.look(name, path)
            except UnsafeEntry as exc:
                pending[name] = self._watch.unsafe(name, str(exc))
                continue
            if seen is None:
                del here[name]
                continue
            here[name] = bool(seen.files)
            if not finishing and time.monotonic() < seen.retry_at:
                pending[name] = NotReady(Why.FAILED, "waiting to retry")
                continue
            if not looked_for_latest:
                latest, looked_for_latest = observe.deepspeed_latest(self.options.checkpoint_dir), True
            why = self._not_ready(entry, path, seen, latest, finishing)
            if why is None:
                why = self._commit(name, path, seen)
            if why is not None:
                pending[name] = why
        if self._nodes is not None and not self._expired:
            self._nodes.sweep(here, writer_gone=finishing and self._trainer in (Trainer.EXITED_OK, Trainer.FAILED))
        return pending

    def _not_ready(self, entry: Candidate, path: Path, seen: Seen, latest: str | None,
                   finishing: bool) -> NotReady | None:
        quiet = is_quiet(seen.since, seen.newest_ctime_ns, time.monotonic(), time.time_ns(),
                         self.options.quiet_seconds)
        facts = self._watch.facts(entry, path, seen, quiet, latest, look=quiet or finishing)
        if self._nodes is not None and (quiet or finishing):
            facts = replace(facts, leader_committed=self._nodes.leader_committed(entry.name))
        why = readiness(facts, self.options.rules, self._trainer, flushing=finishing and self._wait_for_writers)
        if (why is not None and quiet and not seen.warned and not finishing
                and why.why not in (Why.WRITING, Why.OPEN, Why.LEADER)):
            seen.warned = True
            self.reporter.warn(f"sync: {entry.name} has been quiet for {self.options.quiet_seconds:g} s but is "
                               f"not committed yet: {why}", event="sync_waiting", checkpoint=entry.name,
                               reason=str(why), why=why.why.name)
        return why

    def _commit(self, name: str, path: Path, seen: Seen) -> NotReady | None:
        cancel = Cancel()
        with self._lock:
            if self._expired:
                return NotReady(Why.NOT_STARTED)
            self._cancel = cancel
        request = CommitRequest(path, replace(self.ident, name=name), self.workers,
                                previous=self._ledger.previous, expected=seen.files)
        moved = Transferred()
        started = time.monotonic()
        sink = self.reporter.progress(sum(f.size for f in seen.files), f"upload {name}")
        try:
            limits = limiter(self.max_rate, self.workers, cancel, self.reporter.info)
            manifest = commit_checkpoint(self.store, request, sink, cancel, moved, limits)
        except CheckpointChanged as exc:
            self.reporter.info(f"sync: {name}: {exc}; it starts over once quiet")
            seen.files, seen.since = (), time.monotonic()  # differs from any scan: quiet starts again
            return NotReady(Why.CHANGED)
        except UnsafeEntry as exc:
            return self._watch.unsafe(name, str(exc))
        except Interrupted:
            return NotReady(Why.CUT)
        except StoreError as exc:
            seen.failures += 1
            seen.retry_at = time.monotonic() + UPLOAD_BACKOFF.delay(seen.failures)
            self.reporter.warn(f"sync: {name}: upload failed ({exc}); will retry")
            return NotReady(Why.FAILED, str(exc))
        finally:
            sink.close()
            with self._lock:
                self._cancel = None
        seconds = time.monotonic() - started
        self._ledger.committed(name, manifest, seen.files)
        if self._nodes is not None:
            self._nodes.committed(name)
        self._watch.seen.pop(name, None)
        self.result.committed.append(name)
        self.reporter.info(f"sync: committed {name}: {len(manifest.files)} files, "
                           f"{human_bytes(manifest.total_bytes)} in {seconds:.1f} s ({describe(moved)})",
                           event="sync_committed", checkpoint=name, files=len(manifest.files),
                           bytes=manifest.total_bytes, seconds=round(seconds, 3), copied=len(moved.files_copied),
                           bytes_sent=moved.sent, bytes_copied=moved.copied)
        if self.options.keep_last:
            retain(self.store, self.ident.job_id, self.ident.num_nodes, name, self.options.keep_last, self.reporter)
        return None
