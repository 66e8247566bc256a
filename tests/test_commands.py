"""The command line hands each command its options and context: flags to options, the environment
to settings, BT_LOAD_TIMEOUT only to the commands that load, and no settings at all to `verify`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ckpt_agent import cli
from ckpt_agent.commands.context import Context
from ckpt_agent.commands.load import LoadOptions
from ckpt_agent.commands.ls import ListOptions
from ckpt_agent.commands.run import RunOptions
from ckpt_agent.commands.save import SaveOptions
from ckpt_agent.commands.sync import SyncCommandOptions, SyncFlags
from ckpt_agent.commands.verify import VerifyOptions
from ckpt_agent.errors import EXIT_CONFIG, EXIT_TIMEOUT
from tests.support.helpers import AGENT
from tests.support.specs import named, spec


def clean_env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BT_", "CKPT_AGENT_"))}
    return {**keep, **extra}


def agent(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT, *args], env=env, capture_output=True, text=True, timeout=120)


FLAGS = {
    "run": (["run", "--workers", "3", "--keep-last", "2", "--complete-file", "A,B", "--complete-file", "C",
             "--commit-on-quiet", "--", "python", "-c", "--"],
            RunOptions(("python", "-c", "--"), False,
                       SyncFlags(keep_last=2, complete_file=("A,B", "C"), commit_on_quiet=True))),
    "run without --": (["run", "--dry-run", "./train.sh", "--lr", "1"],
                       RunOptions(("./train.sh", "--lr", "1"), True)),
    "load": (["load", "--dry-run", "--ready-file", "/shared/ready", "--chunk-mb", "2"],
             LoadOptions(True, Path("/shared/ready"))),
    "save": (["save", "ckpt-3", "--project", "p", "--job-id", "j", "--name", "n", "--rank", "1", "--num-nodes", "2"],
             SaveOptions("ckpt-3", "p", "j", "n", 1, 2)),
    "sync": (["sync", "--once", "--checkpoint-dir", "/c", "--quiet-seconds", "0.5", "--poll-seconds", "1",
              "--grace-seconds", "9"],
             SyncCommandOptions(True, "/c", SyncFlags(quiet_seconds=0.5, poll_seconds=1.0, grace_seconds=9.0))),
    "ls": (["ls", "--job-id", "j", "--json"], ListOptions(None, "j", True)),
}


@pytest.mark.parametrize("argv, expected", FLAGS.values(), ids=FLAGS.keys())
def test_each_commands_flags_become_its_options_and_the_environment_its_context(monkeypatch, argv, expected):
    calls: list[tuple[Context, object]] = []
    monkeypatch.setattr(f"ckpt_agent.commands.{argv[0]}.{argv[0]}",
                        lambda ctx, options: calls.append((ctx, options)) or 0)
    env = {"BT_TRAINING_JOB_ID": "job9", "MARKER": "kept"}
    assert cli.main(argv, env) == 0
    [(ctx, options)] = calls
    assert options == expected
    assert ctx.env == env and ctx.settings.job_id == "job9"
    if "--workers" in argv:
        assert ctx.settings.workers == 3
    if "--chunk-mb" in argv:
        assert ctx.settings.chunk_size == 2 << 20


def test_verify_gets_the_folder_given_or_else_the_specs(monkeypatch, tmp_path):
    calls: list[VerifyOptions] = []
    monkeypatch.setattr("ckpt_agent.commands.verify.verify", lambda _reporter, options: calls.append(options) or 0)
    env = {"BT_LOAD_CHECKPOINT_CONFIG": spec(tmp_path / "dl", named("c", "j"))}
    assert cli.main(["verify", "--json"], env) == 0
    assert cli.main(["verify", "/elsewhere"], env) == 0
    assert calls == [VerifyOptions(tmp_path / "dl", True), VerifyOptions(Path("/elsewhere"), False)]


@pytest.mark.parametrize("flag", [["--keep-last", "2"], ["--commit-on-quiet"], ["--complete-file", "DONE"]])
def test_run_refuses_upload_flags_while_checkpointing_is_off(capsys, flag):
    assert cli.main(["run", *flag, "--", "true"], {}) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith(f"ckpt-agent: error: {flag[0]}: a checkpoint upload option, but checkpointing is off")
    assert len(err.splitlines()) == 1


def _saved_checkpoint(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A local store holding job1/checkpoint-1, saved through the CLI, and the env that loads it."""
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "model.bin").write_bytes(os.urandom(3000))
    env = clean_env(BT_CHECKPOINT_STORE=str(tmp_path / "store"),
                    BT_LOAD_CHECKPOINT_CONFIG=spec(tmp_path / "dl", named("checkpoint-1", "job1")), **extra)
    result = agent(["save", str(folder), "--job-id", "job1"], env)
    assert result.returncode == 0, result.stderr
    return env


def test_load_timeout_bounds_loading_but_not_saving(tmp_path):
    env = _saved_checkpoint(tmp_path, BT_LOAD_TIMEOUT="0.000001")  # long over before any work starts
    result = agent(["load"], env)
    assert result.returncode == EXIT_TIMEOUT and "BT_LOAD_TIMEOUT" in result.stderr, result.stderr


def test_verify_reads_only_the_download_folder_so_other_bad_settings_do_not_stop_it(tmp_path):
    env = _saved_checkpoint(tmp_path)
    assert agent(["load"], env).returncode == 0
    broken = {**env, "BT_NODE_RANK": "first", "BT_CHECKPOINT_STORE": "ftp://nowhere"}
    assert agent(["ls"], broken).returncode == EXIT_CONFIG  # the same variables stop a command that needs them
    result = agent(["verify", "--json"], broken)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["counts"]["ok"] == 1


def test_save_with_another_node_count_than_the_jobs_is_refused_in_one_line(tmp_path):
    """The sidecar checks this at its start; `save` on a node meets the same rule at its commit."""
    env = _saved_checkpoint(tmp_path)  # job1, one node
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"x" * 100)
    for argv, field in ((["--num-nodes", "2"], "--num-nodes=2"), ([], "--num-nodes=3")):
        result = agent(["save", str(folder), "--job-id", "job1", "--rank", "1", *argv],
                       {**env, "BT_GROUP_SIZE": "3"} if not argv else env)
        assert result.returncode == EXIT_CONFIG, result.stderr
        assert result.stderr == (f"ckpt-agent: error: {field}: job job1 is recorded as a job of 1 node(s); "
                                 "give every node of a job the same node count\n")
    assert agent(["save", str(folder), "--job-id", "job1", "--name", "checkpoint-2"], env).returncode == 0
