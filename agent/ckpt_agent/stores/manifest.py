"""The manifest (a checkpoint's commit record) and the job records, with strict validation.

A manifest is the only thing that makes files in the store count as a checkpoint, so anything
odd in it (unsafe paths, sizes that do not add up) is an IntegrityError before a byte is written.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field

from ckpt_agent.config import names
from ckpt_agent.disk.resume import FILE_KIND
from ckpt_agent.disk.safefs import INCOMPLETE_SUFFIX
from ckpt_agent.errors import IntegrityError
from ckpt_agent.stores.objectcheck import ForeignFile

# Format 2 adds a sha256 per part next to its crc32c; a manifest without them is still written
# (and read) as format 1, so the two differ only in that key.
FORMAT, FORMAT_V1 = 2, 1
ALGORITHM = "crc32c"
# Collision-resistant, so equal hashes may stand for equal bytes (cache keys, incremental uploads);
# sha256 over blake2b because SHA-NI makes it faster here (bench/hashspeed.py, docs/benchmarks.md), and hashlib
# releases the GIL for it, so save still hashes regions on every core.
STRONG_ALGORITHM = "sha256"
_STRONG_HEX = re.compile(r"[0-9a-f]{64}")
_PART_HEX = re.compile(r"[0-9a-f]{8}")
DEFAULT_PART_SIZE = 8 * 1024 * 1024
# A checkpoint is a folder of files, or one file saved on its own (`ckpt-5.pt`): the manifest then
# lists that one file, and a load hands the trainer the file's path instead of the folder's.
FOLDER_KIND = "folder"
NAME_MAX = 255 - len(INCOMPLETE_SUFFIX.encode())  # the temporary twin of a file must fit too
PATH_MAX = 4096 - 256  # room for the download folder and rank-<r>/<checkpoint>/ in front


def part_count(size: int, part_size: int) -> int:
    return max(1, -(-size // part_size))


def natural_key(name: str) -> tuple:
    """checkpoint-100 sorts after checkpoint-20."""
    return tuple((0, int(t), "") if t.isdecimal() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


@dataclass(frozen=True)
class FileEntry:
    """`pack`/`offset`: where a small file's bytes also sit inside one of the checkpoint's packs.

    `strong`: one sha256 per part (format 2), or () from a format-1 manifest.
    `foreign`: a file the agent did not write (a Baseten job's, an S3 prefix's): its `parts` are ""
    (unknown), and what is checked is what its storage says (stores/objectcheck.py).
    """

    path: str
    size: int
    parts: tuple[str, ...]
    pack: int | None = None
    offset: int = 0
    strong: tuple[str, ...] = ()
    foreign: ForeignFile | None = None

    def to_dict(self) -> dict:
        body: dict = {"path": self.path, "size": self.size, "parts": list(self.parts)}
        if self.strong:
            body[STRONG_ALGORITHM] = list(self.strong)
        if self.pack is not None:
            body.update(pack=self.pack, offset=self.offset)
        return body


@dataclass(frozen=True)
class PackEntry:
    """Small files concatenated into one object, so loading them takes a few ranged GETs."""

    id: int
    size: int


@dataclass(frozen=True)
class Manifest:
    project_name: str | None
    job_id: str
    checkpoint_name: str
    rank: int
    committed_at: str
    part_size: int
    files: tuple[FileEntry, ...]
    algorithm: str = ALGORITHM
    packs: tuple[PackEntry, ...] = ()
    kind: str = FOLDER_KIND
    extra: dict = field(default_factory=dict, compare=False)
    source: bytes = field(default=b"", compare=False, repr=False)

    @property
    def raw(self) -> bytes:
        """The bytes as the store served them (what a load records), or a fresh serialisation."""
        return self.source or self.to_json().encode()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def format(self) -> int:
        """2 when every file has its strong hashes, so an old-style manifest stays format 1."""
        return FORMAT if all(f.strong for f in self.files) else FORMAT_V1

    def to_json(self) -> str:
        body = {
            **self.extra,
            "format": self.format,
            "project_name": self.project_name,
            "job_id": self.job_id,
            "checkpoint_name": self.checkpoint_name,
            "rank": self.rank,
            "committed_at": self.committed_at,
            "algorithm": self.algorithm,
            "part_size": self.part_size,
            "files": [f.to_dict() for f in self.files],
        }
        if self.packs:
            body["packs"] = [{"id": p.id, "size": p.size} for p in self.packs]
        if self.kind != FOLDER_KIND:  # folder manifests stay as they were, for older readers
            body["kind"] = self.kind
        return json.dumps(body, indent=1)


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    project_name: str | None
    created_at: str
    num_nodes: int = 1

    def to_json(self) -> str:
        return json.dumps(
            {"job_id": self.job_id, "project_name": self.project_name,
             "created_at": self.created_at, "num_nodes": self.num_nodes}
        )

    def index_entry(self) -> str:
        """The job's entry in its project's index (projects/<project>/jobs/<job>.json)."""
        return json.dumps({"job_id": self.job_id, "created_at": self.created_at})


def nothing_here_record(job_id: str, name: str, rank: int, recorded_at: str) -> str:
    """Node `rank` of a multi-node job has no files of checkpoint `name` (layout.nothing_key).
    Readers count its presence only; the body says who wrote it, and when."""
    return json.dumps({"job_id": job_id, "checkpoint_name": name, "rank": rank, "recorded_at": recorded_at})


def leader_stopped_record(job_id: str, stopped_at: str) -> str:
    """The leader's sidecar of a multi-node job has stopped (layout.leader_stopped_key); presence only."""
    return json.dumps({"job_id": job_id, "stopped_at": stopped_at})


