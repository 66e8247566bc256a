"""Human byte counts and the rate cap setting that reads them."""

from __future__ import annotations

import pytest

from ckpt_agent.config.settings import max_rate_from_env
from ckpt_agent.config.sizes import parse_size
from ckpt_agent.errors import ConfigError


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0),
    ("4096", 4096),
    ("4096B", 4096),
    ("200MB", 200_000_000),
    ("500M", 500_000_000),
    ("500m", 500_000_000),
    ("2k", 2000),
    ("2KiB", 2048),
    ("64Mi", 64 << 20),
    ("1.5GiB", 1_610_612_736),
    ("1.5 GB", 1_500_000_000),
    ("  3TB ", 3 * 10**12),
    ("1TiB", 1 << 40),
    (".5K", 500),
])
def test_parse_size_reads_decimal_and_binary_units(text, expected):
    assert parse_size(text, "FIELD") == expected


@pytest.mark.parametrize("text", ["", "MB", "-5MB", "5 XB", "1e6", "5MBps", "1,000", "0x10", "5 M B"])
def test_parse_size_names_the_field_for_anything_else(text):
    with pytest.raises(ConfigError, match=r"^CKPT_SOMETHING: expected a size such as 200MB"):
        parse_size(text, "CKPT_SOMETHING")


def test_max_rate_is_unlimited_by_default():
    assert max_rate_from_env({}) is None
    assert max_rate_from_env({"CKPT_AGENT_MAX_RATE": "  "}) is None


@pytest.mark.parametrize(("text", "expected"), [("200MB", 200_000_000), ("200MB/s", 200_000_000),
                                                ("1GiB", 1 << 30), ("1000", 1000)])
def test_max_rate_reads_a_size_per_second(text, expected):
    assert max_rate_from_env({"CKPT_AGENT_MAX_RATE": text}) == expected


@pytest.mark.parametrize("text", ["0", "0MB", "0.1"])
def test_max_rate_of_zero_is_an_error_that_says_how_to_lift_the_cap(text):
    with pytest.raises(ConfigError, match=r"^CKPT_AGENT_MAX_RATE: must be at least 1 byte.*unset it for no cap"):
        max_rate_from_env({"CKPT_AGENT_MAX_RATE": text})


def test_max_rate_names_the_variable_for_a_bad_value():
    with pytest.raises(ConfigError, match=r"^CKPT_AGENT_MAX_RATE: expected a size"):
        max_rate_from_env({"CKPT_AGENT_MAX_RATE": "fast"})
