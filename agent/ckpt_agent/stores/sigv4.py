"""AWS Signature Version 4 for S3 requests: pure functions, no I/O.

Signing is a handful of HMACs; doing it here instead of through botocore's event machinery is
what makes a request cost tens of microseconds of CPU instead of milliseconds.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from urllib.parse import quote

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None

    def __repr__(self) -> str:
        return "Credentials(<redacted>)"


def uri_encode(value: str, safe: str = "") -> str:
    return quote(value, safe="-_.~" + safe)


def canonical_query(params: dict[str, str]) -> str:
    return "&".join(f"{uri_encode(k)}={uri_encode(v)}" for k, v in sorted(params.items()))


@lru_cache(maxsize=16)
def _signing_key(secret: str, date: str, region: str) -> bytes:
    key = hmac.new(f"AWS4{secret}".encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign(method: str, host: str, path: str, query: str, creds: Credentials, region: str,
         payload_hash: str = EMPTY_SHA256, now: datetime | None = None,
         extra_headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers (including Authorization) for one request; `path` is already URI-encoded."""
    now = now or datetime.now(UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    if creds.token:
        headers["x-amz-security-token"] = creds.token
    for name, value in (extra_headers or {}).items():
        headers[name.lower()] = value.strip()
    signed = ";".join(sorted(headers))
    canonical_headers = "".join(f"{k}:{headers[k]}\n" for k in sorted(headers))
    request = f"{method}\n{path}\n{query}\n{canonical_headers}\n{signed}\n{payload_hash}"
    scope = f"{date}/{region}/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(request.encode()).hexdigest()}"
    signature = hmac.new(_signing_key(creds.secret_key, date, region), to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    return headers
