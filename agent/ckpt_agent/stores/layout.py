"""Store layout v1: the only code that knows how keys are spelled (see docs/store-layout.md).

    jobs/<job>/job.json
    jobs/<job>/checkpoints/<name>/rank-<r>/<path>
    jobs/<job>/checkpoints/<name>/rank-<r>.packs/<n>         small files again, concatenated
    jobs/<job>/checkpoints/<name>/rank-<r>.manifest.json    (written last: the commit)
    jobs/<job>/checkpoints/<name>/rank-<r>.nothing.json     node r has no files of it (multi-node)
    jobs/<job>/nodes/rank-0.stopped.json                    the leader's sidecar has stopped (multi-node)
    projects/<project>/jobs/<job>.json
"""

from __future__ import annotations

import re

MANIFEST_SUFFIX = ".manifest.json"
# What a store object we parse may weigh: a hostile store must not make us read without end.
MAX_RECORD_BYTES = 64 << 10  # job.json and project index entries
MAX_MANIFEST_BYTES = 64 << 20  # hundreds of thousands of files fit
NOTHING_SUFFIX = ".nothing.json"
_MANIFEST_RE = re.compile(r"^rank-(\d+)\.manifest\.json$")
_NOTHING_RE = re.compile(r"^rank-(\d+)\.nothing\.json$")


def job_record_key(job_id: str) -> str:
    return f"jobs/{job_id}/job.json"


def checkpoints_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints/"


def checkpoint_prefix(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/checkpoints/{name}/"


def file_key(job_id: str, name: str, rank: int, path: str) -> str:
    return rank_prefix(job_id, name, rank) + path


def rank_prefix(job_id: str, name: str, rank: int) -> str:
    return f"jobs/{job_id}/checkpoints/{name}/rank-{rank}/"


def packs_prefix(job_id: str, name: str, rank: int) -> str:
    """Beside the rank's folder, never inside it, so a pack can never shadow a checkpoint file."""
    return f"jobs/{job_id}/checkpoints/{name}/rank-{rank}.packs/"


def pack_key(job_id: str, name: str, rank: int, pack: int) -> str:
    return f"{packs_prefix(job_id, name, rank)}{pack}"


def manifest_key(job_id: str, name: str, rank: int) -> str:
    return f"jobs/{job_id}/checkpoints/{name}/rank-{rank}{MANIFEST_SUFFIX}"


def nothing_key(job_id: str, name: str, rank: int) -> str:
    """Node `rank` of a multi-node job has no files of a checkpoint its leader committed: with the
    manifests of the other ranks, this completes the checkpoint for the job (docs/sidecar.md)."""
    return f"jobs/{job_id}/checkpoints/{name}/rank-{rank}{NOTHING_SUFFIX}"


def leader_stopped_key(job_id: str) -> str:
    """Written by the leader's sidecar of a multi-node job when it stops, removed when it starts: the
    other nodes' final flushes watch the leader's commits until it is there."""
    return f"jobs/{job_id}/nodes/rank-0.stopped.json"


def project_jobs_prefix(project: str) -> str:
    return f"projects/{project}/jobs/"


def project_job_key(project: str, job_id: str) -> str:
    return f"projects/{project}/jobs/{job_id}.json"


def jobs_prefix() -> str:
    return "jobs/"


def manifest_rank(filename: str) -> int | None:
    """The rank a manifest file name commits, or None for any other name."""
    match = _MANIFEST_RE.match(filename)
    return int(match.group(1)) if match else None


def nothing_rank(filename: str) -> int | None:
    """The rank a "nothing here" record speaks for, or None for any other name."""
    match = _NOTHING_RE.match(filename)
    return int(match.group(1)) if match else None


def job_id_from_index_entry(filename: str) -> str | None:
    return filename[: -len(".json")] if filename.endswith(".json") else None
