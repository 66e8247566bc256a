"""Multi-node rules without torch: when a node other than the leader commits, when it records that
it has nothing of a checkpoint, and what then counts as complete for the job (latest, `ls`).

Each node's sidecar runs in-process against a local store, as node `rank` of a 2-node job; the
leader's commits are made the real way (commit_checkpoint), so the store holds what a leader's
sidecar writes.
"""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import pytest

from ckpt_agent.config.settings import sync_options
from ckpt_agent.config.sidecar import Rules, SyncOptions
from ckpt_agent.config.spec import LatestRef, NamedRef
from ckpt_agent.errors import ConfigError, NotFoundError
from ckpt_agent.load.listing import list_job_checkpoints
from ckpt_agent.load.resolve import resolve
from ckpt_agent.report import Reporter
from ckpt_agent.stores import layout
from ckpt_agent.stores.local import LocalStore
from ckpt_agent.sync.formats import Format
from ckpt_agent.sync.loop import Sidecar
from ckpt_agent.sync.nodes import leader_mark, moved_on, nothing_due
from ckpt_agent.sync.readiness import Facts, NotReady, Trainer, Why, readiness
from ckpt_agent.upload.commit import CheckpointId
from tests.support.helpers import assert_one_line_failure, commit_files, in_thread, run_agent, sync_env, wait_for

JOB = "job-1"

# -- readiness on a node other than the leader ---------------------------------------------------

WAITING_FOR_A_MARKER = {  # what node 1 of a 2-node save has: never the leader's marker
    Format.HF: (dict(markers={}), "no trainer_state.json"),
    Format.DCP: (dict(markers={}), "no .metadata"),
    Format.DEEPSPEED: (dict(name="global_step5", deepspeed_latest=None), "no DeepSpeed `latest` naming it"),
    Format.MARKER: (dict(markers={}), "no DONE"),
    Format.UNKNOWN: (dict(), "a folder of no known format"),
}


@pytest.mark.parametrize("fmt", list(WAITING_FOR_A_MARKER))
def test_on_node_1_the_leaders_commit_of_the_same_name_stands_for_the_marker_it_never_gets(fmt):
    extra, here = WAITING_FOR_A_MARKER[fmt]
    rules = Rules(markers=("DONE",)) if fmt is Format.MARKER else Rules()
    facts = Facts(format=fmt, files=("rng_state_1.pth",), quiet=True, **extra)
    assert readiness(facts, rules, Trainer.RUNNING) is not None  # the leader's own rule: never complete here
    waiting = readiness(Facts(**{**facts.__dict__, "leader_committed": False}), rules, Trainer.RUNNING)
    assert waiting == NotReady(Why.LEADER, here)
    assert readiness(Facts(**{**facts.__dict__, "leader_committed": True}), rules, Trainer.RUNNING) is None


@pytest.mark.parametrize(("facts", "trainer", "why"), [
    (Facts(format=Format.DCP, files=("__1_0.distcp",), quiet=False), Trainer.RUNNING, Why.WRITING),
    (Facts(format=Format.DCP, files=("__1_0.distcp",), quiet=True, writing="__1_0.distcp"), Trainer.RUNNING, Why.OPEN),
    (Facts(format=Format.FILE, files=("a.pt",), quiet=True, structure="no zip end record"), Trainer.RUNNING,
     Why.TRUNCATED),
    (Facts(format=Format.HF, files=("trainer_state.json",), quiet=True, markers={"trainer_state.json": b"{"}),
     Trainer.RUNNING, Why.BAD_MARKER),
    (Facts(format=Format.UNKNOWN, files=("a",), quiet=True), Trainer.FAILED, Why.UNKNOWN_FAILED),
    (Facts(format=Format.DCP, files=(), quiet=True), Trainer.RUNNING, Why.EMPTY),
], ids=["still-written", "open", "cut-short", "half-written-marker", "trainer-failed-here", "empty"])
def test_on_node_1_its_own_evidence_against_a_checkpoint_wins_over_the_leaders_commit(facts, trainer, why):
    committed_by_leader = Facts(**{**facts.__dict__, "leader_committed": True})
    result = readiness(committed_by_leader, Rules(), trainer)
    assert result is not None and result.why is why


