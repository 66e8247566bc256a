"""The download folder: where each checkpoint lands (`rank-<r>/<name>`), and its own bookkeeping
under `<download_folder>/.ckpt-agent/` (lock, verified files, the load record of ckpt_agent.load.record).

`verified.json` remembers the stat of every file we placed after verifying it, so a warm start
trusts an unchanged file without re-reading it (as git's index does); anything whose stat moved
is checked byte for byte again. The stat includes ctime, which nobody can set back, so a file
edited in place with its mtime restored is still re-checked. Every access goes through
ckpt_agent.disk.safefs, so nothing planted in the folder is followed.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.safefs import lock_exclusive, open_or_create, record_bytes, remove_tree
from ckpt_agent.errors import IntegrityError, LocalError

STATE_DIR = ".ckpt-agent"
VERIFIED = f"{STATE_DIR}/verified.json"


def state_dir(root: Path) -> Path:
    return root / STATE_DIR


def rank_dir(rank: int) -> str:
    """Relative to the download folder: one node's checkpoints, so ranks can share a folder."""
    return f"rank-{rank}"


def checkpoint_dir(rank: int, name: str) -> str:
    """Relative to the download folder: where one checkpoint lands on this node."""
    return f"{rank_dir(rank)}/{name}"


def manifests_dir(rank: int) -> str:
    """Relative to STATE_DIR (as the load record names them): the manifests this rank's last load used."""
    return f"manifests/{rank_dir(rank)}"


def loaded_record(rank: int) -> str:
    """Per rank, so ranks sharing a download folder never erase each other's record."""
    return f"loaded-rank-{rank}.json"


def stat_signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class VerifiedIndex:
    """Relative path -> [size, mtime_ns, ctime_ns, inode, device, fingerprint of the manifest entry], and
    for a file the agent did not write a note: how it was checked and its parts' crc32c, which a
    later load that finds it intact records again."""

    def __init__(self, folder: Folder | None) -> None:
        """A link or special file at verified.json is refused (IntegrityError), like one anywhere else."""
        self._folder = folder
        self._lock = threading.Lock()
        try:
            raw = folder.read(VERIFIED) if folder is not None else None
            self._entries: dict[str, list] = json.loads(raw) if raw else {}
        except (OSError, ValueError, RecursionError):
            self._entries = {}
        if not isinstance(self._entries, dict):
            self._entries = {}

    def is_intact(self, rel: str, fingerprint: str, st: os.stat_result) -> bool:
        entry = self._entries.get(rel)
        return isinstance(entry, list) and entry[:6] == [*stat_signature(st), fingerprint]

    def record(self, rel: str, fingerprint: str, st: os.stat_result, note: list | None = None) -> None:
        with self._lock:
            self._entries[rel] = [*stat_signature(st), fingerprint, *([note] if note is not None else [])]

    def note(self, rel: str) -> list | None:
        entry = self._entries.get(rel)
        return entry[6] if isinstance(entry, list) and len(entry) > 6 and isinstance(entry[6], list) else None

    def save(self) -> None:
        with self._lock:
            data = record_bytes(self._entries, compact=True)
        if self._folder is not None:
            self._folder.write_atomic(VERIFIED, data)


def check_root(root: Path) -> None:
    """The download folder may be missing or a folder (or a link to one the user made), nothing else,
    and in a world-writable parent such as /tmp it must be ours: another user could have made it first."""
    if root.exists() and not root.is_dir():
        raise LocalError(f"download_folder {root}: exists and is not a folder; choose another download_folder")
    try:
        parent = os.stat(root.absolute().parent)
        link = os.lstat(root)
        target = os.stat(root)
    except OSError:
        return
    if not parent.st_mode & stat.S_IWOTH:
        return
    me = os.geteuid()
    writable_by_others = target.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not target.st_mode & stat.S_ISVTX
    if link.st_uid != me or target.st_uid != me or writable_by_others:
        raise LocalError(
            f"download_folder {root}: in world-writable {root.absolute().parent} but owned by uid {target.st_uid} "
            f"or writable by others (mode {stat.S_IMODE(target.st_mode):o}), so another user may control it; "
            "remove it or choose another download_folder"
        )


def prepare_root(root: Path) -> Folder:
    """Create the download folder (following it if it is a symlink the user made) and open it."""
    check_root(root)
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise LocalError(
            f"download_folder {root}: cannot create it ({exc.strerror}); choose a writable download_folder"
        ) from None
    check_root(root)
    if not os.access(root, os.W_OK | os.X_OK):
        raise LocalError(f"download_folder {root}: not writable; choose a writable download_folder")
    folder = Folder(root)
    try:
        folder.dir(STATE_DIR, create=True)
    except OSError as exc:
        folder.close()
        raise LocalError(f"download_folder {root}: cannot create {STATE_DIR} in it ({exc.strerror}); "
                         "choose a writable download_folder") from None
    except BaseException:
        folder.close()
        raise
    return folder


@contextlib.contextmanager
def folder_lock(folder: Folder, on_wait: Callable[[str], None], check_cancel: Callable[[], None]) -> Iterator[None]:
    """One agent per download folder: a second one waits, so writes never interleave."""
    dfd = folder.dir(STATE_DIR, create=True)
    fd, _ = open_or_create(dfd, "lock", folder.shown(f"{STATE_DIR}/lock"))
    told = False

    def busy() -> None:
        nonlocal told
        if not told:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            on_wait(f"download folder {folder.root} is in use by pid {holder}; waiting for it to finish")
            told = True
        check_cancel()

    try:
        lock_exclusive(fd, busy)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def prune_checkpoint(folder: Folder, rel: str, keep: set[str]) -> list[str]:
    """Remove everything below checkpoint folder `rel` that its manifest (`keep`) does not list, so
    the trainer never resumes from a mix of two runs; links are removed, never followed.

    It walks again from the root, so a folder swapped for a link, or a file moved away, at any moment
    of the load is refused here, before the load is recorded and the trainer starts."""
    folder.forget()
    on_the_way = {p.rsplit("/", i)[0] for p in keep for i in range(1, p.count("/") + 1)}
    removed: list[str] = []
    seen: set[str] = set()

    def visit(dfd: int, prefix: str) -> None:
        with os.scandir(dfd) as entries:
            listing = sorted((e.name, e.is_file(follow_symlinks=False)) for e in entries)
        for name, regular in listing:
            path = prefix + name
            if path in keep and regular:
                seen.add(path)
                continue
            if path in on_the_way:
                sub = folder.dir(f"{rel}/{path}")
                if sub is not None:  # else it went since the listing: its files count as disappeared
                    visit(sub, f"{path}/")
                continue
            if path in keep:
                raise IntegrityError(f"{folder.shown(f'{rel}/{path}')}: replaced by a link or special file "
                                     "during the load; remove it and load again")
            remove_tree(dfd, name)
            removed.append(path)

    top = folder.dir(rel)
    if top is not None:
        visit(top, "")
    if seen != keep:
        gone = sorted(keep - seen)[0]
        raise IntegrityError(f"{folder.shown(f'{rel}/{gone}')}: disappeared during the load (moved or removed by "
                             "someone else); load again")
    return removed
