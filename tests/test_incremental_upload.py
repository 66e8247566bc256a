"""Incremental uploads: parts of checkpoint N+1 whose sha256 is already in the store are copied
there (UploadPartCopy, a local range copy), not sent again; the rest is uploaded. Bytes sent are
counted by the fault proxy in front of SeaweedFS (upload direction), and every object must read
back byte-exact with a plain S3 client and load and verify with ckpt-agent."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from ckpt_agent.errors import TransientError
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import MIN_PART, Store
from ckpt_agent.stores.local import LocalStore
from ckpt_agent.stores.manifest import DEFAULT_PART_SIZE, FileEntry, Manifest
from ckpt_agent.stores.s3native import NativeS3Store
from ckpt_agent.upload.commit import CheckpointId, CommitRequest, commit_checkpoint
from ckpt_agent.upload.dedup import Segment, index_parts, plan_segments
from ckpt_agent.upload.incremental import Transferred
from tests.support.faultproxy import LOOPBACK, FaultProxy
from tests.support.helpers import AGENT, clean_env
from tests.support.specs import latest, spec

MIB = 1 << 20
PART = DEFAULT_PART_SIZE
JOB = "job-1"


# -- the plan (pure) -----------------------------------------------------------------------------


def _manifest(files: dict[str, list[str]], part_size: int = PART, sizes: dict[str, int] | None = None) -> Manifest:
    entries = tuple(FileEntry(p, (sizes or {}).get(p, len(shas) * part_size), tuple("0" * 8 for _ in shas),
                              strong=tuple(shas)) for p, shas in files.items())
    return Manifest(None, JOB, "checkpoint-1", 0, "t", part_size, entries)


def test_unchanged_runs_become_one_copy_each_and_changed_parts_one_upload():
    index = index_parts(_manifest({"m.bin": ["a", "b", "c", "d", "e"]}))
    plan = plan_segments("m.bin", 5 * PART, PART, ["a", "b", "X", "d", "e"], index, 64 * MIB)
    assert plan == [Segment(0, 2 * PART, "m.bin", 0), Segment(2 * PART, PART),
                    Segment(3 * PART, 2 * PART, "m.bin", 3 * PART)]


def test_parts_are_found_in_any_file_of_the_previous_checkpoint():
    index = index_parts(_manifest({"old-name.bin": ["a", "b"], "other.bin": ["c"]}))
    plan = plan_segments("new-name.bin", 3 * PART, PART, ["a", "b", "c"], index, 64 * MIB)
    assert plan == [Segment(0, 2 * PART, "old-name.bin", 0), Segment(2 * PART, PART, "other.bin", 0)]


def test_adjacent_uploaded_parts_are_coalesced_up_to_the_upload_segment_size():
    index = index_parts(_manifest({"m.bin": ["a"]}))
    plan = plan_segments("m.bin", 11 * PART, PART, ["a", *"BCDEFGHIJK"], index, 64 * MIB)
    assert plan == [Segment(0, PART, "m.bin", 0), Segment(PART, 8 * PART), Segment(9 * PART, 2 * PART)]
    assert all(s.length >= MIN_PART for s in plan[:-1])


def test_a_short_last_part_matches_only_a_part_of_the_same_length():
    previous = _manifest({"m.bin": ["a", "z"]}, sizes={"m.bin": PART + 10})
    index = index_parts(previous)
    assert plan_segments("m.bin", PART + 11, PART, ["a", "z"], index, 64 * MIB) == [
        Segment(0, PART, "m.bin", 0), Segment(PART, 11)]
    assert plan_segments("m.bin", PART + 10, PART, ["a", "z"], index, 64 * MIB) == [
        Segment(0, PART + 10, "m.bin", 0)]


def test_nothing_is_planned_without_a_match_without_strong_hashes_or_with_parts_below_5_mib():
    index = index_parts(_manifest({"m.bin": ["a", "b"]}))
    assert plan_segments("m.bin", 2 * PART, PART, ["X", "Y"], index, 64 * MIB) is None
    format_1 = replace(_manifest({"m.bin": ["a", "b"]}),
                       files=(FileEntry("m.bin", 2 * PART, ("0" * 8, "0" * 8)),))
    assert index_parts(format_1) == {}
    small = index_parts(_manifest({"m.bin": ["a", "b"]}, part_size=MIB))
    assert plan_segments("m.bin", 2 * MIB, MIB, ["a", "b"], small, 64 * MIB) is None


# -- stores --------------------------------------------------------------------------------------


@dataclass
class Target:
    """A store as the agent sees it; `proxy` counts what was sent to SeaweedFS (None: local store)."""

    store: Store
    env: dict[str, str]
    proxy: FaultProxy | None = None
    s3: object = None  # a plain boto3 client straight to SeaweedFS
    bucket: str = ""
    prefix: str = ""

    def read_object(self, key: str) -> bytes:
        if self.s3 is None:
            return self.store.read_bytes(key)
        return self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()

    def sent(self, name: str) -> int:
        assert self.proxy is not None
        return self.proxy.sent_bytes("PUT", layout.checkpoint_prefix(JOB, name))


def _base_env() -> dict[str, str]:
    return clean_env(BT_TRAINING_PROJECT_NAME="proj", BT_LOG_FORMAT="json")


@pytest.fixture(params=["local", "seaweedfs"])
def target(request, tmp_path: Path) -> Iterator[Target]:
    if request.param == "local":
        root = tmp_path / "store"
        yield Target(LocalStore(str(root)), {**_base_env(), "BT_CHECKPOINT_STORE": f"file://{root}"})
        return
    server, prefix = request.getfixturevalue("seaweed"), request.getfixturevalue("s3_prefix")
    with FaultProxy(LOOPBACK, server.s3_port) as proxy:
        env = {**_base_env(), **server.env(), "BT_CHECKPOINT_STORE": f"s3://{server.bucket}/{prefix}",
               "AWS_ENDPOINT_URL": proxy.endpoint}
        store = NativeS3Store(server.bucket, prefix, env)
        try:
            yield Target(store, env, proxy, server.client(), server.bucket, prefix)
        finally:
            store.close()


def _write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _changed(data: bytes, parts: list[int]) -> bytes:
    out = bytearray(data)
    for p in parts:
        start = p * PART
        out[start:start + 100] = os.urandom(100)
    return bytes(out)


def _commit(store: Store, folder: Path, previous: Manifest | None = None) -> tuple[Manifest, Transferred]:
    moved = Transferred()
    request = CommitRequest(folder, CheckpointId("proj", JOB, folder.name), 4, previous=previous)
    return commit_checkpoint(store, request, lambda n: None, Cancel(), moved), moved


def _save(target: Target, folder: Path) -> dict:
    """`ckpt-agent save`; returns the fields of its JSON summary event."""
    result = subprocess.run([AGENT, "save", str(folder), "--job-id", JOB], env=target.env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return next(e for e in events if e["event"] == "save_committed")


# -- end to end ----------------------------------------------------------------------------------


def test_checkpoint_n_plus_1_with_5_percent_of_its_parts_changed_sends_under_10_percent(target, tmp_path):
    """A 160 MiB + 1234 B file (21 parts of 8 MiB): one middle part and the short last part change."""
    size = 160 * MIB + 1234
    first = _write(tmp_path / "checkpoint-1" / "model.bin", os.urandom(size))
    _write(tmp_path / "checkpoint-1" / "config.json", b'{"same": true}')
    _save(target, tmp_path / "checkpoint-1")
    second = _write(tmp_path / "checkpoint-2" / "model.bin", _changed(first, [9, 20]))
    _write(tmp_path / "checkpoint-2" / "config.json", b'{"same": true}')

    summary = _save(target, tmp_path / "checkpoint-2")["fields"]

    changed = PART + 1234
    assert summary["bytes_copied"] == size - changed + len(b'{"same": true}')
    assert summary["bytes_sent"] <= size // 10
    assert summary["files_copied"] == 1  # config.json, whole
    if target.proxy is not None:
        assert target.sent("checkpoint-1") >= size  # the counter sees uploads...
        assert target.sent("checkpoint-2") <= size // 10 + 256 * 1024  # ...and only the changed parts went
    assert target.read_object(layout.file_key(JOB, "checkpoint-2", 0, "model.bin")) == second
    assert target.read_object(layout.file_key(JOB, "checkpoint-1", 0, "model.bin")) == first

    dl = tmp_path / "dl"
    load = subprocess.run([AGENT, "load"], env={**target.env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest("proj"))},
                          capture_output=True, text=True, timeout=300)
    assert load.returncode == 0, load.stderr
    assert (dl / "rank-0" / "checkpoint-2" / "model.bin").read_bytes() == second
    verify = subprocess.run([AGENT, "verify", str(dl)], env=target.env, capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_part_whose_crc32c_matches_but_sha256_differs_is_uploaded_not_copied(target, tmp_path, monkeypatch):
    """Every crc32c forced to collide: only sha256 can tell the changed part (and the file) apart."""
    import ckpt_agent.upload.scan as scan

    real = scan.read_part_digests
    monkeypatch.setattr(scan, "read_part_digests",
                        lambda *a, **k: [("00000000", sha) for _, sha in real(*a, **k)])
    first = _write(tmp_path / "checkpoint-1" / "model.bin", os.urandom(3 * PART))
    previous, _ = _commit(target.store, tmp_path / "checkpoint-1")
    second = _write(tmp_path / "checkpoint-2" / "model.bin", _changed(first, [1]))

    manifest, moved = _commit(target.store, tmp_path / "checkpoint-2", previous)

    assert manifest.files[0].parts == previous.files[0].parts  # the crc32c collide: same size, same parts
    assert (moved.sent, moved.copied, moved.files_copied) == (PART, 2 * PART, [])
    assert target.read_object(layout.file_key(JOB, "checkpoint-2", 0, "model.bin")) == second


def test_previous_objects_that_vanished_are_uploaded_instead_of_copied(target, tmp_path):
    first = _write(tmp_path / "checkpoint-1" / "model.bin", os.urandom(3 * PART))
    same = _write(tmp_path / "checkpoint-1" / "same.bin", os.urandom(PART + 5))
    previous, _ = _commit(target.store, tmp_path / "checkpoint-1")
    for path in ("model.bin", "same.bin"):
        target.store.delete(layout.file_key(JOB, "checkpoint-1", 0, path))
    second = _write(tmp_path / "checkpoint-2" / "model.bin", _changed(first, [0]))
    _write(tmp_path / "checkpoint-2" / "same.bin", same)

    _, moved = _commit(target.store, tmp_path / "checkpoint-2", previous)

    assert (moved.copied, moved.files_copied) == (0, [])
    assert target.read_object(layout.file_key(JOB, "checkpoint-2", 0, "model.bin")) == second
    assert target.read_object(layout.file_key(JOB, "checkpoint-2", 0, "same.bin")) == same


def test_a_part_the_store_will_not_copy_is_sent_from_disk_instead(target, tmp_path, monkeypatch):
    """SeaweedFS now and then answers UploadPartCopy with InternalError, past every retry: the same
    bytes are on local disk, so they go up instead of failing the commit."""
    first = _write(tmp_path / "checkpoint-1" / "model.bin", os.urandom(3 * PART))
    previous, _ = _commit(target.store, tmp_path / "checkpoint-1")
    second = _write(tmp_path / "checkpoint-2" / "model.bin", _changed(first, [0]))
    start_upload, refused = target.store.start_upload, []

    def refusing_copies(*args, **kwargs):
        upload = start_upload(*args, **kwargs)

        def copy_part(index: int, *_rest) -> None:
            refused.append(index)
            raise TransientError("copy part failed with InternalError")

        upload.copy_part = copy_part
        return upload

    monkeypatch.setattr(target.store, "start_upload", refusing_copies)
    _, moved = _commit(target.store, tmp_path / "checkpoint-2", previous)

    assert refused and (moved.sent, moved.copied) == (len(second), 0)
    assert target.read_object(layout.file_key(JOB, "checkpoint-2", 0, "model.bin")) == second


def test_a_format_1_previous_manifest_copies_only_whole_files_matched_by_crc32c(target, tmp_path):
    first = _write(tmp_path / "checkpoint-1" / "model.bin", os.urandom(3 * PART))
    same = _write(tmp_path / "checkpoint-1" / "same.bin", os.urandom(PART + 5))
    committed, _ = _commit(target.store, tmp_path / "checkpoint-1")
    format_1 = replace(committed, files=tuple(replace(f, strong=()) for f in committed.files))
    assert format_1.format == 1
    second = _write(tmp_path / "checkpoint-2" / "model.bin", _changed(first, [0]))
    _write(tmp_path / "checkpoint-2" / "same.bin", same)

    _, moved = _commit(target.store, tmp_path / "checkpoint-2", format_1)

    assert (moved.copied, moved.files_copied) == (len(same), ["same.bin"])
    assert moved.sent >= len(second)  # no part of model.bin was copied
    assert target.read_object(layout.file_key(JOB, "checkpoint-2", 0, "model.bin")) == second
    assert target.read_object(layout.file_key(JOB, "checkpoint-2", 0, "same.bin")) == same


def test_a_renamed_file_is_assembled_from_the_parts_of_the_old_one(tmp_path):
    store = LocalStore(str(tmp_path / "store"))
    first = _write(tmp_path / "checkpoint-1" / "model-00001.bin", os.urandom(4 * PART))
    previous, _ = _commit(store, tmp_path / "checkpoint-1")
    second = _write(tmp_path / "checkpoint-2" / "model.bin", _changed(first, [3]))

    _, moved = _commit(store, tmp_path / "checkpoint-2", previous)

    assert (moved.sent, moved.copied) == (PART, 3 * PART)
    assert store.read_bytes(layout.file_key(JOB, "checkpoint-2", 0, "model.bin")) == second


def test_the_sidecar_copies_unchanged_parts_and_its_commit_event_counts_bytes_sent_and_copied(tmp_path):
    import io

    from ckpt_agent.config.sidecar import SyncOptions
    from ckpt_agent.report import JsonReporter
    from ckpt_agent.sync.loop import Sidecar

    store, ckpts = LocalStore(str(tmp_path / "store")), tmp_path / "ckpts"
    first = _write(ckpts / "checkpoint-10" / "model.safetensors", os.urandom(4 * PART))
    _write(ckpts / "checkpoint-20" / "model.safetensors", _changed(first, [2]))
    for step in (10, 20):  # the HF Trainer's marker: written last, the checkpoint is complete
        _write(ckpts / f"checkpoint-{step}" / "trainer_state.json", json.dumps({"global_step": step}).encode())
    out = io.StringIO()
    options = SyncOptions(ckpts, quiet_seconds=0, poll_seconds=0.05, grace_seconds=5)
    sidecar = Sidecar(store, CheckpointId("proj", JOB, "", 0, 1), options, 4, JsonReporter(out))

    assert sidecar.run(once=True).committed == ["checkpoint-10", "checkpoint-20"]

    events = {e["fields"]["checkpoint"]: e for e in map(json.loads, out.getvalue().splitlines())
              if e["event"] == "sync_committed"}
    assert events["checkpoint-10"]["fields"]["bytes_copied"] == 0
    state = len(json.dumps({"global_step": 20}))  # changed from step 10: uploaded
    assert (events["checkpoint-20"]["fields"]["bytes_sent"], events["checkpoint-20"]["fields"]["bytes_copied"]) \
        == (PART + state, 3 * PART)
    assert "8.4 MB sent, 25.2 MB copied inside the store" in events["checkpoint-20"]["message"]