@pytest.mark.parametrize(("absent_for", "writer_gone", "later_here", "due"), [
    (5.0, False, False, False),  # a slow writer may still come
    (60.0, False, False, True),  # the grace period passed
    (0.0, True, False, True),  # the trainer on this node has exited: no writer is left
    (0.0, False, True, True),  # this node has since saved a later step: saves come in step order
])
def test_nothing_here_is_due_after_the_grace_or_at_once_when_no_writer_can_be_left(absent_for, writer_gone,
                                                                                    later_here, due):
    assert nothing_due(absent_for, 60.0, writer_gone, later_here) is due


def test_moved_on_needs_a_later_step_of_the_same_shape_that_holds_files():
    assert moved_on("checkpoint-5", {"checkpoint-10": True})
    assert not moved_on("checkpoint-5", {"checkpoint-10": False})  # an empty folder: the save may be starting
    assert not moved_on("checkpoint-10", {"checkpoint-5": True})
    assert not moved_on("ckpt-5.pt", {"checkpoint-10": True})


# -- sidecars of a 2-node job against one store ---------------------------------------------------


class TimedStore(LocalStore):
    """A local store that notes when each key was written and deleted (monotonic seconds)."""

    def __init__(self, root: Path) -> None:
        super().__init__(str(root))
        self.writes: dict[str, float] = {}
        self.deletes: list[str] = []

    def write_bytes(self, key: str, data: bytes) -> None:
        super().write_bytes(key, data)
        self.writes.setdefault(key, time.monotonic())

    def delete(self, key: str) -> None:
        self.deletes.append(key)
        super().delete(key)


@pytest.fixture
def store(tmp_path: Path) -> TimedStore:
    return TimedStore(tmp_path / "store")


def leader_commits(store: LocalStore, tmp_path: Path, name: str, files: dict[str, bytes]) -> float:
    """The leader's sidecar commits `name` (files first, manifest last); returns when it was done."""
    commit_files(store, tmp_path / "node-0" / name, files, CheckpointId("proj", JOB, name, 0, 2))
    return time.monotonic()


def node(store: LocalStore, ckpts: Path, rank: int = 1, **options) -> tuple[Sidecar, io.StringIO]:
    """Node `rank`'s sidecar of the 2-node job, watching `ckpts`, with short test timings."""
    ckpts.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    opts = SyncOptions(ckpts, **{"quiet_seconds": 0.2, "poll_seconds": 0.05, "grace_seconds": 3,
                                 "nothing_here_seconds": 30, **options})
    sidecar = Sidecar(store, CheckpointId("proj", JOB, "", rank, 2), opts, 2, Reporter(out))
    sidecar.check_job()
    return sidecar, out


