"""Selective loads end to end: `--include`/`--exclude` and CKPT_AGENT_INCLUDE/EXCLUDE, through the
installed `ckpt-agent`, against the local store and SeaweedFS (bytes counted by the fault proxy)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ckpt_agent.config.selection import Selection
from ckpt_agent.config.settings import selection_from_env
from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.resume import read_load_record
from ckpt_agent.errors import EXIT_CONFIG, ConfigError, IntegrityError
from ckpt_agent.load.merge import single
from ckpt_agent.load.plan import check_selection
from ckpt_agent.load.record import recorded_selection
from ckpt_agent.stores import layout
from ckpt_agent.stores.manifest import FileEntry, Manifest
from tests.support.faultproxy import LOOPBACK, FaultProxy
from tests.support.helpers import AGENT
from tests.support.specs import latest, spec

JOB, NAME = "job-1", "checkpoint-20"
# The HF Trainer layout; the optimizer is most of the bytes, as in real checkpoints.
FILES = {"model.safetensors": 2_000_000, "optimizer.pt": 4_000_000, "scheduler.pt": 1_100,
         "trainer_state.json": 300}
DEEPSPEED = {"model.safetensors": 1_000_000, "latest": 14,
             "global_step20/mp_rank_00_model_states.pt": 500_000,
             "global_step20/zero_pp_rank_0_mp_rank_00_optim_states.pt": 1_500_000}


@dataclass
class Store:
    """The store as the agent sees it, and the bytes of checkpoint files the agent fetched from it."""

    env: dict[str, str]
    proxy: FaultProxy | None  # SeaweedFS is read through it; None: the local store, counted by loaded-rank-<r>.json

    def fetched(self, download_folder: Path) -> int:
        if self.proxy is None:
            record = json.loads((download_folder / ".ckpt-agent" / "loaded-rank-0.json").read_text())
            return record["bytes_fetched"]
        under = "/" + layout.file_key(JOB, NAME, 0, "")
        return sum(e.body_bytes for e in self.proxy.exchanges
                   if e.method == "GET" and under in e.target.split("?", 1)[0])


def _base_env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BT_", "CKPT_AGENT_"))}
    return {**keep, "BT_TRAINING_PROJECT_NAME": "proj"}


@pytest.fixture(params=["local", "seaweedfs"])
def store(request, tmp_path: Path) -> Iterator[Store]:
    if request.param == "local":
        yield Store({**_base_env(), "BT_CHECKPOINT_STORE": f"file://{tmp_path / 'store'}"}, None)
        return
    server, prefix = request.getfixturevalue("seaweed"), request.getfixturevalue("s3_prefix")
    direct = {**_base_env(), **server.env(), "BT_CHECKPOINT_STORE": f"s3://{server.bucket}/{prefix}"}
    with FaultProxy(LOOPBACK, server.s3_port) as proxy:
        yield Store({**direct, "AWS_ENDPOINT_URL": proxy.endpoint}, proxy)


def agent(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT, *args], env=env, capture_output=True, text=True, timeout=120)


def saved(store: Store, tmp_path: Path, files: dict[str, int] = FILES) -> Path:
    """A checkpoint of `files` (path -> size) written and committed to the store; returns its folder."""
    folder = tmp_path / "src" / NAME
    for path, size in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(os.urandom(size))
    result = agent(["save", str(folder), "--project", "proj", "--job-id", JOB, "--name", NAME], store.env)
    assert result.returncode == 0, result.stderr
    return folder


def loading(store: Store, dl: Path, **extra: str) -> dict[str, str]:
    return {**store.env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest("proj")), **extra}


def loaded_files(dl: Path) -> dict[str, bytes]:
    top = dl / "rank-0" / NAME
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


def source_files(src: Path, *paths: str) -> dict[str, bytes]:
    return {p: (src / p).read_bytes() for p in paths}


def test_a_load_without_the_optimizer_fetches_exactly_the_other_files_and_a_later_load_only_the_optimizer(
        store, tmp_path):
    src, dl = saved(store, tmp_path), tmp_path / "dl"
    wanted = ("model.safetensors", "scheduler.pt", "trainer_state.json")

    first = agent(["load", "--exclude", "optimizer.pt"], loading(store, dl))
    assert first.returncode == 0, first.stderr
    assert loaded_files(dl) == source_files(src, *wanted)  # the optimizer is not there at all
    assert store.fetched(dl) == sum(FILES[p] for p in wanted)
    assert "1 files (4.0 MB) left out by --exclude optimizer.pt" in first.stderr  # the summary line says it
    record = json.loads((dl / ".ckpt-agent" / "loaded-rank-0.json").read_text())
    assert record["selection"] == {"include": [], "exclude": ["optimizer.pt"]}
    assert (record["files_excluded"], record["bytes_excluded"]) == (1, FILES["optimizer.pt"])

    verify = agent(["verify", str(dl)], store.env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"excluded rank-0/{NAME}/optimizer.pt" in verify.stdout

    before = store.fetched(dl) if store.proxy is not None else 0
    second = agent(["load"], loading(store, dl))
    assert second.returncode == 0, second.stderr
    assert loaded_files(dl) == source_files(src, *FILES)
    assert store.fetched(dl) - before == FILES["optimizer.pt"]  # the rest was reused, not fetched again
    assert agent(["verify", str(dl)], store.env).returncode == 0


def test_dry_run_lists_what_the_variable_leaves_out_and_downloads_nothing(tmp_path):
    store = Store({**_base_env(), "BT_CHECKPOINT_STORE": f"file://{tmp_path / 'store'}"}, None)
    saved(store, tmp_path)
    dl = tmp_path / "dl"
    result = agent(["load", "--dry-run"], loading(store, dl, CKPT_AGENT_EXCLUDE="optimizer.pt,scheduler.pt"))
    assert result.returncode == 0, result.stderr
    assert ("  left out:     2 files, 4.0 MB by CKPT_AGENT_EXCLUDE=optimizer.pt,scheduler.pt: "
            "optimizer.pt, scheduler.pt") in result.stdout
    assert "to download:  2 files, 2.0 MB" in result.stdout
    assert "2 files (4.0 MB) left out by CKPT_AGENT_EXCLUDE=optimizer.pt,scheduler.pt" in result.stdout
    assert not dl.exists()


def test_an_exclude_flag_replaces_the_variable(tmp_path):
    store = Store({**_base_env(), "BT_CHECKPOINT_STORE": f"file://{tmp_path / 'store'}"}, None)
    src, dl = saved(store, tmp_path), tmp_path / "dl"
    result = agent(["load", "--exclude", "optimizer.pt", "--exclude", "scheduler.pt"],
                   loading(store, dl, CKPT_AGENT_EXCLUDE="model.safetensors"))
    assert result.returncode == 0, result.stderr
    assert loaded_files(dl) == source_files(src, "model.safetensors", "trainer_state.json")


@pytest.mark.parametrize(("args", "extra", "field"), [
    (["--exclude", "optimizer.pt,,scheduler.pt"], {}, "--exclude"),
    (["--include", "../model.safetensors"], {}, "--include"),
    ([], {"CKPT_AGENT_INCLUDE": "/model.safetensors"}, "CKPT_AGENT_INCLUDE"),
    ([], {"CKPT_AGENT_EXCLUDE": "rng_[0-9.pth"}, "CKPT_AGENT_EXCLUDE"),
])
def test_a_bad_pattern_is_a_config_error_naming_the_flag_or_variable_and_the_trainer_never_starts(
        tmp_path, args, extra, field):
    store = Store({**_base_env(), "BT_CHECKPOINT_STORE": f"file://{tmp_path / 'store'}"}, None)
    saved(store, tmp_path)
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    result = agent(["run", *args, "--", "touch", str(marker)], loading(store, dl, **extra))
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert result.stderr.startswith(f"ckpt-agent: error: {field}: ") and result.stderr.count("\n") == 1
    assert not marker.exists() and not dl.exists()


def test_an_include_matching_nothing_on_a_required_load_stops_before_the_trainer(store, tmp_path):
    saved(store, tmp_path)
    dl, marker = tmp_path / "dl", tmp_path / "trained"
    env = loading(store, dl, BT_LOAD_CHECKPOINT_REQUIRED="1")
    result = agent(["run", "--include", "*.safetensor", "--", "touch", str(marker)], env)
    assert result.returncode == EXIT_CONFIG, result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("ckpt-agent: error: --include: '*.safetensor' matches no file of checkpoint "
                                f"{NAME} of job {JOB}")
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in result.stderr
    assert not marker.exists() and not dl.exists()


def test_an_include_that_matches_nothing_beside_ones_that_match_is_one_warning(tmp_path):
    store = Store({**_base_env(), "BT_CHECKPOINT_STORE": f"file://{tmp_path / 'store'}"}, None)
    src, dl = saved(store, tmp_path), tmp_path / "dl"
    result = agent(["load", "--include", "*.safetensors,*.bin,trainer_state.json"],
                   loading(store, dl, BT_LOAD_CHECKPOINT_REQUIRED="1"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "'*.bin' matches no file" in warnings[0], warnings
    assert loaded_files(dl) == source_files(src, "model.safetensors", "trainer_state.json")


def test_excluding_deepspeed_state_later_removes_the_loaded_copy_and_reuses_the_rest(tmp_path):
    store = Store({**_base_env(), "BT_CHECKPOINT_STORE": f"file://{tmp_path / 'store'}"}, None)
    src, dl = saved(store, tmp_path, DEEPSPEED), tmp_path / "dl"
    assert agent(["load"], loading(store, dl)).returncode == 0

    result = agent(["load"], loading(store, dl, CKPT_AGENT_EXCLUDE="global_step*/"))
    assert result.returncode == 0, result.stderr
    # The trainer must not resume optimizer state the user left out; what stays is not fetched again.
    assert loaded_files(dl) == source_files(src, "model.safetensors", "latest")
    assert store.fetched(dl) == 0
    assert "removed 1 entries" in result.stderr and "WARNING" not in result.stderr

    (dl / "rank-0" / NAME / "global_step20").mkdir()
    (dl / "rank-0" / NAME / "global_step20" / "mp_rank_00_model_states.pt").write_bytes(b"not checked")
    verify = agent(["verify", str(dl)], store.env)
    assert verify.returncode == 0, verify.stdout + verify.stderr  # present but excluded: not an error either
    assert "present, not checked" in verify.stdout


def test_a_link_planted_where_an_excluded_file_would_go_is_removed_never_followed(tmp_path):
    store = Store({**_base_env(), "BT_CHECKPOINT_STORE": f"file://{tmp_path / 'store'}"}, None)
    src, dl = saved(store, tmp_path), tmp_path / "dl"
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"someone else's file")
    (dl / "rank-0" / NAME).mkdir(parents=True)
    (dl / "rank-0" / NAME / "optimizer.pt").symlink_to(outside)
    result = agent(["load", "--exclude", "optimizer.pt"], loading(store, dl))
    assert result.returncode == 0, result.stderr
    assert not (dl / "rank-0" / NAME / "optimizer.pt").is_symlink()
    assert outside.read_bytes() == b"someone else's file"
    assert loaded_files(dl) == source_files(src, "model.safetensors", "scheduler.pt", "trainer_state.json")


# ---- the pieces: where the patterns come from, what a plan and a record make of them ------------


def test_each_flag_given_replaces_its_own_variable_and_an_empty_flag_clears_it():
    env = {"CKPT_AGENT_INCLUDE": "*.safetensors", "CKPT_AGENT_EXCLUDE": "optimizer.pt"}
    assert selection_from_env(env) == Selection(("*.safetensors",), ("optimizer.pt",))
    flagged = selection_from_env(env, exclude_flags=["scheduler.pt", "rng_*.pth,latest"])
    assert flagged == Selection(("*.safetensors",), ("scheduler.pt", "rng_*.pth", "latest"))
    assert flagged.source() == "CKPT_AGENT_INCLUDE=*.safetensors --exclude scheduler.pt,rng_*.pth,latest"
    assert selection_from_env(env, include_flags=[""], exclude_flags=[""]).everything


def _manifest(paths: list[str]) -> Manifest:
    files = [FileEntry(p, 10, ("00000000",)) for p in paths]
    return Manifest(project_name="proj", job_id=JOB, checkpoint_name=NAME, rank=0,
                    committed_at="2026-01-01T00:00:00Z", part_size=8 << 20, files=tuple(files))


def test_a_selection_that_empties_a_checkpoint_is_fatal_only_when_the_load_is_required():
    manifests = (single(_manifest(["model.safetensors", "optimizer.pt"])),)
    emptying = Selection(("*.bin",), (), include_field="--include")
    with pytest.raises(ConfigError, match=r"^--include: '\*\.bin' matches no file of checkpoint"):
        check_selection(manifests, emptying, required=True)
    (warning,) = check_selection(manifests, emptying, required=False)
    assert "loading none of its files" in warning
    excluding_all = Selection((), ("*",), exclude_field="--exclude")
    with pytest.raises(ConfigError, match=r"^--exclude \* leaves no file of checkpoint"):
        check_selection(manifests, excluding_all, required=True)
    assert check_selection(manifests, Selection(("model.safetensors",), ()), required=True) == ()


def test_a_record_whose_selection_a_load_never_wrote_is_refused(tmp_path):
    state = tmp_path / ".ckpt-agent"
    state.mkdir()
    for selection in ({"include": "optimizer.pt"}, {"exclude": ["../x"]}, ["optimizer.pt"]):
        (state / "loaded-rank-0.json").write_text(json.dumps({"checkpoints": [], "selection": selection}))
        with Folder(tmp_path) as folder:
            record = read_load_record(folder, "loaded-rank-0.json")
            with pytest.raises(IntegrityError, match="its selection is not one a load wrote"):
                recorded_selection(folder, "loaded-rank-0.json", record)
    (state / "loaded-rank-0.json").write_text(json.dumps({"checkpoints": []}))  # before selective loads
    with Folder(tmp_path) as folder:
        old = read_load_record(folder, "loaded-rank-0.json")
        assert recorded_selection(folder, "loaded-rank-0.json", old).everything
