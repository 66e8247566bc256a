"""Store backends behind one factory; an S3 client is built only when an s3:// store is used."""

from __future__ import annotations

import os
import stat

from ckpt_agent.config.settings import StoreConfig
from ckpt_agent.errors import StoreError
from ckpt_agent.stores.base import Listing, RangeReader, Store

__all__ = ["Listing", "RangeReader", "Store", "open_store"]


def open_store(config: StoreConfig) -> Store:
    """The native S3 engine unless CKPT_AGENT_S3_ENGINE=boto3 asks for botocore's."""
    location = config.location
    if location.scheme == "s3" and config.engine == "boto3":
        from ckpt_agent.stores.s3boto import Boto3Store

        return Boto3Store(location.bucket, location.root, config.max_connections, config.read_timeout)
    if location.scheme == "s3":
        from ckpt_agent.stores.s3native import NativeS3Store

        return NativeS3Store(location.bucket, location.root, config.aws_env, config.read_timeout)
    from ckpt_agent.stores.local import LocalStore

    if config.is_default:
        check_owned_folder(location.root)
    return LocalStore(location.root)


def check_owned_folder(path: str) -> None:
    """The default store lies in /tmp, where any local user may create it first and plant checkpoints
    in it: trust it only if it is this user's (or root's) and no one else can write to it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        why = "not a folder (a link or a file)"
    elif info.st_uid not in (os.getuid(), 0):
        why = f"owned by another user (uid {info.st_uid})"
    elif info.st_mode & stat.S_IWOTH:
        why = "writable by every user"
    else:
        return
    raise StoreError(f"{path}: the default local store is {why}, so anyone could have planted checkpoints in it; "
                     "remove it, or set BT_CHECKPOINT_STORE to a folder of your own")
