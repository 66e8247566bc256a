"""Every environment variable the commands read is parsed here (BASETEN_* through ckpt_agent.config.baseten,
for that store only), and only here.

Pure functions of a mapping, so tests pass dicts: settings_from_env into a frozen Settings, and the
pieces a command needs alone or merged with its flags (log_format, load_spec, selection_from_env,
sync_options). cli.py hands them os.environ, each once per command. Training code's
latest_local_checkpoint, in the trainer's Python, reads its three variables itself
(ckpt_agent.disk.resume, ckpt_agent.runtime.loadstatus).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_agent.config import names
from ckpt_agent.config.baseten import DEFAULT_API_URL, BasetenSettings, baseten_settings_from_env
from ckpt_agent.config.selection import EXCLUDE_VAR, INCLUDE_VAR, Selection, load_own_rank
from ckpt_agent.config.sidecar import (
    DEFAULT_GRACE_SECONDS,
    DEFAULT_NOTHING_HERE_SECONDS,
    DEFAULT_POLL_SECONDS,
    DEFAULT_QUIET_SECONDS,
    Rules,
    SyncOptions,
)
from ckpt_agent.config.sizes import parse_size
from ckpt_agent.config.spec import (
    BASETEN,
    CONFIG_VAR,
    LoadSpec,
    StoreLocation,
    check_name,
    parse_load_spec,
    parse_start_commands,
    parse_store_location,
)
from ckpt_agent.errors import ConfigError

PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy")  # the S3 engines honour them as botocore does
DEFAULT_STORE = "/tmp/ckpt-store"
DEFAULT_CHUNK_MB = 64
DEFAULT_READ_TIMEOUT = 20
DEFAULT_CHECKPOINT_DIR = "/tmp/training_checkpoints"
LOG_FORMATS = ("human", "json")


def default_workers() -> int:
    """Enough requests per core to keep the pipe full; more only burn kernel time on a small node
    (the measurements: docs/benchmarks.md, "Numbers behind the code")."""
    return min(64, 8 * (os.cpu_count() or 2))


@dataclass(frozen=True)
class StoreConfig:
    """What opening the store needs (ckpt_agent.stores.open_store), and nothing else of Settings."""

    location: StoreLocation
    engine: str = "http"  # CKPT_AGENT_S3_ENGINE: http (native) or boto3
    aws_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    read_timeout: float = DEFAULT_READ_TIMEOUT
    max_connections: int = 32  # boto3's connection pool: one per worker
    is_default: bool = False  # the default local store in /tmp: trusted only if it is this user's
    baseten: BasetenSettings | None = None  # BT_CHECKPOINT_STORE=baseten: the API's address and key


@dataclass(frozen=True)
class Settings:
    spec: LoadSpec
    store: StoreLocation
    project_name: str | None
    job_id: str | None
    node_rank: int
    num_nodes: int
    required: bool
    start_commands: tuple[str, ...]
    workers: int
    chunk_size: int
    load_timeout: float | None
    read_timeout: float
    s3_engine: str = "http"
    aws_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    checkpoint_dir: str = DEFAULT_CHECKPOINT_DIR
    checkpointing_enabled: bool = False
    max_rate: int | None = None  # CKPT_AGENT_MAX_RATE: bytes per second, loads and uploads; None: no cap
    cache: CacheSettings | None = None
    baseten: BasetenSettings = field(default_factory=lambda: BasetenSettings(DEFAULT_API_URL, None))
    load_own_rank: bool = False  # CKPT_AGENT_LOAD_RANKS=own: of a multi-node checkpoint, only this node's files

    @property
    def store_config(self) -> StoreConfig:
        return StoreConfig(self.store, self.s3_engine, self.aws_env, self.read_timeout, self.workers,
                           is_default=self.store.scheme == "file" and self.store.root == DEFAULT_STORE,
                           baseten=self.baseten)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {value}")
    return value


def env_flag(env: Mapping[str, str], name: str) -> bool:
    """One spelling of yes/no for every boolean variable; anything else is an error, not a guess."""
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{name}: expected 1 or 0, got {raw!r}")


NODE_COUNT_VAR = "BT_GROUP_SIZE"  # what the platform sets on every node of a multi-node job
NODE_COUNT_ALIAS = "BT_NUM_NODES"  # what earlier agents read; still honoured


def node_count(env: Mapping[str, str]) -> int:
    """BT_GROUP_SIZE, or its alias BT_NUM_NODES; both set to different counts is an error, not a guess
    (the count decides when a checkpoint is complete for the whole job)."""
    size, alias = _int(env, NODE_COUNT_VAR, 0, 1), _int(env, NODE_COUNT_ALIAS, 0, 1)
    if size and alias and size != alias:
        raise ConfigError(f"{NODE_COUNT_VAR}={size} and {NODE_COUNT_ALIAS}={alias} disagree on the node count; "
                          f"unset {NODE_COUNT_ALIAS} (the platform sets {NODE_COUNT_VAR})")
    return size or alias or 1


def log_format(env: Mapping[str, str]) -> str:
    """BT_LOG_FORMAT, read before everything else so that every later error comes out in it."""
    raw = env.get("BT_LOG_FORMAT")
    fmt = (raw or "").strip().lower() or "human"
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"BT_LOG_FORMAT: expected {' or '.join(LOG_FORMATS)}, got {raw!r}")
    return fmt


def debug(env: Mapping[str, str]) -> bool:
    """CKPT_AGENT_DEBUG=1 exactly: read while reporting a crash, where a bad value must not raise again."""
    return env.get("CKPT_AGENT_DEBUG") == "1"


def load_spec(env: Mapping[str, str]) -> LoadSpec:
    """The spec alone: `verify` needs nothing more, so a broken store or rank variable doesn't stop it."""
    return parse_load_spec(env.get(CONFIG_VAR))


