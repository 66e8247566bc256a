"""Proves tests/support/faultproxy/ works: pass-through to a real SeaweedFS, each fault as a client sees
it, fire counts, exact byte accounting, upstream "restart", and chunked upstream responses."""

from __future__ import annotations

import http.client
import io
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from bench.seaweed import BUCKET
from tests.support.faultproxy import LOOPBACK, FaultProxy
from tests.support.helpers import wait_for

pytestmark = pytest.mark.seaweed

PREFIX = f"test-faultproxy-{uuid.uuid4().hex}"  # this module's own keys in the shared bucket
KEY = f"{PREFIX}/blob.bin"
BLOB = random.Random(1234).randbytes(1024 * 1024 + 17)


@pytest.fixture(scope="module")
def server(seaweed):
    """The session's SeaweedFS server, holding BLOB at KEY."""
    seaweed.client().put_object(Bucket=seaweed.bucket, Key=KEY, Body=BLOB)
    return seaweed


def s3_via(proxy, server, *, attempts=1, read_timeout=10):
    env = server.env()
    return boto3.client(
        "s3", endpoint_url=proxy.endpoint, region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"total_max_attempts": attempts, "mode": "standard"},
                      connect_timeout=5, read_timeout=read_timeout),
    )


@pytest.fixture
def s3(proxy, server):
    return s3_via(proxy, server)


