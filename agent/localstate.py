"""The download folder's own bookkeeping under `<download_folder>/.ckpt-agent/`.

`verified.json` remembers the stat of every file we placed after verifying it, so a warm start
trusts an unchanged file without re-reading it (as git's index does); anything whose stat moved
is checked byte for byte again. Temporary files keep a stable name so a killed run resumes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from agent.errors import IntegrityError, LocalError

STATE_DIR = ".ckpt-agent"
INCOMPLETE_SUFFIX = ".ckpt-incomplete"


def state_dir(root: Path) -> Path:
    return root / STATE_DIR


def incomplete_path(dest: Path) -> Path:
    return dest.with_name(dest.name + INCOMPLETE_SUFFIX)


def stat_signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class VerifiedIndex:
    """Relative path -> [size, mtime_ns, inode, fingerprint of the manifest entry]."""

    def __init__(self, root: Path) -> None:
        self._path = state_dir(root) / "verified.json"
        self._lock = threading.Lock()
        try:
            self._entries: dict[str, list] = json.loads(self._path.read_text())
        except (OSError, ValueError):
            self._entries = {}

    def is_intact(self, rel: str, fingerprint: str, st: os.stat_result) -> bool:
        entry = self._entries.get(rel)
        return entry is not None and entry == [*stat_signature(st), fingerprint]

    def record(self, rel: str, fingerprint: str, st: os.stat_result) -> None:
        with self._lock:
            self._entries[rel] = [*stat_signature(st), fingerprint]

    def save(self) -> None:
        with self._lock:
            data = json.dumps(self._entries)
        write_bytes_atomic(self._path, data.encode())


def _refuse_link(path: Path) -> None:
    raise IntegrityError(
        f"{path}: is a symlink inside the download folder; remove it (ckpt-agent never writes through links)"
    )


def _check_state_dir(state: Path) -> None:
    """Our own bookkeeping is written too: a link planted anywhere in it would be written through."""
    for dirpath, dirnames, filenames in os.walk(state):
        for name in (*dirnames, *filenames):
            if os.path.islink(os.path.join(dirpath, name)):
                _refuse_link(Path(dirpath, name))


def check_root(root: Path) -> None:
    """The download folder may be missing or a folder (or a link to one the user made), nothing else."""
    if root.exists() and not root.is_dir():
        raise LocalError(f"download_folder {root}: exists and is not a folder; choose another download_folder")


def prepare_root(root: Path) -> None:
    """Create the download folder (following it if it is a symlink the user made)."""
    check_root(root)
    if state_dir(root).is_symlink():
        _refuse_link(state_dir(root))
    try:
        state_dir(root).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalError(
            f"download_folder {root}: cannot create it ({exc.strerror}); choose a writable download_folder"
        ) from None
    _check_state_dir(state_dir(root))
    if not os.access(root, os.W_OK | os.X_OK):
        raise LocalError(f"download_folder {root}: not writable; choose a writable download_folder")


@contextlib.contextmanager
def folder_lock(root: Path, on_wait: Callable[[str], None], check_cancel: Callable[[], None]) -> Iterator[None]:
    """One agent per download folder: a second one waits, so writes never interleave."""
    path = state_dir(root) / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if not told:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                on_wait(f"download folder {root} is in use by pid {holder}; waiting for it to finish")
                told = True
            check_cancel()
            time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: object) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=1).encode())
