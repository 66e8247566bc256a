"""The load command: spec -> resolved manifests -> plan -> verified files on disk."""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_agent.config.selection import EVERY_FILE, Selection
from ckpt_agent.config.settings import Settings
from ckpt_agent.disk.digests import checksum, format_checksum
from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import (
    VerifiedIndex,
    checkpoint_dir,
    folder_lock,
    loaded_record,
    prepare_root,
    prune_checkpoint,
    state_dir,
)
from ckpt_agent.disk.safefs import INCOMPLETE_SUFFIX, record_bytes, write_atomic
from ckpt_agent.errors import LocalError
from ckpt_agent.load.cachefill import start_fill
from ckpt_agent.load.foreign import finder
from ckpt_agent.load.merge import Merged, NodeChoice, describe_conflicts
from ckpt_agent.load.plan import Plan, check_selection, make_plan
from ckpt_agent.load.record import (
    LoadedCheckpoint,
    LoadRecord,
    NodeLoad,
    forget_load_record,
    recorded_manifest_path,
    save_load_record,
)
from ckpt_agent.load.resolve import Resolution, Resolved, resolve
from ckpt_agent.load.sources import open_sources
from ckpt_agent.load.storagecheck import Checked, checked_files, recorded_manifest
from ckpt_agent.load.transfer import TransferOptions, TransferStats, run_plan
from ckpt_agent.report import Reporter, human_bytes, source_summary, utc_now
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.runtime.ratelimit import limiter
from ckpt_agent.stores import open_load_store
from ckpt_agent.stores.catalog import latest_order
from ckpt_agent.stores.manifest import FILE_KIND, FOLDER_KIND, Manifest
from ckpt_agent.stores.objectcheck import SIZE
from ckpt_agent.stores.routed import Routed
from ckpt_agent.version import __version__


@dataclass(frozen=True)
class LoadResult:
    resolution: Resolution
    plan: Plan
    stats: TransferStats
    checked: dict[tuple[str, str], dict[str, Checked]] = field(default_factory=dict)  # foreign checkpoints' files


def bytes_needed(plan: Plan, folder: Folder | None) -> int:
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
    needed = bytes_needed(plan, folder)
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


def shown_paths(paths: list[str]) -> str:
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def _prune(folder: Folder, result: LoadResult, rank: int, reporter: Reporter) -> None:
    """Each checkpoint folder ends up holding exactly the files of its manifest the selection wants, and we
    say what went. A copy of an excluded file goes too, so the trainer never resumes state (an optimizer)
    the user left out; the files kept are reused by the next load, whatever it selects."""
    selection = result.plan.selection
    for r in result.resolution.checkpoints:
        rel = checkpoint_dir(rank, r.manifest.checkpoint_name)
        listed = {p.entry.path for p in r.checkpoint.files}
        removed = prune_checkpoint(folder, rel, {p for p in listed if selection.wants(p)})
        excluded = [p for p in removed if p.removesuffix(INCOMPLETE_SUFFIX) in listed
                    or any(f.startswith(p + "/") for f in listed)]
        unlisted = [p for p in removed if p not in excluded]
        if excluded:
            reporter.info(f"removed {len(excluded)} entries from {folder.shown(rel)} that {selection.source()} "
                          f"leaves out, so the trainer does not see them: {shown_paths(excluded)}",
                          event="removed_excluded", path=rel, removed=excluded)
        if unlisted:
            reporter.warn(f"removed {len(unlisted)} entries from {folder.shown(rel)} that its manifest does "
                          f"not list: {shown_paths(unlisted)}", event="removed_unlisted", path=rel, removed=unlisted)


def _record(folder: Folder, result: LoadResult, started: float, rank: int) -> None:
    """What this load placed, in the store's order, with the manifests it used (every node's, of a merge)."""
    order = store_order(result.resolution.checkpoints)
    checkpoints, manifests = [], {}
    for r in result.resolution.checkpoints:
        c = r.checkpoint
        m = _named_manifest(r.merged) if r.merged is not None else r.manifest
        nodes = _node_loads(r.merged, rank, result.stats) if r.merged is not None else ()
        manifest_rel = recorded_manifest_path(rank, m.checkpoint_name, m.rank if nodes else None)
        checked = result.checked.get(r.key)
        raw = m.raw if checked is None else recorded_manifest(m, checked).raw
        manifests[manifest_rel] = raw
        for node, node_manifest in zip(nodes, c.manifests if nodes else (), strict=True):
            manifests[node.manifest] = node_manifest.raw
        checkpoints.append(LoadedCheckpoint(
            reference=r.reference.describe(), job_id=m.job_id, project_name=m.project_name,
            checkpoint_name=m.checkpoint_name, rank=m.rank, committed_at=m.committed_at, files=len(c.files),
            bytes=c.total_bytes, reason=r.reason, path=checkpoint_dir(rank, m.checkpoint_name),
            manifest=manifest_rel, manifest_crc32c=format_checksum(checksum(raw)), order=order[r.key],
            nodes=nodes, conflicts=c.conflicts,
            verified_by={} if checked is None else {path: k.kind for path, k in sorted(checked.items())}))
    stats, plan = result.stats, result.plan
    save_load_record(folder, LoadRecord(
        agent_version=__version__, loaded_at=utc_now(),
        seconds=round(time.monotonic() - started, 3), download_folder=str(folder.root.absolute()),
        node_rank=rank, files_total=plan.total_files, bytes_total=plan.total_bytes,
        files_fetched=stats.files_fetched, bytes_fetched=stats.bytes_fetched, files_reused=stats.files_reused,
        bytes_from=stats.bytes_from(), warnings=tuple(result.resolution.warnings), checkpoints=tuple(checkpoints),
        files_excluded=len(plan.excluded), bytes_excluded=plan.excluded_bytes,
        selection=plan.selection.record()), manifests)


