"""Node r > 0 of a multi-node job: what the leader committed, and this node's "nothing here" records.

The marker that completes a collective save (HF's trainer_state.json, DCP's .metadata, DeepSpeed's
`latest`) is written on the leader only, so the leader's commit of a name stands for it on every
node (ckpt_agent.sync.readiness). A checkpoint the leader committed that this node has no files of
(a save only the leader writes) is recorded as "nothing here", so it can become complete for the
job, once this node can vouch that no writer of it is left (`nothing_due`; docs/sidecar.md,
multi-node column). Files of it that appear after the record are still committed: the manifest
replaces the record.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping

from ckpt_agent.config.sidecar import SyncOptions
from ckpt_agent.errors import AgentError, StoreError
from ckpt_agent.report import Reporter, utc_now
from ckpt_agent.runtime.pool import map_tasks
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import Store
from ckpt_agent.stores.catalog import rank_commits, valid_names
from ckpt_agent.stores.manifest import leader_stopped_record, natural_key, nothing_here_record
from ckpt_agent.sync.formats import shape
from ckpt_agent.sync.retention import retain
from ckpt_agent.upload.commit import CheckpointId


def nothing_due(absent_for: float, grace: float, writer_gone: bool, moved_on: bool) -> bool:
    """May this node record that it has nothing of a checkpoint the leader committed, absent here
    for `absent_for` seconds? At once when no writer of it can be left on this node: the trainer
    has exited (`writer_gone`), or it has since saved a later checkpoint of the same shape here
    (`moved_on`: a trainer saves in step order). Otherwise only after `grace` seconds."""
    return writer_gone or moved_on or absent_for >= grace


def moved_on(name: str, here: Mapping[str, bool]) -> bool:
    """A later step of the same shape (`checkpoint-20` for `checkpoint-10`) holds files on this node."""
    return any(has_files and shape(other) == shape(name) and natural_key(other) > natural_key(name)
               for other, has_files in here.items())


def leader_mark(store: Store, ident: CheckpointId, stopped: bool) -> None:
    """The leader of a multi-node job: removes its "stopped" mark before its trainer starts, and writes
    it when its sidecar stops, after its final flush (or gives up): the other nodes' flushes then stop
    watching for its commits. Failing to write it only makes them wait out their grace period."""
    key = layout.leader_stopped_key(ident.job_id)
    if not stopped:
        store.delete(key)
        return
    with contextlib.suppress(AgentError):
        store.write_bytes(key, leader_stopped_record(ident.job_id, utc_now()).encode())


class Nodes:
    """The leader's commits as node `ident.rank` (> 0) sees them, and its own "nothing here" records."""

    def __init__(self, store: Store, ident: CheckpointId, options: SyncOptions, reporter: Reporter) -> None:
        self.store, self.ident, self.options, self.reporter = store, ident, options, reporter
        self.recorded: list[str] = []  # this run
        self._leader: set[str] = set()  # the leader committed it (a commit stays)
        self._settled: set[str] = set()  # this node's manifest or record is in the store, or never ours to record
        self._records: set[str] = set()  # names with a record of this node in the store
        self._absent: dict[str, float] = {}  # leader-committed, no files here: since when (monotonic)

    def start(self) -> None:
        """Before the trainer starts: a checkpoint already in the store (even in part) is never vouched
        for. This node's files of it may have been lost with an earlier container, so an absence proves
        nothing; files of it that are here are still committed the usual way."""
        self._sweep_names(lambda name, leader: self._settled.add(name))

    def lingering(self, until: float) -> bool:
        """In this node's final flush: may the leader still commit? Until `until` (monotonic), and only
        while its sidecar has not stopped (a store that does not answer only makes us wait longer)."""
        if time.monotonic() >= until:
            return False
        try:
            return not self.store.exists(layout.leader_stopped_key(self.ident.job_id))
        except StoreError:
            return True

    def leader_committed(self, name: str) -> bool:
        if name not in self._leader and self.store.exists(layout.manifest_key(self.ident.job_id, name, 0)):
            self._leader.add(name)
        return name in self._leader

    def committed(self, name: str) -> None:
        """This node just committed its files of `name`: its manifest replaces a record it made earlier."""
        self._settled.add(name)
        self._absent.pop(name, None)
        if name in self._records:
            self.store.delete(layout.nothing_key(self.ident.job_id, name, self.ident.rank))
            self._records.discard(name)

    def sweep(self, here: Mapping[str, bool], writer_gone: bool) -> None:
        """Record "nothing here" for each checkpoint the leader committed that is due (`nothing_due`).
        `here`: every checkpoint on this node -> whether it holds files (one with files is committed
        the usual way, never recorded)."""
        now = time.monotonic()

        def consider(name: str, leader: bool) -> None:
            if not leader:
                return
            if here.get(name):
                self._absent.pop(name, None)
                return
            since = self._absent.setdefault(name, now)
            if nothing_due(now - since, self.options.nothing_here_seconds, writer_gone, moved_on(name, here)):
                self._record(name)

        self._sweep_names(consider)

    def waiting(self) -> list[str]:
        """Checkpoints the leader committed that this node is waiting to record (for the summary)."""
        return sorted(self._absent, key=natural_key)

    def _sweep_names(self, consider: Callable[[str, bool], None]) -> None:
        """`consider(name, leader_committed)` for each checkpoint of the job this node has not settled."""
        job_id, rank = self.ident.job_id, self.ident.rank
        prefix = layout.checkpoints_prefix(job_id)
        listed = valid_names(self.store.list_dir(prefix).dirs, prefix, self.reporter.warn)
        todo = sorted((name for name in listed if name not in self._settled), key=natural_key)
        for name, ranks in zip(todo, map_tasks(lambda n: rank_commits(self.store, job_id, n), todo), strict=True):
            if rank in ranks.nothing:
                self._records.add(name)
            if rank in ranks.manifests or rank in ranks.nothing:
                self._settled.add(name)
                continue
            if 0 in ranks.manifests:
                self._leader.add(name)
            consider(name, 0 in ranks.manifests)

    def _record(self, name: str) -> None:
        ident = self.ident
        body = nothing_here_record(ident.job_id, name, ident.rank, utc_now())
        self.store.write_bytes(layout.nothing_key(ident.job_id, name, ident.rank), body.encode())
        self._settled.add(name)
        self._records.add(name)
        self._absent.pop(name, None)
        self.recorded.append(name)
        self.reporter.info(f"sync: node {ident.rank} has nothing of {name}, which the leader committed: recorded, "
                           "so the checkpoint is complete for the job", event="sync_nothing_here", checkpoint=name)
        if self.options.keep_last:  # the record may be what completes it: older ones may go now
            retain(self.store, ident.job_id, ident.num_nodes, name, self.options.keep_last, self.reporter)
