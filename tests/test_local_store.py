"""The local store across filesystems and for other users: copies that work anywhere, modes from the umask."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from ckpt_agent.errors import StoreError
from ckpt_agent.stores import local
from ckpt_agent.stores.local import LocalStore

DATA = os.urandom(300_000)


def upload(store: LocalStore, key: str, source: Path) -> None:
    with open(source, "rb") as f:
        store.upload_file(key, f, source.stat().st_size)


@pytest.fixture
def small_parts(monkeypatch):
    """Several parts per file, so a fallback chosen in one part is kept for the next."""
    monkeypatch.setattr(local._LocalUpload, "part_size", 64 << 10)


@pytest.mark.parametrize("code", ["EXDEV", "ENOSYS", "EOPNOTSUPP", "EINVAL"])
def test_upload_falls_back_to_an_ordinary_copy_when_the_kernel_cannot_copy(code, tmp_path, monkeypatch,
                                                                          small_parts):
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(local.os, "copy_file_range", refuse)
    source = tmp_path / "weights"
    source.write_bytes(DATA)
    store = LocalStore(str(tmp_path / "store"))
    upload(store, "job/ckpt/weights", source)
    assert store.read_bytes("job/ckpt/weights") == DATA
    assert len(calls) == 1, "the kernel copy is asked once per upload, not once per part"
    assert os.listdir(tmp_path / "store" / "job" / "ckpt") == ["weights"]


def test_other_copy_errors_are_a_store_error_and_leave_no_temporary_file(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(local.os, "copy_file_range", full)
    source = tmp_path / "weights"
    source.write_bytes(DATA)
    store = LocalStore(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="weights: cannot write to the local store: No space left"):
        upload(store, "job/weights", source)
    assert os.listdir(tmp_path / "store" / "job") == []


def test_upload_from_tmpfs_to_another_filesystem_copies_every_byte(tmp_path, small_parts):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a writable /dev/shm on another filesystem than the test's tmp_path")
    source = shm / f"ckpt-agent-test-{os.getpid()}"
    source.write_bytes(DATA)
    try:
        store = LocalStore(str(tmp_path / "store"))
        upload(store, "job/ckpt/weights", source)
        store.write_bytes("job/ckpt/manifest.json", b"{}")
    finally:
        source.unlink()
    assert (tmp_path / "store" / "job" / "ckpt" / "weights").read_bytes() == DATA


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_store_files_and_folders_honour_the_umask(umask, file_mode, dir_mode, tmp_path):
    source = tmp_path / "weights"
    source.write_bytes(DATA)
    root = tmp_path / "store"
    root.mkdir()
    previous = os.umask(umask)
    try:
        store = LocalStore(str(root))
        upload(store, "projects/demo/ckpt/weights", source)
        store.write_bytes("projects/demo/jobs/job-1.json", b"{}")
    finally:
        os.umask(previous)
    for path in (root / "projects/demo/ckpt/weights", root / "projects/demo/jobs/job-1.json"):
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    for path in (root / "projects", root / "projects/demo", root / "projects/demo/ckpt"):
        assert stat.S_IMODE(path.stat().st_mode) == dir_mode, path
