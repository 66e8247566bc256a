"""Everything the agent tells a person: one-line events, progress, and the final summary.

A tqdm bar when stderr is a terminal; otherwise a progress line every few seconds, so container
logs get a heartbeat without a flood.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

PROGRESS_INTERVAL = 5.0


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


SOURCE_NAMES = {"store": "store", "checkpoint_dir": "BT_CHECKPOINT_DIR", "ranks": "other ranks",
                "cache": "part cache", "reused": "already here"}


def source_summary(bytes_from: dict[str, int]) -> str:
    """`from store 1.2 GB, BT_CHECKPOINT_DIR 3.4 GB`: only the sources that gave something."""
    shown = [f"{SOURCE_NAMES.get(k, k)} {human_bytes(n)}" for k, n in bytes_from.items() if n]
    return "from " + ", ".join(shown) if shown else "no bytes to place"



def utc_now() -> str:
    """The one timestamp format, for log lines and every record the agent writes (manifests, job
    records, the load record, the ready file): ISO 8601 in UTC to the microsecond, which also
    orders two commits of the same second."""
    from datetime import UTC, datetime  # here: every command imports this module, few write a time

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

class Reporter:
    def __init__(self, stream: TextIO | None = None, interval: float = PROGRESS_INTERVAL) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self._write_lock = threading.Lock()

    def _write_line(self, line: str) -> None:
        """One write of a whole line under one lock: the sync thread and the main thread both log,
        and print() writes the text and the newline separately, so their lines ran together."""
        with self._write_lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    # `event` and `fields` name what happened for machines (JsonReporter); the human form shows only `message`.
    def info(self, message: str, event: str = "info", **fields: object) -> None:
        self._write_line(f"ckpt-agent: {message}")

    def warn(self, message: str, event: str = "warning", **fields: object) -> None:
        self._write_line(f"ckpt-agent: WARNING: {message}")

    def error(self, message: str, event: str = "error", **fields: object) -> None:
        self._write_line(f"ckpt-agent: error: {message}")

    def progress(self, total: int, label: str) -> ProgressSink:
        if self.stream.isatty():
            return _BarSink(total, label, self.stream)
        return _LineSink(total, label, self)


class JsonReporter(Reporter):
    """BT_LOG_FORMAT=json: one JSON object per line, {timestamp, level, event, message, fields},
    for every line the human Reporter would print, progress and errors included. Never a tqdm bar."""

    def _emit(self, level: str, event: str, message: str, fields: dict[str, object]) -> None:
        import json  # only for BT_LOG_FORMAT=json: json costs every command's start-up time

        line = json.dumps({"timestamp": utc_now(), "level": level, "event": event, "message": message,
                           "fields": fields}, default=str)
        self._write_line(line)

    def info(self, message: str, event: str = "info", **fields: object) -> None:
        self._emit("info", event, message, fields)

    def warn(self, message: str, event: str = "warning", **fields: object) -> None:
        self._emit("warning", event, message, fields)

    def error(self, message: str, event: str = "error", **fields: object) -> None:
        self._emit("error", event, message, fields)

    def progress(self, total: int, label: str) -> ProgressSink:
        return _LineSink(total, label, self)


def make_reporter(log_format: str | None, stream: TextIO | None = None) -> Reporter:
    """The Reporter for a format ckpt_agent.config.settings.log_format accepted: `json`, else the human one."""
    return JsonReporter(stream) if log_format == "json" else Reporter(stream)


Progress = Callable[[int], None]  # told of every byte moved, from many threads (a ProgressSink, say)


class ProgressSink:
    """A callable that takes byte counts from many threads; close() ends the display."""

    def __call__(self, n: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to tidy by default."""


class _BarSink(ProgressSink):
    def __init__(self, total: int, label: str, stream: TextIO) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, file=stream,
                         mininterval=0.2, leave=False)
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class _LineSink(ProgressSink):
    def __init__(self, total: int, label: str, reporter: Reporter,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._total, self._label, self._reporter, self._clock = total, label, reporter, clock
        self._done = 0
        self._start = self._last = clock()
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self._done += n
            now = self._clock()
            if now - self._last < self._reporter.interval:
                return
            self._last = now
            done, elapsed = self._done, now - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * done / self._total if self._total else 100.0
        eta = f", ETA {(self._total - done) / rate:.0f} s" if rate > 0 else ""
        self._reporter.info(
            f"{self._label}: {pct:.0f}% {human_bytes(done)} of {human_bytes(self._total)}, "
            f"{human_bytes(rate)}/s{eta}",
            event="progress", label=self._label, percent=round(pct, 1), bytes_done=done,
            bytes_total=self._total, bytes_per_second=round(rate),
            eta_seconds=round((self._total - done) / rate) if rate > 0 else None,
        )
