"""`ckpt-agent sync`: upload checkpoints from BT_CHECKPOINT_DIR as training writes them.

`run` with BT_CHECKPOINTING_ENABLED=1 starts the same loop through open_sidecar, with the same
flags (SyncFlags), so this module stays light to import: the loop itself is imported when used.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from ckpt_agent.commands.context import Context
from ckpt_agent.errors import ConfigError

if TYPE_CHECKING:
    from ckpt_agent.sync.loop import Sidecar


@dataclass(frozen=True)
class SyncFlags:
    """The upload flags `sync` and `run` share; None: not given, so the variable or the default applies."""

    quiet_seconds: float | None = None
    poll_seconds: float | None = None
    grace_seconds: float | None = None
    keep_last: int | None = None
    complete_file: tuple[str, ...] | None = None
    commit_on_quiet: bool | None = None

    def given(self) -> list[str]:
        """The flags given, as spelled on the command line."""
        return [f"--{f.name.replace('_', '-')}" for f in fields(self) if getattr(self, f.name) not in (None, False)]


@dataclass(frozen=True)
class SyncCommandOptions:
    once: bool = False
    checkpoint_dir: str | None = None  # None: BT_CHECKPOINT_DIR
    flags: SyncFlags = SyncFlags()  # with checkpoint_dir, parsed by the cli into Context.sync


def sync(ctx: Context, options: SyncCommandOptions) -> int:
    from ckpt_agent.sync.standalone import run_standalone

    sidecar = open_sidecar(ctx)
    try:
        return run_standalone(sidecar, options.once, ctx.reporter)
    finally:
        sidecar.store.close()


def open_sidecar(ctx: Context) -> Sidecar:
    """The sync loop for `sync` and for `run` in supervise mode (`ctx.sync`); checks the identity first."""
    from ckpt_agent.stores import open_store
    from ckpt_agent.sync.loop import Sidecar
    from ckpt_agent.upload.commit import CheckpointId

    settings = ctx.settings
    job_id = settings.job_id
    if not job_id:
        raise ConfigError("BT_TRAINING_JOB_ID: required to upload checkpoints "
                          "(`ckpt-agent sync`, or `run` with BT_CHECKPOINTING_ENABLED=1); set it to this job's id")
    if settings.node_rank >= settings.num_nodes:
        raise ConfigError(f"BT_NODE_RANK={settings.node_rank}: must be below the node count "
                          f"BT_GROUP_SIZE={settings.num_nodes}")
    if ctx.sync is None:
        raise ValueError("open_sidecar: the context has no sync options (the cli parses them for sync and run)")
    ident = CheckpointId(settings.project_name, job_id, "", settings.node_rank, settings.num_nodes)
    return Sidecar(open_store(settings), ident, ctx.sync, settings.workers, ctx.reporter, max_rate=settings.max_rate)
