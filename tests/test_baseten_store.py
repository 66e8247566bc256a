"""BT_CHECKPOINT_STORE=baseten: a Baseten job's checkpoints through the training API, downloaded
with real S3 presigned GETs from the suite's SeaweedFS and checked against what storage reports.

The API is tests/support/baseten_api.py (the truss client's calls and fields); its URLs are minted
by boto3 against SeaweedFS, or against a fault proxy in front of it for faults on the wire.
"""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from tests.support.baseten_api import FakeBasetenApi, FakeFile, FakeJob
from tests.support.faultproxy import LOOPBACK, FaultProxy
from tests.support.helpers import (
    assert_one_line_failure,
    clean_env,
    load_record,
    payload,
    run_agent,
    start_agent,
    wait_for,
)
from tests.support.specs import latest, named, spec

KEY = "btkey-9Qm2xV7rSECRETPART"
PROJECT, PROJECT_ID = "gpt-finetuning", "proj7x1"
OLD, NEW = "gvpql31", "rwnojdq"  # jobs of PROJECT; NEW is the most recent and has no checkpoint
# checkpoint-10 is older than checkpoint-9: latest follows created_at, not the names' order
CKPTS = {"checkpoint-9": "2026-06-01T12:00:00Z", "checkpoint-10": "2026-06-01T10:00:00Z"}
FILES = {"model.safetensors": 300_000, "config.json": 1_000, "nested/optimizer.pt": 200_000, "empty.txt": 0}


class Baseten:
    """SeaweedFS objects, the fake API that lists them, and the agent's environment."""

    def __init__(self, server, prefix: str, tmp: Path, api: FakeBasetenApi) -> None:
        self.server, self.prefix, self.tmp, self.api = server, prefix, tmp, api
        self.dl = tmp / "dl"
        self.data: dict[str, bytes] = {}  # relative_file_name -> bytes

    def put(self, job: FakeJob, name: str, data: bytes, *, multipart: bool = False) -> None:
        key = f"{self.prefix}/{job.id}/{name}"
        client = self.server.client()
        if multipart:
            client.upload_fileobj(io.BytesIO(data), self.server.bucket, key,
                                  Config=TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20))
        else:
            client.put_object(Bucket=self.server.bucket, Key=key, Body=data)
        job.files.append(FakeFile(name, key, len(data)))
        self.data[name] = data

    def add_job(self, job_id: str, created_at: str, checkpoints: dict[str, str], files: dict[str, int] = FILES,
                rank_prefix: str = "") -> FakeJob:
        job = FakeJob(job_id, PROJECT_ID, created_at)
        self.api.jobs.append(job)
        for cid, created in checkpoints.items():
            job.checkpoints.append({"checkpoint_id": cid, "created_at": created, "size_bytes": sum(files.values())})
            for path, size in files.items():
                self.put(job, f"{rank_prefix}{cid}/{path}", payload(size, f"{job_id}/{cid}/{path}"))
        return job

    def env(self, *refs: dict, **extra: str) -> dict[str, str]:
        return clean_env(**{"BT_CHECKPOINT_STORE": "baseten", "BASETEN_API_KEY": KEY, "BASETEN_API_URL": self.api.url,
                            "BT_LOAD_CHECKPOINT_CONFIG": spec(self.dl, *(refs or (named("checkpoint-9", OLD),))),
                            "BT_TRAINING_PROJECT_NAME": PROJECT, "CKPT_AGENT_WORKERS": "4",
                            "CKPT_AGENT_READ_TIMEOUT": "2", **extra})

    def record(self) -> dict:
        return load_record(self.dl)

    def assert_loaded(self, job: str, cid: str, rank_prefix: str = "") -> None:
        """rank-0/<cid>/ holds exactly that checkpoint's files, byte for byte."""
        root = self.dl / "rank-0" / cid
        want = {n[len(f"{rank_prefix}{cid}/"):]: d for n, d in self.data.items() if n.startswith(f"{rank_prefix}{cid}/")
                and n.startswith(rank_prefix)}
        found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        assert found == sorted(want)
        for path, data in want.items():
            assert (root / path).read_bytes() == data, path

    def assert_no_key(self, *results) -> None:
        """The API key is in no output and in no file the load wrote."""
        for result in results:
            assert KEY not in result.stdout and KEY not in result.stderr
        for path in self.dl.rglob("*") if self.dl.exists() else ():
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path


