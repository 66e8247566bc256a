"""ckpt_agent.load.merge without a store: which node's copy of each path a node loads, which ranks it
asks for, and the merged paths that are refused (issue 17)."""

from __future__ import annotations

import pytest

from ckpt_agent.errors import IntegrityError
from ckpt_agent.load.merge import NodeChoice, describe_conflicts, merge
from ckpt_agent.stores.manifest import FILE_KIND, FOLDER_KIND, FileEntry, Manifest


def node(rank: int, *files: tuple[str, str], kind: str = FOLDER_KIND) -> Manifest:
    """Rank `rank`'s manifest of job-m/step-20; each file is (path, crc32c of its one part)."""
    entries = tuple(FileEntry(path, 4, (crc,)) for path, crc in files)
    return Manifest("proj", "job-m", "step-20", rank, "2026-01-01T00:00:00Z", 8, entries, kind=kind)


def chosen(manifests: tuple[Manifest, ...], own: int) -> dict[str, int]:
    """path -> the rank whose copy the merge places."""
    return {p.entry.path: p.manifest.rank for p in merge(manifests, own).files}


def test_every_nodes_files_land_in_one_folder_each_from_the_node_that_has_it():
    nodes = (node(0, ("model.safetensors", "0000000a"), ("trainer_state.json", "0000000b"),
                  ("rng_state_0.pth", "0000000c")),
             node(1, ("rng_state_1.pth", "0000000d")))
    assert chosen(nodes, 1) == {"model.safetensors": 0, "trainer_state.json": 0, "rng_state_0.pth": 0,
                                "rng_state_1.pth": 1}
    merged = merge(nodes, 1)
    assert merged.conflicts == () and describe_conflicts(merged) is None
    assert (merged.primary.rank, merged.ranks, merged.total_bytes) == (1, (0, 1), 16)


def test_a_path_with_the_same_bytes_on_two_nodes_is_placed_once_without_a_conflict():
    nodes = (node(0, ("config.json", "0000000a")), node(1, ("config.json", "0000000a")))
    assert chosen(nodes, 1) == {"config.json": 1}
    assert chosen(nodes, 0) == {"config.json": 0}
    assert merge(nodes, 1).conflicts == ()


def test_a_path_with_different_bytes_on_two_nodes_is_the_nodes_own_copy_with_one_warning():
    nodes = (node(0, ("config.json", "0000000a"), ("log.txt", "0000000c")),
             node(1, ("config.json", "0000000b"), ("log.txt", "0000000d")))
    for own in (0, 1):
        merged = merge(nodes, own)
        assert chosen(nodes, own) == {"config.json": own, "log.txt": own}
        assert [(c.path, c.kept, c.others) for c in merged.conflicts] == [
            ("config.json", own, (1 - own,)), ("log.txt", own, (1 - own,))]
        warning = describe_conflicts(merged)
        assert warning is not None and warning.count("\n") == 0
        assert "2 paths hold different bytes" in warning and "this node's own copy:" in warning


def test_a_node_that_holds_no_copy_of_a_disputed_path_gets_the_lowest_ranks():
    nodes = (node(0, ("a.bin", "0000000a")), node(1, ("a.bin", "0000000b")), node(2, ("a.bin", "0000000c")))
    merged = merge(nodes, 5)  # a node of a bigger job: none of the copies is its own
    assert chosen(nodes, 5) == {"a.bin": 0}
    assert [(c.kept, c.others) for c in merged.conflicts] == [(0, (1, 2))]
    assert "else the lowest rank's" in (describe_conflicts(merged) or "")


@pytest.mark.parametrize(("a", "b"), [("Model.bin", "model.bin"), ("caf\u00e9", "cafe\u0301"),
                                      ("weights", "weights/shard-0.bin")])
def test_two_nodes_paths_that_would_be_one_file_or_a_file_and_a_folder_are_refused(a, b):
    nodes = (node(0, (a, "0000000a")), node(1, (b, "0000000b")))
    with pytest.raises(IntegrityError, match=r"job-m/step-20 \(the files of ranks 0, 1 in one folder\)"):
        merge(nodes, 0)


def test_a_leader_only_single_file_checkpoint_stays_a_single_file_when_merged():
    merged = merge((node(0, ("ckpt-5.pt", "0000000a"), kind=FILE_KIND), node(1)), 1)
    assert merged.kind == FILE_KIND and [p.entry.path for p in merged.files] == ["ckpt-5.pt"]
    assert merge((node(0, ("a", "0000000a")), node(1)), 1).kind == FOLDER_KIND


@pytest.mark.parametrize(("choice", "saved", "rank", "ranks"), [
    (NodeChoice(), 1, 3, (0,)),                                  # a single-node checkpoint: every node loads it
    (NodeChoice(), 2, 1, (0, 1)),                                # by default every node's files
    (NodeChoice(own_only=True, job_nodes=2), 2, 1, (1,)),        # own, same shape: the literal layout
    (NodeChoice(own_only=True, job_nodes=1), 2, 0, (0, 1)),      # own on 1 node of a 2-node save: reshard
    (NodeChoice(own_only=True, job_nodes=4), 2, 3, (0, 1)),      # own on 4 nodes of a 2-node save
])
def test_the_ranks_a_node_asks_for(choice, saved, rank, ranks):
    assert tuple(choice.ranks(saved, rank)) == ranks
