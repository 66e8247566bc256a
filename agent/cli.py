"""The command line: the only module that reads os.environ and argv, prints errors and execs.

Every AgentError is caught here once and printed as one line; its class picks the exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent import __version__
from agent.cancel import Cancel
from agent.errors import AgentError, ConfigError
from agent.report import Reporter
from agent.settings import Settings, settings_from_env
from agent.spec import check_name

EPILOG_RUN = """examples:
  ckpt-agent run -- python train.py --epochs 3
  BT_START_COMMANDS='["./run.sh"]' ckpt-agent run"""
EPILOG_LOAD = """example:
  export BT_LOAD_CHECKPOINT_CONFIG='{"enabled": true, "checkpoints": [
    {"typ": "baseten_latest_checkpoint", "project_name": "demo", "job_id": null}]}'
  ckpt-agent load"""
EPILOG_SAVE = """example:
  ckpt-agent save ./checkpoint-20 --project demo --job-id job1 --name checkpoint-20"""


def _install_signal_handlers(cancel: Cancel) -> None:
    def handler(signum: int, _frame) -> None:
        cancel.signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def _settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    return settings_from_env(env, workers=getattr(args, "workers", None),
                             chunk_mb=getattr(args, "chunk_mb", None))


def _load(settings: Settings, reporter: Reporter) -> None:
    from agent.load import load_checkpoints

    cancel = Cancel(settings.load_timeout)
    _install_signal_handlers(cancel)
    load_checkpoints(settings, reporter, cancel)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    cancel.check_signal()


def cmd_load(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    settings = _settings(args, env)
    if not settings.spec.enabled:
        reporter.info("checkpoint loading is disabled (BT_LOAD_CHECKPOINT_CONFIG enabled=false or unset)")
        return 0
    _load(settings, reporter)
    return 0


def cmd_run(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    from agent.launch import exec_training, training_argv

    settings = _settings(args, env)
    argv = training_argv(args.command, settings.start_commands)
    if argv is None:
        raise ConfigError("no training command: give one after `--` or set BT_START_COMMANDS")
    child_env = dict(env)
    if settings.spec.enabled:
        _load(settings, reporter)
        child_env["BT_LOAD_CHECKPOINT_DIR"] = str(Path(settings.spec.download_folder).absolute())
    exec_training(argv, child_env)


def cmd_save(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    from agent.save import CheckpointId, commit_checkpoint, scan_folder
    from agent.stores import open_store

    settings = _settings(args, env)
    ident = CheckpointId(
        project_name=check_name(args.project or settings.project_name, "--project", nullable=True),
        job_id=check_name(args.job_id or settings.job_id, "--job-id"),
        name=check_name(args.name or Path(args.folder).name, "--name"),
        rank=settings.node_rank if args.rank is None else args.rank,
        num_nodes=args.num_nodes or settings.num_nodes,
    )
    if not 0 <= ident.rank < ident.num_nodes:
        raise ConfigError(f"--rank {ident.rank}: must be below --num-nodes {ident.num_nodes}")
    folder = Path(args.folder)
    total = sum(f.size for f in scan_folder(folder))
    cancel = Cancel()
    _install_signal_handlers(cancel)
    store = open_store(settings)
    sink = reporter.progress(total, "upload")
    try:
        manifest = commit_checkpoint(store, folder, ident, settings.workers, sink, cancel)
    finally:
        sink.close()
        store.close()
    reporter.info(f"committed {ident.job_id}/{ident.name} rank {ident.rank} to {settings.store}: "
                  f"{len(manifest.files)} files, {manifest.total_bytes} bytes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt-agent",
        description="Load verified training checkpoints before training starts; upload new ones.",
    )
    parser.add_argument("--version", action="version", version=f"ckpt-agent {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def transfer_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workers", type=int, help="concurrent requests (env CKPT_AGENT_WORKERS)")
        p.add_argument("--chunk-mb", type=int, help="MiB per ranged GET (env CKPT_AGENT_CHUNK_MB)")

    run = sub.add_parser("run", help="load checkpoints, then exec the training command",
                         epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    transfer_flags(run)
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command after `--`")
    run.set_defaults(func=cmd_run)

    load = sub.add_parser("load", help="load checkpoints, then exit",
                          epilog=EPILOG_LOAD, formatter_class=argparse.RawDescriptionHelpFormatter)
    transfer_flags(load)
    load.set_defaults(func=cmd_load)

    save = sub.add_parser("save", help="upload a checkpoint folder and commit it",
                          epilog=EPILOG_SAVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    transfer_flags(save)
    save.add_argument("folder", help="the checkpoint folder to upload")
    save.add_argument("--project", help="project name (env BT_TRAINING_PROJECT_NAME)")
    save.add_argument("--job-id", help="job id (env BT_TRAINING_JOB_ID)")
    save.add_argument("--name", help="checkpoint name (default: the folder's name)")
    save.add_argument("--rank", type=int, help="node rank (env BT_NODE_RANK, default 0)")
    save.add_argument("--num-nodes", type=int, help="nodes in the job (env BT_NUM_NODES, default 1)")
    save.set_defaults(func=cmd_save)
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    reporter = Reporter()
    try:
        return args.func(args, os.environ if env is None else env, reporter)
    except AgentError as exc:
        reporter.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        reporter.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
