"""Hands the process over to the training command, so it keeps our PID, signals and exit code.

Except for a command that is a shell (`sh -c ...`, BT_START_COMMANDS, a `#!/bin/sh` script): a
shell neither execs the trainer in every case nor passes SIGTERM on, so such a command runs as
our child instead (ckpt_agent.trainer.procgroup), and we stay to deliver signals and wait for the trainer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import NoReturn

from ckpt_agent.errors import CommandNotFound

# Runs each start command through its own `sh -c`; the first failure's status is the exit status.
_SEQUENCE = 'for c do /bin/sh -c "$c" || exit; done'
SHELLS = frozenset({"sh", "bash", "dash", "ash", "ksh", "mksh", "zsh", "busybox"})
# Set by the self-contained agent's launcher (packaging/ckpt-agent): the folder that holds only ckpt_agent.
HELPER_PATH_VAR = "CKPT_AGENT_PYTHONPATH"


def training_argv(command: Sequence[str], start_commands: Sequence[str]) -> list[str] | None:
    """The argv to exec: the command line wins over BT_START_COMMANDS; None when there is neither."""
    if command:
        return list(command)
    if len(start_commands) == 1:
        return ["/bin/sh", "-c", start_commands[0]]
    if start_commands:
        return ["/bin/sh", "-c", _SEQUENCE, "sh", *start_commands]
    return None


def trainer_env(env: Mapping[str, str]) -> dict[str, str]:
    """The trainer's environment: ours, except that under the self-contained agent the folder holding
    only ckpt_agent goes first on PYTHONPATH (the trainer's own Python, 3.9 or newer, then imports the
    helper with no install step, and none of the agent's dependencies), and the launcher's variable
    stays with us."""
    child = dict(env)
    helper = child.pop(HELPER_PATH_VAR, "")
    if helper:
        helper = os.path.realpath(helper)
        child["PYTHONPATH"] = f"{helper}{os.pathsep}{child['PYTHONPATH']}" if child.get("PYTHONPATH") else helper
    return child


@contextlib.contextmanager
def starting(command: str) -> Iterator[None]:
    """Turns the OS's refusal to start `command` into a one-line CommandNotFound (exit 127)."""
    try:
        yield
    except FileNotFoundError:
        raise CommandNotFound(f"training command not found: {command!r}; check the command or PATH") from None
    except PermissionError:
        raise CommandNotFound(f"training command not executable: {command!r}") from None


def exec_training(argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    with starting(argv[0]):
        os.execvpe(argv[0], list(argv), dict(env))


def _interpreter(path: str) -> str:
    """The program a `#!` line names (`env`'s argument for `#!/usr/bin/env bash`); '' if none."""
    try:
        with open(path, "rb") as script:
            head = script.read(256)
    except OSError:
        return ""
    if not head.startswith(b"#!"):
        return ""
    words = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-")]
    return os.path.basename(words[0]) if words else ""


def runs_through_shell(argv: Sequence[str], env: Mapping[str, str]) -> bool:
    """Whether the command is a shell or a shell script, which would swallow SIGTERM if exec'd."""
    if os.path.basename(argv[0]) in SHELLS:
        return True
    path = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    return path is not None and _interpreter(path) in SHELLS
