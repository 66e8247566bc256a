"""What a completed load leaves for its readers: `ckpt-agent verify` and `ckpt_agent.latest_local_checkpoint`.

`.ckpt-agent/loaded-rank-<r>.json` (one per rank, so ranks sharing a folder keep theirs) names the
checkpoints the load placed and their place in the store's order; `.ckpt-agent/manifests/rank-<r>/`
holds the manifests it used, exactly as the store served them. The record only ever describes a
load that completed: it is removed before the first file is touched and written last. Everything
is read through ckpt_agent.disk.safefs (no link followed, no FIFO waited on).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckpt_agent.config import names
from ckpt_agent.config.selection import EVERY_FILE, Selection
from ckpt_agent.config.settings import loaded_folder_from_env
from ckpt_agent.disk.digests import checksum, format_checksum
from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import STATE_DIR, loaded_record, manifests_dir, rank_dir, state_dir
from ckpt_agent.errors import AgentError, IntegrityError, LocalError
from ckpt_agent.stores.manifest import FILE_KIND, Manifest, check_relative_path, parse_manifest

_RECORD_RE = re.compile(r"loaded-rank-\d+\.json")


@dataclass(frozen=True)
class LoadedCheckpoint:
    reference: str
    job_id: str
    project_name: str | None
    checkpoint_name: str
    rank: int
    committed_at: str
    files: int
    bytes: int
    reason: str
    path: str  # the checkpoint folder, relative to the download folder
    manifest: str  # the manifest it was loaded from, relative to .ckpt-agent/
    manifest_crc32c: str
    order: int  # in the store's latest order; 0 = newest


@dataclass(frozen=True)
class LoadRecord:
    agent_version: str
    loaded_at: str
    seconds: float
    download_folder: str
    node_rank: int
    files_total: int
    bytes_total: int
    files_fetched: int
    bytes_fetched: int
    files_reused: int
    warnings: tuple[str, ...]
    checkpoints: tuple[LoadedCheckpoint, ...]
    files_excluded: int = 0  # listed by the manifests, left out by the selection
    bytes_excluded: int = 0
    selection: dict[str, list[str]] = field(default_factory=EVERY_FILE.record)  # what `verify` must not miss
    # every byte by where it came from: store, checkpoint_dir (BT_CHECKPOINT_DIR), ranks (other
    # ranks' folders), cache, reused (already verified here); bytes_fetched is the store's share
    bytes_from: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ManifestProblem:
    """Why a recorded manifest cannot be used to check its files."""

    path: str  # relative to the download folder
    gone: bool  # else changed
    detail: str


def recorded_manifest_path(rank: int, checkpoint_name: str) -> str:
    """Relative to .ckpt-agent/, as the record names it."""
    return f"{manifests_dir(rank)}/{checkpoint_name}.json"


def forget_load_record(folder: Folder, rank: int) -> None:
    """Before any file is touched: a record must only ever describe a load that completed."""
    folder.unlink(f"{STATE_DIR}/{loaded_record(rank)}")


def save_load_record(folder: Folder, record: LoadRecord, manifests: Mapping[str, bytes]) -> None:
    """The manifests (by their path in the record) first, so the record never names one that is not on
    disk; then manifests of this rank's earlier loads are dropped; then the record. Only this rank's
    files are touched."""
    for rel, raw in manifests.items():
        folder.write_atomic(f"{STATE_DIR}/{rel}", raw)
    written = {rel.rsplit("/", 1)[-1] for rel in manifests}
    dfd = folder.dir(f"{STATE_DIR}/{manifests_dir(record.node_rank)}", create=True)
    for stale in set(os.listdir(dfd)) - written:
        if stale.endswith(".json"):
            os.unlink(stale, dir_fd=dfd)
    folder.write_atomic(f"{STATE_DIR}/{loaded_record(record.node_rank)}",
                        json.dumps(asdict(record), indent=1).encode())


def record_names(folder: Folder) -> list[str]:
    """Every rank's loaded-rank-<r>.json in the folder: ranks may share one download folder."""
    state = folder.dir(STATE_DIR)
    return sorted(n for n in os.listdir(state) if _RECORD_RE.fullmatch(n)) if state is not None else []


