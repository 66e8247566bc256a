"""What a storage says about an object's bytes, for files the agent did not write (no manifest of
ours): a Baseten job's checkpoint files, the objects under a plain S3 prefix.

Kinds, strongest evidence first (docs/store-layout.md, "Files the agent did not write"):
- a full-object checksum S3 keeps (`x-amz-checksum-crc32c`, `-crc32`, `-sha256`, `-sha1`); a
  COMPOSITE one (of a multipart upload's parts, `...-N`) says nothing about the whole and is not used;
- MD5: the ETag of a single-part, unencrypted or SSE-S3 object is the MD5 of its bytes (a multipart
  ETag ends in `-N`; an SSE-KMS or SSE-C one is not an MD5);
- size: nothing else is known, so only the size is checked, and the load says so for the file.
CRC64NVME (S3's default for new uploads since 2025) is not computed here (no fast implementation
among the agent's dependencies): such an object falls back to its ETag, else to the size.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ckpt_agent.disk.digests import checksum

SIZE = "size"
MD5 = "md5"
_CHECKSUMS = ("crc32c", "crc32", "sha256", "sha1")  # x-amz-checksum-<kind>, cheapest first
KINDS = (*_CHECKSUMS, MD5, SIZE)
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")
_NOT_MD5_SSE = {"aws:kms", "aws:kms:dsse"}


@dataclass(frozen=True)
class StorageCheck:
    """`value`: the expected digest in lower-case hex ("" for SIZE); `etag`: the object's identity,
    compared across the requests of one load so an object that changes mid-load is caught."""

    kind: str
    value: str
    etag: str


@dataclass(frozen=True)
class ForeignFile:
    """Where a file the agent did not write is kept, and (if known before the first byte) what its
    storage says about it; None: learnt from the first response."""

    key: str
    check: StorageCheck | None = None


def storage_check(headers: Mapping[str, str]) -> StorageCheck:
    """The strongest evidence in an object's response headers (keys in lower case)."""
    etag = headers.get("etag", "").strip().strip('"').lower()
    composite = headers.get("x-amz-checksum-type", "").upper() == "COMPOSITE"
    for kind in _CHECKSUMS:
        raw = headers.get(f"x-amz-checksum-{kind}", "")
        if raw and not composite and "-" not in raw:
            try:
                return StorageCheck(kind, base64.b64decode(raw, validate=True).hex(), etag)
            except (binascii.Error, ValueError):
                continue
    encrypted = (headers.get("x-amz-server-side-encryption", "").lower() in _NOT_MD5_SSE
                 or headers.get("x-amz-server-side-encryption-customer-algorithm"))
    if _MD5_ETAG.fullmatch(etag) and not encrypted:
        return StorageCheck(MD5, etag, etag)
    return StorageCheck(SIZE, "", etag)


class Digest(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Crc:
    """zlib's crc32 or crc32c behind hashlib's interface; S3 sends them big-endian."""

    def __init__(self, function) -> None:  # noqa: ANN001 - zlib.crc32 or digests.checksum
        self._function, self._value = function, 0

    def update(self, data: bytes | memoryview, /) -> None:
        self._value = self._function(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


def new_digest(kind: str) -> Digest | None:
    """A running digest of `kind`; None for SIZE."""
    if kind == "crc32":
        return _Crc(zlib.crc32)
    if kind == "crc32c":
        return _Crc(checksum)
    if kind in ("sha256", "sha1", MD5):
        return hashlib.new(kind, usedforsecurity=False)
    return None
