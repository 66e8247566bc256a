"""`ckpt-agent run` hands the process to the trainer: same PID, its exit status, start commands."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.helpers import AGENT, clean_env


def test_run_execs_a_plain_command_keeping_pid_and_exit_status():
    code = "import os; print(os.getpid()); raise SystemExit(7)"
    proc = subprocess.Popen([AGENT, "run", "--", sys.executable, "-c", code], env=clean_env(),
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 7
    assert int(out.strip()) == proc.pid


def test_a_shell_command_runs_as_the_agents_child_in_its_own_process_group():
    """So SIGTERM can be forwarded to the trainer behind the shell (tests/test_signals.py)."""
    proc = subprocess.Popen([AGENT, "run", "--", "sh", "-c", "echo $PPID $(ps -o pgid= -p $$) $$; exit 7"],
                            env=clean_env(), stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 7
    parent, group, shell = map(int, out.split())
    assert parent == proc.pid and group == shell


def test_disabled_loading_does_not_set_load_dir_or_import_boto3():
    code = "import os, sys; print(os.environ.get('BT_LOAD_CHECKPOINT_DIR'))"
    spec = json.dumps({"enabled": False, "checkpoints": []})
    result = subprocess.run([AGENT, "run", "--", sys.executable, "-c", code],
                            env=clean_env(BT_LOAD_CHECKPOINT_CONFIG=spec), capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "None"
    probe = ("import sys; from ckpt_agent.cli import main; "
             "sys.argv=['ckpt-agent','load']; main(); print('boto3' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], env=clean_env(), capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_start_commands_run_in_order_and_first_failure_stops_the_rest(tmp_path):
    cmds = [f"echo one >> {tmp_path}/log", "exit 4", f"echo three >> {tmp_path}/log"]
    result = subprocess.run([AGENT, "run"], env=clean_env(BT_START_COMMANDS=json.dumps(cmds)))
    assert result.returncode == 4
    assert (tmp_path / "log").read_text() == "one\n"


def test_all_start_commands_run_when_they_succeed(tmp_path):
    cmds = [f"echo one >> {tmp_path}/log", f"echo two >> {tmp_path}/log"]
    result = subprocess.run([AGENT, "run"], env=clean_env(BT_START_COMMANDS=json.dumps(cmds)))
    assert result.returncode == 0
    assert (tmp_path / "log").read_text() == "one\ntwo\n"


def test_command_line_wins_over_start_commands(tmp_path):
    env = clean_env(BT_START_COMMANDS=json.dumps([f"touch {tmp_path}/from-env"]))
    result = subprocess.run([AGENT, "run", "--", "touch", str(tmp_path / "from-argv")], env=env)
    assert result.returncode == 0
    assert (tmp_path / "from-argv").exists() and not (tmp_path / "from-env").exists()


def test_missing_command_is_a_one_line_error_with_exit_127():
    result = subprocess.run([AGENT, "run", "--", "no-such-trainer-binary"], env=clean_env(),
                            capture_output=True, text=True)
    assert result.returncode == 127
    assert result.stderr.strip().count("\n") == 0 and "no-such-trainer-binary" in result.stderr


def test_malformed_spec_is_refused_before_the_command_with_exit_2(tmp_path):
    env = clean_env(BT_LOAD_CHECKPOINT_CONFIG='{"enabled": true, "checkpoints": [{"typ": "bogus"}]}')
    result = subprocess.run([AGENT, "run", "--", "touch", str(tmp_path / "ran")], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "typ" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "ran").exists()


def test_a_bad_upload_setting_does_not_stop_a_run_that_uploads_nothing(tmp_path):
    """Checkpointing off: only the grace period is read for the shell's child, not keep-last and the rest."""
    env = clean_env(CKPT_AGENT_KEEP_LAST="three", CKPT_AGENT_QUIET_SECONDS="soon")
    result = subprocess.run([AGENT, "run", "--", "sh", "-c", "exit 5"], env=env, capture_output=True, text=True)
    assert result.returncode == 5, result.stderr
    bad_grace = subprocess.run([AGENT, "run", "--", "sh", "-c", "exit 5"], capture_output=True, text=True,
                               env={**env, "CKPT_AGENT_GRACE_SECONDS": "later"})
    assert bad_grace.returncode == 2 and "CKPT_AGENT_GRACE_SECONDS" in bad_grace.stderr
    with_uploads = subprocess.run([AGENT, "run", "--", "sh", "-c", "exit 5"], capture_output=True, text=True,
                                  env={**env, "BT_CHECKPOINTING_ENABLED": "1", "BT_TRAINING_JOB_ID": "job",
                                       "BT_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
                                       "BT_CHECKPOINT_STORE": str(tmp_path / "store")})
    assert with_uploads.returncode == 2 and "CKPT_AGENT_QUIET_SECONDS" in with_uploads.stderr
