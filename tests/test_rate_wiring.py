"""CKPT_AGENT_MAX_RATE and the store's throttling answers, wired through `load` and `save`.

The cap is checked as a bound on bytes, never as a duration to reach. An upload through the fault
proxy: no PUT bodies sent between two readings of the proxy's log exceed `burst + rate x elapsed`
on the real clock. A load, where loopback sockets buffer megabytes ahead of the reader: a fake
clock in the bucket shows every byte the proxy forwarded was paid for at the rate.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import ckpt_agent.commands.save as save_command
import ckpt_agent.load.pipeline
import ckpt_agent.sync.loop
from bench.seaweed import SeaweedServer
from ckpt_agent.cli import main
from ckpt_agent.errors import ThrottledError
from ckpt_agent.runtime.ratelimit import BURST_SECONDS, Aimd, ConcurrencyGate, Limiter, TokenBucket, limiter
from ckpt_agent.runtime.retry import Backoff
from ckpt_agent.stores import layout
from tests.support.faultproxy import FaultProxy
from tests.support.helpers import (
    JOB,
    NAME,
    FakeClock,
    agent_env,
    assert_exact,
    assert_one_line_failure,
    file_bytes,
    payload,
    run_agent,
    upload_checkpoint,
)

MIB = 1 << 20
RATE = 4_000_000  # CKPT_AGENT_MAX_RATE=4MB
BURST = RATE * BURST_SECONDS
WORKERS = 4
SLOW_DOWN = re.compile(r"store asked to slow down: (\d+) requests? at once")


class Sampler:
    """`measure()` read every few milliseconds on a thread, until stopped, as (clock before, clock
    after, value): what moved between two readings moved between the first's before and the
    second's after, however late the thread was scheduled."""

    def __init__(self, measure: Callable[[], object], every: float = 0.02) -> None:
        self.samples: list[tuple[float, float, object]] = []
        self._measure, self._every = measure, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._every)
        self._sample()

    def _sample(self) -> None:
        before = time.monotonic()
        value = self._measure()
        self.samples.append((before, time.monotonic(), value))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def lines(text: str, pattern: re.Pattern[str]) -> list[re.Match[str]]:
    return [m for line in text.splitlines() if (m := pattern.search(line))]


