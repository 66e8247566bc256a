"""The command line: the one place the commands get argv and os.environ, and the one place errors are printed.

Each command's flags become its options dataclass here, the environment becomes a Context
(ckpt_agent.commands) through the parsers of ckpt_agent.config.settings (the sidecar's options, flags
over variables, when a command needs them), and every AgentError is caught once and printed as one line; its class
picks the exit code. (Training code's ckpt_agent.latest_local_checkpoint reads os.environ for itself.)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from ckpt_agent.commands.context import Context
from ckpt_agent.config.settings import (
    debug,
    env_flag,
    load_spec,
    log_format,
    selection_from_env,
    settings_from_env,
)
from ckpt_agent.config.sidecar import SyncFlags
from ckpt_agent.config.spec import check_name, parse_s3_prefix
from ckpt_agent.errors import EXIT_INTERNAL, EXIT_SIGINT, AgentError, ConfigError
from ckpt_agent.report import Reporter, make_reporter
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.version import __version__

EPILOG_MAIN = """examples:
  ckpt-agent ls                                  # every job in BT_CHECKPOINT_STORE
  ckpt-agent load --dry-run                      # what BT_LOAD_CHECKPOINT_CONFIG would load
  ckpt-agent run -- python train.py              # load, then exec the trainer
  ckpt-agent verify /tmp/loaded_checkpoints      # re-check what a load left on disk
  ckpt-agent COMMAND --help                      # each command's flags and examples"""
EPILOG_RUN = """examples:
  ckpt-agent run -- python train.py --epochs 3
  BT_START_COMMANDS='["./run.sh"]' ckpt-agent run
  ckpt-agent run --dry-run -- python train.py    # print the plan and the command; run nothing
  ckpt-agent run --start-early -- python train.py   # the trainer starts while the checkpoint loads
  BT_CHECKPOINTING_ENABLED=1 BT_TRAINING_JOB_ID=job1 ckpt-agent run --complete-file DONE -- python train.py

checkpointing: with BT_CHECKPOINTING_ENABLED=1 the trainer runs as a child and every checkpoint it
writes to BT_CHECKPOINT_DIR is uploaded as `ckpt-agent sync` does (the checkpoint flags above), then
flushed after it exits; run exits with the trainer's status. See docs/sidecar.md for the formats."""
EPILOG_LOAD = """examples:
  export BT_LOAD_CHECKPOINT_CONFIG='{"enabled": true, "checkpoints": [
    {"typ": "baseten_latest_checkpoint", "project_name": "demo", "job_id": null}]}'
  ckpt-agent load
  ckpt-agent load --dry-run                      # which checkpoint each reference picks, and why
  ckpt-agent load --ready-file /shared/ready     # for a neighbour container that waits on it
  ckpt-agent load --exclude optimizer.pt,scheduler.pt --dry-run   # weights only: what is left out
  ckpt-agent load --from s3://bucket/runs/checkpoint-500/          # objects another tool wrote
  BT_CHECKPOINT_STORE=baseten BASETEN_API_KEY=... ckpt-agent load  # a Baseten job's checkpoints"""
EPILOG_LS = """examples:
  ckpt-agent ls                                  # every job: project, job, created, nodes
  ckpt-agent ls --project demo                   # that project's jobs, newest first
  ckpt-agent ls --job-id job1                    # job1's checkpoints, newest first
  BT_CHECKPOINT_STORE=s3://bucket/prefix ckpt-agent ls --json | jq '.jobs[].job_id'"""
EPILOG_VERIFY = """examples:
  ckpt-agent verify                              # the spec's download_folder
  ckpt-agent verify /tmp/loaded_checkpoints --json
exit status: 0 when every file is ok, 5 when any is missing, changed or extra."""
EPILOG_SAVE = """example:
  ckpt-agent save ./checkpoint-20 --project demo --job-id job1 --name checkpoint-20"""
