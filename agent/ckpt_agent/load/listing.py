"""What the store holds, for `ckpt-agent ls`. Reads only, through the same functions a load uses.

The listings are plain functions returning data; `render` turns that data into a table for a
person or JSON for a machine, so both always show the same thing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial

from ckpt_agent.errors import NotFoundError
from ckpt_agent.report import human_bytes
from ckpt_agent.runtime.pool import map_tasks
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import Store
from ckpt_agent.stores.catalog import (
    Warn,
    list_checkpoints,
    no_warnings,
    project_jobs,
    read_job,
    read_manifest,
    valid_names,
)
from ckpt_agent.stores.manifest import natural_key


@dataclass(frozen=True)
class JobRow:
    job_id: str
    project_name: str | None
    created_at: str | None
    num_nodes: int | None  # None: the job folder has no job.json


@dataclass(frozen=True)
class CheckpointRow:
    name: str
    committed_at: str | None  # the rank-0 manifest's, which orders `latest`
    ranks_committed: tuple[int, ...]  # with their files (a manifest)
    ranks_nothing_here: tuple[int, ...]  # with a record that the node has no files of it
    num_nodes: int
    complete: bool  # every node committed: what `latest` may choose
    files: int | None  # summed over the committed ranks; None when no rank committed
    bytes: int | None

    @property
    def state(self) -> str:
        if self.complete:
            return "committed"
        return "partial" if self.ranks_committed or self.ranks_nothing_here else "uncommitted"


@dataclass(frozen=True)
class JobListing:
    jobs: tuple[JobRow, ...]
    project_name: str | None = None


@dataclass(frozen=True)
class CheckpointListing:
    job: JobRow
    checkpoints: tuple[CheckpointRow, ...]


def _job_row(store: Store, job_id: str) -> JobRow:
    job = read_job(store, job_id)
    if job is None:
        return JobRow(job_id, None, None, None)
    return JobRow(job.job_id, job.project_name, job.created_at, job.num_nodes)


def list_jobs(store: Store, project: str | None = None, warn: Warn = no_warnings) -> JobListing:
    """Every job under jobs/ (or only the project's, from its index), most recently created first."""
    if project is None:
        ids = valid_names(store.list_dir(layout.jobs_prefix()).dirs, layout.jobs_prefix(), warn)
    else:
        ids = [job_id for _, job_id in project_jobs(store, project, warn)]
    rows = map_tasks(partial(_job_row, store), ids)
    rows.sort(key=lambda r: (r.created_at or "", natural_key(r.job_id)), reverse=True)
    return JobListing(tuple(rows), project)


def list_job_checkpoints(store: Store, job_id: str, project: str | None = None,
                         warn: Warn = no_warnings) -> CheckpointListing:
    """One job's checkpoints in the store's latest order (newest first), committed or not."""
    job = read_job(store, job_id)
    if job is None:
        raise NotFoundError(f"job {job_id} is not in the store; list the jobs with `ckpt-agent ls`")
    if project and job.project_name != project:
        raise NotFoundError(
            f"job {job_id} belongs to project {job.project_name!r}, not {project!r}; "
            f"list the project's jobs with `ckpt-agent ls --project {project}`"
        )
    infos = list_checkpoints(store, job.job_id, job.num_nodes, warn)

    def row(info) -> CheckpointRow:
        manifests = [read_manifest(store, job.job_id, info.name, rank) for rank in info.ranks.manifests]
        files = sum(len(m.files) for m in manifests) if manifests else None
        size = sum(m.total_bytes for m in manifests) if manifests else None
        return CheckpointRow(info.name, info.committed_at, info.ranks.manifests, info.ranks.nothing,
                             info.num_nodes, info.complete, files, size)

    rows = tuple(map_tasks(row, infos))
    return CheckpointListing(JobRow(job.job_id, job.project_name, job.created_at, job.num_nodes), rows)


def _ranks(c: CheckpointRow) -> str:
    """`2/2` once every node committed (a node with nothing of it counts, and is named)."""
    done = len(set(c.ranks_committed) | set(c.ranks_nothing_here))
    nothing = f" (rank {', '.join(map(str, c.ranks_nothing_here))}: nothing here)" if c.ranks_nothing_here else ""
    return f"{done}/{c.num_nodes}" + ("" if c.complete else f" {c.state}") + nothing


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in [header, *rows])


def _jsonable(data: JobListing | CheckpointListing) -> dict:
    if isinstance(data, JobListing):
        return {"project_name": data.project_name, "jobs": [asdict(j) for j in data.jobs]}
    return {"job": asdict(data.job),
            "checkpoints": [{**asdict(c), "ranks_committed": list(c.ranks_committed),
                             "ranks_nothing_here": list(c.ranks_nothing_here), "state": c.state}
                            for c in data.checkpoints]}


def render(data: JobListing | CheckpointListing, as_json: bool = False) -> str:
    """A listing as an aligned table, or as JSON (`--json`) with the same content and raw numbers."""
    if as_json:
        return json.dumps(_jsonable(data), indent=1)
    if isinstance(data, JobListing):
        if not data.jobs:
            where = f"project {data.project_name}" if data.project_name else "the store"
            return f"no jobs in {where}"
        return _table(["PROJECT", "JOB", "CREATED", "NODES"],
                      [[j.project_name or "-", j.job_id, j.created_at or "(no job.json)",
                        "-" if j.num_nodes is None else str(j.num_nodes)] for j in data.jobs])
    job = data.job
    nodes = "" if job.num_nodes is None else f", {job.num_nodes} node(s)"  # the training API does not say
    title = f"job {job.job_id} (project {job.project_name or '-'}{nodes}, created {job.created_at})"
    if not data.checkpoints:
        return f"{title}\nno checkpoints"
    rows = [[c.name, c.committed_at or "-",
             _ranks(c),
             "-" if c.files is None else str(c.files),
             "-" if c.bytes is None else human_bytes(c.bytes)] for c in data.checkpoints]
    return f"{title}\n" + _table(["CHECKPOINT", "COMMITTED AT", "RANKS", "FILES", "SIZE"], rows)
