"""Byte counts written by people: `200MB`, `1.5GiB`, `500M`, `4096`.

Decimal units (k, M, G, T with or without `B`) are powers of 1000 and binary ones (Ki, Mi, Gi, Ti
with or without `B`) powers of 1024, as in Kubernetes and the SI/IEC standards, so `500M` means
what a network link's "500 MB/s" means. Letters are case-insensitive; fractions are allowed
and rounded to a whole byte; exact arithmetic, so `1.5GiB` is exactly 1610612736.
"""

from __future__ import annotations

import re

from ckpt_agent.errors import ConfigError

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[kmgt]i?)?b?", re.IGNORECASE)


def parse_size(text: str, field: str) -> int:
    """A non-negative whole number of bytes; anything unreadable is a ConfigError naming `field`."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"{field}: expected a size such as 200MB, 1.5GiB or 500M, got {text!r}")
    from decimal import Decimal  # only when a size is given: decimal costs start-up time

    return int((Decimal(match["number"]) * _UNITS[(match["unit"] or "").lower()]).to_integral_value())
