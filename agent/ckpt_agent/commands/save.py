"""`ckpt-agent save`: upload one checkpoint folder and commit it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ckpt_agent.commands.context import Context, cancelled_by_signals
from ckpt_agent.config.spec import check_name
from ckpt_agent.errors import ConfigError
from ckpt_agent.runtime.ratelimit import limiter
from ckpt_agent.stores import open_store, refuse_read_only
from ckpt_agent.upload.commit import CheckpointId, CommitRequest, commit_checkpoint
from ckpt_agent.upload.incremental import Transferred, describe, previous_commit
from ckpt_agent.upload.scan import scan_checkpoint


@dataclass(frozen=True)
class SaveOptions:
    """The flags as given; None falls back to the environment (the name: to the folder's name)."""

    folder: str
    project: str | None = None
    job_id: str | None = None
    name: str | None = None
    rank: int | None = None
    num_nodes: int | None = None


def save(ctx: Context, options: SaveOptions) -> int:
    settings = ctx.settings
    refuse_read_only(settings.store_config)
    ident = CheckpointId(
        project_name=check_name(options.project or settings.project_name, "--project", nullable=True),
        job_id=check_name(options.job_id or settings.job_id, "--job-id"),
        name=check_name(options.name or Path(os.path.abspath(options.folder)).name, "--name"),
        rank=settings.node_rank if options.rank is None else options.rank,
        num_nodes=options.num_nodes or settings.num_nodes,
    )
    if not 0 <= ident.rank < ident.num_nodes:
        raise ConfigError(f"--rank {ident.rank}: must be below --num-nodes {ident.num_nodes}")
    folder = Path(os.path.realpath(options.folder))  # the path given is the user's choice; links inside are not
    total = sum(f.size for f in scan_checkpoint(folder))
    with cancelled_by_signals(ctx.cancel):
        store = open_store(settings.store_config)
        moved = Transferred()
        sink = ctx.reporter.progress(total, "upload")
        try:
            limits = limiter(settings.max_rate, settings.workers, ctx.cancel, ctx.reporter.info)
            previous = previous_commit(store, ident.job_id, ident.rank, ident.name)
            request = CommitRequest(folder, ident, settings.workers, previous=previous)
            manifest = commit_checkpoint(store, request, sink, ctx.cancel, moved, limits)
        finally:
            sink.close()
            store.close()
    ctx.reporter.info(f"committed {ident.job_id}/{ident.name} rank {ident.rank} to {settings.store}: "
                      f"{len(manifest.files)} files, {manifest.total_bytes} bytes ({describe(moved)})",
                      event="save_committed", checkpoint=ident.name, files=len(manifest.files),
                      bytes=manifest.total_bytes, bytes_sent=moved.sent, bytes_copied=moved.copied,
                      files_copied=len(moved.files_copied))
    return 0