@dataclass
class Raw:
    """What a raw socket client saw: parsed head, body bytes, and how the stream ended."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    ending: str  # "eof" (FIN), "rst", or "timeout"
    last_data_at: float
    ended_at: float
    chunks: list[bytes] = field(default_factory=list)


def raw_get(proxy, s3, key=KEY, *, timeout=5.0) -> Raw:
    """GET a presigned URL over a plain socket (Connection: close) and record every byte."""
    url = urlsplit(s3.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=600))
    lines = [f"GET {url.path}?{url.query} HTTP/1.1", f"Host: {url.netloc}", "Connection: close"]
    data = bytearray()
    ending = "eof"
    last = ended = time.monotonic()
    sock = None
    try:  # during pause_upstream even connect() may see the reset
        sock = socket.create_connection((LOOPBACK, proxy.port), timeout=timeout)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        for _ in range(100_000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            last = time.monotonic()
    except (ConnectionResetError, BrokenPipeError):
        ending = "rst"
    except TimeoutError:
        ending = "timeout"
    finally:
        ended = time.monotonic()
        if sock is not None:
            sock.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status, headers = None, {}
    if head:
        first, *rest = head.decode("latin-1").split("\r\n")
        status = int(first.split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest)}
    return Raw(status, headers, body, ending, last, ended)


# ---- pass-through ----------------------------------------------------------------------------


def test_boto3_put_get_list_head_delete_pass_through_with_host_header_unchanged(
        proxy, s3, server):
    s3.put_object(Bucket=server.bucket, Key=f"{PREFIX}/pt/one.bin", Body=b"one" * 1000)
    s3.put_object(Bucket=server.bucket, Key=f"{PREFIX}/pt/two.bin", Body=io.BytesIO(b"two" * 5000))
    assert s3.get_object(Bucket=server.bucket, Key=f"{PREFIX}/pt/one.bin")["Body"].read() == b"one" * 1000
    listed = s3.list_objects_v2(Bucket=server.bucket, Prefix=f"{PREFIX}/pt/")
    assert [o["Key"] for o in listed["Contents"]] == [f"{PREFIX}/pt/one.bin", f"{PREFIX}/pt/two.bin"]
    assert s3.head_object(Bucket=server.bucket, Key=f"{PREFIX}/pt/two.bin")["ContentLength"] == 15000
    s3.delete_object(Bucket=server.bucket, Key=f"{PREFIX}/pt/one.bin")
    # the server itself (not via the proxy) sees what was written through the proxy
    direct = server.client()
    assert direct.get_object(Bucket=server.bucket, Key=f"{PREFIX}/pt/two.bin")["Body"].read() == b"two" * 5000
    with pytest.raises(ClientError):
        direct.head_object(Bucket=server.bucket, Key=f"{PREFIX}/pt/one.bin")
    methods = [(e.method, e.status) for e in proxy.exchanges]
    assert methods == [("PUT", 200), ("PUT", 200), ("GET", 200), ("GET", 200), ("HEAD", 200),
                       ("DELETE", 204)]
    stats = proxy.stats
    assert stats.requests == 6
    assert stats.connections < stats.requests  # client keep-alive is honoured


def test_body_bytes_accounting_is_exact_per_request_per_rule_and_overall(proxy, s3, server):
    counter = proxy.add_rule("reset", path=KEY, count=0)  # count=0: never fires, only counts
    assert s3.get_object(Bucket=server.bucket, Key=KEY)["Body"].read() == BLOB
    part = s3.get_object(Bucket=server.bucket, Key=KEY, Range="bytes=100-1099")["Body"].read()
    assert part == BLOB[100:1100]
    s3.head_object(Bucket=server.bucket, Key=KEY)
    assert proxy.body_bytes("GET", KEY) == len(BLOB) + 1000
    assert proxy.body_bytes("HEAD", KEY) == 0
    assert proxy.requests("GET", KEY) == 2
    assert (counter.seen, counter.fired, counter.body_bytes) == (3, 0, len(BLOB) + 1000)
    assert proxy.stats.body_bytes == len(BLOB) + 1000
    proxy.reset_stats()
    assert proxy.stats.body_bytes == 0 and proxy.exchanges == []


# ---- faults ----------------------------------------------------------------------------------


def test_reset_after_n_body_bytes_delivers_exactly_n_bytes_then_rst(proxy, s3):
    rule = proxy.add_rule("reset", method="GET", path=KEY, offset=300_000)
    raw = raw_get(proxy, s3)
    assert raw.status == 200 and int(raw.headers["content-length"]) == len(BLOB)
    assert raw.ending == "rst"
    assert raw.body == BLOB[:300_000]
    assert rule.fired == 1 and rule.body_bytes == 300_000
    assert proxy.body_bytes("GET", KEY) == 300_000
    proxy.add_rule("reset", method="GET", path=KEY, offset=1000)
    with pytest.raises(BotoCoreError):  # boto3 sees the reset while streaming the body
        s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read()


def test_reset_at_offset_zero_sends_nothing_and_never_contacts_upstream(proxy, s3, server):
    proxy.add_rule("reset", method="PUT", path="reset0/new.bin")
    with pytest.raises(BotoCoreError):
        s3.put_object(Bucket=server.bucket, Key="reset0/new.bin", Body=b"never stored")
    with pytest.raises(ClientError) as err:
        server.client().head_object(Bucket=server.bucket, Key="reset0/new.bin")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    proxy.add_rule("reset", method="GET", path=KEY)
    raw = raw_get(proxy, s3)
    assert (raw.status, raw.body, raw.ending) == (None, b"", "rst")


def test_truncate_keeps_original_content_length_sends_n_bytes_then_fin(proxy, s3):
    proxy.add_rule("truncate", method="GET", path=KEY, offset=70_000)
    raw = raw_get(proxy, s3)
    assert raw.status == 200 and int(raw.headers["content-length"]) == len(BLOB)
    assert (raw.ending, raw.body) == ("eof", BLOB[:70_000])
    assert proxy.body_bytes("GET", KEY) == 70_000
    proxy.add_rule("truncate", method="GET", path=KEY, offset=5)
    with pytest.raises(BotoCoreError):  # IncompleteReadError / ResponseStreamingError
        s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read()


def test_stall_sends_n_bytes_then_silence_for_seconds_then_closes(proxy, s3, server):
    proxy.add_rule("stall", method="GET", path=KEY, offset=4096, seconds=1.0)
    started = time.monotonic()
    raw = raw_get(proxy, s3)
    assert raw.status == 200 and raw.body == BLOB[:4096] and raw.ending == "eof"
    assert raw.ended_at - raw.last_data_at >= 0.9  # nothing at all arrived during the stall
    assert raw.ended_at - started < 5
    proxy.add_rule("stall", method="GET", path=KEY, offset=10, seconds=3.0)
    impatient = s3_via(proxy, server, read_timeout=0.3)
    with pytest.raises(BotoCoreError):  # ReadTimeoutError while streaming the body
        impatient.get_object(Bucket=server.bucket, Key=KEY)["Body"].read()


def test_status_503_is_s3_slowdown_and_500_internal_error_without_contacting_upstream(
        proxy, s3, server):
    proxy.add_rule("status", method="GET", path=KEY, status=503)
    with pytest.raises(ClientError) as err:
        s3.get_object(Bucket=server.bucket, Key=KEY)
    assert err.value.response["Error"]["Code"] == "SlowDown"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    proxy.add_rule("status", method="PUT", path="status/new.bin", status=500)
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket=server.bucket, Key="status/new.bin", Body=io.BytesIO(b"x" * 100))
    assert err.value.response["Error"]["Code"] == "InternalError"
    with pytest.raises(ClientError):  # the PUT never reached SeaweedFS
        server.client().head_object(Bucket=server.bucket, Key="status/new.bin")
    assert [e.status for e in proxy.exchanges] == [503, 500]
    assert proxy.stats.body_bytes == 0  # synthetic error bodies are not counted as forwarded
    # the client connection stays usable after a synthetic error
    assert s3.get_object(Bucket=server.bucket, Key=KEY)["Body"].read() == BLOB


def test_corrupt_flips_exactly_one_byte_at_offset_and_boto3_checksum_catches_full_gets(
        proxy, s3, server):
    proxy.add_rule("corrupt", method="GET", path=KEY, offset=200_000)
    raw = raw_get(proxy, s3)
    assert raw.ending == "eof" and len(raw.body) == len(BLOB)
    diff = [i for i, (a, b) in enumerate(zip(raw.body, BLOB, strict=True)) if a != b]
    assert diff == [200_000] and raw.body[200_000] == BLOB[200_000] ^ 0xFF
    # SeaweedFS returns x-amz-checksum-crc32 on full GETs of objects put by boto3, so boto3
    # detects the flip; ranged GETs carry no checksum and the corruption passes silently.
    proxy.add_rule("corrupt", method="GET", path=KEY, offset=7)
    with pytest.raises(BotoCoreError):  # FlexibleChecksumError
        s3.get_object(Bucket=server.bucket, Key=KEY)["Body"].read()
    proxy.add_rule("corrupt", method="GET", path=KEY, offset=7, range_only=True)
    got = s3.get_object(Bucket=server.bucket, Key=KEY, Range="bytes=0-99")["Body"].read()
    assert got != BLOB[:100] and got[7] == BLOB[7] ^ 0xFF


# ---- rule matching and counts ----------------------------------------------------------------


def test_rule_fires_count_times_then_stops_and_clear_removes_rules(proxy, s3, server):
    rule = proxy.add_rule("status", path=KEY, count=2)
    for _ in range(2):
        with pytest.raises(ClientError):
            s3.head_object(Bucket=server.bucket, Key=KEY)
    assert s3.head_object(Bucket=server.bucket, Key=KEY)["ContentLength"] == len(BLOB)
    assert (rule.seen, rule.fired, rule.remaining) == (3, 2, 0)
    assert proxy.stats.faults == {"status": 2}
    proxy.add_rule("status", path=KEY, count=None)
    with pytest.raises(ClientError):
        s3.head_object(Bucket=server.bucket, Key=KEY)
    proxy.clear()
    assert proxy.rules == []
    assert s3.head_object(Bucket=server.bucket, Key=KEY)["ContentLength"] == len(BLOB)


def test_rule_matches_method_path_substring_and_range_only(proxy, s3, server):
    ranged = proxy.add_rule("status", path=KEY, range_only=True)
    other_path = proxy.add_rule("status", path="no/such/prefix")
    head_only = proxy.add_rule("status", method="HEAD", path=KEY)
    assert s3.get_object(Bucket=server.bucket, Key=KEY)["Body"].read() == BLOB
    assert (ranged.seen, other_path.seen, head_only.seen) == (0, 0, 0)
    with pytest.raises(ClientError):
        s3.get_object(Bucket=server.bucket, Key=KEY, Range="bytes=0-9")
    assert (ranged.fired, head_only.fired) == (1, 0)
    with pytest.raises(ClientError):
        s3.head_object(Bucket=server.bucket, Key=KEY)
    assert head_only.fired == 1 and other_path.fired == 0


def test_boto3_standard_retries_recover_from_reset_before_response_and_slowdown(proxy, server):
    retrying = s3_via(proxy, server, attempts=3)
    proxy.add_rule("reset", method="GET", path=KEY)
    proxy.add_rule("status", method="GET", path=KEY, status=503)
    assert retrying.get_object(Bucket=server.bucket, Key=KEY)["Body"].read() == BLOB
    assert proxy.requests("GET", KEY) == 3
    # the proxy counts a piece after forwarding it: the client may have the last one first
    wait_for(lambda: proxy.body_bytes("GET", KEY) == len(BLOB), 10, "the proxy to count the whole body")


# ---- upstream restart ------------------------------------------------------------------------


def test_pause_upstream_resets_inflight_download_and_new_connections_until_it_ends(
        proxy, s3, server):
    proxy.add_rule("stall", method="GET", path=KEY, offset=1000, seconds=20)
    result: list[Raw] = []
    reader = threading.Thread(target=lambda: result.append(raw_get(proxy, s3, timeout=10)))
    reader.start()
    wait_for(lambda: proxy.body_bytes("GET", KEY) == 1000, 10, "the stalled response in flight")
    paused_at = time.monotonic()
    proxy.pause_upstream(1.0)
    reader.join(5)
    assert result and result[0].ending == "rst" and result[0].body == BLOB[:1000]
    assert result[0].ended_at - paused_at < 2
    assert raw_get(proxy, s3).ending == "rst"  # a new connection during the pause
    with pytest.raises(BotoCoreError):
        s3.head_object(Bucket=server.bucket, Key=KEY)
    assert proxy.stats.refused >= 2
    wait_for(lambda: not proxy.paused, 5, "the pause to end")
    assert s3.get_object(Bucket=server.bucket, Key=KEY, Range="bytes=0-9")["Body"].read() == \
        BLOB[:10]


def test_stop_closes_listener_and_open_connections(server):
    proxy = FaultProxy(LOOPBACK, server.s3_port).start()
    idle = socket.create_connection((LOOPBACK, proxy.port), timeout=5)
    wait_for(lambda: proxy.stats.connections == 1, 10, "the proxy to accept the connection")
    proxy.stop()
    try:
        assert idle.recv(10) == b""
    except ConnectionResetError:
        pass
    finally:
        idle.close()
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, proxy.port), timeout=1).close()
    assert not [t for t in threading.enumerate() if t.name.endswith(f"-{proxy.port}")]


# ---- chunked upstream (SeaweedFS sends Content-Length; prove the chunked path separately) ----

CHUNKS = [b"a" * 10, bytes(range(256)) * 20, b"z" * 7]
PAYLOAD = b"".join(CHUNKS)


class _ChunkedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _read_chunked(self) -> bytes:
        body = b""
        for _ in range(1000):
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                self.rfile.readline()
                return body
            body += self.rfile.read(size)
            self.rfile.readline()
        raise AssertionError("too many chunks")

    def do_GET(self):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in CHUNKS:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def do_PUT(self):
        body = self._read_chunked()
        reply = b"got %d" % len(body)
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


def test_chunked_upstream_is_rechunked_and_offsets_count_payload_not_framing():
    upstream = ThreadingHTTPServer((LOOPBACK, 0), _ChunkedHandler)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with FaultProxy(LOOPBACK, upstream.server_address[1]) as proxy:
            conn = http.client.HTTPConnection(LOOPBACK, proxy.port, timeout=5)
            conn.request("GET", "/x")
            resp = conn.getresponse()
            assert resp.getheader("Transfer-Encoding") == "chunked"
            assert resp.read() == PAYLOAD
            conn.request("PUT", "/up", body=iter([b"hello ", b"world"]), encode_chunked=True)
            assert conn.getresponse().read() == b"got 11"  # chunked request body passed through
            assert proxy.body_bytes("GET") == len(PAYLOAD)
            proxy.add_rule("corrupt", path="/x", offset=12)
            conn.request("GET", "/x")
            corrupted = conn.getresponse().read()
            assert corrupted[12] == PAYLOAD[12] ^ 0xFF and corrupted[13:] == PAYLOAD[13:]
            proxy.add_rule("truncate", path="/x", offset=15)
            conn.request("GET", "/x")
            with pytest.raises(http.client.IncompleteRead) as err:
                conn.getresponse().read()
            assert err.value.partial == PAYLOAD[:15]
            conn.close()
            assert proxy.body_bytes("GET") == 2 * len(PAYLOAD) + 15
    finally:
        upstream.shutdown()
        upstream.server_close()
