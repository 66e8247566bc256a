"""Credentials never reach the output: issue 4, "Secrets".

The session's SeaweedFS server accepts exactly one identity; its access key id and secret key
are the secrets searched for (every 12-character piece of them), so every failure path of a
load really runs with them:
bad spec, missing checkpoint, missing bucket, wrong secret, unknown key, a session token, bad
manifest, changed object, planted symlink, unusable folder, a persistent network fault, the
deadline, a signal, and faults that are retried and recovered. A fake S3 endpoint goes further and
echoes the signed request (Authorization, session token) back in its error bodies and even in a
malformed status line, as AWS's own SignatureDoesNotMatch does with StringToSign and
CanonicalRequest. Every run's stdout and stderr, in both log formats, are searched for the
credentials; the ones no server accepts contain SHOULDNOTLEAK to be recognisable as well.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

import boto3
import pytest

from bench.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer  # the shared server's one identity
from ckpt_agent.stores import layout
from tests.support.faultproxy import LOOPBACK
from tests.support.helpers import (
    AGENT,
    JOB,
    NAME,
    agent_env,
    payload,
    run_agent,
    upload_checkpoint,
    wait_for,
)
from tests.support.specs import named, spec

pytestmark = pytest.mark.seaweed

MARK = "SHOULDNOTLEAK"
SESSION_TOKEN = "TOKENSHOULDNOTLEAK" + "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJH" * 4
WRONG_SECRET = "WRONGSECRETSHOULDNOTLEAK+abcdefghijklmnopqrstuv"
WRONG_KEY = "AKIAWRONGSHOULDNOTLEAK"
ALL_SECRETS = (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, WRONG_SECRET, WRONG_KEY)
FILES = {"model.bin": payload(600_000, "model"), "trainer_state.json": b'{"global_step": 7}'}


def assert_no_secret(result: subprocess.CompletedProcess | tuple[str, str]) -> None:
    out, err = (result.stdout, result.stderr) if isinstance(result, subprocess.CompletedProcess) else result
    text = f"{out}\n{err}"
    assert MARK.lower() not in text.lower(), f"a credential leaked:\n{text}"
    for secret in ALL_SECRETS:  # and no recognisable fragment of one either
        for i in range(0, len(secret) - 11, 6):
            assert secret[i:i + 12] not in text, f"part of a credential leaked:\n{text}"
    assert "Traceback" not in text


def secret_env(srv: SeaweedServer, prefix: str, folder: Path, **extra: str) -> dict[str, str]:
    env = agent_env(srv, prefix, folder)
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    env.update(extra)
    return env


class Load:
    """One checkpoint committed with the recognisable credentials, and ways to run the agent on it."""

    def __init__(self, srv: SeaweedServer, prefix: str, tmp: Path, log_format: str) -> None:
        self.srv, self.prefix, self.tmp = srv, prefix, tmp
        self.dl, self.marker = tmp / "dl", tmp / "trained"
        self.log_format = log_format

    def env(self, **extra: str) -> dict[str, str]:
        return secret_env(self.srv, self.prefix, self.dl, BT_LOG_FORMAT=self.log_format, **extra)

    def run(self, **extra: str) -> subprocess.CompletedProcess:
        return run_agent(["run", "--", "touch", str(self.marker)], self.env(**extra))

    def put(self, key: str, data: bytes) -> None:
        client = boto3.client("s3", endpoint_url=self.srv.endpoint, region_name="us-east-1",
                              aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        client.put_object(Bucket=self.srv.bucket, Key=f"{self.prefix}/{key}", Body=data)


BOTH_FORMATS = pytest.mark.parametrize("load", ["human", "json"], indirect=True)


@pytest.fixture
def load(request, seaweed: SeaweedServer, s3_prefix: str, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Load:
    """BT_LOG_FORMAT=json unless the test asks for both formats (BOTH_FORMATS)."""
    prefix = s3_prefix
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    upload_checkpoint(seaweed, prefix, tmp_path / "src", FILES, part_size=256 << 10)
    return Load(seaweed, prefix, tmp_path, getattr(request, "param", "json"))


# ---- every failure path, with the recognisable credentials in the environment ----------------

def _bad_spec(ld: Load) -> subprocess.CompletedProcess:
    return ld.run(BT_LOAD_CHECKPOINT_CONFIG='{"enabled": true, "checkpoints": [')


def _unknown_scheme(ld: Load) -> subprocess.CompletedProcess:
    return ld.run(BT_CHECKPOINT_STORE="gs://bucket/prefix")


def _not_found(ld: Load) -> subprocess.CompletedProcess:
    return ld.run(BT_LOAD_CHECKPOINT_CONFIG=spec(ld.dl, named("checkpoint-404", JOB)))


def _no_bucket(ld: Load) -> subprocess.CompletedProcess:
    return ld.run(BT_CHECKPOINT_STORE="s3://no-such-bucket-secrets/x")


def _wrong_secret(ld: Load) -> subprocess.CompletedProcess:
    return ld.run(AWS_SECRET_ACCESS_KEY=WRONG_SECRET)


def _unknown_key(ld: Load) -> subprocess.CompletedProcess:
    return ld.run(AWS_ACCESS_KEY_ID=WRONG_KEY, AWS_SECRET_ACCESS_KEY=WRONG_SECRET)


def _session_token(ld: Load) -> subprocess.CompletedProcess:
    return ld.run(AWS_SESSION_TOKEN=SESSION_TOKEN)  # this server knows no sessions: refused


def _bad_manifest(ld: Load) -> subprocess.CompletedProcess:
    ld.put(layout.manifest_key(JOB, NAME, 0), b'{"format": 1, "files": [{"path": "../x"')
    return ld.run()


def _changed_object(ld: Load) -> subprocess.CompletedProcess:
    ld.put(layout.file_key(JOB, NAME, 0, "model.bin"), payload(600_000, "other"))
    return ld.run()


def _planted_symlink(ld: Load) -> subprocess.CompletedProcess:
    (ld.dl / "rank-0").mkdir(parents=True)
    (ld.dl / "rank-0" / NAME).symlink_to(ld.tmp, target_is_directory=True)
    return ld.run()


def _folder_is_a_file(ld: Load) -> subprocess.CompletedProcess:
    ld.dl.write_bytes(b"")
    return ld.run()


def _save_wrong_secret(ld: Load) -> subprocess.CompletedProcess:
    folder = ld.tmp / "src" / JOB / NAME
    return run_agent(["save", str(folder), "--project", "proj", "--job-id", "job-s"],
                     ld.env(AWS_SECRET_ACCESS_KEY=WRONG_SECRET))


FAILURES: dict[str, tuple[Callable[[Load], subprocess.CompletedProcess], int]] = {
    "bad spec": (_bad_spec, 2),
    "unknown store scheme": (_unknown_scheme, 2),
    "checkpoint not found": (_not_found, 3),
    "bucket does not exist": (_no_bucket, 4),
    "wrong secret key": (_wrong_secret, 4),
    "unknown access key id": (_unknown_key, 4),
    "refused session token": (_session_token, 4),
    "bad manifest": (_bad_manifest, 5),
    "object changed": (_changed_object, 5),
    "planted symlink": (_planted_symlink, 5),
    "download folder is a file": (_folder_is_a_file, 6),
    "save with a wrong secret": (_save_wrong_secret, 4),
}


STORE_ERRORS = ("checkpoint not found", "bucket does not exist", "wrong secret key", "unknown access key id",
                "refused session token", "object changed")
CASES = [(name, "http") for name in FAILURES] + [(name, "boto3") for name in STORE_ERRORS]


# JSON lines carry each message plus its fields, so they say all the human lines say and more;
# a few cases also run in the human format.
@pytest.mark.parametrize(("name", "engine"), CASES)
def test_failure_output_never_contains_credentials(name, engine, load):
    scenario, code = FAILURES[name]
    result = scenario(_with_engine(load, engine))
    assert result.returncode == code, result.stderr
    assert_no_secret(result)
    assert not load.marker.exists()


@pytest.mark.parametrize("load", ["human"], indirect=True)
@pytest.mark.parametrize("name", ["wrong secret key", "refused session token", "bad manifest", "object changed"])
def test_failure_output_in_the_human_format_never_contains_credentials(name, load):
    scenario, code = FAILURES[name]
    result = scenario(load)
    assert result.returncode == code, result.stderr
    assert_no_secret(result)


def _with_engine(ld: Load, engine: str) -> Load:
    base = ld.env

    def env(**extra: str) -> dict[str, str]:
        return base(CKPT_AGENT_S3_ENGINE=engine, **extra)

    ld.env = env  # type: ignore[method-assign]
    return ld


# ---- network faults, the deadline and a signal, with the credentials --------------------------

@BOTH_FORMATS
def test_recovered_faults_output_never_contains_credentials(load, proxy):
    proxy.add_rule("reset", method="GET", path="model.bin", offset=300_000)
    proxy.add_rule("status", method="GET", path=".manifest.json", status=503)
    proxy.add_rule("truncate", method="GET", path="job.json", offset=5)
    result = load.run(AWS_ENDPOINT_URL=proxy.endpoint)
    assert result.returncode == 0, result.stderr
    assert load.marker.exists()
    assert_no_secret(result)


def test_persistent_fault_output_never_contains_credentials(load, proxy):
    proxy.add_rule("reset", method="GET", path="model.bin", count=None)
    result = load.run(AWS_ENDPOINT_URL=proxy.endpoint)
    assert result.returncode == 4, result.stderr
    assert_no_secret(result)


def test_load_timeout_output_never_contains_credentials(load, proxy):
    proxy.add_rule("stall", method="GET", path="model.bin", offset=1000, seconds=30)
    result = load.run(AWS_ENDPOINT_URL=proxy.endpoint, BT_LOAD_TIMEOUT="2", CKPT_AGENT_READ_TIMEOUT="20")
    assert result.returncode == 7, result.stderr
    assert_no_secret(result)


def test_sigterm_output_never_contains_credentials(load, proxy):
    proxy.add_rule("stall", method="GET", path="model.bin", offset=1000, seconds=30)
    agent = subprocess.Popen([AGENT, "run", "--", "touch", str(load.marker)],
                             env=load.env(AWS_ENDPOINT_URL=proxy.endpoint, CKPT_AGENT_READ_TIMEOUT="20"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(e.outcome == "stalled" for e in proxy.exchanges), 30, "the download to stall")
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=10)
    finally:
        agent.kill()
    assert agent.returncode == 143, err
    assert_no_secret((out, err))


# ---- a store that echoes the signed request back -----------------------------------------------

class _Echo(BaseHTTPRequestHandler):
    """Answers like AWS does to a bad signature, with the request's own headers in the body."""

    mode = "403"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        headers = "\n".join(f"{k}: {v}" for k, v in self.headers.items())
        if self.mode == "garbage":  # http.client and urllib3 quote a bad status line in their errors
            self.wfile.write(f"HTTP/1.1 {self.headers.get('Authorization')}\r\n\r\n".encode())
            self.close_connection = True
            return
        code = {"403": "SignatureDoesNotMatch", "400": "InvalidArgument"}[self.mode]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{escape(headers)}</Message>"
            f"<AWSAccessKeyId>{escape(ACCESS_KEY)}</AWSAccessKeyId>"
            f"<StringToSign>{escape(headers)}</StringToSign>"
            f"<CanonicalRequest>{escape(self.requestline)}\n{escape(headers)}</CanonicalRequest>"
            f"<ArgumentValue>{escape(headers)}</ArgumentValue>"
            "<RequestId>echo</RequestId></Error>"
        ).encode()
        self.send_response(int(self.mode))
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

    def log_message(self, *args) -> None:
        """Quiet."""


