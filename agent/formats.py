"""Which top-level entries of BT_CHECKPOINT_DIR are checkpoints, of which format, and when each is complete.

Pure functions over facts the sidecar gathered (agent.observe does the I/O), so every rule in
the formats table of docs/sidecar.md is one branch here. Each format has a completion rule that
a half-written save cannot meet; the quiet period and the open-file check come on top, and they
are never the only thing that stands between a crashed save and a commit (unless the user opted
in with --commit-on-quiet, and then only for folders of no known format).
"""

from __future__ import annotations

import json
import re
import stat
import struct
from dataclasses import dataclass
from enum import Enum

from agent.manifest import natural_key

SINGLE_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors", ".bin")
HF_STATE = "trainer_state.json"
DCP_METADATA = ".metadata"
DEEPSPEED_LATEST = "latest"
# Written by DeepSpeed next to its tag folders; never checkpoints themselves.
DEEPSPEED_FILES = (DEEPSPEED_LATEST, "latest_universal", "zero_to_fp32.py")
_HF_NAME = re.compile(r"^checkpoint-\d+$")
_DEEPSPEED_NAME = re.compile(r"^global_step\d+$")
_DEEPSPEED_FILE = re.compile(r"^(mp_rank_\d+_model_states|.*_optim_states|zero_pp_rank_.*)\.pt$")


class Format(Enum):
    HF = "HF Trainer folder"
    DCP = "torch.distributed.checkpoint folder"
    DEEPSPEED = "DeepSpeed tag folder"
    FILE = "single-file checkpoint"
    MARKER = "folder with a user-given complete file"
    UNKNOWN = "folder of no known format"


class Trainer(Enum):
    """What the sidecar knows of the process that writes the checkpoints."""

    UNSUPERVISED = "unsupervised"  # `ckpt-agent sync`: another process, we never learn its status
    RUNNING = "running"
    EXITED_OK = "exited with status 0"
    FAILED = "exited with a failure"


class Why(Enum):
    """Why a checkpoint is not committed (yet). `may_still_finish` drives the final flush."""

    WRITING = "still being written"
    OPEN = "a file in it is open for writing"
    EMPTY = "empty folder"
    NO_MARKER = "incomplete: no {detail}"
    BAD_MARKER = "incomplete: {detail} is not valid JSON"
    TRUNCATED = "incomplete: {detail}"
    NOT_NAMED = "DeepSpeed's `latest` file does not name it (or a later tag) yet"
    UNKNOWN_WAITING = ("a folder of no known format: committed once the trainer exits with status 0, "
                       "or when a --complete-file is in it")
    UNKNOWN_FAILED = ("a folder of no known format and the trainer {detail}: it may be half-written; "
                      "give --complete-file for the file your trainer writes last")
    UNSAFE = "holds what cannot be uploaded safely: {detail}"
    CHANGED = "changed while uploading; starts over once quiet"
    FAILED = "upload failed: {detail}"
    CUT = "grace period ended during the upload"
    NOT_STARTED = "grace period ended before its upload"


_MAY_STILL_FINISH = {Why.WRITING, Why.OPEN, Why.CHANGED, Why.NOT_NAMED, Why.NO_MARKER, Why.BAD_MARKER,
                     Why.TRUNCATED, Why.UNKNOWN_WAITING}


@dataclass(frozen=True)
class NotReady:
    why: Why
    detail: str = ""

    def __str__(self) -> str:
        return self.why.value.format(detail=self.detail)

    def may_still_finish(self, trainer: Trainer) -> bool:
        """True while waiting can still help: something may still write the missing piece."""
        if self.why in (Why.WRITING, Why.OPEN, Why.CHANGED):
            return True
        return self.why in _MAY_STILL_FINISH and trainer in (Trainer.RUNNING, Trainer.UNSUPERVISED)


@dataclass(frozen=True)
class Rules:
    markers: tuple[str, ...] = ()  # user-given complete files: they decide for every folder
    commit_on_quiet: bool = False  # explicit opt-in: a folder of no known format needs only quiet


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


def kind_of(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return what
    return "a special file"


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


# -- completeness ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What the sidecar saw of one checkpoint, for `readiness`."""

    format: Format
    files: tuple[str, ...]  # relative paths
    quiet: bool
    writing: str | None = None  # a file in it that a process holds open for writing
    blind: bool = False  # other processes' open files cannot be seen
    markers: dict[str, bytes | None] | None = None  # complete file -> its bytes (None: unreadable)
    structure: str | None = None  # single file: "" complete, a reason if not, None if unknown
    deepspeed_latest: str | None = None  # the tag the top-level `latest` file names
    name: str = ""
    unsafe: str | None = None  # a link or special file inside


def _marker_problem(wanted: tuple[str, ...], markers: dict[str, bytes | None]) -> NotReady | None:
    """None when one of the `wanted` files is there (and parses, for `.json`)."""
    bad = None
    for marker in wanted:
        data = markers.get(marker)
        if data is None:
            continue
        if not marker.endswith(".json"):
            return None
        try:
            json.loads(data)
            return None
        except ValueError:
            bad = bad or marker
    if bad:
        return NotReady(Why.BAD_MARKER, bad)
    return NotReady(Why.NO_MARKER, " or ".join(wanted))


def _named_by_latest(name: str, latest: str | None) -> bool:
    """DeepSpeed writes `latest` after the tag folder; a tag of the same shape before it was finished too."""
    if latest is None:
        return False
    if name == latest:
        return True
    same_shape = re.sub(r"\d+", "#", name) == re.sub(r"\d+", "#", latest)
    return same_shape and natural_key(name) < natural_key(latest)


def readiness(facts: Facts, rules: Rules, trainer: Trainer, flushing: bool = False) -> NotReady | None:
    """None when the checkpoint may be committed now; otherwise why not (yet).

    `flushing`: the final flush after the trainer exited. Then, if no process holds a file open
    and we can see that (not blind), the writer is gone and waiting for quiet adds nothing.
    """
    if facts.unsafe:
        return NotReady(Why.UNSAFE, facts.unsafe)
    settled = flushing and trainer in (Trainer.EXITED_OK, Trainer.FAILED) and not facts.blind
    if not facts.quiet and not (settled and facts.writing is None):
        return NotReady(Why.WRITING)
    if facts.writing is not None:
        return NotReady(Why.OPEN, facts.writing)
    if not facts.files:
        return NotReady(Why.EMPTY)
    markers = facts.markers or {}
    fmt = facts.format
    if fmt is Format.MARKER:
        return _marker_problem(rules.markers, markers)
    if fmt is Format.HF:
        return _marker_problem((HF_STATE,), markers)
    if fmt is Format.DCP:
        return None if markers.get(DCP_METADATA) else NotReady(Why.NO_MARKER, DCP_METADATA)
    if fmt is Format.DEEPSPEED:
        return None if _named_by_latest(facts.name, facts.deepspeed_latest) else NotReady(Why.NOT_NAMED)
    if fmt is Format.FILE:
        if facts.structure:
            return NotReady(Why.TRUNCATED, facts.structure)
        if facts.structure == "" or not facts.blind:
            return None
        # Unknown structure, and blind: nothing but quiet would vouch for it; treat it as an unknown folder.
    if rules.commit_on_quiet or trainer is Trainer.EXITED_OK:
        return None
    if trainer is Trainer.FAILED:
        return NotReady(Why.UNKNOWN_FAILED, trainer.value)
    return NotReady(Why.UNKNOWN_WAITING)


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
