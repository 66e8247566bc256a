"""What this job has already committed, so the sidecar never uploads a name twice or an older step last.

Checkpoints are committed one at a time in natural name order, so "latest" (by commit time)
follows the training steps; for the same reason a checkpoint older than one of the same shape
this job has already committed is never uploaded: it would become "latest". Committed before a
restart counts too: the store is asked once per name.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ckpt_agent.errors import AgentError
from ckpt_agent.report import Reporter
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import Store
from ckpt_agent.stores.catalog import committed_checkpoints, read_manifest
from ckpt_agent.stores.manifest import FILE_KIND, Manifest, natural_key
from ckpt_agent.sync.formats import shape
from ckpt_agent.upload.commit import CheckpointId
from ckpt_agent.upload.scan import LocalFile

REWRITTEN = "rewritten after it was committed; a name is committed once (save each checkpoint under a new name)"


class Ledger:
    def __init__(self, store: Store, ident: CheckpointId, reporter: Reporter) -> None:
        self.store, self.ident, self.reporter = store, ident, reporter
        self.previous: Manifest | None = None  # the newest committed: its files may be copied, not uploaded
        self._checked: set[str] = set()  # looked up in the store once: not committed before we started
        self._done: set[str] = set()  # committed (by us or before a restart), or superseded
        self._newest: dict[str, tuple] | None = None  # name shape -> natural key of the newest committed
        self._files: dict[str, tuple[int, int]] = {}  # single files we committed: (size, mtime)

    def _warn(self, message: str) -> None:
        self.reporter.warn(f"sync: {message}")

    def done(self, name: str) -> bool:
        return name in self._done

    def rewritten(self, name: str, path: Path) -> bool:
        """True, once, for a single file saved again under a committed name (a `last.ckpt` copy)."""
        state = self._files.get(name)
        if state is None:
            return False
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if (st.st_size, st.st_mtime_ns) == state:
            return False
        del self._files[name]
        return True

    def committed_before(self, name: str) -> bool:
        """Committed before this run started (a restarted sidecar): asked of the store once per name."""
        if name in self._checked:
            return False
        key = layout.manifest_key(self.ident.job_id, name, self.ident.rank)
        if not self.store.exists(key):
            self._checked.add(name)
            return False
        self._done.add(name)
        self.reporter.info(f"sync: {name} is already committed; not uploading it again",
                           event="sync_already_committed", checkpoint=name)
        with contextlib.suppress(AgentError):
            manifest = read_manifest(self.store, self.ident.job_id, name, self.ident.rank)
            if self.previous is None or natural_key(name) > natural_key(self.previous.checkpoint_name):
                self.previous = manifest
        return True

    def superseded(self, name: str) -> bool:
        """True (and reported once) for a checkpoint older than one of the same shape already committed."""
        if self._newest is None:
            self._newest = {}
            job_id, rank = self.ident.job_id, self.ident.rank
            for m in committed_checkpoints(self.store, job_id, rank, self._warn, skip_damaged=True):
                self._note_newest(m.checkpoint_name)
        newest = self._newest.get(shape(name))
        if newest is None or natural_key(name) >= newest:
            return False
        self._done.add(name)
        self.reporter.warn(f"sync: {name} is older than a checkpoint this job already committed; not uploading it "
                           "(it would become the latest)", event="sync_superseded", checkpoint=name)
        return True

    def committed(self, name: str, manifest: Manifest, files: tuple[LocalFile, ...]) -> None:
        """We just committed `name` from `files`."""
        self._done.add(name)
        self.previous = manifest
        if manifest.kind == FILE_KIND:
            self._files[name] = (files[0].size, files[0].mtime_ns)
        if self._newest is not None:
            self._note_newest(name)

    def _note_newest(self, name: str) -> None:
        assert self._newest is not None
        self._newest[shape(name)] = max(self._newest.get(shape(name), ()), natural_key(name))
