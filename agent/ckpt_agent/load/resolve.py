"""References -> manifests: reads the store, never writes.

"Latest" means the newest checkpoint that every rank of its job has committed, so that all
nodes of a multi-node job resume from the same step; order is the rank-0 manifest's
committed_at, ties broken by the natural order of names. Of a multi-node checkpoint a node reads
the manifests of the ranks ckpt_agent.load.merge.NodeChoice names (by default every node's).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ckpt_agent.config import names
from ckpt_agent.config.spec import LatestRef, NamedRef, Reference
from ckpt_agent.errors import ConfigError, IntegrityError, NotFoundError
from ckpt_agent.load.merge import EVERY_NODE, Merged, NodeChoice, merge, single
from ckpt_agent.runtime.pool import map_tasks
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import Store
from ckpt_agent.stores.manifest import JobRecord, Manifest, natural_key, parse_job_record, parse_manifest

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
    manifest: Manifest  # this node's own, or the lowest rank's when it loads nodes it is not one of
    reason: str
    merged: Merged | None = None  # the nodes' files in one folder, when it loads other nodes' manifests

    @property
    def key(self) -> tuple[str, str]:
        return (self.manifest.job_id, self.manifest.checkpoint_name)

    @property
    def checkpoint(self) -> Merged:
        """What this node places: the merge, or its one manifest."""
        return self.merged or single(self.manifest)


@dataclass(frozen=True)
class Resolution:
    checkpoints: tuple[Resolved, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint of a job as the store shows it (used by `latest` and by listings)."""

    name: str
    ranks_committed: tuple[int, ...]
    num_nodes: int
    committed_at: str | None

    @property
    def complete(self) -> bool:
        return all(r in self.ranks_committed for r in range(self.num_nodes))


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


def committed_ranks(store: Store, job_id: str, name: str) -> tuple[int, ...]:
    """The ranks with a manifest for one checkpoint, from one listing."""
    files = store.list_dir(layout.checkpoint_prefix(job_id, name)).files
    return tuple(sorted(r for r in map(layout.manifest_rank, files) if r is not None))


def list_checkpoints(store: Store, job: JobRecord, warn: Warn = no_warnings) -> list[CheckpointInfo]:
    """Every checkpoint folder of a job with its commit state, newest first."""
    prefix = layout.checkpoints_prefix(job.job_id)
    names = valid_names(store.list_dir(prefix).dirs, prefix, warn)

    def info(name: str) -> CheckpointInfo:
        ranks = committed_ranks(store, job.job_id, name)
        committed_at = None
        if 0 in ranks:
            committed_at = read_manifest(store, job.job_id, name, 0).committed_at
        return CheckpointInfo(name, ranks, job.num_nodes, committed_at)

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


Found = tuple[Manifest, Merged | None]  # this node's manifest, and the merge when it loads other nodes' too


def _for_node(store: Store, job: JobRecord, name: str, rank: int, nodes: NodeChoice, warn: Warn,
              have: Manifest | None = None) -> Found:
    """The manifests of checkpoint `name` that node `rank` loads (`have`: one already read). A rank
    that `nodes` names but that has not committed is a NotFoundError when it is this node's own
    rank (or every rank), else a warning: the other nodes' files still load."""
    wanted = nodes.ranks(job.num_nodes, rank)
    present = set(committed_ranks(store, job.job_id, name)) if len(wanted) > 1 else set(wanted)
    loadable = sorted(r for r in present if r in wanted)
    if (rank in wanted and rank not in present) or not loadable:
        raise NotFoundError(f"checkpoint {name} of job {job.job_id} is missing or not committed for rank "
                            f"{rank if rank in wanted else wanted[0]}")
    if len(loadable) < len(wanted):
        first = ", ".join(map(str, itertools.islice((r for r in wanted if r not in present), 5)))
        warn(f"checkpoint {name} of job {job.job_id}: {len(wanted) - len(loadable)} of its {job.num_nodes} "
             f"nodes have not committed it (rank {first}); loading the files of the others")

    def read(r: int) -> Manifest:
        if have is not None and have.rank == r:
            return have
        try:
            return read_manifest(store, job.job_id, name, r)
        except NotFoundError:
            raise NotFoundError(f"checkpoint {name} of job {job.job_id} is missing or not committed for "
                                f"rank {r}") from None

    if len(wanted) == 1:
        return read(wanted[0]), None
    manifests = tuple(map_tasks(read, loadable))
    merged = merge(manifests, rank)
    return merged.primary, merged