@pytest.fixture
def echo_store() -> Iterator[Callable[[str], str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(mode: str) -> str:
        handler = type("Echo", (_Echo,), {"mode": mode})
        srv = ThreadingHTTPServer((LOOPBACK, 0), handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        servers.append(srv)
        return f"http://{LOOPBACK}:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


ECHO_CASES = [(mode, engine, fmt) for mode in ("403", "400") for engine in ("http", "boto3")
              for fmt in ("human", "json")] + [("garbage", "http", "human")]  # garbage is retried: slow


@pytest.mark.parametrize(("mode", "engine", "log_format"), ECHO_CASES)
def test_store_errors_that_echo_the_signed_request_never_reach_the_output(mode, engine, log_format, seaweed,
                                                                          echo_store, tmp_path):
    env = secret_env(seaweed, "p", tmp_path / "dl", AWS_SESSION_TOKEN=SESSION_TOKEN, AWS_ENDPOINT_URL=echo_store(mode),
                     CKPT_AGENT_S3_ENGINE=engine, BT_LOG_FORMAT=log_format)
    started = time.monotonic()
    result = run_agent(["run", "--", "touch", str(tmp_path / "trained")], env)
    assert result.returncode == 4, result.stderr
    assert time.monotonic() - started < 30
    assert_no_secret(result)
    last = result.stderr.strip().splitlines()[-1]
    message = json.loads(last)["message"] if log_format == "json" else last
    assert "s3://checkpoints/p/jobs/job-f/job.json" in message  # the error was reported, naming the object
    assert not (tmp_path / "trained").exists()