def settings_from_env(env: Mapping[str, str], workers: int | None = None,
                      chunk_mb: int | None = None) -> Settings:
    timeout = env.get("BT_LOAD_TIMEOUT", "").strip()
    try:
        load_timeout = float(timeout) if timeout else None
    except ValueError:
        raise ConfigError(f"BT_LOAD_TIMEOUT: expected seconds, got {timeout!r}") from None
    if load_timeout is not None and load_timeout <= 0:
        raise ConfigError("BT_LOAD_TIMEOUT: must be a positive number of seconds")
    read_timeout = _int(env, "CKPT_AGENT_READ_TIMEOUT", DEFAULT_READ_TIMEOUT, 1)
    engine = env.get("CKPT_AGENT_S3_ENGINE", "").strip() or "http"
    if engine not in ("http", "boto3"):
        raise ConfigError(f"CKPT_AGENT_S3_ENGINE: expected http or boto3, got {engine!r}")
    project = env.get("BT_TRAINING_PROJECT_NAME") or None
    job_id = env.get("BT_TRAINING_JOB_ID") or None
    store = parse_store_location(env.get("BT_CHECKPOINT_STORE") or DEFAULT_STORE)
    return Settings(
        spec=load_spec(env),
        store=store,
        project_name=check_name(project, "BT_TRAINING_PROJECT_NAME", nullable=True),
        job_id=check_name(job_id, "BT_TRAINING_JOB_ID", nullable=True),
        node_rank=_int(env, "BT_NODE_RANK", 0, 0),
        num_nodes=node_count(env),
        required=env_flag(env, "BT_LOAD_CHECKPOINT_REQUIRED"),
        start_commands=parse_start_commands(env.get("BT_START_COMMANDS")),
        workers=workers or _int(env, "CKPT_AGENT_WORKERS", default_workers(), 1),
        chunk_size=(chunk_mb or _int(env, "CKPT_AGENT_CHUNK_MB", DEFAULT_CHUNK_MB, 1)) << 20,
        load_timeout=load_timeout,
        read_timeout=read_timeout,
        s3_engine=engine,
        aws_env={k: v for k, v in env.items() if k.startswith("AWS_") or k.lower() in PROXY_VARS},
        checkpoint_dir=env.get("BT_CHECKPOINT_DIR", "").strip() or DEFAULT_CHECKPOINT_DIR,
        checkpointing_enabled=env_flag(env, "BT_CHECKPOINTING_ENABLED"),
        max_rate=max_rate_from_env(env),
        cache=cache_settings_from_env(env),
        baseten=baseten_settings_from_env(env) if store.scheme == BASETEN else BasetenSettings(DEFAULT_API_URL, None),
        load_own_rank=load_own_rank(env),
    )


