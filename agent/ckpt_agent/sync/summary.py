"""What the sync loop says when it starts and when it stops: one line each, plus one per checkpoint
left uncommitted, so a log shows at a glance what reached the store."""

from __future__ import annotations

from dataclasses import dataclass, field

from ckpt_agent.config.sidecar import SyncOptions
from ckpt_agent.errors import AgentError
from ckpt_agent.report import Reporter
from ckpt_agent.stores.manifest import natural_key
from ckpt_agent.sync.readiness import NotReady
from ckpt_agent.upload.commit import CheckpointId


@dataclass
class SyncResult:
    committed: list[str] = field(default_factory=list)
    not_committed: dict[str, NotReady] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # top-level entries not uploaded, and why
    nothing_here: list[str] = field(default_factory=list)  # node r > 0: the leader's, recorded as none here
    nothing_waiting: list[str] = field(default_factory=list)  # node r > 0: the leader's, not recorded yet
    failed: AgentError | None = None


def announce(reporter: Reporter, store: str, ident: CheckpointId, o: SyncOptions) -> None:
    marker = (f"folders complete when {' or '.join(o.rules.markers)} is there" if o.rules.markers
              else "HF Trainer, DCP, DeepSpeed folders and single files recognised")
    if o.rules.commit_on_quiet:
        marker += "; folders of no known format on quiet alone"
    if ident.rank > 0:
        marker += "; the leader's commits complete this node's checkpoints"
    reporter.info(
        f"sync: watching {o.checkpoint_dir} for job {ident.job_id} (project {ident.project_name}, "
        f"rank {ident.rank} of {ident.num_nodes}) -> {store}; quiet "
        f"{o.quiet_seconds:g} s, {marker}" + (f", keep last {o.keep_last}" if o.keep_last else ""))


def summarize(reporter: Reporter, result: SyncResult) -> None:
    for name, why in sorted(result.not_committed.items(), key=lambda kv: natural_key(kv[0])):
        reporter.warn(f"sync: {name} NOT committed: {why}", event="sync_not_committed",
                      checkpoint=name, reason=str(why), why=why.why.name)
    for name in result.nothing_waiting:
        reporter.warn(f"sync: {name} NOT committed on this node: the leader committed it and it has no files "
                      "here, but it was too early to record that it has none", event="sync_not_committed",
                      checkpoint=name, reason="nothing here, not recorded yet", why="NOTHING_WAITING")
    done = ", ".join(result.committed) or "none"
    left = result.left_out
    shown = ", ".join(sorted(left, key=natural_key)[:5]) + (" ..." if len(left) > 5 else "")
    nothing = f"nothing here (recorded): {', '.join(result.nothing_here)}; " if result.nothing_here else ""
    reporter.info(f"sync: stopped; committed this run: {done}; {nothing}"
                  f"not committed: {len(result.not_committed) + len(result.nothing_waiting)}; "
                  f"left out (not uploaded): {len(left)}" + (f" ({shown})" if left else ""),
                  event="sync_stopped", committed=list(result.committed), nothing_here=list(result.nothing_here),
                  not_committed=len(result.not_committed), left_out=sorted(left))
