"""The byte-rate cap and the throttle-aware concurrency gate, against a fake clock and real threads."""

from __future__ import annotations

import io
import random
import signal
import threading

import pytest

from bench.seaweed import SeaweedServer
from ckpt_agent.errors import Interrupted, StoreError, ThrottledError, TransientError
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.runtime.ratelimit import Aimd, ConcurrencyGate, TokenBucket, paced
from ckpt_agent.runtime.retry import Backoff, retry
from ckpt_agent.stores.s3common import store_error
from ckpt_agent.stores.s3native import NativeS3Store
from tests.support.faultproxy import LOOPBACK, FaultProxy
from tests.support.helpers import FakeClock

DEADLINE = 10.0  # seconds a test waits for a thread before failing; never reached when it works


def worst_window(grants: list[tuple[float, int]], burst: float, rate: float) -> float:
    """The largest excess of bytes granted over `burst + rate * window` across every window of grants."""
    worst = float("-inf")
    for i, (start, _) in enumerate(grants):
        total = 0
        for end, n in grants[i:]:
            total += n
            worst = max(worst, total - (burst + rate * (end - start)))
    return worst


def test_token_bucket_grants_no_more_than_burst_plus_rate_over_any_window():
    clock = FakeClock()
    bucket = TokenBucket(1000, clock.sleep, burst=250, clock=clock)
    grants = []
    for n in (100, 200, 50, 250, 10, 10, 250, 250, 5, 250):
        bucket.take(n)
        grants.append((clock(), n))
    assert worst_window(grants, 250, 1000) <= 1e-9
    # and no slower than the cap: back-to-back takes finish when the last byte is paid for
    assert clock() == pytest.approx((sum(n for _, n in grants) - 250) / 1000)


def test_token_bucket_take_larger_than_the_burst_waits_for_all_of_it():
    clock = FakeClock()
    bucket = TokenBucket(1000, clock.sleep, burst=250, clock=clock)
    bucket.take(2250)
    assert clock() == pytest.approx(2.0)


def test_token_bucket_refills_while_idle_but_never_beyond_the_burst():
    clock = FakeClock()
    bucket = TokenBucket(1000, clock.sleep, burst=250, clock=clock)
    bucket.take(250)
    assert clock.slept == []  # a full bucket grants its burst at once
    clock.now += 60.0  # a long idle minute is worth one burst, not 60 000 bytes
    bucket.take(250)
    assert clock.slept == []
    bucket.take(100)
    assert clock.slept == [pytest.approx(0.1)]


def test_token_bucket_holds_the_cap_when_threads_share_it():
    clock = FakeClock()
    bucket = TokenBucket(500, clock.sleep, burst=256, clock=clock)
    grants: list[tuple[float, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def worker() -> None:
        start.wait(DEADLINE)
        for n in (64, 128, 32, 256, 16) * 5:
            bucket.take(n)
            with lock:
                grants.append((clock(), n))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads)
    total = sum(n for _, n in grants)
    assert total == 4 * 5 * (64 + 128 + 32 + 256 + 16)
    grants.sort()
    # a thread may see the shared fake clock after another moved it on, so only windows from the
    # start are exact here: up to any moment, no more than the burst plus the rate times the time
    granted = 0
    for moment, n in grants:
        granted += n
        assert granted <= 256 + 500 * moment + 1e-6
    assert grants[-1][0] == pytest.approx((total - 256) / 500)  # every reservation counted exactly once


def test_a_signal_ends_a_wait_for_the_rate_cap():
    cancel = Cancel()
    bucket = TokenBucket(1, cancel.sleep, burst=1)
    outcome: dict[str, BaseException] = {}
    waiting = threading.Event()

    def take_a_day_of_bytes() -> None:
        waiting.set()
        try:
            bucket.take(86_400)
        except Interrupted as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=take_a_day_of_bytes, daemon=True)
    thread.start()
    assert waiting.wait(DEADLINE)
    cancel.signal(signal.SIGTERM)
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), Interrupted)


def test_paced_reader_charges_what_was_read_and_refunds_a_short_read():
    clock = FakeClock()
    bucket = TokenBucket(100, clock.sleep, burst=100, clock=clock)
    reader = paced(io.BytesIO(b"x" * 150), bucket)
    buf = bytearray(100)
    assert reader.readinto(buf) == 100  # the burst: no wait
    assert reader.readinto(buf) == 50  # reserves 100, waits for them, refunds the 50 not read
    assert clock() == pytest.approx(1.0)
    assert reader.read(100) == b""  # the 50 refunded cover half of this reservation: half a second more
    assert clock() == pytest.approx(1.5)
    reader.seek(0)  # anything else goes to the stream itself
    assert reader.read() == b"x" * 150


