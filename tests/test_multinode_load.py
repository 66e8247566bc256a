"""Loading a 2-node checkpoint on each node (issue 17): every node's files merged into the node's own
`rank-<r>/<name>/`, the node's own copy of a disputed path, `CKPT_AGENT_LOAD_RANKS=own`, a 1-node job
resharding, colliding paths refused, where each node's files came from, and a killed load resumed.

Both nodes' checkpoints are committed to the suite's SeaweedFS by `ckpt-agent save` with
`BT_NODE_RANK=0/1` (the kill test commits through the save API, for small parts), then loaded by
the installed `ckpt-agent`; byte counts come from the fault proxy, not from the agent.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.seaweed import SeaweedServer
from ckpt_agent.disk.safefs import INCOMPLETE_SUFFIX
from ckpt_agent.report import utc_now
from ckpt_agent.stores import layout
from ckpt_agent.stores.manifest import nothing_here_record
from ckpt_agent.stores.s3boto import Boto3Store
from ckpt_agent.upload.commit import CheckpointId
from tests.support.faultproxy import FaultProxy
from tests.support.helpers import (
    agent_env,
    assert_one_line_failure,
    clean_env,
    commit_files,
    load_record,
    on_disk,
    payload,
    put_object,
    run_agent,
    save,
    start_agent,
    wait_for,
)
from tests.support.specs import latest

pytestmark = pytest.mark.seaweed

MIB = 1 << 20
JOB, NAME = "job-2n", "step-20"
LEADER = {"model.safetensors": payload(MIB + 5, "weights"), "trainer_state.json": b'{"global_step": 20}',
          "rng_state_0.pth": payload(300, "rng0"), "config.json": b'{"nodes": 2}'}
NODE1 = {"rng_state_1.pth": payload(300, "rng1"), "config.json": b'{"nodes": 2}'}
SOURCES = ("store", "checkpoint_dir", "ranks", "cache", "reused")


@dataclass
class Nodes:
    """One store, two nodes' checkpoint folders, and each node's agent environment."""

    server: SeaweedServer
    prefix: str
    tmp: Path

    def env(self, rank: int, dl: Path, proxy: FaultProxy | None = None, **extra: str) -> dict[str, str]:
        return agent_env(self.server, self.prefix, dl, endpoint=proxy.endpoint if proxy else None,
                         refs=(latest(job_id=JOB),), BT_NODE_RANK=str(rank),
                         BT_CHECKPOINT_DIR=str(self.tmp / f"node-{rank}" / "ckpts"), **extra)

    def save(self, rank: int, files: dict[str, bytes], name: str = NAME) -> None:
        """`ckpt-agent save` of node `rank`'s folder as its share of a 2-node job's checkpoint."""
        folder = self.tmp / f"node-{rank}" / "ckpts" / name
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        env = clean_env(**self.server.env(), BT_CHECKPOINT_STORE=f"s3://{self.server.bucket}/{self.prefix}",
                        BT_NODE_RANK=str(rank))
        save(env, folder, JOB, name, "proj", "--num-nodes", "2")

    def load(self, rank: int, dl: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return run_agent(["load", *args], self.env(rank, dl, **extra))


@pytest.fixture
def nodes(s3_env: SeaweedServer, s3_prefix: str, tmp_path: Path) -> Nodes:
    return Nodes(s3_env, s3_prefix, tmp_path)


def latest_local(dl: Path, rank: int) -> str:
    """ckpt_agent.latest_local_checkpoint() as the trainer on node `rank` calls it."""
    code = "import ckpt_agent; print(ckpt_agent.latest_local_checkpoint())"
    env = clean_env(BT_LOAD_CHECKPOINT_DIR=str(dl), BT_NODE_RANK=str(rank))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def warnings_about_conflicts(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "different bytes on different nodes" in line]


def test_each_node_loads_every_nodes_files_into_its_own_rank_folder(nodes):
    nodes.save(0, LEADER)
    nodes.save(1, NODE1)
    for rank in (0, 1):
        dl = nodes.tmp / f"node-{rank}" / "dl"
        result = nodes.load(rank, dl)
        assert result.returncode == 0, result.stderr
        assert "(ranks 0, 1 in one folder): 5 files" in result.stderr
        assert not warnings_about_conflicts(result.stderr)  # config.json: the same bytes on both
        assert on_disk(dl / f"rank-{rank}" / NAME) == {**LEADER, **NODE1}
        assert latest_local(dl, rank) == str(dl / f"rank-{rank}" / NAME)
        verified = run_agent(["verify", str(dl)], clean_env())
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert len(verified.stdout.splitlines()) == 5


def test_a_path_whose_bytes_differ_between_nodes_is_the_nodes_own_copy_with_one_warning(nodes):
    mine = {**NODE1, "config.json": b'{"nodes": 2, "written_by": 1}', "notes.txt": b"node 1"}
    nodes.save(0, {**LEADER, "notes.txt": b"node 0"})
    nodes.save(1, mine)
    for rank, own in ((0, {**LEADER, "notes.txt": b"node 0"}), (1, mine)):
        dl = nodes.tmp / f"node-{rank}" / "dl"
        result = nodes.load(rank, dl)
        assert result.returncode == 0, result.stderr
        (warning,) = warnings_about_conflicts(result.stderr)
        assert "2 paths" in warning and "config.json" in warning and "notes.txt" in warning
        placed = on_disk(dl / f"rank-{rank}" / NAME)
        assert placed["config.json"] == own["config.json"] and placed["notes.txt"] == own["notes.txt"]
        assert set(placed) == set(LEADER) | set(mine) | {"notes.txt"}
        conflicts = load_record(dl, rank)["checkpoints"][0]["conflicts"]
        assert conflicts == [{"path": "config.json", "kept": rank, "others": [1 - rank]},
                             {"path": "notes.txt", "kept": rank, "others": [1 - rank]}]
        assert run_agent(["verify", str(dl)], clean_env()).returncode == 0


def test_load_ranks_own_gives_each_node_only_its_own_files(nodes):
    nodes.save(0, LEADER)
    nodes.save(1, NODE1)
    for rank, files in ((0, LEADER), (1, NODE1)):
        dl = nodes.tmp / f"node-{rank}" / "dl"
        result = nodes.load(rank, dl, CKPT_AGENT_LOAD_RANKS="own", BT_GROUP_SIZE="2")
        assert result.returncode == 0, result.stderr
        assert f"(rank {rank}): {len(files)} files" in result.stderr
        assert on_disk(dl / f"rank-{rank}" / NAME) == files
        assert "nodes" not in json.dumps(load_record(dl, rank)["checkpoints"][0]) or \
            load_record(dl, rank)["checkpoints"][0]["nodes"] == []
        assert run_agent(["verify", str(dl)], clean_env()).returncode == 0
    bad = nodes.load(1, nodes.tmp / "dl-bad", CKPT_AGENT_LOAD_RANKS="mine")
    assert_one_line_failure(bad, 2, "CKPT_AGENT_LOAD_RANKS", "'mine'")


def test_loading_own_after_a_merged_load_leaves_only_this_nodes_files_and_manifest(nodes):
    nodes.save(0, LEADER)
    nodes.save(1, NODE1)
    dl = nodes.tmp / "node-1" / "dl"
    assert nodes.load(1, dl).returncode == 0
    manifests = dl / ".ckpt-agent" / "manifests" / "rank-1"
    assert sorted(p.name for p in (manifests / f"{NAME}.nodes").iterdir()) == ["rank-0.json", "rank-1.json"]
    own = nodes.load(1, dl, CKPT_AGENT_LOAD_RANKS="own", BT_GROUP_SIZE="2")
    assert own.returncode == 0, own.stderr
    assert "removed 3 entries" in own.stderr and "that its manifest does not list" in own.stderr
    assert on_disk(dl / "rank-1" / NAME) == NODE1
    assert sorted(p.name for p in manifests.iterdir()) == [f"{NAME}.json"]
    assert run_agent(["verify", str(dl)], clean_env()).returncode == 0


@pytest.mark.parametrize("load_ranks", ["", "own"])
def test_a_one_node_job_gets_every_nodes_files_to_reshard(nodes, load_ranks):
    nodes.save(0, LEADER)
    nodes.save(1, NODE1)
    dl = nodes.tmp / "one-node" / "dl"
    result = nodes.load(0, dl, CKPT_AGENT_LOAD_RANKS=load_ranks)  # no BT_GROUP_SIZE: a 1-node job
    assert result.returncode == 0, result.stderr
    assert on_disk(dl / "rank-0" / NAME) == {**LEADER, **NODE1}


def test_a_single_file_only_the_leader_saved_is_what_latest_local_checkpoint_gives_node_1(nodes):
    """torch.save under `if rank == 0`: node 1 records that it has nothing of ckpt-5.pt; its load
    places the leader's file, and the trainer on node 1 gets the file, not the folder."""
    weights = payload(5000, "leader-only")
    src = nodes.tmp / "node-0" / "ckpts"
    src.mkdir(parents=True)
    (src / "ckpt-5.pt").write_bytes(weights)
    env = clean_env(**nodes.server.env(), BT_CHECKPOINT_STORE=f"s3://{nodes.server.bucket}/{nodes.prefix}",
                    BT_NODE_RANK="0")
    save(env, src / "ckpt-5.pt", JOB, "ckpt-5.pt", "proj", "--num-nodes", "2")
    put_object(nodes.server, nodes.prefix, layout.nothing_key(JOB, "ckpt-5.pt", 1),
               nothing_here_record(JOB, "ckpt-5.pt", 1, utc_now()).encode())
    dl = nodes.tmp / "node-1" / "dl"
    result = nodes.load(1, dl)
    assert result.returncode == 0, result.stderr
    assert on_disk(dl / "rank-1" / "ckpt-5.pt") == {"ckpt-5.pt": weights}
    assert latest_local(dl, 1) == str(dl / "rank-1" / "ckpt-5.pt" / "ckpt-5.pt")
    nodes_record = {n["rank"]: (n["files"], n["bytes"]) for n in load_record(dl, 1)["checkpoints"][0]["nodes"]}
    assert nodes_record == {0: (1, len(weights)), 1: (0, 0)}
    assert run_agent(["verify", str(dl)], clean_env()).returncode == 0


