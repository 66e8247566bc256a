"""Bad input the loader refuses: issue 4, "Bad input it refuses".

Each case drives the installed `ckpt-agent run -- touch <marker>` against the real SeaweedFS and
checks the same four things: the exit code the README documents, one `error:` line that names
the field or file at fault (no traceback), nothing written outside the download folder, and the
training command never started.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from ckpt_agent.stores import layout
from tests.support.faultproxy import FaultProxy
from tests.support.helpers import (
    JOB,
    NAME,
    assert_exact,
    assert_one_line_failure,
    file_bytes,
    get_object,
    payload,
    put_object,
    run_agent,
    upload_checkpoint,
)
from tests.support.helpers import agent_env as _agent_env
from tests.support.specs import latest, named, spec

pytestmark = pytest.mark.seaweed

CONFIG = "BT_LOAD_CHECKPOINT_CONFIG"
MANIFEST = layout.manifest_key(JOB, NAME, 0)
FILES = {"model.bin": payload(300_000, "model"), "sub/state.json": b'{"global_step": 7}'}


class Case:
    """One checkpoint in SeaweedFS and a sandbox: `tmp/deep/dl` is the download folder, so a path
    that escapes it by one or two levels still lands inside `tmp`, where the test looks."""

    def __init__(self, server, prefix: str, tmp: Path) -> None:
        self.server, self.prefix, self.tmp = server, prefix, tmp
        self.dl = tmp / "deep" / "dl"
        self.marker = tmp / "trained"

    def env(self, **extra: str) -> dict[str, str]:
        return _agent_env(self.server, self.prefix, self.dl, **extra)

    def run(self, **extra: str) -> subprocess.CompletedProcess:
        before = self.snapshot()
        result = run_agent(["run", "--", "touch", str(self.marker)], self.env(**extra))
        written = self.snapshot() - before
        outside = sorted(p for p in written if not p.startswith("deep/dl/") and p != "deep/dl")
        assert not outside, f"written outside the download folder: {outside}"
        return result

    def snapshot(self) -> set[str]:
        return {p.relative_to(self.tmp).as_posix() for p in self.tmp.rglob("*") if not p.is_relative_to(self.src)}

    @property
    def src(self) -> Path:
        return self.tmp / "src"

    def refused(self, result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
        assert_one_line_failure(result, code, *needles)
        assert not self.marker.exists(), "the training command ran"

    def manifest(self) -> dict:
        return json.loads(get_object(self.server, self.prefix, MANIFEST))

    def put_manifest(self, data: bytes | dict) -> None:
        body = data if isinstance(data, bytes) else json.dumps(data).encode()
        put_object(self.server, self.prefix, MANIFEST, body)


@pytest.fixture
def case(s3_env, s3_prefix: str, tmp_path: Path) -> Case:
    c = Case(s3_env, s3_prefix, tmp_path)
    upload_checkpoint(s3_env, s3_prefix, c.src, FILES)
    return c


@pytest.fixture
def bare(s3_env, s3_prefix: str, tmp_path: Path) -> Case:
    """No checkpoint in the store: for input refused before the store is read."""
    return Case(s3_env, s3_prefix, tmp_path)


# ---- the spec and the environment: exit 2 ------------------------------------------------------

REF = {"typ": "baseten_named_checkpoint", "checkpoint_name": NAME, "job_id": JOB}
SPEC_CASES = {
    "malformed JSON": ('{"enabled": true, "checkpoints": [', f"{CONFIG}: not valid JSON"),
    "not an object": ("[1, 2]", f"{CONFIG}: expected a JSON object"),
    "enabled not a bool": ({"enabled": "yes"}, f"{CONFIG}.enabled"),
    "checkpoints not a list": ({"checkpoints": REF}, f"{CONFIG}.checkpoints"),
    "reference not an object": ({"checkpoints": ["latest"]}, f"{CONFIG}.checkpoints[0]"),
    "job_id not a string": ({"checkpoints": [{**REF, "job_id": 12}]}, f"{CONFIG}.checkpoints[0].job_id"),
    "download_folder not a string": ({"download_folder": 5}, f"{CONFIG}.download_folder"),
    "unknown typ": ({"checkpoints": [{**REF, "typ": "baseten_best_checkpoint"}]}, f"{CONFIG}.checkpoints[0].typ"),
    "unknown top-level key": ({"download_dir": "/x"}, "unknown key 'download_dir'"),
    "unknown reference key": ({"checkpoints": [{**REF, "step": 3}]}, "checkpoints[0]: unknown key 'step'"),
    "empty job_id": ({"checkpoints": [{**REF, "job_id": ""}]}, "checkpoints[0].job_id: must not be empty"),
    "blank checkpoint_name": ({"checkpoints": [{**REF, "checkpoint_name": "  "}]},
                              "checkpoints[0].checkpoint_name: must not be empty"),
    "job_id with a slash": ({"checkpoints": [{**REF, "job_id": "a/b"}]}, 'checkpoints[0].job_id: "a/b"'),
    "checkpoint_name ..": ({"checkpoints": [{**REF, "checkpoint_name": ".."}]}, "checkpoints[0].checkpoint_name"),
    "project_name with a slash": ({"checkpoints": [latest("../p")]}, "checkpoints[0].project_name"),
    "named without job_id": ({"checkpoints": [{"typ": REF["typ"], "checkpoint_name": NAME}]},
                             "checkpoints[0].job_id: required"),
}


@pytest.mark.parametrize("name", SPEC_CASES)
def test_bad_spec_is_refused_with_exit_2_naming_the_field(name, bare):
    raw, needle = SPEC_CASES[name]
    text = raw if isinstance(raw, str) else json.dumps(
        {"enabled": True, "checkpoints": [REF], "download_folder": str(bare.dl), **raw})
    result = bare.run(**{CONFIG: text})
    bare.refused(result, 2, needle)
    assert not bare.dl.exists()


ENV_CASES = {
    "unknown store scheme": ({"BT_CHECKPOINT_STORE": "gs://bucket/prefix"}, "BT_CHECKPOINT_STORE: unknown scheme 'gs'"),
    "s3 store without a bucket": ({"BT_CHECKPOINT_STORE": "s3:///prefix"}, "BT_CHECKPOINT_STORE"),
    "file store not absolute": ({"BT_CHECKPOINT_STORE": "file://relative/path"}, "BT_CHECKPOINT_STORE"),
    "node rank not a number": ({"BT_NODE_RANK": "one"}, "BT_NODE_RANK"),
    "project with a slash": ({"BT_TRAINING_PROJECT_NAME": "a/b"}, "BT_TRAINING_PROJECT_NAME"),
    "load timeout not a number": ({"BT_LOAD_TIMEOUT": "soon"}, "BT_LOAD_TIMEOUT"),
    "negative load timeout": ({"BT_LOAD_TIMEOUT": "-1"}, "BT_LOAD_TIMEOUT"),
    "unknown S3 engine": ({"CKPT_AGENT_S3_ENGINE": "curl"}, "CKPT_AGENT_S3_ENGINE"),
}


@pytest.mark.parametrize("name", ENV_CASES)
def test_bad_environment_is_refused_with_exit_2_naming_the_variable(name, bare):
    extra, needle = ENV_CASES[name]
    result = bare.run(**extra)
    bare.refused(result, 2, needle)
    assert not bare.dl.exists()


# ---- the store: exit 4 -------------------------------------------------------------------------

ENGINES = ["http", "boto3"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("ref", ["named", "latest"])
def test_bucket_that_does_not_exist_is_refused_with_exit_4(ref, engine, bare):
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:12]}"
    refs = named(NAME, JOB) if ref == "named" else latest("proj")
    result = bare.run(BT_CHECKPOINT_STORE=f"s3://{bucket}/x", CKPT_AGENT_S3_ENGINE=engine,
                      **{CONFIG: spec(bare.dl, refs)})
    bare.refused(result, 4, f"s3://{bucket}", "bucket does not exist")
    assert not bare.dl.exists()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("wrong", ["secret key", "access key id"])
def test_wrong_credentials_are_refused_with_exit_4_as_access_denied(wrong, engine, case):
    creds = ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"} if wrong == "secret key"
             else {"AWS_ACCESS_KEY_ID": "NOSUCHKEY0000000", "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    result = case.run(CKPT_AGENT_S3_ENGINE=engine, **creds)
    case.refused(result, 4, "access denied", "check the AWS credentials")
    assert not case.dl.exists()


def test_named_checkpoint_of_a_job_that_is_not_there_is_refused_with_exit_3(case):
    result = case.run(**{CONFIG: spec(case.dl, named(NAME, "no-such-job"))})
    case.refused(result, 3, "no-such-job")


# ---- the manifest: exit 5 ----------------------------------------------------------------------

EVIL_ABSOLUTE = f"/tmp/ckpt-agent-escaped-{uuid.uuid4().hex}"


def _file(path: str, size: int = 3, parts: list[str] | None = None) -> dict:
    parts = parts if parts is not None else ["00000000"]
    return {"path": path, "size": size, "parts": parts, "sha256": ["0" * 64] * len(parts)}  # format 2


MANIFEST_CASES = {
    "not JSON": (lambda m: b"{not json", "manifest is not valid JSON"),
    "not an object": (lambda m: [m], "manifest is not a JSON object"),
    "unknown format": (lambda m: {**m, "format": 3}, "unknown manifest format 3"),
    "unknown algorithm": (lambda m: {**m, "algorithm": "md5"}, "unknown checksum algorithm 'md5'"),
    "absolute path": (lambda m: {**m, "files": [_file(EVIL_ABSOLUTE)]}, EVIL_ABSOLUTE),
    "dotdot component": (lambda m: {**m, "files": [_file("sub/../../../escaped.bin")]}, "escaped.bin"),
    "dot component": (lambda m: {**m, "files": [_file("./model.bin")]}, "'./model.bin'"),
    "backslash": (lambda m: {**m, "files": [_file("..\\..\\escaped.bin")]}, "backslash or NUL"),
    "NUL": (lambda m: {**m, "files": [_file("model\0.bin")]}, "backslash or NUL"),
    "empty path": (lambda m: {**m, "files": [_file("")]}, "files[0]: path must be a non-empty string"),
    "duplicate paths": (lambda m: {**m, "files": [m["files"][0], m["files"][0]]}, "duplicate path 'model.bin'"),
    "file and folder": (lambda m: {**m, "files": [_file("sub"), _file("sub/state.json")]},
                        "'sub' is both a file and a folder"),
    "negative size": (lambda m: {**m, "files": [_file("model.bin", -1)]}, "negative size for 'model.bin'"),
    "size not a number": (lambda m: {**m, "files": [_file("model.bin", "3")]}, "field 'size'"),
    "too few parts": (lambda m: {**m, "files": [{**m["files"][0], "parts": m["files"][0]["parts"][:-1]}]},
                      "checksums do not match size 300000 of 'model.bin'"),
    "too many parts": (lambda m: {**m, "files": [_file("model.bin", 3, ["00000000", "00000000"])]},
                       "2 checksums do not match size 3"),
    "zero part size": (lambda m: {**m, "part_size": 0}, "part_size must be positive"),
    "names another checkpoint": (lambda m: {**m, "checkpoint_name": "checkpoint-8"}, "not its own location"),
}


@pytest.mark.parametrize("name", MANIFEST_CASES)
def test_bad_manifest_is_refused_with_exit_5_before_anything_is_written(name, case):
    tamper, needle = MANIFEST_CASES[name]
    case.put_manifest(tamper(case.manifest()))
    result = case.run()
    case.refused(result, 5, "rank-0.manifest.json", needle)
    assert not case.dl.exists()
    assert not Path(EVIL_ABSOLUTE).exists()


# ---- the download folder: exit 6, and planted symlinks: exit 5 --------------------------------

def test_download_folder_that_is_a_file_is_refused_with_exit_6(case):
    case.dl.parent.mkdir(parents=True)
    case.dl.write_bytes(b"not a folder")
    result = case.run()
    case.refused(result, 6, f"download_folder {case.dl}", "not a folder")
    assert case.dl.read_bytes() == b"not a folder"


def test_download_folder_under_proc_that_cannot_be_created_is_refused_with_exit_6(case):
    # /proc/1 exists and is a folder, and nobody, root included, can create anything in it
    result = case.run(**{CONFIG: spec(Path("/proc/1/loaded"), named(NAME, JOB))})
    case.refused(result, 6, "download_folder /proc/1/loaded")


@contextlib.contextmanager
def _read_only(folder: Path):
    """A folder this process cannot write to: mode 0555, or for root (who ignores modes) the
    immutable attribute; skips when neither is possible here."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"running as root and `chattr +i` is not available here: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_download_folder_that_is_not_writable_is_refused_with_exit_6(case):
    case.dl.mkdir(parents=True)
    with _read_only(case.dl):
        result = case.run()
    case.refused(result, 6, f"download_folder {case.dl}")
    assert list(case.dl.iterdir()) == []


