"""Checkpoint formats: how each is recognised and when it is complete (ckpt_agent.sync.formats and
ckpt_agent.sync.readiness), and the sidecar committing each of them, with small fake files, against the local store.

Real-library tests (transformers, Lightning, DCP, DeepSpeed) live elsewhere; these pin the rules.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from ckpt_agent.config.sidecar import Rules, SyncOptions
from ckpt_agent.report import Reporter
from ckpt_agent.stores import layout
from ckpt_agent.stores.local import LocalStore
from ckpt_agent.stores.manifest import FILE_KIND
from ckpt_agent.sync.formats import Format, Skip, TopEntry, classify, file_structure, folder_format
from ckpt_agent.sync.loop import Sidecar
from ckpt_agent.sync.readiness import Facts, NotReady, Trainer, Why, readiness
from ckpt_agent.upload.commit import CheckpointId

REG, DIR, LNK, FIFO = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777, stat.S_IFIFO | 0o644


def torch_like_zip(n: int = 5, size: int = 50_000) -> bytes:
    """What torch.save writes: a zip whose central directory and end record come last."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02pickle" * 10)
        z.writestr("archive/data/0", os.urandom(size + n))
    return buf.getvalue()


def safetensors_bytes(payload: int = 4000) -> bytes:
    header = json.dumps({"w": {"dtype": "U8", "shape": [payload], "data_offsets": [0, payload]}}).encode()
    return struct.pack("<Q", len(header)) + header + os.urandom(payload)


def structure_of(name: str, data: bytes) -> str | None:
    return file_structure(name, len(data), data[:8 + 4096], data[-(65536 + 22):])


# -- pure rules ------------------------------------------------------------------------------------


def test_top_level_entries_are_checkpoints_or_reported_with_a_reason():
    entries = [TopEntry("checkpoint-10", DIR), TopEntry("ckpt-5.pt", REG), TopEntry("epoch=0-step=5.ckpt", REG),
               TopEntry("model.safetensors", REG), TopEntry("notes.txt", REG), TopEntry(".tmp", REG),
               TopEntry("latest", REG), TopEntry("zero_to_fp32.py", REG), TopEntry("pipe", FIFO),
               TopEntry("last.ckpt", LNK, "epoch=0-step=5.ckpt"), TopEntry("creds", LNK, ""),
               TopEntry("gone", LNK, None)]
    found, skipped = classify(entries, "/ckpts")
    assert [(c.name, c.is_file) for c in found] == [
        ("checkpoint-10", False), ("ckpt-5.pt", True), ("epoch=0-step=5.ckpt", True), ("model.safetensors", True)]
    assert {s.name: s.skip for s in skipped} == {
        "notes.txt": Skip.OTHER_FILE, ".tmp": Skip.HIDDEN, "latest": Skip.DEEPSPEED_FILE,
        "zero_to_fp32.py": Skip.DEEPSPEED_FILE, "pipe": Skip.SPECIAL, "last.ckpt": Skip.LINK_INSIDE,
        "creds": Skip.LINK_OUTSIDE, "gone": Skip.DANGLING}
    assert "epoch=0-step=5.ckpt, which is uploaded under its own name" in str(
        next(s for s in skipped if s.name == "last.ckpt"))


def test_folders_are_recognised_by_what_is_in_them_even_half_written():
    none = Rules()
    assert folder_format("checkpoint-20", ("model.safetensors",), none, None) is Format.HF
    assert folder_format("out", ("trainer_state.json",), none, None) is Format.HF
    assert folder_format("step-5", ("__0_0.distcp",), none, None) is Format.DCP
    assert folder_format("global_step5", ("mp_rank_00_model_states.pt",), none, None) is Format.DEEPSPEED
    assert folder_format("mytag", ("x",), none, "mytag") is Format.DEEPSPEED
    assert folder_format("weights", ("a.npy",), none, None) is Format.UNKNOWN
    assert folder_format("checkpoint-20", ("x",), Rules(markers=("DONE",)), None) is Format.MARKER


