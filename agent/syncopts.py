"""The sidecar's options, from flags (`sync`, `run`) over CKPT_AGENT_* variables over the defaults.

A pure function of a mapping: cli.py passes os.environ, tests pass dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError
from agent.formats import Rules
from agent.settings import env_flag

DEFAULT_QUIET_SECONDS = 5.0
DEFAULT_POLL_SECONDS = 2.0
DEFAULT_GRACE_SECONDS = 25.0


@dataclass(frozen=True)
class SyncOptions:
    checkpoint_dir: Path
    quiet_seconds: float = DEFAULT_QUIET_SECONDS
    poll_seconds: float = DEFAULT_POLL_SECONDS
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    keep_last: int | None = None
    rules: Rules = Rules()


def _seconds(flag: float | None, flag_name: str, env: Mapping[str, str], var: str, default: float,
             positive: bool = False) -> float:
    """A flag, else the variable, else the default; never negative (zero only if not `positive`)."""
    raw = env.get(var, "").strip()
    if flag is not None:
        value, where = flag, flag_name
    elif raw:
        try:
            value, where = float(raw), var
        except ValueError:
            raise ConfigError(f"{var}: expected seconds, got {raw!r}") from None
    else:
        return default
    if value < 0 or (positive and value == 0) or value != value:
        raise ConfigError(f"{where}: must be {'above' if positive else 'at least'} 0 seconds, got {value:g}")
    return value


def _keep_last(flag: int | None, env: Mapping[str, str]) -> int | None:
    if flag is not None:
        if flag < 1:
            raise ConfigError(f"--keep-last: must be at least 1, got {flag}")
        return flag
    raw = env.get("CKPT_AGENT_KEEP_LAST", "").strip()
    if not raw:
        return None
    if not raw.isdecimal() or int(raw) < 1:
        raise ConfigError(f"CKPT_AGENT_KEEP_LAST: expected a whole number of at least 1, got {raw!r}")
    return int(raw)


def _markers(flags: Sequence[str] | None, env: Mapping[str, str]) -> tuple[str, ...]:
    """--complete-file (repeatable, or comma-separated), else CKPT_AGENT_COMPLETE_FILE; '' means none."""
    where = "--complete-file"
    if isinstance(flags, str):
        flags = [flags]
    if flags is None:
        flags, where = [env.get("CKPT_AGENT_COMPLETE_FILE", "")], "CKPT_AGENT_COMPLETE_FILE"
    names = tuple(dict.fromkeys(n.strip() for flag in flags for n in flag.split(",") if n.strip()))
    for name in names:
        if name.startswith("/") or ".." in name.split("/") or "\0" in name:
            raise ConfigError(f"{where}: {name!r} must be a path inside the checkpoint folder")
    return names


def sync_options(env: Mapping[str, str], checkpoint_dir: str, *, quiet_seconds: float | None = None,
                 poll_seconds: float | None = None, grace_seconds: float | None = None,
                 keep_last: int | None = None, complete_file: Sequence[str] | None = None,
                 commit_on_quiet: bool | None = None) -> SyncOptions:
    """Flags win over CKPT_AGENT_* variables, which win over the defaults."""
    return SyncOptions(
        Path(checkpoint_dir),
        _seconds(quiet_seconds, "--quiet-seconds", env, "CKPT_AGENT_QUIET_SECONDS", DEFAULT_QUIET_SECONDS),
        _seconds(poll_seconds, "--poll-seconds", env, "CKPT_AGENT_POLL_SECONDS", DEFAULT_POLL_SECONDS, True),
        _seconds(grace_seconds, "--grace-seconds", env, "CKPT_AGENT_GRACE_SECONDS", DEFAULT_GRACE_SECONDS),
        _keep_last(keep_last, env),
        Rules(_markers(complete_file, env), bool(commit_on_quiet) or env_flag(env, "CKPT_AGENT_COMMIT_ON_QUIET")),
    )