SYMLINKS = {  # where in the download folder the link is planted, and whether it points at a folder
    "at a file": ("rank-0/checkpoint-7/model.bin", False),
    "at a temporary file": ("rank-0/checkpoint-7/model.bin.ckpt-incomplete", False),
    "at the checkpoint folder": ("rank-0/checkpoint-7", True),
    "at the rank folder": ("rank-0", True),
    "at a nested folder": ("rank-0/checkpoint-7/sub", True),
    "at the state folder": (".ckpt-agent", True),
    "at the lock file": (".ckpt-agent/lock", False),
    "at the index": (".ckpt-agent/verified.json", False),
    "at the manifests folder": (".ckpt-agent/manifests", True),
}


@pytest.mark.parametrize("name", SYMLINKS)
def test_symlink_planted_in_the_download_folder_is_refused_and_never_written_through(name, case):
    rel, is_dir = SYMLINKS[name]
    outside = case.tmp / "outside"
    outside.mkdir()
    target = outside if is_dir else outside / "precious.txt"
    (outside / "precious.txt").write_bytes(b"keep me")
    link = case.dl / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=is_dir)

    before = case.snapshot()
    result = run_agent(["run", "--", "touch", str(case.marker)], case.env())
    case.refused(result, 5, "symlink")
    assert str(link) in result.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    assert (outside / "precious.txt").read_bytes() == b"keep me"
    assert {p for p in case.snapshot() - before if not p.startswith("deep/dl/")} == set()


def test_download_folder_that_is_itself_a_symlink_is_followed(case, proxy: FaultProxy):
    disk = case.tmp / "mounted-disk"
    disk.mkdir()
    case.dl.parent.mkdir(parents=True)
    case.dl.symlink_to(disk, target_is_directory=True)
    result = run_agent(["run", "--", "sh", "-c", 'echo "dir=$BT_LOAD_CHECKPOINT_DIR"'],
                       case.env(AWS_ENDPOINT_URL=proxy.endpoint))
    assert result.returncode == 0, result.stderr
    assert f"dir={case.dl}" in result.stdout
    assert_exact(disk, FILES)
    assert file_bytes(proxy) == sum(len(d) for d in FILES.values())
