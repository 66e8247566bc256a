"""A hostile store and a hostile environment: issue 10, items 3, 9, 10, 12, 13 and the size limits.

Anyone who can write to the bucket can plant objects; the environment holds secrets. Each test
plants or sets one thing and checks that the agent ignores it with a warning, or fails with the
one-line error and exit code the README documents, never with a traceback or a secret.
Fake S3 answers come from a scripted server on 127.0.0.1, proxies from one in this file.
"""

from __future__ import annotations

import http.server
import itertools
import json
import os
import re
import select
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckpt_agent import cli
from ckpt_agent.config import names
from ckpt_agent.config import settings as settings_module
from ckpt_agent.config.settings import settings_from_env
from ckpt_agent.config.spec import LatestRef
from ckpt_agent.errors import ConfigError, IntegrityError, StoreError
from ckpt_agent.load.resolve import resolve
from ckpt_agent.stores import base, layout, open_store
from ckpt_agent.stores.base import Listing, Store
from ckpt_agent.stores.local import LocalStore
from ckpt_agent.upload.commit import CheckpointId, ensure_job
from tests.support.helpers import (
    JOB,
    NAME,
    agent_env,
    assert_exact,
    assert_one_line_failure,
    clean_env,
    commit_files,
    get_object,
    payload,
    put_object,
    run_agent,
    upload_checkpoint,
)
from tests.support.specs import latest, spec

ENGINES = ("http", "boto3")
BAD_NAMES = {
    "dot-dot": "..",
    "dot": ".",
    "hidden": ".planted",
    "newline": "x\nckpt-agent: error: spoofed line",
    "bidi": "checkpoint-9\u202e",
    "overlong": "c" * 300,
    "spaces": " checkpoint-9",
}
SECRET = "LEAKED-SECRET-7f3a"


# ---- helpers ------------------------------------------------------------------------------------

class PlantedStore(LocalStore):
    """A local store plus objects under names no filesystem holds ('..', '.'), as an S3 LIST shows them."""

    def __init__(self, root: str, planted: dict[str, bytes]) -> None:
        super().__init__(root)
        self.planted = planted

    def list_dir(self, prefix: str) -> Listing:
        listing = super().list_dir(prefix)
        files, dirs = set(listing.files), set(listing.dirs)
        for key in self.planted:
            if key.startswith(prefix):
                head, sep, _ = key[len(prefix):].partition("/")
                (dirs if sep else files).add(head)
        return Listing(tuple(sorted(files)), tuple(sorted(dirs)))

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        if key in self.planted:
            return self.planted[key]
        return super().read_bytes(key, limit)


def commit(store: Store, tmp: Path, job: str, name: str, project: str | None = "proj") -> dict:
    """A one-file checkpoint committed in-process; its manifest as JSON."""
    manifest = commit_files(store, tmp / "src" / job / name, {"model.bin": f"{job}/{name}".encode()},
                            CheckpointId(project, job, name), workers=2)
    return json.loads(manifest.to_json())


def planted_manifest(legit: dict, name: str) -> bytes:
    """The legitimate manifest moved under another name and dated far in the future, to win latest."""
    return json.dumps({**legit, "checkpoint_name": name, "committed_at": "2999-01-01T00:00:00Z"}).encode()


def local_env(store: Path, folder: Path, *refs: dict, **extra: str) -> dict[str, str]:
    return clean_env(**{"BT_CHECKPOINT_STORE": str(store), "BT_TRAINING_PROJECT_NAME": "proj",
                        "BT_LOAD_CHECKPOINT_CONFIG": spec(folder, *refs), **extra})


Answer = Callable[[str, str, str], tuple[int, dict[str, str], bytes]]


