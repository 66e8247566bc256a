"""`ckpt-agent verify`: a download folder re-read against the manifests its load recorded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ckpt_agent.stores import layout
from tests.support.helpers import clean_env, run_agent, save
from tests.support.specs import named, spec

JOB = "job-a"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with job-a/checkpoint-1 (a 20 MiB file: three 8 MiB parts) and checkpoint-2."""
    base = tmp_path_factory.mktemp("verify-template")
    env = clean_env(BT_CHECKPOINT_STORE=f"file://{base / 'store'}")
    for name, size in (("checkpoint-1", 20 << 20), ("checkpoint-2", 1000)):
        folder = base / "src" / name
        (folder / "sub").mkdir(parents=True)
        (folder / "model.bin").write_bytes(os.urandom(size))
        (folder / "sub" / "state.pt").write_bytes(os.urandom(100))
        (folder / "empty").write_bytes(b"")
        save(env, folder, JOB, name)
    return base


@pytest.fixture
def loaded(template: Path, tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Both checkpoints loaded into tmp_path/dl; the env names that folder in its spec."""
    shutil.copytree(template / "store", tmp_path / "store")
    dl = tmp_path / "dl"
    env = clean_env(BT_CHECKPOINT_STORE=f"file://{tmp_path / 'store'}",
                    BT_LOAD_CHECKPOINT_CONFIG=spec(dl, named("checkpoint-1", JOB), named("checkpoint-2", JOB)))
    result = run_agent(["load"], env)
    assert result.returncode == 0, result.stderr
    return env, dl


def statuses(stdout: str) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in stdout.splitlines()}


def test_verify_after_a_load_reports_every_file_ok_and_exits_0(loaded):
    env, dl = loaded
    result = run_agent(["verify", str(dl)], env)
    assert result.returncode == 0, result.stderr
    assert statuses(result.stdout) == {f"rank-0/checkpoint-{n}/{f}": "ok"
                                       for n in (1, 2) for f in ("model.bin", "sub/state.pt", "empty")}
    assert "2 checkpoints, 6 ok" in result.stderr


def test_verify_reports_missing_changed_and_extra_files_and_exits_5(loaded):
    env, dl = loaded
    ckpt = dl / "rank-0" / "checkpoint-1"
    (ckpt / "sub" / "state.pt").unlink()
    model = ckpt / "model.bin"
    st = model.stat()
    with open(model, "r+b") as f:  # one flipped byte in the last part, size and mtime kept
        f.seek((17 << 20) + 5)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    (ckpt / "notes.txt").write_text("added by hand")
    (ckpt / "empty.ckpt-incomplete").write_bytes(b"x")
    (dl / "rank-0" / "checkpoint-2" / "link").symlink_to("/etc/hostname")
    result = run_agent(["verify", str(dl)], env)
    assert result.returncode == 5
    assert statuses(result.stdout) == {
        "rank-0/checkpoint-1/model.bin": "changed", "rank-0/checkpoint-1/sub/state.pt": "missing",
        "rank-0/checkpoint-1/notes.txt": "extra", "rank-0/checkpoint-1/empty.ckpt-incomplete": "extra",
        "rank-0/checkpoint-1/empty": "ok", "rank-0/checkpoint-2/link": "extra",
        **{f"rank-0/checkpoint-2/{f}": "ok" for f in ("model.bin", "sub/state.pt", "empty")},
    }
    assert "first at byte 16777216" in result.stdout  # the third 8 MiB part
    assert "1 missing, 1 changed, 3 extra" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_load_repairs_what_verify_found_missing_or_changed(loaded):
    env, dl = loaded
    (dl / "rank-0" / "checkpoint-2" / "model.bin").write_bytes(b"tampered")
    (dl / "rank-0" / "checkpoint-1" / "empty").unlink()
    assert run_agent(["verify", str(dl)], env).returncode == 5
    assert run_agent(["load"], env).returncode == 0
    assert run_agent(["verify", str(dl)], env).returncode == 0


def test_verify_without_a_folder_checks_the_spec_download_folder(loaded):
    env, dl = loaded
    (dl / "rank-0" / "checkpoint-2" / "empty").unlink()
    result = run_agent(["verify"], env)
    assert result.returncode == 5
    assert statuses(result.stdout)["rank-0/checkpoint-2/empty"] == "missing"


def test_verify_of_a_folder_no_load_wrote_fails_with_not_found(tmp_path):
    result = run_agent(["verify", str(tmp_path)], clean_env())
    assert result.returncode == 3
    assert "loaded-rank-0.json" in result.stderr and len(result.stderr.splitlines()) == 1


def test_verify_flags_a_recorded_manifest_that_was_edited(loaded):
    env, dl = loaded
    recorded = dl / ".ckpt-agent" / "manifests" / "rank-0" / "checkpoint-2.json"
    manifest = json.loads(recorded.read_text())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != "model.bin"]
    recorded.write_text(json.dumps(manifest))
    result = run_agent(["verify", str(dl)], env)
    assert result.returncode == 5
    assert statuses(result.stdout)[".ckpt-agent/manifests/rank-0/checkpoint-2.json"] == "changed"


def test_load_records_the_manifests_exactly_as_the_store_served_them(loaded, tmp_path):
    _, dl = loaded
    for name in ("checkpoint-1", "checkpoint-2"):
        recorded = dl / ".ckpt-agent" / "manifests" / "rank-0" / f"{name}.json"
        assert recorded.read_bytes() == (tmp_path / "store" / layout.manifest_key("job-a", name, 0)).read_bytes()


def test_a_later_load_verifies_only_what_it_loaded(loaded):
    env, dl = loaded
    env = {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, named("checkpoint-2", JOB))}
    assert run_agent(["load"], env).returncode == 0
    assert [p.name for p in (dl / ".ckpt-agent" / "manifests" / "rank-0").iterdir()] == ["checkpoint-2.json"]
    result = run_agent(["verify", "--json", str(dl)], env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checkpoints"] == ["rank-0/checkpoint-2"]
    assert report["counts"] == {"ok": 3, "missing": 0, "changed": 0, "extra": 0, "excluded": 0}
    assert {f["status"] for f in report["files"]} == {"ok"}
