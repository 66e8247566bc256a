"""Turns the environment's JSON and URLs into frozen dataclasses, refusing anything unexpected.

The shapes are exactly what `truss_train.LoadCheckpointConfig.model_dump_json()` writes; an
unknown key is an error rather than silently ignored, because a typo there would otherwise
mean training from scratch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

from ckpt_agent.config import names
from ckpt_agent.errors import ConfigError

DEFAULT_DOWNLOAD_FOLDER = "/tmp/loaded_checkpoints"
LATEST = "baseten_latest_checkpoint"
NAMED = "baseten_named_checkpoint"
S3_PREFIX = "s3_prefix"
LOOPS = "loops_checkpoint"  # the SDK's own type, resolved by the platform's backend (no public API)
CONFIG_VAR = "BT_LOAD_CHECKPOINT_CONFIG"
BASETEN = "baseten"  # BT_CHECKPOINT_STORE=baseten: Baseten's training API, not a folder
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


@dataclass(frozen=True)
class LatestRef:
    project_name: str | None = None
    job_id: str | None = None

    def describe(self) -> str:
        parts = [f"project_name={self.project_name}" if self.project_name else "",
                 f"job_id={self.job_id}" if self.job_id else ""]
        return "latest(" + ", ".join(p for p in parts if p) + ")"


@dataclass(frozen=True)
class NamedRef:
    checkpoint_name: str
    job_id: str

    def describe(self) -> str:
        return f"named(checkpoint_name={self.checkpoint_name}, job_id={self.job_id})"


@dataclass(frozen=True)
class S3PrefixRef:
    """Every object under `s3://bucket/prefix/`, loaded into rank-<r>/<name>/ (name: the prefix's last part)."""

    uri: str
    bucket: str
    prefix: str  # ends with '/'
    name: str

    def describe(self) -> str:
        return f"s3_prefix(uri={self.uri})"


Reference = LatestRef | NamedRef | S3PrefixRef


@dataclass(frozen=True)
class LoadSpec:
    enabled: bool = False
    checkpoints: tuple[Reference, ...] = (LatestRef(),)
    download_folder: str = DEFAULT_DOWNLOAD_FOLDER


@dataclass(frozen=True)
class StoreLocation:
    """Where checkpoints live: `scheme` is "s3", "file" or "baseten" (the training API: no bucket, no
    root); `root` is the prefix or folder."""

    scheme: str
    bucket: str
    root: str

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.root}".rstrip("/")
        return self.root or self.scheme


def _as_json(value: object) -> str:
    """A value as JSON spells it, for messages; json is imported only where it is needed (start-up time)."""
    import json

    return json.dumps(value)


@overload
def check_name(value: object, field: str, *, nullable: Literal[False] = False) -> str: ...
@overload
def check_name(value: object, field: str, *, nullable: bool) -> str | None: ...
def check_name(value: object, field: str, *, nullable: bool = False) -> str | None:
    """A store name becomes a path component, so it must be a plain non-empty segment."""
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{field}: expected a string, got {_as_json(value)}")
    if not value.strip():
        raise ConfigError(f"{field}: must not be empty")
    problem = names.name_problem(value)
    if problem is not None:
        raise ConfigError(f"{field}: {names.quote_name(value)} {problem}; use a plain name such as checkpoint-20")
    return value


