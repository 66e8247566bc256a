"""Links and special files in a checkpoint (issue 10 item 8): `save` refuses them with one line naming
the file, `sync` reports the checkpoint as not committed with the reason, a link is never read
through to outside (a credentials file must never reach the store), and a FIFO never hangs."""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ckpt_agent.config.sidecar import SyncOptions
from ckpt_agent.errors import CheckpointChanged, ConfigError, UnsafeEntry
from ckpt_agent.report import Reporter
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.stores import layout
from ckpt_agent.stores.local import LocalStore
from ckpt_agent.sync.loop import Sidecar
from ckpt_agent.sync.readiness import Why
from ckpt_agent.upload.commit import CheckpointId, CommitRequest, commit_checkpoint
from ckpt_agent.upload.scan import scan_checkpoint
from tests.support.helpers import AGENT, clean_env

SECRET = b"aws_secret_access_key = SECRETSECRETSECRET\n"


def hf_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(5000))
    (folder / "trainer_state.json").write_text('{"global_step": 5}')
    return folder


def link_out(ckpt: Path, tmp: Path) -> str:
    (tmp / "credentials").write_bytes(SECRET)
    (ckpt / "creds").symlink_to(tmp / "credentials")
    return "creds"


def dangling(ckpt: Path, tmp: Path) -> str:
    (ckpt / "gone.bin").symlink_to(tmp / "nothing-here")
    return "gone.bin"


def linked_folder(ckpt: Path, tmp: Path) -> str:
    (tmp / "outside").mkdir()
    (tmp / "outside" / "cfg").write_bytes(SECRET)
    (ckpt / "sub").symlink_to(tmp / "outside")
    return "sub"


def fifo(ckpt: Path, tmp: Path) -> str:
    os.mkfifo(ckpt / "pipe")
    return "pipe"


def nested_link_out(ckpt: Path, tmp: Path) -> str:
    (ckpt / "deep" / "er").mkdir(parents=True)
    (tmp / "credentials").write_bytes(SECRET)
    (ckpt / "deep" / "er" / "key").symlink_to(tmp / "credentials")
    return "deep/er/key"


PLANTS: dict[str, Callable[[Path, Path], str]] = {
    "link to a file outside": link_out, "dangling link": dangling, "symlinked folder": linked_folder,
    "FIFO": fifo, "link out, two folders deep": nested_link_out}


def store_holds_secret(store: Path) -> bool:
    return any(SECRET in p.read_bytes() for p in store.rglob("*") if p.is_file())


def agent_env(store: Path, ckpts: Path | None = None) -> dict[str, str]:
    env = clean_env(BT_CHECKPOINT_STORE=f"file://{store}", BT_TRAINING_JOB_ID="job-1",
                    BT_TRAINING_PROJECT_NAME="proj", CKPT_AGENT_QUIET_SECONDS="0")
    if ckpts is not None:
        env["BT_CHECKPOINT_DIR"] = str(ckpts)
    return env


