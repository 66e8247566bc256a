"""What every command is handed besides its options, and how a command lets signals stop its work."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import FrameType

from ckpt_agent.config.settings import Settings
from ckpt_agent.config.sidecar import SyncOptions
from ckpt_agent.report import Reporter
from ckpt_agent.runtime.cancel import Cancel

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Context:
    settings: Settings
    reporter: Reporter
    cancel: Cancel  # for `load` and `run` it also carries BT_LOAD_TIMEOUT; `save` is not bounded by it
    env: Mapping[str, str] = field(repr=False)  # as given: the trainer inherits it
    sync: SyncOptions | None = None  # `sync` and `run`: the sidecar's options, parsed once by the cli


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
