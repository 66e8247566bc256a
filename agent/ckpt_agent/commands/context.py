"""What every command is handed besides its options, and how a command lets signals stop its work."""

from __future__ import annotations

import contextlib
import functools
import signal
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from types import FrameType

from ckpt_agent.config.settings import Settings, sync_options
from ckpt_agent.config.sidecar import SyncFlags, SyncOptions
from ckpt_agent.report import Reporter
from ckpt_agent.runtime.cancel import Cancel

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Context:
    settings: Settings
    reporter: Reporter
    cancel: Cancel  # for `load` and `run` it also carries BT_LOAD_TIMEOUT; `save` is not bounded by it
    env: Mapping[str, str] = field(repr=False)  # as given: the trainer inherits it
    sync_flags: SyncFlags = SyncFlags()  # `sync` and `run`: the upload flags as given
    sync_dir: str | None = None  # `sync --checkpoint-dir`; None: BT_CHECKPOINT_DIR

    @functools.cached_property
    def sync(self) -> SyncOptions:
        """The sidecar's options, flags over CKPT_AGENT_* over the defaults: parsed once, when a
        command first needs them (a plain exec'd `run` never does)."""
        return sync_options(self.env, self.sync_dir or self.settings.checkpoint_dir, **asdict(self.sync_flags))


@contextlib.contextmanager
def cancelled_by_signals(cancel: Cancel) -> Iterator[None]:
    """SIGTERM/SIGINT set the token instead of killing us, so workers stop and clean up; default after."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        cancel.signal(signum)

    for signum in _SIGNALS:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
