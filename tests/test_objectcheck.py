"""What a storage's answer says about an object's bytes (stores/objectcheck.py): the strongest
evidence it carries, and digests computed the way S3 spells them."""

from __future__ import annotations

import base64
import hashlib
import zlib

import crc32c
import pytest

from ckpt_agent.stores.objectcheck import StorageCheck, new_digest, storage_check

DATA = b"checkpoint bytes" * 1000
MD5 = hashlib.md5(DATA).hexdigest()


def _b64(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def test_a_full_object_checksum_wins_over_the_etag_and_matches_the_digest_of_the_bytes():
    headers = {"etag": f'"{MD5}"', "x-amz-checksum-crc32": _b64(zlib.crc32(DATA))}
    check = storage_check(headers)
    assert (check.kind, check.etag) == ("crc32", MD5)
    digest = new_digest(check.kind)
    assert digest is not None
    digest.update(DATA)
    assert digest.hexdigest() == check.value


def test_crc32c_is_read_big_endian_as_s3_sends_it():
    check = storage_check({"x-amz-checksum-crc32c": _b64(crc32c.crc32c(DATA))})
    digest = new_digest("crc32c")
    assert digest is not None
    digest.update(DATA[:100])
    digest.update(DATA[100:])
    assert check == StorageCheck("crc32c", digest.hexdigest(), "")


@pytest.mark.parametrize("headers", [
    {"x-amz-checksum-crc32": "vzwlWg==-3", "x-amz-checksum-type": "COMPOSITE"},  # SeaweedFS, a multipart upload
    {"x-amz-checksum-crc32": "vzwlWg==", "x-amz-checksum-type": "COMPOSITE"},
    {"x-amz-checksum-crc64nvme": "AAAAAAAAAAA="},  # not computed by the agent
    {"x-amz-checksum-crc32": "not base64!"},
])
def test_a_checksum_that_says_nothing_about_the_whole_object_falls_back_to_the_md5_etag(headers):
    assert storage_check({**headers, "etag": f'"{MD5.upper()}"'}) == StorageCheck("md5", MD5, MD5)


@pytest.mark.parametrize("headers", [
    {"etag": '"b2c0c0bf8c30138d59347f0d6b45f72b-3"'},  # multipart
    {"etag": f'"{MD5}"', "x-amz-server-side-encryption": "aws:kms"},
    {"etag": f'"{MD5}"', "x-amz-server-side-encryption-customer-algorithm": "AES256"},
    {},
])
def test_without_a_checksum_or_an_md5_etag_only_the_size_is_known(headers):
    assert storage_check(headers).kind == "size"
    assert new_digest("size") is None


def test_an_sse_s3_etag_is_still_the_md5():
    assert storage_check({"etag": f'"{MD5}"', "x-amz-server-side-encryption": "AES256"}).kind == "md5"
