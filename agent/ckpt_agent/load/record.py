"""What a completed load leaves for its readers: `ckpt-agent verify` (and, through ckpt_agent.disk.resume,
`ckpt_agent.latest_local_checkpoint`).

`.ckpt-agent/loaded-rank-<r>.json` (one per rank, so ranks sharing a folder keep theirs) names the
checkpoints the load placed and their place in the store's order; `.ckpt-agent/manifests/rank-<r>/`
holds the manifests it used, exactly as the store served them (of a checkpoint merged from several
nodes, each node's under `<name>.nodes/rank-<n>.json`, and readers merge them again with
ckpt_agent.load.merge, so they see the folder exactly as the load placed it). The record only ever describes a
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
from ckpt_agent.disk.safefs import record_bytes, remove_tree
from ckpt_agent.errors import IntegrityError
from ckpt_agent.load.merge import Conflict, Merged, merge
from ckpt_agent.stores.manifest import Manifest, check_relative_path, parse_manifest

_RECORD_RE = re.compile(r"loaded-rank-\d+\.json")
NODES_SUFFIX = ".nodes"  # <name>.nodes/: the manifests of a merged checkpoint; a name never ends in .json


@dataclass(frozen=True)
class NodeLoad:
    """What one node's manifest of a merged checkpoint gave: the files placed from it, and where their
    bytes came from (the keys of LoadRecord.bytes_from)."""

    rank: int
    manifest: str  # relative to .ckpt-agent/
    manifest_crc32c: str
    files: int  # placed from this node's manifest (a path it shares with another node counts once)
    bytes: int
    bytes_from: dict[str, int]


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
    nodes: tuple[NodeLoad, ...] = ()  # every node's part, when the checkpoint merges several nodes' files
    conflicts: tuple[Conflict, ...] = ()  # paths the nodes hold with different bytes, and whose copy is here
    # a checkpoint the agent did not write (Baseten API, S3 prefix): path -> how its storage's word was
    # checked (crc32c, crc32, sha256, sha1, md5, or size: nothing but the size was known)
    verified_by: dict[str, str] = field(default_factory=dict)


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


def recorded_manifest_path(rank: int, checkpoint_name: str, node: int | None = None) -> str:
    """Relative to .ckpt-agent/, as the record names it; `node`: one node's manifest of a merged checkpoint."""
    if node is None:
        return f"{manifests_dir(rank)}/{checkpoint_name}.json"
    return f"{manifests_dir(rank)}/{checkpoint_name}{NODES_SUFFIX}/rank-{node}.json"


def forget_load_record(folder: Folder, rank: int) -> None:
    """Before any file is touched: a record must only ever describe a load that completed."""
    folder.unlink(f"{STATE_DIR}/{loaded_record(rank)}")


def save_load_record(folder: Folder, record: LoadRecord, manifests: Mapping[str, bytes]) -> None:
    """The manifests (by their path in the record) first, so the record never names one that is not on
    disk; then manifests of this rank's earlier loads are dropped; then the record. Only this rank's
    files are touched."""
    for rel, raw in manifests.items():
        folder.write_atomic(f"{STATE_DIR}/{rel}", raw)
    mine = f"{STATE_DIR}/{manifests_dir(record.node_rank)}"
    written = {rel[len(manifests_dir(record.node_rank)) + 1:] for rel in manifests}
    _drop_stale(folder, mine, written)
    folder.write_atomic(f"{STATE_DIR}/{loaded_record(record.node_rank)}",
                        record_bytes(asdict(record)))


def _drop_stale(folder: Folder, rel: str, written: set[str]) -> None:
    """Everything under `rel` that is not one of `written` (paths below it), one level of folders deep."""
    dfd = folder.dir(rel, create=True)
    for stale in set(os.listdir(dfd)) - {w.split("/", 1)[0] for w in written}:
        if stale.endswith(".json"):
            os.unlink(stale, dir_fd=dfd)
        elif stale.endswith(NODES_SUFFIX):
            remove_tree(dfd, stale)
    for sub in {w.split("/", 1)[0] for w in written if "/" in w}:
        _drop_stale(folder, f"{rel}/{sub}", {w.split("/", 1)[1] for w in written if w.startswith(sub + "/")})


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


def read_recorded_checkpoint(folder: Folder, entry: dict, record: str, node_rank: int
                             ) -> tuple[Merged | None, ManifestProblem | None]:
    """The checkpoint a record entry names, as the load placed it: its one manifest, or its nodes'
    manifests merged again for node `node_rank` (the same rule, so the same copy of each path)."""
    nodes = entry.get("nodes") or [entry]
    if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
        raise IntegrityError(f"{record}: nodes is not a list of objects; run `ckpt-agent load` again")
    manifests = []
    for node in nodes:
        manifest, problem = read_recorded_manifest(folder, node, record)
        if problem is not None:
            return None, problem
        assert manifest is not None
        manifests.append(manifest)
    return merge(tuple(manifests), node_rank), None