# --- limits (issue 12): the rate cap and selective loads ---------------------------------------
# Defaults: no rate cap; every file of a checkpoint. The concurrency ceiling is CKPT_AGENT_WORKERS;
# throttling answers lower it, never below one request at a time (ckpt_agent.runtime.ratelimit).

MAX_RATE_VAR = "CKPT_AGENT_MAX_RATE"


def max_rate_from_env(env: Mapping[str, str]) -> int | None:
    """`200MB`, `200MB/s`, `1.5GiB`, `500M` or a plain number of bytes per second; unset: no cap."""
    raw = env.get(MAX_RATE_VAR, "").strip()
    if not raw:
        return None
    rate = parse_size(raw.removesuffix("/s"), MAX_RATE_VAR)
    if rate < 1:
        raise ConfigError(f"{MAX_RATE_VAR}: must be at least 1 byte per second, got {raw!r}; unset it for no cap")
    return rate


def selection_from_env(env: Mapping[str, str], include_flags: Sequence[str] | None = None,
                       exclude_flags: Sequence[str] | None = None) -> Selection:
    """Which files a load fetches. `--include`/`--exclude`, when given, each replace their variable (so
    `--exclude ''` clears CKPT_AGENT_EXCLUDE); errors name the flag or the variable the pattern came from."""
    include, include_field = ((include_flags, "--include") if include_flags is not None
                              else (env.get(INCLUDE_VAR, ""), INCLUDE_VAR))
    exclude, exclude_field = ((exclude_flags, "--exclude") if exclude_flags is not None
                              else (env.get(EXCLUDE_VAR, ""), EXCLUDE_VAR))
    return Selection.from_patterns(include, exclude, include_field, exclude_field)


# --- the persistent part cache (issue 12) -------------------------------------------------------

CACHE_DIR_NAME = "ckpt-agent-cache"  # inside the platform's BT_PROJECT_CACHE_DIR
DEFAULT_CACHE_MAX_BYTES = 20 << 30


@dataclass(frozen=True)
class CacheSettings:
    root: str
    max_bytes: int


def cache_settings_from_env(env: Mapping[str, str]) -> CacheSettings | None:
    """None (no cache) unless CKPT_AGENT_CACHE_DIR or the platform's BT_PROJECT_CACHE_DIR names a
    folder; CKPT_AGENT_CACHE_MAX_BYTES=0 turns it off. The cap is read even then, so a typo shows."""
    raw_cap = env.get("CKPT_AGENT_CACHE_MAX_BYTES", "").strip()
    max_bytes = parse_size(raw_cap, "CKPT_AGENT_CACHE_MAX_BYTES") if raw_cap else DEFAULT_CACHE_MAX_BYTES
    field_name, root = "CKPT_AGENT_CACHE_DIR", env.get("CKPT_AGENT_CACHE_DIR", "").strip()
    if not root and (project_cache := env.get("BT_PROJECT_CACHE_DIR", "").strip()):
        field_name, root = "BT_PROJECT_CACHE_DIR", os.path.join(project_cache, CACHE_DIR_NAME)
    if not root or max_bytes == 0:
        return None
    if not os.path.isabs(root):
        raise ConfigError(f"{field_name}: expected an absolute path, got {root!r}")
    return CacheSettings(root, max_bytes)


