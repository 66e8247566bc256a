"""Hands the process over to the training command, so it keeps our PID, signals and exit code."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NoReturn

from agent.errors import EXIT_COMMAND_NOT_FOUND, AgentError

# Runs each start command through its own `sh -c`; the first failure's status is the exit status.
_SEQUENCE = 'for c do /bin/sh -c "$c" || exit; done'


class CommandNotFound(AgentError):
    exit_code = EXIT_COMMAND_NOT_FOUND


def training_argv(command: Sequence[str], start_commands: Sequence[str]) -> list[str] | None:
    """The argv to exec: the command line wins over BT_START_COMMANDS; None when there is neither."""
    if command:
        return list(command)
    if len(start_commands) == 1:
        return ["/bin/sh", "-c", start_commands[0]]
    if start_commands:
        return ["/bin/sh", "-c", _SEQUENCE, "sh", *start_commands]
    return None


def exec_training(argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    try:
        os.execvpe(argv[0], list(argv), dict(env))
    except FileNotFoundError:
        raise CommandNotFound(f"training command not found: {argv[0]!r}; check the command or PATH") from None
    except PermissionError:
        raise CommandNotFound(f"training command not executable: {argv[0]!r}") from None
