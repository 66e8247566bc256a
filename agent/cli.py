"""The command line: the only module that reads os.environ and argv, prints errors and execs.

Every AgentError is caught here once and printed as one line; its class picks the exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent import __version__
from agent.cancel import Cancel
from agent.errors import EXIT_INTERNAL, AgentError, ConfigError
from agent.report import Reporter, make_reporter
from agent.settings import Settings, settings_from_env
from agent.spec import check_name

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
  BT_CHECKPOINTING_ENABLED=1 BT_TRAINING_JOB_ID=job1 ckpt-agent run --complete-file DONE -- python train.py

checkpointing: with BT_CHECKPOINTING_ENABLED=1 the trainer runs as a child and every checkpoint it
writes to BT_CHECKPOINT_DIR is uploaded as `ckpt-agent sync` does (the checkpoint flags above), then
flushed after it exits; run exits with the trainer's status. See docs/sidecar.md for the formats."""
EPILOG_LOAD = """examples:
  export BT_LOAD_CHECKPOINT_CONFIG='{"enabled": true, "checkpoints": [
    {"typ": "baseten_latest_checkpoint", "project_name": "demo", "job_id": null}]}'
  ckpt-agent load
  ckpt-agent load --dry-run                      # which checkpoint each reference picks, and why
  ckpt-agent load --ready-file /shared/ready     # for a neighbour container that waits on it"""
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


# The flags `run` shares with `sync` (flag, argparse dest): they need BT_CHECKPOINTING_ENABLED=1.
SYNC_FLAGS = (("--quiet-seconds", "quiet_seconds"), ("--poll-seconds", "poll_seconds"),
              ("--grace-seconds", "grace_seconds"), ("--keep-last", "keep_last"),
              ("--complete-file", "complete_file"), ("--commit-on-quiet", "commit_on_quiet"))


def _install_signal_handlers(cancel: Cancel) -> None:
    def handler(signum: int, _frame) -> None:
        cancel.signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


def _settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    return settings_from_env(env, workers=getattr(args, "workers", None),
                             chunk_mb=getattr(args, "chunk_mb", None))


def _dry_run(settings: Settings, reporter: Reporter) -> None:
    """Print what a load would do; downloads nothing, takes no lock, creates no folder."""
    from agent.load import plan_load, render_plan

    print(render_plan(plan_load(settings, reporter)), flush=True)


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
    ready = Path(args.ready_file) if getattr(args, "ready_file", None) and not args.dry_run else None
    if ready is not None:
        from agent.load import clear_ready_file

        clear_ready_file(ready)
    if not settings.spec.enabled:
        reporter.info("checkpoint loading is disabled (BT_LOAD_CHECKPOINT_CONFIG enabled=false or unset)")
    elif getattr(args, "dry_run", False):
        _dry_run(settings, reporter)
        return 0
    else:
        _load(settings, reporter)
    if ready is not None:
        from agent.load import write_ready_file

        write_ready_file(ready, Path(settings.spec.download_folder) if settings.spec.enabled else None,
                         settings.node_rank)
        reporter.info(f"wrote ready file {ready}", event="ready_file", path=str(ready))
    return 0


