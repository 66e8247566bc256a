"""`run --start-early` (issue 19): the trainer starts at once, keeping the agent's PID, while a child
loads from SeaweedFS; `ckpt_agent.latest_local_checkpoint()` waits for the verified load and
raises when it failed, and a failed load stops a trainer that never asks, with a non-zero exit
and no training from scratch."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.helpers import (
    AGENT,
    JOB,
    NAME,
    agent_env,
    assert_exact,
    loaded,
    payload,
    put_object,
    upload_checkpoint,
)

# A trainer that records whether the load had finished when it started, then asks for its checkpoint.
ASKS = """
import json, os, sys, time
record = os.path.join(os.environ["BT_LOAD_CHECKPOINT_DIR"], ".ckpt-agent", "loaded-rank-0.json")
started = {"pid": os.getpid(), "loaded_at_start": os.path.exists(record)}
import ckpt_agent
path = ckpt_agent.latest_local_checkpoint()
print(json.dumps({**started, "path": path}), flush=True)
"""
# A trainer that never asks: it trains from scratch after a while, unless it is stopped first.
NEVER_ASKS = """
import sys, time
time.sleep(60)
open(sys.argv[1], "w").write("trained from scratch")
"""
RATE = "4MB"  # about 2 s for the checkpoint below: the trainer is running well before the load ends


@pytest.fixture
def files(s3_env, s3_prefix, tmp_path) -> dict[str, bytes]:
    return upload_checkpoint(s3_env, s3_prefix, tmp_path / "src",
                             {"model.bin": payload(8 << 20, "early"), "config.json": b'{"n": 1}'})


def corrupt(s3_env, s3_prefix, files: dict[str, bytes]) -> None:
    """The object no longer matches its manifest: the load fails its checksum (exit 5)."""
    data = bytearray(files["model.bin"])
    data[-100] ^= 0xFF
    put_object(s3_env, s3_prefix, f"jobs/{JOB}/checkpoints/{NAME}/rank-0/model.bin", bytes(data))


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_the_early_started_trainer_keeps_the_pid_waits_in_the_helper_and_gets_the_verified_path(
        s3_env, s3_prefix, files, tmp_path):
    dl = tmp_path / "dl"
    env = agent_env(s3_env, s3_prefix, dl, CKPT_AGENT_MAX_RATE=RATE, CKPT_AGENT_START_EARLY="1")
    proc = subprocess.Popen([AGENT, "run", "--", sys.executable, script(tmp_path, "asks.py", ASKS)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    seen = json.loads(out)
    assert seen["pid"] == proc.pid  # exec'd, not a child
    assert seen["loaded_at_start"] is False  # it started before the load was done
    assert seen["path"] == str(loaded(dl).absolute())
    assert_exact(dl, files)
    assert "waiting for the checkpoint load to finish" in err


def test_the_helper_returns_the_same_path_as_after_a_sequential_load(s3_env, s3_prefix, files, tmp_path):
    env = agent_env(s3_env, s3_prefix, tmp_path / "dl")
    plain = subprocess.run([AGENT, "run", "--", sys.executable, script(tmp_path, "asks.py", ASKS)], env=env,
                           capture_output=True, text=True, timeout=120)
    early = subprocess.run([AGENT, "run", "--start-early", "--", sys.executable, str(tmp_path / "asks.py")],
                           env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == early.returncode == 0, early.stderr
    assert json.loads(plain.stdout)["path"] == json.loads(early.stdout)["path"]


def test_a_failed_early_load_raises_in_the_helper_and_says_why(s3_env, s3_prefix, files, tmp_path):
    corrupt(s3_env, s3_prefix, files)
    env = agent_env(s3_env, s3_prefix, tmp_path / "dl", CKPT_AGENT_MAX_RATE=RATE)
    asks = script(tmp_path, "asks.py", ASKS + "\nopen(sys.argv[1], 'w').write('trained')\n")
    marker = tmp_path / "trained"
    result = subprocess.run([AGENT, "run", "--start-early", "--", sys.executable, asks, str(marker)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "CheckpointLoadError: the checkpoint load failed:" in result.stderr
    assert "checksum mismatch" in result.stderr.rsplit("CheckpointLoadError", 1)[1]
    assert result.stdout == "" and not marker.exists()


@pytest.mark.parametrize("shape", ["exec", "shell"])
def test_a_failed_early_load_stops_a_trainer_that_never_asks(s3_env, s3_prefix, files, tmp_path, shape):
    corrupt(s3_env, s3_prefix, files)
    marker = tmp_path / "trained"
    argv = [sys.executable, script(tmp_path, "never.py", NEVER_ASKS), str(marker)]
    env = agent_env(s3_env, s3_prefix, tmp_path / "dl", CKPT_AGENT_MAX_RATE=RATE, CKPT_AGENT_START_EARLY="1",
                    CKPT_AGENT_GRACE_SECONDS="3")
    if shape == "shell":  # as the platform starts it: BT_START_COMMANDS, the trainer a child of the agent
        env["BT_START_COMMANDS"] = json.dumps([" ".join(argv)])
        argv = []
    started = time.monotonic()
    result = subprocess.run([AGENT, "run", "--", *argv] if argv else [AGENT, "run"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 30  # stopped, not left to run its 60 s
    assert not marker.exists()
    assert "the checkpoint load failed" in result.stderr and "stopping the trainer (SIGTERM)" in result.stderr
    # exec: the trainer keeps our PID, so its status is SIGTERM's (killed by it); as our child, the load's own code (5)
    assert result.returncode == (-15 if shape == "exec" else 5), result.stderr


def test_a_trainer_that_ignores_sigterm_is_killed_after_the_grace_period(s3_env, s3_prefix, files, tmp_path):
    corrupt(s3_env, s3_prefix, files)
    marker = tmp_path / "trained"
    stubborn = script(tmp_path, "stubborn.py", "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      + NEVER_ASKS)
    env = agent_env(s3_env, s3_prefix, tmp_path / "dl", CKPT_AGENT_GRACE_SECONDS="1")
    result = subprocess.run([AGENT, "run", "--start-early", "--", sys.executable, stubborn, str(marker)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr  # SIGKILL
    assert "did not exit within the 1 s grace period; killing it" in result.stderr
    assert not marker.exists()


def test_nothing_appears_under_a_final_name_before_it_is_verified(s3_env, s3_prefix, files, tmp_path):
    """A trainer looking at the folder while the early load runs sees temporary names, and any final
    name it sees already holds the verified bytes."""
    dl = tmp_path / "dl"
    watcher = script(tmp_path, "watch.py", """
