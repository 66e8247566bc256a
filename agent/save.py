"""Uploads a checkpoint (a folder, or a single file) and commits it: files first, the manifest last.

Used by `ckpt-agent save` and by the sidecar. A file that changes while it is being uploaded
aborts the commit (CheckpointChanged), so a manifest only ever describes bytes that are in the
store. Files are read only through open_regular: never through a link out of the checkpoint,
never blocking on a FIFO.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent import layout
from agent.cancel import Cancel
from agent.dedup import Segment
from agent.errors import EXIT_LOCAL, AgentError, ConfigError, NotFoundError, StoreError, ThrottledError
from agent.incremental import NewFile, Reuse, Transferred, plan_reuse
from agent.manifest import (
    DEFAULT_PART_SIZE,
    FILE_KIND,
    FOLDER_KIND,
    FileEntry,
    JobRecord,
    Manifest,
    PackEntry,
    read_part_digests,
    utc_now,
)
from agent.packing import Member, Pack, PackReader, assign_packs
from agent.pool import run_tasks
from agent.ratelimit import NO_LIMITS, Limiter
from agent.resolve import read_job
from agent.retry import Backoff, retry
from agent.stores.base import Store, upload_in_parts
from agent.sync.formats import kind_of
from agent.transfer import Progress

# Files are checksummed in regions of this size, so one huge file keeps every core busy.
CHECKSUM_REGION = 64 << 20
# A throttle that outlived the store's own retries: sent again once the gate has cut the requests
# at once and its pause has passed (docs/limits.md).
THROTTLE_BACKOFF = Backoff(attempts=6, base=1.0, cap=10.0)


class CheckpointChanged(AgentError):
    """A file changed while the checkpoint was uploaded; the commit was not written."""

    exit_code = EXIT_LOCAL


@dataclass(frozen=True)
class CheckpointId:
    project_name: str | None
    job_id: str
    name: str
    rank: int = 0
    num_nodes: int = 1


@dataclass(frozen=True)
class LocalFile:
    rel: str
    path: Path
    size: int
    mtime_ns: int
    ino: int = 0
    ctime_ns: int = 0
    dev: int = 0


class UnsafeEntry(ConfigError):
    """A link or special file the checkpoint cannot be uploaded with (never read through)."""


def _entry(root_real: str, path: Path, rel: str) -> LocalFile:
    """A regular file, or a symlink to one inside the checkpoint (uploaded as a copy of it);
    anything else is an UnsafeEntry. Only lstat and stat: a FIFO is never opened here."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        if not (target + os.sep).startswith(root_real + os.sep) or target == root_real:
            raise UnsafeEntry(f"{path}: a symlink to outside the checkpoint; it is never followed out "
                              "(copy the file in, or remove the link)")
        try:
            st = os.stat(target)
        except FileNotFoundError:
            raise UnsafeEntry(f"{path}: a symlink to nothing; remove it or point it at a file") from None
        path = Path(target)
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeEntry(f"{path}: a symlinked folder; links to folders are not uploaded (copy it in)")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeEntry(f"{path}: {kind_of(st.st_mode)}, not a regular file; remove it from the checkpoint")
    return LocalFile(rel, path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev)


