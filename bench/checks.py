"""Verifying what a contender left behind: a folder or a store prefix holds exactly the data set."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bench.datasets import CHUNK, Expected, checksum_file, crc32c_of


class BenchError(Exception):
    """The benchmark cannot give a trustworthy answer (a contender failed or lied)."""


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """{relative path: (inode, size, mtime_ns, ctime_ns)} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            st = path.lstat()
            out[path.relative_to(root).as_posix()] = (st.st_ino, st.st_size, st.st_mtime_ns,
                                                      st.st_ctime_ns)
    return out


def _same_names(found: set[str], expected: Expected, where: str, what: str) -> None:
    missing = sorted(set(expected) - found)
    extra = sorted(found - set(expected))
    if missing or extra:
        raise BenchError(
            f"{what}: {where} has {len(found)} files, expected {len(expected)}; "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")


def _verified(files: int, nbytes: int, full: bool) -> dict:
    return {"files": files, "bytes": nbytes, "contents": "crc32c" if full else "size"}


def verify_tree(root: Path, expected: Expected, full: bool, what: str) -> dict:
    """The folder holds exactly the expected files with the expected sizes (and contents)."""
    if not root.is_dir():
        raise BenchError(f"{what}: {root} does not exist after the run")
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                raise BenchError(f"{what}: {path} is not a regular file")
            found[path.relative_to(root).as_posix()] = path
    _same_names(set(found), expected, str(root), what)
    total = 0
    for rel, path in found.items():
        size, crc = expected[rel]
        actual = path.stat().st_size
        if actual != size:
            raise BenchError(f"{what}: {rel} has {actual} bytes, expected {size}")
        if full and checksum_file(path) != crc:
            raise BenchError(f"{what}: {rel} has the right size but wrong contents (crc32c)")
        total += actual
    return _verified(len(found), total, full)


def list_store(client, bucket: str, prefix: str) -> dict[str, int]:
    """{key relative to prefix: size} of every object under prefix."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix):]] = obj["Size"]
    return out


def checksum_object(client, bucket: str, key: str) -> int:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        return crc32c_of(iter(lambda: body.read(CHUNK), b""))
    finally:
        body.close()


def verify_store(client, bucket: str, prefix: str, expected: Expected, full: bool,
                 what: str) -> dict:
    """The prefix holds exactly the expected objects with the expected sizes (and contents)."""
    found = list_store(client, bucket, prefix)
    _same_names(set(found), expected, f"s3://{bucket}/{prefix}", what)
    for rel, (size, crc) in expected.items():
        if found[rel] != size:
            raise BenchError(f"{what}: object {prefix}{rel} has {found[rel]} bytes, expected {size}")
        if full and checksum_object(client, bucket, prefix + rel) != crc:
            raise BenchError(f"{what}: object {prefix}{rel} has wrong contents (crc32c)")
    return _verified(len(found), sum(found.values()), full)


def delete_prefix(client, bucket: str, prefix: str) -> None:
    keys = [prefix + rel for rel in list_store(client, bucket, prefix)]
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
