"""Which top-level entries of BT_CHECKPOINT_DIR are checkpoints, of which format, and whether a
single file's own structure says it is complete.

Pure functions over what ckpt_agent.sync.observe saw; ckpt_agent.sync.readiness decides when each is committed.
"""

from __future__ import annotations

import json
import re
import stat
import struct
from dataclasses import dataclass
from enum import Enum

from ckpt_agent.config.sidecar import Rules
from ckpt_agent.stores.manifest import natural_key
from ckpt_agent.upload.scan import kind_of

SINGLE_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors", ".bin")
HF_STATE = "trainer_state.json"
DCP_METADATA = ".metadata"
DEEPSPEED_LATEST = "latest"
# Written by DeepSpeed next to its tag folders; never checkpoints themselves.
DEEPSPEED_FILES = (DEEPSPEED_LATEST, "latest_universal", "zero_to_fp32.py")
_HF_NAME = re.compile(r"^checkpoint-\d+$")
_DEEPSPEED_NAME = re.compile(r"^global_step\d+$")
_DEEPSPEED_FILE = re.compile(r"^(mp_rank_\d+_model_states|.*_optim_states|zero_pp_rank_.*)\.pt$")


def shape(name: str) -> str:
    """checkpoint-20 and checkpoint-300 have one shape, so their steps can be compared."""
    return re.sub(r"\d+", "#", name)


class Format(Enum):
    HF = "HF Trainer folder"
    DCP = "torch.distributed.checkpoint folder"
    DEEPSPEED = "DeepSpeed tag folder"
    FILE = "single-file checkpoint"
    MARKER = "folder with a user-given complete file"
    UNKNOWN = "folder of no known format"


# -- the top level: which entries are checkpoints ------------------------------------------------


class Skip(Enum):
    """Why a top-level entry is not uploaded; each is reported once when it appears."""

    HIDDEN = "a hidden name (starts with '.')"
    LINK_INSIDE = "a symlink to {detail}, which is uploaded under its own name"
    LINK_OUTSIDE = "a symlink that does not lead to a top-level entry of {detail}; it is not followed"
    DANGLING = "a symlink to nothing"
    SPECIAL = "not a regular file or folder ({detail})"
    DEEPSPEED_FILE = "DeepSpeed's bookkeeping file; its tag folders are the checkpoints"
    OTHER_FILE = "a file that is not a checkpoint (single-file checkpoints end in {detail})"


@dataclass(frozen=True)
class TopEntry:
    """One top-level entry as lstat saw it; `link_to` is the top-level name a symlink resolves to,
    "" when it resolves outside the watched folder (or deeper in it), None for a dangling one."""

    name: str
    mode: int
    link_to: str | None = None


@dataclass(frozen=True)
class Candidate:
    name: str
    is_file: bool


@dataclass(frozen=True)
class Skipped:
    name: str
    skip: Skip
    detail: str = ""

    def __str__(self) -> str:
        return self.skip.value.format(detail=self.detail)


def classify(entries: list[TopEntry], root: str) -> tuple[list[Candidate], list[Skipped]]:
    """Top-level entries -> checkpoints (in natural name order) and what is left out, with why."""
    found: list[Candidate] = []
    skipped: list[Skipped] = []
    for e in entries:
        if e.name.startswith("."):
            skipped.append(Skipped(e.name, Skip.HIDDEN))
        elif stat.S_ISLNK(e.mode):
            if e.link_to is None:
                skipped.append(Skipped(e.name, Skip.DANGLING))
            elif e.link_to:
                skipped.append(Skipped(e.name, Skip.LINK_INSIDE, e.link_to))
            else:
                skipped.append(Skipped(e.name, Skip.LINK_OUTSIDE, root))
        elif stat.S_ISDIR(e.mode):
            found.append(Candidate(e.name, is_file=False))
        elif not stat.S_ISREG(e.mode):
            skipped.append(Skipped(e.name, Skip.SPECIAL, kind_of(e.mode)))
        elif e.name in DEEPSPEED_FILES:
            skipped.append(Skipped(e.name, Skip.DEEPSPEED_FILE))
        elif e.name.endswith(SINGLE_FILE_SUFFIXES):
            found.append(Candidate(e.name, is_file=True))
        else:
            skipped.append(Skipped(e.name, Skip.OTHER_FILE, ", ".join(SINGLE_FILE_SUFFIXES)))
    return sorted(found, key=lambda c: natural_key(c.name)), skipped


def folder_format(name: str, files: tuple[str, ...], rules: Rules, deepspeed_latest: str | None) -> Format:
    """Recognised by what is in it (or its name), so a half-written one is recognised too."""
    if rules.markers:
        return Format.MARKER
    if HF_STATE in files or _HF_NAME.match(name):
        return Format.HF
    if DCP_METADATA in files or any(f.endswith(".distcp") for f in files):
        return Format.DCP
    if (name == deepspeed_latest or _DEEPSPEED_NAME.match(name)
            or any(_DEEPSPEED_FILE.match(f.rsplit("/", 1)[-1]) for f in files)):
        return Format.DEEPSPEED
    return Format.UNKNOWN


# -- single files: is the structure complete? ------------------------------------------------------

_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
TAIL_BYTES = 65536 + 22  # the zip end record with the longest comment


def file_structure(name: str, size: int, head: bytes, tail: bytes) -> str | None:
    """"" when the file's own structure says it is complete, a reason when it says it is not, None when
    the format has no such structure (e.g. a legacy pickle). `head`: its first bytes (at least 8 and,
    for safetensors, the whole header); `tail`: its last min(size, TAIL_BYTES) bytes.

    torch.save (zip) writes the central directory and its end record last; safetensors files are
    exactly as long as their header says.
    """
    if name.endswith(".safetensors"):
        return _safetensors(size, head)
    if head.startswith(_ZIP_LOCAL):
        return _zip(size, tail)
    if size < len(_ZIP_LOCAL) and _ZIP_LOCAL.startswith(head):
        return "shorter than any complete checkpoint"
    return None


def _zip(size: int, tail: bytes) -> str:
    end = tail.rfind(_ZIP_END)
    while end >= 0:
        record = tail[end:end + 22]
        if len(record) == 22:
            cd_size, cd_offset, comment = struct.unpack("<IIH", record[12:22])
            end_offset = size - len(tail) + end
            if end + 22 + comment == len(tail):
                zip64 = end >= 20 and tail[end - 20:end - 16] == _ZIP64_LOCATOR
                if zip64 or cd_offset + cd_size == end_offset:
                    return ""
        end = tail.rfind(_ZIP_END, 0, end)
    return "no zip end record at its end (torch.save writes it last)"


def _safetensors(size: int, head: bytes) -> str:
    if len(head) < 8:
        return "shorter than a safetensors header"
    (header_len,) = struct.unpack("<Q", head[:8])
    if len(head) < 8 + header_len:
        return "its safetensors header is cut short"
    try:
        header = json.loads(head[8:8 + header_len])
        data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "its safetensors header does not parse"
    if size != 8 + header_len + data_end:
        return f"{size} bytes where its safetensors header says {8 + header_len + data_end}"
    return ""