def test_paced_reader_reads_at_most_one_burst_at_a_time():
    clock = FakeClock()
    bucket = TokenBucket(100, clock.sleep, burst=40, clock=clock)
    reader = paced(io.BytesIO(b"y" * 1000), bucket)
    assert reader.readinto(bytearray(1 << 20)) == 40
    assert len(reader.read(1 << 20)) == 40


def test_no_cap_hands_back_the_stream_itself():
    raw = io.BytesIO(b"abc")
    assert paced(raw, None) is raw


def test_token_bucket_refuses_a_rate_that_is_not_positive():
    with pytest.raises(ValueError):
        TokenBucket(0, lambda _s: None)


def test_aimd_halves_on_throttle_down_to_one_and_ramps_back_one_per_window():
    aimd = Aimd(8, Backoff(base=1.0, cap=100.0))
    aimd.throttled(aimd.epoch, now=0.0)
    assert aimd.limit == 4
    for expected in (5, 6, 7, 8):
        for _ in range(expected - 2):
            aimd.succeeded()
        assert aimd.limit == expected - 1  # one success short of a full window
        aimd.succeeded()
        assert aimd.limit == expected
    for _ in range(100):
        aimd.succeeded()
    assert aimd.limit == 8  # never above the configured workers
    for _ in range(5):
        aimd.throttled(aimd.epoch, now=0.0)
    assert aimd.limit == 1  # never below one


def test_aimd_cuts_once_for_requests_already_in_flight_when_it_cut():
    aimd = Aimd(16)
    started = aimd.epoch
    aimd.throttled(started, now=0.0)
    aimd.throttled(started, now=0.0)
    aimd.throttled(started, now=0.0)
    assert aimd.limit == 8
    aimd.throttled(aimd.epoch, now=0.0)
    assert aimd.limit == 4


def test_aimd_pauses_longer_after_each_cut_in_a_row():
    aimd = Aimd(4, Backoff(base=1.0, cap=100.0))
    pauses = []
    for _ in range(4):
        aimd.throttled(aimd.epoch, now=10.0)
        pauses.append(aimd.hold_until - 10.0)
    for cut, pause in enumerate(pauses, start=1):
        assert 0.5 * 2 ** (cut - 1) <= pause <= 2 ** (cut - 1)  # Backoff.delay's jittered doubling


def wait_for(predicate, what: str) -> None:
    """Poll a condition other threads reach, failing at the deadline; an Event that is never set
    serves as the pause between polls."""
    pause = threading.Event()
    for _ in range(int(DEADLINE / 0.002)):
        if predicate():
            return
        pause.wait(0.002)
    raise AssertionError(f"not reached within {DEADLINE} s: {what}")


def test_gate_never_lets_more_requests_in_than_the_limit():
    gate = ConcurrencyGate(3, poll=0.01)
    lock = threading.Lock()
    inside = {"now": 0, "peak": 0, "entered": 0}
    entered: list[int] = []
    release = [threading.Event() for _ in range(7)]

    def request(i: int) -> None:
        with gate.slot():
            with lock:
                entered.append(i)
                inside["now"] += 1
                inside["entered"] += 1
                inside["peak"] = max(inside["peak"], inside["now"])
            release[i].wait(DEADLINE)
            with lock:
                inside["now"] -= 1

    threads = [threading.Thread(target=request, args=(i,), daemon=True) for i in range(7)]
    for t in threads:
        t.start()
    wait_for(lambda: gate.waiting == 4 and inside["entered"] == 3, "three inside and four held at the gate")
    release[entered[0]].set()  # one leaves: exactly one more comes in
    wait_for(lambda: gate.waiting == 3 and inside["entered"] == 4, "a fourth inside, three still held")
    assert inside["now"] == 3
    for event in release:
        event.set()
    for t in threads:
        t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads)
    assert inside["peak"] == 3  # the limit, and really concurrent: not one at a time
    assert inside["entered"] == 7 and gate.active == 0


def test_gate_halves_after_a_throttle_and_pauses_until_the_backoff_passes():
    clock = FakeClock()
    gate = ConcurrencyGate(8, clock=clock, backoff=Backoff(base=4.0, cap=4.0), poll=0.01)
    with pytest.raises(ThrottledError), gate.slot():
        raise ThrottledError("503 SlowDown")
    assert gate.limit == 4
    entered = threading.Event()

    def next_request() -> None:
        with gate.slot():
            entered.set()

    thread = threading.Thread(target=next_request, daemon=True)
    thread.start()
    wait_for(lambda: gate.waiting == 1, "the next request held by the pause")
    assert not entered.is_set()
    clock.now += 4.0  # the pause (at most base=4 s) has passed
    assert entered.wait(DEADLINE)
    thread.join(DEADLINE)


