"""`ckpt-agent verify`: every file of every checkpoint the load records (ckpt_agent.load.record) name,
re-read byte for byte against the manifests the load used. It never trusts the stat cache and never
touches the store; each file is ok, missing, changed or extra, or excluded: left out by the recorded
load's --include/--exclude, so neither its absence nor its presence is a problem. Reads go through
ckpt_agent.disk.safefs (no link followed, no FIFO waited on).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ckpt_agent.config.selection import Selection
from ckpt_agent.disk.digests import read_checksums
from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import STATE_DIR, loaded_record
from ckpt_agent.disk.resume import read_load_record
from ckpt_agent.disk.safefs import INCOMPLETE_SUFFIX, open_file
from ckpt_agent.errors import IntegrityError, NotFoundError
from ckpt_agent.load.merge import Merged
from ckpt_agent.load.record import read_recorded_checkpoint, record_names, recorded_selection
from ckpt_agent.runtime.pool import map_tasks
from ckpt_agent.stores.manifest import FileEntry, check_relative_path

OK, MISSING, CHANGED, EXTRA, EXCLUDED = "ok", "missing", "changed", "extra", "excluded"


@dataclass(frozen=True)
class FileCheck:
    path: str  # relative to the download folder
    status: str
    detail: str = ""


@dataclass(frozen=True)
class VerifyReport:
    root: Path
    checkpoints: tuple[str, ...]  # the checkpoint folders checked, relative to root
    files: tuple[FileCheck, ...]

    @property
    def problems(self) -> tuple[FileCheck, ...]:
        return tuple(f for f in self.files if f.status not in (OK, EXCLUDED))

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for f in self.files if f.status == s) for s in (OK, MISSING, CHANGED, EXTRA, EXCLUDED)}


def _open(root: Path) -> Folder:
    if not root.is_dir():
        raise NotFoundError(f"{root}: no such download folder; give the download folder a load wrote, "
                            "or run `ckpt-agent load`")
    return Folder(root)


def _records(folder: Folder) -> list[tuple[str, list, Selection, int]]:
    """(name, checkpoint entries, selection, node rank) of every rank's record; each entry names a
    manifest (or every node's, of a merged checkpoint) and a path."""
    names = record_names(folder)
    if not names:
        raise NotFoundError(
            f"{folder.shown(STATE_DIR)}: no record of a completed load (no {loaded_record(0)} or other rank's); "
            "give the download folder a load wrote, or run `ckpt-agent load`"
        )
    records = []
    for name in names:
        record = read_load_record(folder, name)
        if record is None:
            raise NotFoundError(f"{folder.shown(f'{STATE_DIR}/{name}')}: missing; run `ckpt-agent load`")
        entries = record["checkpoints"]
        if any(not isinstance(c, dict) or "manifest" not in c or "path" not in c for c in entries):
            raise NotFoundError(f"{folder.shown(STATE_DIR + '/' + name)}: not a record this ckpt-agent "
                                "wrote; run `ckpt-agent load` again to record the manifests")
        rank = record.get("node_rank", 0)
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise NotFoundError(f"{folder.shown(STATE_DIR + '/' + name)}: its node_rank is not a number; "
                                "run `ckpt-agent load` again")
        records.append((name, entries, recorded_selection(folder, name, record), rank))
    return records


def _check_file(folder: Folder, rel: str, entry: FileEntry, part_size: int) -> FileCheck:
    dfd, name = folder.parent(rel)
    fd = open_file(dfd, name, folder.shown(rel)) if dfd is not None else None
    if fd is None:
        return FileCheck(rel, MISSING)
    try:
        size = os.fstat(fd).st_size
        if size != entry.size:
            return FileCheck(rel, CHANGED, f"{size} bytes, the manifest says {entry.size}")
        parts = tuple(read_checksums(fd, 0, size, part_size, memoryview(bytearray(min(1 << 20, part_size)))) or ())
    finally:
        os.close(fd)
    count = max(len(parts), len(entry.parts))  # they differ only if the file changed while it was read
    bad = [i for i in range(count) if parts[i:i + 1] != entry.parts[i:i + 1]]
    if bad:
        return FileCheck(rel, CHANGED, f"crc32c of {len(bad)} of {count} parts differs from the manifest, "
                                       f"first at byte {bad[0] * part_size}")
    return FileCheck(rel, OK)


def verify_folder(root: Path, workers: int = 8) -> VerifyReport:
    """Every file of every checkpoint each rank's last load recorded, read back and checked."""
    with _open(root) as folder:
        checks: list[FileCheck] = []
        jobs: list[tuple[Folder, str, FileEntry, int]] = []
        folders: list[str] = []
        for name, entries, selection, rank in _records(folder):
            for entry in entries:
                folder_rel = check_relative_path(entry["path"], f"{name}: path")
                folders.append(folder_rel)
                checkpoint, problem = read_recorded_checkpoint(folder, entry, name, rank)
                if problem is not None:
                    checks.append(FileCheck(problem.path, MISSING if problem.gone else CHANGED, problem.detail))
                    continue
                assert checkpoint is not None
                checks.extend(_check_listing(folder, folder_rel, checkpoint, selection, jobs))
        checks.extend(map_tasks(lambda j: _check_file(*j), jobs, max(1, workers)))  # crc32c releases the GIL
    checks.sort(key=lambda c: c.path)
    return VerifyReport(root, tuple(folders), tuple(checks))


def _check_listing(folder: Folder, folder_rel: str, checkpoint: Merged, selection: Selection,
                   jobs: list[tuple[Folder, str, FileEntry, int]]) -> list[FileCheck]:
    """Missing, not regular, excluded and extra entries of one checkpoint folder; regular files go to `jobs`."""
    try:
        present = dict(folder.walk_files(folder_rel))
    except IntegrityError:
        return [FileCheck(folder_rel, CHANGED, "is not a plain folder (a symlink or a file)")]
    exists = folder.dir(folder_rel) is not None
    checks = []
    for placed in checkpoint.files:
        f = placed.entry
        rel = f"{folder_rel}/{f.path}"
        if not selection.wants(f.path):
            checks.append(FileCheck(rel, EXCLUDED, f"left out by the load: {selection.describe()}"
                                    + ("; present, not checked" if f.path in present else "")))
        elif not exists or f.path not in present:
            checks.append(FileCheck(rel, MISSING))
        elif not present[f.path]:
            checks.append(FileCheck(rel, CHANGED, "is not a regular file (a symlink?)"))
        else:
            jobs.append((folder, rel, f, placed.manifest.part_size))
    listed = {p.entry.path for p in checkpoint.files}
    for path in sorted(set(present) - listed):
        why = ("a partial download" if path.endswith(INCOMPLETE_SUFFIX)
               else "not in the manifest" if present[path] else "a symlink or special file, not in the manifest")
        checks.append(FileCheck(f"{folder_rel}/{path}", EXTRA, why))
    return checks


def render_verify(report: VerifyReport, as_json: bool = False) -> str:
    if as_json:
        return json.dumps({"download_folder": str(report.root.absolute()), "checkpoints": list(report.checkpoints),
                           "counts": report.counts(), "files": [asdict(f) for f in report.files]}, indent=1)
    lines = [f"{f.status:<8} {f.path}" + (f"  ({f.detail})" if f.detail else "") for f in report.files]
    return "\n".join(lines) if lines else "nothing was loaded: no files to check"


def summary(report: VerifyReport) -> str:
    counts = report.counts()
    listed = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return f"{report.root}: {len(report.checkpoints)} checkpoints, {listed or 'no files'}"
