"""`ckpt-agent verify` and `agent.latest_local_checkpoint`: reading back what a load left behind.

A load records what it resolved in `<download_folder>/.ckpt-agent/loaded.json` and the manifests
it used under `.ckpt-agent/manifests/`. Verify re-reads every file of every recorded checkpoint
byte for byte against those manifests (it never trusts the stat cache, and never touches the
store) and calls each file ok, missing, changed or extra.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.errors import IntegrityError, NotFoundError
from agent.localstate import INCOMPLETE_SUFFIX, state_dir
from agent.manifest import (
    FILE_KIND,
    FileEntry,
    Manifest,
    check_relative_path,
    checksum,
    file_checksums,
    format_checksum,
    parse_manifest,
)

LOADED_RECORD = "loaded.json"  # the same name agent.load writes; kept here so this module stays light

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


def read_load_record(root: Path) -> dict:
    """loaded.json of a download folder; NotFoundError when no load completed there."""
    path = state_dir(root) / LOADED_RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFoundError(
            f"{root}: no record of a completed load ({path} is missing); give the download folder a "
            "load wrote, or run `ckpt-agent load`"
        ) from None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path}: unreadable ({exc}); run `ckpt-agent load` again") from None
    if not isinstance(record, dict) or not isinstance(record.get("checkpoints"), list):
        raise IntegrityError(f"{path}: not a load record; run `ckpt-agent load` again")
    return record


def _scan(folder: Path) -> dict[str, bool]:
    """Every entry below `folder` that is not a plain folder: relative path -> is a regular file.
    Symlinks are listed (as not regular) and never followed."""
    found: dict[str, bool] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        for name in dirnames + filenames:
            st = os.lstat(base / name)
            if not stat.S_ISDIR(st.st_mode):
                found[(base / name).relative_to(folder).as_posix()] = stat.S_ISREG(st.st_mode)
    return found


def _check_file(path: Path, rel: str, entry: FileEntry, part_size: int) -> FileCheck:
    size = os.lstat(path).st_size
    if size != entry.size:
        return FileCheck(rel, CHANGED, f"{size} bytes, the manifest says {entry.size}")
    parts = file_checksums(path, part_size)
    count = max(len(parts), len(entry.parts))  # they differ only if the file changed while it was read
    bad = [i for i in range(count) if parts[i:i + 1] != entry.parts[i:i + 1]]
    if bad:
        return FileCheck(rel, CHANGED, f"crc32c of {len(bad)} of {count} parts differs from the manifest, "
                                       f"first at byte {bad[0] * part_size}")
    return FileCheck(rel, OK)


def _load_manifest(root: Path, entry: dict) -> tuple[Manifest | None, FileCheck | None]:
    rel = check_relative_path(entry.get("manifest"), f"{LOADED_RECORD}: manifest")
    path = state_dir(root) / rel
    shown = f"{state_dir(root).name}/{rel}"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, FileCheck(shown, MISSING, "the recorded manifest is gone; its files cannot be checked")
    if format_checksum(checksum(raw)) != entry.get("manifest_crc32c"):
        return None, FileCheck(shown, CHANGED, "the recorded manifest does not match its crc32c in loaded.json")
    return parse_manifest(raw, str(path)), None


def verify_folder(root: Path, workers: int = 8) -> VerifyReport:
    """Every file of every checkpoint the last load recorded, read back and checked."""
    record = read_load_record(root)
    if any(not isinstance(c, dict) or "manifest" not in c or "path" not in c for c in record["checkpoints"]):
        raise NotFoundError(f"{state_dir(root) / LOADED_RECORD}: written by an older ckpt-agent without the "
                            "manifests it used; run `ckpt-agent load` again to record them")
    checks: list[FileCheck] = []
    jobs: list[tuple[Path, str, FileEntry, int]] = []
    folders: list[str] = []
    for entry in record["checkpoints"]:
        folder_rel = check_relative_path(entry["path"], f"{LOADED_RECORD}: path")
        folders.append(folder_rel)
        manifest, problem = _load_manifest(root, entry)
        if problem is not None:
            checks.append(problem)
            continue
        folder = root / folder_rel
        try:
            folder_mode = os.lstat(folder).st_mode
        except FileNotFoundError:
            checks.extend(FileCheck(f"{folder_rel}/{f.path}", MISSING) for f in manifest.files)
            continue
        if not stat.S_ISDIR(folder_mode):
            checks.append(FileCheck(folder_rel, CHANGED, "is not a plain folder (a symlink or a file)"))
            continue
        present = _scan(folder)
        expected = {f.path for f in manifest.files}
        for f in manifest.files:
            rel = f"{folder_rel}/{f.path}"
            if f.path not in present:
                checks.append(FileCheck(rel, MISSING))
            elif not present[f.path]:
                checks.append(FileCheck(rel, CHANGED, "is not a regular file (a symlink?)"))
            else:
                jobs.append((folder / f.path, rel, f, manifest.part_size))
        for path in sorted(set(present) - expected):
            why = ("a partial download" if path.endswith(INCOMPLETE_SUFFIX)
                   else "not in the manifest" if present[path] else "a symlink or special file, not in the manifest")
            checks.append(FileCheck(f"{folder_rel}/{path}", EXTRA, why))
    with ThreadPoolExecutor(max(1, workers)) as pool:  # crc32c releases the GIL
        checks.extend(pool.map(lambda j: _check_file(*j), jobs))
    checks.sort(key=lambda c: c.path)
    return VerifyReport(root, tuple(folders), tuple(checks))


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
    path = state_dir(Path(base)) / LOADED_RECORD
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        entries = json.loads(text)["checkpoints"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a load record; run `ckpt-agent load` again") from None
    prefix = f"rank-{rank}/"
    mine = [e for e in entries if isinstance(e, dict) and isinstance(e.get("path"), str)
            and e["path"].startswith(prefix) and e["path"].count("/") == 1]
    for entry in sorted(mine, key=lambda e: e.get("order", 0)):
        folder = Path(base) / entry["path"]
        if folder.is_dir():
            return _resume_path(Path(base), entry, folder)
    return None


def _resume_path(root: Path, entry: dict, folder: Path) -> str | None:
    """The folder, or the one file of a single-file checkpoint (its recorded manifest says which)."""
    if not isinstance(entry.get("manifest"), str):  # a record from before manifests were kept
        return str(folder)
    try:
        manifest, problem = _load_manifest(root, entry)
    except IntegrityError as exc:
        raise ValueError(f"{exc}; run `ckpt-agent load` again") from None
    if problem is not None:
        raise ValueError(f"{problem.path}: {problem.detail}; run `ckpt-agent load` again")
    if manifest.kind != FILE_KIND:
        return str(folder)
    file = folder / manifest.files[0].path
    return str(file) if file.is_file() else None