def _check_keys(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _parse_reference(obj: object, where: str) -> Reference:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected an object, got {_as_json(obj)}")
    typ = obj.get("typ")
    if typ == LATEST:
        _check_keys(obj, {"typ", "project_name", "job_id"}, where)
        return LatestRef(
            project_name=check_name(obj.get("project_name"), f"{where}.project_name", nullable=True),
            job_id=check_name(obj.get("job_id"), f"{where}.job_id", nullable=True),
        )
    if typ == NAMED:
        _check_keys(obj, {"typ", "checkpoint_name", "job_id"}, where)
        for key in ("checkpoint_name", "job_id"):
            if key not in obj:
                raise ConfigError(f"{where}.{key}: required for {NAMED}")
        return NamedRef(
            checkpoint_name=check_name(obj["checkpoint_name"], f"{where}.checkpoint_name"),
            job_id=check_name(obj["job_id"], f"{where}.job_id"),
        )
    if typ == S3_PREFIX:
        _check_keys(obj, {"typ", "uri"}, where)
        return parse_s3_prefix(obj.get("uri"), f"{where}.uri")
    if typ == LOOPS:  # a valid spec the agent cannot serve: refused by name, never skipped (no silent scratch)
        raise ConfigError(f"{where}.typ: {LOOPS!r} is resolved by the platform's backend, which ckpt-agent "
                          f"cannot reach; name the checkpoint with {NAMED!r} (job_id, checkpoint_name) or "
                          f"{S3_PREFIX!r} (uri) instead")
    raise ConfigError(f"{where}.typ: unknown {_as_json(typ)} (expected {LATEST!r}, {NAMED!r} or {S3_PREFIX!r})")


def parse_s3_prefix(uri: object, field: str) -> S3PrefixRef:
    """`s3://bucket/path/checkpoint-500/`: the last path component names the checkpoint's folder."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ConfigError(f"{field}: expected s3://bucket/path/checkpoint-name/")
    bucket, _, path = uri[len("s3://"):].partition("/")
    if "@" in bucket:  # not echoed: a user and password
        raise ConfigError(f"{field}: must not hold a user or password; give credentials through the AWS environment")
    path = path.strip("/")
    if not _BUCKET.fullmatch(bucket) or not path:
        raise ConfigError(f"{field}: {_as_json(uri)} needs a bucket and a path (s3://bucket/path/checkpoint-name/)")
    name = check_name(path.rsplit("/", 1)[-1], f"{field} (its last path component)")
    return S3PrefixRef(f"s3://{bucket}/{path}/", bucket, f"{path}/", name)


def parse_load_spec(text: str | None) -> LoadSpec:
    """Parse BT_LOAD_CHECKPOINT_CONFIG; unset or empty means loading is disabled."""
    if text is None or not text.strip():
        return LoadSpec()
    import json

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{CONFIG_VAR}: not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{CONFIG_VAR}: expected a JSON object, got {type(obj).__name__}")
    _check_keys(obj, {"enabled", "checkpoints", "download_folder"}, CONFIG_VAR)
    enabled = obj.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{CONFIG_VAR}.enabled: expected true or false, got {_as_json(enabled)}")
    raw_refs = obj.get("checkpoints", [{"typ": LATEST}])
    if raw_refs is None:
        raw_refs = [{"typ": LATEST}]
    if not isinstance(raw_refs, list):
        raise ConfigError(f"{CONFIG_VAR}.checkpoints: expected a list, got {_as_json(raw_refs)}")
    refs = tuple(
        _parse_reference(r, f"{CONFIG_VAR}.checkpoints[{i}]") for i, r in enumerate(raw_refs)
    )
    folder = obj.get("download_folder", DEFAULT_DOWNLOAD_FOLDER)
    if folder is None:
        folder = DEFAULT_DOWNLOAD_FOLDER
    if not isinstance(folder, str) or not folder.strip() or "\0" in folder:
        raise ConfigError(f"{CONFIG_VAR}.download_folder: expected a folder path, got {_as_json(folder)}")
    return LoadSpec(enabled=enabled, checkpoints=refs, download_folder=folder)


def parse_start_commands(text: str | None) -> tuple[str, ...]:
    """BT_START_COMMANDS: a JSON list of shell strings, as truss Runtime.start_commands."""
    if text is None or not text.strip():
        return ()
    import json

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"BT_START_COMMANDS: not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(obj, list) or not all(isinstance(c, str) for c in obj):
        raise ConfigError("BT_START_COMMANDS: expected a JSON list of command strings")
    return tuple(obj)


STORE_FORMS = "s3://bucket[/prefix], baseten, file:///absolute/path or an absolute path"


def parse_store_location(text: str) -> StoreLocation:
    """One of STORE_FORMS, spelled exactly. Anything else (`s3:/x`, `S3://x`, `bucket/x`, a relative
    path) is refused: taken as a folder it would be created in the working directory, and a
    container's working directory disappears with it, checkpoints and all."""
    if text == BASETEN:
        return StoreLocation(BASETEN, "", "")
    if text.startswith("/"):
        return StoreLocation("file", "", os.path.abspath(text))
    if not text.strip():
        raise ConfigError(f"BT_CHECKPOINT_STORE: must not be empty (use {STORE_FORMS})")
    if "://" not in text:
        raise ConfigError(f"BT_CHECKPOINT_STORE: {_shown(text)} is not a store (use {STORE_FORMS})")
    if "@" in text.split("://", 1)[1].split("/", 1)[0]:
        # Never echoed: what precedes the '@' is a user and often a secret key.
        raise ConfigError("BT_CHECKPOINT_STORE: must not hold a user or password (user:secret@); "
                          "use s3://bucket/prefix and give credentials through the AWS environment")
    from urllib.parse import unquote, urlparse  # only for a URL: urllib costs start-up time

    url = urlparse(text)
    if text.startswith("s3://"):
        if not url.netloc:
            raise ConfigError(f"BT_CHECKPOINT_STORE: {text!r} has no bucket (use s3://bucket/prefix)")
        if not _BUCKET.fullmatch(url.netloc):
            raise ConfigError(f"BT_CHECKPOINT_STORE: {url.netloc!r} is not a bucket name "
                              "(letters, digits, '.', '-' and '_'; use s3://bucket/prefix)")
        return StoreLocation("s3", url.netloc, url.path.strip("/"))
    if text.startswith("file://"):
        if url.netloc not in ("", "localhost") or not url.path.startswith("/"):
            raise ConfigError(f"BT_CHECKPOINT_STORE: {text!r} must be file:///absolute/path")
        return StoreLocation("file", "", unquote(url.path))
    scheme = text.split("://", 1)[0]
    raise ConfigError(f"BT_CHECKPOINT_STORE: unknown scheme {scheme!r} in {_shown(text)} (use {STORE_FORMS})")


def _shown(text: str) -> str:
    """The value quoted, unless an '@' says it may hold a user and password (`s3:/key:secret@bucket`)."""
    return "the value (not shown: it holds '@')" if "@" in text else repr(text)
