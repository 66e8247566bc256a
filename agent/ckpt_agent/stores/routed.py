"""The stores of one load behind one Store: keys `s3://bucket/key` (the objects of an s3_prefix
reference) go to a store on that bucket, opened on first use with BT_CHECKPOINT_STORE's S3 engine,
credentials and endpoint; every other key goes to BT_CHECKPOINT_STORE itself. Store keys of our
layout start with `jobs/` or `projects/`, and a Baseten file's key with a project id, so nothing
else ever starts with `s3://`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import BinaryIO

from ckpt_agent.stores.base import Listing, RangeReader, Store

S3 = "s3://"


def s3_key(bucket: str, key: str) -> str:
    return f"{S3}{bucket}/{key}"


class Routed(Store):
    """`open_main()`: BT_CHECKPOINT_STORE's store, opened on first use, so a load of s3_prefix references
    alone never needs it (nor, for `baseten`, a key); `open_bucket(bucket)`: a store whose root is that bucket."""

    def __init__(self, open_main: Callable[[], Store], open_bucket: Callable[[str], Store]) -> None:
        self._open_main, self._open_bucket = open_main, open_bucket
        self._main: Store | None = None
        self._buckets: dict[str, Store] = {}
        self._lock = threading.Lock()

    @property
    def main(self) -> Store:
        with self._lock:
            if self._main is None:
                self._main = self._open_main()
            return self._main

    def _route(self, key: str) -> tuple[Store, str]:
        if not key.startswith(S3):
            return self.main, key
        bucket, _, rest = key[len(S3):].partition("/")
        with self._lock:
            if bucket not in self._buckets:
                self._buckets[bucket] = self._open_bucket(bucket)
            return self._buckets[bucket], rest

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        store, rest = self._route(key)
        return store.read_bytes(rest, limit)

    def write_bytes(self, key: str, data: bytes) -> None:
        store, rest = self._route(key)
        store.write_bytes(rest, data)

    def list_dir(self, prefix: str) -> Listing:
        store, rest = self._route(prefix)
        return store.list_dir(rest)

    def open_range(self, key: str, start: int, length: int) -> RangeReader:
        store, rest = self._route(key)
        return store.open_range(rest, start, length)

    def upload_file(self, key: str, source: BinaryIO, size: int) -> None:
        store, rest = self._route(key)
        store.upload_file(rest, source, size)

    def delete(self, key: str) -> None:
        store, rest = self._route(key)
        store.delete(rest)

    def head(self, key: str) -> dict[str, str]:
        store, rest = self._route(key)
        return store.head(rest)

    def describe(self) -> str:
        return self.main.describe()

    def close(self) -> None:
        for store in [*([self._main] if self._main is not None else []), *self._buckets.values()]:
            store.close()
