"""What the sidecar is told: the folder it watches, its timings, retention and completion rules.

Parsed from flags and CKPT_AGENT_* variables by ckpt_agent.config.settings (sync_options); the loop only
reads these values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_QUIET_SECONDS = 5.0
DEFAULT_POLL_SECONDS = 2.0
DEFAULT_GRACE_SECONDS = 25.0


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
