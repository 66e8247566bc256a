"""Uploads a checkpoint (a folder, or a single file) and commits it: files first, the manifest last.

Used by `ckpt-agent save` and by the sidecar. A file that changes while it is being uploaded
aborts the commit (CheckpointChanged), so a manifest only ever describes bytes that are in the
store. Files are read only through open_regular: never through a link out of the checkpoint,
never blocking on a FIFO.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ckpt_agent.config import names
from ckpt_agent.errors import (
    CheckpointChanged,
    ConfigError,
    NotFoundError,
    StoreError,
    ThrottledError,
)
from ckpt_agent.report import Progress, utc_now
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.runtime.pool import run_tasks
from ckpt_agent.runtime.ratelimit import NO_LIMITS, Limiter
from ckpt_agent.runtime.retry import Backoff, retry
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import Store, upload_in_parts
from ckpt_agent.stores.catalog import read_job
from ckpt_agent.stores.manifest import (
    DEFAULT_PART_SIZE,
    FILE_KIND,
    FOLDER_KIND,
    FileEntry,
    JobRecord,
    Manifest,
    PackEntry,
)
from ckpt_agent.upload.dedup import Segment
from ckpt_agent.upload.incremental import Reuse, Transferred, plan_reuse
from ckpt_agent.upload.packing import Member, Pack, PackReader, assign_packs
from ckpt_agent.upload.scan import LocalFile, PartDigests, difference, open_regular, rescan, scan_checkpoint

# A throttle that outlived the store's own retries: sent again once the gate has cut the requests
# at once and its pause has passed (docs/limits.md).
THROTTLE_BACKOFF = Backoff(attempts=6, base=1.0, cap=10.0)


@dataclass(frozen=True)
class CheckpointId:
    project_name: str | None
    job_id: str
    name: str
    rank: int = 0
    num_nodes: int = 1


def _request(limiter: Limiter, cancel: Cancel, send: Callable[[], None]) -> None:
    """One upload request in a slot of the gate; a throttle that reaches us is tried again."""

    def attempt() -> None:
        with limiter.slot():
            send()

    retry(attempt, THROTTLE_BACKOFF, sleep=cancel.sleep, retry_on=ThrottledError)


def _upload_tasks(store: Store, key: str, f: LocalFile, progress: Progress, limiter: Limiter, cancel: Cancel,
                  moved: Transferred, segments: Sequence[Segment] | None = None) -> Iterator[Callable[[], None]]:
    """One task per part of one file, sharing the pool with every other file; the last completes it.
    Each part is a request of its own at the gate, its body read under the rate cap.

    `segments`: an incremental upload's parts (dedup.plan_segments, sources as store keys), some
    copied inside the store; otherwise every part is uploaded, `upload.part_size` each."""
    size = f.size
    if segments is None:
        upload = store.start_upload(key, size)
        segments = [Segment(s, min(upload.part_size, size - s)) for s in range(0, max(size, 1), upload.part_size)]
    else:
        upload = store.start_upload(key, size, [s.length for s in segments])
    left = [len(segments)]
    lock = threading.Lock()

    def send(index: int, seg: Segment) -> None:
        with os.fdopen(open_regular(f), "rb") as source:
            body = limiter.paced(source)
            _request(limiter, cancel, lambda: upload.put_part(index, body, seg.start, seg.length))

    def copied(index: int, seg: Segment) -> bool:
        """Whether the store copied the part; if it would not (SeaweedFS: InternalError), it was sent."""
        if seg.source is not None:
            src_key = seg.source
            try:
                _request(limiter, cancel, lambda: upload.copy_part(index, src_key, seg.source_start, seg.length))
                return True
            except (StoreError, NotFoundError):
                pass
        send(index, seg)
        return False

    def part(index: int) -> None:
        seg = segments[index]
        try:
            in_store = copied(index, seg)
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                upload.complete()
        except BaseException:
            upload.abort()
            raise
        moved.add(sent=0 if in_store else seg.length, copied=seg.length if in_store else 0)
        progress(seg.length)

    for index in range(left[0]):
        yield partial(part, index)


def _upload_pack(store: Store, key: str, pack: Pack, opener: Callable[[Member], int], limiter: Limiter) -> None:
    upload = store.start_upload(key, pack.size)
    if upload.part_size < pack.size:
        upload.abort()
        store.upload_file(key, limiter.paced(io.BytesIO(PackReader(pack, opener).read())), pack.size)
        return
    upload_in_parts(upload, limiter.paced(PackReader(pack, opener)), pack.size)


def check_job(job: JobRecord | None, ident: CheckpointId, project_field: str = "--project",
              nodes_field: str = "--num-nodes") -> None:
    """A job has one project and one node count, whoever commits to it: `save` on any node, or a
    sidecar. A mismatch is the committer's configuration, named by its field, never a guess: a
    checkpoint counted for the wrong number of nodes would be latest too early or never."""
    if job is None:
        return
    if ident.project_name and job.project_name not in (None, ident.project_name):
        raise ConfigError(f"{project_field}={ident.project_name}: job {ident.job_id} already belongs to "
                          f"project {job.project_name}")
    if job.num_nodes != ident.num_nodes:
        raise ConfigError(f"{nodes_field}={ident.num_nodes}: job {ident.job_id} is recorded as a job of "
                          f"{job.num_nodes} node(s); give every node of a job the same node count")


def ensure_job(store: Store, ident: CheckpointId) -> None:
    """job.json and the project index entry come before the first commit of a job."""
    job = read_job(store, ident.job_id)
    check_job(job, ident)
    if job is None:
        job = JobRecord(ident.job_id, ident.project_name, utc_now(), ident.num_nodes)
        store.write_bytes(layout.job_record_key(ident.job_id), job.to_json().encode())
    if ident.project_name:
        key = layout.project_job_key(ident.project_name, ident.job_id)
        try:
            store.read_bytes(key, limit=layout.MAX_RECORD_BYTES)
        except NotFoundError:
            store.write_bytes(key, job.index_entry().encode())


def _copies_server_side(store: Store) -> bool:
    """Only a backend that overrides copy() copies inside the store; the default reads and rewrites."""
    return type(store).copy is not Store.copy


@dataclass(frozen=True)
class CommitRequest:
    """One checkpoint to commit.

    `previous`: the job's previous manifest. Where the store copies server-side, a file that is
    the same as one there is copied inside the store instead of uploaded, and a file with parts
    whose sha256 equals a part there is assembled from copies of those and uploads of the rest
    (incremental.py). `expected`: the scan the caller judged stable; any difference from it, or
    any change during the upload, raises CheckpointChanged before the manifest is written.
    """

    folder: Path
    ident: CheckpointId
    workers: int
    part_size: int = DEFAULT_PART_SIZE
    previous: Manifest | None = None
    expected: Sequence[LocalFile] | None = None


def commit_checkpoint(store: Store, request: CommitRequest, progress: Progress, cancel: Cancel,
                      moved: Transferred | None = None, limiter: Limiter = NO_LIMITS) -> Manifest:
    """Upload a folder (or a single-file checkpoint) and write its manifest last.

    `moved` is told the bytes sent and copied inside the store, and the files copied whole. Every
    request goes through `limiter`: the rate cap and the throttle gate.
    """
    folder, ident = request.folder, request.ident
    files = _stable_scan(request)
    single = stat.S_ISREG(os.lstat(folder).st_mode)
    ensure_job(store, ident)
    packs = assign_packs([(f.rel, f.path, f.size) for f in files])
    pack_of = {m.rel: (p.id, m.offset) for p in packs for m in p.members}
    digests = PartDigests(files, request.part_size)
    sender = _Sender(store, ident, progress, cancel, Transferred() if moved is None else moved, limiter)
    entries: tuple[FileEntry, ...] | None = None
    if request.previous is not None and _copies_server_side(store):
        # Which parts the store holds already is decided by their sha256: hash first, send the rest.
        run_tasks(digests.tasks(), request.workers, cancel)
        entries = _entries(files, digests, pack_of)
        tasks = sender.tasks(files, packs, plan_reuse(store, request.previous, entries, request.part_size))
    else:  # every byte is sent: each region is hashed while others are on the wire
        tasks = _alternate(digests.tasks(), sender.tasks(files, packs, Reuse({}, {})))
    try:
        run_tasks(tasks, request.workers, cancel)
    except OSError:  # StoreError too: a file that shrank or vanished mid-upload looks like a failed upload
        _unchanged_since(files, request, "while uploading")
        raise
    _unchanged_since(files, request, "while uploading")
    if entries is None:
        entries = _entries(files, digests, pack_of)
    manifest = Manifest(
        project_name=ident.project_name, job_id=ident.job_id, checkpoint_name=ident.name,
        rank=ident.rank, committed_at=utc_now(), part_size=request.part_size,
        files=entries,
        packs=tuple(PackEntry(p.id, p.size) for p in packs),
        kind=FILE_KIND if single else FOLDER_KIND,
    )
    store.write_bytes(layout.manifest_key(ident.job_id, ident.name, ident.rank), manifest.to_json().encode())
    return manifest


def _entries(files: Sequence[LocalFile], digests: PartDigests, pack_of: dict[str, tuple[int, int]]
             ) -> tuple[FileEntry, ...]:
    """The manifest's file entries, once every part is hashed."""
    sums, strong = digests.result()
    entries = []
    for f in files:
        pack, offset = pack_of.get(f.rel, (None, 0))
        entries.append(FileEntry(f.rel, f.size, sums[f.rel], pack=pack, offset=offset, strong=strong[f.rel]))
    return tuple(entries)


