"""`ckpt-agent ls`: jobs and checkpoints as the store shows them, as a table or as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ckpt_agent.load.listing import CheckpointListing, CheckpointRow, JobRow, render
from ckpt_agent.stores import layout
from tests.support.helpers import clean_env, run_agent, save


def make_and_save(env: dict[str, str], src: Path, project: str, job: str, name: str, *extra: str) -> None:
    folder = src / project / job / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.bin").write_bytes(os.urandom(5000))
    (folder / "config.json").write_text("{}")
    save(env, folder, job, name, project, *extra)


def fill(env: dict[str, str], src: Path, put) -> None:
    """proj-a: job-1 (two checkpoints) then job-3 (2 nodes, rank 0 only); proj-b: job-2.
    job-1 also has checkpoint-30 uploaded without its manifest (`put` writes a raw object)."""
    make_and_save(env, src, "proj-a", "job-1", "checkpoint-10")
    make_and_save(env, src, "proj-a", "job-1", "checkpoint-20")
    make_and_save(env, src, "proj-b", "job-2", "checkpoint-5")
    make_and_save(env, src, "proj-a", "job-3", "checkpoint-1", "--rank", "0", "--num-nodes", "2")
    put(layout.file_key("job-1", "checkpoint-30", 0, "model.bin"), b"half an upload")


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The filled local store, shared by the module's tests: `ls` only reads."""
    tmp_path = tmp_path_factory.mktemp("ls")
    root = tmp_path / "store"
    env = clean_env(BT_CHECKPOINT_STORE=f"file://{root}")

    def put(key: str, data: bytes) -> None:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)

    fill(env, tmp_path / "src", put)
    return env


def test_ls_lists_every_job_newest_first_with_project_created_and_nodes(local):
    result = run_agent(["ls"], local)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["PROJECT", "JOB", "CREATED", "NODES"]
    assert [(r.split()[0], r.split()[1], r.split()[3]) for r in rows] == \
        [("proj-a", "job-3", "2"), ("proj-b", "job-2", "1"), ("proj-a", "job-1", "1")]
    jobs = json.loads(run_agent(["ls", "--json"], local).stdout)["jobs"]
    assert [j["job_id"] for j in jobs] == ["job-3", "job-2", "job-1"]
    assert jobs[0]["created_at"] > jobs[1]["created_at"] > jobs[2]["created_at"]


def test_ls_project_shows_only_that_projects_jobs(local):
    listing = json.loads(run_agent(["ls", "--project", "proj-a", "--json"], local).stdout)
    assert [(j["project_name"], j["job_id"]) for j in listing["jobs"]] == [("proj-a", "job-3"), ("proj-a", "job-1")]
    assert run_agent(["ls", "--project", "nobody"], local).stdout.strip() == "no jobs in project nobody"


def test_ls_job_shows_checkpoints_newest_first_and_marks_uncommitted_ones(local):
    result = run_agent(["ls", "--job-id", "job-1"], local)
    assert result.returncode == 0, result.stderr
    title, header, *rows = result.stdout.splitlines()
    assert title.startswith("job job-1 (project proj-a, 1 node(s)")
    assert header.split() == ["CHECKPOINT", "COMMITTED", "AT", "RANKS", "FILES", "SIZE"]
    assert [r.split()[0] for r in rows] == ["checkpoint-20", "checkpoint-10", "checkpoint-30"]
    assert rows[0].split()[2:] == ["1/1", "2", "5.0", "KB"]
    assert rows[2].split()[1:] == ["-", "0/1", "uncommitted", "-", "-"]
    checkpoints = json.loads(run_agent(["ls", "--job-id", "job-1", "--json"], local).stdout)["checkpoints"]
    assert [(c["name"], c["state"], c["files"], c["bytes"]) for c in checkpoints] == [
        ("checkpoint-20", "committed", 2, 5002), ("checkpoint-10", "committed", 2, 5002),
        ("checkpoint-30", "uncommitted", None, None)]


