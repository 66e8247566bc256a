"""The load command: spec -> resolved manifests -> plan -> verified files on disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from agent import __version__
from agent.cancel import Cancel
from agent.errors import LocalError
from agent.localstate import VerifiedIndex, folder_lock, incomplete_path, prepare_root, state_dir, write_json_atomic
from agent.plan import Plan, make_plan
from agent.report import Reporter, human_bytes
from agent.resolve import Resolution, resolve
from agent.settings import Settings
from agent.stores import open_store
from agent.transfer import TransferOptions, TransferStats, run_plan


@dataclass(frozen=True)
class LoadResult:
    resolution: Resolution
    plan: Plan
    stats: TransferStats


def _bytes_needed(plan: Plan) -> int:
    """Bytes still to be allocated: partial files from an earlier run already hold theirs."""
    needed = 0
    for task in plan.fetch:
        have = 0
        for path in (incomplete_path(task.dest), task.dest):
            with contextlib.suppress(FileNotFoundError):
                have = max(have, os.stat(path).st_blocks * 512)
        needed += max(0, task.entry.size - have)
    return needed


def check_free_space(plan: Plan) -> None:
    needed = _bytes_needed(plan)
    free = shutil.disk_usage(plan.root).free
    if needed > free:
        raise LocalError(
            f"download_folder {plan.root}: needs {human_bytes(needed)} but only {human_bytes(free)} "
            "is free; free space or choose another download_folder"
        )


def _record(root: Path, result: LoadResult, started: float) -> None:
    write_json_atomic(state_dir(root) / "loaded.json", {
        "agent_version": __version__,
        "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - started, 3),
        "bytes_fetched": result.stats.bytes_fetched,
        "checkpoints": [
            {"reference": r.reference.describe(), "job_id": r.manifest.job_id,
             "project_name": r.manifest.project_name, "checkpoint_name": r.manifest.checkpoint_name,
             "rank": r.manifest.rank, "committed_at": r.manifest.committed_at,
             "files": len(r.manifest.files), "bytes": r.manifest.total_bytes, "reason": r.reason}
            for r in result.resolution.checkpoints
        ],
    })


def load_checkpoints(settings: Settings, reporter: Reporter, cancel: Cancel) -> LoadResult:
    started = time.monotonic()
    root = Path(settings.spec.download_folder)
    store = open_store(settings)
    try:
        resolution = resolve(store, settings.spec.checkpoints, settings.node_rank,
                             settings.project_name, settings.required)
        for warning in resolution.warnings:
            reporter.warn(warning)
        for r in resolution.checkpoints:
            m = r.manifest
            reporter.info(f"{r.reference.describe()} -> job {m.job_id} checkpoint {m.checkpoint_name} "
                          f"(rank {m.rank}): {len(m.files)} files, {human_bytes(m.total_bytes)}")
        prepare_root(root)
        with folder_lock(root, reporter.info, cancel.check):
            index = VerifiedIndex(root)
            plan = make_plan(root, tuple(r.manifest for r in resolution.checkpoints),
                             settings.node_rank, index)
            check_free_space(plan)
            sink = reporter.progress(plan.fetch_bytes, "download")
            try:
                options = TransferOptions(workers=settings.workers, chunk_size=settings.chunk_size)
                stats = run_plan(store, plan, options, sink, cancel, index)
            finally:
                sink.close()
            result = LoadResult(resolution, plan, stats)
            _record(root, result, started)
    finally:
        store.close()
    seconds = time.monotonic() - started
    rate = stats.bytes_fetched / seconds / 1e6 if seconds > 0 else 0.0
    reporter.info(
        f"loaded {plan.total_files} files, {human_bytes(plan.total_bytes)} into {root}: "
        f"fetched {stats.files_fetched} files ({human_bytes(stats.bytes_fetched)}), "
        f"{stats.files_reused} already intact, {seconds:.2f} s, {rate:.0f} MB/s"
    )
    return result