def _latest_of_job(store: Store, job: JobRecord, rank: int, nodes: NodeChoice, warn: Warn) -> Found | None:
    """In rank 0's latest order, the first checkpoint every rank has committed."""
    for manifest in committed_checkpoints(store, job.job_id, 0, warn):
        name = manifest.checkpoint_name
        ranks = committed_ranks(store, job.job_id, name) if job.num_nodes > 1 else (0,)
        if all(r in ranks for r in range(job.num_nodes)):
            return _for_node(store, job, name, rank, nodes, warn, have=manifest)
    return None


def _resolve_latest(store: Store, ref: LatestRef, rank: int, project: str | None, nodes: NodeChoice,
                    warn: Warn) -> tuple[Found | None, str]:
    if ref.job_id:
        job = read_job(store, ref.job_id)
        if job is None:
            return None, f"job {ref.job_id} is not in the store"
        if ref.project_name and job.project_name != ref.project_name:
            raise NotFoundError(
                f"{ref.describe()}: job {ref.job_id} belongs to project {job.project_name!r}, "
                f"not {ref.project_name!r}; fix project_name or job_id"
            )
        found = _latest_of_job(store, job, rank, nodes, warn)
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
        found = _latest_of_job(store, job, rank, nodes, warn)
        if found:
            return found, (f"newest complete checkpoint of job {job_id}, "
                           f"the most recent job of project {project} that has one")
    return None, f"project {project} has no job with a complete checkpoint"


def _resolve_named(store: Store, ref: NamedRef, rank: int, nodes: NodeChoice, warn: Warn) -> Found:
    job = read_job(store, ref.job_id)
    if job is None:
        raise NotFoundError(f"{ref.describe()}: job {ref.job_id} is not in the store; check job_id")
    try:
        return _for_node(store, job, ref.checkpoint_name, rank, nodes, warn)
    except NotFoundError as exc:
        raise NotFoundError(f"{ref.describe()}: {exc}; check checkpoint_name "
                            f"(`ckpt-agent ls --job-id {ref.job_id}`)") from None


def resolve(store: Store, refs: tuple[Reference, ...], rank: int, project: str | None,
            required: bool = False, nodes: NodeChoice = EVERY_NODE) -> Resolution:
    """Resolve every reference; duplicates collapse, clashing folder names are fatal. `nodes`: which
    ranks' files of a multi-node checkpoint this node loads."""
    chosen: dict[tuple[str, str], Resolved] = {}
    by_name: dict[str, Resolved] = {}
    warnings: list[str] = []

    def warn(message: str) -> None:
        if message not in warnings:
            warnings.append(message)

    for ref in refs:
        found: Found | None
        if isinstance(ref, NamedRef):
            found, reason = _resolve_named(store, ref, rank, nodes, warn), "named"
        else:
            found, reason = _resolve_latest(store, ref, rank, project, nodes, warn)
            if found is None:
                message = f"{ref.describe()}: no checkpoint found ({reason})"
                if required:
                    raise NotFoundError(f"{message}; BT_LOAD_CHECKPOINT_REQUIRED=1 makes this fatal")
                warnings.append(f"{message}; training starts WITHOUT a checkpoint")
                continue
        manifest = found[0]
        resolved = Resolved(ref, manifest, reason, found[1])
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