def _named_manifest(merged: Merged) -> Manifest:
    """The node manifest a record entry names for a merged checkpoint: one of the merge's kind, since
    the trainer's helper (ckpt_agent.disk.resume) reads that one alone to hand over the file of a
    single-file checkpoint (a leader's `ckpt-5.pt`, the other nodes with nothing) or the folder."""
    if merged.kind == FILE_KIND:
        return merged.files[0].manifest
    if merged.primary.kind == FOLDER_KIND:
        return merged.primary
    return next((m for m in merged.manifests if m.kind == FOLDER_KIND), merged.primary)


def _node_loads(merged: Merged, rank: int, stats: TransferStats) -> tuple[NodeLoad, ...]:
    """Each node's share of a merged checkpoint: its recorded manifest, the files placed from it, and
    where their bytes came from."""
    loads = []
    for m in merged.manifests:
        placed = merged.placed_from(m.rank)
        loads.append(NodeLoad(rank=m.rank, manifest=recorded_manifest_path(rank, m.checkpoint_name, m.rank),
                              manifest_crc32c=format_checksum(checksum(m.raw)), files=len(placed),
                              bytes=sum(p.entry.size for p in placed),
                              bytes_from=stats.from_node(m.checkpoint_name, m.rank)))
    return tuple(loads)


def describe_left_out(plan: Plan) -> str:
    """The words for what the selection left out, or nothing when it left out nothing."""
    if not plan.excluded:
        return ""
    return (f"{len(plan.excluded)} files ({human_bytes(plan.excluded_bytes)}) left out by "
            f"{plan.selection.source()}")


def load_checkpoints(settings: Settings, reporter: Reporter, cancel: Cancel,
                     selection: Selection = EVERY_FILE) -> LoadResult:
    """`selection`: which files of each checkpoint to place (from --include/--exclude or the variables)."""
    started = time.monotonic()
    root = Path(settings.spec.download_folder)
    store = open_load_store(settings.store_config)
    try:
        resolution = resolve_references(store, settings, reporter, cancel)
        report_resolved(resolution, reporter)
        warn_selection(resolution, selection, settings.required, reporter)
        with prepare_root(root) as folder, folder_lock(folder, reporter.info, cancel.check):
            index = VerifiedIndex(folder)
            plan = make_plan(root, folder, checkpoints(resolution), settings.node_rank, index, selection)
            check_free_space(plan, folder)
            forget_load_record(folder, settings.node_rank)
            sink = reporter.progress(plan.fetch_bytes, "download")
            try:
                options = TransferOptions(workers=settings.workers, chunk_size=settings.chunk_size)
                limits = limiter(settings.max_rate, settings.workers, cancel, reporter.info)
                with open_sources(settings, folder, functools.partial(reporter.warn, event="part_cache")) as sources:
                    stats = run_plan(store, plan, folder, options, sink, cancel, index, limits, sources)
            finally:
                sink.close()
            result = LoadResult(resolution, plan, stats, {
                r.key: checked_files(r.manifest, settings.node_rank, stats.checked, index, folder)
                for r in resolution.checkpoints if any(f.foreign for f in r.manifest.files)})
            _prune(folder, result, settings.node_rank, reporter)
            _record(folder, result, started, settings.node_rank)
            if settings.cache is not None:
                start_fill(folder, settings.node_rank, settings.cache, sources.noted, reporter)
    finally:
        store.close()
    _report_checks(result, reporter)
    seconds = time.monotonic() - started
    rate = stats.bytes_fetched / seconds / 1e6 if seconds > 0 else 0.0
    left_out = describe_left_out(plan)
    reporter.info(
        f"loaded {plan.total_files} files, {human_bytes(plan.total_bytes)} into {root}: "
        f"fetched {stats.files_fetched} files ({human_bytes(stats.bytes_fetched)}), "
        f"{stats.files_reused} already intact, {left_out + ', ' if left_out else ''}{seconds:.2f} s, "
        f"{rate:.0f} MB/s; {source_summary(stats.bytes_from())}",
        event="loaded", download_folder=str(root), files=plan.total_files, bytes=plan.total_bytes,
        files_fetched=stats.files_fetched, bytes_fetched=stats.bytes_fetched, files_reused=stats.files_reused,
        files_excluded=len(plan.excluded), bytes_excluded=plan.excluded_bytes, selection=plan.selection.record(),
        bytes_from=stats.bytes_from(), seconds=round(seconds, 3),
    )
    return result