def torch_zip(path: Path) -> None:
    """A complete zip as torch.save writes it (the structure rule of a `.pt` file), without torch."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"weights")


def latest_for(store: LocalStore, rank: int) -> tuple[str, list[str]] | None:
    found = resolve(store, (LatestRef(job_id=JOB),), rank, None).checkpoints
    return (found[0].manifest.checkpoint_name, [f.path for f in found[0].manifest.files]) if found else None


HF_LEADER = {"model.safetensors": b"w" * 1000, "trainer_state.json": b"{}", "rng_state_0.pth": b"r0"}


def test_a_slow_writer_on_node_1_is_committed_with_its_files_and_never_recorded_as_having_none(store, tmp_path):
    """The leader commits checkpoint-5 before node 1's rng_state_1.pth even exists; node 1 then
    writes it slowly, holding it open. Node 1 must wait for it to be closed and quiet, commit it
    with its file, and never claim it has nothing of checkpoint-5."""
    ckpts = tmp_path / "node-1"
    sidecar, out = node(store, ckpts, nothing_here_seconds=10)
    thread = in_thread(sidecar)
    leader_commits(store, tmp_path, "checkpoint-5", HF_LEADER)
    wait_for(lambda: "checkpoint-5" in sidecar._nodes.waiting(), what="node 1 seeing the leader's commit")
    (ckpts / "checkpoint-5").mkdir()
    with open(ckpts / "checkpoint-5" / "rng_state_1.pth", "wb") as f:
        for _ in range(5):
            f.write(b"r1")
            f.flush()
            time.sleep(0.1)
        assert not store.exists(layout.manifest_key(JOB, "checkpoint-5", 1))  # open: not committed
    wait_for(lambda: store.exists(layout.manifest_key(JOB, "checkpoint-5", 1)), what="node 1's commit")
    sidecar.finish(None, wait_for_writers=False)
    thread.join(10)
    assert layout.nothing_key(JOB, "checkpoint-5", 1) not in store.writes, out.getvalue()
    assert latest_for(store, 1) == ("checkpoint-5", ["rng_state_1.pth"])
    assert latest_for(store, 0) == ("checkpoint-5", sorted(HF_LEADER))


def test_a_checkpoint_only_the_leader_writes_is_recorded_nothing_here_after_the_grace_and_becomes_latest(
        store, tmp_path):
    grace = 0.5
    sidecar, out = node(store, tmp_path / "node-1", nothing_here_seconds=grace)
    thread = in_thread(sidecar)
    committed_at = leader_commits(store, tmp_path, "ckpt-5.pt", {"ckpt-5.pt": b"PK..."})
    record = layout.nothing_key(JOB, "ckpt-5.pt", 1)
    wait_for(lambda: store.exists(record), what="node 1's nothing-here record")
    assert store.writes[record] - committed_at >= grace  # never before the grace period
    assert latest_for(store, 1) == ("ckpt-5.pt", [])
    assert latest_for(store, 0) == ("ckpt-5.pt", ["ckpt-5.pt"])
    [row] = list_job_checkpoints(store, JOB).checkpoints
    assert (row.ranks_committed, row.ranks_nothing_here, row.complete, row.state) == ((0,), (1,), True, "committed")

    # A writer later still than the grace period: its file is committed and the manifest replaces the record.
    torch_zip(tmp_path / "node-1" / "ckpt-5.pt")
    wait_for(lambda: store.exists(layout.manifest_key(JOB, "ckpt-5.pt", 1)), what="node 1's late commit")
    wait_for(lambda: not store.exists(record), what="the record replaced")
    assert latest_for(store, 1) == ("ckpt-5.pt", ["ckpt-5.pt"])
    sidecar.finish(None, wait_for_writers=False)
    thread.join(10)
    assert "node 1 has nothing of ckpt-5.pt, which the leader committed" in out.getvalue()


def test_a_named_reference_gives_a_node_that_had_nothing_of_it_an_empty_part(store, tmp_path):
    leader_commits(store, tmp_path, "ckpt-5.pt", {"ckpt-5.pt": b"PK..."})
    ref = NamedRef("ckpt-5.pt", JOB)
    with pytest.raises(NotFoundError, match="not committed for rank 1"):
        resolve(store, (ref,), 1, None)
    store.write_bytes(layout.nothing_key(JOB, "ckpt-5.pt", 1), b"{}")
    [found] = resolve(store, (ref,), 1, None).checkpoints
    assert (found.manifest.rank, found.manifest.files, found.manifest.checkpoint_name) == (1, (), "ckpt-5.pt")


def test_with_node_1s_sidecar_dead_a_checkpoint_the_leader_committed_is_never_latest(store, tmp_path):
    sidecar, _ = node(store, tmp_path / "node-1", quiet_seconds=0)
    leader_commits(store, tmp_path, "checkpoint-5", HF_LEADER)
    (tmp_path / "node-1" / "checkpoint-5").mkdir()
    (tmp_path / "node-1" / "checkpoint-5" / "rng_state_1.pth").write_bytes(b"r1")
    assert sidecar.run(once=True).committed == ["checkpoint-5"]
    # node 1's sidecar is gone from here on: the leader goes on alone
    leader_commits(store, tmp_path, "checkpoint-10", HF_LEADER)
    leader_commits(store, tmp_path, "ckpt-11.pt", {"ckpt-11.pt": b"PK..."})
    for rank in (0, 1):
        assert latest_for(store, rank)[0] == "checkpoint-5"
    rows = {r.name: r for r in list_job_checkpoints(store, JOB).checkpoints}
    assert [(rows[n].state, rows[n].complete) for n in ("checkpoint-10", "ckpt-11.pt")] == [("partial", False)] * 2
    # a planted record of the leader's never stands in for its manifest
    store.write_bytes(layout.nothing_key(JOB, "ckpt-12.pt", 0), b"{}")
    store.write_bytes(layout.nothing_key(JOB, "ckpt-12.pt", 1), b"{}")
    assert latest_for(store, 0)[0] == "checkpoint-5"


def test_the_final_flush_on_node_1_waits_for_the_leaders_last_commit_and_records_a_leader_only_one_at_once(
        store, tmp_path):
    """Preemption: node 1's trainer saved its part of checkpoint-12 and exited; the leader commits
    checkpoint-12, and then ckpt-13.pt that only it writes, after node 1's flush started. Node 1
    commits the first and, its trainer being gone, records the second at once (no grace period)."""
    ckpts = tmp_path / "node-1"
    sidecar, out = node(store, ckpts, nothing_here_seconds=600, grace_seconds=30)
    (ckpts / "checkpoint-12").mkdir(parents=True)
    (ckpts / "checkpoint-12" / "rng_state_1.pth").write_bytes(b"r1")
    thread = in_thread(sidecar)
    sidecar.finish(time.monotonic() + 30, wait_for_writers=True, trainer_status=0)
    time.sleep(0.5)
    assert thread.is_alive(), out.getvalue()  # still watching for the leader
    leader_commits(store, tmp_path, "checkpoint-12", HF_LEADER)
    leader_commits(store, tmp_path, "ckpt-13.pt", {"ckpt-13.pt": b"PK..."})
    leader_mark(store, CheckpointId("proj", JOB, "", 0, 2), stopped=True)  # the leader's sidecar stops
    thread.join(20)
    assert not thread.is_alive()
    assert sidecar.result.committed == ["checkpoint-12"], out.getvalue()
    assert sidecar.result.nothing_here == ["ckpt-13.pt"], out.getvalue()
    assert latest_for(store, 1) == ("ckpt-13.pt", [])


def test_node_1s_final_flush_stops_once_the_leaders_sidecar_has_stopped(store, tmp_path):
    """Without it, node 1 would watch for the leader's commits for its whole grace period (30 s here)."""
    ckpts = tmp_path / "node-1"
    (ckpts / "checkpoint-5").mkdir(parents=True)
    (ckpts / "checkpoint-5" / "rng_state_1.pth").write_bytes(b"r1")
    sidecar, out = node(store, ckpts, grace_seconds=30)
    leader = Sidecar(store, CheckpointId("proj", JOB, "", 0, 2), SyncOptions(tmp_path / "node-0"), 2,
                     Reporter(io.StringIO()))
    leader.check_job()
    thread = in_thread(sidecar)
    sidecar.finish(None, wait_for_writers=True, trainer_status=0)
    leader_commits(store, tmp_path, "checkpoint-5", HF_LEADER)
    time.sleep(0.3)
    assert thread.is_alive()
    assert leader.run(once=True).committed == []  # its checkpoint-5 was committed above; it stops, and says so
    thread.join(5)
    assert not thread.is_alive(), out.getvalue()
    assert sidecar.result.committed == ["checkpoint-5"]


