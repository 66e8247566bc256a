"""The fault proxy's rules and accounting: which request gets which fault, and what it cost.

Kept apart from the sockets so the bookkeeping (matching, counting, the exchange log) reads on
its own; FaultProxy extends Ledger with the forwarding.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from urllib.parse import unquote

KINDS = ("reset", "truncate", "stall", "status", "corrupt")
_MAX_EXCHANGES = 100_000
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            400: "Bad Request", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests"}
_ERROR_CODES = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


@dataclass
class Rule:
    """A fault rule. Counters are updated by the proxy under its lock; read them freely."""

    kind: str
    method: str | None = None
    path: str = ""
    range_only: bool = False
    count: int | None = 1
    offset: int = 0
    seconds: float = 0.0
    status: int = 503
    error_code: str | None = None
    seen: int = 0
    fired: int = 0
    body_bytes: int = 0

    @property
    def remaining(self) -> int | None:
        return None if self.count is None else max(0, self.count - self.fired)

    def matches(self, method: str, target: str, has_range: bool) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        if self.range_only and not (method == "GET" and has_range):
            return False
        return not self.path or self.path in target or self.path in unquote(target)


@dataclass
class Exchange:
    """One request seen by the proxy."""

    method: str
    target: str
    range: str | None
    status: int | None = None
    body_bytes: int = 0
    fault: str | None = None
    outcome: str = "pending"
    sent_bytes: int = 0  # request body bytes forwarded upstream (as framed: chunked uploads included)


@dataclass
class ProxyStats:
    requests: int = 0
    body_bytes: int = 0
    connections: int = 0
    refused: int = 0
    faults: dict[str, int] = field(default_factory=dict)



def status_response(rule: Rule, method: str, target: str, keep_alive: bool) -> bytes:
    """The S3 XML error a `status` rule answers with, headers and (unless HEAD) body."""
    code, message = _ERROR_CODES.get(rule.status, (rule.error_code, "Injected fault."))
    if rule.error_code is not None:
        code = rule.error_code
    resource = target.split("?", 1)[0]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>faultproxy</RequestId></Error>"
    ).encode()
    reason = _REASONS.get(rule.status, "Error")
    lines = [f"HTTP/1.1 {rule.status} {reason}", "Content-Type: application/xml",
             f"Content-Length: {len(body)}", "x-amz-request-id: faultproxy",
             "Server: faultproxy"]
    if not keep_alive:
        lines.append("Connection: close")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return data if method == "HEAD" else data + body


class Ledger:
    """Fault rules, overall stats and the exchange log, all under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._stats = ProxyStats()
        self._exchanges: list[Exchange] = []

    def add_rule(self, kind: str, *, method: str | None = None, path: str = "",
                 range_only: bool = False, count: int | None = 1, offset: int = 0,
                 seconds: float = 0.0, status: int = 503, error_code: str | None = None) -> Rule:
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {KINDS}")
        if offset < 0 or seconds < 0 or (count is not None and count < 0):
            raise ValueError("offset, seconds and count must be >= 0")
        if kind == "status" and error_code is None and status not in _ERROR_CODES:
            raise ValueError(f"status {status} needs an error_code")
        rule = Rule(kind, method.upper() if method else None, path, range_only, count, offset,
                    seconds, status, error_code)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove_rule(self, rule: Rule) -> None:
        with self._lock:
            self._rules = [r for r in self._rules if r is not rule]

    def clear(self) -> None:
        """Remove all rules (counters and the exchange log stay; see reset_stats)."""
        with self._lock:
            self._rules = []

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = ProxyStats()
            self._exchanges = []

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    @property
    def stats(self) -> ProxyStats:
        with self._lock:
            return replace(self._stats, faults=dict(self._stats.faults))

    @property
    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return [replace(e) for e in self._exchanges]

    def _select(self, method: str | None, path: str) -> list[Exchange]:
        probe = Rule("reset", method.upper() if method else None, path)
        return [e for e in self.exchanges if probe.matches(e.method, e.target, e.range is not None)]

    def requests(self, method: str | None = None, path: str = "") -> int:
        """How many requests matched ``method`` and the target substring ``path``."""
        return len(self._select(method, path))

    def sent_bytes(self, method: str | None = None, path: str = "") -> int:
        """Request body bytes forwarded upstream for the matching requests (what was uploaded)."""
        return sum(e.sent_bytes for e in self._select(method, path))

    def body_bytes(self, method: str | None = None, path: str = "") -> int:
        """Response payload bytes forwarded to the client for the matching requests."""
        return sum(e.body_bytes for e in self._select(method, path))

    def _begin(self, method: str, target: str, range_value: str | None,
               paused: bool) -> tuple[Rule | None, list[Rule], Exchange]:
        """Log a request; unless paused, pick the rule that fires on it (at most one)."""
        with self._lock:
            rule, matched = (None, []) if paused else self._match(method, target,
                                                                  range_value is not None)
            record = Exchange(method, target, range_value, fault=rule.kind if rule else None)
            self._stats.requests += 1
            if len(self._exchanges) < _MAX_EXCHANGES:
                self._exchanges.append(record)
        return rule, matched, record

    def _match(self, method: str, target: str, has_range: bool) -> tuple[Rule | None, list[Rule]]:
        fired = None
        matched = []
        for rule in self._rules:
            if rule.matches(method, target, has_range):
                rule.seen += 1
                matched.append(rule)
                if fired is None and (rule.count is None or rule.fired < rule.count):
                    rule.fired += 1
                    fired = rule
        if fired is not None:
            self._stats.faults[fired.kind] = self._stats.faults.get(fired.kind, 0) + 1
        return fired, matched

    def _count_sent(self, record: Exchange, n: int) -> None:
        with self._lock:
            record.sent_bytes += n

    def _count_bytes(self, record: Exchange, matched: list[Rule], n: int) -> None:
        with self._lock:
            record.body_bytes += n
            self._stats.body_bytes += n
            for rule in matched:
                rule.body_bytes += n
