"""References -> manifests against a LocalStore filled the way `ckpt-agent save` fills it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckpt_agent.config.spec import LatestRef, NamedRef
from ckpt_agent.errors import ConfigError, IntegrityError, NotFoundError
from ckpt_agent.load.resolve import resolve
from ckpt_agent.stores import layout
from ckpt_agent.stores.catalog import list_checkpoints, project_jobs, read_job
from ckpt_agent.stores.local import LocalStore
from ckpt_agent.stores.manifest import FileEntry, JobRecord, Manifest
from ckpt_agent.upload.commit import CheckpointId, ensure_job
from tests.support.helpers import commit_files

PART = 8


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(str(tmp_path / "store"))


@pytest.fixture
def save(store: LocalStore, tmp_path: Path):
    """Commit a tiny checkpoint folder the real way; returns the manifest written."""
    counter = iter(range(1_000_000))

    def _save(job_id: str, name: str, project: str | None = "proj", rank: int = 0, num_nodes: int = 1,
              files: dict[str, bytes] | None = None) -> Manifest:
        files = files or {"model.bin": f"{job_id}/{name}/{rank}".encode() * 3, "sub/config.json": b"{}"}
        return commit_files(store, tmp_path / f"src-{next(counter)}", files,
                            CheckpointId(project, job_id, name, rank, num_nodes), part_size=PART, workers=2)

    return _save


def add_job(store: LocalStore, job_id: str, project: str | None, created_at: str, num_nodes: int = 1) -> None:
    """A job record (and project index entry) with a controlled created_at; commits keep it."""
    record = JobRecord(job_id, project, created_at, num_nodes)
    store.write_bytes(layout.job_record_key(job_id), record.to_json().encode())
    if project:
        entry = json.dumps({"job_id": job_id, "created_at": created_at})
        store.write_bytes(layout.project_job_key(project, job_id), entry.encode())


def write_manifest(store: LocalStore, job_id: str, name: str, committed_at: str, rank: int = 0,
                   project: str | None = "proj") -> Manifest:
    """A commit with a chosen committed_at, written where the layout says."""
    manifest = Manifest(project, job_id, name, rank, committed_at, PART, (FileEntry("f", 0, ("00000000",)),))
    store.write_bytes(layout.manifest_key(job_id, name, rank), manifest.to_json().encode())
    return manifest


def names(resolution) -> list[tuple[str, str]]:
    return [(r.manifest.job_id, r.manifest.checkpoint_name) for r in resolution.checkpoints]


def one(store, ref, rank=0, project=None, required=False) -> Manifest:
    resolution = resolve(store, (ref,), rank, project, required)
    assert resolution.warnings == ()
    assert len(resolution.checkpoints) == 1
    return resolution.checkpoints[0].manifest


# --- what save writes ---------------------------------------------------------------------------


def test_commit_writes_job_record_project_index_and_manifest(store, save):
    manifest = save("job-a", "checkpoint-1")
    job = read_job(store, "job-a")
    assert (job.job_id, job.project_name, job.num_nodes) == ("job-a", "proj", 1)
    assert project_jobs(store, "proj") == [(job.created_at, "job-a")]
    assert store.exists(layout.manifest_key("job-a", "checkpoint-1", 0))
    assert sorted(f.path for f in manifest.files) == ["model.bin", "sub/config.json"]


def test_commit_into_a_job_of_another_project_is_refused(store, save):
    save("job-a", "checkpoint-1", project="proj")
    with pytest.raises(ConfigError, match="already belongs to project proj"):
        ensure_job(store, CheckpointId("other", "job-a", "checkpoint-2"))


# --- latest -------------------------------------------------------------------------------------


def test_latest_by_job_is_the_most_recently_committed_checkpoint(store, save):
    save("job-a", "checkpoint-1")
    save("job-a", "checkpoint-2")
    save("job-b", "checkpoint-9")
    assert one(store, LatestRef(job_id="job-a")).checkpoint_name == "checkpoint-2"


def test_latest_by_project_skips_a_newer_job_without_checkpoints(store, save):
    add_job(store, "job-old", "proj", "2024-01-01T00:00:00.000000Z")
    add_job(store, "job-mid", "proj", "2024-02-01T00:00:00.000000Z")
    add_job(store, "job-new", "proj", "2024-03-01T00:00:00.000000Z")
    save("job-old", "checkpoint-5")
    save("job-mid", "checkpoint-3")
    found = one(store, LatestRef(project_name="proj"))
    assert (found.job_id, found.checkpoint_name) == ("job-mid", "checkpoint-3")


def test_latest_by_project_orders_jobs_by_created_at_not_by_commit_time(store, save):
    add_job(store, "job-new", "proj", "2024-03-01T00:00:00.000000Z")
    add_job(store, "job-old", "proj", "2024-01-01T00:00:00.000000Z")
    save("job-new", "checkpoint-1")
    save("job-old", "checkpoint-7")  # committed later, but its job is older
    assert one(store, LatestRef(project_name="proj")).job_id == "job-new"


def test_latest_by_project_follows_jobs_created_by_save(store, save):
    save("job-a", "checkpoint-1")
    ensure_job(store, CheckpointId("proj", "job-b", "unused"))
    assert one(store, LatestRef(project_name="proj")).job_id == "job-a"
    save("job-c", "checkpoint-1")
    assert one(store, LatestRef(project_name="proj")).job_id == "job-c"


def test_latest_by_project_skips_a_newer_job_whose_checkpoints_are_all_uncommitted(store, save):
    add_job(store, "job-old", "proj", "2024-01-01T00:00:00.000000Z")
    add_job(store, "job-new", "proj", "2024-02-01T00:00:00.000000Z")
    save("job-old", "checkpoint-1")
    save("job-new", "checkpoint-1")
    store.delete(layout.manifest_key("job-new", "checkpoint-1", 0))
    assert one(store, LatestRef(project_name="proj")).job_id == "job-old"


def test_latest_by_project_ignores_jobs_of_other_projects(store, save):
    save("job-a", "checkpoint-1", project="proj")
    save("job-b", "checkpoint-2", project="other")
    assert one(store, LatestRef(project_name="proj")).job_id == "job-a"
    assert one(store, LatestRef(project_name="other")).job_id == "job-b"


def test_latest_with_neither_field_uses_the_project_argument(store, save):
    save("job-a", "checkpoint-1", project="proj")
    save("job-b", "checkpoint-2", project="other")
    assert one(store, LatestRef(), project="proj").job_id == "job-a"
    assert one(store, LatestRef(), project="other").job_id == "job-b"


def test_latest_project_name_in_the_reference_wins_over_the_project_argument(store, save):
    save("job-a", "checkpoint-1", project="proj")
    save("job-b", "checkpoint-2", project="other")
    assert one(store, LatestRef(project_name="other"), project="proj").job_id == "job-b"


def test_latest_with_neither_field_and_no_project_is_a_config_error(store, save):
    save("job-a", "checkpoint-1")
    with pytest.raises(ConfigError, match="BT_TRAINING_PROJECT_NAME"):
        resolve(store, (LatestRef(),), 0, None)


def test_latest_with_project_and_job_resolves_the_job(store, save):
    save("job-a", "checkpoint-1", project="proj")
    save("job-b", "checkpoint-2", project="proj")
    found = one(store, LatestRef(project_name="proj", job_id="job-a"))
    assert (found.job_id, found.checkpoint_name) == ("job-a", "checkpoint-1")


def test_latest_with_a_job_of_another_project_is_not_found(store, save):
    save("job-a", "checkpoint-1", project="other")
    with pytest.raises(NotFoundError) as info:
        resolve(store, (LatestRef(project_name="proj", job_id="job-a"),), 0, None)
    message = str(info.value)
    assert "job-a" in message
    assert "'other'" in message and "'proj'" in message


def test_latest_ignores_a_checkpoint_whose_manifest_is_missing(store, save):
    save("job-a", "checkpoint-1")
    save("job-a", "checkpoint-2")
    store.delete(layout.manifest_key("job-a", "checkpoint-2", 0))
    assert store.list_recursive(layout.rank_prefix("job-a", "checkpoint-2", 0))  # its files are still there
    assert one(store, LatestRef(job_id="job-a")).checkpoint_name == "checkpoint-1"


def test_latest_multi_node_checkpoint_counts_only_once_every_rank_committed(store, save):
    for rank in (0, 1):
        save("job-m", "checkpoint-1", rank=rank, num_nodes=2)
    save("job-m", "checkpoint-2", rank=0, num_nodes=2)
    assert one(store, LatestRef(job_id="job-m")).checkpoint_name == "checkpoint-1"
    save("job-m", "checkpoint-2", rank=1, num_nodes=2)
    assert one(store, LatestRef(job_id="job-m")).checkpoint_name == "checkpoint-2"


def test_latest_multi_node_checkpoint_with_only_rank_zero_is_not_found(store, save):
    save("job-m", "checkpoint-1", rank=0, num_nodes=2)
    resolution = resolve(store, (LatestRef(job_id="job-m"),), 0, None)
    assert resolution.checkpoints == ()
    assert resolution.warnings


def test_latest_multi_node_gives_each_rank_its_own_manifest(store, save):
    for rank in (0, 1):
        save("job-m", "checkpoint-1", rank=rank, num_nodes=2,
             files={f"rank{rank}.bin": bytes([rank]) * 10})
    for rank in (0, 1):
        manifest = one(store, LatestRef(job_id="job-m"), rank=rank)
        assert manifest.rank == rank
        assert [f.path for f in manifest.files] == [f"rank{rank}.bin"]


def test_single_node_checkpoint_is_what_every_rank_loads(store, save):
    save("job-a", "checkpoint-1")
    assert one(store, LatestRef(job_id="job-a"), rank=3).rank == 0
    assert one(store, NamedRef("checkpoint-1", "job-a"), rank=3).rank == 0


def test_latest_orders_by_committed_at_before_name(store):
    add_job(store, "job-a", "proj", "2024-01-01T00:00:00.000000Z")
    write_manifest(store, "job-a", "checkpoint-100", "2024-01-01T01:00:00.000000Z")
    write_manifest(store, "job-a", "checkpoint-20", "2024-01-01T02:00:00.000000Z")
    write_manifest(store, "job-a", "aaa", "2024-01-01T00:30:00.000000Z")
    assert one(store, LatestRef(job_id="job-a")).checkpoint_name == "checkpoint-20"


def test_latest_breaks_committed_at_ties_by_natural_order_of_names(store):
    add_job(store, "job-a", "proj", "2024-01-01T00:00:00.000000Z")
    same = "2024-01-01T01:00:00.000000Z"
    for name in ("checkpoint-9", "checkpoint-100", "checkpoint-20"):
        write_manifest(store, "job-a", name, same)
    assert one(store, LatestRef(job_id="job-a")).checkpoint_name == "checkpoint-100"
    listed = [c.name for c in list_checkpoints(store, "job-a", 1)]
    assert listed == ["checkpoint-100", "checkpoint-20", "checkpoint-9"]


def test_latest_copes_with_a_checkpoint_name_containing_a_superscript_digit(store, save):
    save("job-a", "step1\u00b2")
    assert one(store, LatestRef(job_id="job-a")).checkpoint_name == "step1\u00b2"


def test_latest_multi_node_orders_by_rank_zero_committed_at(store):
    add_job(store, "job-m", "proj", "2024-01-01T00:00:00.000000Z", num_nodes=2)
    write_manifest(store, "job-m", "checkpoint-1", "2024-01-01T05:00:00.000000Z", rank=0)
    write_manifest(store, "job-m", "checkpoint-1", "2024-01-01T05:00:01.000000Z", rank=1)
    write_manifest(store, "job-m", "checkpoint-2", "2024-01-01T01:00:00.000000Z", rank=0)
    write_manifest(store, "job-m", "checkpoint-2", "2024-01-01T09:00:00.000000Z", rank=1)
    assert one(store, LatestRef(job_id="job-m")).checkpoint_name == "checkpoint-1"


def test_latest_manifest_that_names_another_location_is_an_integrity_error(store):
    add_job(store, "job-a", "proj", "2024-01-01T00:00:00.000000Z")
    manifest = Manifest("proj", "job-x", "checkpoint-1", 0, "2024-01-01T01:00:00.000000Z", PART, ())
    store.write_bytes(layout.manifest_key("job-a", "checkpoint-1", 0), manifest.to_json().encode())
    with pytest.raises(IntegrityError, match="not its own location"):
        resolve(store, (LatestRef(job_id="job-a"),), 0, None)


# --- latest finding nothing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref, project",
    [
        (LatestRef(project_name="empty-project"), None),
        (LatestRef(), "empty-project"),
        (LatestRef(job_id="no-such-job"), None),
    ],
)
def test_latest_finding_nothing_warns_and_loads_no_checkpoint(store, ref, project):
    resolution = resolve(store, (ref,), 0, project)
    assert resolution.checkpoints == ()
    assert len(resolution.warnings) == 1
    assert ref.describe() in resolution.warnings[0]
    assert "WITHOUT a checkpoint" in resolution.warnings[0]


def test_latest_in_a_job_with_no_checkpoints_warns(store):
    ensure_job(store, CheckpointId("proj", "job-a", "unused"))
    resolution = resolve(store, (LatestRef(job_id="job-a"),), 0, None)
    assert resolution.checkpoints == ()
    assert "job job-a has no complete checkpoint" in resolution.warnings[0]


@pytest.mark.parametrize("ref", [LatestRef(project_name="empty-project"), LatestRef(job_id="no-such-job")])
def test_latest_finding_nothing_is_not_found_when_required(store, ref):
    with pytest.raises(NotFoundError, match="BT_LOAD_CHECKPOINT_REQUIRED"):
        resolve(store, (ref,), 0, None, required=True)


def test_latest_finding_nothing_does_not_drop_the_other_references(store, save):
    save("job-a", "checkpoint-1")
    resolution = resolve(store, (LatestRef(project_name="empty"), NamedRef("checkpoint-1", "job-a")), 0, None)
    assert names(resolution) == [("job-a", "checkpoint-1")]
    assert len(resolution.warnings) == 1


# --- named --------------------------------------------------------------------------------------


def test_named_checkpoint_is_found(store, save):
    save("job-a", "checkpoint-1")
    written = save("job-a", "checkpoint-2")
    resolution = resolve(store, (NamedRef("checkpoint-1", "job-a"),), 0, None)
    assert names(resolution) == [("job-a", "checkpoint-1")]
    assert resolution.checkpoints[0].reason == "named"
    assert one(store, NamedRef("checkpoint-2", "job-a")) == written


def test_named_checkpoint_that_is_not_the_latest_is_still_found(store, save):
    save("job-a", "checkpoint-1")
    save("job-a", "checkpoint-2")
    assert one(store, NamedRef("checkpoint-1", "job-a")).checkpoint_name == "checkpoint-1"


def test_named_checkpoint_missing_is_not_found_naming_it(store, save):
    save("job-a", "checkpoint-1")
    with pytest.raises(NotFoundError) as info:
        resolve(store, (NamedRef("checkpoint-7", "job-a"),), 0, None)
    assert "checkpoint-7" in str(info.value)
    assert "job-a" in str(info.value)


def test_named_checkpoint_is_not_found_even_when_not_required(store, save):
    save("job-a", "checkpoint-1")
    with pytest.raises(NotFoundError):
        resolve(store, (NamedRef("checkpoint-7", "job-a"),), 0, None, required=False)


def test_named_checkpoint_without_manifest_is_not_found(store, save):
    save("job-a", "checkpoint-1")
    store.delete(layout.manifest_key("job-a", "checkpoint-1", 0))
    with pytest.raises(NotFoundError, match="checkpoint-1"):
        resolve(store, (NamedRef("checkpoint-1", "job-a"),), 0, None)


def test_named_checkpoint_of_a_missing_job_is_not_found_naming_the_job(store):
    with pytest.raises(NotFoundError, match="job nope is not in the store"):
        resolve(store, (NamedRef("checkpoint-1", "nope"),), 0, None)


def test_named_multi_node_checkpoint_missing_this_rank_is_not_found_and_loads_the_others_with_a_warning(
        store, save):
    save("job-m", "checkpoint-1", rank=0, num_nodes=2)
    (found,) = (r := resolve(store, (NamedRef("checkpoint-1", "job-m"),), 0, None)).checkpoints
    assert found.checkpoint.ranks == (0,)
    assert r.warnings == ("checkpoint checkpoint-1 of job job-m: 1 of its 2 nodes has not committed it (rank 1); "
                          "loading the files of the others",)
    with pytest.raises(NotFoundError, match="rank 1"):
        resolve(store, (NamedRef("checkpoint-1", "job-m"),), 1, None)


def test_a_job_record_claiming_a_huge_node_count_loads_the_committed_nodes_without_enumerating_the_rest(store, save):
    for rank in (0, 1):
        save("job-m", "checkpoint-1", rank=rank, num_nodes=2)
    add_job(store, "job-m", "proj", "2024-01-01T00:00:00.000000Z", num_nodes=10**12)
    resolution = resolve(store, (NamedRef("checkpoint-1", "job-m"),), 1, None)
    assert resolution.checkpoints[0].checkpoint.ranks == (0, 1)
    assert "999999999998 of its 1000000000000 nodes have not committed it (rank 2, 3, 4, 5, 6)" in \
        resolution.warnings[0]


# --- several references -------------------------------------------------------------------------


def test_two_references_to_the_same_checkpoint_resolve_once(store, save):
    save("job-a", "checkpoint-1", project="proj")
    refs = (LatestRef(project_name="proj"), NamedRef("checkpoint-1", "job-a"), LatestRef(job_id="job-a"))
    resolution = resolve(store, refs, 0, None)
    assert names(resolution) == [("job-a", "checkpoint-1")]
    assert resolution.checkpoints[0].reference == refs[0]


def test_two_different_checkpoints_are_both_resolved_in_order(store, save):
    save("job-a", "checkpoint-1")
    save("job-a", "checkpoint-2")
    refs = (NamedRef("checkpoint-2", "job-a"), NamedRef("checkpoint-1", "job-a"))
    assert names(resolve(store, refs, 0, None)) == [("job-a", "checkpoint-2"), ("job-a", "checkpoint-1")]


def test_same_checkpoint_name_from_two_jobs_is_a_config_error_naming_both(store, save):
    save("job-a", "checkpoint-1")
    save("job-b", "checkpoint-1")
    refs = (NamedRef("checkpoint-1", "job-a"), LatestRef(job_id="job-b"))
    with pytest.raises(ConfigError) as info:
        resolve(store, refs, 0, None)
    message = str(info.value)
    assert refs[0].describe() in message
    assert refs[1].describe() in message
    assert "job-a" in message and "job-b" in message
