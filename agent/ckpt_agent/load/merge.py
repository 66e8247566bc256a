"""Which node's copy of each file a node loads: one folder from every node's manifest of a checkpoint.

A multi-node job commits one manifest per node (`rank-<n>.manifest.json`), each listing the files
of that node's `BT_CHECKPOINT_DIR`. Resuming takes more than a node's own files: HF Trainer on
node 1 reads the leader's weights and `trainer_state.json`, DCP's planner reads a replicated tensor
from whichever rank's shard holds it, and a job on another number of nodes needs every shard to
reshard. So by default a node loads every node's files into its `rank-<r>/<name>/`; with
`CKPT_AGENT_LOAD_RANKS=own` (and the same node count as the saving job) only its own.

Where two nodes list one path with the same bytes, one copy is placed. Where the bytes differ,
this node's own copy wins (it is what this node's trainer wrote); a node that holds no copy gets
the lowest rank's, the leader's. Either way the load warns once. Paths of different nodes that
would be one file on a case-insensitive or normalising file system, or a file on one node and a
folder on another, are refused exactly as within one manifest.

Pure: manifests in, a decision out; the same function rebuilds a recorded load for `verify`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckpt_agent.stores.manifest import FILE_KIND, FOLDER_KIND, FileEntry, Manifest, check_collisions


@dataclass(frozen=True)
class NodeChoice:
    """What this node asks for: its own files only (`CKPT_AGENT_LOAD_RANKS=own`), in a job of `job_nodes`."""

    own_only: bool = False
    job_nodes: int = 1

    def ranks(self, saved_nodes: int, rank: int) -> range:
        """The ranks whose manifests a node of rank `rank` loads from a checkpoint of `saved_nodes` nodes
        (a range: a job record from the store may claim any node count, and is never enumerated).

        A single-node checkpoint is what every node loads. `own` is the literal per-rank layout, and
        only for a job of the saving job's shape: on another node count a node's own shards cannot
        be all it needs, so it gets every node's files, as DCP needs to reshard."""
        if saved_nodes == 1:
            return range(1)
        if self.own_only and self.job_nodes == saved_nodes:
            return range(rank, rank + 1)
        return range(saved_nodes)


EVERY_NODE = NodeChoice()


@dataclass(frozen=True)
class Placed:
    """One file of the merged folder, and the node manifest whose copy is placed."""

    manifest: Manifest
    entry: FileEntry


@dataclass(frozen=True)
class Conflict:
    """A path that nodes hold with different bytes: `kept` is the rank whose copy is placed."""

    path: str
    kept: int
    others: tuple[int, ...]


@dataclass(frozen=True)
class Merged:
    """One checkpoint as one node loads it: the files of one or more node manifests."""

    manifests: tuple[Manifest, ...]  # the nodes drawn on, by rank
    own_rank: int
    files: tuple[Placed, ...]
    conflicts: tuple[Conflict, ...] = ()

    @property
    def primary(self) -> Manifest:
        """This node's own manifest, else the lowest rank's: the one the load's log lines name."""
        return next((m for m in self.manifests if m.rank == self.own_rank), self.manifests[0])

    @property
    def job_id(self) -> str:
        return self.primary.job_id

    @property
    def checkpoint_name(self) -> str:
        return self.primary.checkpoint_name

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(m.rank for m in self.manifests)

    @property
    def total_bytes(self) -> int:
        return sum(p.entry.size for p in self.files)

    @property
    def kind(self) -> str:
        """A single-file checkpoint stays one when every node that saved anything saved that one file."""
        if len(self.files) == 1 and all(m.kind == FILE_KIND for m in self.manifests if m.files):
            return FILE_KIND
        return FOLDER_KIND

    def placed_from(self, rank: int) -> tuple[Placed, ...]:
        return tuple(p for p in self.files if p.manifest.rank == rank)


def _same_bytes(a: FileEntry, b: FileEntry) -> bool:
    return a.size == b.size and a.parts == b.parts and (not a.strong or not b.strong or a.strong == b.strong)


def merge(manifests: tuple[Manifest, ...], own_rank: int) -> Merged:
    """Every file of `manifests` (one checkpoint, one manifest per rank) in one folder; own copies first.

    Raises IntegrityError when two nodes' paths would be one file, or a file and a folder, on disk."""
    by_rank = tuple(sorted(manifests, key=lambda m: m.rank))
    chosen: dict[str, Placed] = {}
    differing: dict[str, list[int]] = {}
    for m in sorted(by_rank, key=lambda m: (m.rank != own_rank, m.rank)):
        for entry in m.files:
            held = chosen.get(entry.path)
            if held is None:
                chosen[entry.path] = Placed(m, entry)
            elif not _same_bytes(held.entry, entry):
                differing.setdefault(entry.path, []).append(m.rank)
    files = tuple(chosen.values())  # each manifest's order, this node's first: one manifest loads as before
    if len(by_rank) > 1:
        first = by_rank[0]
        check_collisions([p.entry.path for p in files],
                         f"{first.job_id}/{first.checkpoint_name} (the files of ranks "
                         f"{', '.join(str(m.rank) for m in by_rank)} in one folder)")
    conflicts = tuple(Conflict(path, chosen[path].manifest.rank, tuple(sorted(others)))
                      for path, others in sorted(differing.items()))
    return Merged(by_rank, own_rank, files, conflicts)


def single(manifest: Manifest) -> Merged:
    """A checkpoint loaded from one manifest, as every load did before nodes were merged."""
    return merge((manifest,), manifest.rank)


def describe_conflicts(merged: Merged) -> str | None:
    """The one warning of a merge whose nodes disagree on some paths, or None."""
    if not merged.conflicts:
        return None
    shown = [f"{c.path} (rank {c.kept}'s, not rank {', '.join(map(str, c.others))}'s)" for c in merged.conflicts[:5]]
    more = f" and {len(merged.conflicts) - 5} more" if len(merged.conflicts) > 5 else ""
    rule = ("this node's own copy" if all(c.kept == merged.own_rank for c in merged.conflicts)
            else "this node's own copy where it has one, else the lowest rank's")
    count = f"{len(merged.conflicts)} paths hold" if len(merged.conflicts) > 1 else "1 path holds"
    return (f"checkpoint {merged.checkpoint_name} of job {merged.job_id}: {count} different bytes on different "
            f"nodes; loaded {rule}: {', '.join(shown)}{more}")
