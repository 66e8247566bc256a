"""Real training libraries under `ckpt-agent run` with checkpointing on: preempt, load latest, resume.

Each script in tests/trainers/ trains a tiny model on the CPU and saves the way its library does.
A first job runs under `ckpt-agent run` until a given checkpoint is committed, then holds still
(so where it stops is fixed) and gets SIGTERM through the agent; the library's own SIGTERM save
must be flushed to the store. A second job loads latest of the first through
BT_LOAD_CHECKPOINT_CONFIG, resumes with the library's own call on ckpt_agent.latest_local_checkpoint()
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

from tests.support.helpers import AGENT, StoreUnderTest, committed, dir_store, s3_store, start, sync_env, wait_for
from tests.support.specs import latest, spec

pytestmark = pytest.mark.trainers

SCRIPTS = Path(__file__).with_name("trainers")
STEPS, EVERY, HOLD = 20, 5, 12  # checkpoints at 5, 10, (SIGTERM after 12), then 15, 20 in the resumed job
TIMEOUT = 180
# Every script here saves on SIGTERM and exits 0; `run` then exits 143, so a preempted job is not
# taken for a finished one (README, exit codes).
PREEMPTED_STATUS = 143


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
              load_from: str | None = None, agent: bool = True, agent_flags: tuple = ()) -> Job:
    """`ckpt-agent run -- python SCRIPT` as job `job` with checkpointing on (and loading latest of
    `load_from`, resuming from what it loaded, with `agent_flags` before the `--`); `agent=False`
    runs the script alone."""
    folder = tmp_path / job
    folder.mkdir()
    ckpts, out = folder / "ckpts", folder / "result.json"
    env = sync_env(store, ckpts, job=job, BT_CHECKPOINTING_ENABLED="1")
    argv = [sys.executable, str(SCRIPTS / script), "--dir", str(ckpts), "--out", str(out), *map(str, args)]
    if load_from:
        env["BT_LOAD_CHECKPOINT_CONFIG"] = spec(folder / "loaded", latest(job_id=load_from))
        argv += ["--resume", "agent"]
    if agent:
        argv = [AGENT, "run", *agent_flags, "--", *argv]
    return Job(start(procs, argv, env, folder / "log"), folder / "log", out, ckpts)


def committed_set(store: StoreUnderTest, job: str) -> set[str]:
    """The job's committed checkpoints, as `ckpt-agent ls --job-id J --json` lists them."""
    result = subprocess.run([AGENT, "ls", "--job-id", job, "--json"], env=sync_env(store, Path("/nonexistent")),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {c["name"] for c in json.loads(result.stdout)["checkpoints"] if c["state"] == "committed"}


def preempt(job: Job, store: StoreUnderTest, after: str, job_id: str = "job-1") -> int:
    """SIGTERM to the agent once `after` is committed and the trainer holds still; the exit status."""
    wait_for(lambda: committed(store, after, job_id) and f"HOLDING {HOLD}" in job.text(), TIMEOUT,
             f"{after} committed and the trainer holding at step {HOLD}")
    job.proc.send_signal(signal.SIGTERM)
    return job.wait()


@dataclass(frozen=True)
class Preempted:
    """A trainer preempted under `ckpt-agent run` (job-1) and resumed from latest by job-2."""

    first: Job
    second: Job
    reference: Job


def preempt_and_resume(procs: list, tmp_path: Path, store: StoreUnderTest, script: str, *, after: str,
                       committed_first: set[str], resumes: str, first_args: tuple = (),
                       second_args: tuple = (), second_flags: tuple = ()) -> Preempted:
    """Job-1 runs `script` until `after` is committed, gets SIGTERM and must have committed exactly
    `committed_first`; job-2 loads latest of job-1 (which must be `resumes`) and trains to the end,
    alongside an uninterrupted reference run of the same script."""
    reference = start_job(procs, tmp_path, store, script, "reference", agent=False)
    first = start_job(procs, tmp_path, store, script, "job-1", "--hold-at", HOLD, *first_args)
    assert preempt(first, store, after) == PREEMPTED_STATUS, first.text()
    assert "SIGTERM" in first.text(), first.text()
    assert committed_set(store, "job-1") == committed_first, first.text()
    second = start_job(procs, tmp_path, store, script, "job-2", *second_args, load_from="job-1",
                       agent_flags=second_flags)
    assert second.wait() == 0, second.text()
    assert f"RESUMING {resumes}" in second.text(), second.text()
    assert reference.wait() == 0, reference.text()
    assert second.result()["step"] == STEPS
    return Preempted(first, second, reference)


@pytest.fixture
def local_store(tmp_path: Path) -> StoreUnderTest:
    return dir_store(tmp_path / "store")


def test_hf_trainer_preempted_resumes_from_latest_bit_identical_and_its_final_model_folder_is_committed(
        s3_env, s3_prefix, tmp_path, procs):
    store = s3_store(s3_env, s3_prefix)
    run = preempt_and_resume(procs, tmp_path, store, "hf_trainer.py", after="checkpoint-10",
                             committed_first={"checkpoint-5", "checkpoint-10", "checkpoint-12"},
                             resumes="checkpoint-12", second_args=("--final", "final-model"))
    assert run.second.result() == run.reference.result()
    # final-model/ (save_model: weights and config, no trainer_state.json) is of no known format:
    # committed because the trainer exited 0.
    assert committed_set(store, "job-2") == {"checkpoint-15", "checkpoint-20", "final-model"}, run.second.text()


def test_hf_trainer_started_early_builds_itself_while_its_checkpoint_loads_and_resumes_bit_identical(
        s3_env, s3_prefix, tmp_path, procs):
    """`run --start-early`: the trainer starts before the load is done; trainer.train() waits for it in
    latest_local_checkpoint() and resumes exactly as after a sequential load."""
    store = s3_store(s3_env, s3_prefix)
    run = preempt_and_resume(procs, tmp_path, store, "hf_trainer.py", after="checkpoint-10",
                             committed_first={"checkpoint-5", "checkpoint-10", "checkpoint-12"},
                             resumes="checkpoint-12", second_flags=("--start-early",))
    assert run.second.result() == run.reference.result()
    log = run.second.text()
    assert log.index("supervising the trainer") < log.index("ckpt-agent: loaded "), log  # it started first


def test_torch_save_loop_preempted_uploads_each_pt_file_and_resumes_bit_identical_from_the_loaded_file(
        local_store, tmp_path, procs):
    run = preempt_and_resume(procs, tmp_path, local_store, "torch_save_loop.py", after="ckpt-10.pt",
                             committed_first={"ckpt-5.pt", "ckpt-10.pt", "ckpt-12.pt"}, resumes="ckpt-12.pt")
    assert run.second.result() == run.reference.result()


def test_dcp_loop_preempted_uploads_each_folder_and_resumes_bit_identical_with_dcp_load(
        local_store, tmp_path, procs):
    run = preempt_and_resume(procs, tmp_path, local_store, "dcp_loop.py", after="step-10",
                             committed_first={"step-5", "step-10", "step-12"}, resumes="step-12")
    assert run.second.result() == run.reference.result()


@pytest.mark.parametrize(("script", "flags", "saved", "half", "why"), [
    ("dcp_loop.py", (), "step-5", "step-10", "no .metadata"),
    ("dcp_loop.py", ("--complete-file", ".metadata"), "step-5", "step-10", "no .metadata"),
    ("torch_save_loop.py", (), "ckpt-5.pt", "ckpt-10.pt", "no zip end record at its end"),
], ids=["dcp", "dcp-with-user-marker", "torch-save"])
def test_save_that_dies_half_way_is_never_committed_and_latest_stays_the_one_before(
        script, flags, saved, half, why, local_store, tmp_path, procs):
    """A real crash mid-save, at a fixed point: DCP writes step-10's shards itself and the process
    dies (os._exit) in the storage writer's `finish`, where DCP would write `.metadata`; the
    torch.save loop dies after writing the first half of the bytes torch.save made for ckpt-10.pt.
    With `--complete-file .metadata` (a user-given marker) the marker decides instead of DCP's rule."""
    job = start_job(procs, tmp_path, local_store, script, "job-1", "--crash-in-save", 10, agent_flags=flags)
    assert job.wait() == 1, job.text()
    assert "CRASHING in the save" in job.text()
    assert (job.ckpts / half).exists()
    assert f"{half} NOT committed: incomplete: {why}" in job.text(), job.text()
    assert committed_set(local_store, "job-1") == {saved}


def test_deepspeed_zero1_preempted_commits_tag_folders_named_by_latest_and_resumes_bit_identical(
        local_store, tmp_path, procs):
    run = preempt_and_resume(procs, tmp_path, local_store, "deepspeed_loop.py", after="global_step10",
                             committed_first={"global_step5", "global_step10", "global_step12"},
                             resumes="global_step12")
    assert run.second.result() == run.reference.result()
    assert "latest is not uploaded" in run.first.text(), run.first.text()


def test_lightning_preempted_resumes_from_its_sigterm_ckpt_like_resuming_from_the_local_file(
        local_store, tmp_path, procs):
    """Lightning's DataLoader is not resumable mid-epoch (it warns so), so the resumed weights are
    compared with a resume straight from job-1's own file, not with an uninterrupted run. Job-1's
    last.ckpt is a symlink (left out: its target is uploaded), job-2's a copy (a checkpoint)."""
    script, sigterm_ckpt = "lightning_trainer.py", "epoch=1-step=12.ckpt"
    run = preempt_and_resume(procs, tmp_path, local_store, script, after="epoch=1-step=10.ckpt",
                             committed_first={"epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt", sigterm_ckpt},
                             resumes=sigterm_ckpt, first_args=("--save-last", "link"))
    assert (run.first.ckpts / "last.ckpt").is_symlink()
    assert "last.ckpt" in committed_set(local_store, "job-2")
    direct = start_job(procs, tmp_path, local_store, script, "direct", "--resume",
                       run.first.ckpts / sigterm_ckpt, agent=False)
    assert direct.wait() == 0, direct.text()
    assert run.second.result() == direct.result()