import hashlib, json, os, time
base = os.environ["BT_LOAD_CHECKPOINT_DIR"]
root, record = os.path.join(base, "rank-0"), os.path.join(base, ".ckpt-agent", "loaded-rank-0.json")
seen = {}
while not os.path.exists(record):
    for folder, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(folder, n), root)
            if rel not in seen and not n.endswith(".ckpt-incomplete"):
                with open(os.path.join(folder, n), "rb") as f:
                    seen[rel] = hashlib.sha256(f.read()).hexdigest()
            seen.setdefault(rel, "")
    time.sleep(0.005)
print(json.dumps(seen))
""")
    env = agent_env(s3_env, s3_prefix, dl, CKPT_AGENT_MAX_RATE=RATE)
    result = subprocess.run([AGENT, "run", "--start-early", "--", sys.executable, watcher], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert f"{NAME}/model.bin.ckpt-incomplete" in seen  # it watched while the load ran
    expected = {f"{NAME}/{rel}": hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    assert {rel: sha for rel, sha in seen.items() if not rel.endswith(".ckpt-incomplete")}.items() <= expected.items()


def test_with_checkpointing_a_failed_early_load_uploads_nothing_the_trainer_saved(s3_env, s3_prefix, files, tmp_path):
    """Supervise mode: uploads start only once the load is verified, so a checkpoint the trainer wrote
    before it was stopped never becomes the job's latest."""
    corrupt(s3_env, s3_prefix, files)
    ckpts = tmp_path / "ckpts"
    saves = script(tmp_path, "saves.py", f"""
import os, time
folder = os.path.join(os.environ["BT_CHECKPOINT_DIR"], "step-1")
os.makedirs(folder)
with open(os.path.join(folder, "weights.bin"), "wb") as f:
    f.write(b"untrained" * 1000)
time.sleep(60)
open({str(tmp_path / "trained")!r}, "w").write("x")
""")
    env = agent_env(s3_env, s3_prefix, tmp_path / "dl", CKPT_AGENT_MAX_RATE=RATE, CKPT_AGENT_GRACE_SECONDS="3",
                    BT_CHECKPOINTING_ENABLED="1", BT_TRAINING_JOB_ID="job-scratch", BT_CHECKPOINT_DIR=str(ckpts),
                    CKPT_AGENT_QUIET_SECONDS="0.2", CKPT_AGENT_POLL_SECONDS="0.1", CKPT_AGENT_COMMIT_ON_QUIET="1")
    result = subprocess.run([AGENT, "run", "--start-early", "--", sys.executable, saves], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 5, result.stderr
    assert (ckpts / "step-1" / "weights.bin").exists()  # it did write, before it was stopped
    assert not (tmp_path / "trained").exists()
    assert "nothing the trainer wrote is uploaded" in result.stderr
    listed = s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix=f"{s3_prefix}/jobs/job-scratch/")
    assert listed.get("KeyCount", 0) == 0
