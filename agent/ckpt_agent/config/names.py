"""The one rule for names: a job id, project or checkpoint name must be one store key segment and
one local folder name, whether a user typed it or a store listed it."""

from __future__ import annotations

import unicodedata

MAX_NAME_BYTES = 200


def name_problem(name: str) -> str | None:
    """Why a job id, project or checkpoint name can't be one store key segment and one local folder
    name (None when it can). The one rule for names a user gives and names a store lists."""
    if not name.strip():
        return "is empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    if name.startswith("."):
        return "starts with '.'"
    if name != name.strip():
        return "starts or ends with white space"
    if any(c in name for c in '/\\"'):
        return "contains '/', '\\' or '\"'"
    if any(unicodedata.category(c).startswith("C") for c in name):
        return "contains a control or invisible character"
    return None


def quote_name(name: str) -> str:
    """A name as one printable ASCII token, so a planted newline or bidi mark can't forge a log line."""
    import json  # only for a message: json costs start-up time

    return json.dumps(name)
