"""The one atomic write (ckpt_agent.disk.safefs.AtomicFile), used by the download folder and the local store:
readers see the old file or the whole new one, a link at the name is replaced and never written
through, and no temporary file is left behind whatever fails."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from ckpt_agent.disk.safefs import AtomicFile, write_atomic
from ckpt_agent.errors import StoreError
from ckpt_agent.stores.local import LocalStore


@pytest.fixture
def dfd(tmp_path: Path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_write_replaces_the_file_whole(tmp_path, dfd):
    (tmp_path / "record").write_bytes(b"old")
    write_atomic(dfd, "record", b"new" * 1000)
    assert (tmp_path / "record").read_bytes() == b"new" * 1000
    assert names(tmp_path) == ["record"]


def test_a_symlink_at_the_name_is_replaced_not_written_through(tmp_path, dfd):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "record").symlink_to(victim)
    write_atomic(dfd, "record", b"new")
    assert victim.read_bytes() == b"keep"
    assert not (tmp_path / "record").is_symlink() and (tmp_path / "record").read_bytes() == b"new"


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary_file(tmp_path, dfd):
    (tmp_path / "record").write_bytes(b"old")
    with pytest.raises(RuntimeError), AtomicFile(dfd, "record") as f:
        os.write(f.fd, b"half")
        raise RuntimeError("the writer failed")
    assert names(tmp_path) == ["record"] and (tmp_path / "record").read_bytes() == b"old"


def test_a_failed_rename_leaves_no_temporary_file(tmp_path, dfd):
    (tmp_path / "record").mkdir()
    (tmp_path / "record" / "inside").write_bytes(b"")  # a non-empty folder cannot be renamed over
    with pytest.raises(OSError):
        write_atomic(dfd, "record", b"new")
    assert names(tmp_path) == ["record"]


def test_a_file_nobody_commits_is_discarded(tmp_path, dfd):
    f = AtomicFile(dfd, "record")
    os.write(f.fd, b"never")
    f.discard()
    f.discard()
    assert names(tmp_path) == []
    with pytest.raises(ValueError, match="already committed or discarded"):
        f.commit()


def test_the_local_store_leaves_no_temporary_file_when_an_upload_is_aborted_or_fails(tmp_path):
    store = LocalStore(str(tmp_path / "store"))
    upload = store.start_upload("a/b.bin", 10)
    upload.put_part(0, io.BytesIO(b"0123456789"), 0, 10)
    upload.abort()
    assert names(tmp_path / "store" / "a") == []
    (tmp_path / "short").write_bytes(b"short")
    with open(tmp_path / "short", "rb") as source, pytest.raises(StoreError, match="source ended early"):
        store.upload_file("a/c.bin", source, 10)  # upload_in_parts aborts on failure
    assert names(tmp_path / "store" / "a") == []


def test_the_local_store_hides_a_write_in_progress_from_listings_and_then_shows_it_whole(tmp_path):
    store = LocalStore(str(tmp_path / "store"))
    store.write_bytes("a/first", b"1")
    upload = store.start_upload("a/b.bin", 3)
    upload.put_part(0, io.BytesIO(b"abc"), 0, 3)
    assert store.list_dir("a/").files == ("first",)
    assert len(names(tmp_path / "store" / "a")) == 2  # the temporary file is there, just not listed
    upload.complete()
    upload.abort()  # after complete(), as upload_in_parts does when complete() raised: a no-op
    assert store.list_dir("a/").files == ("b.bin", "first")
    assert store.read_bytes("a/b.bin") == b"abc"
    assert names(tmp_path / "store" / "a") == ["b.bin", "first"]
