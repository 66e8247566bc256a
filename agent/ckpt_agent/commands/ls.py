"""`ckpt-agent ls`: every job in the store, or one job's checkpoints, as a table or JSON."""

from __future__ import annotations

from dataclasses import dataclass

from ckpt_agent.commands.context import Context
from ckpt_agent.load import foreign, listing
from ckpt_agent.stores import open_store
from ckpt_agent.stores.baseten import BasetenStore


@dataclass(frozen=True)
class ListOptions:
    project: str | None = None  # only this project's jobs
    job_id: str | None = None  # this job's checkpoints instead of jobs
    as_json: bool = False


def ls(ctx: Context, options: ListOptions) -> int:
    store = open_store(ctx.settings.store_config)
    try:
        data: listing.JobListing | listing.CheckpointListing
        if isinstance(store, BasetenStore):  # the training API: its projects' jobs, a job's checkpoints
            data = (foreign.api_checkpoints(store, options.job_id, options.project, ctx.settings.node_rank)
                    if options.job_id else foreign.api_jobs(store, options.project))
        else:
            data = (listing.list_job_checkpoints(store, options.job_id, options.project, ctx.reporter.warn)
                    if options.job_id else listing.list_jobs(store, options.project, ctx.reporter.warn))
    finally:
        store.close()
    print(listing.render(data, as_json=options.as_json), flush=True)
    return 0