def scan_checkpoint(path: Path) -> list[LocalFile]:
    """The files of a checkpoint, sorted: a folder's files, or a single-file checkpoint itself.

    A symlink to a file inside the checkpoint is uploaded as a copy of that file; links that lead
    out, dangling links, symlinked folders and special files (FIFOs, sockets, devices) raise
    UnsafeEntry naming the entry.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:  # a FileNotFoundError: the sidecar takes it as a checkpoint that vanished
        raise NotFoundError(f"{path}: does not exist; give the checkpoint folder or file to upload") from None
    if stat.S_ISREG(mode):
        return [_entry(os.path.realpath(path.parent), path, path.name)]
    if not stat.S_ISDIR(mode):
        raise UnsafeEntry(f"{path}: {kind_of(mode)}; give the checkpoint folder or file to upload")
    root_real = os.path.realpath(path)
    found: list[LocalFile] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        base = Path(dirpath)
        for name in dirnames:
            if os.path.islink(base / name):
                raise UnsafeEntry(f"{base / name}: a symlinked folder; links to folders are not uploaded "
                                  "(copy it in, or remove the link)")
        for name in filenames:
            found.append(_entry(root_real, base / name, (base / name).relative_to(path).as_posix()))
    return sorted(found, key=lambda f: f.rel)


def open_regular(f: LocalFile) -> int:
    """A read-only fd of the very file the scan saw: never through a symlink, never blocking on a
    FIFO, and a file replaced since the scan is an OSError (the commit then sees the change)."""
    fd = os.open(f.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (f.dev and (st.st_dev, st.st_ino) != (f.dev, f.ino)):
        os.close(fd)
        raise OSError(errno.ESTALE, "replaced since it was scanned", str(f.path))
    return fd


Digests = dict[str, tuple[str, ...]]


def _checksums(files: Sequence[LocalFile], part_size: int, workers: int, cancel: Cancel) -> tuple[Digests, Digests]:
    """Every file's part crc32c and sha256 (one read), in regions on the pool so one huge file uses every core."""
    region = part_size * max(1, CHECKSUM_REGION // part_size)
    found: dict[tuple[str, int], list[tuple[str, str]]] = {}

    def one(f: LocalFile, start: int) -> None:
        fd = open_regular(f)
        try:
            sums = read_part_digests(fd, start, min(f.size, start + region), part_size,
                                     memoryview(bytearray(min(1 << 20, part_size))))
        finally:
            os.close(fd)
        if sums is None:
            raise FileNotFoundError(errno.ENOENT, "shrank while reading", str(f.path))
        found[(f.rel, start)] = sums

    run_tasks((lambda f=f, s=s: one(f, s) for f in files for s in range(0, max(f.size, 1), region)), workers, cancel)
    both = {f.rel: [d for s in range(0, max(f.size, 1), region) for d in found[(f.rel, s)]] for f in files}
    return ({rel: tuple(crc for crc, _ in d) for rel, d in both.items()},
            {rel: tuple(sha for _, sha in d) for rel, d in both.items()})


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

    def part(index: int) -> None:
        seg = segments[index]
        src_key = seg.source
        try:
            if src_key is None:
                with os.fdopen(open_regular(f), "rb") as source:
                    body = limiter.paced(source)
                    _request(limiter, cancel, lambda: upload.put_part(index, body, seg.start, seg.length))
            else:
                _request(limiter, cancel, lambda: upload.copy_part(index, src_key, seg.source_start, seg.length))
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                upload.complete()
        except BaseException:
            upload.abort()
            raise
        copied = seg.length if src_key is not None else 0
        moved.add(sent=seg.length - copied, copied=copied)
        progress(seg.length)

    for index in range(left[0]):
        yield lambda i=index: part(i)


def _upload_pack(store: Store, key: str, pack: Pack, opener: Callable[[Member], int], limiter: Limiter) -> None:
    upload = store.start_upload(key, pack.size)
    if upload.part_size < pack.size:
        upload.abort()
        store.upload_file(key, limiter.paced(io.BytesIO(PackReader(pack, opener).read())), pack.size)
        return
    upload_in_parts(upload, limiter.paced(PackReader(pack, opener)), pack.size)


def ensure_job(store: Store, ident: CheckpointId) -> None:
    """job.json and the project index entry come before the first commit of a job."""
    job = read_job(store, ident.job_id)
    if job is None:
        job = JobRecord(ident.job_id, ident.project_name, utc_now(), ident.num_nodes)
        store.write_bytes(layout.job_record_key(ident.job_id), job.to_json().encode())
    elif ident.project_name and job.project_name not in (None, ident.project_name):
        raise ConfigError(
            f"--project {ident.project_name}: job {ident.job_id} already belongs to project {job.project_name}"
        )
    if ident.project_name:
        key = layout.project_job_key(ident.project_name, ident.job_id)
        try:
            store.read_bytes(key, limit=layout.MAX_RECORD_BYTES)
        except NotFoundError:
            entry = json.dumps({"job_id": ident.job_id, "created_at": job.created_at})
            store.write_bytes(key, entry.encode())


def _difference(before: Sequence[LocalFile], after: Sequence[LocalFile]) -> str | None:
    """The first path that differs between two scans (size, mtime, ctime, inode, added or removed)."""
    old, new = {f.rel: f for f in before}, {f.rel: f for f in after}
    for rel in sorted(old.keys() | new.keys()):
        if old.get(rel) != new.get(rel):
            return rel
    return None


def _rescan(folder: Path) -> list[LocalFile]:
    """scan_checkpoint, with a folder that vanished (or a file that vanished mid-scan) as no files."""
    try:
        return scan_checkpoint(folder) if os.path.lexists(folder) else []
    except (FileNotFoundError, ConfigError):
        return []


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
    folder, ident, workers, part_size = request.folder, request.ident, request.workers, request.part_size
    previous, expected = request.previous, request.expected
    moved = Transferred() if moved is None else moved
    if (problem := layout.name_problem(ident.name)) is not None:
        raise ConfigError(f"checkpoint folder {layout.quote_name(str(folder))}: its name {problem}; rename it")
    try:
        files = scan_checkpoint(folder)
    except FileNotFoundError as exc:
        raise CheckpointChanged(f"{exc.filename}: vanished while scanning; checkpoint {ident.name} not committed") \
            from None
    single = stat.S_ISREG(os.lstat(folder).st_mode)
    if expected is not None and (rel := _difference(expected, files)) is not None:
        raise CheckpointChanged(f"{folder / rel}: changed since it was judged stable; checkpoint {ident.name} "
                                "not committed")
    ensure_job(store, ident)
    sums, strong = _checksums(files, part_size, workers, cancel)
    reuse = Reuse({}, {})
    if previous is not None and _copies_server_side(store):
        reuse = plan_reuse(store, previous, [NewFile(f.rel, f.size, sums[f.rel], strong[f.rel]) for f in files],
                           part_size)

    def copy_or_upload(f: LocalFile) -> Iterator[Callable[[], None]]:
        key = layout.file_key(ident.job_id, ident.name, ident.rank, f.rel)
        if (source := reuse.whole.get(f.rel)) is not None:
            def copy() -> None:
                try:
                    _request(limiter, cancel, lambda: store.copy(source, key))
                except (StoreError, NotFoundError):  # e.g. the previous object is gone: upload it instead
                    run_tasks(_upload_tasks(store, key, f, progress, limiter, cancel, moved), 1, cancel)
                else:
                    moved.add(copied=f.size, whole=f.rel)
                    progress(f.size)
            yield copy
            return
        yield from _upload_tasks(store, key, f, progress, limiter, cancel, moved, reuse.segments.get(f.rel))

    packs = assign_packs([(f.rel, f.path, f.size) for f in files])
    pack_of = {m.rel: (p.id, m.offset) for p in packs for m in p.members}
    by_rel = {f.rel: f for f in files}

    def open_member(m: Member) -> int:
        return open_regular(by_rel[m.rel])

    def send_pack(pack: Pack) -> None:
        key = layout.pack_key(ident.job_id, ident.name, ident.rank, pack.id)
        _request(limiter, cancel, lambda: _upload_pack(store, key, pack, open_member, limiter))
        moved.add(sent=pack.size)

    def tasks() -> Iterator[Callable[[], None]]:
        for pack in packs:
            yield lambda p=pack: send_pack(p)
        for f in files:
            yield from copy_or_upload(f)

    try:
        run_tasks(tasks(), workers, cancel)
    except OSError:  # StoreError too: a file that shrank or vanished mid-upload looks like a failed upload
        if (rel := _difference(files, _rescan(folder))) is not None:
            raise CheckpointChanged(f"{folder / rel}: changed while uploading; checkpoint {ident.name} "
                                    "not committed") from None
        raise
    if (rel := _difference(files, _rescan(folder))) is not None:
        raise CheckpointChanged(f"{folder / rel}: changed while uploading; checkpoint {ident.name} not committed")
    manifest = Manifest(
        project_name=ident.project_name, job_id=ident.job_id, checkpoint_name=ident.name,
        rank=ident.rank, committed_at=utc_now(), part_size=part_size,
        files=tuple(FileEntry(f.rel, f.size, sums[f.rel], *pack_of.get(f.rel, (None, 0)), strong[f.rel])
                    for f in files),
        packs=tuple(PackEntry(p.id, p.size) for p in packs),
        kind=FILE_KIND if single else FOLDER_KIND,
    )
    store.write_bytes(layout.manifest_key(ident.job_id, ident.name, ident.rank), manifest.to_json().encode())
    return manifest
