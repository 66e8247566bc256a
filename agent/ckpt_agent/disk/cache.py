"""A persistent, content-addressed cache of checkpoint parts, shared by the agents of one node.

An entry is named by the sha256 of its bytes (manifest format 2), so it stands for exactly those
bytes; every hit is re-hashed before a byte of it is copied out, and an entry that does not match
is deleted and reported as a miss: a damaged disk costs a refetch, never a corrupt checkpoint.

That check on the way out is the guarantee, so the way in is cheap: a part a load has just
verified against its manifest is copied in by the kernel under the manifest's sha256, neither
hashed again nor fsynced (an entry torn by a crash, or put by a store that lied, fails its first
re-hash). With the hash and the fsync, filling the cache tripled a cold load (docs/benchmarks.md,
"Numbers behind the code").

Entries are written to a unique temporary file and renamed into place, so agents sharing the
cache never see half an entry; eviction runs under an flock, and a reader racing it either
already holds the entry open (its inode lives on) or sees a clean miss. Everything is opened
relative to the cache folder with O_NOFOLLOW|O_NONBLOCK: a link or special file planted there is
never read through and never blocks.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ckpt_agent.disk.fileio import copy_range, read_span
from ckpt_agent.disk.safefs import DIR_FLAGS, TEMP_PREFIX, AtomicFile, lock_exclusive, open_regular
from ckpt_agent.errors import LocalError

ENTRIES = "sha256"  # the folder of entries; a later algorithm gets its own
LOCK = ".lock"  # flock'ed for eviction; its first 8 bytes count the bytes cached
STALE_TMP_NS = 3600 * 10**9  # a temporary file this old belonged to an agent that died
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass
class CacheStats:
    """What a load reports: `discarded` entries failed their re-hash (or were not regular files)."""

    hits: int = 0
    misses: int = 0
    discarded: int = 0
    stored: int = 0
    evicted: int = 0


class PartCache:
    """`max_bytes` caps the bytes of all entries; the least recently used go first."""

    def __init__(self, root: str | os.PathLike, max_bytes: int) -> None:
        self.root, self.max_bytes = Path(root), max_bytes
        self.stats = CacheStats()
        self._mutex = threading.Lock()
        self._dir = _open_entries(self.root)

    def close(self) -> None:
        os.close(self._dir)

    def __enter__(self) -> PartCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_into(self, digest: str, fd: int, offset: int, length: int) -> bool:
        """Copy the part with this sha256 to [offset, offset + length) of `fd`, once re-hashed.

        False on a miss, with `fd` untouched; a bad entry is removed first.
        """
        name = _entry_name(digest)
        try:
            opened = open_regular(name, dir_fd=self._dir)
        except FileNotFoundError:
            return self._count(hit=False)
        except OSError:  # ELOOP: a link planted under an entry's name
            opened = None
        if opened is None:  # a link or special file under an entry's name
            self._discard(name, None)
            return self._count(hit=False)
        src, st = opened
        try:
            if st.st_size != length or _sha256_of(src, length) != digest:
                self._discard(name, st)
                return self._count(hit=False)
            if not copy_range(src, fd, offset, length):
                return self._count(hit=False)
            with suppress(OSError):  # the hit makes it the most recently used, where the disk allows
                os.utime(src)
        finally:
            os.close(src)
        return self._count(hit=True)

    def put_span(self, digest: str, fd: int, offset: int, length: int) -> bool:
        """[offset, offset + length) of an open file, already verified against the manifest that
        names it `digest`: copied in the kernel and trusted to the re-hash of every hit. False if
        it is not stored (larger than the cap, or the file ends first)."""
        name = _entry_name(digest)
        if length > self.max_bytes:
            return False
        if self._touch(name, length):
            return True
        entry = AtomicFile(self._dir, name, 0o600, durable=False)
        try:
            placed = copy_range(fd, entry.fd, 0, length, src_offset=offset)
            if placed:
                entry.commit()
        finally:
            entry.discard()
        if placed:
            with self._mutex:
                self.stats.stored += 1
            self._account(length)
        return placed

    def evict(self) -> int:
        """Remove least-recently-used entries until the cache fits its cap; the bytes freed."""
        with self._locked() as lock:
            entries, junk = self._scan()
            total = sum(size for _, size, _ in entries)
            freed = 0
            for _, size, name in sorted(entries):
                if total - freed <= self.max_bytes:
                    break
                if _unlink(self._dir, name):
                    freed += size
                    with self._mutex:
                        self.stats.evicted += 1
            for name in junk:
                _unlink(self._dir, name)
            os.pwrite(lock, (total - freed).to_bytes(8, "little"), 0)
        return freed

    def _touch(self, name: str, length: int) -> bool:
        """An entry of the right size is already there (another agent put it): mark it used."""
        try:
            st = os.stat(name, dir_fd=self._dir, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_size == length:
                os.utime(name, dir_fd=self._dir, follow_symlinks=False)
                return True
        except OSError:
            pass
        return False

    def _account(self, added: int) -> None:
        """Add to the shared byte count; evict when it passes the cap (a scan then recounts exactly)."""
        with self._locked() as lock:
            raw = os.pread(lock, 8, 0)
            total = int.from_bytes(raw, "little") + added if len(raw) == 8 else None
            if total is not None and total <= self.max_bytes:
                os.pwrite(lock, total.to_bytes(8, "little"), 0)
                return
        self.evict()

    def _scan(self) -> tuple[list[tuple[int, int, str]], list[str]]:
        """(mtime, size, name) of every entry, and names to remove: links or special files under an
        entry's name, temporary files of agents that died."""
        entries: list[tuple[int, int, str]] = []
        junk: list[str] = []
        now = time.time_ns()
        with os.scandir(self._dir) as it:
            for item in it:
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if _DIGEST.fullmatch(item.name):
                    if stat.S_ISREG(st.st_mode):
                        entries.append((st.st_mtime_ns, st.st_size, item.name))
                    elif not stat.S_ISDIR(st.st_mode):
                        junk.append(item.name)
                elif item.name.startswith(TEMP_PREFIX) and now - st.st_mtime_ns > STALE_TMP_NS:
                    junk.append(item.name)
        return entries, junk

    def _discard(self, name: str, judged: os.stat_result | None) -> None:
        """Remove a bad entry, unless another agent has meanwhile renamed a good one into its place."""
        try:
            now = os.stat(name, dir_fd=self._dir, follow_symlinks=False)
        except OSError:
            return
        same = judged is not None and (now.st_dev, now.st_ino) == (judged.st_dev, judged.st_ino)
        if (same or not stat.S_ISREG(now.st_mode)) and _unlink(self._dir, name):
            with self._mutex:
                self.stats.discarded += 1

    def _count(self, hit: bool) -> bool:
        with self._mutex:
            if hit:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
        return hit

    @contextmanager
    def _locked(self) -> Iterator[int]:
        opened = open_regular(LOCK, os.O_RDWR | os.O_CREAT, dir_fd=self._dir)
        if opened is None:
            raise LocalError(f"{self.root / ENTRIES / LOCK}: not a regular file; remove it")
        fd = opened[0]
        try:
            lock_exclusive(fd)
            yield fd
        finally:
            os.close(fd)


def _entry_name(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a lower-case hex sha256: {digest!r}")
    return digest


def _open_entries(root: Path) -> int:
    """The entries folder (created 0700), opened once: every later name is resolved inside it."""
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise LocalError(f"{root}: cannot use it as the part cache ({exc.strerror})") from None
    try:
        owner = os.fstat(top).st_uid
        with suppress(FileExistsError):
            os.mkdir(ENTRIES, 0o700, dir_fd=top)
        entries = os.open(ENTRIES, DIR_FLAGS, dir_fd=top)
    except OSError as exc:
        raise LocalError(f"{root / ENTRIES}: not a folder of the part cache ({exc.strerror}); remove it") from None
    finally:
        os.close(top)
    if owner != os.geteuid() or os.fstat(entries).st_uid != os.geteuid():
        os.close(entries)
        raise LocalError(f"{root}: the part cache belongs to another user; point the cache at a folder of your own")
    return entries


def _sha256_of(fd: int, length: int) -> str:
    sha = hashlib.sha256()
    for chunk in read_span(fd, 0, length):
        sha.update(chunk)
    return sha.hexdigest()


def _unlink(dir_fd: int, name: str) -> bool:
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except OSError:
        return False

