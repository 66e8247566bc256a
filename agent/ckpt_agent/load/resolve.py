"""References -> manifests: reads the store (through ckpt_agent.stores.catalog), never writes.

"Latest" means the newest checkpoint that every node of its job has committed, so that all
nodes of a multi-node job resume from the same step: the leader (rank 0) with its manifest, each
other node with its manifest or with a "nothing here" record (it had no files of that
checkpoint, docs/sidecar.md). Order is the rank-0 manifest's committed_at, ties broken by the
natural order of names. Of a multi-node checkpoint a node reads the manifests of the ranks
ckpt_agent.load.merge.NodeChoice names (by default every node's; a "nothing here" record counts
as a manifest without files).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

from ckpt_agent.config.spec import LatestRef, NamedRef, Reference
from ckpt_agent.errors import ConfigError, NotFoundError
from ckpt_agent.load.merge import EVERY_NODE, Merged, NodeChoice, merge, single
from ckpt_agent.runtime.pool import map_tasks
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import Store
from ckpt_agent.stores.catalog import (
    RankCommits,
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
    manifest: Manifest  # this node's own, or the lowest rank's when it loads nodes it is not one of
    reason: str
    merged: Merged | None = None  # the nodes' files in one folder, when it loads other nodes' manifests

    @property
    def key(self) -> tuple[str, str]:
        return (self.manifest.job_id, self.manifest.checkpoint_name)

    @functools.cached_property
    def checkpoint(self) -> Merged:
        """What this node places: the merge, or its one manifest."""
        return self.merged or single(self.manifest)


@dataclass(frozen=True)
class Resolution:
    checkpoints: tuple[Resolved, ...]
    warnings: tuple[str, ...]


def nothing_here(leader: Manifest, rank: int) -> Manifest:
    """Node `rank`'s part of a checkpoint it recorded "nothing here" for: no files, the leader's
    identity and commit time."""
    return replace(leader, rank=rank, files=(), packs=(), kind=FOLDER_KIND, extra={}, source=b"")


Found = tuple[Manifest, Merged | None]  # this node's manifest, and the merge when it loads other nodes' too
# One reference -> (what it found, or None for a latest reference that found nothing; why): the
# layout store's (find_in_store), or load/foreign.py's for the training API and S3 prefixes.
Finder = Callable[[Reference, Warn], tuple[Found | None, str]]


def _for_node(store: Store, job: JobRecord, name: str, rank: int, nodes: NodeChoice, warn: Warn,
              have: Manifest | None = None, commits: RankCommits | None = None) -> Found:
    """The manifests of checkpoint `name` that node `rank` loads (`have`: one already read;
    `commits`: the checkpoint's listing, if already made). A rank that `nodes` names but that has
    not committed is a NotFoundError when it is this node's own rank (or every rank), else a
    warning: the other nodes' files still load. A "nothing here" record is a manifest without files."""
    wanted = nodes.ranks(job.num_nodes, rank)
    if len(wanted) == 1:
        present = set(wanted)
    else:
        commits = commits or rank_commits(store, job.job_id, name)
        present = set(commits.manifests) | set(commits.nothing)
    loadable = sorted(r for r in present if r in wanted)
    if (rank in wanted and rank not in present) or not loadable:
        raise NotFoundError(f"checkpoint {name} of job {job.job_id} is missing or not committed for rank "
                            f"{rank if rank in wanted else wanted[0]}")
    if len(loadable) < len(wanted):
        first = ", ".join(map(str, itertools.islice((r for r in wanted if r not in present), 5)))
        absent = len(wanted) - len(loadable)
        warn(f"checkpoint {name} of job {job.job_id}: {absent} of its {job.num_nodes} nodes "
             f"{'has' if absent == 1 else 'have'} not committed it (rank {first}); loading the files of the others")

    @functools.cache
    def read(r: int) -> Manifest:
        if have is not None and have.rank == r:
            return have
        try:
            return read_manifest(store, job.job_id, name, r)
        except NotFoundError:
            if r == 0 or not store.exists(layout.nothing_key(job.job_id, name, r)):
                raise NotFoundError(f"checkpoint {name} of job {job.job_id} is missing or not committed for "
                                    f"rank {r}") from None
        return nothing_here(read(0), r)

    if len(wanted) == 1:
        return read(wanted[0]), None
    merged = merge(tuple(map_tasks(read, loadable)), rank)
    return merged.primary, merged


def _latest_of_job(store: Store, job: JobRecord, rank: int, nodes: NodeChoice, warn: Warn) -> Found | None:
    """In rank 0's latest order, the first checkpoint every node has committed (RankCommits.covers)."""
    for manifest in committed_checkpoints(store, job.job_id, 0, warn):
        if job.num_nodes == 1:
            return manifest, None
        name = manifest.checkpoint_name
        commits = rank_commits(store, job.job_id, name)
        if commits.covers(job.num_nodes):
            return _for_node(store, job, name, rank, nodes, warn, have=manifest, commits=commits)
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


def find_in_store(store: Store, rank: int, project: str | None, nodes: NodeChoice, ref: Reference,
                  warn: Warn) -> tuple[Found | None, str]:
    """A reference in a store of our layout (docs/store-layout.md)."""
    if isinstance(ref, NamedRef):
        return _resolve_named(store, ref, rank, nodes, warn), "named"
    if isinstance(ref, LatestRef):
        return _resolve_latest(store, ref, rank, project, nodes, warn)
    raise ConfigError(f"{ref.describe()}: not a reference to this store")


def resolve(store: Store, refs: tuple[Reference, ...], rank: int, project: str | None,
            required: bool = False, nodes: NodeChoice = EVERY_NODE, find: Finder | None = None) -> Resolution:
    """Resolve every reference (with `find`, by default in `store`'s layout); duplicates collapse,
    clashing folder names are fatal. `nodes`: which ranks' files of a multi-node checkpoint this node
    loads."""
    find = find or functools.partial(find_in_store, store, rank, project, nodes)
    chosen: dict[tuple[str, str], Resolved] = {}
    by_name: dict[str, Resolved] = {}
    warnings: list[str] = []

    def warn(message: str) -> None:
        if message not in warnings:
            warnings.append(message)

    for ref in refs:
        found, reason = find(ref, warn)
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
