"""Real training libraries on a simulated 2-node job (tests/support/multinode.py): each node a
`ckpt-agent run` of its own in a mount namespace of its own, one store (the suite's SeaweedFS),
torch.distributed over gloo on 127.0.0.1. Every checkpoint must be committed by both nodes: the
leader with its files, node 1 with its own files (its part of the collective save) or, where
only the leader writes, with a "nothing here" record; and `ckpt-agent ls` must show it complete.
"""

from __future__ import annotations

import signal

import pytest

from tests.support.helpers import s3_store, wait_for
from tests.support.multinode import TIMEOUT, committed_by_all, launch, listing, manifest_paths, rank_state

pytestmark = pytest.mark.trainers

@pytest.mark.parametrize(("script", "names", "leader_has", "node_1_has"), [
    ("hf_trainer.py", ("checkpoint-5", "checkpoint-10"), "trainer_state.json", ["rng_state_1.pth"]),
    ("deepspeed_loop.py", ("global_step5", "global_step10"), "mp_rank_00_model_states.pt",
     ["zero_pp_rank_1_mp_rank_00_optim_states.pt"]),
    ("torch_save_loop.py", ("ckpt-5.pt", "ckpt-10.pt"), "{name}", None),
], ids=["hf-trainer-ddp", "deepspeed-zero1", "torch-save-on-the-leader-only"])
def test_every_checkpoint_of_a_two_node_job_is_committed_by_both_nodes(script, names, leader_has, node_1_has,
                                                                       s3_env, s3_prefix, tmp_path, procs):
    """HF Trainer (DDP): node 1's checkpoint-N/ holds only rng_state_1.pth, completed by the leader's
    trainer_state.json. DeepSpeed ZeRO-1: node 1's tag folder holds its optimizer partition, the
    leader's `latest` names it. torch.save under `if rank == 0`: node 1 has nothing, and says so."""
    store = s3_store(s3_env, s3_prefix)
    cluster = launch(procs, tmp_path, store, "job-1", script, "--steps", 10, "--every", 5)
    assert cluster.wait() == [0, 0], cluster.text()
    rows = listing(store, "job-1")
    assert {n: rows[n]["state"] for n in names} == dict.fromkeys(names, "committed"), cluster.text()
    for name in names:
        assert leader_has.format(name=name) in manifest_paths(store, "job-1", name, 0)
        if node_1_has is None:
            assert rank_state(store, "job-1", name, 1) == "nothing"
            assert f"node 1 has nothing of {name}" in cluster.nodes[1].text()
        else:
            assert manifest_paths(store, "job-1", name, 1) == node_1_has, cluster.text()


def test_dcp_sharded_across_two_nodes_commits_every_save_on_both_nodes_including_the_one_at_sigterm(
        s3_env, s3_prefix, tmp_path, procs):
    """Each node writes its own shard file; .metadata is the leader's. SIGTERM reaches both trainers
    while they hold at step 7: they save step-7 together, and both nodes' flushes commit it."""
    store = s3_store(s3_env, s3_prefix)
    cluster = launch(procs, tmp_path, store, "job-1", "dcp_nodes.py", "--steps", 20, "--every", 5,
                     "--hold-at", 7)
    holding = lambda: all("HOLDING 7" in n.text() for n in cluster.nodes)  # noqa: E731
    wait_for(lambda: committed_by_all(store, "job-1", "step-5", 2) and holding(), TIMEOUT,
             "step-5 committed by both nodes and both holding at step 7")
    cluster.signal(signal.SIGTERM)
    assert cluster.wait() == [143, 143], cluster.text()
    rows = listing(store, "job-1")
    assert {n: (r["ranks_committed"], r["state"]) for n, r in rows.items()} == {
        "step-5": ([0, 1], "committed"), "step-7": ([0, 1], "committed")}, cluster.text()
    for name in ("step-5", "step-7"):
        assert manifest_paths(store, "job-1", name, 0) == [".metadata", "__0_0.distcp"]
        assert manifest_paths(store, "job-1", name, 1) == ["__1_0.distcp"]
