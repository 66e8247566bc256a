"""What a completed load leaves for its readers: `ckpt-agent verify` (and, through ckpt_agent.disk.resume,
`ckpt_agent.latest_local_checkpoint`).

`.ckpt-agent/loaded-rank-<r>.json` (one per rank, so ranks sharing a folder keep theirs) names the
checkpoints the load placed and their place in the store's order; `.ckpt-agent/manifests/rank-<r>/`
holds the manifests it used, exactly as the store served them. The record only ever describes a
load that completed: it is removed before the first file is touched and written last. Everything
is read through ckpt_agent.disk.safefs (no link followed, no FIFO waited on).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from ckpt_agent.config.selection import EVERY_FILE, Selection
from ckpt_agent.disk.digests import checksum, format_checksum
from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import STATE_DIR, loaded_record, manifests_dir
from ckpt_agent.disk.safefs import record_bytes
from ckpt_agent.errors import IntegrityError
from ckpt_agent.stores.manifest import Manifest, check_relative_path, parse_manifest

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
                        record_bytes(asdict(record)))


def record_names(folder: Folder) -> list[str]:
    """Every rank's loaded-rank-<r>.json in the folder: ranks may share one download folder."""
    state = folder.dir(STATE_DIR)
    return sorted(n for n in os.listdir(state) if _RECORD_RE.fullmatch(n)) if state is not None else []


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
