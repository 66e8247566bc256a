"""--keep-last: which of this rank's committed checkpoints go, and deleting them safely.

What to keep is decided in latest order (ckpt_agent.load.resolve.committed_checkpoints), the order a load
picks "latest" by, so the checkpoints deleted are never the ones a resume would choose.
"""

from __future__ import annotations

from ckpt_agent.errors import AgentError
from ckpt_agent.report import Reporter
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import Store
from ckpt_agent.stores.catalog import committed_checkpoints


def beyond_keep(newest_first: list[str], just_committed: str, keep_last: int) -> list[str]:
    """The names to delete: all but the newest `keep_last`, counting the one just committed first
    (it is the newest, whatever the store's clock said of the others)."""
    others = [name for name in newest_first if name != just_committed]
    return others[max(0, keep_last - 1):]


def delete_checkpoint(store: Store, job_id: str, name: str, rank: int) -> None:
    """The manifest first, so no load ever sees a committed checkpoint with files missing."""
    store.delete(layout.manifest_key(job_id, name, rank))
    for prefix in (layout.rank_prefix(job_id, name, rank), layout.packs_prefix(job_id, name, rank)):
        for key in store.list_recursive(prefix):
            store.delete(key)


def retain(store: Store, job_id: str, rank: int, just_committed: str, keep_last: int, reporter: Reporter) -> None:
    """Delete this rank's older committed checkpoints beyond keep_last; a failure is retried after the next commit."""
    try:
        newest_first = [m.checkpoint_name for m in committed_checkpoints(store, job_id, rank)]
        for name in beyond_keep(newest_first, just_committed, keep_last):
            delete_checkpoint(store, job_id, name, rank)
            reporter.info(f"sync: keep-last {keep_last}: deleted {name} (rank {rank})",
                          event="sync_deleted", checkpoint=name)
    except AgentError as exc:
        reporter.warn(f"sync: keep-last: could not delete older checkpoints ({exc}); will try again")