class FakeS3:
    """An S3 endpoint on 127.0.0.1 that answers as the test says; records (method, path, signing region)."""

    def __init__(self, answer: Answer) -> None:
        self.requests: list[tuple[str, str, str]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                scope = re.search(r"Credential=[^/]+/\d+/([^/]+)/s3/", self.headers.get("Authorization", ""))
                region = scope.group(1) if scope else ""
                fake.requests.append((self.command, self.path, region))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, body = answer(self.command, self.path, region)
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = _answer

            def log_message(self, *args) -> None:
                """Quiet."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_s3() -> Iterator[Callable[[Answer], FakeS3]]:
    started: list[FakeS3] = []

    def start(answer: Answer) -> FakeS3:
        started.append(FakeS3(answer))
        return started[-1]

    yield start
    for server in started:
        server.close()


def s3_store(engine: str, endpoint: str, monkeypatch: pytest.MonkeyPatch, **extra: str) -> Store:
    """A store of either engine on `endpoint`; boto3 reads os.environ, so the variables go there too."""
    env = {"AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_ENDPOINT_URL": endpoint,
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "AWS_CONFIG_FILE": os.devnull, "BT_CHECKPOINT_STORE": "s3://bucket/root",
           "CKPT_AGENT_S3_ENGINE": engine, "CKPT_AGENT_READ_TIMEOUT": "2", **extra}
    for name in list(os.environ):
        if name.startswith("AWS_") or name.lower() in settings_module.PROXY_VARS:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return open_store(settings_from_env(env).store_config)


# ---- item 3: names from listings and from the user -----------------------------------------------

@pytest.mark.parametrize("bad", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_planted_checkpoint_name_is_ignored_with_an_escaped_warning_and_never_wins_latest(bad, tmp_path):
    store = PlantedStore(str(tmp_path / "store"), {})
    legit = commit(store, tmp_path, "j1", "checkpoint-1")
    store.planted[layout.manifest_key("j1", bad, 0)] = planted_manifest(legit, bad)
    result = resolve(store, (LatestRef(job_id="j1"),), 0, None)
    assert [r.manifest.checkpoint_name for r in result.checkpoints] == ["checkpoint-1"]
    assert [w for w in result.warnings if names.quote_name(bad) in w], result.warnings
    assert all("\n" not in w and w.isascii() for w in result.warnings)


@pytest.mark.parametrize("bad", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_planted_job_in_a_project_index_is_ignored_and_never_wins_latest(bad, tmp_path):
    store = PlantedStore(str(tmp_path / "store"), {})
    commit(store, tmp_path, "j1", "checkpoint-1")
    store.planted[layout.project_job_key("proj", bad)] = json.dumps(
        {"job_id": bad, "created_at": "2999-01-01T00:00:00Z"}).encode()
    result = resolve(store, (LatestRef(project_name="proj"),), 0, None)
    assert [r.manifest.job_id for r in result.checkpoints] == ["j1"]
    assert [w for w in result.warnings if names.quote_name(bad) in w], result.warnings


@pytest.mark.seaweed
@pytest.mark.parametrize("engine", ENGINES)
def test_planted_names_in_s3_neither_load_nor_spoof_a_log_line(engine, s3_env, s3_prefix, tmp_path):
    """End to end on a real S3 server: the planted checkpoints have files and a newer commit time."""
    files = upload_checkpoint(s3_env, s3_prefix, tmp_path / "src", {"model.bin": payload(1000, "m")})
    legit = json.loads(get_object(s3_env, s3_prefix, layout.manifest_key(JOB, NAME, 0)))
    for bad in (BAD_NAMES["newline"], BAD_NAMES["hidden"], BAD_NAMES["bidi"]):
        put_object(s3_env, s3_prefix, layout.manifest_key(JOB, bad, 0), planted_manifest(legit, bad))
        put_object(s3_env, s3_prefix, layout.file_key(JOB, bad, 0, "model.bin"), b"planted")
    dl = tmp_path / "dl"
    env = agent_env(s3_env, s3_prefix, dl, refs=(latest(None, JOB),), CKPT_AGENT_S3_ENGINE=engine)
    result = run_agent(["load"], env)
    assert result.returncode == 0, result.stderr
    assert_exact(dl, files)
    assert sorted(p.name for p in (dl / "rank-0").iterdir()) == [NAME]
    assert not any(line.startswith("ckpt-agent: error: spoofed") for line in result.stderr.splitlines())
    assert names.quote_name(BAD_NAMES["newline"]) in result.stderr
    listing = run_agent(["ls", "--job-id", JOB, "--json"], env)
    assert listing.returncode == 0, listing.stderr
    assert [c["name"] for c in json.loads(listing.stdout)["checkpoints"]] == [NAME]


USER_NAMES = {
    "newline": "a\nb", "leading dot": ".x", "dot-dot": "..", "overlong": "c" * 300, "quote": 'job"quoted',
    "control": "a\x1bb", "bidi": "a\u202eb", "trailing space": "j1 ",
}


@pytest.mark.parametrize("bad", USER_NAMES.values(), ids=USER_NAMES.keys())
@pytest.mark.parametrize("field", ["checkpoint_name", "job_id"])
def test_user_given_name_that_could_not_be_a_store_name_is_refused_with_exit_2(field, bad, tmp_path):
    ref = {"typ": "baseten_named_checkpoint", "checkpoint_name": "c1", "job_id": "j1", field: bad}
    result = run_agent(["load"], local_env(tmp_path / "store", tmp_path / "dl", ref))
    assert_one_line_failure(result, 2, f"checkpoints[0].{field}: {names.quote_name(bad)}")
    assert not (tmp_path / "dl").exists()


@pytest.mark.parametrize("flag,bad", [("--job-id", 'job"quoted'), ("--name", "a\nb"), ("--project", "..")])
def test_save_refuses_a_name_that_could_not_be_a_store_name(flag, bad, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "w.bin").write_bytes(b"w")
    args = {"--job-id": "j1", "--project": "proj", "--name": "c1", flag: bad}
    result = run_agent(["save", str(tmp_path / "ckpt"), *[x for kv in args.items() for x in kv]],
                       local_env(tmp_path / "store", tmp_path / "dl"))
    assert_one_line_failure(result, 2, flag)
    assert not (tmp_path / "store").exists()


def test_sync_never_commits_a_checkpoint_folder_whose_name_is_not_a_store_name(tmp_path):
    watched = tmp_path / "ckpts" / "bad\nname"
    watched.mkdir(parents=True)
    (watched / "trainer_state.json").write_text("{}")
    env = local_env(tmp_path / "store", tmp_path / "dl", BT_TRAINING_JOB_ID="j1",
                    BT_CHECKPOINT_DIR=str(tmp_path / "ckpts"), CKPT_AGENT_QUIET_SECONDS="0")
    result = run_agent(["sync", "--once"], env, timeout=60)
    assert_one_line_failure(result, 2, names.quote_name(str(watched)), "rename it")
    assert not list((tmp_path / "store").rglob("*.manifest.json"))


# ---- item 9: the project index -------------------------------------------------------------------

def test_project_index_record_is_written_by_a_serializer_even_for_a_quoted_job_id(tmp_path):
    """The CLI refuses such an id (above); this proves the writer is safe on its own."""
    store = LocalStore(str(tmp_path / "store"))
    ensure_job(store, CheckpointId("proj", 'job"quoted\\', "c1"))
    entry = json.loads(store.read_bytes(layout.project_job_key("proj", 'job"quoted\\')))
    assert entry["job_id"] == 'job"quoted\\'


@pytest.mark.parametrize("entry", [b'{"job_id": "j0", "created_at": "9', b"[1, 2]", b'{"job_id": "j0"}', b"\xff",
                                   b"[" * 60000],
                         ids=["truncated", "not an object", "no created_at", "not utf-8", "nested too deeply"])
def test_one_bad_project_index_entry_breaks_neither_latest_nor_ls(entry, tmp_path):
    store_dir = tmp_path / "store"
    files = {"model.bin": b"j1/checkpoint-1"}
    commit(LocalStore(str(store_dir)), tmp_path, "j1", "checkpoint-1")
    (store_dir / layout.project_job_key("proj", "j0")).write_bytes(entry)
    dl = tmp_path / "dl"
    env = local_env(store_dir, dl, {"typ": "baseten_latest_checkpoint", "project_name": "proj", "job_id": None})
    result = run_agent(["load"], env)
    assert result.returncode == 0, result.stderr
    assert_exact(dl, files, "checkpoint-1")
    assert "projects/proj/jobs/j0.json: ignoring" in result.stderr
    listing = run_agent(["ls", "--project", "proj", "--json"], env)
    assert listing.returncode == 0, listing.stderr
    assert [j["job_id"] for j in json.loads(listing.stdout)["jobs"]] == ["j1"]


# ---- item 10: the standard AWS environment --------------------------------------------------------

class ForwardProxy:
    """An HTTP proxy on 127.0.0.1: CONNECT tunnels and absolute-URI requests, every host sent to
    127.0.0.1 (so a made-up host name proves the agent itself never resolved it). Counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                return client.close()
            head += chunk
        method, target = head.split(b" ", 2)[:2]
        hostport = target.split(b"//", 1)[-1].split(b"/", 1)[0] if method != b"CONNECT" else target
        upstream = socket.create_connection(("127.0.0.1", int(hostport.rsplit(b":", 1)[1])))
        if method == b"CONNECT":
            while b"\r\n\r\n" not in head:
                head += client.recv(65536)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            upstream.sendall(head)  # SeaweedFS, like any HTTP/1.1 server, takes the absolute form
        self._pipe(client, upstream)

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with a, b:
            while True:
                ready, _, _ = select.select([a, b], [], [], 30)
                if not ready:
                    return
                for src in ready:
                    data = src.recv(1 << 16)
                    if not data:
                        return
                    (b if src is a else a).sendall(data)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    proxy = ForwardProxy()
    yield proxy
    proxy.close()


@pytest.mark.seaweed
@pytest.mark.parametrize("engine", ENGINES)
def test_http_proxy_carries_every_request_and_the_endpoint_name_is_never_resolved_locally(
        engine, s3_env, s3_prefix, forward_proxy, tmp_path):
    files = upload_checkpoint(s3_env, s3_prefix, tmp_path / "src", {"model.bin": payload(1000, "m")})
    dl = tmp_path / "dl"
    endpoint = f"http://s3.ckpt-agent-test.invalid:{s3_env.s3_port}"
    env = agent_env(s3_env, s3_prefix, dl, endpoint=endpoint, CKPT_AGENT_S3_ENGINE=engine,
                    HTTP_PROXY=forward_proxy.url)
    result = run_agent(["load"], env)
    assert result.returncode == 0, result.stderr
    assert_exact(dl, files)
    assert forward_proxy.connections > 0


@pytest.mark.seaweed
@pytest.mark.parametrize("engine", ENGINES)
def test_no_proxy_sends_the_endpoint_past_the_proxy(engine, s3_env, s3_prefix, forward_proxy, tmp_path):
    files = upload_checkpoint(s3_env, s3_prefix, tmp_path / "src", {"model.bin": payload(1000, "m")})
    dl = tmp_path / "dl"
    env = agent_env(s3_env, s3_prefix, dl, CKPT_AGENT_S3_ENGINE=engine, HTTP_PROXY=forward_proxy.url,
                    NO_PROXY="localhost,127.0.0.1")
    result = run_agent(["load"], env)
    assert result.returncode == 0, result.stderr
    assert_exact(dl, files)
    assert forward_proxy.connections == 0


def _eu_only(method: str, path: str, region: str) -> tuple[int, dict[str, str], bytes]:
    """A bucket that lives in eu-west-1: a request signed for any other region is redirected, as AWS does."""
    if region != "eu-west-1":
        return 301, {"x-amz-bucket-region": "eu-west-1", "Content-Type": "application/xml"}, (
            b"<Error><Code>PermanentRedirect</Code><Message>use the eu-west-1 endpoint</Message></Error>")
    return 200, {}, b"hello"


@pytest.mark.parametrize("engine", ENGINES)
def test_region_in_the_aws_config_file_is_used_when_the_keys_are_in_the_environment(
        engine, fake_s3, monkeypatch, tmp_path):
    config = tmp_path / "config"
    config.write_text("[default]\nregion = eu-west-1\n")
    server = fake_s3(_eu_only)
    store = s3_store(engine, server.url, monkeypatch, AWS_CONFIG_FILE=str(config))
    assert store.read_bytes("k") == b"hello"
    assert [region for _, _, region in server.requests] == ["eu-west-1"]


def test_bucket_in_another_region_is_followed_after_a_301_permanent_redirect(fake_s3, monkeypatch):
    """The native engine; botocore follows the same redirect for AWS's own endpoints."""
    server = fake_s3(_eu_only)
    store = s3_store("http", server.url, monkeypatch, AWS_REGION="us-east-1")
    assert store.read_bytes("k") == b"hello"
    assert store.read_bytes("k2") == b"hello"
    assert [region for _, _, region in server.requests] == ["us-east-1", "eu-west-1", "eu-west-1"]


# ---- item 12: every failure is one line, without a secret -----------------------------------------

def _credentials_env(tmp_path: Path, engine: str, endpoint: str, config: str, **extra: str) -> dict[str, str]:
    (tmp_path / "config").write_text(config)
    return clean_env(**{"BT_CHECKPOINT_STORE": "s3://bucket/root", "AWS_ENDPOINT_URL": endpoint,
                        "AWS_CONFIG_FILE": str(tmp_path / "config"), "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                        "AWS_EC2_METADATA_DISABLED": "true", "AWS_REGION": "us-east-1",
                        "CKPT_AGENT_S3_ENGINE": engine, **extra})


@pytest.mark.parametrize("engine", ENGINES)
def test_nonexistent_aws_profile_is_a_one_line_exit_4(engine, fake_s3, tmp_path):
    server = fake_s3(lambda *_: (200, {}, b""))
    env = _credentials_env(tmp_path, engine, server.url, "", AWS_PROFILE="nonexistent")
    result = run_agent(["ls"], env)
    assert_one_line_failure(result, 4, "AWS credentials could not be loaded (ProfileNotFound)")
    assert server.requests == []


@pytest.mark.parametrize("engine", ENGINES)
def test_failing_credential_process_never_prints_its_stderr(engine, fake_s3, tmp_path):
    server = fake_s3(lambda *_: (200, {}, b""))
    process = f"credential_process = /bin/sh -c 'echo {SECRET} >&2; echo {SECRET}; exit 1'\n"
    env = _credentials_env(tmp_path, engine, server.url, f"[default]\n{process}")
    result = run_agent(["ls"], env)
    assert_one_line_failure(result, 4, "AWS credentials could not be loaded (CredentialRetrievalError)")
    assert SECRET not in result.stderr + result.stdout
    assert server.requests == []


def test_unexpected_exception_is_one_line_exit_1_without_its_text(monkeypatch, capsys, tmp_path):
    def explode(*_args, **_kw):
        raise RuntimeError(f"credential helper said {SECRET}")

    monkeypatch.setattr("ckpt_agent.load.listing.list_jobs", explode)
    code = cli.main(["ls"], {"BT_CHECKPOINT_STORE": str(tmp_path / "store")})
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines() == [err.strip()] and err.startswith("ckpt-agent: error: unexpected RuntimeError")
    assert SECRET not in err and "Traceback" not in err
    assert cli.main(["ls"], {"BT_CHECKPOINT_STORE": str(tmp_path / "store"), "CKPT_AGENT_DEBUG": "1"}) == 1
    assert "Traceback" in capsys.readouterr().err


# ---- item 13: a store URI with a user and password -----------------------------------------------

@pytest.mark.parametrize("uri", ["s3://AKIAUSER:SECRETKEY@bucket/prefix", "s3://AKIAUSER@bucket",
                                 "gs://AKIAUSER:SECRETKEY@bucket", "file://AKIAUSER:SECRETKEY@/tmp/x"])
def test_store_uri_with_a_user_and_password_is_refused_without_echoing_them(uri, tmp_path):
    with pytest.raises(ConfigError) as refused:
        settings_from_env({"BT_CHECKPOINT_STORE": uri})
    assert "AKIAUSER" not in str(refused.value) and "SECRETKEY" not in str(refused.value)
    result = run_agent(["ls"], {**local_env(tmp_path / "store", tmp_path / "dl"), "BT_CHECKPOINT_STORE": uri,
                                "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    assert_one_line_failure(result, 2, "BT_CHECKPOINT_STORE: must not hold a user or password")
    assert "AKIAUSER" not in result.stderr and "SECRETKEY" not in result.stderr


@pytest.mark.parametrize("uri", ["s3://bucket:443/x", "s3://bu cket/x", "s3://-bucket"])
def test_store_uri_whose_host_is_not_a_bucket_name_is_refused(uri):
    with pytest.raises(ConfigError, match="is not a bucket name"):
        settings_from_env({"BT_CHECKPOINT_STORE": uri})


# ---- size limits on everything parsed from the store ----------------------------------------------

@pytest.mark.parametrize("engine", [*ENGINES, "local"])
def test_an_object_over_the_read_limit_fails_cleanly_naming_the_key(engine, fake_s3, monkeypatch, tmp_path):
    if engine == "local":
        store: Store = LocalStore(str(tmp_path))
        store.write_bytes("jobs/j/job.json", b"x" * 5000)
    else:
        server = fake_s3(lambda *_: (200, {}, b"x" * 5000))
        store = s3_store(engine, server.url, monkeypatch)
    with pytest.raises(IntegrityError, match=r"jobs/j/job\.json: larger than 1000 bytes"):
        store.read_bytes("jobs/j/job.json", limit=1000)
    assert store.read_bytes("jobs/j/job.json", limit=5000) == b"x" * 5000


@pytest.mark.parametrize("what", ["manifest", "job record", "index entry"])
def test_oversized_store_records_fail_the_load_or_are_skipped(what, monkeypatch, tmp_path):
    store = LocalStore(str(tmp_path / "store"))
    commit(store, tmp_path, "j1", "checkpoint-1")
    padding = {"padding": "x" * 3000}
    monkeypatch.setattr(layout, "MAX_MANIFEST_BYTES", 2000)
    monkeypatch.setattr(layout, "MAX_RECORD_BYTES", 2000)
    key = {"manifest": layout.manifest_key("j1", "checkpoint-1", 0), "job record": layout.job_record_key("j1"),
           "index entry": layout.project_job_key("proj", "j1")}[what]
    store.write_bytes(key, json.dumps({**json.loads(store.read_bytes(key)), **padding}).encode())
    if what == "index entry":  # one entry must not hide the project: skipped, with a warning
        result = resolve(store, (LatestRef(project_name="proj"),), 0, None)
        assert result.checkpoints == () and any(key in w for w in result.warnings)
        return
    with pytest.raises(IntegrityError, match=re.escape(f"{key}: larger than 2000 bytes")):
        resolve(store, (LatestRef(job_id="j1"),), 0, None)


_PAGES = itertools.count()


def _endless_listing(method: str, path: str, region: str) -> tuple[int, dict[str, str], bytes]:
    page = next(_PAGES)  # a new continuation token every time: a listing that never ends
    return 200, {"Content-Type": "application/xml"}, (
        '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><IsTruncated>true</IsTruncated>'
        f"<NextContinuationToken>t{page}x</NextContinuationToken></ListBucketResult>").encode()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_listing_that_never_ends_fails_cleanly(engine, fake_s3, monkeypatch):
    monkeypatch.setattr(base, "MAX_LISTING_ENTRIES", 20)
    store = s3_store(engine, fake_s3(_endless_listing).url, monkeypatch)
    with pytest.raises(IntegrityError, match="lists more than 20 entries"):
        store.list_dir("jobs/")


def test_a_listing_answer_over_the_limit_is_not_read_into_memory(fake_s3, monkeypatch):
    """The native engine reads LIST bodies itself (botocore parses its own)."""
    from ckpt_agent.stores import s3http

    server = fake_s3(lambda *_: (200, {}, b"<x>" + b" " * (s3http.ANSWER_LIMIT + 10)))
    store = s3_store("http", server.url, monkeypatch)
    with pytest.raises(IntegrityError, match="larger than"):
        store.list_dir("jobs/")


# ---- the default local store in world-writable /tmp -------------------------------------------------

@pytest.mark.parametrize("planted", ["writable by everyone", "another user's", "a symlink"])
def test_default_local_store_that_another_user_could_have_planted_is_refused(planted, monkeypatch, tmp_path):
    default = tmp_path / "ckpt-store"
    monkeypatch.setattr(settings_module, "DEFAULT_STORE", str(default))
    if planted == "a symlink":
        (tmp_path / "elsewhere").mkdir()
        default.symlink_to(tmp_path / "elsewhere")
    else:
        default.mkdir()
        os.chmod(default, 0o777 if planted == "writable by everyone" else 0o755)
        if planted == "another user's":
            if os.getuid() != 0:
                pytest.skip("only root can give a folder to another user")
            os.chown(default, 65534, 65534)
    with pytest.raises(StoreError, match="the default local store is"):
        open_store(settings_from_env({}).store_config)


def test_default_local_store_of_this_user_is_used(monkeypatch, tmp_path):
    default = tmp_path / "ckpt-store"
    monkeypatch.setattr(settings_module, "DEFAULT_STORE", str(default))
    assert isinstance(open_store(settings_from_env({}).store_config), LocalStore)  # not there yet: save creates it
    default.mkdir(mode=0o755)
    assert isinstance(open_store(settings_from_env({}).store_config), LocalStore)
