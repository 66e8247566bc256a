"""BT_CHECKPOINT_STORE is one of a few exact forms; anything else is refused before anything is
written, in particular never taken as a folder in the working directory (where `s3:/typo-bucket`
once made `save` commit into ./s3:, which disappears with the container)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.helpers import AGENT, assert_one_line_failure, clean_env
from tests.support.specs import latest, spec

MALFORMED = ["s3:/typo-bucket", "S3://bucket/x", "bucket/x", "relative/store", "./store", "store",
             "s3:bucket", "file:/srv/x", "Baseten"]
FORMS = "s3://bucket[/prefix], baseten, file:///absolute/path or an absolute path"


def _run(args: list[str], cwd: Path, store: str, dl: Path) -> subprocess.CompletedProcess[str]:
    env = clean_env(BT_CHECKPOINT_STORE=store, BT_TRAINING_PROJECT_NAME="proj", BT_TRAINING_JOB_ID="job-1",
                    BT_LOAD_CHECKPOINT_CONFIG=spec(dl, latest("proj")))
    return subprocess.run([AGENT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("store", MALFORMED)
@pytest.mark.parametrize("command", ["save", "sync", "load", "ls"])
def test_malformed_store_value_is_refused_in_one_line_and_nothing_is_written_in_the_working_directory(
        store, command, tmp_path):
    work, ckpt, dl = tmp_path / "cwd", tmp_path / "checkpoint-1", tmp_path / "dl"
    work.mkdir()
    ckpt.mkdir()
    (ckpt / "model.bin").write_bytes(b"weights")
    args = {"save": ["save", str(ckpt)], "sync": ["sync", "--once", "--checkpoint-dir", str(tmp_path)],
            "load": ["load"], "ls": ["ls"]}[command]
    result = _run(args, work, store, dl)
    assert_one_line_failure(result, 2, "BT_CHECKPOINT_STORE", FORMS)
    assert list(work.iterdir()) == []
    assert not dl.exists()