@pytest.fixture
def fake_clock_buckets(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Loads and saves build their limits as usual, with the bucket's time on a fake clock."""
    clock = FakeClock()

    def on_fake_time(max_rate, workers, cancel, tell) -> Limiter:
        built = limiter(max_rate, workers, cancel, tell)
        assert built.bucket is not None  # CKPT_AGENT_MAX_RATE arrived
        return dataclasses.replace(built, bucket=TokenBucket(max_rate, clock.sleep, clock=clock))

    for module in (ckpt_agent.load.pipeline, save_command, ckpt_agent.sync.loop):
        monkeypatch.setattr(module, "limiter", on_fake_time)
    return clock


@pytest.fixture
def three_files(s3_env: SeaweedServer, s3_prefix: str, tmp_path: Path) -> dict[str, bytes]:
    """12 MiB in three files: three seconds at the cap, a fraction of one without it."""
    files = {f"shard-{i}.bin": payload(4 * MIB, f"rate{i}") for i in range(3)}
    return upload_checkpoint(s3_env, s3_prefix, tmp_path / "src", files)


def test_a_capped_load_from_s3_pays_for_every_byte_the_proxy_forwarded(
        s3_env, s3_prefix, three_files, proxy, tmp_path, fake_clock_buckets):
    """On the fake clock, since loopback sockets buffer megabytes ahead of a paced reader: the
    proxy's counter against a real clock would measure the kernel's buffers, not the cap."""
    clock = fake_clock_buckets
    dl = tmp_path / "dl"
    env = agent_env(s3_env, s3_prefix, dl, endpoint=proxy.endpoint, CKPT_AGENT_MAX_RATE="4MB",
                    CKPT_AGENT_WORKERS=str(WORKERS))
    assert main(["load"], env) == 0
    assert_exact(dl, three_files)
    forwarded = file_bytes(proxy)
    assert forwarded == sum(len(d) for d in three_files.values())
    # granted over the fake time <= burst + rate x time; several threads' waits may add up, never shrink
    assert clock() >= (forwarded - BURST) / RATE - 1e-9


def put_sizes(proxy: FaultProxy, sizes: dict[str, int]) -> dict[str, tuple[bool, int]]:
    """Each file PUT the proxy has seen: (answered, i.e. its whole body was forwarded; size)."""
    seen = {}
    for e in proxy.exchanges:
        rel = e.target.split("?")[0].rsplit("/", 1)[-1]
        if e.method == "PUT" and rel in sizes:
            seen[rel] = (e.status is not None, sizes[rel])
    return seen


def uploaded_between(samples: list[tuple[float, float, dict]]) -> list[tuple[float, float, int]]:
    """(t0, t1, bytes) for every pair of samples: the bodies of PUTs not yet begun at the first and
    answered by the second were all sent between the two."""
    out = []
    for i, (t0, _, before) in enumerate(samples):
        for _, t1, after in samples[i:]:
            out.append((t0, t1, sum(size for rel, (done, size) in after.items() if done and rel not in before)))
    return out


def test_a_capped_save_never_sends_more_than_burst_plus_rate_times_elapsed(s3_env, s3_prefix, proxy, tmp_path):
    folder = tmp_path / NAME
    files = {f"shard-{i}.bin": payload(3 * MIB // 2, f"up{i}") for i in range(8)}  # 12 MiB, no packs
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    sizes = {rel: len(data) for rel, data in files.items()}
    env = agent_env(s3_env, s3_prefix, tmp_path / "dl", endpoint=proxy.endpoint, CKPT_AGENT_MAX_RATE="4MB",
                    CKPT_AGENT_WORKERS=str(WORKERS), BT_TRAINING_JOB_ID=JOB)
    with Sampler(lambda: put_sizes(proxy, sizes)) as sampler:
        result = run_agent(["save", str(folder)], env)
    assert result.returncode == 0, result.stderr
    assert {rel for rel, (done, _) in put_sizes(proxy, sizes).items() if done} == set(files)
    excess = max(sent - (BURST + RATE * (t1 - t0)) for t0, t1, sent in uploaded_between(sampler.samples))
    assert excess <= 0, f"{excess:.0f} bytes over the cap"
    for rel, data in files.items():
        key = f"{s3_prefix}/{layout.file_key(JOB, NAME, 0, rel)}"
        assert s3_env.client().get_object(Bucket=s3_env.bucket, Key=key)["Body"].read() == data


@pytest.fixture
def gates(monkeypatch: pytest.MonkeyPatch) -> list[Limiter]:
    """Every Limiter a load or a save builds, as built from the settings."""
    built: list[Limiter] = []

    def recording(*args, **kwargs) -> Limiter:
        built.append(limiter(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ckpt_agent.load.pipeline, "limiter", recording)
    monkeypatch.setattr(save_command, "limiter", recording)
    return built


def test_slowdown_answers_cut_concurrency_the_load_still_ends_byte_exact_and_each_cut_is_said_once(
        s3_env, s3_prefix, three_files, proxy, tmp_path, gates, capsys):
    rule = proxy.add_rule("status", method="GET", range_only=True, status=503, count=3)
    dl = tmp_path / "dl"
    env = agent_env(s3_env, s3_prefix, dl, endpoint=proxy.endpoint, CKPT_AGENT_WORKERS=str(WORKERS))
    assert main(["load"], env) == 0
    assert_exact(dl, three_files)
    said = lines(capsys.readouterr().err, SLOW_DOWN)
    (built,) = gates
    assert rule.fired == 3
    assert 1 <= built.gate.cuts <= rule.fired
    assert len(said) == built.gate.cuts  # once per cut, not once per throttled request
    assert int(said[0][1]) == WORKERS // 2


def test_a_part_put_throttled_past_the_stores_retries_cuts_the_gate_and_the_save_commits(
        s3_env, s3_prefix, proxy, tmp_path, gates, capsys):
    folder = tmp_path / NAME
    folder.mkdir()
    data = payload(2 * MIB, "throttled")
    (folder / "model.bin").write_bytes(data)
    # the native engine tries a PUT six times itself: the seventh, after the gate's cut, gets through
    rule = proxy.add_rule("status", method="PUT", path="model.bin", status=503, count=6)
    env = agent_env(s3_env, s3_prefix, tmp_path / "dl", endpoint=proxy.endpoint, BT_TRAINING_JOB_ID=JOB,
                    CKPT_AGENT_WORKERS=str(WORKERS))
    assert main(["save", str(folder)], env) == 0
    assert rule.fired == 6
    (built,) = gates
    assert built.gate.cuts == 1
    assert [int(m[1]) for m in lines(capsys.readouterr().err, SLOW_DOWN)] == [WORKERS // 2]
    key = f"{s3_prefix}/{layout.file_key(JOB, NAME, 0, 'model.bin')}"
    assert s3_env.client().get_object(Bucket=s3_env.bucket, Key=key)["Body"].read() == data


@pytest.mark.parametrize("value", ["fast", "0", "-5MB", "5 parsecs"])
def test_a_bad_max_rate_is_a_one_line_config_error_and_training_never_starts(value, s3_env, s3_prefix, tmp_path):
    marker = tmp_path / "trained"
    env = agent_env(s3_env, s3_prefix, tmp_path / "dl", CKPT_AGENT_MAX_RATE=value)
    result = run_agent(["run", "--", "touch", str(marker)], env)
    assert_one_line_failure(result, 2, "CKPT_AGENT_MAX_RATE")
    assert not marker.exists()
    assert not (tmp_path / "dl").exists()


def test_save_refuses_a_bad_max_rate_before_uploading(s3_env, s3_prefix, proxy, tmp_path):
    (tmp_path / NAME).mkdir()
    (tmp_path / NAME / "model.bin").write_bytes(b"weights")
    env = agent_env(s3_env, s3_prefix, tmp_path / "dl", endpoint=proxy.endpoint, BT_TRAINING_JOB_ID=JOB,
                    CKPT_AGENT_MAX_RATE="lots")
    assert_one_line_failure(run_agent(["save", str(tmp_path / NAME)], env), 2, "CKPT_AGENT_MAX_RATE")
    assert proxy.requests() == 0


# ---- the local store: a folder that may be a network mount, so the cap applies there too -----------

LOCAL_RATE = 1_000_000


def test_the_cap_paces_saves_to_and_loads_from_a_local_store(tmp_path, fake_clock_buckets):
    clock = fake_clock_buckets
    folder = tmp_path / NAME
    files = {"model.bin": payload(3 * MIB // 2, "local-a"), "sub/optimizer.pt": payload(MIB + 5, "local-b")}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    total = sum(len(d) for d in files.values())
    dl = tmp_path / "dl"
    env = {"BT_CHECKPOINT_STORE": str(tmp_path / "store"), "BT_TRAINING_JOB_ID": JOB, "CKPT_AGENT_WORKERS": "1",
           "CKPT_AGENT_MAX_RATE": "1MB",
           "BT_LOAD_CHECKPOINT_CONFIG": f'{{"enabled": true, "download_folder": "{dl}", "checkpoints": '
                                        f'[{{"typ": "baseten_named_checkpoint", "checkpoint_name": "{NAME}", '
                                        f'"job_id": "{JOB}"}}]}}'}
    paid = (total - LOCAL_RATE * BURST_SECONDS) / LOCAL_RATE  # one worker: the burst, then every byte at the rate
    assert main(["save", str(folder)], env) == 0
    assert clock() == pytest.approx(paid)
    for rel, data in files.items():
        assert (tmp_path / "store" / layout.file_key(JOB, NAME, 0, rel)).read_bytes() == data
    assert main(["load"], env) == 0
    assert clock() == pytest.approx(2 * paid)
    assert_exact(dl, files)


# ---- the gate's report of a cut -------------------------------------------------------------------


def test_aimd_says_which_throttles_cut():
    aimd = Aimd(8)
    assert aimd.throttled(0, now=0.0) is True
    assert aimd.throttled(0, now=0.0) is False  # started before the cut: the same overload
    assert aimd.limit == 4


def test_the_gate_tells_of_each_cut_once_with_the_new_limit():
    heard: list[int] = []
    gate = ConcurrencyGate(8, on_cut=heard.append, backoff=Backoff(base=0.0))
    for _ in range(2):
        with pytest.raises(ThrottledError), gate.slot():
            raise ThrottledError("503 SlowDown")
    assert heard == [4, 2] and gate.cuts == 2


def test_the_cap_paces_the_sidecars_uploads(tmp_path, fake_clock_buckets):
    clock = fake_clock_buckets
    checkpoints = tmp_path / "checkpoints"
    data = payload(2 * MIB, "sidecar")
    (checkpoints / "snapshot-3").mkdir(parents=True)
    (checkpoints / "snapshot-3" / "model.bin").write_bytes(data)
    env = {"BT_CHECKPOINT_STORE": str(tmp_path / "store"), "BT_TRAINING_JOB_ID": JOB, "CKPT_AGENT_WORKERS": "1",
           "CKPT_AGENT_MAX_RATE": "1MB", "BT_CHECKPOINT_DIR": str(checkpoints), "CKPT_AGENT_QUIET_SECONDS": "0",
           "CKPT_AGENT_COMMIT_ON_QUIET": "1"}
    assert main(["sync", "--once"], env) == 0
    assert (tmp_path / "store" / layout.file_key(JOB, "snapshot-3", 0, "model.bin")).read_bytes() == data
    assert clock() == pytest.approx((len(data) - LOCAL_RATE * BURST_SECONDS) / LOCAL_RATE)
