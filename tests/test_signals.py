"""SIGTERM reaches the trainer whatever starts it, and the trainer gets time to finish its save.

Without Docker: SIGTERM goes to the agent's PID, as tini sends it on `docker stop`. The trainer
(tests/fake_trainer.py) writes one checkpoint, waits, and on SIGTERM records the signal and
writes a final checkpoint slowly (~1.5 s, `trainer_state.json` last) before exiting. A shell
in between (dash does not exec the last command of `cd /tmp && python ...`) used to die at once
and take the container with it; the trainer's save was cut off.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckpt_agent.trainer.launch import runs_through_shell
from tests.support.helpers import AGENT, TRAINER, clean_env, committed, start, sync_env, wait_for

SLOW_SAVE = ("--checkpoints", "2", "--every", "60", "--chunks", "20", "--chunk-sleep", "0.075")


def trainer_line(ckpts: Path, record: Path, exit_on_sigterm: int) -> str:
    args = [*TRAINER, "--dir", str(ckpts), *SLOW_SAVE, "--record", str(record), "--exit-on-sigterm",
            str(exit_on_sigterm)]
    return " ".join(map(str, args))


def launchers(line: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Every way of starting the trainer through a shell: (argv after `run`, extra environment)."""
    found = {
        "sh -c": (["--", "sh", "-c", f"cd /tmp && {line}"], {}),
        "one start command": ([], {"BT_START_COMMANDS": json.dumps([f"cd /tmp && {line}"])}),
        "start commands loop": ([], {"BT_START_COMMANDS": json.dumps(["true", f"cd /tmp && {line}"])}),
    }
    if shutil.which("bash"):
        found["bash -c"] = (["--", "bash", "-c", f"cd /tmp && {line}"], {})
    return found


def stop_after_first_checkpoint(run: subprocess.Popen, log: Path) -> int:
    wait_for(lambda: "DONE checkpoint-10" in log.read_text(), what="the first checkpoint")
    run.send_signal(signal.SIGTERM)
    return run.wait(60)


def assert_final_save_finished(ckpts: Path, record: Path, log: Path) -> None:
    assert record.read_text() == "got SIGTERM\n", log.read_text()
    assert "DONE checkpoint-20" in log.read_text(), log.read_text()
    assert json.loads((ckpts / "checkpoint-20" / "trainer_state.json").read_text()) == {"global_step": 20}


@pytest.mark.parametrize("how", ["sh -c", "bash -c", "one start command", "start commands loop"])
@pytest.mark.parametrize("trainer_status, expected", [(0, 143), (17, 17)])
def test_sigterm_to_the_agent_lets_a_trainer_behind_a_shell_finish_its_save(
        how, trainer_status, expected, tmp_path, procs):
    ckpts, record, log = tmp_path / "ckpts", tmp_path / "record", tmp_path / "run.log"
    ways = launchers(trainer_line(ckpts, record, trainer_status))
    if how not in ways:
        pytest.skip(f"{how.split()[0]} is not installed")
    argv, extra = ways[how]
    run = start(procs, [AGENT, "run", *argv], clean_env(**extra), log)
    assert stop_after_first_checkpoint(run, log) == expected, log.read_text()
    assert_final_save_finished(ckpts, record, log)


def test_supervise_mode_waits_for_the_trainer_behind_a_shell_and_commits_its_final_save(
        local_store, tmp_path, procs):
    ckpts, record, log = tmp_path / "ckpts", tmp_path / "record", tmp_path / "run.log"
    env = sync_env(local_store, ckpts, BT_CHECKPOINTING_ENABLED="1")
    run = start(procs, [AGENT, "run", "--", "sh", "-c", f"cd /tmp && {trainer_line(ckpts, record, 0)}"], env, log)
    assert stop_after_first_checkpoint(run, log) == 143, log.read_text()
    assert_final_save_finished(ckpts, record, log)
    assert "trainer exited with status 0" in log.read_text(), log.read_text()
    assert committed(local_store, "checkpoint-20"), log.read_text()


def test_a_trainer_that_ignores_sigterm_is_killed_when_the_grace_period_ends(tmp_path, procs):
    log = tmp_path / "run.log"
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('READY', flush=True); " \
             "time.sleep(600)"
    run = start(procs, [AGENT, "run", "--", "sh", "-c", f"cd /tmp && {sys.executable} -c \"{script}\""],
                clean_env(CKPT_AGENT_GRACE_SECONDS="1"), log)
    wait_for(lambda: "READY" in log.read_text(), what="the trainer")
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 137, log.read_text()
    assert "did not exit within the 1 s grace period" in log.read_text()


def test_without_a_signal_the_exit_status_is_the_commands_own(tmp_path):
    for command, status in (("exit 3", 3), ("kill -KILL $$", 137), ("true", 0)):
        result = subprocess.run([AGENT, "run", "--", "sh", "-c", command], env=clean_env(), capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == status, result.stderr


def test_shells_and_shell_scripts_run_as_a_child_and_everything_else_is_execd(tmp_path):
    sh_script, bash_script, py_script = tmp_path / "run.sh", tmp_path / "run-bash", tmp_path / "train"
    sh_script.write_text("#!/bin/sh\npython train.py\n")
    bash_script.write_text("#!/usr/bin/env -S bash -e\npython train.py\n")
    py_script.write_text(f"#!{sys.executable}\nprint('hi')\n")
    for script in (sh_script, bash_script, py_script):
        script.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    assert runs_through_shell(["sh", "-c", "python train.py"], env)
    assert runs_through_shell(["/usr/bin/bash", "-c", "python train.py"], env)
    assert runs_through_shell([str(sh_script)], env) and runs_through_shell(["run-bash"], env)
    assert not runs_through_shell(["train"], env)
    assert not runs_through_shell([sys.executable, "train.py"], env)
    assert not runs_through_shell(["no-such-command"], env)


def test_a_missing_command_run_as_a_child_is_a_one_line_error_with_exit_127(local_store, tmp_path):
    env = sync_env(local_store, tmp_path / "ckpts", BT_CHECKPOINTING_ENABLED="1")
    result = subprocess.run([AGENT, "run", "--", "no-such-trainer-binary"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 127, result.stderr
    assert "training command not found: 'no-such-trainer-binary'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not shutil.which("unshare") or os.geteuid() != 0, reason="a PID namespace needs unshare and root")
def test_as_pid_1_the_agent_stays_the_parent_so_sigterm_stops_a_trainer_without_a_handler(tmp_path, procs):
    """In a container without an init the agent is PID 1; an exec'd trainer in its place would be PID 1
    too, and the kernel ignores a SIGTERM that PID 1 has no handler for: `docker stop` would hang."""
    log = tmp_path / "run.log"
    code = "import os, time; print('TRAINER PID', os.getpid(), flush=True); time.sleep(600)"
    run = start(procs, ["unshare", "--fork", "--pid", "--kill-child", AGENT, "run", "--", sys.executable, "-c", code],
                clean_env(), log)
    wait_for(lambda: "TRAINER PID" in log.read_text(), what="the trainer")
    assert "TRAINER PID 2" in log.read_text(), log.read_text()  # the agent is PID 1 and its parent
    agent = int(Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()[0])
    os.kill(agent, signal.SIGTERM)
    assert run.wait(30) == 143, log.read_text()
