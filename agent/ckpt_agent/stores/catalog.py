"""What the store holds, read-only: job records, manifests, a job's checkpoints, a project's jobs.

Shared by loading (ckpt_agent.load.resolve picks among these), listing, uploading (the previous
commit) and the sidecar (its ledger and retention); nothing here writes. Names a listing offers go
through the one name rule (ckpt_agent.config.names) before they become keys or paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ckpt_agent.config import names
from ckpt_agent.errors import IntegrityError, NotFoundError
from ckpt_agent.runtime.pool import map_tasks
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import Store
from ckpt_agent.stores.manifest import JobRecord, Manifest, json_object, natural_key, parse_job_record, parse_manifest

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
            created = json_object(store.read_bytes(key, limit=layout.MAX_RECORD_BYTES), f"{key}: ").get("created_at")
            if not isinstance(created, str):
                raise IntegrityError(f"{key}: no created_at")
        except IntegrityError:
            warn(f"{key}: ignoring a project index entry that is not a JSON object with created_at")
            return None
        except NotFoundError:
            return None
        return (created, job_id)

    entries = [e for e in map_tasks(entry, ids) if e is not None]
    return sorted(entries, key=lambda e: (e[0], natural_key(e[1])), reverse=True)