def test_two_nodes_paths_that_collide_after_casefold_are_refused_and_training_never_starts(nodes):
    nodes.save(0, {"Model.bin": b"leader"})
    nodes.save(1, {"model.bin": b"node 1"})
    dl, marker = nodes.tmp / "dl", nodes.tmp / "trained"
    result = run_agent(["run", "--", "touch", str(marker)], nodes.env(1, dl))
    assert_one_line_failure(result, 5, "'model.bin' and 'Model.bin'", "case-insensitive", "ranks 0, 1")
    assert not marker.exists() and not dl.exists()


def test_dry_run_and_the_record_say_which_nodes_files_came_from_where(nodes):
    nodes.save(0, LEADER)
    nodes.save(1, NODE1)
    dl = nodes.tmp / "shared-dl"  # both nodes' agents on one machine, one download folder
    dry = nodes.load(1, dl, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "checkpoint step-20 (ranks 0, 1 in one folder)" in dry.stdout
    leader_only = {k: v for k, v in LEADER.items() if k != "config.json"}  # node 1 places its own config.json
    assert "from rank 0:  3 files, " in dry.stdout and "from rank 1:  2 files, " in dry.stdout
    events = [json.loads(line) for line in nodes.load(1, dl, "--dry-run", BT_LOG_FORMAT="json").stderr.splitlines()]
    (planned,) = [e["fields"]["checkpoints"][0] for e in events if e["event"] == "dry_run"]
    assert [(n["rank"], n["files"], n["files_to_fetch"]) for n in planned["nodes"]] == [(0, 3, 3), (1, 2, 2)]
    assert planned["conflicts"] == []
    assert not dl.exists()

    assert nodes.load(0, dl).returncode == 0
    second = nodes.load(1, dl)
    assert second.returncode == 0, second.stderr
    entry = load_record(dl, 1)["checkpoints"][0]
    assert entry["manifest"] == "manifests/rank-1/step-20.nodes/rank-1.json"
    by_rank = {n["rank"]: n for n in entry["nodes"]}
    assert (by_rank[0]["files"], by_rank[0]["bytes"]) == (3, sum(map(len, leader_only.values())))
    assert (by_rank[1]["files"], by_rank[1]["bytes"]) == (2, sum(map(len, NODE1.values())))
    # nothing from the store: the leader's files from rank 0's merged folder, node 1's own from the
    # BT_CHECKPOINT_DIR its trainer saved them in
    assert by_rank[0]["bytes_from"] == {**dict.fromkeys(SOURCES, 0), "ranks": by_rank[0]["bytes"]}
    assert by_rank[1]["bytes_from"] == {**dict.fromkeys(SOURCES, 0), "checkpoint_dir": by_rank[1]["bytes"]}
    assert (dl / ".ckpt-agent" / "manifests" / "rank-1" / "step-20.nodes" / "rank-0.json").is_file()

    again = nodes.load(1, dl, "--dry-run")
    assert "from rank 0:  3 files" in again.stdout and "3 intact, 0 to download" in again.stdout


def test_a_second_job_on_node_1_takes_the_leaders_weights_from_the_nodes_cache(nodes, proxy):
    nodes.save(0, LEADER)
    nodes.save(1, NODE1)
    cache = nodes.tmp / "node-1" / "cache"
    first = run_agent(["load"], nodes.env(1, nodes.tmp / "job-a-dl", proxy, CKPT_AGENT_CACHE_DIR=str(cache)))
    assert first.returncode == 0, first.stderr
    proxy.reset_stats()
    second = run_agent(["load"], nodes.env(1, nodes.tmp / "job-b-dl", proxy, CKPT_AGENT_CACHE_DIR=str(cache)))
    assert second.returncode == 0, second.stderr
    assert sum(e.body_bytes for e in proxy.exchanges if e.method == "GET" and e.range is not None) == 0
    leader = {n["rank"]: n for n in load_record(nodes.tmp / "job-b-dl", 1)["checkpoints"][0]["nodes"]}[0]
    assert leader["bytes_from"]["cache"] == leader["bytes"] > MIB
    assert on_disk(nodes.tmp / "job-b-dl" / "rank-1" / NAME) == {**LEADER, **NODE1}


PART = 256 << 10
BIG0, BIG1 = payload(2 * MIB, "shard-0"), payload(2 * MIB, "shard-1")


def test_a_merged_load_killed_mid_download_fetches_only_what_is_missing(nodes, proxy):
    store = Boto3Store(nodes.server.bucket, nodes.prefix)
    try:
        for rank, files in ((0, {"__0_0.distcp": BIG0, ".metadata": b"meta"}), (1, {"__1_0.distcp": BIG1})):
            commit_files(store, nodes.tmp / f"src-{rank}", files, CheckpointId("proj", JOB, NAME, rank, 2),
                         part_size=PART)
    finally:
        store.close()
    proxy.add_rule("stall", method="GET", path="rank-1/__1_0.distcp", offset=MIB + 100, seconds=30)
    dl = nodes.tmp / "dl"
    env = nodes.env(0, dl, proxy)
    partial = dl / "rank-0" / NAME / ("__1_0.distcp" + INCOMPLETE_SUFFIX)

    def half_done() -> bool:
        try:
            return (dl / "rank-0" / NAME / "__0_0.distcp").is_file() and \
                partial.read_bytes()[: 4 * PART] == BIG1[: 4 * PART]
        except FileNotFoundError:
            return False

    first = start_agent(["load"], env)
    try:
        wait_for(lambda: first.poll() is not None or half_done(), 30, "node 1's shard half downloaded")
    finally:
        first.kill()  # SIGKILL: nothing of the agent's own clean-up runs
        _, err = first.communicate()
    assert first.returncode == -signal.SIGKILL, err
    proxy.clear()
    proxy.reset_stats()
    second = run_agent(["load"], env)
    assert second.returncode == 0, second.stderr
    assert on_disk(dl / "rank-0" / NAME) == {"__0_0.distcp": BIG0, ".metadata": b"meta", "__1_0.distcp": BIG1}
    ranged = [e for e in proxy.exchanges if e.method == "GET" and e.range is not None]
    assert [e.range for e in ranged] == [f"bytes={4 * PART}-{2 * MIB - 1}"]
    assert sum(e.body_bytes for e in ranged) == 2 * MIB - 4 * PART
    node1 = {n["rank"]: n for n in load_record(dl, 0)["checkpoints"][0]["nodes"]}[1]
    assert node1["bytes_from"]["reused"] == 4 * PART and node1["bytes_from"]["store"] == 2 * MIB - 4 * PART
