"""The one rule for names and the one rule for paths inside a checkpoint.

A job id, project or checkpoint name must be one store key segment and one local folder name,
whether a user typed it or a store listed it (`name_problem`). A path inside a checkpoint (a
manifest's file, a complete file, a select pattern, a DeepSpeed tag) must stay inside its folder
on every OS (`path_problem`, `is_segment`)."""

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


def is_segment(segment: str) -> bool:
    """Whether `segment` names an entry inside its folder: not empty, '.' or '..'."""
    return segment not in ("", ".", "..")


def path_problem(path: str) -> str | None:
    """Why `path` can't be a relative path that stays inside its folder on every OS (None when it can)."""
    if "\\" in path or "\0" in path:
        return "contains a backslash or NUL"
    if path.startswith("/") or not all(is_segment(p) for p in path.split("/")):
        return "is absolute or has '.'/'..' components"
    return None


def quote_name(name: str) -> str:
    """A name as one printable ASCII token, so a planted newline or bidi mark can't forge a log line."""
    import json  # only for a message: json costs start-up time

    return json.dumps(name)
