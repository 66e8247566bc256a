"""Which byte ranges of a new file are already in the store, and how to assemble it from them.

An incremental upload copies the parts of a file whose sha256 equals a part of the previous
manifest inside the store (S3 UploadPartCopy) and uploads the rest, so the object is still an
ordinary object. Only the strong hash decides that two parts are the same bytes: crc32c catches
corruption, it does not prove identity. Pure functions: save.py does the I/O.

The assembled multipart upload keeps S3's rules (ckpt_agent.stores.base: MIN_PART, MAX_PARTS,
MAX_COPY). Segments here are runs of whole manifest parts, so with
manifest parts of at least 5 MiB only the run holding a file's short last part can be smaller,
and that run is the last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ckpt_agent.stores.base import MAX_COPY, MAX_PARTS, MIN_PART
from ckpt_agent.stores.manifest import FileEntry, Manifest


@dataclass(frozen=True)
class Source:
    """One part of a file of the previous manifest."""

    path: str
    start: int
    length: int


@dataclass(frozen=True)
class Segment:
    """One multipart part of the new object: bytes [start, start+length) of the local file,
    uploaded, or copied from `source` (a path of the previous manifest) at `source_start`."""

    start: int
    length: int
    source: str | None = None
    source_start: int = 0


PartIndex = dict[str, list[Source]]


def part_length(size: int, part_size: int, index: int) -> int:
    return max(0, min(part_size, size - index * part_size))


def index_parts(previous: Manifest) -> PartIndex:
    """Every part of the previous manifest by its sha256 (none from a format-1 manifest)."""
    found: PartIndex = {}
    for entry in previous.files:
        for i, sha in enumerate(entry.strong):
            length = part_length(entry.size, previous.part_size, i)
            if length:
                found.setdefault(sha, []).append(Source(entry.path, i * previous.part_size, length))
    return found


def same_file(entry: FileEntry, size: int, parts: Sequence[str], strong: Sequence[str]) -> bool:
    """The whole file is the previous one: by sha256 where the previous manifest has it (a crc32c
    collision must never commit old bytes), by crc32c only from a format-1 manifest."""
    if entry.size != size or tuple(entry.parts) != tuple(parts):
        return False
    return not entry.strong or tuple(entry.strong) == tuple(strong)


def _source_for(sha: str, length: int, index: PartIndex, path: str, start: int,
                run: Segment | None) -> Source | None:
    """A part with these bytes: continuing the current copied run first, then the same place in
    the same path, then any."""
    candidates = [s for s in index.get(sha, ()) if s.length == length]
    if run is not None and run.source is not None:
        following = Source(run.source, run.source_start + run.length, length)
        if following in candidates:
            return following
    same = Source(path, start, length)
    if same in candidates:
        return same
    return candidates[0] if candidates else None


def plan_segments(path: str, size: int, part_size: int, strong: Sequence[str], index: PartIndex,
                  max_upload: int) -> list[Segment] | None:
    """The parts of the assembled upload, or None when nothing can be copied (then upload it as usual).

    Adjacent copied parts from consecutive bytes of one source become one segment (up to 5 GiB),
    adjacent uploaded parts one segment up to `max_upload`, so a file takes few requests."""
    if part_size < MIN_PART or size == 0 or not index:
        return None
    upload_cap = max(part_size, max_upload - max_upload % part_size)
    segments: list[Segment] = []
    for i, sha in enumerate(strong):
        start, length = i * part_size, part_length(size, part_size, i)
        run = segments[-1] if segments else None
        source = _source_for(sha, length, index, path, start, run)
        if source is None and run is not None and run.source is None and run.length + length <= upload_cap:
            segments[-1] = Segment(run.start, run.length + length)
        elif (source is not None and run is not None and run.source == source.path
              and run.source_start + run.length == source.start and run.length + length <= MAX_COPY):
            segments[-1] = Segment(run.start, run.length + length, run.source, run.source_start)
        else:
            segments.append(Segment(start, length, source.path if source else None, source.start if source else 0))
    if len(segments) > MAX_PARTS or all(s.source is None for s in segments):
        return None
    return segments
