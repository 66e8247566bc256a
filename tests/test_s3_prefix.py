"""s3_prefix references: every object under a plain S3 prefix, written by other tools (s5cmd, boto3
single-part and multipart), loaded into rank-<r>/<last path component>/ and checked against what S3
itself keeps of each object (a full-object checksum, else a single-part ETag's MD5, else the size)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from tests.support.faultproxy import LOOPBACK, FaultProxy
from tests.support.helpers import assert_one_line_failure, clean_env, load_record, on_disk, payload, run_agent
from tests.support.specs import spec

S5CMD = str(Path(sys.executable).parent / "s5cmd")


def _env(server, dl: Path, uri: str, **extra: str) -> dict[str, str]:
    return clean_env(**{**server.env(), "BT_CHECKPOINT_STORE": "/nonexistent-local-store",
                        "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, {"typ": "s3_prefix", "uri": uri}),
                        "CKPT_AGENT_WORKERS": "4", "CKPT_AGENT_READ_TIMEOUT": "2", **extra})


def _verified_by(dl: Path) -> dict[str, str]:
    record = load_record(dl)
    (entry,) = record["checkpoints"]
    return entry["verified_by"]


@pytest.mark.parametrize("engine", ["http", "boto3"])
def test_a_prefix_written_by_s5cmd_loads_exactly_checked_by_md5(engine, s3_env, s3_prefix, tmp_path):
    src = tmp_path / "checkpoint-500"
    files = {"model.safetensors": payload(700_000, "m"), "config.json": b'{"a": 1}',
             "sub/dir/state.pt": payload(5, "s")}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    uri = f"s3://{s3_env.bucket}/{s3_prefix}/run-1/checkpoint-500/"
    copy = subprocess.run([S5CMD, "--endpoint-url", s3_env.endpoint, "cp", f"{src}/", uri],
                          env=clean_env(**s3_env.env()), capture_output=True, text=True, timeout=60)
    assert copy.returncode == 0, copy.stderr
    dl = tmp_path / "dl"
    result = run_agent(["load"], _env(s3_env, dl, uri, CKPT_AGENT_S3_ENGINE=engine))
    assert result.returncode == 0, result.stderr
    assert on_disk(dl / "rank-0" / "checkpoint-500") == files
    assert _verified_by(dl) == dict.fromkeys(files, "md5")
    verify = run_agent(["verify", str(dl)], clean_env())
    assert verify.returncode == 0, verify.stdout


def test_boto3_single_part_objects_are_checked_by_their_crc_and_multipart_ones_by_size(s3_env, s3_prefix, tmp_path):
    client, bucket = s3_env.client(), s3_env.bucket
    base = f"{s3_prefix}/runs/step-7"
    small, big = payload(100_000, "small"), payload(11 << 20, "big")
    client.put_object(Bucket=bucket, Key=f"{base}/small.bin", Body=small)  # boto3 sends a CRC32 S3 keeps
    client.upload_fileobj(io.BytesIO(big), bucket, f"{base}/big.bin",
                          Config=TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20))
    dl = tmp_path / "dl"
    result = run_agent(["load", "--from", f"s3://{bucket}/{base}"], clean_env(**s3_env.env(),
                       BT_LOAD_CHECKPOINT_CONFIG=spec(dl)))
    assert result.returncode == 0, result.stderr
    assert on_disk(dl / "rank-0" / "step-7") == {"small.bin": small, "big.bin": big}
    assert _verified_by(dl) == {"small.bin": "crc32", "big.bin": "size"}
    warning = [line for line in result.stderr.splitlines() if "by their size only" in line]
    assert len(warning) == 1 and "big.bin" in warning[0]


def test_a_corrupt_object_fails_with_exit_5_and_is_never_placed(s3_env, s3_prefix, tmp_path):
    client, bucket = s3_env.client(), s3_env.bucket
    client.put_object(Bucket=bucket, Key=f"{s3_prefix}/ck/checkpoint-1/w.bin", Body=payload(300_000, "w"))
    dl = tmp_path / "dl"
    with FaultProxy(LOOPBACK, s3_env.s3_port) as proxy:
        proxy.add_rule("corrupt", method="GET", path="checkpoint-1/w.bin", offset=4321, count=None)
        env = _env(s3_env, dl, f"s3://{bucket}/{s3_prefix}/ck/checkpoint-1/", AWS_ENDPOINT_URL=proxy.endpoint)
        result = run_agent(["load"], env)
    assert_one_line_failure(result, 5, "w.bin", "crc32")
    assert not (dl / "rank-0" / "checkpoint-1" / "w.bin").exists()


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_an_empty_or_missing_prefix_is_one_clear_error(where, s3_env, s3_prefix, tmp_path):
    if where == "empty":  # a folder marker and nothing else
        s3_env.client().put_object(Bucket=s3_env.bucket, Key=f"{s3_prefix}/empty/ckpt-2/", Body=b"")
    dl = tmp_path / "dl"
    uri = f"s3://{s3_env.bucket}/{s3_prefix}/{where}/ckpt-2/"
    result = run_agent(["load"], _env(s3_env, dl, uri))
    assert_one_line_failure(result, 3, uri, "no object under")
    assert not dl.exists()


@pytest.mark.parametrize("uri", ["s3://bucket", "s3://bucket/", "gs://bucket/x/", "s3://bucket/a/..", "s3://b@d/x/"])
def test_a_malformed_s3_prefix_uri_is_refused_naming_the_field(uri, tmp_path):
    env = clean_env(BT_LOAD_CHECKPOINT_CONFIG=spec(tmp_path / "dl", {"typ": "s3_prefix", "uri": uri}))
    result = run_agent(["load"], env)
    assert_one_line_failure(result, 2, "BT_LOAD_CHECKPOINT_CONFIG.checkpoints[0].uri")


def test_load_from_an_s3_prefix_needs_no_api_key_when_the_store_is_baseten(s3_env, s3_prefix, tmp_path):
    s3_env.client().put_object(Bucket=s3_env.bucket, Key=f"{s3_prefix}/x/ckpt-3/w.bin", Body=b"weights")
    dl = tmp_path / "dl"
    env = clean_env(**s3_env.env(), BT_CHECKPOINT_STORE="baseten", BT_LOAD_CHECKPOINT_CONFIG=spec(dl))
    result = run_agent(["load", "--from", f"s3://{s3_env.bucket}/{s3_prefix}/x/ckpt-3/"], env)
    assert result.returncode == 0, result.stderr
    assert on_disk(dl / "rank-0" / "ckpt-3") == {"w.bin": b"weights"}
