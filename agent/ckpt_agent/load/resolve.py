"""References -> manifests: reads the store, never writes.

"Latest" means the newest checkpoint that every node of its job has committed, so that all
nodes of a multi-node job resume from the same step: the leader (rank 0) with its manifest, each
other node with its manifest or with a "nothing here" record (it had no files of that
checkpoint, docs/sidecar.md). Order is the rank-0 manifest's committed_at, ties broken by the
natural order of names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from ckpt_agent.config import names
from ckpt_agent.config.spec import LatestRef, NamedRef, Reference
from ckpt_agent.errors import ConfigError, IntegrityError, NotFoundError
from ckpt_agent.runtime.pool import map_tasks
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import Store
from ckpt_agent.stores.manifest import (
    FOLDER_KIND,
    JobRecord,
    Manifest,
    natural_key,
    parse_job_record,
    parse_manifest,
)

Warn = Callable[[str], None]


def no_warnings(_message: str) -> None:
    """The default for callers that have nowhere to show a warning."""


def valid_names(listed: Iterable[str], where: str, warn: Warn) -> list[str]:
    """Names a store listing offers, without those no job, project or checkpoint could have: a planted
    `..`, `x/y` or a name with a newline is never chosen, never becomes a path, and is shown escaped."""
    kept = []
    for name in listed:
        problem = names.name_problem(name)
        if problem is None:
            kept.append(name)
        else:
            warn(f"{where}: ignoring {names.quote_name(name)}: {problem}")
    return kept


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


@dataclass(frozen=True)
class RankCommits:
    """Which nodes committed one checkpoint: with their files (a manifest), or with none (a "nothing
    here" record, written only after the leader committed it)."""

    manifests: tuple[int, ...]
    nothing: tuple[int, ...] = ()

    def covers(self, num_nodes: int) -> bool:
        """Complete for a job of `num_nodes`: the leader's manifest (it stands for the collective
        save), and every other node's manifest or record."""
        done = set(self.manifests) | set(self.nothing)
        return 0 in self.manifests and all(r in done for r in range(num_nodes))


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint of a job as the store shows it (used by `latest` and by listings)."""

    name: str
    ranks: RankCommits
    num_nodes: int
    committed_at: str | None

    @property
    def complete(self) -> bool:
        return self.ranks.covers(self.num_nodes)


def read_job(store: Store, job_id: str) -> JobRecord | None:
    key = layout.job_record_key(job_id)
    try:
        return parse_job_record(store.read_bytes(key, limit=layout.MAX_RECORD_BYTES), key)
    except NotFoundError:
        return None


def read_manifest(store: Store, job_id: str, name: str, rank: int) -> Manifest:
    key = layout.manifest_key(job_id, name, rank)
    manifest = parse_manifest(store.read_bytes(key, limit=layout.MAX_MANIFEST_BYTES), key)
    if (manifest.job_id, manifest.checkpoint_name, manifest.rank) != (job_id, name, rank):
        raise IntegrityError(
            f"{key}: manifest names {manifest.job_id}/{manifest.checkpoint_name}/rank-{manifest.rank}, "
            "not its own location"
        )
    return manifest


def latest_order(committed_at: str | None, name: str) -> tuple[str, tuple]:
    """The sort key of "latest": commit time, ties broken by the natural order of names (sort reversed)."""
    return (committed_at or "", natural_key(name))


def committed_checkpoints(store: Store, job_id: str, rank: int, warn: Warn = no_warnings,
                          skip_damaged: bool = False) -> list[Manifest]:
    """A job's checkpoints that `rank` has committed, in latest order (newest first).

    A damaged manifest is an IntegrityError, unless `skip_damaged` (the sidecar, which must keep
    uploading): then it is left out with a warning."""
    prefix = layout.checkpoints_prefix(job_id)
    names = valid_names(store.list_dir(prefix).dirs, prefix, warn)

    def manifest(name: str) -> Manifest | None:
        try:
            return read_manifest(store, job_id, name, rank)
        except NotFoundError:
            return None
        except IntegrityError as exc:
            if not skip_damaged:
                raise
            warn(f"{exc}; left out")
            return None

    found = [m for m in map_tasks(manifest, names) if m is not None]
    return sorted(found, key=lambda m: latest_order(m.committed_at, m.checkpoint_name), reverse=True)


def rank_commits(store: Store, job_id: str, name: str) -> RankCommits:
    """The ranks with a manifest, and those with a "nothing here" record, from one listing."""
    files = store.list_dir(layout.checkpoint_prefix(job_id, name)).files
    return RankCommits(tuple(sorted(r for r in map(layout.manifest_rank, files) if r is not None)),
                       tuple(sorted(r for r in map(layout.nothing_rank, files) if r is not None)))


def list_checkpoints(store: Store, job_id: str, num_nodes: int, warn: Warn = no_warnings) -> list[CheckpointInfo]:
    """Every checkpoint folder of a job of `num_nodes` nodes with its commit state, newest first."""
    prefix = layout.checkpoints_prefix(job_id)
    names = valid_names(store.list_dir(prefix).dirs, prefix, warn)

    def info(name: str) -> CheckpointInfo:
        ranks = rank_commits(store, job_id, name)
        committed_at = None
        if 0 in ranks.manifests:
            committed_at = read_manifest(store, job_id, name, 0).committed_at
        return CheckpointInfo(name, ranks, num_nodes, committed_at)

    infos = map_tasks(info, names)
    infos.sort(key=lambda c: latest_order(c.committed_at, c.name), reverse=True)
    return infos


def project_jobs(store: Store, project: str, warn: Warn = no_warnings) -> list[tuple[str, str]]:
    """(created_at, job_id) of every job indexed under a project, most recent first.

    One damaged or planted entry is skipped with a warning: it must not hide every other job of
    the project (the job's own job.json is what a load trusts)."""
    prefix = layout.project_jobs_prefix(project)
    ids = valid_names([j for j in map(layout.job_id_from_index_entry, store.list_dir(prefix).files) if j],
                      prefix, warn)

    def entry(job_id: str) -> tuple[str, str] | None:
        key = layout.project_job_key(project, job_id)
        try:
            record = json.loads(store.read_bytes(key, limit=layout.MAX_RECORD_BYTES))
            created = record["created_at"]
            if not isinstance(created, str):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, IntegrityError):
            warn(f"{key}: ignoring a project index entry that is not a JSON object with created_at")
            return None
        except NotFoundError:
            return None
        return (created, job_id)

    entries = [e for e in map_tasks(entry, ids) if e is not None]
    return sorted(entries, key=lambda e: (e[0], natural_key(e[1])), reverse=True)


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
