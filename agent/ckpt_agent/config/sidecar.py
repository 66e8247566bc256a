"""What the sidecar is told: the folder it watches, its timings, retention and completion rules.

Parsed from the flags as given (SyncFlags) and CKPT_AGENT_* variables by ckpt_agent.config.settings
(sync_options); the loop only reads these values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_QUIET_SECONDS = 5.0
DEFAULT_POLL_SECONDS = 2.0
DEFAULT_GRACE_SECONDS = 25.0
# Node r > 0 of a multi-node job: how long a checkpoint the leader committed may stay absent here
# before this node records that it has nothing of it (docs/sidecar.md, multi-node column). Long
# against any collective save's spread between nodes; the trainer's exit, or a later checkpoint of
# the same shape on this node, settle it at once.
DEFAULT_NOTHING_HERE_SECONDS = 60.0


@dataclass(frozen=True)
class Rules:
    markers: tuple[str, ...] = ()  # user-given complete files: they decide for every folder
    commit_on_quiet: bool = False  # explicit opt-in: a folder of no known format needs only quiet


@dataclass(frozen=True)
class SyncOptions:
    checkpoint_dir: Path
    quiet_seconds: float = DEFAULT_QUIET_SECONDS
    poll_seconds: float = DEFAULT_POLL_SECONDS
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    keep_last: int | None = None
    rules: Rules = Rules()
    nothing_here_seconds: float = DEFAULT_NOTHING_HERE_SECONDS


@dataclass(frozen=True)
class SyncFlags:
    """The upload flags `sync` and `run` share; None: not given, so the variable or the default applies."""

    quiet_seconds: float | None = None
    poll_seconds: float | None = None
    grace_seconds: float | None = None
    keep_last: int | None = None
    complete_file: tuple[str, ...] | None = None
    commit_on_quiet: bool | None = None

    def given(self) -> list[str]:
        """The flags given, as spelled on the command line."""
        return [f"--{f.name.replace('_', '-')}" for f in fields(self) if getattr(self, f.name) not in (None, False)]