def test_gate_counts_other_failures_neither_as_throttle_nor_success():
    gate = ConcurrencyGate(4)
    with pytest.raises(StoreError), gate.slot():
        raise StoreError("access denied")
    assert gate.limit == 4 and gate.active == 0


def test_a_signal_ends_a_wait_at_the_gate():
    cancel = Cancel()
    gate = ConcurrencyGate(1, check=cancel.check, poll=0.01)
    outcome: dict[str, BaseException] = {}

    def second_request() -> None:
        try:
            with gate.slot():
                outcome["entered"] = AssertionError("entered while the only slot was taken")
        except Interrupted as exc:
            outcome["error"] = exc

    with gate.slot():
        thread = threading.Thread(target=second_request, daemon=True)
        thread.start()
        wait_for(lambda: gate.waiting == 1, "the second request held at the gate")
        cancel.signal(signal.SIGINT)
        thread.join(DEADLINE)
        assert not thread.is_alive()
    assert isinstance(outcome.get("error"), Interrupted) and "entered" not in outcome


@pytest.mark.parametrize(("code", "status"), [("SlowDown", 503), ("", 503), ("ServiceUnavailable", 503),
                                              ("", 429), ("TooManyRequestsException", 400),
                                              ("RequestLimitExceeded", 400), ("Throttling", 400)])
def test_store_error_marks_throttling_answers_so_the_gate_can_see_them(code, status):
    error = store_error(code, status, "s3://b/k", "GET", "b")
    assert isinstance(error, ThrottledError) and isinstance(error, TransientError)


@pytest.mark.parametrize(("code", "status", "kind"), [("InternalError", 500, TransientError),
                                                      ("RequestTimeout", 400, TransientError),
                                                      ("", 502, TransientError),
                                                      ("BadDigest", 400, StoreError)])
def test_store_error_keeps_other_failures_unthrottled(code, status, kind):
    error = store_error(code, status, "s3://b/k", "GET", "b")
    assert type(error) is kind


# ---- against a real S3 server: SeaweedFS behind the fault proxy, the native engine ---------------

KEY = "limits/blob.bin"
SIZE = 1 << 20


@pytest.fixture
def through_proxy(s3_env: SeaweedServer, s3_prefix: str):
    """A 1 MiB object put straight into SeaweedFS, and a store that reads it through the proxy."""
    data = random.Random("limits").randbytes(SIZE)
    direct = NativeS3Store(s3_env.bucket, s3_prefix, s3_env.env())
    direct.write_bytes(KEY, data)
    with FaultProxy(LOOPBACK, s3_env.s3_port) as proxy:
        yield NativeS3Store(s3_env.bucket, s3_prefix, {**s3_env.env(), "AWS_ENDPOINT_URL": proxy.endpoint}), proxy, data


def read_all(reader, size: int, piece: int = 256 << 10) -> tuple[bytes, int]:
    """The body, and the largest single read the reader handed back."""
    buf, out, largest = bytearray(piece), bytearray(), 0
    while len(out) < size:
        n = reader.readinto(buf)
        assert n, "body ended early"
        largest = max(largest, n)
        out += buf[:n]
    reader.close()
    return bytes(out), largest


@pytest.mark.seaweed
def test_a_slowdown_answer_from_s3_halves_the_gate_and_the_retry_gets_the_bytes(through_proxy):
    store, proxy, data = through_proxy
    rule = proxy.add_rule("status", method="GET", path=KEY, range_only=True, status=503, count=1)
    gate = ConcurrencyGate(8)

    def ranged_get() -> bytes:
        with gate.slot():
            return read_all(store.open_range(KEY, 0, SIZE), SIZE)[0]

    with pytest.raises(ThrottledError, match="SlowDown"), gate.slot():
        store.open_range(KEY, 0, SIZE)
    assert rule.fired == 1 and gate.limit == 4
    assert retry(ranged_get, Backoff(base=0.001), sleep=Cancel().sleep) == data
    assert gate.active == 0


@pytest.mark.seaweed
def test_paced_reads_from_s3_pay_for_every_byte_the_proxy_forwarded(through_proxy):
    store, proxy, data = through_proxy
    clock = FakeClock()
    bucket = TokenBucket(256 << 10, clock.sleep, burst=64 << 10, clock=clock)
    body, largest = read_all(paced(store.open_range(KEY, 0, SIZE), bucket), SIZE)
    assert body == data
    assert largest <= 64 << 10  # never more than one burst at once
    assert proxy.body_bytes("GET", KEY) == SIZE
    assert clock() == pytest.approx((SIZE - (64 << 10)) / (256 << 10))  # 3.75 s of fake time at 256 KiB/s