def facts(fmt: Format, **kw) -> Facts:
    return Facts(**{"format": fmt, "files": ("a",), "quiet": True, **kw})


@pytest.mark.parametrize("fmt, kw, expected", [
    (Format.HF, {"markers": {"trainer_state.json": None}}, Why.NO_MARKER),
    (Format.HF, {"markers": {"trainer_state.json": b'{"global_st'}}, Why.BAD_MARKER),
    (Format.HF, {"markers": {"trainer_state.json": b"{}"}}, None),
    (Format.DCP, {"markers": {".metadata": None}}, Why.NO_MARKER),
    (Format.DCP, {"markers": {".metadata": b""}}, Why.NO_MARKER),
    (Format.DCP, {"markers": {".metadata": b"\x80\x04pickled"}}, None),
    (Format.DEEPSPEED, {"name": "global_step10", "deepspeed_latest": "global_step5"}, Why.NOT_NAMED),
    (Format.DEEPSPEED, {"name": "global_step10", "deepspeed_latest": None}, Why.NOT_NAMED),
    (Format.DEEPSPEED, {"name": "global_step10", "deepspeed_latest": "global_step10"}, None),
    (Format.DEEPSPEED, {"name": "global_step5", "deepspeed_latest": "global_step10"}, None),
    (Format.FILE, {"structure": "no zip end record"}, Why.TRUNCATED),
    (Format.FILE, {"structure": ""}, None),
    (Format.FILE, {"structure": None}, None),
    (Format.FILE, {"structure": None, "blind": True}, Why.UNKNOWN_WAITING),
    (Format.UNKNOWN, {}, Why.UNKNOWN_WAITING),
    (Format.HF, {"quiet": False}, Why.WRITING),
    (Format.HF, {"writing": "model.safetensors", "markers": {"trainer_state.json": b"{}"}}, Why.OPEN),
    (Format.HF, {"files": ()}, Why.EMPTY),
])
def test_each_format_is_complete_only_by_its_own_rule(fmt, kw, expected):
    why = readiness(facts(fmt, **kw), Rules(), Trainer.UNSUPERVISED)
    assert (why.why if why else None) is expected


def test_a_folder_of_no_known_format_is_complete_only_after_the_trainer_exited_0_or_by_opt_in():
    unknown = facts(Format.UNKNOWN)
    assert readiness(unknown, Rules(), Trainer.RUNNING).why is Why.UNKNOWN_WAITING
    assert readiness(unknown, Rules(), Trainer.FAILED).why is Why.UNKNOWN_FAILED
    assert readiness(unknown, Rules(), Trainer.EXITED_OK) is None
    assert readiness(unknown, Rules(commit_on_quiet=True), Trainer.RUNNING) is None
    # The opt-in never reaches a known format: a DCP folder without .metadata stays uncommitted.
    dcp = facts(Format.DCP, markers={".metadata": None})
    assert readiness(dcp, Rules(commit_on_quiet=True), Trainer.EXITED_OK).why is Why.NO_MARKER


def test_user_markers_any_of_them_completes_a_folder():
    rules = Rules(markers=("DONE", "state.json"))
    assert readiness(facts(Format.MARKER, markers={"DONE": None, "state.json": None}), rules,
                     Trainer.EXITED_OK).why is Why.NO_MARKER
    assert readiness(facts(Format.MARKER, markers={"DONE": b"", "state.json": None}), rules, Trainer.RUNNING) is None
    assert readiness(facts(Format.MARKER, markers={"DONE": None, "state.json": b"{"}), rules,
                     Trainer.RUNNING).why is Why.BAD_MARKER


def test_the_final_flush_skips_the_quiet_period_only_when_it_can_see_no_writer():
    loud = facts(Format.HF, quiet=False, markers={"trainer_state.json": b"{}"})
    assert readiness(loud, Rules(), Trainer.EXITED_OK, flushing=True) is None
    assert readiness(loud, Rules(), Trainer.FAILED, flushing=True) is None
    assert readiness(loud, Rules(), Trainer.RUNNING, flushing=True).why is Why.WRITING
    assert readiness(facts(Format.HF, quiet=False, blind=True), Rules(), Trainer.EXITED_OK,
                     flushing=True).why is Why.WRITING
    assert readiness(facts(Format.HF, quiet=False, writing="w"), Rules(), Trainer.EXITED_OK,
                     flushing=True).why is Why.WRITING


