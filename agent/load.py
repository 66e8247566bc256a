"""The load command: spec -> resolved manifests -> plan -> verified files on disk."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from agent import __version__
from agent.cancel import Cancel
from agent.errors import LocalError
from agent.loadrecord import LoadedCheckpoint, LoadRecord, forget_load_record, recorded_manifest_path, save_load_record
from agent.localstate import (
    INCOMPLETE_SUFFIX,
    VerifiedIndex,
    check_root,
    checkpoint_dir,
    folder_lock,
    loaded_record,
    prepare_root,
    prune_checkpoint,
    state_dir,
)
from agent.manifest import checksum, format_checksum
from agent.plan import FileTask, Plan, make_plan
from agent.report import Reporter, human_bytes
from agent.resolve import Resolution, Resolved, latest_order, resolve
from agent.safefs import Folder, write_atomic
from agent.settings import Settings
from agent.stores import open_store
from agent.transfer import TransferOptions, TransferStats, run_plan


@dataclass(frozen=True)
class LoadResult:
    resolution: Resolution
    plan: Plan
    stats: TransferStats


def _bytes_needed(plan: Plan, folder: Folder | None) -> int:
    """Bytes still to be allocated: partial files from an earlier run already hold theirs."""
    if folder is None:
        return plan.fetch_bytes
    needed = 0
    for task in plan.fetch:
        have = 0
        for rel in (task.rel + INCOMPLETE_SUFFIX, task.rel):
            st = folder.lstat(rel)
            have = max(have, st.st_blocks * 512 if st is not None else 0)
        needed += max(0, task.entry.size - have)
    return needed


def check_free_space(plan: Plan, folder: Folder) -> None:
    needed = _bytes_needed(plan, folder)
    free = shutil.disk_usage(plan.root).free
    if needed > free:
        raise LocalError(
            f"download_folder {plan.root}: needs {human_bytes(needed)} but only {human_bytes(free)} "
            "is free; free space or choose another download_folder"
        )


def store_order(resolved: tuple[Resolved, ...]) -> dict[tuple[str, str], int]:
    """Position of each checkpoint in the store's latest order (committed_at, then natural name); 0 = newest."""
    newest_first = sorted(resolved, key=lambda r: latest_order(r.manifest.committed_at, r.manifest.checkpoint_name),
                          reverse=True)
    return {r.key: i for i, r in enumerate(newest_first)}


def _prune(folder: Folder, result: LoadResult, rank: int, reporter: Reporter) -> None:
    """Each checkpoint folder ends up holding exactly what its manifest lists, and we say what went."""
    for r in result.resolution.checkpoints:
        rel = checkpoint_dir(rank, r.manifest.checkpoint_name)
        removed = prune_checkpoint(folder, rel, {f.path for f in r.manifest.files})
        if removed:
            shown = ", ".join(removed[:5]) + (f" and {len(removed) - 5} more" if len(removed) > 5 else "")
            reporter.warn(f"removed {len(removed)} entries from {folder.shown(rel)} that its manifest does "
                          f"not list: {shown}", event="removed_unlisted", path=rel, removed=removed)


def _record(folder: Folder, result: LoadResult, started: float, rank: int) -> None:
    """What this load placed, in the store's order, with the manifests it used."""
    order = store_order(result.resolution.checkpoints)
    checkpoints, manifests = [], {}
    for r in result.resolution.checkpoints:
        m = r.manifest
        manifest_rel = recorded_manifest_path(rank, m.checkpoint_name)
        manifests[manifest_rel] = m.raw
        checkpoints.append(LoadedCheckpoint(
            reference=r.reference.describe(), job_id=m.job_id, project_name=m.project_name,
            checkpoint_name=m.checkpoint_name, rank=m.rank, committed_at=m.committed_at, files=len(m.files),
            bytes=m.total_bytes, reason=r.reason, path=checkpoint_dir(rank, m.checkpoint_name),
            manifest=manifest_rel, manifest_crc32c=format_checksum(checksum(m.raw)), order=order[r.key]))
    stats, plan = result.stats, result.plan
    save_load_record(folder, LoadRecord(
        agent_version=__version__, loaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        seconds=round(time.monotonic() - started, 3), download_folder=str(folder.root.absolute()),
        node_rank=rank, files_total=plan.total_files, bytes_total=plan.total_bytes,
        files_fetched=stats.files_fetched, bytes_fetched=stats.bytes_fetched, files_reused=stats.files_reused,
        warnings=tuple(result.resolution.warnings), checkpoints=tuple(checkpoints)), manifests)


