"""`ckpt-agent verify` and `agent.latest_local_checkpoint`: reading back what a load left behind.

A load records what it resolved in `<download_folder>/.ckpt-agent/loaded-rank-<r>.json` (one per
rank, so ranks sharing a folder keep theirs) and the manifests it used under
`.ckpt-agent/manifests/rank-<r>/`. Everything is read through agent.safefs (no link followed, no
FIFO waited on). Verify re-reads every file of every recorded checkpoint
byte for byte against those manifests (it never trusts the stat cache, and never touches the
store) and calls each file ok, missing, changed or extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.errors import AgentError, IntegrityError, LocalError, NotFoundError
from agent.localstate import INCOMPLETE_SUFFIX, STATE_DIR, loaded_record, state_dir
from agent.manifest import (
    FILE_KIND,
    FileEntry,
    Manifest,
    check_relative_path,
    checksum,
    format_checksum,
    parse_manifest,
    read_checksums,
)
from agent.safefs import Folder, open_file

_RECORD_RE = re.compile(r"loaded-rank-\d+\.json")

OK, MISSING, CHANGED, EXTRA = "ok", "missing", "changed", "extra"


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
        return tuple(f for f in self.files if f.status != OK)

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for f in self.files if f.status == s) for s in (OK, MISSING, CHANGED, EXTRA)}


def _open(root: Path) -> Folder:
    if not root.is_dir():
        raise NotFoundError(f"{root}: no such download folder; give the download folder a load wrote, "
                            "or run `ckpt-agent load`")
    return Folder(root)


def read_load_record(folder: Folder, name: str) -> dict:
    """One rank's load record; IntegrityError when it is not one (a FIFO or a link included)."""
    path = folder.shown(f"{STATE_DIR}/{name}")
    try:
        raw = folder.read(f"{STATE_DIR}/{name}")
        record = json.loads(raw) if raw is not None else None
    except (OSError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"{path}: unreadable ({type(exc).__name__}); run `ckpt-agent load` again") from None
    if record is None:
        raise NotFoundError(f"{path}: missing; run `ckpt-agent load`")
    if not isinstance(record, dict) or not isinstance(record.get("checkpoints"), list):
        raise IntegrityError(f"{path}: not a load record; run `ckpt-agent load` again")
    return record


def _record_names(folder: Folder) -> list[str]:
    """Every rank's loaded-rank-<r>.json in the folder: ranks may share one download folder."""
    state = folder.dir(STATE_DIR)
    names = sorted(n for n in os.listdir(state) if _RECORD_RE.fullmatch(n)) if state is not None else []
    if not names:
        raise NotFoundError(
            f"{folder.shown(STATE_DIR)}: no record of a completed load (no {loaded_record(0)} or other rank's); "
            "give the download folder a load wrote, or run `ckpt-agent load`"
        )
    return names


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


def _load_manifest(folder: Folder, entry: dict, record: str) -> tuple[Manifest | None, FileCheck | None]:
    rel = check_relative_path(entry.get("manifest"), f"{record}: manifest")
    shown = f"{STATE_DIR}/{rel}"
    raw = folder.read(shown)
    if raw is None:
        return None, FileCheck(shown, MISSING, "the recorded manifest is gone; its files cannot be checked")
    if format_checksum(checksum(raw)) != entry.get("manifest_crc32c"):
        return None, FileCheck(shown, CHANGED, f"the recorded manifest does not match its crc32c in {record}")
    return parse_manifest(raw, str(folder.shown(shown))), None


def verify_folder(root: Path, workers: int = 8) -> VerifyReport:
    """Every file of every checkpoint each rank's last load recorded, read back and checked."""
    with _open(root) as folder:
        checks: list[FileCheck] = []
        jobs: list[tuple[Folder, str, FileEntry, int]] = []
        folders: list[str] = []
        for name in _record_names(folder):
            record = read_load_record(folder, name)
            if any(not isinstance(c, dict) or "manifest" not in c or "path" not in c for c in record["checkpoints"]):
                raise NotFoundError(f"{folder.shown(STATE_DIR + '/' + name)}: not a record this ckpt-agent "
                                    "wrote; run `ckpt-agent load` again to record the manifests")
            for entry in record["checkpoints"]:
                folder_rel = check_relative_path(entry["path"], f"{name}: path")
                folders.append(folder_rel)
                manifest, problem = _load_manifest(folder, entry, name)
                if problem is not None:
                    checks.append(problem)
                    continue
                checks.extend(_check_listing(folder, folder_rel, manifest, jobs))
        with ThreadPoolExecutor(max(1, workers)) as pool:  # crc32c releases the GIL
            checks.extend(pool.map(lambda j: _check_file(*j), jobs))
    checks.sort(key=lambda c: c.path)
    return VerifyReport(root, tuple(folders), tuple(checks))