def test_reasons_that_may_still_finish_depend_on_the_trainer():
    assert NotReady(Why.NO_MARKER, "x").may_still_finish(Trainer.RUNNING)
    assert not NotReady(Why.NO_MARKER, "x").may_still_finish(Trainer.EXITED_OK)
    assert NotReady(Why.WRITING).may_still_finish(Trainer.FAILED)
    assert not NotReady(Why.UNSAFE, "x").may_still_finish(Trainer.RUNNING)
    assert str(NotReady(Why.NO_MARKER, "trainer_state.json")) == "incomplete: no trainer_state.json"


def test_a_torch_save_zip_is_complete_only_with_its_end_record_at_the_end():
    data = torch_like_zip()
    assert structure_of("ckpt-5.pt", data) == ""
    for cut in (4, 100, len(data) // 2, len(data) - 23, len(data) - 1):
        assert structure_of("ckpt-5.pt", data[:cut]), cut
    assert structure_of("ckpt-5.pt", data + b"appended") != ""
    assert structure_of("ckpt-5.pt", b"PK") != ""
    assert structure_of("legacy.pt", b"\x80\x02legacy pickle") is None


def test_a_safetensors_file_is_complete_only_at_the_length_its_header_says():
    data = safetensors_bytes()
    assert structure_of("model.safetensors", data) == ""
    for cut in (3, 8, 20, len(data) - 1):
        assert structure_of("model.safetensors", data[:cut]), cut
    assert structure_of("model.safetensors", b"\x04\x00\x00\x00\x00\x00\x00\x00nope") != ""


# -- the sidecar, in-process, against a local store --------------------------------------------------


def run_once(tmp_path: Path, ckpts: Path, trainer_status: int | None = None, **rules) -> tuple[Sidecar, str]:
    """One pass, as `sync --once` (or a supervised flush after the trainer exited with `trainer_status`)."""
    out = io.StringIO()
    opts = SyncOptions(ckpts, quiet_seconds=0, poll_seconds=0.05, grace_seconds=5, rules=Rules(**rules))
    sidecar = Sidecar(LocalStore(str(tmp_path / "store")), CheckpointId("proj", "job-1", "", 0, 1), opts, 2,
                      Reporter(out))
    if trainer_status is not None:
        sidecar.trainer_started(os.getpid())
        sidecar.finish(None, wait_for_writers=False, trainer_status=trainer_status)
        sidecar.run()
    else:
        sidecar.run(once=True)
    return sidecar, out.getvalue()


def stored(tmp_path: Path, name: str) -> dict | None:
    path = tmp_path / "store" / layout.manifest_key("job-1", name, 0)
    return json.loads(path.read_text()) if path.exists() else None


def test_single_file_checkpoints_are_committed_as_one_file_and_a_truncated_one_is_not(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    data = torch_like_zip()
    (ckpts / "ckpt-5.pt").write_bytes(data)
    (ckpts / "model.safetensors").write_bytes(safetensors_bytes())
    (ckpts / "ckpt-10.pt").write_bytes(data[: len(data) // 2])  # a crashed torch.save
    sidecar, log = run_once(tmp_path, ckpts)
    assert sidecar.result.committed == ["ckpt-5.pt", "model.safetensors"]
    manifest = stored(tmp_path, "ckpt-5.pt")
    assert manifest["kind"] == FILE_KIND and [f["path"] for f in manifest["files"]] == ["ckpt-5.pt"]
    assert sidecar.result.not_committed["ckpt-10.pt"].why is Why.TRUNCATED
    assert "ckpt-10.pt NOT committed: incomplete: no zip end record" in log
    assert stored(tmp_path, "ckpt-10.pt") is None


def test_lightning_last_ckpt_link_is_reported_and_its_target_uploaded_once(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "epoch=0-step=5.ckpt").write_bytes(torch_like_zip())
    (ckpts / "last.ckpt").symlink_to("epoch=0-step=5.ckpt")
    sidecar, log = run_once(tmp_path, ckpts)
    assert sidecar.result.committed == ["epoch=0-step=5.ckpt"]
    assert sidecar.result.left_out.keys() == {"last.ckpt"}
    assert log.count("last.ckpt is not uploaded: a symlink to epoch=0-step=5.ckpt") == 1
    assert "left out (not uploaded): 1 (last.ckpt)" in log


def test_dcp_folder_without_metadata_is_never_committed_even_on_quiet_alone(tmp_path):
    ckpts = tmp_path / "ckpts"
    for name, done in (("step-5", True), ("step-10", False)):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "__0_0.distcp").write_bytes(os.urandom(1000))
        if done:
            (ckpts / name / ".metadata").write_bytes(b"\x80\x04metadata")
    sidecar, log = run_once(tmp_path, ckpts, commit_on_quiet=True)
    assert sidecar.result.committed == ["step-5"]
    assert str(sidecar.result.not_committed["step-10"]) == "incomplete: no .metadata"
    assert any(f["path"] == ".metadata" for f in stored(tmp_path, "step-5")["files"])


def test_deepspeed_tag_folders_are_committed_once_latest_names_them(tmp_path):
    ckpts = tmp_path / "ckpts"
    for step in (5, 10, 15):
        tag = ckpts / f"global_step{step}"
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(torch_like_zip(step))
    (ckpts / "latest").write_text("global_step10")
    (ckpts / "zero_to_fp32.py").write_text("# helper")
    sidecar, log = run_once(tmp_path, ckpts)
    assert sidecar.result.committed == ["global_step5", "global_step10"]
    assert sidecar.result.not_committed["global_step15"].why is Why.NOT_NAMED
    assert sidecar.result.left_out.keys() == {"latest", "zero_to_fp32.py"}
    assert "left out (not uploaded): 2" in log


@pytest.mark.parametrize("status, committed", [(None, False), (1, False), (0, True)])
def test_a_folder_of_no_known_format_waits_for_the_trainer_to_exit_0(tmp_path, status, committed):
    ckpts = tmp_path / "ckpts"
    (ckpts / "weights").mkdir(parents=True)
    (ckpts / "weights" / "a.npy").write_bytes(b"x" * 100)
    sidecar, log = run_once(tmp_path, ckpts, trainer_status=status)
    assert (stored(tmp_path, "weights") is not None) is committed
    if not committed:
        assert "weights NOT committed: a folder of no known format" in log
        assert "--complete-file" in log and "quiet alone" not in log


def test_user_given_complete_files_decide_for_every_folder(tmp_path):
    ckpts = tmp_path / "ckpts"
    for name, marker in (("a", "DONE"), ("b", "ok.json"), ("c", None)):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "w.bin").write_bytes(b"w")
        if marker:
            (ckpts / name / marker).write_text("{}")
    sidecar, _ = run_once(tmp_path, ckpts, markers=("DONE", "ok.json"))
    assert sidecar.result.committed == ["a", "b"]
    assert str(sidecar.result.not_committed["c"]) == "incomplete: no DONE or ok.json"


def test_a_committed_single_file_rewritten_in_place_is_reported_not_lost_silently(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "last.ckpt").write_bytes(torch_like_zip(1))
    out = io.StringIO()
    opts = SyncOptions(ckpts, quiet_seconds=0, poll_seconds=0.05, grace_seconds=5)
    sidecar = Sidecar(LocalStore(str(tmp_path / "store")), CheckpointId("proj", "job-1", "", 0, 1), opts, 2,
                      Reporter(out))
    assert sidecar._pass(finishing=False) == {}
    (ckpts / "last.ckpt").write_bytes(torch_like_zip(2))
    sidecar._pass(finishing=False)
    sidecar._pass(finishing=False)
    assert out.getvalue().count("last.ckpt is not uploaded again: rewritten after it was committed") == 1
    assert "last.ckpt" in sidecar.result.left_out
