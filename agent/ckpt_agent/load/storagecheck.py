"""Checking a file the agent did not write against what its storage says (stores/objectcheck.py).

Such a file has no part checksums of ours, so its parts are fetched unchecked into its temporary
file, and the whole file is checked once all of them are there, before it gets its final name:
one read of the file gives its storage digest (MD5 or a full-object checksum; none for "size
only") and the crc32c of each part, which the load records so `ckpt-agent verify` can re-check
the file later. Every response for the file must name the same object (ETag): one that changes
mid-load is never stitched together from two versions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from ckpt_agent.disk.digests import read_checksums
from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import VerifiedIndex, checkpoint_dir
from ckpt_agent.errors import IntegrityError
from ckpt_agent.load.journal import PartJournal
from ckpt_agent.load.plan import FileTask
from ckpt_agent.stores.base import RangeReader
from ckpt_agent.stores.manifest import FileEntry, Manifest
from ckpt_agent.stores.objectcheck import SIZE, StorageCheck, new_digest


@dataclass(frozen=True)
class Checked:
    """How a foreign file was checked (`kind`, one of objectcheck.KINDS) and the crc32c of its parts."""

    kind: str
    parts: tuple[str, ...]


class StorageChecks:
    """Shared by the workers of one load; what they write is noted in `journal` (load/journal.py)."""

    def __init__(self, journal: PartJournal) -> None:
        self.journal = journal
        self._seen: dict[str, StorageCheck] = {}
        self.results: dict[str, Checked] = {}  # rel -> how it was checked, for the summary and the record
        self._lock = threading.Lock()

    def observe(self, task: FileTask, reader: RangeReader) -> None:
        """The storage check a response carries; the first one for a file (or the listing's) is what it
        must match, and every later response must be of the same object."""
        answered: StorageCheck | None = getattr(reader, "storage_check", None)
        assert task.entry.foreign is not None
        with self._lock:
            known = self._seen.setdefault(task.rel, task.entry.foreign.check or answered or StorageCheck(SIZE, "", ""))
        if answered is not None and answered.etag and known.etag and answered.etag != known.etag:
            self.journal.drop(task.rel, now=True)  # the next load starts this file again
            raise IntegrityError(f"{task.rel}: its object changed in the storage during the load (ETag "
                                 f"{known.etag} then {answered.etag}); load again")

    def resume(self, task: FileTask) -> FileTask:
        """The task with the parts a killed load wrote of it, which must be of the same object."""
        resumed, check = self.journal.resume(task)
        if check is not None:
            with self._lock:
                self._seen.setdefault(task.rel, check)
        return resumed

    def wrote(self, task: FileTask, part: int, crc: str) -> None:
        with self._lock:
            check = self._seen.get(task.rel)
        self.journal.note(task, part, crc, check)

    def expected(self, task: FileTask) -> StorageCheck:
        assert task.entry.foreign is not None
        with self._lock:
            return self._seen.get(task.rel) or task.entry.foreign.check or StorageCheck(SIZE, "", "")

    def check_whole(self, fd: int, task: FileTask, buffer: memoryview, refetch: Callable[[], None]) -> None:
        """The whole file in `fd` against its storage's digest; a mismatch is fetched again (`refetch`)
        once, whole, in case the wire was at fault, and a second one is the storage's: IntegrityError,
        and the file never gets its name."""
        for attempt in (1, 2):
            if self.verify(fd, task, buffer):
                return
            if attempt == 2:
                raise IntegrityError(f"{task.rel}: does not match the {self.expected(task).kind} its storage "
                                     "reports, fetched twice; the object is corrupt or changed")
            refetch()

    def verify(self, fd: int, task: FileTask, buffer: memoryview) -> bool:
        """Read the whole temporary file once: False when its digest is not the storage's."""
        expected = self.expected(task)
        digest = new_digest(expected.kind)
        parts = read_checksums(fd, 0, task.entry.size, task.part_size, buffer, digest.update if digest else None)
        if parts is None:
            raise IntegrityError(f"{task.rel}: shorter on disk than its {task.entry.size} bytes")
        if digest is not None and digest.hexdigest() != expected.value:
            return False
        with self._lock:
            self.results[task.rel] = Checked(expected.kind, tuple(parts))
        return True


def checked_files(manifest: Manifest, rank: int, fetched: dict[str, Checked], index: VerifiedIndex,
                  folder: Folder) -> dict[str, Checked]:
    """Path -> how each placed file of a foreign checkpoint was checked: by this load, or by the earlier
    one that placed a file this load found intact (its note in the verified index)."""
    found: dict[str, Checked] = {}
    for entry in manifest.files:
        rel = f"{checkpoint_dir(rank, manifest.checkpoint_name)}/{entry.path}"
        note = index.note(rel)
        if rel in fetched:
            found[entry.path] = fetched[rel]
        elif note is not None and len(note) == 2 and folder.lstat(rel) is not None:
            found[entry.path] = Checked(str(note[0]), tuple(note[1]))
    return found


def recorded_manifest(manifest: Manifest, checked: dict[str, Checked]) -> Manifest:
    """What the load record keeps of a foreign checkpoint: its placed files with the crc32c of their
    parts as read once their storage's check passed, so `ckpt-agent verify` re-checks them like any
    other, and how each was checked (`verified_by`)."""
    files = tuple(FileEntry(f.path, f.size, checked[f.path].parts) for f in manifest.files if f.path in checked)
    extra = {"verified_by": {path: c.kind for path, c in sorted(checked.items())}}
    return replace(manifest, files=files, extra=extra, source=b"")