def _check_listing(folder: Folder, folder_rel: str, manifest: Manifest,
                   jobs: list[tuple[Folder, str, FileEntry, int]]) -> list[FileCheck]:
    """Missing, not regular and extra entries of one checkpoint folder; regular files go to `jobs`."""
    try:
        present = dict(folder.walk_files(folder_rel))
    except IntegrityError:
        return [FileCheck(folder_rel, CHANGED, "is not a plain folder (a symlink or a file)")]
    if folder.dir(folder_rel) is None:
        return [FileCheck(f"{folder_rel}/{f.path}", MISSING) for f in manifest.files]
    checks = []
    for f in manifest.files:
        rel = f"{folder_rel}/{f.path}"
        if f.path not in present:
            checks.append(FileCheck(rel, MISSING))
        elif not present[f.path]:
            checks.append(FileCheck(rel, CHANGED, "is not a regular file (a symlink?)"))
        else:
            jobs.append((folder, rel, f, manifest.part_size))
    for path in sorted(set(present) - {f.path for f in manifest.files}):
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


# --- the helper for training code (agent.latest_local_checkpoint) -------------------------------


def latest_local_checkpoint(rank: int | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The newest loaded checkpoint under BT_LOAD_CHECKPOINT_DIR/rank-<rank>/, newest by the store's
    order as the load recorded it (never by file times), or None when nothing was loaded.

    The path each framework's resume call takes: the folder, or for a single-file checkpoint
    (`ckpt-5.pt`, loaded into `rank-0/ckpt-5.pt/ckpt-5.pt`) the file itself."""
    env = os.environ if env is None else env
    base = env.get("BT_LOAD_CHECKPOINT_DIR")
    if not base:
        return None
    if rank is None:
        rank = int(env.get("BT_NODE_RANK") or 0)
    try:
        with Folder(Path(base)) as folder:
            raw = folder.read(f"{STATE_DIR}/{loaded_record(rank)}")
            entries = json.loads(raw)["checkpoints"] if raw is not None else []
            prefix = f"rank-{rank}/"
            mine = [e for e in entries if isinstance(e, dict) and isinstance(e.get("path"), str)
                    and e["path"].startswith(prefix) and e["path"].count("/") == 1
                    and e["path"][len(prefix):] not in ("", ".", "..")]
            for entry in sorted(mine, key=lambda e: e.get("order", 0)):
                with contextlib.suppress(IntegrityError):
                    if folder.dir(entry["path"]) is not None:
                        return _resume_path(folder, Path(base), entry, loaded_record(rank))
    except LocalError:
        return None  # no download folder at all
    except (AgentError, ValueError, KeyError, TypeError, RecursionError):
        raise ValueError(f"{state_dir(Path(base)) / loaded_record(rank)}: not a load record; "
                         "run `ckpt-agent load` again") from None
    return None


def _resume_path(folder: Folder, base: Path, entry: dict, record: str) -> str | None:
    """The folder, or the one file of a single-file checkpoint (its recorded manifest says which)."""
    path = base / entry["path"]
    if not isinstance(entry.get("manifest"), str):  # a record from before manifests were kept
        return str(path)
    manifest, problem = _load_manifest(folder, entry, record)
    if problem is not None:
        raise ValueError(f"{problem.path}: {problem.detail}; run `ckpt-agent load` again")
    assert manifest is not None
    if manifest.kind != FILE_KIND:
        return str(path)
    rel = f"{entry['path']}/{manifest.files[0].path}"
    st = folder.lstat(rel)
    return str(base / rel) if st is not None and stat.S_ISREG(st.st_mode) else None
