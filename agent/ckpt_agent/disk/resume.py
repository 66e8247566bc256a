"""What training code calls: `ckpt_agent.latest_local_checkpoint()`, reading what the last load recorded.

It runs in the trainer's own interpreter, which may be any Python from 3.9 on and has none of the
agent's dependencies: the self-contained agent (docs/containers.md) puts only this package on the
trainer's PYTHONPATH. So this module and what it imports (ckpt_agent.disk.folder, safefs and
localstate, ckpt_agent.config.names, ckpt_agent.errors) use the standard library alone and nothing
newer than 3.9;
tests/test_bundle.py runs it under a second Python.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from ckpt_agent.config import names
from ckpt_agent.disk.folder import Folder
from ckpt_agent.disk.localstate import STATE_DIR, loaded_record, rank_dir, state_dir
from ckpt_agent.errors import AgentError, IntegrityError, LocalError

FILE_KIND = "file"  # a manifest's kind for a single-file checkpoint (ckpt_agent.stores.manifest)


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def slow_crc32c(data: bytes) -> str:
    """crc32c as ckpt_agent.disk.digests formats it, in pure Python: the trainer's interpreter may not
    have the `crc32c` module, and the manifests checked here are a few kilobytes."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return f"{crc ^ 0xFFFFFFFF:08x}"


def read_load_record(folder: Folder, name: str) -> dict | None:
    """One rank's record as written (None when there is none); IntegrityError when it is not a record
    (a FIFO or a link included). Its checkpoint entries are checked by whoever uses them."""
    path = folder.shown(f"{STATE_DIR}/{name}")
    try:
        raw = folder.read(f"{STATE_DIR}/{name}")
        record = json.loads(raw) if raw is not None else None
    except (OSError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"{path}: unreadable ({type(exc).__name__}); run `ckpt-agent load` again") from None
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("checkpoints"), list):
        raise IntegrityError(f"{path}: not a load record; run `ckpt-agent load` again")
    return record


def latest_local_checkpoint(rank: int | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The newest loaded checkpoint under BT_LOAD_CHECKPOINT_DIR/rank-<rank>/, newest by the store's
    order as the load recorded it (never by file times), or None when nothing was loaded.

    The rank defaults to BT_NODE_RANK (read only when a folder was loaded; then it must be a whole
    number: ValueError), else 0. The path each framework's resume call takes: the folder, or for a
    single-file checkpoint (`ckpt-5.pt`, loaded into `rank-0/ckpt-5.pt/ckpt-5.pt`) the file itself."""
    env = os.environ if env is None else env
    if not env.get("BT_LOAD_CHECKPOINT_DIR"):
        return None
    base = Path(env["BT_LOAD_CHECKPOINT_DIR"])
    rank = int(env.get("BT_NODE_RANK") or 0) if rank is None else rank
    name = loaded_record(rank)
    try:
        with Folder(base) as folder:
            prefix = rank_dir(rank) + "/"
            mine = [e for e in (read_load_record(folder, name) or {}).get("checkpoints", []) if isinstance(e, dict)
                    and isinstance(e.get("path"), str) and e["path"].startswith(prefix)
                    and e["path"].count("/") == 1 and names.is_segment(e["path"][len(prefix):])]
            for entry in sorted(mine, key=lambda e: e.get("order", 0)):
                with contextlib.suppress(IntegrityError):
                    if folder.dir(entry["path"]) is not None:
                        return _resume_path(folder, base, entry, name)
    except LocalError:
        return None  # no download folder at all
    except (AgentError, ValueError, KeyError, TypeError, RecursionError):
        raise ValueError(f"{state_dir(base) / name}: not a load record; run `ckpt-agent load` again") from None
    return None


def _resume_path(folder: Folder, base: Path, entry: dict, record: str) -> str | None:
    """The folder, or the one file of a single-file checkpoint (its recorded manifest says which)."""
    path = base / entry["path"]
    if not isinstance(entry.get("manifest"), str):  # a record from before manifests were kept
        return str(path)
    shown = f"{STATE_DIR}/{entry['manifest']}"
    if (problem := names.path_problem(entry["manifest"])) is not None:
        raise ValueError(f"{record}: manifest {entry['manifest']!r} {problem}; run `ckpt-agent load` again")
    raw = folder.read(shown)
    if raw is None:
        raise ValueError(f"{shown}: the recorded manifest is gone; run `ckpt-agent load` again")
    if slow_crc32c(raw) != entry.get("manifest_crc32c"):
        raise ValueError(f"{shown}: the recorded manifest does not match its crc32c in {record}; "
                         "run `ckpt-agent load` again")
    manifest = json.loads(raw)
    if manifest.get("kind") != FILE_KIND:
        return str(path)
    file_name = manifest["files"][0]["path"]
    if not isinstance(file_name, str) or "/" in file_name or names.path_problem(file_name) is not None:
        raise ValueError(f"{shown}: not a single-file manifest; run `ckpt-agent load` again")
    rel = f"{entry['path']}/{file_name}"
    st = folder.lstat(rel)
    return str(base / rel) if st is not None and stat.S_ISREG(st.st_mode) else None
