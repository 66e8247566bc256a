"""A killed load's progress on files the agent did not write, so the next start resumes them part by
part instead of from their first byte.

Such a file has no part checksums of ours, so a part already in its `.ckpt-incomplete` twin can be
trusted only if a load wrote it: the crc32c of each part is noted as it is written, with what the
storage said of the object, in `.ckpt-agent/partial.json` (one per download folder, which one agent
holds at a time; written atomically at most every half second, and at the end of a failed load).
The next load of the same file (same fingerprint) keeps a noted part whose bytes on disk still have
that crc32c and fetches the rest; the whole file is still checked against its storage's word
before it gets its name. A file placed, or found changed in its storage, leaves the journal; a load
that completes removes it.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import STATE_DIR
from ckpt_agent.disk.safefs import record_bytes
from ckpt_agent.load.plan import FileTask
from ckpt_agent.stores.objectcheck import KINDS, StorageCheck

JOURNAL = f"{STATE_DIR}/partial.json"
SAVE_SECONDS = 0.5  # how stale the journal (and verified.json) may be when a load is killed
_HEX = re.compile(r"[0-9a-f]{8}")


class PartJournal:
    """`before_save`: run before each save (the verified index, so a file placed is known as intact
    by the time the journal forgets it)."""

    def __init__(self, folder: Folder, before_save: Callable[[], None]) -> None:
        self._folder, self._before_save = folder, before_save
        self._lock = threading.Lock()
        self._saved = time.monotonic()
        try:
            raw = folder.read(JOURNAL)
            files = json.loads(raw) if raw else {}
        except (OSError, ValueError, RecursionError):
            files = {}
        self._files: dict[str, dict] = files if isinstance(files, dict) else {}

    def resume(self, task: FileTask) -> tuple[FileTask, StorageCheck | None]:
        """The task with the crc32c of the parts a killed load wrote, and what the storage said of the
        object then; the task as planned when the journal knows nothing of this file."""
        entry = self._files.get(task.rel)
        if not isinstance(entry, dict) or entry.get("id") != task.fingerprint:
            return task, None
        noted = entry.get("parts")
        if not isinstance(noted, dict):
            return task, None
        parts = list(task.entry.parts)
        for index, crc in noted.items():
            if str(index).isdecimal() and int(index) < len(parts) and isinstance(crc, str) and _HEX.fullmatch(crc):
                parts[int(index)] = crc
        check = entry.get("check")
        seen = None
        if isinstance(check, list) and len(check) == 3 and all(isinstance(c, str) for c in check) and check[0] in KINDS:
            seen = StorageCheck(check[0], check[1], check[2])
        return replace(task, entry=replace(task.entry, parts=tuple(parts))), seen

    def note(self, task: FileTask, part: int, crc: str, check: StorageCheck | None) -> None:
        with self._lock:
            entry = self._files.get(task.rel)
            if not isinstance(entry, dict) or entry.get("id") != task.fingerprint:
                entry = self._files[task.rel] = {"id": task.fingerprint, "parts": {}}
            entry["parts"][str(part)] = crc
            if check is not None:
                entry["check"] = [check.kind, check.value, check.etag]
        self._save_soon()

    def drop(self, rel: str, now: bool = False) -> None:
        with self._lock:
            self._files.pop(rel, None)
        if now:
            self.save()
        else:
            self._save_soon()

    def _save_soon(self) -> None:
        with self._lock:
            due = time.monotonic() - self._saved > SAVE_SECONDS
            if due:
                self._saved = time.monotonic()
        if due:
            self.save()

    def save(self) -> None:
        self._before_save()
        with self._lock:
            data = record_bytes(self._files, compact=True) if self._files else None
        if data is None:
            self._folder.unlink(JOURNAL)
        else:
            self._folder.write_atomic(JOURNAL, data)

    def clear(self) -> None:
        with self._lock:
            self._files.clear()
        self._folder.unlink(JOURNAL)
