"""When a checkpoint may be committed: one pure function over what the sidecar saw, with a typed reason.

Each format has a completion rule that a half-written save cannot meet; the quiet period and the
open-file check come on top, and they are never the only thing that stands between a crashed
save and a commit (unless the user opted in with --commit-on-quiet, and then only for folders of
no known format). Every rule in the formats table of docs/sidecar.md is one branch of `readiness`.

On a node other than the leader of a multi-node job, the leader's commit of the same name stands
for a marker this node never gets (docs/sidecar.md, the multi-node column).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

from ckpt_agent.config.sidecar import Rules
from ckpt_agent.stores.manifest import natural_key
from ckpt_agent.sync.formats import DCP_METADATA, HF_STATE, Format, shape


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
    LEADER = "waiting for the leader (node 0) to commit it ({detail} on this node; the leader's commit stands for it)"


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


def is_quiet(since: float, newest_ctime_ns: int, now: float, now_ns: int, quiet_seconds: float) -> bool:
    """No change for `quiet_seconds`: seen across polls (monotonic `since`), or every ctime that old,
    so `--once` needs no history."""
    return now - since >= quiet_seconds or now_ns - newest_ctime_ns >= quiet_seconds * 1e9


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
    leader_committed: bool | None = None  # node r > 0: the leader committed this name; None on the leader


# What the leader's commit completes on another node: a marker only the leader writes (HF's
# trainer_state.json, DCP's .metadata, DeepSpeed's `latest`, a user's complete file) or, for a
# folder of no known format, the leader's trainer having finished it. Never a file whose own
# structure says it is cut short, a marker that is there but does not parse, or a folder the
# trainer on this node failed in: this node's own evidence against it wins.
_LEADER_STANDS_FOR = {Why.NO_MARKER, Why.NOT_NAMED, Why.UNKNOWN_WAITING}
_HERE = {Why.NOT_NAMED: "no DeepSpeed `latest` naming it", Why.UNKNOWN_WAITING: "a folder of no known format"}


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
    return shape(name) == shape(latest) and natural_key(name) < natural_key(latest)


def readiness(facts: Facts, rules: Rules, trainer: Trainer, flushing: bool = False) -> NotReady | None:
    """None when the checkpoint may be committed now; otherwise why not (yet).

    `flushing`: the final flush after the trainer exited. Then, if no process holds a file open
    and we can see that (not blind), the writer is gone and waiting for quiet adds nothing.
    """
    why = _own_rule(facts, rules, trainer, flushing)
    if why is None or facts.leader_committed is None or why.why not in _LEADER_STANDS_FOR:
        return why
    if facts.leader_committed:
        return None
    return NotReady(Why.LEADER, f"no {why.detail}" if why.why is Why.NO_MARKER else _HERE[why.why])


def _own_rule(facts: Facts, rules: Rules, trainer: Trainer, flushing: bool) -> NotReady | None:
    """This node's own evidence: quiet, not open, and its format's rule (unsafe entries are refused
    before any facts are gathered: sync/watch.py)."""
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
