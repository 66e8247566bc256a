"""Helpers every test file shares: a clean environment, running the installed `ckpt-agent`,
saving a checkpoint through it, waiting on a condition with a deadline, a store to inspect, and
checkpoints committed to SeaweedFS with the checks on what a load left behind.

One place, so each test file says only what is particular to it.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.seaweed import SeaweedServer, clean_env
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import Store
from ckpt_agent.stores.manifest import Manifest
from ckpt_agent.stores.s3boto import Boto3Store
from ckpt_agent.sync.loop import Sidecar
from ckpt_agent.upload.commit import CheckpointId, CommitRequest, commit_checkpoint
from tests.support.faultproxy import FaultProxy
from tests.support.specs import named, spec

AGENT = str(Path(sys.executable).parent / "ckpt-agent")
JOB, NAME = "job-f", "checkpoint-7"  # the job and checkpoint `upload_checkpoint` commits by default
PART = 256 * 1024  # small checksum parts, so a resumed file skips most of itself


def run_agent(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `ckpt-agent ARGS` to completion, capturing its output as text."""
    return subprocess.run([AGENT, *args], env=env, capture_output=True, text=True, timeout=timeout)


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


def wait_for_fill(download_folder: Path, rank: int = 0, timeout: float = 60) -> None:
    """Until the part cache's filler, a detached process a load started, has done its job (and removed it)."""
    job = download_folder / ".ckpt-agent" / f"cache-fill-rank-{rank}.json"
    wait_for(lambda: not job.exists(), timeout, f"the part cache fill of {download_folder}")


def on_disk(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by its relative path: what a load placed there, to compare whole."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def load_record(download_folder: Path, rank: int = 0) -> dict:
    """The rank's .ckpt-agent/loaded-rank-<r>.json, read as the file it is."""
    return json.loads((download_folder / ".ckpt-agent" / f"loaded-rank-{rank}.json").read_text())


def in_thread(sidecar: Sidecar) -> threading.Thread:
    """The sidecar's loop in a daemon thread, so the test can change the folder it watches meanwhile."""
    thread = threading.Thread(target=sidecar.run, daemon=True)
    thread.start()
    return thread


def same_tree(a: Path, b: Path) -> bool:
    """The two folders hold the same files with the same bytes."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


class FakeClock:
    """Time that moves only when somebody sleeps; sleeps from several threads never move it back."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)
            self.now = max(self.now, self.now + seconds)


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


def dir_store(root: Path) -> StoreUnderTest:
    def write(key: str, data: bytes) -> None:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)

    return StoreUnderTest({"BT_CHECKPOINT_STORE": f"file://{root}"},
                          lambda k: (root / k).read_bytes(), write,
                          lambda k: (root / k).unlink(), lambda k: (root / k).exists())


def s3_store(server: SeaweedServer, prefix: str) -> StoreUnderTest:
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


# ---- the save side: a fake trainer and `ckpt-agent sync` ---------------------------------------

TRAINER = [sys.executable, str(Path(__file__).parents[1] / "fake_trainer.py")]
QUIET = "0.5"  # seconds a checkpoint must be unchanged before the sidecar commits it


def trainer(ckpts: Path, *args: object) -> list[str]:
    """tests/fake_trainer.py writing HF-Trainer-like checkpoints into `ckpts`."""
    return [*TRAINER, "--dir", str(ckpts), *map(str, args)]


def sync_env(store: StoreUnderTest, ckpts: Path, job: str = "job-1", **extra: str) -> dict[str, str]:
    """Environment for `ckpt-agent sync`/`run` saving `ckpts` as `job`, with short quiet periods."""
    return clean_env(**{**store.env, "BT_TRAINING_PROJECT_NAME": "proj", "BT_TRAINING_JOB_ID": job,
                        "BT_CHECKPOINT_DIR": str(ckpts), "CKPT_AGENT_QUIET_SECONDS": QUIET,
                        "CKPT_AGENT_POLL_SECONDS": "0.1", **extra})


def start(procs: list[subprocess.Popen], argv: list[str], env: dict[str, str],
          out: Path) -> subprocess.Popen:
    """Start `argv` with stdout and stderr in `out`; `procs` (the fixture) kills it if left running."""
    with open(out, "wb") as log:
        p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    procs.append(p)
    return p


def committed(store: StoreUnderTest, name: str, job: str = "job-1") -> bool:
    return store.exists(layout.manifest_key(job, name, 0))


# ---- checkpoints in SeaweedFS, and what a load leaves behind ------------------------------------

def commit_files(store: Store, folder: Path, files: dict[str, bytes], ident: CheckpointId, *,
                 part_size: int = PART, workers: int = 4) -> Manifest:
    """Write `files` into `folder` and commit them as `ident` in-process: no CLI, any part size."""
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return commit_checkpoint(store, CommitRequest(folder, ident, workers, part_size=part_size), lambda n: None,
                             Cancel())


def upload_checkpoint(server: SeaweedServer, prefix: str, src: Path, files: dict[str, bytes], *,
                      job: str = JOB, name: str = NAME, project: str = "proj", part_size: int = PART,
                      ) -> dict[str, bytes]:
    """Commit `files` as checkpoint `name` of `job` straight to SeaweedFS (not through a proxy).

    In-process, because `ckpt-agent save` always uses 8 MiB parts and these tests want small
    ones. Needs the `s3_env` fixture (boto3 reads the credentials from the environment).
    """
    store = Boto3Store(server.bucket, prefix)
    try:
        commit_files(store, src / job / name, files, CheckpointId(project, job, name), part_size=part_size)
    finally:
        store.close()
    return files


def put_object(server: SeaweedServer, prefix: str, key: str, data: bytes) -> None:
    server.client().put_object(Bucket=server.bucket, Key=f"{prefix}/{key}", Body=data)


def get_object(server: SeaweedServer, prefix: str, key: str) -> bytes:
    return server.client().get_object(Bucket=server.bucket, Key=f"{prefix}/{key}")["Body"].read()


def agent_env(server: SeaweedServer, prefix: str, folder: Path, *, endpoint: str | None = None,
              refs: tuple[dict, ...] = (), **extra: str) -> dict[str, str]:
    """The agent's whole environment for a load from SeaweedFS into `folder` (by default of
    NAME of JOB): short timeouts, few workers; `endpoint` puts e.g. a fault proxy in between."""
    env = clean_env(**server.env(), BT_CHECKPOINT_STORE=f"s3://{server.bucket}/{prefix}",
                    BT_TRAINING_PROJECT_NAME="proj",
                    BT_LOAD_CHECKPOINT_CONFIG=spec(folder, *(refs or (named(NAME, JOB),))),
                    CKPT_AGENT_WORKERS="4", CKPT_AGENT_READ_TIMEOUT="2")
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    env.update(extra)
    return env


def loaded(folder: Path, name: str = NAME, rank: int = 0) -> Path:
    return folder / f"rank-{rank}" / name


def assert_exact(folder: Path, files: dict[str, bytes], name: str = NAME) -> None:
    """The checkpoint folder holds exactly `files`, byte for byte, and no temporary files."""
    root = loaded(folder, name)
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert found == sorted(files)
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data, rel


def file_bytes(proxy: FaultProxy, rel: str = "") -> int:
    """Payload bytes of checkpoint data the proxy forwarded: ranged GETs of file `rel` (or of any
    file or pack when `rel` is empty); manifests, job records and listings are never ranged."""
    where = f"/rank-0/{rel}" if rel else ""
    return sum(e.body_bytes for e in proxy.exchanges if e.method == "GET" and e.range is not None and where in e.target)