def _mint(client, bucket: str):
    return lambda key, seconds: client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                              ExpiresIn=seconds)


@pytest.fixture
def bt(s3_env, s3_prefix: str, tmp_path: Path) -> Iterator[Baseten]:
    """PROJECT with job OLD (two checkpoints, single-part objects) and the newer NEW (none)."""
    with FakeBasetenApi(KEY, _mint(s3_env.client(), s3_env.bucket)) as api:
        api.projects = {PROJECT_ID: PROJECT, "other-id": "other-project"}
        b = Baseten(s3_env, s3_prefix, tmp_path, api)
        b.add_job(OLD, "2026-05-01T00:00:00Z", CKPTS)
        b.add_job(NEW, "2026-07-01T00:00:00Z", {})
        yield b


REFS = {
    "named": (named("checkpoint-10", OLD), "checkpoint-10", "named"),
    "latest by job": (latest(job_id=OLD), "checkpoint-9", f"newest checkpoint of job {OLD} by created_at"),
    "latest by project": (latest(PROJECT), "checkpoint-9", f"the most recent job of project {PROJECT} that has one"),
    "latest by both names": (latest(PROJECT, OLD), "checkpoint-9", f"newest checkpoint of job {OLD}"),
}


@pytest.mark.parametrize("which", REFS)
def test_each_reference_loads_the_checkpoint_the_api_names_checked_by_md5(which, bt):
    ref, cid, reason = REFS[which]
    result = run_agent(["load"], bt.env(ref))
    assert result.returncode == 0, result.stderr
    bt.assert_loaded(OLD, cid)
    (entry,) = bt.record()["checkpoints"]
    assert (entry["job_id"], entry["checkpoint_name"], entry["project_name"]) == (OLD, cid, PROJECT)
    assert reason in entry["reason"]
    # single-part objects: the ETag is the MD5; the empty file has no GET, and its size is all of it
    assert entry["verified_by"] == {**dict.fromkeys(FILES, "md5"), "empty.txt": "size"}
    assert "by their size only" not in result.stderr
    verify = run_agent(["verify", str(bt.dl)], bt.env(ref))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    bt.assert_no_key(result, verify)


def test_listing_of_many_pages_is_followed_to_the_end(bt):
    bt.api.max_page = 2
    result = run_agent(["load"], bt.env())
    assert result.returncode == 0, result.stderr
    bt.assert_loaded(OLD, "checkpoint-9")
    assert bt.api.pages(OLD) == 4  # 8 files, 2 a page


def test_missing_key_fails_before_any_request(bt):
    env = bt.env()
    del env["BASETEN_API_KEY"]
    result = run_agent(["load"], env)
    assert_one_line_failure(result, 2, "BASETEN_API_KEY")
    assert bt.api.served == []
    assert not bt.dl.exists()


@pytest.mark.parametrize("status", [401, 403])
def test_wrong_key_is_one_line_naming_the_variable_and_never_echoed(status, bt):
    bt.api.deny_status = status
    env = bt.env(BASETEN_API_KEY="btkey-WRONGWRONGWRONG")
    for args in (["load"], ["ls"], ["load", "--dry-run"]):
        result = run_agent(args, env)
        assert_one_line_failure(result, 4, "BASETEN_API_KEY", str(status))
        assert "WRONGWRONG" not in result.stderr + result.stdout
    assert not bt.dl.exists()


def test_named_checkpoint_that_is_not_there_lists_the_names_the_job_has(bt):
    result = run_agent(["load"], bt.env(named("checkpoint-11", OLD)))
    assert_one_line_failure(result, 3, "checkpoint-11", '"checkpoint-9", "checkpoint-10"')
    assert not bt.dl.exists()


