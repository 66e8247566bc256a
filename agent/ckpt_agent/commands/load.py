"""`ckpt-agent load`: fetch and verify what the spec names, then tell a neighbour it is ready."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ckpt_agent.commands.context import Context, cancelled_by_signals
from ckpt_agent.config.selection import EVERY_FILE, Selection
from ckpt_agent.config.spec import LoadSpec, S3PrefixRef
from ckpt_agent.load.dryrun import plan_load, render_plan
from ckpt_agent.load.pipeline import clear_ready_file, load_checkpoints, write_ready_file


@dataclass(frozen=True)
class LoadOptions:
    dry_run: bool = False
    ready_file: Path | None = None  # written once every file is verified and in place; removed at the start
    selection: Selection = EVERY_FILE  # which files of each checkpoint to fetch: --include/--exclude or the variables
    source: S3PrefixRef | None = None  # --from s3://...: this prefix instead of the spec's checkpoints


def load(ctx: Context, options: LoadOptions) -> int:
    if options.source is not None:
        spec = LoadSpec(True, (options.source,), ctx.settings.spec.download_folder)
        ctx = replace(ctx, settings=replace(ctx.settings, spec=spec))
    settings = ctx.settings
    ready = None if options.dry_run else options.ready_file
    if ready is not None:
        clear_ready_file(ready)
    if not settings.spec.enabled:
        ctx.reporter.info("checkpoint loading is disabled (BT_LOAD_CHECKPOINT_CONFIG enabled=false or unset)")
    elif options.dry_run:
        print_plan(ctx, options.selection)
        return 0
    else:
        load_now(ctx, options.selection)
    if ready is not None:
        write_ready_file(ready, Path(settings.spec.download_folder) if settings.spec.enabled else None,
                         settings.node_rank)
        ctx.reporter.info(f"wrote ready file {ready}", event="ready_file", path=str(ready))
    return 0


def print_plan(ctx: Context, selection: Selection) -> None:
    """What a load would do; downloads nothing, takes no lock, creates no folder."""
    print(render_plan(plan_load(ctx.settings, ctx.reporter, selection)), flush=True)


def load_now(ctx: Context, selection: Selection) -> None:
    """The load, stopped by SIGTERM/SIGINT or BT_LOAD_TIMEOUT; a signal that came as it finished still counts."""
    with cancelled_by_signals(ctx.cancel):
        load_checkpoints(ctx.settings, ctx.reporter, ctx.cancel, selection)
    ctx.cancel.check_signal()
