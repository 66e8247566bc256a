"""Include/exclude globs for selective loads: the semantics table, the errors, the setting."""

from __future__ import annotations

import pytest

from ckpt_agent.config.selection import Selection
from ckpt_agent.config.settings import max_rate_from_env, selection_from_env
from ckpt_agent.errors import ConfigError

PATHS = [
    "optimizer.pt",
    "model.safetensors",
    "config.json",
    "rng_state_0.pth",
    "global_step100/mp_rank_00_model_states.pt",
    "global_step100/zero_optim_states.pt",
    "global_step100/deep/rng_state.pth",
    "sub/optimizer.pt",
    "sub/model.safetensors",
    ".hidden",
    "global_step_notes.txt",
]

# pattern -> the PATHS it matches (as an include: exactly these are wanted)
SEMANTICS = {
    "optimizer.pt": {"optimizer.pt"},  # anchored at the checkpoint folder
    "**/optimizer.pt": {"optimizer.pt", "sub/optimizer.pt"},  # ** is zero or more folders
    "*.safetensors": {"model.safetensors"},  # * never crosses /
    "**/*.safetensors": {"model.safetensors", "sub/model.safetensors"},
    "global_step*/": {"global_step100/mp_rank_00_model_states.pt", "global_step100/zero_optim_states.pt",
                      "global_step100/deep/rng_state.pth"},  # a folder and everything under it, not a file
    "global_step*": {"global_step_notes.txt"},  # without the / it is a file name
    "**/rng_state*": {"rng_state_0.pth", "global_step100/deep/rng_state.pth"},
    "global_step100/**": {"global_step100/mp_rank_00_model_states.pt", "global_step100/zero_optim_states.pt",
                          "global_step100/deep/rng_state.pth"},
    "*": {"optimizer.pt", "model.safetensors", "config.json", "rng_state_0.pth", ".hidden",
          "global_step_notes.txt"},  # top level only; a leading dot is not special
    "**": set(PATHS),
    "rng_state_?.pth": {"rng_state_0.pth"},
    "rng_state_[0-9].pth": {"rng_state_0.pth"},
    "rng_state_[!0-9].pth": set(),
    "sub/": {"sub/optimizer.pt", "sub/model.safetensors"},
    "Optimizer.pt": set(),  # case-sensitive
}


@pytest.mark.parametrize(("pattern", "expected"), SEMANTICS.items(), ids=list(SEMANTICS))
def test_include_pattern_semantics(pattern, expected):
    selection = Selection.from_patterns(pattern, "")
    assert {p for p in PATHS if selection.wants(p)} == expected


@pytest.mark.parametrize(("pattern", "expected"), SEMANTICS.items(), ids=list(SEMANTICS))
def test_exclude_pattern_semantics_are_the_same_globs(pattern, expected):
    selection = Selection.from_patterns("", pattern)
    assert {p for p in PATHS if not selection.wants(p)} == expected


def test_no_patterns_means_every_file():
    selection = Selection.from_patterns("", "")
    assert selection.everything
    assert all(selection.wants(p) for p in PATHS)
    assert selection.describe() == "every file"


def test_exclude_wins_over_include():
    selection = Selection.from_patterns("**/*.pt", "global_step*/,optimizer.pt")
    assert {p for p in PATHS if selection.wants(p)} == {"sub/optimizer.pt"}


def test_comma_separated_patterns_and_repeated_flags_add_up():
    from_env = Selection.from_patterns(" *.safetensors , config.json ", "")
    from_flags = Selection.from_patterns(["*.safetensors", "config.json"], [])
    assert from_env == from_flags
    assert {p for p in PATHS if from_env.wants(p)} == {"model.safetensors", "config.json"}


def test_describe_and_record_say_what_was_chosen():
    selection = Selection.from_patterns("*.safetensors,config.json", "optimizer.pt")
    assert selection.describe() == "include *.safetensors,config.json; exclude optimizer.pt"
    assert selection.record() == {"include": ["*.safetensors", "config.json"], "exclude": ["optimizer.pt"]}


def test_unmatched_includes_point_at_a_likely_typo():
    selection = Selection.from_patterns("*.safetensor,config.json", "")
    assert selection.unmatched_includes(PATHS) == ("*.safetensor",)


@pytest.mark.parametrize(("text", "message"), [
    ("a,,b", "empty pattern"),
    ("a,", "empty pattern"),
    ("/etc/passwd", "is absolute"),
    ("../other/x", "'..' segment"),
    ("a/../b", "'..' segment"),
    ("./a", "'.' or '..' segment"),
    ("a//b", "empty, '.' or '..' segment"),
    ("a**/b", "'\\*\\*' must be a whole path segment"),
    ("rng_[0-9.pth", "unclosed '\\['"),
])
def test_bad_patterns_name_the_variable(text, message):
    with pytest.raises(ConfigError, match=rf"^CKPT_AGENT_EXCLUDE: .*{message}"):
        selection_from_env({"CKPT_AGENT_EXCLUDE": text})
    with pytest.raises(ConfigError, match=rf"^CKPT_AGENT_INCLUDE: .*{message}"):
        selection_from_env({"CKPT_AGENT_INCLUDE": text})


def test_the_selection_and_the_rate_cap_are_read_from_their_variables():
    env = {"CKPT_AGENT_INCLUDE": "*.safetensors", "CKPT_AGENT_EXCLUDE": "global_step*/",
           "CKPT_AGENT_MAX_RATE": "1.5GiB"}
    assert selection_from_env(env) == Selection(("*.safetensors",), ("global_step*/",))
    assert max_rate_from_env(env) == 1_610_612_736
    assert selection_from_env({}).everything and max_rate_from_env({}) is None
