"""References to checkpoints the agent did not write -> manifests a load plans like its own: a
Baseten job's checkpoints through the training API (BT_CHECKPOINT_STORE=baseten), and every object
under a plain S3 prefix (an s3_prefix reference). Reads only.

Their files have no part checksums of ours: each FileEntry says where its object is and what its
storage says of it (objectcheck.ForeignFile), and the load checks each file whole against that
(load/storagecheck.py). What the references mean, as for our own store (docs/configuration.md):
named = that checkpoint_id of the job; latest of a job = its newest checkpoint by created_at; latest
of a project = the newest checkpoint of its most recent job that has one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ckpt_agent.config import names
from ckpt_agent.config.spec import LatestRef, NamedRef, Reference, S3PrefixRef
from ckpt_agent.errors import ConfigError, NotFoundError
from ckpt_agent.load.listing import CheckpointListing, CheckpointRow, JobListing, JobRow
from ckpt_agent.load.merge import NodeChoice
from ckpt_agent.load.resolve import Finder, Found, find_in_store
from ckpt_agent.runtime.pool import map_tasks
from ckpt_agent.stores.baseten import BasetenStore, Checkpoint, Job, RemoteFile, file_key
from ckpt_agent.stores.catalog import Warn
from ckpt_agent.stores.manifest import (
    FileEntry,
    Manifest,
    check_collisions,
    check_relative_path,
    natural_key,
    part_count,
)
from ckpt_agent.stores.objectcheck import ForeignFile, storage_check
from ckpt_agent.stores.routed import Routed, s3_key

_RANK = re.compile(r"rank-(\d+)")
# A foreign file's parts are checked only whole, so the part size sets how much a killed load fetches
# again (load/journal.py) and the crc32c granularity `verify` re-reads with.
PART_SIZE = 4 << 20


def finder(store: Routed, rank: int, project: str | None, nodes: NodeChoice) -> Finder:
    """s3_prefix references from S3, Baseten's through the API or our own layout, by BT_CHECKPOINT_STORE.
    A checkpoint the agent did not write is one node's files: `nodes` applies only to our layout."""

    def find(ref: Reference, warn: Warn) -> tuple[Found | None, str]:
        if isinstance(ref, S3PrefixRef):
            return (s3_prefix_manifest(store, ref, rank), None), f"every object under {ref.uri}"
        if isinstance(store.main, BasetenStore):
            manifest, reason = find_in_api(store.main, ref, rank, project, warn)
            return (None if manifest is None else (manifest, None)), reason
        return find_in_store(store, rank, project, nodes, ref, warn)

    return find


def _entry(path: str, size: int, foreign: ForeignFile) -> FileEntry:
    return FileEntry(path, size, ("",) * part_count(size, PART_SIZE), foreign=foreign)


def _manifest(project: str | None, job_id: str, name: str, rank: int, committed_at: str,
              files: list[FileEntry], where: str) -> Manifest:
    for f in files:  # one per object or listed name, so no duplicates; but no unsafe or colliding path
        check_relative_path(f.path, where)
    check_collisions([f.path for f in files], where)
    return Manifest(project, job_id, name, rank, committed_at, PART_SIZE, tuple(files))


# --- plain S3 prefixes ----------------------------------------------------------------------------


def s3_prefix_manifest(store: Routed, ref: S3PrefixRef, rank: int) -> Manifest:
    """Every object under the prefix, with what S3 keeps of it (HEAD in checksum mode)."""
    base = s3_key(ref.bucket, ref.prefix)
    keys = store.list_recursive(base)
    if not keys:
        raise NotFoundError(f"{ref.describe()}: no object under {ref.uri} (the prefix is empty or missing); "
                            "check the uri")
    heads = map_tasks(store.head, keys)
    files = [_entry(key[len(base):], int(head.get("content-length", "0")), ForeignFile(key, storage_check(head)))
             for key, head in zip(keys, heads, strict=True)]
    parent = ref.uri.rstrip("/").rsplit("/", 1)[0]
    return _manifest(None, parent, ref.name, rank, "", files, ref.uri)


# --- Baseten's training API -----------------------------------------------------------------------


def _newest_first(checkpoints: Iterable[Checkpoint]) -> list[Checkpoint]:
    return sorted(checkpoints, key=lambda c: (c.created_at, natural_key(c.checkpoint_id)), reverse=True)


def _job(store: BasetenStore, job_id: str) -> Job | None:
    return next((j for j in store.api.search_jobs(job_id=job_id) if j.id == job_id), None)


def files_of(listed: list[RemoteFile], checkpoint_id: str, rank: int) -> list[tuple[str, RemoteFile]]:
    """(path inside the checkpoint, file) of one checkpoint for `rank`: listed as `<id>/<path>`, or as
    `rank-<n>/<id>/<path>`, where a checkpoint only rank 0 wrote is what every node loads."""
    by_rank: dict[int | None, list[tuple[str, RemoteFile]]] = {}
    for f in listed:
        head, _, rest = f.name.partition("/")
        match = _RANK.fullmatch(head)
        if match:
            head, _, rest = rest.partition("/")
        if head == checkpoint_id and rest:
            by_rank.setdefault(int(match.group(1)) if match else None, []).append((rest, f))
    if rank in by_rank:
        return by_rank[rank]
    if set(by_rank) == {0}:
        return by_rank[0]
    return by_rank.get(None, [])


