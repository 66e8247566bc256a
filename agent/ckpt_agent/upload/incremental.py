"""What of a new checkpoint is already in the store: whole files and parts of files copied inside it.

dedup.py decides from the manifests alone; here the store is asked whether the objects to copy
from are still there, whole, and only those are used: a previous object that vanished or changed
size is uploaded from local disk instead, never copied short.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ckpt_agent.errors import AgentError
from ckpt_agent.report import human_bytes
from ckpt_agent.runtime.pool import map_tasks
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import MAX_COPY, Store
from ckpt_agent.stores.catalog import committed_checkpoints
from ckpt_agent.stores.manifest import FileEntry, Manifest
from ckpt_agent.upload.dedup import PartIndex, Segment, index_parts, plan_segments, same_file

# Uploaded runs of an incremental upload are sent in parts of at most this size, so they go in parallel.
UPLOAD_SEGMENT = 64 << 20


@dataclass
class Transferred:
    """What a commit moved: bytes sent from local disk (packs included), bytes copied inside the
    store, and the files copied whole. Added to from the pool's threads."""

    sent: int = 0
    copied: int = 0
    files_copied: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, sent: int = 0, copied: int = 0, whole: str | None = None) -> None:
        with self._lock:
            self.sent += sent
            self.copied += copied
            if whole is not None:
                self.files_copied.append(whole)


@dataclass(frozen=True)
class Reuse:
    """Per path: the store key of a previous object to copy whole, or the segments of an
    incremental upload (sources as store keys). Paths in neither are uploaded as usual."""

    whole: Mapping[str, str]
    segments: Mapping[str, Sequence[Segment]]


def previous_commit(store: Store, job_id: str, rank: int, name: str) -> Manifest | None:
    """The job's newest checkpoint committed by `rank` under another name, for `save` to copy from."""
    return next((m for m in committed_checkpoints(store, job_id, rank, skip_damaged=True)
                 if m.checkpoint_name != name), None)


def _object_size(store: Store, key: str) -> int | None:
    """The object's size as the store reports it; None when it is gone or does not say."""
    try:
        reader = store.open_range(key, 0, 1)
    except AgentError:
        return None
    with contextlib.closing(reader):
        return getattr(reader, "object_size", None)


def plan_reuse(store: Store, previous: Manifest, files: Sequence[FileEntry], part_size: int) -> Reuse:
    """Whole-file copies (up to MAX_COPY: a bigger file that matches whole is copied in parts) and
    incremental uploads, from sources that are still in the store at their committed size."""
    def key(path: str) -> str:
        return layout.file_key(previous.job_id, previous.checkpoint_name, previous.rank, path)

    before = {e.path: e for e in previous.files}
    whole = {f.path: key(f.path) for f in files
             if (e := before.get(f.path)) is not None and e.size <= MAX_COPY
             and same_file(e, f.size, f.parts, f.strong)}
    index = index_parts(previous) if previous.part_size == part_size else {}
    plans = _plans([f for f in files if f.path not in whole], part_size, index)
    used = sorted(whole.keys() | {s.source for plan in plans.values() for s in plan if s.source is not None})
    sizes = map_tasks(lambda path: _object_size(store, key(path)), used)  # one round trip each, at once
    gone = {p for p, size in zip(used, sizes, strict=True) if size != before[p].size}
    if gone:
        whole = {path: k for path, k in whole.items() if path not in gone}
        index = {sha: kept for sha, found in index.items() if (kept := [s for s in found if s.path not in gone])}
        plans = _plans([f for f in files if f.path not in whole], part_size, index)
    return Reuse(whole, {path: [replace(s, source=key(s.source)) if s.source is not None else s for s in plan]
                         for path, plan in plans.items()})


def _plans(files: Sequence[FileEntry], part_size: int, index: PartIndex) -> dict[str, list[Segment]]:
    found = {f.path: plan_segments(f.path, f.size, part_size, f.strong, index, UPLOAD_SEGMENT) for f in files}
    return {path: plan for path, plan in found.items() if plan is not None}


def describe(moved: Transferred) -> str:
    """The summary's words for it: `1.2 GB sent, 20 GB copied inside the store, 3 files whole`."""
    text = f"{human_bytes(moved.sent)} sent, {human_bytes(moved.copied)} copied inside the store"
    return text + (f", {len(moved.files_copied)} files whole" if moved.files_copied else "")

