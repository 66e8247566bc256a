"""The one way the agent touches anything under the download folder (and the ready file).

The folder may hold links, hardlinks and special files planted by someone else, before or during
a load. So every path is reached from a folder fd, one component at a time, with O_NOFOLLOW
(openat-style): a symlink at any depth, at any moment, is refused instead of followed. A file is
written only if fstat shows a regular file with one link, so a hardlink planted to an outside
file is never written through; new files are created with O_EXCL; reads use O_NONBLOCK so a FIFO
never hangs; records are replaced atomically (AtomicFile), from an unpredictable temporary name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, overload

from ckpt_agent.errors import IntegrityError, LocalError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def refuse_link(shown: object) -> IntegrityError:
    return IntegrityError(f"{shown}: is a symlink inside the download folder; remove it "
                          "(ckpt-agent never writes through links)")


def refuse_hardlink(shown: object, links: int) -> IntegrityError:
    return IntegrityError(f"{shown}: has {links} hard links; remove it (ckpt-agent never writes through links)")


def _refuse_kind(dfd: int, name: str, shown: object) -> IntegrityError:
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


def _checked(fd: int, dfd: int, name: str, shown: object, write: bool) -> int:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (write and st.st_nlink != 1):
        os.close(fd)
        if stat.S_ISREG(st.st_mode):
            raise refuse_hardlink(shown, st.st_nlink)
        raise _refuse_kind(dfd, name, shown)
    return fd


def open_file(dfd: int, name: str, shown: object, write: bool = False) -> int | None:
    """An existing regular file (single-linked if for writing), never through a link; None if absent."""
    try:
        fd = os.open(name, (os.O_RDWR if write else os.O_RDONLY) | _FILE, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
            raise _refuse_kind(dfd, name, shown) from None
        raise
    return _checked(fd, dfd, name, shown, write)


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


TEMP_SUFFIX = ".incomplete"  # a store listing hides names ending so: they are never a committed object


class AtomicFile:
    """A new file that replaces `name` in folder `dfd` only when committed: readers see the old file
    or the new one, never a part. The temporary name cannot be guessed or pre-planted (created
    O_EXCL, never through a link), rename replaces a link at `name` instead of following it, and the
    temporary file is removed whatever goes wrong (or when nobody commits)."""

    def __init__(self, dfd: int, name: str, mode: int = 0o644) -> None:
        while True:
            self._tmp = f".ckpt-agent-{secrets.token_hex(8)}{TEMP_SUFFIX}"
            try:
                self.fd = create_file(dfd, self._tmp, mode)
                break
            except FileExistsError:
                continue
        self._dfd, self._name = dfd, name
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


def write_atomic(dfd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    with AtomicFile(dfd, name, mode) as f:
        view = memoryview(data)
        while view:
            view = view[os.write(f.fd, view):]


def unlink(dfd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dfd)


def remove_tree(dfd: int, name: str) -> None:
    """Remove an entry and, for a real folder, everything in it; links are removed, never followed."""
    try:
        sub = os.open(name, _DIR, dir_fd=dfd)
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


class Folder:
    """The download folder, opened once (a link the user made at the root itself is followed).

    Folder fds are cached by relative path, so a checkpoint of thousands of files costs about
    one openat per file. Close it (or use `with`) when the load is done.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise LocalError(f"download_folder {root}: cannot open it ({exc.strerror}); "
                             "choose another download_folder") from None
        self._dirs: dict[str, int] = {"": self.fd}
        self._lock = threading.Lock()

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for fd in self._dirs.values():
                os.close(fd)
            self._dirs.clear()

    def forget(self) -> None:
        """Drop cached folder fds, so the next lookups walk from the root again."""
        with self._lock:
            for rel, fd in list(self._dirs.items()):
                if rel:
                    os.close(fd)
                    del self._dirs[rel]

    def shown(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    @overload
    def dir(self, rel: str, create: Literal[True]) -> int: ...

    @overload
    def dir(self, rel: str, create: bool = False) -> int | None: ...

    def dir(self, rel: str, create: bool = False) -> int | None:
        """The fd of folder `rel`, walked without following links; None if absent and not `create`."""
        with self._lock:
            if rel in self._dirs:
                return self._dirs[rel]
            parts = rel.split("/")
            depth = len(parts)
            while "/".join(parts[:depth]) not in self._dirs and depth > 0:
                depth -= 1
            fd = self._dirs["/".join(parts[:depth])]
            for i in range(depth, len(parts)):
                try:
                    sub = self._open_dir(fd, parts[i], "/".join(parts[: i + 1]), create)
                finally:
                    if i > depth:  # an intermediate folder we opened on the way, not a cached one
                        os.close(fd)
                if sub is None:
                    return None
                fd = sub
            self._dirs[rel] = fd
            return fd

    def _open_dir(self, fd: int, name: str, rel: str, create: bool) -> int | None:
        for attempt in (1, 2):
            try:
                return os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                if attempt == 2:
                    raise
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise _refuse_kind(fd, name, self.shown(rel)) from None
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=fd)
        return None

    @overload
    def parent(self, rel: str, create: Literal[True]) -> tuple[int, str]: ...

    @overload
    def parent(self, rel: str, create: bool = False) -> tuple[int | None, str]: ...

    def parent(self, rel: str, create: bool = False) -> tuple[int | None, str]:
        head, _, name = rel.rpartition("/")
        return self.dir(head, create), name

    def lstat(self, rel: str) -> os.stat_result | None:
        """A regular file's lstat, None if it (or a folder above it) is absent; anything else is refused."""
        dfd, name = self.parent(rel)
        if dfd is None:
            return None
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise _refuse_kind(dfd, name, self.shown(rel))
        return st

    def read(self, rel: str) -> bytes | None:
        dfd, name = self.parent(rel)
        return None if dfd is None else read_file(dfd, name, self.shown(rel))

    def write_atomic(self, rel: str, data: bytes) -> None:
        dfd, name = self.parent(rel, create=True)
        write_atomic(dfd, name, data)

    def unlink(self, rel: str) -> None:
        dfd, name = self.parent(rel)
        if dfd is not None:
            unlink(dfd, name)

    def walk_files(self, rel: str) -> Iterator[tuple[str, bool]]:
        """(path relative to `rel`, is a regular file) for every non-folder entry below `rel`."""
        top = self.dir(rel)
        if top is None:
            return
        for dirpath, dirnames, filenames, dfd in os.fwalk(".", dir_fd=top):
            base = "" if dirpath == "." else dirpath[2:] + "/"
            for name in filenames:
                mode = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
                yield base + name, stat.S_ISREG(mode)
            for name in dirnames:  # fwalk lists a link to a folder as a folder, and does not enter it
                if stat.S_ISLNK(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                    yield base + name, False
