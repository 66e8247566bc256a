"""`ckpt-agent sync`: upload checkpoints from BT_CHECKPOINT_DIR as training writes them.

`run` with BT_CHECKPOINTING_ENABLED=1 starts the same loop through open_sidecar, with the same
flags (SyncFlags), so this module stays light to import: the loop itself is imported when used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckpt_agent.commands.context import Context
from ckpt_agent.config.sidecar import SyncFlags
from ckpt_agent.errors import ConfigError

if TYPE_CHECKING:
    from ckpt_agent.sync.loop import Sidecar


@dataclass(frozen=True)
class SyncCommandOptions:
    once: bool = False
    checkpoint_dir: str | None = None  # None: BT_CHECKPOINT_DIR
    flags: SyncFlags = SyncFlags()  # with checkpoint_dir, handed by the cli to Context (Context.sync)


def sync(ctx: Context, options: SyncCommandOptions) -> int:
    from ckpt_agent.sync.standalone import run_standalone

    sidecar = open_sidecar(ctx)
    try:
        return run_standalone(sidecar, options.once, ctx.reporter)
    finally:
        sidecar.store.close()


def open_sidecar(ctx: Context) -> Sidecar:
    """The sync loop for `sync` and for `run` in supervise mode (`ctx.sync`); checks the identity first."""
    from ckpt_agent.stores import open_store, refuse_read_only
    from ckpt_agent.sync.loop import Sidecar
    from ckpt_agent.upload.commit import CheckpointId

    settings = ctx.settings
    refuse_read_only(settings.store_config)
    job_id = settings.job_id
    if not job_id:
        raise ConfigError("BT_TRAINING_JOB_ID: required to upload checkpoints "
                          "(`ckpt-agent sync`, or `run` with BT_CHECKPOINTING_ENABLED=1); set it to this job's id")
    if settings.node_rank >= settings.num_nodes:
        raise ConfigError(f"BT_NODE_RANK={settings.node_rank}: must be below the node count "
                          f"BT_GROUP_SIZE={settings.num_nodes}")
    ident = CheckpointId(settings.project_name, job_id, "", settings.node_rank, settings.num_nodes)
    return Sidecar(open_store(settings.store_config), ident, ctx.sync, settings.workers, ctx.reporter,
                   max_rate=settings.max_rate)
