"""Where Baseten's training API is and the key it takes (BT_CHECKPOINT_STORE=baseten): read from the
environment only for that store, and the key kept out of every repr."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ckpt_agent.errors import ConfigError

API_KEY_VAR, API_URL_VAR = "BASETEN_API_KEY", "BASETEN_API_URL"
DEFAULT_API_URL = "https://api.baseten.co"


@dataclass(frozen=True)
class BasetenSettings:
    api_url: str
    api_key: str | None = field(repr=False)  # a secret: never in a repr, a message or the record


def baseten_settings_from_env(env: Mapping[str, str]) -> BasetenSettings:
    """Only for BT_CHECKPOINT_STORE=baseten, whose store refuses a missing key before any request."""
    url = env.get(API_URL_VAR, "").strip().rstrip("/") or DEFAULT_API_URL
    if not url.startswith(("https://", "http://")) or "@" in url:
        raise ConfigError(f"{API_URL_VAR}: expected https://host[:port] with no user or password")
    return BasetenSettings(url, env.get(API_KEY_VAR, "").strip() or None)
