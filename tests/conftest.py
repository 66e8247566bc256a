"""Shared fixtures: one real SeaweedFS S3 server per session, and moto for pure-API tests; a
fault proxy in front of SeaweedFS, a store of either kind, and the processes a test starts.

Everything here talks only to 127.0.0.1 (SeaweedFS) or to nothing at all (moto intercepts
botocore before any request leaves the process). Both S3 fixtures first remove every AWS_*
variable inherited from the caller's shell, so a stray AWS_PROFILE or AWS_ENDPOINT_URL_S3 can
never send a test to a real account.
"""

from __future__ import annotations

import functools
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.seaweed import SeaweedServer, start_seaweed
from tests.support.faultproxy import LOOPBACK, FaultProxy
from tests.support.helpers import StoreUnderTest, dir_store, s3_store

MOTO_BUCKET = "ckpt-agent-moto"


def _clear_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A real SeaweedFS S3 server on 127.0.0.1, shared by the whole session.

    Tests share its one bucket (`seaweed.bucket`); use `s3_prefix` to keep their keys apart.
    """
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> SeaweedServer:
    """The process environment points boto3 (and child processes) at the SeaweedFS server."""
    _clear_aws_env(monkeypatch)
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    return seaweed


@pytest.fixture
def s3_prefix() -> str:
    """A key prefix no other test uses (no slashes at either end), e.g. for a store root."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    """A fault proxy on 127.0.0.1 in front of the session's SeaweedFS server."""
    with FaultProxy(LOOPBACK, seaweed.s3_port) as p:
        yield p


@pytest.fixture(params=["local", "seaweedfs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreUnderTest:
    """Each test runs twice: against a local directory store and against SeaweedFS."""
    if request.param == "local":
        return dir_store(tmp_path / "store")
    return s3_store(request.getfixturevalue("seaweed"), request.getfixturevalue("s3_prefix"))


@pytest.fixture
def local_store(tmp_path: Path) -> StoreUnderTest:
    """A local directory store under tmp_path/store."""
    return dir_store(tmp_path / "store")


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Every process a test starts; any still running at the end is killed (by its own pid)."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


@dataclass(frozen=True)
class MotoS3:
    client: object
    bucket: str


@functools.cache
def _moto_session():
    """One boto3 session for the fixture's own clients: parsing botocore's models per test is
    slow. Clients get explicit credentials, so nothing cached here depends on the environment."""
    import boto3

    return boto3.session.Session()


@pytest.fixture
def moto_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    """moto's in-process S3 with fake credentials and one empty bucket, `MOTO_BUCKET`."""
    from moto import mock_aws

    _clear_aws_env(monkeypatch)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        client = _moto_session().client(
            "s3", region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket=MOTO_BUCKET)
        yield MotoS3(client, MOTO_BUCKET)
