"""Which files of a checkpoint a load fetches: include and exclude globs, decided by pure functions;
and which nodes' files of a multi-node checkpoint (CKPT_AGENT_LOAD_RANKS).

Patterns are matched against a file's path relative to its checkpoint folder (the manifest path,
`/`-separated), and are anchored there: `optimizer.pt` is only the top-level file, `**/optimizer.pt`
is that name at any depth. `*`, `?` and `[abc]`/`[!abc]` match within one path segment (never a
`/`, and a leading `.` is not special); `**` as a whole segment matches zero or more segments. A
trailing `/` makes a pattern match a folder: every file under it, at any depth. No include means
everything; an exclude always wins over an include. Patterns are case-sensitive.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ckpt_agent.config import names
from ckpt_agent.errors import ConfigError

INCLUDE_VAR = "CKPT_AGENT_INCLUDE"
EXCLUDE_VAR = "CKPT_AGENT_EXCLUDE"
LOAD_RANKS_VAR = "CKPT_AGENT_LOAD_RANKS"


def load_own_rank(env: Mapping[str, str]) -> bool:
    """CKPT_AGENT_LOAD_RANKS: `all` (the default: every node's files, ckpt_agent.load.merge) or `own`."""
    raw = env.get(LOAD_RANKS_VAR, "").strip().lower()
    if raw not in ("", "all", "own"):
        raise ConfigError(f"{LOAD_RANKS_VAR}: expected all or own, got {raw!r}")
    return raw == "own"


def split_patterns(texts: str | Sequence[str], field: str) -> tuple[str, ...]:
    """Comma-separated patterns (from a variable, or from each repeated flag) -> checked patterns."""
    values = [texts] if isinstance(texts, str) else list(texts)
    patterns: list[str] = []
    for text in values:
        if not text.strip():
            continue
        for raw in text.split(","):
            patterns.append(_check(raw.strip(), field))
    return tuple(patterns)


def _check(pattern: str, field: str) -> str:
    if not pattern:
        raise ConfigError(f"{field}: an empty pattern (two commas in a row, or a trailing comma); "
                          "separate globs with single commas")
    if pattern.startswith("/"):
        raise ConfigError(f"{field}: {pattern!r} is absolute; patterns are relative to the checkpoint folder")
    segments = pattern.removesuffix("/").split("/")
    for segment in segments:
        if not names.is_segment(segment):
            raise ConfigError(f"{field}: {pattern!r} has an empty, '.' or '..' segment; write a path inside "
                              "the checkpoint folder such as 'global_step*/' or '**/optimizer.pt'")
        if "**" in segment and segment != "**":
            raise ConfigError(f"{field}: {pattern!r}: '**' must be a whole path segment, as in '**/name'")
    try:
        compile_pattern(pattern)
    except ValueError:
        raise ConfigError(f"{field}: {pattern!r} has an unclosed '['") from None
    return pattern


def _segment_regex(segment: str) -> str:
    out, i = [], 0
    while i < len(segment):
        c = segment[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            start = i + 1 + segment.startswith("!", i + 1)
            end = segment.index("]", start + segment.startswith("]", start))  # a leading ']' is literal
            body = segment[i + 1:end]
            negated = body.startswith("!")
            body = body[negated:].replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]").replace("^", "\\^")
            out.append(f"(?!/)[{'^' if negated else ''}{body}]")  # a range such as [.-0] must not reach '/'
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A checked pattern -> a regex for the whole relative path (see the module docstring)."""
    folder = pattern.endswith("/")
    segments = pattern.removesuffix("/").split("/")
    regex = ""
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            regex += ".+" if last and not folder else "(?:[^/]+/)*"
        else:
            regex += _segment_regex(segment) + ("" if last and not folder else "/")
    if folder:
        regex += ".+"
    return re.compile(regex)


@dataclass(frozen=True)
class Selection:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_field: str = field(default=INCLUDE_VAR, compare=False)  # where the patterns came from, for messages
    exclude_field: str = field(default=EXCLUDE_VAR, compare=False)
    _include: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _exclude: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    @classmethod
    def from_patterns(cls, include: str | Sequence[str], exclude: str | Sequence[str],
                      include_field: str = INCLUDE_VAR, exclude_field: str = EXCLUDE_VAR) -> Selection:
        return cls(split_patterns(include, include_field), split_patterns(exclude, exclude_field),
                   include_field, exclude_field)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_include", tuple(compile_pattern(p) for p in self.include))
        object.__setattr__(self, "_exclude", tuple(compile_pattern(p) for p in self.exclude))

    @property
    def everything(self) -> bool:
        return not self.include and not self.exclude

    def wants(self, relative_path: str) -> bool:
        """Whether a load fetches the file at this path inside its checkpoint folder."""
        included = not self.include or any(r.fullmatch(relative_path) for r in self._include)
        return included and not any(r.fullmatch(relative_path) for r in self._exclude)

    def unmatched_includes(self, paths: Sequence[str]) -> tuple[str, ...]:
        """Include patterns that match none of `paths`: most likely a typo, worth one line to the user."""
        return tuple(p for p, r in zip(self.include, self._include, strict=True)
                     if not any(r.fullmatch(path) for path in paths))

    def describe(self) -> str:
        """One line for --dry-run and the summary."""
        if self.everything:
            return "every file"
        parts = [f"include {','.join(self.include)}"] if self.include else []
        parts += [f"exclude {','.join(self.exclude)}"] if self.exclude else []
        return "; ".join(parts)

    def source(self) -> str:
        """Where the patterns came from, as the user wrote them: `--exclude optimizer.pt`, `CKPT_AGENT_INCLUDE=*.pt`."""
        parts = [_given(f, p) for f, p in ((self.include_field, self.include), (self.exclude_field, self.exclude)) if p]
        return " ".join(parts) if parts else "no patterns"

    def record(self) -> dict[str, list[str]]:
        """For loaded-rank-<r>.json, so `verify` knows what was left out on purpose."""
        return {"include": list(self.include), "exclude": list(self.exclude)}


def _given(field_name: str, patterns: tuple[str, ...]) -> str:
    joined = ",".join(patterns)
    return f"{field_name} {joined}" if field_name.startswith("--") else f"{field_name}={joined}"


EVERY_FILE = Selection()  # the default: no patterns
