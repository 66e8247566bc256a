"""Real training libraries under `ckpt-agent run` with checkpointing on: preempt, load latest, resume.

Each script in tests/trainers/ trains a tiny model on the CPU and saves the way its library does.
A first job runs under `ckpt-agent run` until a given checkpoint is committed, then holds still
(so where it stops is fixed) and gets SIGTERM through the agent; the library's own SIGTERM save
must be flushed to the store. A second job loads latest of the first through
BT_LOAD_CHECKPOINT_CONFIG, resumes with the library's own call on agent.latest_local_checkpoint()
and trains to the end; its final weights must be bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.specs import AGENT, latest, spec
from tests.test_sidecar import StoreUnderTest, _local, _seaweed, committed, env_for, procs, start, wait_for

pytestmark = pytest.mark.trainers
assert procs  # the fixture, imported for the tests below

SCRIPTS = Path(__file__).with_name("trainers")
STEPS, EVERY, HOLD = 20, 5, 12  # checkpoints at 5, 10, (SIGTERM after 12), then 15, 20 in the resumed job
TIMEOUT = 180


@dataclass
class Job:
    """One `ckpt-agent run` (or a bare run) of a trainer script."""

    proc: subprocess.Popen
    log: Path
    out: Path
    ckpts: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self) -> int:
        return self.proc.wait(TIMEOUT)

    def result(self) -> dict:
        return json.loads(self.out.read_text())


def start_job(procs: list, tmp_path: Path, store: StoreUnderTest, script: str, job: str, *args: object,
              load_from: str | None = None, agent: bool = True) -> Job:
    """`ckpt-agent run -- python SCRIPT` as job `job` with checkpointing on (and loading latest of
    `load_from`, resuming from what it loaded); `agent=False` runs the script alone."""
    folder = tmp_path / job
    folder.mkdir()
    ckpts, out = folder / "ckpts", folder / "result.json"
    env = env_for(store, ckpts, job=job, BT_CHECKPOINTING_ENABLED="1")
    argv = [sys.executable, str(SCRIPTS / script), "--dir", str(ckpts), "--out", str(out), *map(str, args)]
    if load_from:
        env["BT_LOAD_CHECKPOINT_CONFIG"] = spec(folder / "loaded", latest(job_id=load_from))
        argv += ["--resume", "agent"]
    if agent:
        argv = [AGENT, "run", "--", *argv]
    return Job(start(procs, argv, env, folder / "log"), folder / "log", out, ckpts)


def committed_set(store: StoreUnderTest, job: str) -> set[str]:
    """The job's committed checkpoints, as `ckpt-agent ls --job-id J --json` lists them."""
    result = subprocess.run([AGENT, "ls", "--job-id", job, "--json"], env=env_for(store, Path("/nonexistent")),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {c["name"] for c in json.loads(result.stdout)["checkpoints"] if c["state"] == "committed"}


def preempt(job: Job, store: StoreUnderTest, after: str, job_id: str = "job-1") -> int:
    """SIGTERM to the agent once `after` is committed and the trainer holds still; the exit status."""
    wait_for(lambda: committed(store, after, job_id) and f"HOLDING {HOLD}" in job.text(), TIMEOUT,
             f"{after} committed and the trainer holding at step {HOLD}")
    job.proc.send_signal(signal.SIGTERM)
    return job.wait()


@pytest.fixture
def local_store(tmp_path: Path) -> StoreUnderTest:
    return _local(tmp_path / "store")


def test_hf_trainer_preempted_resumes_from_latest_bit_identical_and_its_final_model_folder_is_committed(
        s3_env, s3_prefix, tmp_path, procs):
    store = _seaweed(s3_env, s3_prefix)
    script = "hf_trainer.py"
    reference = start_job(procs, tmp_path, store, script, "reference", agent=False)
    first = start_job(procs, tmp_path, store, script, "job-1", "--hold-at", HOLD)
    assert preempt(first, store, after="checkpoint-10") == 0, first.text()
    assert "SIGTERM" in first.text() and "committed checkpoint-12:" in first.text(), first.text()
    assert committed_set(store, "job-1") == {"checkpoint-5", "checkpoint-10", "checkpoint-12"}

    second = start_job(procs, tmp_path, store, script, "job-2", "--final", "final-model", load_from="job-1")
    assert second.wait() == 0, second.text()
    assert "RESUMING checkpoint-12" in second.text()
    assert committed_set(store, "job-2") >= {"checkpoint-15", "checkpoint-20"}
    assert reference.wait() == 0, reference.text()
    assert second.result() == reference.result()
    assert second.result()["step"] == STEPS
