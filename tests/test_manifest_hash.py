"""Manifest format 2 (issue 12): a sha256 per part, computed by save in the same read as its crc32c,
equal to hashlib's over exactly that part's bytes; format-1 manifests (no strong hashes) still load."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import crc32c
import pytest

from ckpt_agent.disk import digests
from ckpt_agent.disk.digests import mapped_checksum, read_part_digests
from ckpt_agent.errors import IntegrityError
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.stores import layout
from ckpt_agent.stores.local import LocalStore
from ckpt_agent.stores.manifest import FORMAT, FORMAT_V1, FileEntry, Manifest, parse_manifest
from ckpt_agent.upload.commit import CheckpointId, CommitRequest, commit_checkpoint
from tests.support.helpers import AGENT
from tests.support.specs import named, spec

PART = 1 << 20  # packs take files up to 1 MiB and need them single-part
WHERE = "rank-0.manifest.json"


def _parts(data: bytes, part_size: int) -> list[bytes]:
    return [data[i:i + part_size] for i in range(0, max(len(data), 1), part_size)]


def _digests_of(data: bytes, start: int, end: int, part_size: int, buffer_size: int) -> list[tuple[str, str]] | None:
    fd = os.memfd_create("part-digests")
    try:
        os.write(fd, data)
        return read_part_digests(fd, start, end, part_size, memoryview(bytearray(buffer_size)))
    finally:
        os.close(fd)


@pytest.mark.parametrize("buffer_size", [PART, 4096, 1000])
def test_part_digests_equal_hashlib_and_crc32c_of_each_parts_bytes(buffer_size):
    data = os.urandom(3 * PART + 123)  # the last part is short
    digests = _digests_of(data, 0, len(data), PART, buffer_size)
    assert digests == [(f"{crc32c.crc32c(p):08x}", hashlib.sha256(p).hexdigest()) for p in _parts(data, PART)]
    assert len(digests) == 4


def test_part_digests_of_a_region_start_at_its_part():
    data = os.urandom(5 * PART)
    digests = _digests_of(data, 2 * PART, 4 * PART, PART, 4096)
    assert [sha for _, sha in digests] == [hashlib.sha256(p).hexdigest() for p in _parts(data, PART)[2:4]]


def test_an_empty_file_is_one_part_with_the_hash_of_nothing():
    assert _digests_of(b"", 0, 0, PART, 4096) == [("00000000", hashlib.sha256(b"").hexdigest())]


def test_a_file_shorter_than_the_range_gives_none():
    assert _digests_of(b"abc", 0, 10, PART, 4096) is None


@pytest.mark.parametrize(("start", "end"), [(0, 3 * PART + 123), (PART, 2 * PART), (4097, 3 * PART),
                                            (123, 124), (3 * PART + 123, 3 * PART + 123)])
def test_mapped_checksum_is_the_crc32c_of_the_range_at_any_offset(tmp_path, start, end):
    """Part sizes come from a manifest, so a range need not start on a page."""
    data = os.urandom(3 * PART + 123)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert mapped_checksum(fd, start, end) == f"{crc32c.crc32c(data[start:end]):08x}"
    finally:
        os.close(fd)


def test_mapped_checksum_reads_a_file_system_that_cannot_map_files(tmp_path, monkeypatch):
    def refuse(*_a, **_k):
        raise OSError(errno.ENODEV, "no mmap here")

    data = os.urandom(2 * PART + 5)
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(digests.mmap, "mmap", refuse)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert mapped_checksum(fd, PART, 2 * PART + 5) == f"{crc32c.crc32c(data[PART:]):08x}"
    finally:
        os.close(fd)


def test_mapped_checksum_of_a_file_shorter_than_the_range_is_none(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert mapped_checksum(fd, 0, 10) is None
    finally:
        os.close(fd)


def _checkpoint(folder: Path) -> dict[str, bytes]:
    files = {"model.bin": os.urandom(2 * PART + 7), "sub/state.pt": os.urandom(PART), "empty.txt": b""}
    files.update({f"shard/{i:02d}.bin": os.urandom(100 + i) for i in range(20)})  # enough to be packed
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


def test_save_writes_format_2_with_the_sha256_of_every_parts_bytes(tmp_path):
    folder = tmp_path / "checkpoint-5"
    files = _checkpoint(folder)
    store = LocalStore(str(tmp_path / "store"))
    request = CommitRequest(folder, CheckpointId("proj", "job-1", "checkpoint-5"), 2, part_size=PART)
    commit_checkpoint(store, request, lambda n: None, Cancel())
    body = json.loads(store.read_bytes(layout.manifest_key("job-1", "checkpoint-5", 0)))
    assert body["format"] == FORMAT == 2
    assert body.get("packs"), "the small files should have been packed"
    for entry in body["files"]:
        assert entry["sha256"] == [hashlib.sha256(p).hexdigest() for p in _parts(files[entry["path"]], PART)]
        assert entry["parts"] == [f"{crc32c.crc32c(p):08x}" for p in _parts(files[entry["path"]], PART)]
    assert {e["path"] for e in body["files"]} == set(files)


def _v2_body() -> dict:
    data = b"x" * 10
    entry = FileEntry("m.bin", 10, (f"{crc32c.crc32c(data[:8]):08x}", f"{crc32c.crc32c(data[8:]):08x}"),
                      strong=(hashlib.sha256(data[:8]).hexdigest(), hashlib.sha256(data[8:]).hexdigest()))
    return json.loads(Manifest("p", "j", "c", 0, "2026-01-01T00:00:00.000000Z", 8, (entry,)).to_json())


def test_a_format_2_manifest_round_trips_with_its_strong_hashes():
    body = _v2_body()
    assert body["format"] == FORMAT
    manifest = parse_manifest(json.dumps(body), WHERE)
    assert manifest.files[0].strong == tuple(body["files"][0]["sha256"])
    assert parse_manifest(manifest.to_json(), WHERE) == manifest


@pytest.mark.parametrize("bad", [
    None,  # missing
    "ab" * 32,  # not a list
    ["ab" * 32],  # one hash for two parts
    ["AB" * 32, "ab" * 32],  # upper case: would never equal a computed key
    ["ab" * 31, "ab" * 32],  # too short
    ["zz" * 32, "ab" * 32],  # not hex
    [1, "ab" * 32],
])
def test_a_format_2_manifest_without_one_good_sha256_per_part_is_refused(bad):
    body = _v2_body()
    if bad is None:
        del body["files"][0]["sha256"]
    else:
        body["files"][0]["sha256"] = bad
    with pytest.raises(IntegrityError, match=r"^rank-0\.manifest\.json: files\[0\]: format 2 needs 2 lower-case hex"):
        parse_manifest(json.dumps(body), WHERE)


def test_a_format_1_manifest_parses_without_strong_hashes_and_ignores_a_stray_sha256_key():
    body = {**_v2_body(), "format": FORMAT_V1}
    body["files"][0]["sha256"] = "not checked in format 1"
    manifest = parse_manifest(json.dumps(body), WHERE)
    assert manifest.files[0].strong == ()
    assert manifest.format == FORMAT_V1


def test_a_checkpoint_committed_with_a_format_1_manifest_still_loads_byte_exact(tmp_path):
    folder = tmp_path / "checkpoint-5"
    files = _checkpoint(folder)
    root = tmp_path / "store"
    request = CommitRequest(folder, CheckpointId("proj", "job-1", "checkpoint-5"), 2, part_size=PART)
    commit_checkpoint(LocalStore(str(root)), request, lambda n: None, Cancel())
    key = root / layout.manifest_key("job-1", "checkpoint-5", 0)
    body = json.loads(key.read_bytes())
    body["format"] = FORMAT_V1  # what an agent before format 2 wrote: no sha256 lists
    for entry in body["files"]:
        del entry["sha256"]
    key.write_text(json.dumps(body))
    dl = tmp_path / "dl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BT_"))}
    env.update(BT_CHECKPOINT_STORE=f"file://{root}", BT_LOAD_CHECKPOINT_CONFIG=spec(dl, named("checkpoint-5", "job-1")))
    result = subprocess.run([AGENT, "load"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for rel, data in files.items():
        assert (dl / "rank-0" / "checkpoint-5" / rel).read_bytes() == data
