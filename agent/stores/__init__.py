"""Store backends behind one factory; an S3 client is built only when an s3:// store is used."""

from __future__ import annotations

from agent.settings import Settings
from agent.stores.base import Listing, RangeReader, Store

__all__ = ["Listing", "RangeReader", "Store", "open_store"]


def open_store(settings: Settings) -> Store:
    """The native S3 engine unless CKPT_AGENT_S3_ENGINE=boto3 asks for botocore's."""
    location = settings.store
    if location.scheme == "s3" and settings.s3_engine == "boto3":
        from agent.stores.s3 import S3Store

        return S3Store(location.bucket, location.root, settings.workers, settings.read_timeout)
    if location.scheme == "s3":
        from agent.stores.s3http import S3HttpStore

        return S3HttpStore(location.bucket, location.root, settings.aws_env, settings.read_timeout)
    from agent.stores.local import LocalStore

    return LocalStore(location.root)
