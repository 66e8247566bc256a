"""`ckpt-agent run`: load, then hand the process to the trainer, or supervise it and upload its checkpoints."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckpt_agent.commands.context import Context
from ckpt_agent.commands.sync import open_sidecar
from ckpt_agent.config.selection import EVERY_FILE, Selection
from ckpt_agent.config.settings import trainer_grace
from ckpt_agent.config.sidecar import SyncFlags
from ckpt_agent.errors import ConfigError
from ckpt_agent.trainer.launch import exec_training, runs_through_shell, trainer_env, training_argv

if TYPE_CHECKING:
    from ckpt_agent.commands.early import EarlyChild
    from ckpt_agent.sync.loop import Sidecar


@dataclass(frozen=True)
class RunOptions:
    command: tuple[str, ...] = ()  # empty: BT_START_COMMANDS
    dry_run: bool = False
    sync: SyncFlags = SyncFlags()  # only with BT_CHECKPOINTING_ENABLED=1
    selection: Selection = EVERY_FILE  # which files of each checkpoint the load fetches
    start_early: bool = False  # start the trainer at once, load beside it (commands/early.py)


def run(ctx: Context, options: RunOptions) -> int:
    settings = ctx.settings
    argv = training_argv(options.command, settings.start_commands)
    if argv is None:
        raise ConfigError("no training command: give one after `--` or set BT_START_COMMANDS")
    given = options.sync.given()
    if given and not settings.checkpointing_enabled:
        raise ConfigError(f"{given[0]}: a checkpoint upload option, but checkpointing is off; "
                          "set BT_CHECKPOINTING_ENABLED=1 (or run `ckpt-agent sync` beside the trainer)")
    if options.dry_run:
        return _dry_run(ctx, argv, options.selection)
    # Checkpointing on: the trainer runs as a child so its last checkpoint is uploaded after it exits.
    sidecar = open_sidecar(ctx) if settings.checkpointing_enabled else None
    child_env = trainer_env(ctx.env)
    early = options.start_early and settings.spec.enabled
    if settings.spec.enabled:
        from pathlib import Path

        child_env["BT_LOAD_CHECKPOINT_DIR"] = str(Path(settings.spec.download_folder).absolute())
    if settings.spec.enabled and not early:
        from ckpt_agent.commands.load import load_now

        load_now(ctx, options.selection)
    # As PID 1 (a container without an init) the kernel drops every signal a process has no handler
    # for: an exec'd trainer without a SIGTERM handler would ignore `docker stop`. We stay its parent.
    as_child = sidecar is not None or runs_through_shell(argv, child_env) or os.getpid() == 1
    if early and not as_child:
        from ckpt_agent.commands.early import exec_early

        exec_early(ctx, argv, child_env, options.selection, _grace(ctx))
    loader = _early_child(ctx, options.selection) if early else None
    if sidecar is not None:
        return _supervise(argv, child_env, sidecar, ctx, loader)
    if as_child:
        return _run_as_child(argv, child_env, ctx, loader)
    exec_training(argv, child_env)


def _dry_run(ctx: Context, argv: list[str], selection: Selection) -> int:
    if ctx.settings.spec.enabled:
        from ckpt_agent.commands.load import print_plan

        print_plan(ctx, selection)
    else:
        print("checkpoint loading is disabled: nothing to load")
    import shlex  # only for the dry run: every `run` imports this module

    print(f"would exec: {shlex.join(argv)}", flush=True)
    return 0


def _grace(ctx: Context) -> float:
    """Only the grace period, not every sidecar option: a bad upload setting must not stop a run that
    uploads nothing (with checkpointing on, open_sidecar has already checked them all)."""
    return trainer_grace(ctx.env, ctx.sync_flags.grace_seconds)


def _early_child(ctx: Context, selection: Selection) -> EarlyChild:
    from ckpt_agent.commands.early import EarlyChild

    return EarlyChild(ctx, selection)


def _supervise(argv: list[str], env: dict[str, str], sidecar: Sidecar, ctx: Context,
               loader: EarlyChild | None) -> int:
    from ckpt_agent.trainer.supervise import supervise

    env.setdefault("BT_CHECKPOINT_DIR", str(sidecar.options.checkpoint_dir))
    try:
        return supervise(argv, loader.env(env) if loader else env, sidecar, ctx.reporter, loader)
    finally:
        sidecar.store.close()


def _run_as_child(argv: list[str], env: dict[str, str], ctx: Context, loader: EarlyChild | None) -> int:
    """A shell would swallow SIGTERM if exec'd: stay its parent so the trainer gets signals and time to save.
    With an early start, a failed load stops the trainer and its exit code is ours."""
    from ckpt_agent.trainer.procgroup import TrainerGroup

    try:
        with TrainerGroup(argv, loader.env(env) if loader else env, _grace(ctx), ctx.reporter) as group:
            status = group.wait(loader.watch if loader else None)
    finally:
        failed = loader.finish() if loader else None
    return failed if failed is not None else group.exit_code(status)