def load_checkpoints(settings: Settings, reporter: Reporter, cancel: Cancel) -> LoadResult:
    started = time.monotonic()
    root = Path(settings.spec.download_folder)
    store = open_store(settings)
    try:
        refs = ", ".join(ref.describe() for ref in settings.spec.checkpoints)
        resolution = cancel.call(
            lambda: resolve(store, settings.spec.checkpoints, settings.node_rank, settings.project_name,
                            settings.required),
            f"still missing everything: the store did not answer in time to resolve {refs}")
        for warning in resolution.warnings:
            reporter.warn(warning, event="no_checkpoint")
        for r in resolution.checkpoints:
            m = r.manifest
            reporter.info(f"{r.reference.describe()} -> job {m.job_id} checkpoint {m.checkpoint_name} "
                          f"(rank {m.rank}): {len(m.files)} files, {human_bytes(m.total_bytes)}",
                          event="resolved", reference=r.reference.describe(), job_id=m.job_id,
                          checkpoint_name=m.checkpoint_name, rank=m.rank, files=len(m.files),
                          bytes=m.total_bytes, reason=r.reason)
        with prepare_root(root) as folder, folder_lock(folder, reporter.info, cancel.check):
            index = VerifiedIndex(folder)
            plan = make_plan(root, folder, tuple(r.manifest for r in resolution.checkpoints),
                             settings.node_rank, index)
            check_free_space(plan, folder)
            forget_load_record(folder, settings.node_rank)
            sink = reporter.progress(plan.fetch_bytes, "download")
            try:
                options = TransferOptions(workers=settings.workers, chunk_size=settings.chunk_size)
                stats = run_plan(store, plan, folder, options, sink, cancel, index)
            finally:
                sink.close()
            result = LoadResult(resolution, plan, stats)
            _prune(folder, result, settings.node_rank, reporter)
            _record(folder, result, started, settings.node_rank)
    finally:
        store.close()
    seconds = time.monotonic() - started
    rate = stats.bytes_fetched / seconds / 1e6 if seconds > 0 else 0.0
    reporter.info(
        f"loaded {plan.total_files} files, {human_bytes(plan.total_bytes)} into {root}: "
        f"fetched {stats.files_fetched} files ({human_bytes(stats.bytes_fetched)}), "
        f"{stats.files_reused} already intact, {seconds:.2f} s, {rate:.0f} MB/s",
        event="loaded", download_folder=str(root), files=plan.total_files, bytes=plan.total_bytes,
        files_fetched=stats.files_fetched, bytes_fetched=stats.bytes_fetched, files_reused=stats.files_reused,
        seconds=round(seconds, 3),
    )
    return result


# --- dry run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointPlan:
    resolved: Resolved
    folder: str
    intact: tuple[FileTask, ...]
    fetch: tuple[FileTask, ...]