EPILOG_SYNC = """examples:
  BT_TRAINING_PROJECT_NAME=demo BT_TRAINING_JOB_ID=job1 ckpt-agent sync      # watch BT_CHECKPOINT_DIR
  ckpt-agent sync --once                         # upload what is stable now, then exit
  ckpt-agent sync --keep-last 3 --quiet-seconds 10
With `ckpt-agent run` and BT_CHECKPOINTING_ENABLED=1 the same loop runs alongside the trainer."""


def _context(env: Mapping[str, str], reporter: Reporter, workers: int | None = None,
             chunk_mb: int | None = None, *, load_timeout: bool = False) -> Context:
    """load_timeout: the command loads, so BT_LOAD_TIMEOUT bounds its work through the cancel token."""
    settings = settings_from_env(env, workers=workers, chunk_mb=chunk_mb)
    return Context(settings, reporter, Cancel(settings.load_timeout if load_timeout else None), env)


def _with_sync(ctx: Context, flags: SyncFlags, checkpoint_dir: str | None = None) -> Context:
    """`sync` and `run`: the upload flags, which Context.sync parses with the variables when needed."""
    return replace(ctx, sync_flags=flags, sync_dir=checkpoint_dir)


def _sync_flags(args: argparse.Namespace) -> SyncFlags:
    complete = None if args.complete_file is None else tuple(args.complete_file)
    return SyncFlags(args.quiet_seconds, args.poll_seconds, args.grace_seconds, args.keep_last, complete,
                     args.commit_on_quiet)


# One function per command: its options from the flags, its context from the environment, the call.