def read_load_record(folder: Folder, name: str) -> dict | None:
    """One rank's record as written (None when there is none); IntegrityError when it is not a record
    (a FIFO or a link included). Its checkpoint entries are checked by whoever uses them."""
    path = folder.shown(f"{STATE_DIR}/{name}")
    try:
        raw = folder.read(f"{STATE_DIR}/{name}")
        record = json.loads(raw) if raw is not None else None
    except (OSError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"{path}: unreadable ({type(exc).__name__}); run `ckpt-agent load` again") from None
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("checkpoints"), list):
        raise IntegrityError(f"{path}: not a load record; run `ckpt-agent load` again")
    return record


def recorded_selection(folder: Folder, name: str, record: dict) -> Selection:
    """The include/exclude patterns the recorded load used; a record from before selective loads took every file."""
    chosen = record.get("selection") or {}
    try:
        include, exclude = chosen.get("include", []), chosen.get("exclude", [])
        if not all(isinstance(p, list) and all(isinstance(x, str) for x in p) for p in (include, exclude)):
            raise ValueError
        return Selection.from_patterns(include, exclude)
    except (AttributeError, ValueError):  # ConfigError is a ValueError: a pattern no load would have written
        raise IntegrityError(f"{folder.shown(f'{STATE_DIR}/{name}')}: its selection is not one a load wrote; "
                             "run `ckpt-agent load` again") from None


def read_recorded_manifest(folder: Folder, entry: dict, record: str) -> tuple[Manifest | None, ManifestProblem | None]:
    """The manifest a record entry names, if it is still the one the load wrote (its crc32c matches)."""
    rel = check_relative_path(entry.get("manifest"), f"{record}: manifest")
    shown = f"{STATE_DIR}/{rel}"
    raw = folder.read(shown)
    if raw is None:
        return None, ManifestProblem(shown, True, "the recorded manifest is gone; its files cannot be checked")
    if format_checksum(checksum(raw)) != entry.get("manifest_crc32c"):
        return None, ManifestProblem(shown, False, f"the recorded manifest does not match its crc32c in {record}")
    return parse_manifest(raw, str(folder.shown(shown))), None


# --- the helper for training code (ckpt_agent.latest_local_checkpoint) -------------------------------


def latest_local_checkpoint(rank: int | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The newest loaded checkpoint under BT_LOAD_CHECKPOINT_DIR/rank-<rank>/, newest by the store's
    order as the load recorded it (never by file times), or None when nothing was loaded.

    The path each framework's resume call takes: the folder, or for a single-file checkpoint
    (`ckpt-5.pt`, loaded into `rank-0/ckpt-5.pt/ckpt-5.pt`) the file itself."""
    where = loaded_folder_from_env(os.environ if env is None else env, rank)
    if where.download_folder is None:
        return None
    base, name = Path(where.download_folder), loaded_record(where.node_rank)
    try:
        with Folder(base) as folder:
            prefix = rank_dir(where.node_rank) + "/"
            mine = [e for e in (read_load_record(folder, name) or {}).get("checkpoints", []) if isinstance(e, dict)
                    and isinstance(e.get("path"), str) and e["path"].startswith(prefix)
                    and e["path"].count("/") == 1 and names.is_segment(e["path"][len(prefix):])]
            for entry in sorted(mine, key=lambda e: e.get("order", 0)):
                with contextlib.suppress(IntegrityError):
                    if folder.dir(entry["path"]) is not None:
                        return _resume_path(folder, base, entry, name)
    except LocalError:
        return None  # no download folder at all
    except (AgentError, ValueError, KeyError, TypeError, RecursionError):
        raise ValueError(f"{state_dir(base) / name}: not a load record; run `ckpt-agent load` again") from None
    return None


def _resume_path(folder: Folder, base: Path, entry: dict, record: str) -> str | None:
    """The folder, or the one file of a single-file checkpoint (its recorded manifest says which)."""
    path = base / entry["path"]
    if not isinstance(entry.get("manifest"), str):  # a record from before manifests were kept
        return str(path)
    manifest, problem = read_recorded_manifest(folder, entry, record)
    if problem is not None:
        raise ValueError(f"{problem.path}: {problem.detail}; run `ckpt-agent load` again")
    assert manifest is not None
    if manifest.kind != FILE_KIND:
        return str(path)
    rel = f"{entry['path']}/{manifest.files[0].path}"
    st = folder.lstat(rel)
    return str(base / rel) if st is not None and stat.S_ISREG(st.st_mode) else None
