"""Store backends behind one factory; boto3 is imported only when an s3:// store is used."""

from __future__ import annotations

from agent.spec import StoreLocation
from agent.stores.base import Listing, RangeReader, Store

__all__ = ["Listing", "RangeReader", "Store", "open_store"]


def open_store(location: StoreLocation, max_connections: int = 32, read_timeout: float = 20) -> Store:
    """`read_timeout`: seconds without a byte before a request counts as stalled and is retried."""
    if location.scheme == "s3":
        from agent.stores.s3 import S3Store

        return S3Store(location.bucket, location.root, max_connections, read_timeout)
    from agent.stores.local import LocalStore

    return LocalStore(location.root)
