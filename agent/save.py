"""Uploads a checkpoint folder and commits it: files first, the manifest last.

Used by `ckpt-agent save` and by the sidecar. A file that changes while it is being uploaded
aborts the commit (CheckpointChanged), so a manifest only ever describes bytes that are in the
store.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent import layout
from agent.cancel import Cancel
from agent.errors import EXIT_LOCAL, AgentError, ConfigError, NotFoundError, StoreError
from agent.manifest import (
    DEFAULT_PART_SIZE,
    FileEntry,
    JobRecord,
    Manifest,
    PackEntry,
    region_checksums,
    utc_now,
)
from agent.packing import Pack, PackReader, assign_packs
from agent.pool import run_tasks
from agent.resolve import read_job
from agent.stores.base import Store, upload_in_parts
from agent.transfer import Progress

# S3 copies at most 5 GiB in one CopyObject; bigger files are uploaded again.
MAX_STORE_COPY = 5 << 30
# Files are checksummed in regions of this size, so one huge file keeps every core busy.
CHECKSUM_REGION = 64 << 20


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


def scan_folder(folder: Path) -> list[LocalFile]:
    """Regular files under `folder` (links to files are read through), sorted by path."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder; give the checkpoint folder to upload")
    found: list[LocalFile] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            st = path.stat()
            rel = path.relative_to(folder).as_posix()
            found.append(LocalFile(rel, path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns))
    return sorted(found, key=lambda f: f.rel)


def _checksums(files: Sequence[LocalFile], part_size: int, workers: int, cancel: Cancel) -> dict[str, tuple[str, ...]]:
    """Every file's part checksums, computed in regions on the pool so one huge file uses every core."""
    region = part_size * max(1, CHECKSUM_REGION // part_size)
    found: dict[tuple[str, int], list[str]] = {}

    def one(f: LocalFile, start: int) -> None:
        found[(f.rel, start)] = region_checksums(f.path, start, min(f.size, start + region), part_size)

    run_tasks((lambda f=f, s=s: one(f, s) for f in files for s in range(0, max(f.size, 1), region)), workers, cancel)
    return {f.rel: tuple(c for s in range(0, max(f.size, 1), region) for c in found[(f.rel, s)]) for f in files}


def _upload_tasks(store: Store, key: str, path: Path, size: int, progress: Progress) -> Iterator[Callable[[], None]]:
    """One task per part of one file, sharing the pool with every other file; the last completes it."""
    upload = store.start_upload(key, size)
    left = [len(range(0, max(size, 1), upload.part_size))]
    lock = threading.Lock()

    def part(index: int) -> None:
        start = index * upload.part_size
        length = min(upload.part_size, size - start)
        try:
            with open(path, "rb") as source:
                upload.put_part(index, source, start, length)
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                upload.complete()
        except BaseException:
            upload.abort()
            raise
        progress(length)

    for index in range(left[0]):
        yield lambda i=index: part(i)


def _upload_pack(store: Store, key: str, pack: Pack) -> None:
    upload = store.start_upload(key, pack.size)
    if upload.part_size < pack.size:
        upload.abort()
        store.upload_file(key, io.BytesIO(PackReader(pack).read()), pack.size)
        return
    upload_in_parts(upload, PackReader(pack), pack.size)


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
    """scan_folder, with a folder that vanished (or a file that vanished mid-scan) as no files."""
    try:
        return scan_folder(folder) if folder.is_dir() else []
    except (FileNotFoundError, ConfigError):
        return []


def _copies_server_side(store: Store) -> bool:
    """Only a backend that overrides copy() copies inside the store; the default reads and rewrites."""
    return type(store).copy is not Store.copy


def commit_checkpoint(store: Store, folder: Path, ident: CheckpointId, workers: int,
                      progress: Progress, cancel: Cancel,
                      part_size: int = DEFAULT_PART_SIZE, *,
                      previous: Manifest | None = None,
                      expected: Sequence[LocalFile] | None = None,
                      copied: list[str] | None = None) -> Manifest:
    """Upload `folder` and write its manifest last.

    `previous`: the job's previous manifest; a file with the same path, size and part checksums
    there is copied inside the store instead of uploaded, where the store copies server-side
    (the paths copied are appended to `copied`). `expected`: the scan the caller judged stable;
    any difference from it, or any change during the upload, raises CheckpointChanged before
    the manifest is written.
    """
    if (problem := layout.name_problem(ident.name)) is not None:
        raise ConfigError(f"checkpoint folder {layout.quote_name(str(folder))}: its name {problem}; rename it")
    try:
        files = scan_folder(folder)
    except FileNotFoundError as exc:
        raise CheckpointChanged(f"{exc.filename}: vanished while scanning; checkpoint {ident.name} not committed") \
            from None
    if expected is not None and (rel := _difference(expected, files)) is not None:
        raise CheckpointChanged(f"{folder / rel}: changed since it was judged stable; checkpoint {ident.name} "
                                "not committed")
    ensure_job(store, ident)
    sums = _checksums(files, part_size, workers, cancel)
    same_as_before: dict[str, tuple[int, tuple[str, ...]]] = {}
    if previous is not None and previous.part_size == part_size and _copies_server_side(store):
        same_as_before = {e.path: (e.size, e.parts) for e in previous.files if e.size <= MAX_STORE_COPY}

    def copy_or_upload(f: LocalFile) -> Iterator[Callable[[], None]]:
        key = layout.file_key(ident.job_id, ident.name, ident.rank, f.rel)
        if same_as_before.get(f.rel) == (f.size, sums[f.rel]):
            def copy() -> None:
                try:
                    store.copy(layout.file_key(previous.job_id, previous.checkpoint_name, previous.rank, f.rel), key)
                except (StoreError, NotFoundError):  # e.g. the previous object is gone: upload it instead
                    run_tasks(_upload_tasks(store, key, f.path, f.size, progress), 1, cancel)
                else:
                    if copied is not None:
                        copied.append(f.rel)
                    progress(f.size)
            yield copy
            return
        yield from _upload_tasks(store, key, f.path, f.size, progress)

    packs = assign_packs([(f.rel, f.path, f.size) for f in files])
    pack_of = {m.rel: (p.id, m.offset) for p in packs for m in p.members}

    def tasks() -> Iterator[Callable[[], None]]:
        for pack in packs:
            yield lambda p=pack: _upload_pack(store, layout.pack_key(ident.job_id, ident.name, ident.rank, p.id), p)
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
        files=tuple(FileEntry(f.rel, f.size, sums[f.rel], *pack_of.get(f.rel, (None, 0))) for f in files),
        packs=tuple(PackEntry(p.id, p.size) for p in packs),
    )
    store.write_bytes(layout.manifest_key(ident.job_id, ident.name, ident.rank), manifest.to_json().encode())
    return manifest