def test_latest_of_a_job_with_no_checkpoint_warns_or_fails_when_required(bt):
    ok = run_agent(["load"], bt.env(latest(job_id=NEW)))
    assert ok.returncode == 0 and "WITHOUT a checkpoint" in ok.stderr
    required = run_agent(["load"], bt.env(latest(job_id=NEW), BT_LOAD_CHECKPOINT_REQUIRED="1"))
    assert_one_line_failure(required, 3, NEW)


def test_a_listing_whose_size_lies_is_refused_and_nothing_is_placed(bt):
    lying = next(f for f in bt.api.jobs[0].files if f.relative_file_name == "checkpoint-9/model.safetensors")
    lying.size_bytes += 1
    result = run_agent(["load"], bt.env())
    assert_one_line_failure(result, 5, "model.safetensors", "in its listing")
    assert not (bt.dl / "rank-0" / "checkpoint-9" / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["checkpoint-9/../../outside.bin", "checkpoint-9/a\\b.bin", "checkpoint-9//x.bin"])
def test_a_listed_file_name_that_would_leave_its_folder_is_refused_before_anything_is_written(name, bt):
    job = bt.api.jobs[0]
    job.files.append(FakeFile(name, job.files[0].s3_key, job.files[0].size_bytes))
    result = run_agent(["load"], bt.env())
    assert_one_line_failure(result, 5, "Baseten API: job")
    assert not bt.dl.exists() and not (bt.tmp / "outside.bin").exists()


def test_multipart_objects_are_checked_by_size_and_the_load_says_so_per_file(bt):
    job = bt.add_job("mpjob1", "2026-08-01T00:00:00Z", {}, {})
    job.checkpoints.append({"checkpoint_id": "step-5", "created_at": "2026-08-01T01:00:00Z", "size_bytes": 0})
    bt.put(job, "step-5/big.bin", payload(11 << 20, "big"), multipart=True)
    bt.put(job, "step-5/small.json", b'{"step": 5}')
    result = run_agent(["load"], bt.env(latest(job_id="mpjob1")))
    assert result.returncode == 0, result.stderr
    bt.assert_loaded("mpjob1", "step-5")
    assert bt.record()["checkpoints"][0]["verified_by"] == {"big.bin": "size", "small.json": "md5"}
    warning = [line for line in result.stderr.splitlines() if "by their size only" in line]
    assert len(warning) == 1 and "big.bin" in warning[0] and "small.json" not in warning[0]


def test_rank_prefixed_file_names_load_into_the_same_folders(bt):
    job = bt.add_job("rankjob", "2026-08-02T00:00:00Z", {"ckpt-3": "2026-08-02T01:00:00Z"}, rank_prefix="rank-0/")
    result = run_agent(["load"], bt.env(named("ckpt-3", job.id)))
    assert result.returncode == 0, result.stderr
    bt.assert_loaded(job.id, "ckpt-3", rank_prefix="rank-0/")


def test_expired_urls_are_refreshed_by_listing_the_files_again(bt):
    bt.api.expired_first = True
    result = run_agent(["load"], bt.env())
    assert result.returncode == 0, result.stderr
    bt.assert_loaded(OLD, "checkpoint-9")
    assert bt.api.file_listings(OLD) == 2  # once to resolve, once more for every worker that met a 403