def _report_checks(result: LoadResult, reporter: Reporter) -> None:
    """For files the agent did not write: how each was checked, and plainly which were checked by size only."""
    manifests = {r.key: r.manifest for r in result.resolution.checkpoints}
    for key, checked in result.checked.items():
        kinds = {path: c.kind for path, c in sorted(checked.items())}
        empty = {f.path for f in manifests[key].files if f.size == 0}  # its size is all there is to an empty file
        size_only = [path for path, kind in kinds.items() if kind == SIZE and path not in empty]
        counts = ", ".join(f"{n} by {kind}" for kind, n in sorted(Counter(kinds.values()).items()))
        reporter.info(f"checkpoint {key[1]} of {key[0]}: files checked against what their storage reports: "
                      f"{counts or 'none'}", event="storage_checks", job_id=key[0], checkpoint_name=key[1],
                      verified_by=kinds)
        if size_only:
            reporter.warn(f"checkpoint {key[1]} of {key[0]}: {len(size_only)} files were checked by their size only "
                          f"(their storage reports no checksum or MD5 for them): {', '.join(size_only)}",
                          event="size_only", job_id=key[0], checkpoint_name=key[1], files=size_only)


def resolve_references(store: Routed, settings: Settings, reporter: Reporter, cancel: Cancel) -> Resolution:
    """The spec's references -> manifests, the first step of a load and of its dry run; a reference
    that finds nothing (and is not required) is a warning. A signal or the deadline ends the wait.
    Of a multi-node checkpoint, the nodes' files this node asks for (CKPT_AGENT_LOAD_RANKS)."""
    refs = ", ".join(ref.describe() for ref in settings.spec.checkpoints)
    nodes = NodeChoice(own_only=settings.load_own_rank, job_nodes=settings.num_nodes)
    resolution = cancel.call(
        lambda: resolve(store, settings.spec.checkpoints, settings.node_rank, settings.project_name,
                        settings.required, nodes, finder(store, settings.node_rank, settings.project_name, nodes)),
        f"still missing everything: the store did not answer in time to resolve {refs}")
    for warning in resolution.warnings:
        reporter.warn(warning, event="no_checkpoint")
    return resolution


def checkpoints(resolution: Resolution) -> tuple[Merged, ...]:
    return tuple(r.checkpoint for r in resolution.checkpoints)


def report_resolved(resolution: Resolution, reporter: Reporter) -> None:
    """What each reference chose, from which nodes; and nodes that disagree on a path."""
    for r in resolution.checkpoints:
        m, c = r.manifest, r.checkpoint
        nodes = f"ranks {', '.join(map(str, c.ranks))} in one folder" if r.merged else f"rank {m.rank}"
        reporter.info(f"{r.reference.describe()} -> job {m.job_id} checkpoint {m.checkpoint_name} "
                      f"({nodes}): {len(c.files)} files, {human_bytes(c.total_bytes)}",
                      event="resolved", reference=r.reference.describe(), job_id=m.job_id,
                      checkpoint_name=m.checkpoint_name, rank=m.rank, ranks=list(c.ranks), files=len(c.files),
                      bytes=c.total_bytes, reason=r.reason)
        conflict = describe_conflicts(c)
        if conflict is not None:
            reporter.warn(conflict, event="node_conflict", checkpoint_name=m.checkpoint_name,
                          paths=[x.path for x in c.conflicts])


def warn_selection(resolution: Resolution, selection: Selection, required: bool, reporter: Reporter) -> None:
    """Before the download folder is touched: a required load the selection empties stops here."""
    for warning in check_selection(checkpoints(resolution), selection, required):
        reporter.warn(warning, event="selection_unmatched", selection=selection.record())


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
    body = record_bytes({"ready": True, "agent_version": __version__,
                         "download_folder": str(root.absolute()) if root is not None else None,
                         "loaded_record": record, "at": utc_now()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            write_atomic(dfd, path.name, body)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise LocalError(f"--ready-file {path}: cannot write it ({exc.strerror})") from None
