"""The safe primitives for files someone else may have planted links or special files among.

The download folder, the part cache and a checkpoint being uploaded may hold links, hardlinks and
special files planted by someone else, before or during a load. So a file is opened from a folder
fd with O_NOFOLLOW (openat-style) and O_NONBLOCK (`open_regular`, the one safe open): a symlink is
refused instead of followed, a FIFO never hangs. A file is written only if fstat shows a regular
file with one link, so a hardlink planted to an outside file is never written through; new files
are created with O_EXCL. The one atomic write (`AtomicFile`), the one temporary-name scheme
(`temp_name`, `partial_name`) and the one lock (`lock_exclusive`) live here too.
ckpt_agent.disk.folder walks the download folder with these.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import stat
import time
from collections.abc import Callable

from ckpt_agent.disk.fileio import write_all
from ckpt_agent.errors import IntegrityError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
LOCK_POLL_SECONDS = 0.2
_FILE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def refuse_link(shown: object) -> IntegrityError:
    return IntegrityError(f"{shown}: is a symlink inside the download folder; remove it "
                          "(ckpt-agent never writes through links)")


def refuse_hardlink(shown: object, links: int) -> IntegrityError:
    return IntegrityError(f"{shown}: has {links} hard links; remove it (ckpt-agent never writes through links)")


def refuse_kind(dfd: int, name: str, shown: object) -> IntegrityError:
    """Why `name` could not be opened as what we needed, named for the user."""
    try:
        mode = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
    except OSError:
        mode = 0
    if stat.S_ISLNK(mode):
        return refuse_link(shown)
    if stat.S_ISDIR(mode):
        return IntegrityError(f"{shown}: is a folder where a file is needed; remove it")
    if stat.S_ISREG(mode):
        return IntegrityError(f"{shown}: is a file where a folder is needed; remove it")
    return IntegrityError(f"{shown}: is not a regular file (a FIFO, socket or device?); remove it")


def open_regular(name: str | os.PathLike, flags: int = os.O_RDONLY, *, dir_fd: int | None = None,
                 mode: int = 0o600) -> tuple[int, os.stat_result] | None:
    """`name` opened never through a link and never blocking on a FIFO, with its fstat; None, with
    nothing left open, when it is not a regular file. The one safe open: every caller refuses the
    None in its own words (a download, a scanned checkpoint file, a cache entry, the cache lock)."""
    fd = os.open(name, flags | _FILE, mode, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def open_file(dfd: int, name: str, shown: object, write: bool = False) -> int | None:
    """An existing regular file (single-linked if for writing), never through a link; None if absent."""
    try:
        opened = open_regular(name, os.O_RDWR if write else os.O_RDONLY, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
            raise refuse_kind(dfd, name, shown) from None
        raise
    if opened is None:
        raise refuse_kind(dfd, name, shown)
    fd, st = opened
    if write and st.st_nlink != 1:
        os.close(fd)
        raise refuse_hardlink(shown, st.st_nlink)
    return fd


def create_file(dfd: int, name: str, mode: int = 0o644) -> int:
    """A new file that did not exist: O_EXCL never opens what someone else put there."""
    return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _FILE, mode, dir_fd=dfd)


def open_or_create(dfd: int, name: str, shown: object) -> tuple[int, bool]:
    """(fd, existed): adopts a checked regular single-linked file, else creates it exclusively."""
    while True:
        fd = open_file(dfd, name, shown, write=True)
        if fd is not None:
            return fd, True
        try:
            return create_file(dfd, name), False
        except FileExistsError:
            continue


def read_file(dfd: int, name: str, shown: object) -> bytes | None:
    fd = open_file(dfd, name, shown)
    if fd is None:
        return None
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


# The one temporary-name scheme: every file not yet in place ends in INCOMPLETE_SUFFIX, so a store
# listing hides it and a manifest may never name one. A download's partial is `<name>` + the suffix,
# so the next load finds and resumes it; every other temporary file gets an unpredictable name.
INCOMPLETE_SUFFIX = ".ckpt-incomplete"
TEMP_PREFIX = ".ckpt-agent-"


def partial_name(name: str) -> str:
    """The resumable twin a download writes before it is renamed over `name`."""
    return name + INCOMPLETE_SUFFIX


def temp_name() -> str:
    """A fresh name nobody can guess or plant in advance."""
    return f"{TEMP_PREFIX}{secrets.token_hex(8)}{INCOMPLETE_SUFFIX}"


def place(dfd: int, tmp: str, name: str, shown: object) -> os.stat_result | None:
    """Rename the written file `tmp` over `name` (a link at `name` is replaced, not followed); the
    stat of the inode renamed, taken after the rename (which moves ctime), so a file swapped in by
    someone else never matches it. None if `tmp` is gone."""
    fd = open_file(dfd, tmp, shown, write=True)
    if fd is None:
        return None
    try:
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        return os.fstat(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A new file that replaces `name` in folder `dfd` only when committed: readers see the old file
    or the new one, never a part. The temporary name cannot be guessed or pre-planted (created
    O_EXCL, never through a link), rename replaces a link at `name` instead of following it, and the
    temporary file is removed whatever goes wrong (or when nobody commits). `durable=False` skips
    the fsync, for a file whose reader checks it anyway (a cache entry is re-hashed on every hit)."""

    def __init__(self, dfd: int, name: str, mode: int = 0o644, durable: bool = True) -> None:
        while True:
            self._tmp = temp_name()
            try:
                self.fd = create_file(dfd, self._tmp, mode)
                break
            except FileExistsError:
                continue
        self._dfd, self._name, self._durable = dfd, name, durable
        self._open = self._pending = True

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    def commit(self) -> None:
        """fsync, then rename over `name`: after a crash there is the old file or the whole new one."""
        if not self._pending:
            raise ValueError(f"{self._name}: already committed or discarded")
        try:
            if self._durable:
                os.fsync(self.fd)
            os.replace(self._tmp, self._name, src_dir_fd=self._dfd, dst_dir_fd=self._dfd)
            self._pending = False
        finally:
            self.discard()

    def discard(self) -> None:
        """Close and remove the temporary file; a no-op once committed or discarded."""
        if self._open:
            self._open = False
            os.close(self.fd)
        if self._pending:
            self._pending = False
            unlink(self._dfd, self._tmp)


def record_bytes(record: object, *, compact: bool = False) -> bytes:
    """The one JSON encoding of the records the agent keeps on disk (the load record, the ready file,
    verified.json), each then written by write_atomic: indented for a person to read, compact where
    a record is large and only the agent reads it."""
    return json.dumps(record, indent=None if compact else 1).encode()


def write_atomic(dfd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    with AtomicFile(dfd, name, mode) as f:
        write_all(f.fd, memoryview(data))


def lock_exclusive(fd: int, busy: Callable[[], None] | None = None) -> None:
    """Take the exclusive flock of open file `fd`, the one lock style. Without `busy` the kernel
    queues us (the part cache's short sections); with it, we poll and call `busy()` at every wait,
    which may say who holds the lock and raise to give up (a signal, a deadline)."""
    if busy is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        busy()
        time.sleep(LOCK_POLL_SECONDS)


def unlink(dfd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dfd)


def remove_tree(dfd: int, name: str) -> None:
    """Remove an entry and, for a real folder, everything in it; links are removed, never followed."""
    try:
        sub = os.open(name, DIR_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        return
    except OSError:
        unlink(dfd, name)
        return
    try:
        for entry in os.listdir(sub):
            remove_tree(sub, entry)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=dfd)