@pytest.fixture
def wire(bt) -> Iterator[tuple[Baseten, FaultProxy]]:
    """The API's URLs point at a fault proxy in front of SeaweedFS (the signature covers the proxy's host)."""
    import boto3

    with FaultProxy(LOOPBACK, bt.server.s3_port) as proxy:
        env = bt.server.env()
        client = boto3.client("s3", endpoint_url=proxy.endpoint, region_name="us-east-1",
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        bt.api.mint = _mint(client, bt.server.bucket)
        yield bt, proxy


def test_a_byte_flipped_on_the_wire_once_is_fetched_again_and_the_load_is_exact(wire):
    bt, proxy = wire
    rule = proxy.add_rule("corrupt", method="GET", path="checkpoint-9/model.safetensors", offset=1234, count=1)
    result = run_agent(["load"], bt.env())
    assert result.returncode == 0, result.stderr
    assert rule.fired == 1
    bt.assert_loaded(OLD, "checkpoint-9")


def test_a_byte_flipped_every_time_fails_with_exit_5_and_is_never_placed(wire):
    bt, proxy = wire
    proxy.add_rule("corrupt", method="GET", path="checkpoint-9/model.safetensors", offset=1234, count=None)
    result = run_agent(["load"], bt.env())
    assert_one_line_failure(result, 5, "model.safetensors", "md5")
    assert not (bt.dl / "rank-0" / "checkpoint-9" / "model.safetensors").exists()
    bt.assert_no_key(result)


def test_a_load_killed_midway_resumes_placed_files_and_the_parts_it_wrote_of_the_others(bt):
    sizes = {"shard-0.bin": 1 << 20, "shard-1.bin": 1 << 20, "big.bin": 16 << 20}  # big.bin: four 4 MiB parts
    job = bt.add_job("killjob", "2026-08-03T00:00:00Z", {"ckpt-1": "2026-08-03T01:00:00Z"}, sizes)
    env = bt.env(named("ckpt-1", job.id), CKPT_AGENT_WORKERS="1", CKPT_AGENT_MAX_RATE="5MB")
    first = start_agent(["load"], env)
    state = bt.dl / ".ckpt-agent"

    def read(name: str) -> dict:
        try:
            return json.loads((state / name).read_text())
        except (OSError, ValueError):
            return {}

    def noted() -> int:
        return len(read("partial.json").get("rank-0/ckpt-1/big.bin", {}).get("parts", {}))

    wait_for(lambda: noted() >= 2, timeout=30, what="two parts of big.bin written and noted")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    kept_parts, placed = noted(), {rel.rsplit("/", 1)[1] for rel in read("verified.json")}
    assert 2 <= kept_parts < 4 and "big.bin" not in placed
    result = run_agent(["load"], bt.env(named("ckpt-1", job.id)))
    assert result.returncode == 0, result.stderr
    bt.assert_loaded(job.id, "ckpt-1")
    record = bt.record()
    assert record["bytes_fetched"] <= sum(n for f, n in sizes.items() if f not in placed) - kept_parts * (4 << 20)
    assert record["checkpoints"][0]["verified_by"] == dict.fromkeys(sizes, "md5")
    assert not (state / "partial.json").exists()


def test_dry_run_ls_and_json_logs_work_through_the_api_and_never_show_the_key(bt):
    dry = run_agent(["load", "--dry-run"], bt.env(latest(PROJECT), BT_LOG_FORMAT="json"))
    assert dry.returncode == 0, dry.stderr
    assert f"job {OLD}, checkpoint checkpoint-9" in dry.stdout
    jobs = run_agent(["ls", "--project", PROJECT, "--json"], bt.env())
    assert [j["job_id"] for j in json.loads(jobs.stdout)["jobs"]] == [NEW, OLD]
    ckpts = run_agent(["ls", "--job-id", OLD], bt.env())
    assert ckpts.returncode == 0, ckpts.stderr
    lines = ckpts.stdout.splitlines()
    assert lines[2].startswith("checkpoint-9") and lines[3].startswith("checkpoint-10")
    loaded = run_agent(["load"], bt.env(BT_LOG_FORMAT="json"))
    assert loaded.returncode == 0, loaded.stderr
    bt.assert_no_key(dry, jobs, ckpts, loaded)


@pytest.mark.parametrize("command", [["save", "{folder}", "--job-id", "j1"], ["sync", "--once"]])
def test_save_and_sync_to_the_api_are_refused_in_one_line(command, bt):
    folder = bt.tmp / "checkpoint-1"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"w")
    env = bt.env(BT_TRAINING_JOB_ID="j1", BT_CHECKPOINT_DIR=str(bt.tmp))
    result = run_agent([c.replace("{folder}", str(folder)) for c in command], env)
    assert_one_line_failure(result, 2, "BT_CHECKPOINT_STORE=baseten is read-only", "the platform uploads")
    assert bt.api.served == []