def _api_manifest(job: Job, checkpoint: Checkpoint, rank: int, listed: list[RemoteFile]) -> Manifest | None:
    files = [_entry(path, f.size, ForeignFile(file_key(job.project.id, job.id, f.name)))
             for path, f in files_of(listed, checkpoint.checkpoint_id, rank)]
    if not files:
        return None
    return _manifest(job.project.name, job.id, checkpoint.checkpoint_id, rank, checkpoint.created_at, files,
                     f"Baseten API: job {job.id} checkpoint {checkpoint.checkpoint_id}")


def _named(store: BasetenStore, ref: NamedRef, rank: int) -> Manifest:
    job = _job(store, ref.job_id)
    if job is None:
        raise NotFoundError(f"{ref.describe()}: job {ref.job_id} is not in the Baseten API; check job_id")
    checkpoints = _newest_first(store.api.checkpoints(job.project.id, job.id))
    chosen = next((c for c in checkpoints if c.checkpoint_id == ref.checkpoint_name), None)
    if chosen is None:
        have = ", ".join(names.quote_name(c.checkpoint_id) for c in checkpoints) or "none"
        raise NotFoundError(f"{ref.describe()}: job {job.id} has no checkpoint {ref.checkpoint_name}; "
                            f"its checkpoints, newest first: {have}")
    manifest = _api_manifest(job, chosen, rank, store.listed(job.project.id, job.id))
    if manifest is None:
        raise NotFoundError(f"{ref.describe()}: the Baseten API lists no files of checkpoint "
                            f"{ref.checkpoint_name} for rank {rank}")
    return manifest


def _latest_of_job(store: BasetenStore, job: Job, rank: int, warn: Warn) -> Manifest | None:
    checkpoints = _newest_first(store.api.checkpoints(job.project.id, job.id))
    where = f"Baseten API: job {job.id}"
    listed = store.listed(job.project.id, job.id) if checkpoints else []
    for checkpoint in checkpoints:
        problem = names.name_problem(checkpoint.checkpoint_id)
        if problem is not None:
            warn(f"{where}: ignoring checkpoint {names.quote_name(checkpoint.checkpoint_id)}: {problem}")
            continue
        manifest = _api_manifest(job, checkpoint, rank, listed)
        if manifest is not None:
            return manifest
    return None


def find_in_api(store: BasetenStore, ref: Reference, rank: int, project: str | None,
                warn: Warn) -> tuple[Manifest | None, str]:
    if isinstance(ref, NamedRef):
        return _named(store, ref, rank), "named"
    assert isinstance(ref, LatestRef)
    if ref.job_id:
        job = _job(store, ref.job_id)
        if job is None:
            return None, f"job {ref.job_id} is not in the Baseten API"
        if ref.project_name and job.project.name != ref.project_name:
            raise NotFoundError(f"{ref.describe()}: job {ref.job_id} belongs to project {job.project.name!r}, "
                                f"not {ref.project_name!r}; fix project_name or job_id")
        found = _latest_of_job(store, job, rank, warn)
        return found, (f"newest checkpoint of job {job.id} by created_at" if found
                       else f"job {job.id} has no checkpoint with files")
    project = ref.project_name or project
    if not project:
        raise ConfigError(f"{ref.describe()}: names neither project_name nor job_id and "
                          "BT_TRAINING_PROJECT_NAME is unset")
    for job in project_jobs(store, project):
        found = _latest_of_job(store, job, rank, warn)
        if found:
            return found, (f"newest checkpoint of job {job.id} by created_at, the most recent job of project "
                           f"{project} that has one")
    return None, f"project {project} has no job with a checkpoint"


def project_jobs(store: BasetenStore, project: str) -> list[Job]:
    """The project's jobs, most recent first; none when no project has that name."""
    ids = [p.id for p in store.api.projects() if p.name == project]
    jobs = [j for i in ids for j in store.api.search_jobs(project_id=i)]
    return sorted(jobs, key=lambda j: (j.created_at, natural_key(j.id)), reverse=True)


# --- `ckpt-agent ls` through the API --------------------------------------------------------------


def api_jobs(store: BasetenStore, project: str | None) -> JobListing:
    jobs = project_jobs(store, project) if project else store.api.search_jobs()
    return JobListing(tuple(JobRow(j.id, j.project.name, j.created_at, None) for j in jobs), project)


def api_checkpoints(store: BasetenStore, job_id: str, project: str | None, rank: int) -> CheckpointListing:
    job = _job(store, job_id)
    if job is None:
        raise NotFoundError(f"job {job_id} is not in the Baseten API; list the jobs with `ckpt-agent ls`")
    if project and job.project.name != project:
        raise NotFoundError(f"job {job_id} belongs to project {job.project.name!r}, not {project!r}")
    checkpoints = _newest_first(store.api.checkpoints(job.project.id, job.id))
    listed = store.listed(job.project.id, job.id) if checkpoints else []
    rows = []
    for c in checkpoints:
        files = files_of(listed, c.checkpoint_id, rank)
        rows.append(CheckpointRow(c.checkpoint_id, c.created_at, (rank,), (), 1, bool(files), len(files),
                                  sum(f.size for _, f in files) if files else c.size_bytes))
    return CheckpointListing(JobRow(job.id, job.project.name, job.created_at, None), tuple(rows))
