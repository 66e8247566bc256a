"""What the sidecar sees of each checkpoint across polls: its files, since when they are unchanged,
who holds them open, and the facts ckpt_agent.sync.readiness decides on."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ckpt_agent.config.sidecar import SyncOptions
from ckpt_agent.report import Reporter
from ckpt_agent.sync import observe
from ckpt_agent.sync.formats import DCP_METADATA, HF_STATE, Candidate, Format, folder_format
from ckpt_agent.sync.readiness import Facts, NotReady, Why
from ckpt_agent.upload.scan import LocalFile


@dataclass
class Seen:
    """One checkpoint as the last poll saw it."""

    files: tuple[LocalFile, ...]
    newest_ctime_ns: int
    since: float  # monotonic time this exact state was first seen
    failures: int = 0
    retry_at: float = 0.0
    warned: bool = False


class Watch:
    """Per-checkpoint memory across polls, and whether other processes' open files are visible at all."""

    def __init__(self, options: SyncOptions, reporter: Reporter) -> None:
        self.options, self.reporter = options, reporter
        self.seen: dict[str, Seen] = {}
        self.sighted = False  # once another process's open files were visible, they stay visible
        self._warned_blind = False

    def look(self, name: str, path: Path) -> Seen | None:
        """The checkpoint as it is now (its quiet clock restarts on any change); None once it is gone.

        ckpt_agent.upload.scan.UnsafeEntry: it holds a link out or a special file (the caller reports it)."""
        snap = observe.snapshot(path)
        if snap is None:  # deleted (e.g. the trainer's own rotation)
            self.seen.pop(name, None)
            return None
        now = time.monotonic()
        seen = self.seen.get(name)
        if seen is None:
            seen = self.seen[name] = Seen(snap[0], snap[1], since=now)
        elif seen.files != snap[0]:
            seen.files, seen.newest_ctime_ns, seen.since = snap[0], snap[1], now
        return seen

    def unsafe(self, name: str, problem: str) -> NotReady:
        """A link out, a FIFO or a symlinked folder inside: reported once, never read through."""
        if name not in self.seen or not self.seen[name].warned:
            self.seen[name] = Seen((), 0, time.monotonic(), warned=True)
            self.reporter.warn(f"sync: {name} is not uploaded while it holds {problem}",
                               event="sync_unsafe", checkpoint=name, reason=problem)
        return NotReady(Why.UNSAFE, problem)

    def _held(self, entry: Candidate, path: Path) -> str | None:
        """A file in the checkpoint that a process we can see holds open for writing."""
        writers = observe.open_for_writing(self.options.checkpoint_dir)
        self.sighted = self.sighted or not writers.blind
        if not self.sighted and not self._warned_blind:
            self._warned_blind = True
            self.reporter.warn(
                "sync: cannot see any other process's open files (a separate container or PID namespace, "
                "or another user): the open-file check is blind, so each format's own completion rule "
                "decides (docs/sidecar.md, formats table)", event="sync_blind")
        real = os.path.realpath(path)
        return next((w[len(real):].lstrip(os.sep) or entry.name for w in sorted(writers.paths)
                     if w == real or w.startswith(real + os.sep)), None)

    def facts(self, entry: Candidate, path: Path, seen: Seen, quiet: bool, latest: str | None,
              look: bool) -> Facts:
        """What readiness needs; `look`: quiet or flushing, else it is still being written and nothing is read."""
        files = tuple(f.rel for f in seen.files)
        fmt = Format.FILE if entry.is_file else folder_format(entry.name, files, self.options.rules, latest)
        wanted = {Format.MARKER: self.options.rules.markers, Format.HF: (HF_STATE,),
                  Format.DCP: (DCP_METADATA,)}.get(fmt, ())
        return Facts(
            format=fmt, files=files, quiet=quiet, writing=self._held(entry, path) if look else None,
            blind=not self.sighted,
            markers=observe.markers(path, wanted) if wanted and look else None,
            structure=observe.structure(seen.files[0]) if entry.is_file and seen.files and look else None,
            deepspeed_latest=latest, name=entry.name)

    def may_retry(self, name: str, attempts: int) -> bool:
        """A failed upload with tries left (in a final flush)."""
        seen = self.seen.get(name)
        return seen is not None and seen.failures < attempts
