"""Real training libraries resuming a 2-node job from the store (issue 17, the load side): each node
a `ckpt-agent run` in a mount namespace of its own (tests/support/multinode.py), one SeaweedFS,
torch.distributed over gloo on 127.0.0.1. A node loads every node's files of the checkpoint into
its own `rank-<r>/<name>/`, and the framework resumes from ckpt_agent.latest_local_checkpoint().
"""

from __future__ import annotations

import pytest

from tests.support.helpers import s3_store
from tests.support.multinode import committed_by_all, launch
from tests.support.specs import latest, named

pytestmark = pytest.mark.trainers

FAST = {"CKPT_AGENT_GRACE_SECONDS": "4"}  # a non-leader's final flush watches the leader this long


def weights(cluster) -> list[dict[str, str]]:
    """Each node's digest of every tensor it ended with (tests/trainers/common.py: finish)."""
    return [n.result()["weights"] for n in cluster.nodes]


def test_dcp_state_sharded_over_two_nodes_resumes_bit_exact_on_two_nodes_and_reshards_onto_one(
        s3_env, s3_prefix, tmp_path, procs):
    """The saving job's nodes each hold one shard file and the leader `.metadata`; no node's own
    files are the checkpoint. A new 2-node job gets each rank's state back bit for bit; a 1-node job
    gets the replicated model and every row of the sharded table."""
    store = s3_store(s3_env, s3_prefix)
    saving = launch(procs, tmp_path, store, "job-1", "dcp_nodes.py", "--steps", 5, "--every", 5, env=FAST)
    assert saving.wait() == [0, 0], saving.text()
    assert committed_by_all(store, "job-1", "step-5", 2), saving.text()
    saved = weights(saving)

    resumed = launch(procs, tmp_path, store, "job-2", "dcp_nodes.py", "--steps", 5, "--resume", "agent",
                     load=[latest(job_id="job-1")], env=FAST)
    assert resumed.wait() == [0, 0], resumed.text()
    assert [n.result()["step"] for n in resumed.nodes] == [5, 5]
    assert weights(resumed) == saved
    for node in resumed.nodes:
        folder = node.loaded / f"rank-{node.rank}" / "step-5"
        assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    resharded = launch(procs, tmp_path, store, "job-3", "dcp_nodes.py", "--steps", 5, "--resume", "agent",
                       load=[latest(job_id="job-1")], size=1, env=FAST)
    assert resharded.wait() == [0], resharded.text()
    (one,) = weights(resharded)
    assert {k: v for k, v in saved[0].items() if not k.startswith("table.")} == \
        {k: v for k, v in saved[1].items() if not k.startswith("table.")}  # the replicated model
    assert one == {**saved[0], **saved[1]}  # the model, and every row from the node that held it


@pytest.mark.parametrize(("script", "name", "node_1_needs"), [
    ("hf_trainer.py", "checkpoint-5", {"trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"}),
    ("deepspeed_loop.py", "global_step5", {"mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}),
], ids=["hf-trainer-ddp", "deepspeed-zero1"])
def test_a_two_node_job_resumes_from_the_merged_folders_to_the_weights_of_an_unbroken_run(
        script, name, node_1_needs, s3_env, s3_prefix, tmp_path, procs):
    """HF Trainer (DDP): the leader's checkpoint-5/ holds the weights, optimizer and
    trainer_state.json, node 1's only rng_state_1.pth. DeepSpeed ZeRO-1: node 1's global_step5/
    holds only its optimizer partition, the model states are the leader's. Node 1 resumes only
    because it loads the leader's files too."""
    store = s3_store(s3_env, s3_prefix)
    unbroken = launch(procs, tmp_path, store, "job-1", script, "--steps", 10, "--every", 5, env=FAST)
    assert unbroken.wait() == [0, 0], unbroken.text()
    assert committed_by_all(store, "job-1", name, 2), unbroken.text()

    resumed = launch(procs, tmp_path, store, "job-2", script, "--steps", 10, "--every", 5,
                     "--resume", "agent", load=[named(name, "job-1")], env=FAST)
    assert resumed.wait() == [0, 0], resumed.text()
    assert all(f"RESUMING {name}" in n.text() for n in resumed.nodes), resumed.text()
    assert node_1_needs <= {p.name for p in (resumed.nodes[1].loaded / "rank-1" / name).iterdir()}
    assert [n.result()["step"] for n in resumed.nodes] == [10, 10]
    assert weights(resumed) == weights(unbroken)
