"""`load --dry-run`: what a load would do, doing none of it (no lock, no folder, no write anywhere)."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from ckpt_agent.config.selection import EVERY_FILE, Selection
from ckpt_agent.config.settings import Settings
from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import VerifiedIndex, check_root, checkpoint_dir
from ckpt_agent.load.merge import describe_conflicts
from ckpt_agent.load.pipeline import (
    bytes_needed,
    checkpoints,
    describe_left_out,
    resolve_references,
    shown_paths,
    warn_selection,
)
from ckpt_agent.load.plan import FileTask, Plan, make_plan
from ckpt_agent.load.resolve import Resolution, Resolved
from ckpt_agent.report import Reporter, human_bytes
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.stores import open_load_store


@dataclass(frozen=True)
class CheckpointPlan:
    resolved: Resolved
    folder: str
    intact: tuple[FileTask, ...]
    fetch: tuple[FileTask, ...]
    excluded: tuple[FileTask, ...]

    def nodes(self) -> list[dict]:
        """Of a merged checkpoint, per node: the files placed from its manifest, those already here and
        those to download (from the store, or a local copy the load finds)."""
        if self.resolved.merged is None:
            return []
        rows = []
        for m in self.resolved.merged.manifests:
            mine = [tuple(t for t in tasks if t.origin[1] == m.rank) for tasks in (self.intact, self.fetch)]
            placed = self.resolved.merged.placed_from(m.rank)
            rows.append({"rank": m.rank, "files": len(placed), "bytes": sum(p.entry.size for p in placed),
                         "files_intact": len(mine[0]), "files_to_fetch": len(mine[1]),
                         "bytes_to_fetch": sum(t.entry.size for t in mine[1])})
        return rows


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


def plan_load(settings: Settings, reporter: Reporter, selection: Selection = EVERY_FILE) -> DryRun:
    """What `load` would do, doing none of it: resolves and plans exactly as a load does, but takes
    no lock, creates no folder and writes nothing, here or in the store."""
    root = Path(settings.spec.download_folder)
    check_root(root)
    store = open_load_store(settings.store_config)
    try:
        resolution = resolve_references(store, settings, reporter, Cancel())
    finally:
        store.close()
    warn_selection(resolution, selection, settings.required, reporter)
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(Folder(root)) if root.is_dir() else None
        plan = make_plan(root, folder, checkpoints(resolution), settings.node_rank, VerifiedIndex(folder), selection)
        needed = bytes_needed(plan, folder)
    per_checkpoint = []
    for r in resolution.checkpoints:
        rel = checkpoint_dir(settings.node_rank, r.manifest.checkpoint_name)
        per_checkpoint.append(CheckpointPlan(r, rel, *(tuple(t for t in tasks if t.rel.startswith(rel + "/"))
                                                       for tasks in (plan.intact, plan.fetch, plan.excluded))))
    dry = DryRun(root, root.is_dir(), resolution, plan, tuple(per_checkpoint), needed,
                 shutil.disk_usage(_nearest_existing(root)).free)
    if dry.needed_bytes > dry.free_bytes:
        reporter.warn(f"a load would fail: download_folder {root} needs {human_bytes(dry.needed_bytes)} but only "
                      f"{human_bytes(dry.free_bytes)} is free", event="dry_run_no_space",
                      bytes_needed=dry.needed_bytes, bytes_free=dry.free_bytes)
    left_out = describe_left_out(plan)
    reporter.info(
        f"dry run: would download {len(plan.fetch)} files ({human_bytes(plan.fetch_bytes)}), "
        f"{len(plan.intact)} already intact{', ' + left_out if left_out else ''}; nothing was downloaded",
        event="dry_run", download_folder=str(root), files_to_fetch=len(plan.fetch), bytes_to_fetch=plan.fetch_bytes,
        files_intact=len(plan.intact), files_excluded=len(plan.excluded), bytes_excluded=plan.excluded_bytes,
        selection=selection.record(), bytes_needed=dry.needed_bytes, bytes_free=dry.free_bytes,
        checkpoints=[{"reference": c.resolved.reference.describe(), "job_id": c.resolved.manifest.job_id,
                      "checkpoint_name": c.resolved.manifest.checkpoint_name, "reason": c.resolved.reason,
                      "files": len(c.resolved.checkpoint.files), "bytes": c.resolved.checkpoint.total_bytes,
                      "nodes": c.nodes(), "conflicts": [x.path for x in c.resolved.checkpoint.conflicts],
                      "files_intact": len(c.intact), "files_to_fetch": len(c.fetch),
                      "bytes_to_fetch": sum(t.entry.size for t in c.fetch),
                      "files_excluded": [t.entry.path for t in c.excluded]} for c in dry.checkpoints],
    )
    return dry


def render_plan(dry: DryRun) -> str:
    """The dry run for a person: per reference, what it chose and why, and what is already here."""
    state = "" if dry.root_exists else " (does not exist yet; a load creates it)"
    lines = [f"download folder: {dry.root.absolute()}{state}"]
    for c in dry.checkpoints:
        r, m, merged = c.resolved, c.resolved.manifest, c.resolved.checkpoint
        fetch_bytes = sum(t.entry.size for t in c.fetch)
        excluded_bytes = sum(t.entry.size for t in c.excluded)
        ranks = f"ranks {', '.join(map(str, merged.ranks))} in one folder" if r.merged else f"rank {m.rank}"
        lines += [
            f"{r.reference.describe()} -> job {m.job_id}, checkpoint {m.checkpoint_name} ({ranks})",
            f"  why:          {r.reason}",
            f"  committed at: {m.committed_at}",
            f"  into:         {dry.root.absolute() / c.folder}",
            f"  files:        {len(merged.files)}, {human_bytes(merged.total_bytes)}",
            *(f"  from rank {n['rank']}:  {n['files']} files, {human_bytes(n['bytes'])}; {n['files_intact']} "
              f"intact, {n['files_to_fetch']} to download ({human_bytes(n['bytes_to_fetch'])})" for n in c.nodes()),
            f"  present:      {len(c.intact)} files intact, {human_bytes(sum(t.entry.size for t in c.intact))}",
            f"  to download:  {len(c.fetch)} files, {human_bytes(fetch_bytes)}",
        ]
        if c.excluded:
            lines.append(f"  left out:     {len(c.excluded)} files, {human_bytes(excluded_bytes)} by "
                         f"{dry.plan.selection.source()}: {shown_paths([t.entry.path for t in c.excluded])}")
        conflict = describe_conflicts(merged)
        if conflict is not None:
            lines.append(f"  warning:      {conflict}")
    if not dry.checkpoints:
        lines.append("nothing to load")
    lines += [f"warning: {w}" for w in dry.resolution.warnings]
    enough = "" if dry.needed_bytes <= dry.free_bytes else "  NOT ENOUGH: a load would fail"
    lines.append(f"total: {dry.plan.total_files} files, {human_bytes(dry.plan.total_bytes)}; "
                 f"to download {len(dry.plan.fetch)} files, {human_bytes(dry.plan.fetch_bytes)}; "
                 + (f"{describe_left_out(dry.plan)}; " if dry.plan.excluded else "")
                 + f"free space {human_bytes(dry.free_bytes)}{enough}")
    return "\n".join(lines)