def check_relative_path(path: object, where: str) -> str:
    """A manifest path must stay inside the checkpoint folder on every OS."""
    if not isinstance(path, str) or not path:
        raise IntegrityError(f"{where}: path must be a non-empty string")
    if (problem := names.path_problem(path)) is not None:
        raise IntegrityError(f"{where}: path {path!r} {problem}")
    if len(path.encode(errors="surrogatepass")) > PATH_MAX or any(
            len(p.encode(errors="surrogatepass")) > NAME_MAX for p in path.split("/")):
        raise IntegrityError(f"{where}: path {path[:80]!r}... is longer than a file system allows "
                             f"({NAME_MAX} bytes a name, {PATH_MAX} in all)")
    return path


def fold(path: str) -> str:
    """What a case-insensitive or normalising file system would store: two paths with one fold collide."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", path).casefold())


def check_collisions(paths: list[str], where: str) -> None:
    """No path may be another's folder, or its temporary twin, on any file system, even after folding."""
    files: dict[str, str] = {}
    for path in paths:
        folded = fold(path)
        if folded in files:
            raise IntegrityError(f"{where}: paths {files[folded]!r} and {path!r} are the same file on a "
                                 "case-insensitive or normalising file system")
        if any(p.endswith(fold(INCOMPLETE_SUFFIX)) for p in folded.split("/")):
            raise IntegrityError(f"{where}: path {path!r} ends in {INCOMPLETE_SUFFIX}, the name ckpt-agent "
                                 "gives a file while it downloads")
        files[folded] = path
    for folded, path in files.items():
        parent = folded.rpartition("/")[0]
        while parent:
            if parent in files:
                raise IntegrityError(f"{where}: {files[parent]!r} is both a file and a folder (of {path!r})")
            parent = parent.rpartition("/")[0]


def _require(obj: dict, key: str, kind: type | tuple, where: str):
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise IntegrityError(f"{where}: field {key!r} missing or of the wrong type")
    return value