def _alternate(*sources: Iterable[Callable[[], None]]) -> Iterator[Callable[[], None]]:
    """Tasks taken in turn from each source, so a pool works on all of them at once."""
    iterators = [iter(s) for s in sources]
    while iterators:
        for it in list(iterators):
            task = next(it, None)
            if task is None:
                iterators.remove(it)
            else:
                yield task


def _stable_scan(request: CommitRequest) -> list[LocalFile]:
    """The files to commit; CheckpointChanged if they are not what the caller judged stable."""
    folder, ident = request.folder, request.ident
    if (problem := names.name_problem(ident.name)) is not None:
        raise ConfigError(f"checkpoint folder {names.quote_name(str(folder))}: its name {problem}; rename it")
    try:
        files = scan_checkpoint(folder)
    except FileNotFoundError as exc:
        raise CheckpointChanged(f"{exc.filename}: vanished while scanning; checkpoint {ident.name} not committed") \
            from None
    if request.expected is not None:
        _unchanged_since(request.expected, request, "since it was judged stable", files)
    return files


def _unchanged_since(files: Sequence[LocalFile], request: CommitRequest, when: str,
                     now: Sequence[LocalFile] | None = None) -> None:
    if (rel := difference(files, rescan(request.folder) if now is None else now)) is not None:
        raise CheckpointChanged(f"{request.folder / rel}: changed {when}; checkpoint {request.ident.name} "
                                "not committed") from None