def _run(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    from ckpt_agent.commands.run import RunOptions, run

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    options = RunOptions(tuple(command), args.dry_run, _sync_flags(args),
                         selection_from_env(env, args.include, args.exclude),
                         args.start_early or env_flag(env, "CKPT_AGENT_START_EARLY"))
    ctx = _context(env, reporter, args.workers, args.chunk_mb, load_timeout=True)
    return run(_with_sync(ctx, options.sync), options)


def _load(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    from ckpt_agent.commands.load import LoadOptions, load

    source = None if args.source is None else parse_s3_prefix(args.source, "--from")
    options = LoadOptions(args.dry_run, Path(args.ready_file) if args.ready_file else None,
                          selection_from_env(env, args.include, args.exclude), source)
    return load(_context(env, reporter, args.workers, args.chunk_mb, load_timeout=True), options)


def _save(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    from ckpt_agent.commands.save import SaveOptions, save

    options = SaveOptions(args.folder, args.project, args.job_id, args.name, args.rank, args.num_nodes)
    return save(_context(env, reporter, args.workers, args.chunk_mb), options)


def _sync(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    from ckpt_agent.commands.sync import SyncCommandOptions, sync

    options = SyncCommandOptions(args.once, args.checkpoint_dir, _sync_flags(args))
    ctx = _context(env, reporter, args.workers, args.chunk_mb)
    return sync(_with_sync(ctx, options.flags, options.checkpoint_dir), options)


def _ls(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    from ckpt_agent.commands.ls import ListOptions, ls

    options = ListOptions(check_name(args.project, "--project", nullable=True),
                          check_name(args.job_id, "--job-id", nullable=True), args.json)
    return ls(_context(env, reporter), options)


def _verify(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    from ckpt_agent.commands.verify import VerifyOptions, verify

    return verify(reporter, VerifyOptions(Path(args.folder or load_spec(env).download_folder), args.json))


def _add_sync_flags(p: argparse._ActionsContainer) -> None:
    """The upload flags `sync` and `run` share (SyncFlags); None when not given, so the variable applies."""
    p.add_argument("--quiet-seconds", type=float, metavar="S",
                   help="no change for this long makes a checkpoint stable (env CKPT_AGENT_QUIET_SECONDS, "
                        "default 5)")
    p.add_argument("--poll-seconds", type=float, metavar="S",
                   help="how often to look (env CKPT_AGENT_POLL_SECONDS, default 2)")
    p.add_argument("--grace-seconds", type=float, metavar="S",
                   help="after SIGTERM, time to finish uploads (env CKPT_AGENT_GRACE_SECONDS, default 25)")
    p.add_argument("--keep-last", type=int, metavar="N",
                   help="delete this job's older committed checkpoints beyond N (env CKPT_AGENT_KEEP_LAST)")
    p.add_argument("--complete-file", action="append", metavar="PATH",
                   help="a checkpoint folder is complete once one of these files is in it (repeatable or "
                        "comma-separated; env CKPT_AGENT_COMPLETE_FILE); replaces the built-in HF Trainer, "
                        "DCP and DeepSpeed rules for folders")
    p.add_argument("--commit-on-quiet", action="store_true", default=None,
                   help="commit folders of no known format on the quiet period alone: a crashed save can "
                        "then be committed (env CKPT_AGENT_COMMIT_ON_QUIET=1)")


def _add_selection_flags(p: argparse.ArgumentParser) -> None:
    """`load` and `run`: which files of each checkpoint to fetch; each flag given replaces its variable."""
    p.add_argument("--include", action="append", metavar="GLOBS",
                   help="fetch only files matching these globs, relative to the checkpoint folder (repeatable or "
                        "comma-separated; replaces env CKPT_AGENT_INCLUDE), e.g. '*.safetensors,config.json'")
    p.add_argument("--exclude", action="append", metavar="GLOBS",
                   help="never fetch files matching these globs (repeatable or comma-separated; replaces env "
                        "CKPT_AGENT_EXCLUDE), e.g. 'optimizer.pt,global_step*/'; see docs/limits.md")


def _add_transfer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, help="concurrent requests (env CKPT_AGENT_WORKERS)")
    p.add_argument("--chunk-mb", type=int, help="MiB per ranged GET (env CKPT_AGENT_CHUNK_MB)")


HELP = {  # every command's one line, for the list in `ckpt-agent --help`
    "run": "load checkpoints, then exec the training command (or supervise it and upload its checkpoints, "
           "with BT_CHECKPOINTING_ENABLED=1)",
    "load": "load checkpoints, then exit",
    "save": "upload a checkpoint folder and commit it",
    "sync": "upload checkpoints from BT_CHECKPOINT_DIR as training writes them",
    "ls": "list jobs, or one job's checkpoints, in the store",
    "verify": "re-check a download folder against the manifests it came from",
}
Subparsers = argparse._SubParsersAction  # argparse's own name for what add_subparsers returns


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Given argv, only the command it names gets its flags: building all six took ~5 ms of every
    start (`run -- true`, bench/startup.py), and a command never reads another's flags."""
    chosen = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog="ckpt-agent",
        description="Load verified training checkpoints before training starts; upload new ones.",
        epilog=EPILOG_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckpt-agent {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    builders = {"run": _run_parser, "load": _load_parser, "save": _save_parser, "sync": _sync_parser,
                "ls": _ls_parser, "verify": _verify_parser}
    for name, build in builders.items():
        if chosen in (None, name) or chosen not in HELP:
            build(sub)
        else:
            sub.add_parser(name, help=HELP[name])

    for command in sub.choices.values():  # `--version` works after every command too
        if "--version" not in command._option_string_actions:
            command.add_argument("--version", action="version", version=f"ckpt-agent {__version__}")
    return parser


def _run_parser(sub: Subparsers) -> None:
    run = sub.add_parser("run", help=HELP["run"],
                         epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_transfer_flags(run)
    _add_selection_flags(run)
    _add_sync_flags(run.add_argument_group("checkpoint upload (with BT_CHECKPOINTING_ENABLED=1)"))
    run.add_argument("--dry-run", action="store_true",
                     help="print what would be loaded and executed; download and run nothing")
    run.add_argument("--start-early", action="store_true",
                     help="start the trainer at once and load beside it; ckpt_agent.latest_local_checkpoint() "
                          "waits for the load, a failed load stops the trainer (env CKPT_AGENT_START_EARLY=1)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command after `--`")
    run.set_defaults(func=_run)


def _load_parser(sub: Subparsers) -> None:
    load = sub.add_parser("load", help=HELP["load"],
                          epilog=EPILOG_LOAD, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_transfer_flags(load)
    _add_selection_flags(load)
    load.add_argument("--dry-run", action="store_true",
                      help="resolve every reference and print the plan; download nothing")
    load.add_argument("--from", dest="source", metavar="S3_URI",
                      help="load every object under s3://bucket/path/checkpoint-name/ into "
                           "rank-<r>/checkpoint-name/ instead of the spec's checkpoints (verified by S3's checksums)")
    load.add_argument("--ready-file", metavar="PATH",
                      help="write PATH once every file is verified and in place (removed at start)")
    load.set_defaults(func=_load)


def _save_parser(sub: Subparsers) -> None:
    save = sub.add_parser("save", help=HELP["save"],
                          epilog=EPILOG_SAVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_transfer_flags(save)
    save.add_argument("folder", help="the checkpoint folder to upload")
    save.add_argument("--project", help="project name (env BT_TRAINING_PROJECT_NAME)")
    save.add_argument("--job-id", help="job id (env BT_TRAINING_JOB_ID)")
    save.add_argument("--name", help="checkpoint name (default: the folder's name)")
    save.add_argument("--rank", type=int, help="node rank (env BT_NODE_RANK, default 0)")
    save.add_argument("--num-nodes", type=int, help="nodes in the job (env BT_GROUP_SIZE, default 1)")
    save.set_defaults(func=_save)


def _sync_parser(sub: Subparsers) -> None:
    sync = sub.add_parser("sync", help=HELP["sync"],
                          epilog=EPILOG_SYNC, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_transfer_flags(sync)
    sync.add_argument("--once", action="store_true", help="upload what is stable now, then exit")
    sync.add_argument("--checkpoint-dir", metavar="DIR",
                      help="the folder to watch (env BT_CHECKPOINT_DIR, default /tmp/training_checkpoints)")
    _add_sync_flags(sync)
    sync.set_defaults(func=_sync)


def _ls_parser(sub: Subparsers) -> None:
    ls = sub.add_parser("ls", help=HELP["ls"],
                        epilog=EPILOG_LS, formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.add_argument("--project", help="only this project's jobs")
    ls.add_argument("--job-id", help="this job's checkpoints instead of jobs")
    ls.add_argument("--json", action="store_true", help="JSON for machines instead of a table")
    ls.set_defaults(func=_ls)


def _verify_parser(sub: Subparsers) -> None:
    verify = sub.add_parser("verify", help=HELP["verify"],
                            epilog=EPILOG_VERIFY, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("folder", nargs="?", metavar="DIR",
                        help="the download folder (default: the spec's download_folder, /tmp/loaded_checkpoints)")
    verify.add_argument("--json", action="store_true", help="JSON for machines instead of one line per file")
    verify.set_defaults(func=_verify)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    env = os.environ if env is None else env
    try:
        reporter = make_reporter(log_format(env))
    except ConfigError as exc:
        Reporter().error(str(exc))
        return exc.exit_code
    try:
        return args.func(args, env, reporter)
    except AgentError as exc:
        reporter.error(str(exc), exit_code=exc.exit_code, error=type(exc).__name__)
        return exc.exit_code
    except KeyboardInterrupt:
        reporter.error("interrupted", exit_code=EXIT_SIGINT)
        return EXIT_SIGINT
    except Exception as exc:  # noqa: BLE001 - the last line: its text may quote a secret, so only the class
        if debug(env):
            import traceback

            traceback.print_exc()
        detail = f": {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else ""
        reporter.error(f"unexpected {type(exc).__name__}{detail}; this is a bug in ckpt-agent, please report it "
                       "(CKPT_AGENT_DEBUG=1 prints the traceback, which may quote secrets)",
                       exit_code=EXIT_INTERNAL, error=type(exc).__name__)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
