"""--keep-last: which of the job's complete checkpoints go, and deleting every node's data of them safely.

Only checkpoints complete for the job count (every node committed them: the leader's manifest, each
other node's manifest or "nothing here" record), in latest order (ckpt_agent.stores.catalog), the order
a load picks "latest" by: so the checkpoints deleted are never the ones a resume would choose, and a
checkpoint some node has not committed yet is neither counted nor deleted. Every node runs this after
each of its commits; deleting what another node already deleted is not an error.
"""

from __future__ import annotations

from ckpt_agent.errors import AgentError
from ckpt_agent.report import Reporter
from ckpt_agent.stores import layout
from ckpt_agent.stores.base import Store
from ckpt_agent.stores.catalog import list_checkpoints, rank_commits


def beyond_keep(complete_newest_first: list[str], just_committed: str, keep_last: int) -> list[str]:
    """The names to delete: all but the newest `keep_last` complete checkpoints, the one just committed
    counted first when it is complete (it is the newest, whatever the store's clock said of the others)."""
    order = sorted(complete_newest_first, key=lambda name: name != just_committed)  # stable: the rest keep their order
    return order[keep_last:]


def delete_checkpoint(store: Store, job_id: str, name: str) -> None:
    """Every node's commit first, the leader's before all (it is what orders and completes a checkpoint),
    so no load ever sees a complete checkpoint with files missing; then every object of it."""
    ranks = rank_commits(store, job_id, name)
    for rank in ranks.manifests:  # sorted: rank 0 first
        store.delete(layout.manifest_key(job_id, name, rank))
    for rank in ranks.nothing:
        store.delete(layout.nothing_key(job_id, name, rank))
    for key in store.list_recursive(layout.checkpoint_prefix(job_id, name)):
        store.delete(key)


def retain(store: Store, job_id: str, num_nodes: int, just_committed: str, keep_last: int,
           reporter: Reporter) -> None:
    """Delete the job's complete checkpoints beyond keep_last; a failure is retried after the next commit."""
    try:
        infos = list_checkpoints(store, job_id, num_nodes)
        for name in beyond_keep([c.name for c in infos if c.complete], just_committed, keep_last):
            delete_checkpoint(store, job_id, name)
            whose = " (every node's files)" if num_nodes > 1 else ""
            reporter.info(f"sync: keep-last {keep_last}: deleted {name}{whose}", event="sync_deleted", checkpoint=name)
    except AgentError as exc:
        reporter.warn(f"sync: keep-last: could not delete older checkpoints ({exc}); will try again")
