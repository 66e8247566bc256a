"""What the sidecar looks at on disk and in /proc, gathered as plain facts for ckpt_agent.sync.readiness.

Nothing here ever opens a file through a symlink or blocks on a FIFO: top-level entries are
lstat-ed, and files are read only through ckpt_agent.upload.scan.open_regular.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ckpt_agent.config import names
from ckpt_agent.errors import ConfigError
from ckpt_agent.sync.formats import DEEPSPEED_LATEST, TAIL_BYTES, TopEntry, file_structure
from ckpt_agent.upload.scan import LocalFile, open_regular, scan_checkpoint

MARKER_LIMIT = 16 << 20  # a complete file bigger than this is not read (it is there; that is enough)


def top_entries(root: Path) -> list[TopEntry]:
    """Every top-level entry; a symlink says which top-level name it resolves to ("" if outside)."""
    real_root = os.path.realpath(root)
    found = []
    for e in os.scandir(root):
        try:
            mode = e.stat(follow_symlinks=False).st_mode
        except FileNotFoundError:  # gone since the listing
            continue
        link_to: str | None = None
        if stat.S_ISLNK(mode):
            target = os.path.realpath(e.path)
            parent, name = os.path.split(target)
            link_to = (name if parent == real_root and name != e.name else "") if os.path.exists(target) else None
        found.append(TopEntry(e.name, mode, link_to))
    return found


def _read(path: Path, limit: int) -> bytes | None:
    """Up to `limit` bytes of a regular file (not through a link, never blocking); None if it is not one."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        fd = open_regular(LocalFile(path.name, path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns,
                                    st.st_dev))
    except OSError:
        return None
    try:
        return os.pread(fd, limit, 0)
    finally:
        os.close(fd)


def markers(folder: Path, names: tuple[str, ...]) -> dict[str, bytes | None]:
    """Each complete file's bytes (JSON ones are parsed by ckpt_agent.sync.readiness), None where it is absent."""
    return {name: _read(folder / name, MARKER_LIMIT) for name in names}


def deepspeed_latest(root: Path) -> str | None:
    """The tag DeepSpeed's top-level `latest` file names (it writes it after the tag folder)."""
    data = _read(root / DEEPSPEED_LATEST, 4096)
    tag = data.decode(errors="replace").strip() if data else ""
    return tag if "/" not in tag and names.is_segment(tag) else None


def structure(f: LocalFile) -> str | None:
    """ckpt_agent.sync.formats.file_structure of a single-file checkpoint, read without following links."""
    try:
        fd = open_regular(f)
    except OSError:
        return "vanished or replaced"
    try:
        head = os.pread(fd, 8, 0)
        if f.rel.endswith(".safetensors") and len(head) == 8:
            head += os.pread(fd, min(int.from_bytes(head, "little"), MARKER_LIMIT), 8)
        start = max(0, f.size - TAIL_BYTES)
        tail = os.pread(fd, f.size - start, start)
    finally:
        os.close(fd)
    return file_structure(f.rel, f.size, head, tail)


def snapshot(path: Path) -> tuple[tuple[LocalFile, ...], int] | None:
    """A checkpoint's files and the newest ctime of any file or folder in it; None if it vanished.

    ckpt_agent.upload.scan.UnsafeEntry (a link out, a FIFO, ...) is raised for the caller to report."""
    try:
        files = tuple(scan_checkpoint(path))
        st = os.lstat(path)
        newest = st.st_ctime_ns
        if stat.S_ISDIR(st.st_mode):
            for dirpath, _dirs, _files in os.walk(path):
                newest = max(newest, os.stat(dirpath).st_ctime_ns)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ConfigError as exc:
        if not os.path.lexists(path):
            return None
        raise exc
    return files, max([newest, *(f.ctime_ns for f in files)])


@dataclass(frozen=True)
class Writers:
    """Real paths held open for writing; `blind`: no other process's open files can be seen at all
    (a separate container or PID namespace, or every other process belongs to another user)."""

    paths: frozenset[str]
    blind: bool


def _ancestors() -> set[str]:
    """Our own pid and our parents' (tini, a shell): they never write checkpoints."""
    pids, pid = set(), os.getpid()
    while pid > 0 and str(pid) not in pids:
        pids.add(str(pid))
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def can_see(pid: int) -> bool:
    """Whether this process's open files are visible to us (same PID namespace, and permitted)."""
    try:
        os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    return True


def open_for_writing(root: Path) -> Writers:
    """Files under `root` that a process we may inspect holds open for writing (Linux: /proc/*/fd
    and the flags in /proc/*/fdinfo)."""
    if not os.path.isdir("/proc/self/fd"):
        return Writers(frozenset(), blind=True)
    prefix = os.path.realpath(root) + os.sep
    mine = _ancestors()
    found: set[str] = set()
    seen_other = False
    for pid in os.listdir("/proc"):
        if not pid.isdecimal():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        seen_other = seen_other or pid not in mine
        for fd in fds:
            with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
                target = os.readlink(f"{fd_dir}/{fd}")
                if not target.startswith(prefix) or target.endswith(" (deleted)"):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
                if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                    found.add(target)
    return Writers(frozenset(found), blind=not seen_other)