@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
def test_save_refuses_a_link_or_special_file_with_one_line_naming_it_and_uploads_nothing(tmp_path, plant):
    ckpt = hf_checkpoint(tmp_path / "checkpoint-5")
    rel = plant(ckpt, tmp_path)
    store = tmp_path / "store"
    result = subprocess.run([AGENT, "save", str(ckpt)], env=agent_env(store), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == ConfigError.exit_code, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"checkpoint-5/{rel}" in result.stderr
    assert not store_holds_secret(store) if store.exists() else True
    assert not (store / layout.manifest_key("job-1", "checkpoint-5", 0)).exists()


@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
def test_sync_reports_a_checkpoint_holding_a_link_or_special_file_as_not_committed_with_the_reason(
        tmp_path, plant):
    ckpts = tmp_path / "ckpts"
    ckpt = hf_checkpoint(ckpts / "checkpoint-5")
    hf_checkpoint(ckpts / "checkpoint-10")
    rel = plant(ckpt, tmp_path)
    result = subprocess.run([AGENT, "sync", "--once"], env=agent_env(tmp_path / "store", ckpts),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(f"checkpoint-5 is not uploaded while it holds {ckpt / rel}") == 1, result.stderr
    assert f"checkpoint-5 NOT committed: holds what cannot be uploaded safely: {ckpt / rel}" in result.stderr
    assert "not committed: 1;" in result.stderr and "committed this run: checkpoint-10;" in result.stderr
    assert not store_holds_secret(tmp_path / "store")


def test_a_link_to_a_file_inside_the_checkpoint_is_uploaded_as_a_copy_of_it(tmp_path):
    ckpt = hf_checkpoint(tmp_path / "checkpoint-5")
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "weights.bin").symlink_to("../model.safetensors")
    files = {f.rel: f for f in scan_checkpoint(ckpt)}
    assert files["sub/weights.bin"].path == ckpt.resolve() / "model.safetensors"
    store = LocalStore(str(tmp_path / "store"))
    commit_checkpoint(store, CommitRequest(ckpt, CheckpointId("proj", "job-1", "checkpoint-5"), 2),
                      lambda n: None, Cancel())
    key = layout.file_key("job-1", "checkpoint-5", 0, "sub/weights.bin")
    assert store.read_bytes(key) == (ckpt / "model.safetensors").read_bytes()


def test_a_file_swapped_for_a_link_out_after_the_scan_is_not_read_through(tmp_path):
    ckpt = hf_checkpoint(tmp_path / "checkpoint-5")
    scanned = scan_checkpoint(ckpt)
    (tmp_path / "credentials").write_bytes(SECRET)
    os.unlink(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").symlink_to(tmp_path / "credentials")
    store = LocalStore(str(tmp_path / "store"))
    with pytest.raises((CheckpointChanged, UnsafeEntry)):
        commit_checkpoint(store, CommitRequest(ckpt, CheckpointId("proj", "job-1", "checkpoint-5"), 2,
                                               expected=scanned), lambda n: None, Cancel())
    assert not store_holds_secret(tmp_path / "store")


def test_a_file_swapped_for_a_fifo_during_the_upload_does_not_hang_it(tmp_path):
    ckpt = hf_checkpoint(tmp_path / "checkpoint-5")

    class Swapping(LocalStore):
        def start_upload(self, key: str, size: int):
            if key.endswith("model.safetensors") and not (ckpt / "model.safetensors").is_fifo():
                os.unlink(ckpt / "model.safetensors")
                os.mkfifo(ckpt / "model.safetensors")
            return super().start_upload(key, size)

    with pytest.raises(CheckpointChanged):
        commit_checkpoint(Swapping(str(tmp_path / "store")),
                          CommitRequest(ckpt, CheckpointId("proj", "job-1", "checkpoint-5"), 1),
                          lambda n: None, Cancel())


def test_a_fifo_at_the_top_level_or_as_a_complete_file_never_hangs_the_sidecar(tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    os.mkfifo(ckpts / "pipe.pt")
    (ckpts / "checkpoint-5").mkdir()
    (ckpts / "checkpoint-5" / "w.bin").write_bytes(b"w")
    os.mkfifo(ckpts / "checkpoint-5" / "trainer_state.json")
    out = io.StringIO()
    sidecar = Sidecar(LocalStore(str(tmp_path / "store")), CheckpointId("proj", "job-1", "", 0, 1),
                      SyncOptions(ckpts, quiet_seconds=0), 2, Reporter(out))
    result = sidecar.run(once=True)
    assert result.left_out.keys() == {"pipe.pt"} and "not a regular file or folder (a FIFO)" in out.getvalue()
    assert result.not_committed["checkpoint-5"].why is Why.UNSAFE


def test_a_checkpoint_deleted_just_before_its_commit_is_a_change_not_a_crash(tmp_path):
    with pytest.raises(CheckpointChanged):
        commit_checkpoint(LocalStore(str(tmp_path / "store")),
                          CommitRequest(tmp_path / "checkpoint-5", CheckpointId("proj", "job-1", "checkpoint-5"), 1),
                          lambda n: None, Cancel())
