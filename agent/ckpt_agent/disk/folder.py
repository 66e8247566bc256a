"""The download folder, opened once and walked one component at a time through ckpt_agent.disk.safefs,
so a link planted at any depth, at any moment, is refused instead of followed."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, overload

from ckpt_agent.disk.safefs import DIR_FLAGS, read_file, refuse_kind, unlink, write_atomic
from ckpt_agent.errors import LocalError


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
                return os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    return None
                if attempt == 2:
                    raise
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise refuse_kind(fd, name, self.shown(rel)) from None
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
            raise refuse_kind(dfd, name, self.shown(rel))
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
