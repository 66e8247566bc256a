"""Manifests: a faithful round trip, and an IntegrityError for anything that could write outside its folder."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import crc32c
import pytest

from ckpt_agent.disk.digests import format_checksum, read_checksums
from ckpt_agent.errors import IntegrityError
from ckpt_agent.stores.manifest import (
    ALGORITHM,
    FORMAT_V1,
    FileEntry,
    JobRecord,
    Manifest,
    check_relative_path,
    natural_key,
    parse_job_record,
    parse_manifest,
    part_count,
)

WHERE = "jobs/j/checkpoints/c/rank-0.manifest.json"
PART = 4


def _manifest(**overrides) -> Manifest:
    fields = dict(
        project_name="proj",
        job_id="j",
        checkpoint_name="checkpoint-20",
        rank=0,
        committed_at="2024-05-01T12:00:00.000000Z",
        part_size=PART,
        files=(
            FileEntry("model.safetensors", 9, ("00000001", "00000002", "00000003")),
            FileEntry("config/empty.json", 0, ("00000000",)),
            FileEntry("optimizer.pt", 4, ("0000000a",)),
        ),
    )
    fields.update(overrides)
    return Manifest(**fields)


def _body(files: list[dict] | None = None, **overrides) -> dict:
    body = json.loads(_manifest().to_json())
    if files is not None:
        body["files"] = files
    body.update(overrides)
    return body


def _refused(body: dict | str | bytes) -> str:
    text = body if isinstance(body, str | bytes) else json.dumps(body)
    with pytest.raises(IntegrityError) as info:
        parse_manifest(text, WHERE)
    message = str(info.value)
    assert message.startswith(WHERE)
    return message


# --- round trip ---------------------------------------------------------------------------------


def test_manifest_round_trips_through_json():
    manifest = _manifest()
    assert parse_manifest(manifest.to_json(), WHERE) == manifest


def test_manifest_round_trips_from_bytes():
    manifest = _manifest()
    assert parse_manifest(manifest.to_json().encode(), WHERE) == manifest


def test_manifest_json_has_the_v1_fields():
    body = json.loads(_manifest().to_json())
    assert body["format"] == FORMAT_V1 == 1  # no strong hashes: still written as format 1
    assert body["algorithm"] == ALGORITHM == "crc32c"
    assert body["files"][0] == {"path": "model.safetensors", "size": 9,
                                "parts": ["00000001", "00000002", "00000003"]}
    assert {"project_name", "job_id", "checkpoint_name", "rank", "committed_at", "part_size"} <= set(body)


def test_manifest_extra_keys_are_allowed_and_kept():
    body = _body(written_by="sidecar 1.2", step=20)
    manifest = parse_manifest(json.dumps(body), WHERE)
    assert manifest.extra == {"written_by": "sidecar 1.2", "step": 20}
    again = json.loads(manifest.to_json())
    assert (again["written_by"], again["step"]) == ("sidecar 1.2", 20)


def test_manifest_extra_keys_cannot_override_the_core_fields():
    manifest = _manifest(extra={"format": 99, "job_id": "other"})
    body = json.loads(manifest.to_json())
    assert (body["format"], body["job_id"]) == (1, "j")


def test_manifest_null_project_name_is_accepted():
    manifest = _manifest(project_name=None)
    assert parse_manifest(manifest.to_json(), WHERE).project_name is None


def test_manifest_with_no_files_is_accepted():
    manifest = _manifest(files=())
    assert parse_manifest(manifest.to_json(), WHERE).files == ()
    assert manifest.total_bytes == 0


def test_manifest_total_bytes_sums_file_sizes():
    assert _manifest().total_bytes == 13


def test_job_record_round_trips_through_json():
    record = JobRecord("j", "proj", "2024-05-01T12:00:00.000000Z", 2)
    assert parse_job_record(record.to_json(), "jobs/j/job.json") == record


def test_job_record_without_num_nodes_means_one_node():
    record = parse_job_record('{"job_id": "j", "project_name": null, "created_at": "t"}', "k")
    assert record.num_nodes == 1


@pytest.mark.parametrize("num_nodes", [0, -1, "2", 1.5])
def test_job_record_with_bad_num_nodes_is_refused(num_nodes):
    text = json.dumps({"job_id": "j", "created_at": "t", "num_nodes": num_nodes})
    with pytest.raises(IntegrityError, match="num_nodes"):
        parse_job_record(text, "jobs/j/job.json")


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "{", "not json", b"\xff\xfe\x00garbage"])
def test_manifest_that_is_not_json_is_refused(text):
    assert "not valid JSON" in _refused(text)


@pytest.mark.parametrize("text", ["[]", "1", '"manifest"', "null"])
def test_manifest_that_is_not_an_object_is_refused(text):
    assert "not a JSON object" in _refused(text)


@pytest.mark.parametrize("fmt", [3, 0, "1", None, True])
def test_manifest_of_unknown_format_is_refused(fmt):
    assert "unknown manifest format" in _refused(_body(format=fmt))


def test_manifest_without_format_is_refused():
    body = _body()
    del body["format"]
    assert "unknown manifest format" in _refused(body)


@pytest.mark.parametrize("algorithm", ["crc64nvme", "xxh3", "CRC32C", "md5"])
def test_manifest_with_unknown_algorithm_is_refused(algorithm):
    assert f"unknown checksum algorithm {algorithm!r}" in _refused(_body(algorithm=algorithm))


@pytest.mark.parametrize("part_size", [0, -1])
def test_manifest_with_non_positive_part_size_is_refused(part_size):
    assert "part_size" in _refused(_body(part_size=part_size))


@pytest.mark.parametrize("key", ["job_id", "checkpoint_name", "rank", "committed_at", "part_size", "files",
                                 "algorithm"])
def test_manifest_missing_a_required_field_is_refused_naming_it(key):
    body = _body()
    del body[key]
    assert repr(key) in _refused(body)


@pytest.mark.parametrize("key, value", [("rank", "0"), ("rank", True), ("part_size", 4.0), ("files", {}),
                                        ("job_id", 5)])
def test_manifest_field_of_wrong_type_is_refused_naming_it(key, value):
    assert repr(key) in _refused(_body(**{key: value}))


def _one_file(path="a.bin", size=1, parts=("00000000",)) -> list[dict]:
    return [{"path": path, "size": size, "parts": list(parts)}]


@pytest.mark.parametrize("path", ["/etc/passwd", "/a.bin"])
def test_manifest_absolute_path_is_refused(path):
    message = _refused(_body(_one_file(path)))
    assert "absolute" in message
    assert repr(path) in message


@pytest.mark.parametrize("path", ["..", "../a.bin", "a/../../b", "a/..", "x/../y"])
def test_manifest_path_with_dotdot_component_is_refused(path):
    message = _refused(_body(_one_file(path)))
    assert "'..'" in message
    assert repr(path) in message


@pytest.mark.parametrize("path", [".", "./a.bin", "a//b", "a/", "a/./b"])
def test_manifest_path_with_dot_or_empty_component_is_refused(path):
    assert repr(path) in _refused(_body(_one_file(path)))


def test_manifest_path_that_only_looks_like_dots_is_accepted():
    assert check_relative_path("..hidden/a...b/.c", "w") == "..hidden/a...b/.c"


@pytest.mark.parametrize("path", ["a\\b", "..\\..\\evil", "C:\\x"])
def test_manifest_path_with_backslash_is_refused(path):
    assert "backslash" in _refused(_body(_one_file(path)))


def test_manifest_path_with_nul_is_refused():
    assert "NUL" in _refused(_body(_one_file("a\0b")))


@pytest.mark.parametrize("path", ["", None, 5])
def test_manifest_path_that_is_not_a_non_empty_string_is_refused(path):
    assert "path must be a non-empty string" in _refused(_body(_one_file(path)))


def test_manifest_file_entry_that_is_not_an_object_is_refused():
    assert "files[0] is not an object" in _refused(_body(["a.bin"]))


def test_manifest_duplicate_paths_are_refused():
    files = _one_file("w/a.bin") + _one_file("w/a.bin")
    message = _refused(_body(files))
    assert "duplicate path 'w/a.bin'" in message
    assert "files[1]" in message


@pytest.mark.parametrize("order", [("a", "a/b"), ("a/b", "a"), ("x/y", "x/y/z/w")])
def test_manifest_path_that_is_both_file_and_folder_is_refused(order):
    files = _one_file(order[0]) + _one_file(order[1])
    parent = min(order, key=len)
    assert f"{parent!r} is both a file and a folder" in _refused(_body(files))


def test_manifest_sibling_paths_with_a_common_prefix_are_accepted():
    files = _one_file("a") + _one_file("ab/c") + _one_file("a.d/e")
    assert len(parse_manifest(json.dumps(_body(files)), WHERE).files) == 3


def test_manifest_negative_size_is_refused():
    assert "negative size for 'a.bin'" in _refused(_body(_one_file(size=-1)))


@pytest.mark.parametrize("size", ["1", 1.0, None, True])
def test_manifest_size_that_is_not_an_integer_is_refused(size):
    assert "'size'" in _refused(_body(_one_file(size=size)))


@pytest.mark.parametrize(
    "size, nparts",
    [(0, 0), (0, 2), (1, 0), (1, 2), (PART, 2), (PART + 1, 1), (PART + 1, 3), (3 * PART, 4)],
)
def test_manifest_part_count_not_matching_size_is_refused(size, nparts):
    message = _refused(_body(_one_file(size=size, parts=["00000000"] * nparts)))
    assert f"{nparts} checksums do not match size {size}" in message


def test_manifest_part_checksum_that_is_not_a_string_is_refused():
    assert "checksums" in _refused(_body(_one_file(size=1, parts=[0])))


@pytest.mark.parametrize("part", ["", "1234567", "ABCDEF01", "123456789", "zzzzzzzz"])
def test_manifest_part_checksum_that_is_not_eight_lower_case_hex_digits_is_refused(part):
    """An empty one above all: it is what a file the agent did not write has, checked whole instead."""
    assert "8 lower-case hex digits" in _refused(_body(_one_file(size=1, parts=[part])))


@pytest.mark.parametrize("size, expected", [(0, 1), (1, 1), (PART, 1), (PART + 1, 2), (3 * PART, 3)])
def test_part_count_is_one_for_empty_files_and_ceiling_otherwise(size, expected):
    assert part_count(size, PART) == expected


# --- natural order ------------------------------------------------------------------------------


def test_natural_key_puts_checkpoint_100_after_checkpoint_20():
    assert natural_key("checkpoint-100") > natural_key("checkpoint-20")
    assert "checkpoint-100" < "checkpoint-20"  # what plain string order would get wrong


def test_natural_key_sorts_a_shuffled_list_numerically():
    names = ["checkpoint-1", "checkpoint-2", "checkpoint-9", "checkpoint-10", "checkpoint-20", "checkpoint-100",
             "checkpoint-1000"]
    shuffled = names[:]
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled, key=natural_key) == names


def test_natural_key_handles_mixed_names_without_type_errors():
    names = ["final", "checkpoint-3", "10", "step10-epoch2", "step9-epoch3", "step10-epoch10", "checkpoint"]
    ordered = sorted(names, key=natural_key)
    assert ordered.index("step9-epoch3") < ordered.index("step10-epoch2") < ordered.index("step10-epoch10")
    assert ordered.index("checkpoint") < ordered.index("checkpoint-3")


@pytest.mark.parametrize("name", ["step1\u00b2", "\u00b2", "ckpt-\u00b9\u2070"])
def test_natural_key_accepts_digit_like_characters_that_are_not_decimal(name):
    # str.isdigit() is true for superscripts, which int() rejects: such a name used to crash `latest`.
    ordered = sorted([name, "checkpoint-10", "checkpoint-2"], key=natural_key)
    assert ordered.index("checkpoint-2") < ordered.index("checkpoint-10")
    assert name in ordered


def test_natural_key_keeps_the_number_before_a_superscript():
    assert natural_key("step2\u00b2") < natural_key("step10\u00b2")


def test_natural_key_orders_non_ascii_decimal_digits_numerically():
    assert natural_key("ckpt-\u0663") < natural_key("ckpt-10")  # ARABIC-INDIC DIGIT THREE


# --- part checksums of a whole file (read_checksums, as scan and verify read them) ----------------


def file_checksums(path: Path, part_size: int, buffer_size: int = 1 << 20) -> tuple[str, ...]:
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = memoryview(bytearray(min(buffer_size, part_size)))
        sums = read_checksums(fd, 0, os.fstat(fd).st_size, part_size, buf)
    finally:
        os.close(fd)
    assert sums is not None
    return tuple(sums)


def _manual_parts(data: bytes, part_size: int) -> tuple[str, ...]:
    slices = [data[i:i + part_size] for i in range(0, len(data), part_size)] or [b""]
    return tuple(format_checksum(crc32c.crc32c(s)) for s in slices)


@pytest.mark.parametrize("buffer_size", [3, 8 << 20])
@pytest.mark.parametrize("size", [0, 1, 16, 17, 48])
def test_file_checksums_match_a_manual_crc32c_per_part(tmp_path, size, buffer_size):
    part_size = 16
    data = random.Random(size).randbytes(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    parts = file_checksums(path, part_size, buffer_size=buffer_size)
    assert parts == _manual_parts(data, part_size)
    assert len(parts) == part_count(size, part_size)


def test_file_checksums_of_an_empty_file_is_the_crc_of_nothing(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert file_checksums(path, 16) == ("00000000",)


def test_file_checksums_are_accepted_by_parse_manifest(tmp_path):
    data = random.Random(1).randbytes(PART * 2 + 1)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    entry = FileEntry("f.bin", len(data), file_checksums(path, PART))
    assert parse_manifest(_manifest(files=(entry,)).to_json(), WHERE).files == (entry,)


def test_format_checksum_is_eight_lowercase_hex_digits():
    assert format_checksum(0) == "00000000"
    assert format_checksum(0xABCDEF) == "00abcdef"


def test_a_single_file_manifest_round_trips_and_a_bad_kind_is_refused():
    from ckpt_agent.stores.manifest import FILE_KIND, FileEntry, Manifest

    m = Manifest("p", "j", "ckpt-5.pt", 0, "2026-01-01T00:00:00.000000Z", 8,
                 (FileEntry("ckpt-5.pt", 3, ("00000000",)),), kind=FILE_KIND)
    assert parse_manifest(m.to_json(), "m").kind == FILE_KIND
    body = json.loads(m.to_json())
    one = body["files"][0]
    for kind, files in (("blob", [one]), ("file", [one, {**one, "path": "other.pt"}]),
                        ("file", [{**one, "path": "a/ckpt-5.pt"}])):
        with pytest.raises(IntegrityError):
            parse_manifest(json.dumps({**body, "kind": kind, "files": files}), "m")
    del body["kind"]
    assert parse_manifest(json.dumps(body), "m").kind == "folder"