def test_node_1_never_vouches_for_a_leader_commit_made_before_it_started_watching(store, tmp_path):
    """Its files of that checkpoint may have been lost with an earlier container: absence proves nothing."""
    leader_commits(store, tmp_path, "checkpoint-5", HF_LEADER)
    sidecar, out = node(store, tmp_path / "node-1", nothing_here_seconds=0, grace_seconds=0.3)
    thread = in_thread(sidecar)
    sidecar.finish(None, wait_for_writers=True, trainer_status=0)
    thread.join(10)
    assert not store.exists(layout.nothing_key(JOB, "checkpoint-5", 1)), out.getvalue()
    assert latest_for(store, 1) is None


def test_keep_last_on_node_1_counts_complete_checkpoints_and_deletes_every_nodes_data(store, tmp_path):
    ckpts = tmp_path / "node-1"
    for step in (5, 10, 15):
        leader_commits(store, tmp_path, f"checkpoint-{step}", HF_LEADER)
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        (ckpts / f"checkpoint-{step}" / "rng_state_1.pth").write_bytes(b"r1")
    sidecar, out = node(store, ckpts, keep_last=1, quiet_seconds=0)
    assert sidecar.run(once=True).committed == ["checkpoint-5", "checkpoint-10", "checkpoint-15"]
    assert [c.name for c in list_job_checkpoints(store, JOB).checkpoints] == ["checkpoint-15"], out.getvalue()