def test_ls_shows_a_multi_node_checkpoint_with_missing_ranks_as_partial(local):
    result = run_agent(["ls", "--job-id", "job-3"], local)
    assert "1/2 partial" in result.stdout
    [c] = json.loads(run_agent(["ls", "--job-id", "job-3", "--json"], local).stdout)["checkpoints"]
    assert (c["ranks_committed"], c["num_nodes"], c["complete"], c["state"]) == ([0], 2, False, "partial")


def test_ls_unknown_job_or_job_of_another_project_is_not_found(local):
    for args, words in ((["--job-id", "job-9"], "job-9 is not in the store"),
                        (["--job-id", "job-2", "--project", "proj-a"], "belongs to project 'proj-b'")):
        result = run_agent(["ls", *args], local)
        assert result.returncode == 3
        assert words in result.stderr and len(result.stderr.splitlines()) == 1 and result.stdout == ""


def test_ls_of_an_empty_store_says_so(tmp_path):
    result = run_agent(["ls"], clean_env(BT_CHECKPOINT_STORE=str(tmp_path / "empty")))
    assert (result.returncode, result.stdout.strip()) == (0, "no jobs in the store")


def test_render_table_and_json_show_the_same_listing():
    listing = CheckpointListing(JobRow("j", None, "2026-01-01T00:00:00Z", 2), (
        CheckpointRow("checkpoint-1000", "2026-01-02T00:00:00Z", (0, 1), (), 2, True, 4, 2_500_000),
        CheckpointRow("c-1", None, (1,), (), 2, False, 2, 10),
        CheckpointRow("ckpt-5.pt", "2026-01-01T00:00:00Z", (0,), (1,), 2, True, 1, 10)))
    table = render(listing).splitlines()
    assert table[2].split() == ["checkpoint-1000", "2026-01-02T00:00:00Z", "2/2", "4", "2.5", "MB"]
    assert table[3].split() == ["c-1", "-", "1/2", "partial", "2", "10", "B"]
    assert table[4].split()[2:] == ["2/2", "(rank", "1:", "nothing", "here)", "1", "10", "B"]
    assert table[2].index("2/2") == table[3].index("1/2")  # columns line up
    data = json.loads(render(listing, as_json=True))
    assert data["checkpoints"][1] == {"name": "c-1", "committed_at": None, "ranks_committed": [1],
                                      "ranks_nothing_here": [], "num_nodes": 2, "complete": False, "files": 2,
                                      "bytes": 10, "state": "partial"}
    assert (data["checkpoints"][2]["ranks_nothing_here"], data["checkpoints"][2]["state"]) == ([1], "committed")


@pytest.mark.seaweed
def test_ls_against_seaweedfs_shows_jobs_and_uncommitted_checkpoints(seaweed, s3_prefix, tmp_path):
    env = clean_env(**seaweed.env(), BT_CHECKPOINT_STORE=f"s3://{seaweed.bucket}/{s3_prefix}")
    client = seaweed.client()
    fill(env, tmp_path / "src",
         lambda key, data: client.put_object(Bucket=seaweed.bucket, Key=f"{s3_prefix}/{key}", Body=data))
    jobs = json.loads(run_agent(["ls", "--json"], env).stdout)["jobs"]
    assert [(j["project_name"], j["job_id"], j["num_nodes"]) for j in jobs] == \
        [("proj-a", "job-3", 2), ("proj-b", "job-2", 1), ("proj-a", "job-1", 1)]
    result = run_agent(["ls", "--job-id", "job-1", "--json"], env)
    assert result.returncode == 0, result.stderr
    assert [(c["name"], c["state"], c["files"]) for c in json.loads(result.stdout)["checkpoints"]] == [
        ("checkpoint-20", "committed", 2), ("checkpoint-10", "committed", 2), ("checkpoint-30", "uncommitted", None)]
