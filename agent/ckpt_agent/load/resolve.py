"""References -> manifests: reads the store (through ckpt_agent.stores.catalog), never writes.

"Latest" means the newest checkpoint that every node of its job has committed, so that all
nodes of a multi-node job resume from the same step: the leader (rank 0) with its manifest, each
other node with its manifest or with a "nothing here" record (it had no files of that
checkpoint, docs/sidecar.md). Order is the rank-0 manifest's committed_at, ties broken by the
natural order of names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ckpt_agent.config.spec import LatestRef, NamedRef, Reference
from ckpt_agent.errors import ConfigError, NotFoundError
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import Store
from ckpt_agent.stores.catalog import (
    Warn,
    committed_checkpoints,
    project_jobs,
    rank_commits,
    read_job,
    read_manifest,
)
from ckpt_agent.stores.manifest import FOLDER_KIND, JobRecord, Manifest


@dataclass(frozen=True)
class Resolved:
    reference: Reference
    manifest: Manifest
    reason: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.manifest.job_id, self.manifest.checkpoint_name)


@dataclass(frozen=True)
class Resolution:
    checkpoints: tuple[Resolved, ...]
    warnings: tuple[str, ...]


def nothing_here(leader: Manifest, rank: int) -> Manifest:
    """Node `rank`'s part of a checkpoint it recorded "nothing here" for: no files, the leader's
    identity and commit time."""
    return replace(leader, rank=rank, files=(), packs=(), kind=FOLDER_KIND, extra={}, source=b"")


def _manifest_for_rank(store: Store, job: JobRecord, name: str, rank: int) -> Manifest:
    """A single-node checkpoint is what every node loads; a multi-node one is per rank (empty for
    a node that recorded it has nothing of it)."""
    source_rank = 0 if job.num_nodes == 1 else rank
    try:
        return read_manifest(store, job.job_id, name, source_rank)
    except NotFoundError:
        if source_rank == 0 or not store.exists(layout.nothing_key(job.job_id, name, source_rank)):
            raise
    return nothing_here(read_manifest(store, job.job_id, name, 0), source_rank)


def _latest_of_job(store: Store, job: JobRecord, rank: int, warn: Warn) -> Manifest | None:
    """In rank 0's latest order, the first checkpoint every node has committed (RankCommits.covers)."""
    for manifest in committed_checkpoints(store, job.job_id, 0, warn):
        if job.num_nodes == 1:
            return manifest
        name = manifest.checkpoint_name
        if rank_commits(store, job.job_id, name).covers(job.num_nodes):
            return _manifest_for_rank(store, job, name, rank)
    return None


def _resolve_latest(store: Store, ref: LatestRef, rank: int, project: str | None,
                    warn: Warn) -> tuple[Manifest | None, str]:
    if ref.job_id:
        job = read_job(store, ref.job_id)
        if job is None:
            return None, f"job {ref.job_id} is not in the store"
        if ref.project_name and job.project_name != ref.project_name:
            raise NotFoundError(
                f"{ref.describe()}: job {ref.job_id} belongs to project {job.project_name!r}, "
                f"not {ref.project_name!r}; fix project_name or job_id"
            )
        found = _latest_of_job(store, job, rank, warn)
        return found, (f"newest complete checkpoint of job {job.job_id}" if found
                       else f"job {job.job_id} has no complete checkpoint")
    project = ref.project_name or project
    if not project:
        raise ConfigError(
            f"{ref.describe()}: names neither project_name nor job_id and BT_TRAINING_PROJECT_NAME is unset"
        )
    for _, job_id in project_jobs(store, project, warn):
        job = read_job(store, job_id)
        if job is None:
            continue
        found = _latest_of_job(store, job, rank, warn)
        if found:
            return found, (f"newest complete checkpoint of job {job_id}, "
                           f"the most recent job of project {project} that has one")
    return None, f"project {project} has no job with a complete checkpoint"


def _resolve_named(store: Store, ref: NamedRef, rank: int) -> Manifest:
    job = read_job(store, ref.job_id)
    if job is None:
        raise NotFoundError(f"{ref.describe()}: job {ref.job_id} is not in the store; check job_id")
    try:
        return _manifest_for_rank(store, job, ref.checkpoint_name, rank)
    except NotFoundError:
        raise NotFoundError(
            f"{ref.describe()}: checkpoint {ref.checkpoint_name} of job {ref.job_id} is missing "
            f"or not committed for rank {rank}; check checkpoint_name (`ckpt-agent ls --job-id {ref.job_id}`)"
        ) from None


def resolve(store: Store, refs: tuple[Reference, ...], rank: int, project: str | None,
            required: bool = False) -> Resolution:
    """Resolve every reference; duplicates collapse, clashing folder names are fatal."""
    chosen: dict[tuple[str, str], Resolved] = {}
    by_name: dict[str, Resolved] = {}
    warnings: list[str] = []

    def warn(message: str) -> None:
        if message not in warnings:
            warnings.append(message)

    for ref in refs:
        manifest: Manifest | None
        if isinstance(ref, NamedRef):
            manifest, reason = _resolve_named(store, ref, rank), "named"
        else:
            manifest, reason = _resolve_latest(store, ref, rank, project, warn)
            if manifest is None:
                message = f"{ref.describe()}: no checkpoint found ({reason})"
                if required:
                    raise NotFoundError(f"{message}; BT_LOAD_CHECKPOINT_REQUIRED=1 makes this fatal")
                warnings.append(f"{message}; training starts WITHOUT a checkpoint")
                continue
        resolved = Resolved(ref, manifest, reason)
        if resolved.key in chosen:
            continue
        clash = by_name.get(manifest.checkpoint_name)
        if clash is not None:
            raise ConfigError(
                f"{clash.reference.describe()} and {ref.describe()} both resolve to a checkpoint named "
                f"{manifest.checkpoint_name} (jobs {clash.manifest.job_id} and {manifest.job_id}) "
                "and would land in the same folder; load one of them"
            )
        chosen[resolved.key] = resolved
        by_name[manifest.checkpoint_name] = resolved
    return Resolution(tuple(chosen.values()), tuple(warnings))
