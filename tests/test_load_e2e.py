"""End to end: the installed `ckpt-agent` command against the local store and real SeaweedFS."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ckpt_agent.stores import layout
from tests.support.helpers import StoreUnderTest, clean_env, run_agent, same_tree, save
from tests.support.specs import latest, named, spec


def base_env(store: StoreUnderTest, tmp_path: Path) -> dict[str, str]:
    return clean_env(**store.env, BT_TRAINING_PROJECT_NAME="proj")


def make_checkpoint(folder: Path, step: int, size: int = 3_000_000) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(size))
    (folder / "optimizer").mkdir()
    (folder / "optimizer" / "state.pt").write_bytes(os.urandom(1000 + step))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "empty.txt").write_bytes(b"")
    return folder


@pytest.fixture
def two_jobs(store: StoreUnderTest, tmp_path: Path) -> dict[str, Path]:
    """job-a (older) has checkpoint-10; job-b (newer) has checkpoint-20 and checkpoint-100."""
    env = base_env(store, tmp_path)
    src = tmp_path / "src"
    folders = {
        "a/checkpoint-10": make_checkpoint(src / "a" / "checkpoint-10", 10),
        "b/checkpoint-20": make_checkpoint(src / "b" / "checkpoint-20", 20),
        "b/checkpoint-100": make_checkpoint(src / "b" / "checkpoint-100", 100),
    }
    save(env, folders["a/checkpoint-10"], "job-a", "checkpoint-10")
    save(env, folders["b/checkpoint-20"], "job-b", "checkpoint-20")
    save(env, folders["b/checkpoint-100"], "job-b", "checkpoint-100")
    return folders


def test_run_loads_latest_of_project_and_execs_with_load_dir_set(store, two_jobs, tmp_path):
    dl = tmp_path / "dl"
    env = {**base_env(store, tmp_path), "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest("proj"))}
    result = run_agent(["run", "--", "sh", "-c", 'echo "dir=$BT_LOAD_CHECKPOINT_DIR"'], env)
    assert result.returncode == 0, result.stderr
    assert f"dir={dl}" in result.stdout
    assert same_tree(dl / "rank-0" / "checkpoint-100", two_jobs["b/checkpoint-100"])
    assert sorted(p.name for p in (dl / "rank-0").iterdir()) == ["checkpoint-100"]


def test_load_latest_of_job_and_named_checkpoint(store, two_jobs, tmp_path):
    dl = tmp_path / "dl"
    refs = (latest(job_id="job-a"), named("checkpoint-20", "job-b"))
    env = {**base_env(store, tmp_path), "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, *refs)}
    result = run_agent(["load"], env)
    assert result.returncode == 0, result.stderr
    assert same_tree(dl / "rank-0" / "checkpoint-10", two_jobs["a/checkpoint-10"])
    assert same_tree(dl / "rank-0" / "checkpoint-20", two_jobs["b/checkpoint-20"])


def test_latest_ignores_a_checkpoint_whose_manifest_is_missing(store, two_jobs, tmp_path):
    store.delete(layout.manifest_key("job-b", "checkpoint-100", 0))
    dl = tmp_path / "dl"
    env = {**base_env(store, tmp_path), "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest())}
    result = run_agent(["load"], env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (dl / "rank-0").iterdir()) == ["checkpoint-20"]


def test_changed_byte_in_store_is_caught_and_command_never_runs(store, two_jobs, tmp_path):
    key = layout.file_key("job-b", "checkpoint-100", 0, "model.safetensors")
    data = bytearray(store.read(key))
    data[len(data) // 2] ^= 0xFF
    store.write(key, bytes(data))
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    env = {**base_env(store, tmp_path), "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest("proj"))}
    result = run_agent(["run", "--", "touch", str(marker)], env)
    assert result.returncode == 5, result.stderr
    assert "model.safetensors" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
    assert not (dl / "rank-0" / "checkpoint-100" / "model.safetensors").exists()


def test_manifest_path_with_dotdot_is_refused_and_nothing_lands_outside(store, two_jobs, tmp_path):
    key = layout.manifest_key("job-b", "checkpoint-100", 0)
    manifest = json.loads(store.read(key))
    manifest["files"][0]["path"] = "../../../escaped.bin"
    store.write(key, json.dumps(manifest).encode())
    dl = tmp_path / "deep" / "dl"
    env = {**base_env(store, tmp_path), "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest("proj"))}
    result = run_agent(["run", "--", "true"], env)
    assert result.returncode == 5
    assert "escaped.bin" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("escaped.bin"))


def test_named_checkpoint_that_is_not_there_fails_with_not_found(store, two_jobs, tmp_path):
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    env = {**base_env(store, tmp_path), "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, named("checkpoint-7", "job-b"))}
    result = run_agent(["run", "--", "touch", str(marker)], env)
    assert result.returncode == 3
    assert "checkpoint-7" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_second_start_with_intact_files_downloads_nothing(store, two_jobs, tmp_path):
    dl = tmp_path / "dl"
    env = {**base_env(store, tmp_path), "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest("proj"))}
    assert run_agent(["load"], env).returncode == 0
    second = run_agent(["load"], env)
    assert second.returncode == 0, second.stderr
    assert "fetched 0 files (0 B), 4 already intact" in second.stderr


def test_locally_damaged_file_is_refetched(store, two_jobs, tmp_path):
    dl = tmp_path / "dl"
    env = {**base_env(store, tmp_path), "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest("proj"))}
    assert run_agent(["load"], env).returncode == 0
    target = dl / "rank-0" / "checkpoint-100" / "model.safetensors"
    with open(target, "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 10)
    result = run_agent(["load"], env)
    assert result.returncode == 0, result.stderr
    assert same_tree(dl / "rank-0" / "checkpoint-100", two_jobs["b/checkpoint-100"])


def test_latest_that_finds_nothing_warns_and_starts_training(store, tmp_path):
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    env = {**base_env(store, tmp_path), "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest("new-project"))}
    result = run_agent(["run", "--", "touch", str(marker)], env)
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "new-project" in result.stderr
    assert marker.exists()


def test_required_latest_that_finds_nothing_is_fatal(store, tmp_path):
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    env = {**base_env(store, tmp_path), "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest("new-project")),
           "BT_LOAD_CHECKPOINT_REQUIRED": "1"}
    result = run_agent(["run", "--", "touch", str(marker)], env)
    assert result.returncode == 3
    assert "BT_LOAD_CHECKPOINT_REQUIRED" in result.stderr
    assert not marker.exists()


def many_small_files(folder: Path, count: int = 40) -> Path:
    for i in range(count):
        sub = folder / f"shard-{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"tensor-{i:03d}.bin").write_bytes(os.urandom(1000 + 97 * i))
    (folder / "big.bin").write_bytes(os.urandom(3 << 20))
    return folder


def test_small_files_travel_in_packs_and_still_exist_one_by_one(store, tmp_path):
    env = base_env(store, tmp_path)
    src = many_small_files(tmp_path / "src" / "checkpoint-5")
    save(env, src, "job-p", "checkpoint-5")
    manifest = json.loads(store.read(layout.manifest_key("job-p", "checkpoint-5", 0)))
    assert manifest["packs"] and all("pack" in f for f in manifest["files"] if f["path"] != "big.bin")
    assert store.read(layout.file_key("job-p", "checkpoint-5", 0, "shard-1/tensor-001.bin")) == (
        src / "shard-1" / "tensor-001.bin").read_bytes()
    dl = tmp_path / "dl"
    env["BT_LOAD_CHECKPOINT_CONFIG"] = spec(dl, named("checkpoint-5", "job-p"))
    result = run_agent(["load"], env)
    assert result.returncode == 0, result.stderr
    assert same_tree(dl / "rank-0" / "checkpoint-5", src)


def test_a_changed_byte_in_a_pack_is_caught(store, tmp_path):
    env = base_env(store, tmp_path)
    src = many_small_files(tmp_path / "src" / "checkpoint-6")
    save(env, src, "job-q", "checkpoint-6")
    key = layout.pack_key("job-q", "checkpoint-6", 0, 0)
    data = bytearray(store.read(key))
    data[len(data) // 3] ^= 0x01
    store.write(key, bytes(data))
    dl = tmp_path / "dl"
    env["BT_LOAD_CHECKPOINT_CONFIG"] = spec(dl, named("checkpoint-6", "job-q"))
    result = run_agent(["load"], env)
    assert result.returncode == 5, result.stderr
    assert "checksum mismatch" in result.stderr and "Traceback" not in result.stderr