@dataclass(frozen=True)
class DryRun:
    root: Path
    root_exists: bool
    resolution: Resolution
    plan: Plan
    checkpoints: tuple[CheckpointPlan, ...]
    needed_bytes: int
    free_bytes: int


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def plan_load(settings: Settings, reporter: Reporter) -> DryRun:
    """What `load` would do, doing none of it: resolves and plans exactly as a load does, but takes
    no lock, creates no folder and writes nothing, here or in the store."""
    root = Path(settings.spec.download_folder)
    check_root(root)
    store = open_store(settings)
    try:
        resolution = resolve(store, settings.spec.checkpoints, settings.node_rank,
                             settings.project_name, settings.required)
    finally:
        store.close()
    for warning in resolution.warnings:
        reporter.warn(warning, event="no_checkpoint")
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(Folder(root)) if root.is_dir() else None
        plan = make_plan(root, folder, tuple(r.manifest for r in resolution.checkpoints), settings.node_rank,
                         VerifiedIndex(folder))
        needed = _bytes_needed(plan, folder)
    per_checkpoint = []
    for r in resolution.checkpoints:
        rel = checkpoint_dir(settings.node_rank, r.manifest.checkpoint_name)
        per_checkpoint.append(CheckpointPlan(r, rel,
                                             tuple(t for t in plan.intact if t.rel.startswith(rel + "/")),
                                             tuple(t for t in plan.fetch if t.rel.startswith(rel + "/"))))
    dry = DryRun(root, root.is_dir(), resolution, plan, tuple(per_checkpoint), needed,
                 shutil.disk_usage(_nearest_existing(root)).free)
    if dry.needed_bytes > dry.free_bytes:
        reporter.warn(f"a load would fail: download_folder {root} needs {human_bytes(dry.needed_bytes)} but only "
                      f"{human_bytes(dry.free_bytes)} is free", event="dry_run_no_space",
                      bytes_needed=dry.needed_bytes, bytes_free=dry.free_bytes)
    reporter.info(
        f"dry run: would download {len(plan.fetch)} files ({human_bytes(plan.fetch_bytes)}), "
        f"{len(plan.intact)} already intact; nothing was downloaded",
        event="dry_run", download_folder=str(root), files_to_fetch=len(plan.fetch), bytes_to_fetch=plan.fetch_bytes,
        files_intact=len(plan.intact), bytes_needed=dry.needed_bytes, bytes_free=dry.free_bytes,
        checkpoints=[{"reference": c.resolved.reference.describe(), "job_id": c.resolved.manifest.job_id,
                      "checkpoint_name": c.resolved.manifest.checkpoint_name, "reason": c.resolved.reason,
                      "files": len(c.resolved.manifest.files), "bytes": c.resolved.manifest.total_bytes,
                      "files_intact": len(c.intact), "files_to_fetch": len(c.fetch),
                      "bytes_to_fetch": sum(t.entry.size for t in c.fetch)} for c in dry.checkpoints],
    )
    return dry


def render_plan(dry: DryRun) -> str:
    """The dry run for a person: per reference, what it chose and why, and what is already here."""
    state = "" if dry.root_exists else " (does not exist yet; a load creates it)"
    lines = [f"download folder: {dry.root.absolute()}{state}"]
    for c in dry.checkpoints:
        r, m = c.resolved, c.resolved.manifest
        fetch_bytes = sum(t.entry.size for t in c.fetch)
        lines += [
            f"{r.reference.describe()} -> job {m.job_id}, checkpoint {m.checkpoint_name} (rank {m.rank})",
            f"  why:          {r.reason}",
            f"  committed at: {m.committed_at}",
            f"  into:         {dry.root.absolute() / c.folder}",
            f"  files:        {len(m.files)}, {human_bytes(m.total_bytes)}",
            f"  present:      {len(c.intact)} files intact, {human_bytes(m.total_bytes - fetch_bytes)}",
            f"  to download:  {len(c.fetch)} files, {human_bytes(fetch_bytes)}",
        ]
    if not dry.checkpoints:
        lines.append("nothing to load")
    lines += [f"warning: {w}" for w in dry.resolution.warnings]
    enough = "" if dry.needed_bytes <= dry.free_bytes else "  NOT ENOUGH: a load would fail"
    lines.append(f"total: {dry.plan.total_files} files, {human_bytes(dry.plan.total_bytes)}; "
                 f"to download {len(dry.plan.fetch)} files, {human_bytes(dry.plan.fetch_bytes)}; "
                 f"free space {human_bytes(dry.free_bytes)}{enough}")
    return "\n".join(lines)


# --- ready file ----------------------------------------------------------------------------------


def clear_ready_file(path: Path) -> None:
    """A ready file left by an earlier run must not tell a neighbour this load is done."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise LocalError(f"--ready-file {path}: cannot remove the old one ({exc.strerror})") from None


def write_ready_file(path: Path, root: Path | None, rank: int) -> None:
    """Written last and atomically (rename from an unpredictable name, created O_EXCL, so a planted link
    is replaced, never followed): it exists only once every file is verified and in place."""
    record = str(state_dir(root).absolute() / loaded_record(rank)) if root is not None else None
    body = json.dumps({"ready": True, "agent_version": __version__,
                       "download_folder": str(root.absolute()) if root is not None else None,
                       "loaded_record": record,
                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            write_atomic(dfd, path.name, body)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise LocalError(f"--ready-file {path}: cannot write it ({exc.strerror})") from None