# -- the sidecar's options (`sync`, and `run` with BT_CHECKPOINTING_ENABLED=1) -----------------------
# Flags win over CKPT_AGENT_* variables, which win over the defaults in ckpt_agent.config.sidecar.


def _seconds(flag: float | None, flag_name: str, env: Mapping[str, str], var: str, default: float,
             positive: bool = False) -> float:
    """A flag, else the variable, else the default; never negative (zero only if not `positive`)."""
    raw = env.get(var, "").strip()
    if flag is not None:
        value, where = flag, flag_name
    elif raw:
        try:
            value, where = float(raw), var
        except ValueError:
            raise ConfigError(f"{var}: expected seconds, got {raw!r}") from None
    else:
        return default
    if value < 0 or (positive and value == 0) or value != value:
        raise ConfigError(f"{where}: must be {'above' if positive else 'at least'} 0 seconds, got {value:g}")
    return value


def _keep_last(flag: int | None, env: Mapping[str, str]) -> int | None:
    if flag is not None:
        if flag < 1:
            raise ConfigError(f"--keep-last: must be at least 1, got {flag}")
        return flag
    raw = env.get("CKPT_AGENT_KEEP_LAST", "").strip()
    if not raw:
        return None
    if not raw.isdecimal() or int(raw) < 1:
        raise ConfigError(f"CKPT_AGENT_KEEP_LAST: expected a whole number of at least 1, got {raw!r}")
    return int(raw)


def _markers(flags: Sequence[str] | None, env: Mapping[str, str]) -> tuple[str, ...]:
    """--complete-file (repeatable, or comma-separated), else CKPT_AGENT_COMPLETE_FILE; '' means none."""
    where = "--complete-file"
    if isinstance(flags, str):
        flags = [flags]
    if flags is None:
        flags, where = [env.get("CKPT_AGENT_COMPLETE_FILE", "")], "CKPT_AGENT_COMPLETE_FILE"
    found = tuple(dict.fromkeys(n.strip() for flag in flags for n in flag.split(",") if n.strip()))
    for name in found:
        if names.path_problem(name) is not None:
            raise ConfigError(f"{where}: {name!r} must be a path inside the checkpoint folder")
    return found


def trainer_grace(env: Mapping[str, str], flag: float | None = None) -> float:
    """How long a stopped trainer gets between SIGTERM and SIGKILL, flag over variable over default."""
    return _seconds(flag, "--grace-seconds", env, "CKPT_AGENT_GRACE_SECONDS", DEFAULT_GRACE_SECONDS)


def sync_options(env: Mapping[str, str], checkpoint_dir: str, *, quiet_seconds: float | None = None,
                 poll_seconds: float | None = None, grace_seconds: float | None = None,
                 keep_last: int | None = None, complete_file: Sequence[str] | None = None,
                 commit_on_quiet: bool | None = None) -> SyncOptions:
    """The sidecar's options: flags over CKPT_AGENT_* variables over the defaults."""
    return SyncOptions(
        Path(checkpoint_dir),
        _seconds(quiet_seconds, "--quiet-seconds", env, "CKPT_AGENT_QUIET_SECONDS", DEFAULT_QUIET_SECONDS),
        _seconds(poll_seconds, "--poll-seconds", env, "CKPT_AGENT_POLL_SECONDS", DEFAULT_POLL_SECONDS, True),
        trainer_grace(env, grace_seconds),
        _keep_last(keep_last, env),
        Rules(_markers(complete_file, env), bool(commit_on_quiet) or env_flag(env, "CKPT_AGENT_COMMIT_ON_QUIET")),
        _seconds(None, "", env, "CKPT_AGENT_NOTHING_HERE_SECONDS", DEFAULT_NOTHING_HERE_SECONDS),
    )