def test_keep_last_on_node_1_runs_after_a_nothing_here_record_that_completes_a_checkpoint(store, tmp_path):
    sidecar, out = node(store, tmp_path / "node-1", keep_last=1)
    for step in (5, 10):
        leader_commits(store, tmp_path, f"ckpt-{step}.pt", {f"ckpt-{step}.pt": b"PK..."})
    thread = in_thread(sidecar)
    sidecar.finish(None, wait_for_writers=True, trainer_status=0)  # its trainer is gone: records at once
    leader_mark(store, CheckpointId("proj", JOB, "", 0, 2), stopped=True)
    thread.join(10)
    assert sidecar.result.nothing_here == ["ckpt-5.pt", "ckpt-10.pt"], out.getvalue()
    assert [c.name for c in list_job_checkpoints(store, JOB).checkpoints] == ["ckpt-10.pt"], out.getvalue()


def test_a_node_count_other_than_the_jobs_record_is_refused_before_anything_starts(store, tmp_path):
    leader_commits(store, tmp_path, "checkpoint-5", HF_LEADER)
    opts = SyncOptions(tmp_path / "node-1")
    sidecar = Sidecar(store, CheckpointId("proj", JOB, "", 1, 3), opts, 2, Reporter(io.StringIO()))
    with pytest.raises(ConfigError, match="^BT_GROUP_SIZE=3: job job-1 is recorded as a job of 2 node"):
        sidecar.check_job()


def test_sync_on_node_1_starts_with_the_platforms_variables_and_refuses_counts_that_disagree(local_store, tmp_path):
    env = sync_env(local_store, tmp_path / "ckpts", BT_NODE_RANK="1", BT_GROUP_SIZE="2")
    result = run_agent(["sync", "--once"], env)
    assert result.returncode == 0, result.stderr
    assert "rank 1 of 2" in result.stderr
    result = run_agent(["sync", "--once"], {**env, "BT_NUM_NODES": "1"})
    assert_one_line_failure(result, 2, "BT_GROUP_SIZE=2 and BT_NUM_NODES=1 disagree")
    result = run_agent(["sync", "--once"], {**env, "BT_GROUP_SIZE": "1"})
    assert_one_line_failure(result, 2, "BT_NODE_RANK=1", "BT_GROUP_SIZE=1")


def test_the_nothing_here_grace_is_read_from_its_variable():
    assert sync_options({"CKPT_AGENT_NOTHING_HERE_SECONDS": "7"}, "/x").nothing_here_seconds == 7
    with pytest.raises(ConfigError, match="^CKPT_AGENT_NOTHING_HERE_SECONDS: "):
        sync_options({"CKPT_AGENT_NOTHING_HERE_SECONDS": "soon"}, "/x")