def cmd_run(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    from agent.launch import exec_training, runs_through_shell, training_argv

    settings = _settings(args, env)
    argv = training_argv(args.command, settings.start_commands)
    if argv is None:
        raise ConfigError("no training command: give one after `--` or set BT_START_COMMANDS")
    given = [flag for flag, dest in SYNC_FLAGS if getattr(args, dest, None) not in (None, False)]
    if given and not settings.checkpointing_enabled:
        raise ConfigError(f"{given[0]}: a checkpoint upload option, but checkpointing is off; "
                          "set BT_CHECKPOINTING_ENABLED=1 (or run `ckpt-agent sync` beside the trainer)")
    child_env = dict(env)
    if getattr(args, "dry_run", False):
        import shlex

        if settings.spec.enabled:
            _dry_run(settings, reporter)
        else:
            print("checkpoint loading is disabled: nothing to load")
        print(f"would exec: {shlex.join(argv)}", flush=True)
        return 0
    # Checkpointing on: the trainer runs as a child so its last checkpoint is uploaded after it exits.
    sidecar = _sidecar(settings, env, args, reporter) if settings.checkpointing_enabled else None
    if settings.spec.enabled:
        _load(settings, reporter)
        child_env["BT_LOAD_CHECKPOINT_DIR"] = str(Path(settings.spec.download_folder).absolute())
    if sidecar is not None:
        from agent.supervise import supervise

        child_env.setdefault("BT_CHECKPOINT_DIR", str(sidecar.options.checkpoint_dir))
        try:
            return supervise(argv, child_env, sidecar, reporter)
        finally:
            sidecar.store.close()
    if runs_through_shell(argv, child_env):
        return _run_as_child(argv, child_env, reporter)
    exec_training(argv, child_env)


def _run_as_child(argv: list[str], env: Mapping[str, str], reporter: Reporter) -> int:
    """A shell would swallow SIGTERM if exec'd: stay its parent so the trainer gets signals and time to save."""
    from agent.procgroup import TrainerGroup
    from agent.syncopts import sync_options

    grace = sync_options(env, env.get("BT_CHECKPOINT_DIR", "")).grace_seconds
    with TrainerGroup(argv, env, grace, reporter) as group:
        return group.exit_code(group.wait())


def cmd_save(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    from agent.save import CheckpointId, commit_checkpoint, scan_checkpoint
    from agent.stores import open_store

    settings = _settings(args, env)
    ident = CheckpointId(
        project_name=check_name(args.project or settings.project_name, "--project", nullable=True),
        job_id=check_name(args.job_id or settings.job_id, "--job-id"),
        name=check_name(args.name or Path(os.path.abspath(args.folder)).name, "--name"),
        rank=settings.node_rank if args.rank is None else args.rank,
        num_nodes=args.num_nodes or settings.num_nodes,
    )
    if not 0 <= ident.rank < ident.num_nodes:
        raise ConfigError(f"--rank {ident.rank}: must be below --num-nodes {ident.num_nodes}")
    folder = Path(os.path.realpath(args.folder))  # the path given is the user's choice; links inside are not
    total = sum(f.size for f in scan_checkpoint(folder))
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


def _sidecar(settings: Settings, env: Mapping[str, str], args: argparse.Namespace | None, reporter: Reporter):
    """The sync loop for `sync` and for `run` in supervise mode; checks the identity first."""
    from agent.save import CheckpointId
    from agent.sidecar import Sidecar
    from agent.stores import open_store
    from agent.syncopts import sync_options

    if not settings.job_id:
        raise ConfigError("BT_TRAINING_JOB_ID: required to upload checkpoints "
                          "(`ckpt-agent sync`, or `run` with BT_CHECKPOINTING_ENABLED=1); set it to this job's id")
    if settings.node_rank >= settings.num_nodes:
        raise ConfigError(f"BT_NODE_RANK={settings.node_rank}: must be below BT_NUM_NODES={settings.num_nodes}")
    options = sync_options(
        env, getattr(args, "checkpoint_dir", None) or settings.checkpoint_dir,
        quiet_seconds=getattr(args, "quiet_seconds", None), poll_seconds=getattr(args, "poll_seconds", None),
        grace_seconds=getattr(args, "grace_seconds", None), keep_last=getattr(args, "keep_last", None),
        complete_file=getattr(args, "complete_file", None), commit_on_quiet=getattr(args, "commit_on_quiet", None),
    )
    ident = CheckpointId(settings.project_name, settings.job_id, "", settings.node_rank, settings.num_nodes)
    return Sidecar(open_store(settings), ident, options, settings.workers, reporter)


def cmd_sync(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    from agent.sidecar import run_standalone

    sidecar = _sidecar(_settings(args, env), env, args, reporter)
    try:
        return run_standalone(sidecar, args.once, reporter)
    finally:
        sidecar.store.close()


def cmd_ls(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    from agent.inspect import list_job_checkpoints, list_jobs, render
    from agent.stores import open_store

    project = check_name(args.project, "--project", nullable=True)
    job_id = check_name(args.job_id, "--job-id", nullable=True)
    store = open_store(_settings(args, env))
    try:
        data = (list_job_checkpoints(store, job_id, project, reporter.warn) if job_id
                else list_jobs(store, project, reporter.warn))
    finally:
        store.close()
    print(render(data, as_json=args.json), flush=True)
    return 0


def cmd_verify(args: argparse.Namespace, env: Mapping[str, str], reporter: Reporter) -> int:
    from agent.errors import IntegrityError
    from agent.spec import CONFIG_VAR, parse_load_spec
    from agent.verify import render_verify, summary, verify_folder

    root = Path(args.folder or parse_load_spec(env.get(CONFIG_VAR)).download_folder)
    report = verify_folder(root, workers=os.cpu_count() or 2)
    print(render_verify(report, as_json=args.json), flush=True)
    counts = report.counts()
    if report.problems:
        raise IntegrityError(f"{summary(report)}; run `ckpt-agent load` to restore missing or changed "
                             "files, and remove extra ones before training from this folder")
    reporter.info(f"verified {summary(report)}", event="verified", download_folder=str(root), **counts)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt-agent",
        description="Load verified training checkpoints before training starts; upload new ones.",
        epilog=EPILOG_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckpt-agent {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def sync_flags(p) -> None:
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

    def transfer_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workers", type=int, help="concurrent requests (env CKPT_AGENT_WORKERS)")
        p.add_argument("--chunk-mb", type=int, help="MiB per ranged GET (env CKPT_AGENT_CHUNK_MB)")

    run = sub.add_parser("run", help="load checkpoints, then exec the training command (or supervise it and "
                                     "upload its checkpoints, with BT_CHECKPOINTING_ENABLED=1)",
                         epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    transfer_flags(run)
    sync_flags(run.add_argument_group("checkpoint upload (with BT_CHECKPOINTING_ENABLED=1)"))
    run.add_argument("--dry-run", action="store_true",
                     help="print what would be loaded and executed; download and run nothing")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command after `--`")
    run.set_defaults(func=cmd_run)

    load = sub.add_parser("load", help="load checkpoints, then exit",
                          epilog=EPILOG_LOAD, formatter_class=argparse.RawDescriptionHelpFormatter)
    transfer_flags(load)
    load.add_argument("--dry-run", action="store_true",
                      help="resolve every reference and print the plan; download nothing")
    load.add_argument("--ready-file", metavar="PATH",
                      help="write PATH once every file is verified and in place (removed at start)")
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

    sync = sub.add_parser("sync", help="upload checkpoints from BT_CHECKPOINT_DIR as training writes them",
                          epilog=EPILOG_SYNC, formatter_class=argparse.RawDescriptionHelpFormatter)
    transfer_flags(sync)
    sync.add_argument("--once", action="store_true", help="upload what is stable now, then exit")
    sync.add_argument("--checkpoint-dir", metavar="DIR",
                      help="the folder to watch (env BT_CHECKPOINT_DIR, default /tmp/training_checkpoints)")
    sync_flags(sync)
    sync.set_defaults(func=cmd_sync)

    ls = sub.add_parser("ls", help="list jobs, or one job's checkpoints, in the store",
                        epilog=EPILOG_LS, formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.add_argument("--project", help="only this project's jobs")
    ls.add_argument("--job-id", help="this job's checkpoints instead of jobs")
    ls.add_argument("--json", action="store_true", help="JSON for machines instead of a table")
    ls.set_defaults(func=cmd_ls)

    verify = sub.add_parser("verify", help="re-check a download folder against the manifests it came from",
                            epilog=EPILOG_VERIFY, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("folder", nargs="?", metavar="DIR",
                        help="the download folder (default: the spec's download_folder, /tmp/loaded_checkpoints)")
    verify.add_argument("--json", action="store_true", help="JSON for machines instead of one line per file")
    verify.set_defaults(func=cmd_verify)

    for command in sub.choices.values():  # `--version` works after every command too
        if "--version" not in command._option_string_actions:
            command.add_argument("--version", action="version", version=f"ckpt-agent {__version__}")
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    env = os.environ if env is None else env
    try:
        reporter = make_reporter(env.get("BT_LOG_FORMAT"))
    except ConfigError as exc:
        Reporter().error(str(exc))
        return exc.exit_code
    try:
        return args.func(args, env, reporter)
    except AgentError as exc:
        reporter.error(str(exc), exit_code=exc.exit_code, error=type(exc).__name__)
        return exc.exit_code
    except KeyboardInterrupt:
        reporter.error("interrupted", exit_code=130)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line: its text may quote a secret, so only the class
        if env.get("CKPT_AGENT_DEBUG") == "1":
            traceback.print_exc()
        detail = f": {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else ""
        reporter.error(f"unexpected {type(exc).__name__}{detail}; this is a bug in ckpt-agent, please report it "
                       "(CKPT_AGENT_DEBUG=1 prints the traceback, which may quote secrets)",
                       exit_code=EXIT_INTERNAL, error=type(exc).__name__)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