def json_object(text: str | bytes, prefix: str) -> dict:
    """A store record's JSON, which must be an object: a hostile store's deep nesting or bad bytes
    become our error, never a RecursionError or a traceback. `prefix` starts each message."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise IntegrityError(f"{prefix}not valid JSON (or nested too deeply)") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"{prefix}not a JSON object")
    return obj


def parse_manifest(text: str | bytes, where: str) -> Manifest:
    obj = json_object(text, f"{where}: manifest is ")
    fmt = obj.get("format")
    if fmt not in (FORMAT_V1, FORMAT) or isinstance(fmt, bool):
        raise IntegrityError(
            f"{where}: unknown manifest format {fmt!r} (this agent reads {FORMAT_V1} and {FORMAT}); upgrade ckpt-agent"
        )
    algorithm = _require(obj, "algorithm", str, where)
    if algorithm != ALGORITHM:
        raise IntegrityError(f"{where}: unknown checksum algorithm {algorithm!r}")
    part_size = _require(obj, "part_size", int, where)
    if part_size <= 0:
        raise IntegrityError(f"{where}: part_size must be positive")
    raw_files = _require(obj, "files", list, where)
    packs = _parse_packs(obj.get("packs", []), where)
    files = [_parse_file(raw, f"{where}: files[{i}]", part_size, packs, fmt == FORMAT)
             for i, raw in enumerate(raw_files)]
    seen: set[str] = set()
    for i, f in enumerate(files):
        if f.path in seen:
            raise IntegrityError(f"{where}: files[{i}]: duplicate path {f.path!r}")
        seen.add(f.path)
    check_collisions([f.path for f in files], where)
    kind = obj.get("kind", FOLDER_KIND)
    if kind not in (FOLDER_KIND, FILE_KIND):
        raise IntegrityError(f"{where}: unknown checkpoint kind {kind!r}; upgrade ckpt-agent")
    if kind == FILE_KIND and (len(files) != 1 or "/" in files[0].path):
        raise IntegrityError(f"{where}: a single-file checkpoint must list exactly one top-level file")
    known = {"format", "project_name", "job_id", "checkpoint_name", "rank", "committed_at",
             "algorithm", "part_size", "files", "packs", "kind"}
    return Manifest(
        project_name=obj.get("project_name"),
        job_id=_require(obj, "job_id", str, where),
        checkpoint_name=_require(obj, "checkpoint_name", str, where),
        rank=_require(obj, "rank", int, where),
        committed_at=_require(obj, "committed_at", str, where),
        part_size=part_size,
        files=tuple(files),
        algorithm=algorithm,
        packs=tuple(PackEntry(i, s) for i, s in sorted(packs.items())),
        kind=kind,
        extra={k: v for k, v in obj.items() if k not in known},
        source=text.encode() if isinstance(text, str) else bytes(text),
    )


def _parse_file(raw: object, fw: str, part_size: int, packs: dict[int, int], strong: bool) -> FileEntry:
    if not isinstance(raw, dict):
        raise IntegrityError(f"{fw} is not an object")
    path = check_relative_path(raw.get("path"), fw)
    size = _require(raw, "size", int, fw)
    if size < 0:
        raise IntegrityError(f"{fw}: negative size for {path!r}")
    parts = _require(raw, "parts", list, fw)
    if len(parts) != part_count(size, part_size):
        raise IntegrityError(f"{fw}: {len(parts)} checksums do not match size {size} of {path!r}")
    if not all(isinstance(p, str) and _PART_HEX.fullmatch(p) for p in parts):
        raise IntegrityError(f"{fw}: the part checksums of {path!r} must be 8 lower-case hex digits each")
    pack, offset = raw.get("pack"), raw.get("offset", 0)
    if pack is not None and not _fits_pack(pack, offset, size, len(parts), packs):
        raise IntegrityError(f"{fw}: pack {pack!r} offset {offset!r} does not fit a pack of the manifest")
    hashes = _strong_hashes(raw, len(parts), fw) if strong else ()
    return FileEntry(path, size, tuple(parts), pack, offset if pack is not None else 0, hashes)


def _strong_hashes(raw: dict, count: int, where: str) -> tuple[str, ...]:
    """Format 2: one lower-case hex sha256 per part, the cache key of that part's bytes."""
    hashes = raw.get(STRONG_ALGORITHM)
    if not isinstance(hashes, list) or len(hashes) != count or not all(
            isinstance(h, str) and _STRONG_HEX.fullmatch(h) for h in hashes):
        raise IntegrityError(f"{where}: format {FORMAT} needs {count} lower-case hex {STRONG_ALGORITHM} "
                             f"hashes, one per part")
    return tuple(hashes)


def _fits_pack(pack: object, offset: object, size: int, parts: int, packs: dict[int, int]) -> bool:
    """A packed file is a single part lying wholly inside a pack the manifest lists."""
    return (isinstance(pack, int) and pack in packs and isinstance(offset, int) and offset >= 0
            and offset + size <= packs[pack] and parts == 1)


def _parse_packs(raw: object, where: str) -> dict[int, int]:
    if not isinstance(raw, list):
        raise IntegrityError(f"{where}: packs must be a list")
    packs: dict[int, int] = {}
    for i, entry in enumerate(raw):
        valid = isinstance(entry, dict) and isinstance(entry.get("id"), int) and isinstance(entry.get("size"), int)
        if not valid or entry["size"] < 0 or entry["id"] in packs:
            raise IntegrityError(f"{where}: packs[{i}] needs a unique integer id and a size")
        packs[entry["id"]] = entry["size"]
    return packs


def parse_job_record(text: str | bytes, where: str) -> JobRecord:
    obj = json_object(text, f"{where}: ")
    num_nodes = obj.get("num_nodes", 1)
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise IntegrityError(f"{where}: num_nodes must be a positive integer")
    return JobRecord(
        job_id=_require(obj, "job_id", str, where),
        project_name=obj.get("project_name"),
        created_at=_require(obj, "created_at", str, where),
        num_nodes=num_nodes,
    )
