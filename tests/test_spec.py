"""The environment's JSON and URLs: exactly the truss shapes are accepted, anything else names its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckpt_agent.config.settings import DEFAULT_CHUNK_MB, DEFAULT_STORE, default_workers, settings_from_env
from ckpt_agent.config.spec import (
    DEFAULT_DOWNLOAD_FOLDER,
    LatestRef,
    LoadSpec,
    NamedRef,
    StoreLocation,
    parse_load_spec,
    parse_start_commands,
    parse_store_location,
)
from ckpt_agent.errors import ConfigError

EXAMPLES_NAME = "truss-load-checkpoint-config-examples.json"
LOCAL_COPY = Path(__file__).parent / "data" / "truss_load_checkpoint_config_examples.json"
SHARED_ORIGINAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / EXAMPLES_NAME


def _examples_path() -> Path:
    """The copy in tests/data, so a clone without shared/ beside it still runs these tests."""
    return LOCAL_COPY if LOCAL_COPY.is_file() else SHARED_ORIGINAL


EXAMPLES: dict = json.loads(_examples_path().read_text())

EXPECTED: dict[str, LoadSpec] = {
    "latest_from_project": LoadSpec(True, (LatestRef(project_name="gpt-finetuning"),), DEFAULT_DOWNLOAD_FOLDER),
    "latest_from_job": LoadSpec(True, (LatestRef(job_id="gvpql31"),), DEFAULT_DOWNLOAD_FOLDER),
    "latest_from_job_in_project": LoadSpec(
        True, (LatestRef(project_name="gpt-finetuning", job_id="gvpql31"),), DEFAULT_DOWNLOAD_FOLDER
    ),
    "enabled_with_defaults": LoadSpec(True, (LatestRef(),), DEFAULT_DOWNLOAD_FOLDER),
    "named_with_custom_folder": LoadSpec(
        True, (NamedRef(checkpoint_name="checkpoint-20", job_id="rwnojdq"),), "/tmp/my_checkpoints"
    ),
    "two_references": LoadSpec(
        True,
        (LatestRef(project_name="first-project"), NamedRef(checkpoint_name="checkpoint-24", job_id="lqz4pw4")),
        "/tmp/custom_location",
    ),
    "disabled_default": LoadSpec(False, (LatestRef(),), DEFAULT_DOWNLOAD_FOLDER),
}


def _config_examples() -> list[str]:
    return [k for k in EXAMPLES if not k.startswith("_") and not k.startswith("runtime_")]


# --- the truss reference examples -------------------------------------------------------------


def test_local_copy_of_reference_examples_matches_shared_original():
    if not SHARED_ORIGINAL.is_file():
        pytest.skip(f"nothing to compare tests/data's copy with: {SHARED_ORIGINAL} is not beside this clone")
    assert json.loads(LOCAL_COPY.read_text()) == json.loads(SHARED_ORIGINAL.read_text())


def test_every_reference_example_has_an_expected_parse():
    assert sorted(_config_examples()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reference_example_parses_to_expected_dataclasses(name):
    assert parse_load_spec(json.dumps(EXAMPLES[name])) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reference_example_parses_with_keys_in_any_order(name):
    example = EXAMPLES[name]
    reordered = {k: example[k] for k in reversed(list(example))}
    reordered["checkpoints"] = [{k: r[k] for k in reversed(list(r))} for r in example["checkpoints"]]
    assert parse_load_spec(json.dumps(reordered)) == EXPECTED[name]


def test_runtime_example_load_checkpoint_config_parses():
    runtime = EXAMPLES["runtime_with_load_and_checkpointing"]
    spec = parse_load_spec(json.dumps(runtime["load_checkpoint_config"]))
    assert spec == LoadSpec(True, (LatestRef(job_id="previous_job_id"),), DEFAULT_DOWNLOAD_FOLDER)


def test_runtime_example_start_commands_parse():
    runtime = EXAMPLES["runtime_with_load_and_checkpointing"]
    assert parse_start_commands(json.dumps(runtime["start_commands"])) == ("chmod +x ./run.sh && ./run.sh",)


# --- defaults ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [None, "", "   ", "\n"])
def test_unset_or_empty_config_means_loading_disabled(text):
    spec = parse_load_spec(text)
    assert spec == LoadSpec()
    assert spec.enabled is False


def test_missing_checkpoints_means_one_latest_reference_with_neither_field():
    spec = parse_load_spec('{"enabled": true}')
    assert spec.checkpoints == (LatestRef(project_name=None, job_id=None),)
    assert spec.download_folder == DEFAULT_DOWNLOAD_FOLDER


def test_null_checkpoints_and_folder_mean_the_defaults():
    spec = parse_load_spec('{"enabled": true, "checkpoints": null, "download_folder": null}')
    assert spec == LoadSpec(True, (LatestRef(),), DEFAULT_DOWNLOAD_FOLDER)


def test_missing_enabled_means_disabled():
    assert parse_load_spec('{"checkpoints": []}').enabled is False


def test_empty_checkpoint_list_is_kept_empty():
    assert parse_load_spec('{"enabled": true, "checkpoints": []}').checkpoints == ()


# --- refusals: each is a ConfigError naming the key ---------------------------------------------


def _refused(obj_or_text) -> str:
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
    with pytest.raises(ConfigError) as info:
        parse_load_spec(text)
    return str(info.value)


def test_malformed_json_is_refused_naming_the_variable():
    message = _refused('{"enabled": true,')
    assert "BT_LOAD_CHECKPOINT_CONFIG" in message
    assert "JSON" in message


@pytest.mark.parametrize("text", ["[]", '"latest"', "5", "null", "true"])
def test_top_level_that_is_not_an_object_is_refused(text):
    message = _refused(text)
    assert "BT_LOAD_CHECKPOINT_CONFIG" in message
    assert "object" in message


@pytest.mark.parametrize("value", ["yes", 1, "true"])
def test_enabled_that_is_not_a_boolean_is_refused_naming_enabled(value):
    assert "BT_LOAD_CHECKPOINT_CONFIG.enabled" in _refused({"enabled": value})


@pytest.mark.parametrize("value", [{"typ": "baseten_latest_checkpoint"}, "latest", 3])
def test_checkpoints_that_is_not_a_list_is_refused_naming_checkpoints(value):
    assert "BT_LOAD_CHECKPOINT_CONFIG.checkpoints" in _refused({"enabled": True, "checkpoints": value})


def test_reference_that_is_not_an_object_is_refused_naming_its_index():
    message = _refused({"enabled": True, "checkpoints": [{"typ": "baseten_latest_checkpoint"}, "x"]})
    assert "checkpoints[1]" in message


@pytest.mark.parametrize(
    "ref, key",
    [
        ({"typ": "baseten_latest_checkpoint", "job_id": 5}, "checkpoints[0].job_id"),
        ({"typ": "baseten_latest_checkpoint", "project_name": ["p"]}, "checkpoints[0].project_name"),
        ({"typ": "baseten_named_checkpoint", "checkpoint_name": "c", "job_id": 5}, "checkpoints[0].job_id"),
        ({"typ": "baseten_named_checkpoint", "checkpoint_name": 20, "job_id": "j"}, "checkpoints[0].checkpoint_name"),
    ],
)
def test_reference_field_of_wrong_type_is_refused_naming_the_field(ref, key):
    assert key in _refused({"enabled": True, "checkpoints": [ref]})


@pytest.mark.parametrize("folder", [5, "", "  ", "a\0b", True])
def test_download_folder_that_is_not_a_path_is_refused_naming_download_folder(folder):
    assert "download_folder" in _refused({"enabled": True, "download_folder": folder})


@pytest.mark.parametrize("typ", ["baseten_latest", "latest", None, 1])
def test_unknown_typ_is_refused_naming_typ(typ):
    message = _refused({"enabled": True, "checkpoints": [{"typ": typ}]})
    assert "checkpoints[0].typ" in message


def test_a_loops_checkpoint_is_refused_as_one_the_agent_cannot_resolve_not_as_unknown():
    """The SDK's own type (platform.md), resolved by the platform's backend: the user is told what to
    write instead, rather than that a valid type is a typo."""
    ref = {"typ": "loops_checkpoint", "run_id": "r1", "checkpoint_name": "c", "target": "trainer"}
    message = _refused({"enabled": True, "checkpoints": [{"typ": "baseten_named_checkpoint", "job_id": "j",
                                                          "checkpoint_name": "c"}, ref]})
    assert message.startswith("BT_LOAD_CHECKPOINT_CONFIG.checkpoints[1].typ: 'loops_checkpoint' is resolved by "
                              "the platform's backend")
    assert "unknown" not in message and "'baseten_named_checkpoint'" in message and "'s3_prefix'" in message


def test_missing_typ_is_refused_naming_typ():
    assert "checkpoints[0].typ" in _refused({"enabled": True, "checkpoints": [{"job_id": "j"}]})


def test_unknown_top_level_key_is_refused_naming_it():
    message = _refused({"enabled": True, "download_dir": "/tmp/x"})
    assert "'download_dir'" in message
    assert "BT_LOAD_CHECKPOINT_CONFIG" in message


@pytest.mark.parametrize(
    "ref, unknown",
    [
        ({"typ": "baseten_latest_checkpoint", "job": "j"}, "job"),
        ({"typ": "baseten_latest_checkpoint", "checkpoint_name": "c"}, "checkpoint_name"),
        ({"typ": "baseten_named_checkpoint", "checkpoint_name": "c", "job_id": "j", "project_name": "p"},
         "project_name"),
    ],
)
def test_unknown_key_inside_a_reference_is_refused_naming_it(ref, unknown):
    message = _refused({"enabled": True, "checkpoints": [ref]})
    assert f"'{unknown}'" in message
    assert "checkpoints[0]" in message


@pytest.mark.parametrize(
    "ref, key",
    [
        ({"typ": "baseten_latest_checkpoint", "project_name": ""}, "project_name"),
        ({"typ": "baseten_latest_checkpoint", "job_id": "  "}, "job_id"),
        ({"typ": "baseten_named_checkpoint", "checkpoint_name": "", "job_id": "j"}, "checkpoint_name"),
        ({"typ": "baseten_named_checkpoint", "checkpoint_name": "c", "job_id": ""}, "job_id"),
    ],
)
def test_empty_name_is_refused_naming_the_field(ref, key):
    message = _refused({"enabled": True, "checkpoints": [ref]})
    assert f"checkpoints[0].{key}" in message
    assert "empty" in message


@pytest.mark.parametrize("bad", ["a/b", "..", ".", "../x", "/abs", "a\\b", "a\0b"])
@pytest.mark.parametrize(
    "field, ref",
    [
        ("checkpoint_name", {"typ": "baseten_named_checkpoint", "job_id": "j"}),
        ("job_id", {"typ": "baseten_named_checkpoint", "checkpoint_name": "c"}),
        ("job_id", {"typ": "baseten_latest_checkpoint"}),
        ("project_name", {"typ": "baseten_latest_checkpoint"}),
    ],
)
def test_name_with_slash_or_dots_is_refused_naming_the_field(bad, field, ref):
    message = _refused({"enabled": True, "checkpoints": [{**ref, field: bad}]})
    assert f"checkpoints[0].{field}" in message


@pytest.mark.parametrize("missing", ["checkpoint_name", "job_id"])
def test_named_reference_missing_a_required_field_is_refused_naming_it(missing):
    ref = {"typ": "baseten_named_checkpoint", "checkpoint_name": "c", "job_id": "j"}
    del ref[missing]
    message = _refused({"enabled": True, "checkpoints": [ref]})
    assert f"checkpoints[0].{missing}" in message
    assert "required" in message


def test_refusal_names_the_index_of_the_bad_reference():
    refs = [{"typ": "baseten_latest_checkpoint"}, {"typ": "baseten_named_checkpoint", "job_id": "j"}]
    assert "checkpoints[1].checkpoint_name" in _refused({"enabled": True, "checkpoints": refs})


def test_describe_names_the_reference_fields():
    assert LatestRef().describe() == "latest()"
    assert LatestRef("p", "j").describe() == "latest(project_name=p, job_id=j)"
    assert NamedRef("c", "j").describe() == "named(checkpoint_name=c, job_id=j)"


# --- BT_START_COMMANDS --------------------------------------------------------------------------


@pytest.mark.parametrize("text", [None, "", "  "])
def test_start_commands_unset_or_empty_means_none(text):
    assert parse_start_commands(text) == ()


def test_start_commands_list_of_strings_keeps_order():
    assert parse_start_commands('["echo a", "./run.sh --x 1"]') == ("echo a", "./run.sh --x 1")


def test_start_commands_empty_list_means_none():
    assert parse_start_commands("[]") == ()


@pytest.mark.parametrize("text", ['"echo a"', '["echo", 1]', '{"cmd": "echo"}', "[null]"])
def test_start_commands_that_are_not_a_list_of_strings_are_refused(text):
    with pytest.raises(ConfigError, match="BT_START_COMMANDS"):
        parse_start_commands(text)


def test_start_commands_malformed_json_is_refused():
    with pytest.raises(ConfigError, match="BT_START_COMMANDS: not valid JSON"):
        parse_start_commands('["echo a"')


# --- BT_CHECKPOINT_STORE ------------------------------------------------------------------------


def test_store_location_s3_with_prefix():
    loc = parse_store_location("s3://bucket/some/prefix/")
    assert loc == StoreLocation("s3", "bucket", "some/prefix")
    assert str(loc) == "s3://bucket/some/prefix"


def test_store_location_s3_bucket_only_has_empty_root():
    loc = parse_store_location("s3://bucket")
    assert loc == StoreLocation("s3", "bucket", "")
    assert str(loc) == "s3://bucket"


def test_store_location_file_url_is_an_absolute_local_folder():
    assert parse_store_location("file:///srv/ckpt") == StoreLocation("file", "", "/srv/ckpt")
    assert parse_store_location("file://localhost/srv/ckpt") == StoreLocation("file", "", "/srv/ckpt")


def test_store_location_file_url_is_percent_decoded():
    assert parse_store_location("file:///srv/my%20store").root == "/srv/my store"


def test_store_location_file_url_with_a_host_is_refused():
    with pytest.raises(ConfigError, match="BT_CHECKPOINT_STORE"):
        parse_store_location("file://otherhost/srv")


def test_store_location_plain_absolute_path_is_local():
    loc = parse_store_location("/srv/ckpt")
    assert loc == StoreLocation("file", "", "/srv/ckpt")
    assert str(loc) == "/srv/ckpt"


def test_store_location_baseten_is_the_training_api():
    assert parse_store_location("baseten") == StoreLocation("baseten", "", "")
    assert str(parse_store_location("baseten")) == "baseten"


@pytest.mark.parametrize("text", ["store/here", "./store", "s3:/typo-bucket", "S3://bucket/x", "bucket/x",
                                  "Baseten", "baseten/x", "s3:bucket", "file:/srv/x"])
def test_store_location_that_is_not_one_of_the_accepted_forms_is_refused_showing_them(text):
    with pytest.raises(ConfigError, match="BT_CHECKPOINT_STORE: .*use s3://bucket\\[/prefix\\], baseten, "
                                          "file:///absolute/path or an absolute path") as caught:
        parse_store_location(text)
    assert "\n" not in str(caught.value)


def test_store_location_refusal_never_echoes_a_value_with_a_user_and_password():
    with pytest.raises(ConfigError) as caught:
        parse_store_location("s3:/AKIAUSER:SECRETKEY@bucket/x")
    assert "SECRETKEY" not in str(caught.value) and "AKIAUSER" not in str(caught.value)


def test_store_location_empty_is_refused():
    with pytest.raises(ConfigError, match="BT_CHECKPOINT_STORE"):
        parse_store_location("  ")


@pytest.mark.parametrize("scheme", ["gs", "http", "ftp"])
def test_store_location_unknown_scheme_is_refused_naming_it(scheme):
    with pytest.raises(ConfigError, match=f"BT_CHECKPOINT_STORE: unknown scheme '{scheme}'"):
        parse_store_location(f"{scheme}://bucket/prefix")


@pytest.mark.parametrize("text", ["s3://", "s3:///prefix"])
def test_store_location_s3_without_bucket_is_refused(text):
    with pytest.raises(ConfigError, match="no bucket"):
        parse_store_location(text)


# --- settings_from_env --------------------------------------------------------------------------


def test_settings_defaults_from_an_empty_environment():
    s = settings_from_env({})
    assert s.spec == LoadSpec()
    assert s.store == StoreLocation("file", "", DEFAULT_STORE)
    assert (s.project_name, s.job_id) == (None, None)
    assert (s.node_rank, s.num_nodes) == (0, 1)
    assert s.required is False
    assert s.start_commands == ()
    assert s.workers == default_workers()
    assert s.chunk_size == DEFAULT_CHUNK_MB << 20
    assert s.load_timeout is None


def test_settings_read_every_variable():
    s = settings_from_env({
        "BT_LOAD_CHECKPOINT_CONFIG": json.dumps(EXAMPLES["latest_from_job"]),
        "BT_CHECKPOINT_STORE": "s3://b/p",
        "BT_TRAINING_PROJECT_NAME": "proj",
        "BT_TRAINING_JOB_ID": "job1",
        "BT_NODE_RANK": "3",
        "BT_GROUP_SIZE": "4",
        "BT_LOAD_CHECKPOINT_REQUIRED": "1",
        "BT_START_COMMANDS": '["echo hi"]',
        "CKPT_AGENT_WORKERS": "5",
        "CKPT_AGENT_CHUNK_MB": "2",
        "BT_LOAD_TIMEOUT": "30",
    })
    assert s.spec == EXPECTED["latest_from_job"]
    assert s.store == StoreLocation("s3", "b", "p")
    assert (s.project_name, s.job_id, s.node_rank, s.num_nodes) == ("proj", "job1", 3, 4)
    assert s.required is True
    assert s.start_commands == ("echo hi",)
    assert (s.workers, s.chunk_size, s.load_timeout) == (5, 2 << 20, 30.0)


def test_settings_explicit_workers_and_chunk_override_the_environment():
    s = settings_from_env({"CKPT_AGENT_WORKERS": "5", "CKPT_AGENT_CHUNK_MB": "2"}, workers=7, chunk_mb=1)
    assert (s.workers, s.chunk_size) == (7, 1 << 20)


def test_settings_empty_identity_variables_mean_unset():
    s = settings_from_env({"BT_TRAINING_PROJECT_NAME": "", "BT_TRAINING_JOB_ID": "", "BT_NODE_RANK": ""})
    assert (s.project_name, s.job_id, s.node_rank) == (None, None, 0)


@pytest.mark.parametrize("value", ["one", "1.5", "-1"])
def test_settings_bad_node_rank_is_refused_naming_the_variable(value):
    with pytest.raises(ConfigError, match="^BT_NODE_RANK: "):
        settings_from_env({"BT_NODE_RANK": value})


@pytest.mark.parametrize("var", ["BT_GROUP_SIZE", "BT_NUM_NODES"])
def test_settings_zero_node_count_is_refused_naming_the_variable(var):
    with pytest.raises(ConfigError, match=f"^{var}: "):
        settings_from_env({var: "0"})


@pytest.mark.parametrize("env", [{"BT_NUM_NODES": "2"}, {"BT_GROUP_SIZE": "2"},
                                 {"BT_GROUP_SIZE": "2", "BT_NUM_NODES": "2"}])
def test_settings_node_count_is_bt_group_size_with_bt_num_nodes_as_its_alias(env):
    assert settings_from_env(env).num_nodes == 2


def test_settings_node_counts_that_disagree_are_refused_naming_both_variables():
    with pytest.raises(ConfigError, match="^BT_GROUP_SIZE=2 and BT_NUM_NODES=1 disagree"):
        settings_from_env({"BT_GROUP_SIZE": "2", "BT_NUM_NODES": "1"})


def test_settings_project_name_with_a_slash_is_refused_naming_the_variable():
    with pytest.raises(ConfigError, match="^BT_TRAINING_PROJECT_NAME: "):
        settings_from_env({"BT_TRAINING_PROJECT_NAME": "a/b"})


@pytest.mark.parametrize("value, expected", [("30", 30.0), ("0.5", 0.5), (" 12 ", 12.0), ("", None)])
def test_settings_load_timeout_in_seconds(value, expected):
    assert settings_from_env({"BT_LOAD_TIMEOUT": value}).load_timeout == expected


@pytest.mark.parametrize("value", ["soon", "0", "-5", "10s"])
def test_settings_bad_load_timeout_is_refused_naming_the_variable(value):
    with pytest.raises(ConfigError, match="^BT_LOAD_TIMEOUT: "):
        settings_from_env({"BT_LOAD_TIMEOUT": value})


@pytest.mark.parametrize(
    "value, expected",
    [("1", True), ("true", True), ("YES", True), ("0", False), ("false", False), ("no", False), ("", False)],
)
def test_settings_load_checkpoint_required_flag(value, expected):
    assert settings_from_env({"BT_LOAD_CHECKPOINT_REQUIRED": value}).required is expected


def test_settings_bad_required_flag_is_refused_naming_the_variable():
    with pytest.raises(ConfigError, match="^BT_LOAD_CHECKPOINT_REQUIRED: "):
        settings_from_env({"BT_LOAD_CHECKPOINT_REQUIRED": "maybe"})


def test_settings_bad_config_json_is_refused_naming_the_variable():
    with pytest.raises(ConfigError, match="^BT_LOAD_CHECKPOINT_CONFIG"):
        settings_from_env({"BT_LOAD_CHECKPOINT_CONFIG": "{"})