class _Sender:
    """The upload tasks of one commit, sharing the pool: packs, whole-file copies, parts."""

    def __init__(self, store: Store, ident: CheckpointId, progress: Progress, cancel: Cancel, moved: Transferred,
                 limiter: Limiter) -> None:
        self.store, self.ident, self.progress, self.cancel = store, ident, progress, cancel
        self.moved, self.limiter = moved, limiter

    def tasks(self, files: Sequence[LocalFile], packs: Sequence[Pack], reuse: Reuse) -> Iterator[Callable[[], None]]:
        by_rel = {f.rel: f for f in files}
        for pack in packs:
            yield partial(self._send_pack, pack, by_rel)
        for f in files:
            key = layout.file_key(self.ident.job_id, self.ident.name, self.ident.rank, f.rel)
            if (source := reuse.whole.get(f.rel)) is not None:
                yield partial(self._copy_whole, f, source, key)
            else:
                yield from _upload_tasks(self.store, key, f, self.progress, self.limiter, self.cancel, self.moved,
                                         reuse.segments.get(f.rel))

    def _send_pack(self, pack: Pack, by_rel: dict[str, LocalFile]) -> None:
        key = layout.pack_key(self.ident.job_id, self.ident.name, self.ident.rank, pack.id)

        def open_member(m: Member) -> int:
            return open_regular(by_rel[m.rel])

        _request(self.limiter, self.cancel, lambda: _upload_pack(self.store, key, pack, open_member, self.limiter))
        self.moved.add(sent=pack.size)

    def _copy_whole(self, f: LocalFile, source: str, key: str) -> None:
        try:
            _request(self.limiter, self.cancel, lambda: self.store.copy(source, key))
        except (StoreError, NotFoundError):  # e.g. the previous object is gone: upload it instead
            run_tasks(_upload_tasks(self.store, key, f, self.progress, self.limiter, self.cancel, self.moved),
                      1, self.cancel)
        else:
            self.moved.add(copied=f.size, whole=f.rel)
            self.progress(f.size)
