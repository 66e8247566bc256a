"""Helpers every test file shares: a clean environment, running the installed `ckpt-agent`,
saving a checkpoint through it, waiting on a condition with a deadline, and a store to inspect.

One place, so each test file says only what is particular to it.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.seaweed import SeaweedServer

AGENT = str(Path(sys.executable).parent / "ckpt-agent")
_FOREIGN = ("AWS_", "BT_", "CKPT_AGENT_")


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any AWS_*/BT_*/CKPT_AGENT_* (a stray AWS_PROFILE must
    never reach a real account, a stray BT_* never change a test), plus `extra`."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN)}
    return {**keep, **extra}


def run_agent(args: list[str], env: dict[str, str], timeout: float = 120,
              **kw: object) -> subprocess.CompletedProcess[str]:
    """Run `ckpt-agent ARGS` to completion, capturing its output as text."""
    return subprocess.run([AGENT, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          **kw)  # type: ignore[call-overload]


def start_agent(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([AGENT, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def save(env: dict[str, str], folder: Path, job: str, name: str, project: str = "proj",
         *extra: str) -> None:
    """`ckpt-agent save FOLDER` as checkpoint `name` of `job`; it must succeed."""
    result = run_agent(["save", str(folder), "--project", project, "--job-id", job, "--name", name,
                        *extra], env)
    assert result.returncode == 0, result.stderr


def wait_for(predicate: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    """Poll `predicate` until it holds; fail the test (never pass silently) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.02)


def payload(size: int, seed: str) -> bytes:
    """Deterministic pseudo-random bytes: an offset mistake cannot go unnoticed."""
    return random.Random(seed).randbytes(size)


def assert_one_line_failure(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """A clean failure: the documented exit code, one `error:` line naming the culprit, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@dataclass
class StoreUnderTest:
    """A store as a test sees it: the environment that selects it, and raw access by key."""

    env: dict[str, str]
    read: Callable[[str], bytes]
    write: Callable[[str, bytes], None]
    delete: Callable[[str], None]
    exists: Callable[[str], bool]


def local_store(root: Path) -> StoreUnderTest:
    def write(key: str, data: bytes) -> None:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)

    return StoreUnderTest({"BT_CHECKPOINT_STORE": f"file://{root}"},
                          lambda k: (root / k).read_bytes(), write,
                          lambda k: (root / k).unlink(), lambda k: (root / k).exists())


def seaweed_store(server: SeaweedServer, prefix: str) -> StoreUnderTest:
    """The shared SeaweedFS server, seen through this test's own key prefix."""
    client = server.client()
    bucket = server.bucket

    def read(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()

    def write(key: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)

    def delete(key: str) -> None:
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{key}")

    def exists(key: str) -> bool:
        return "Contents" in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{key}")

    env = {**server.env(), "BT_CHECKPOINT_STORE": f"s3://{bucket}/{prefix}"}
    return StoreUnderTest(env, read, write, delete, exists)
