"""Store backends behind one factory; an S3 client is built only when an s3:// store is used, an API
client only for BT_CHECKPOINT_STORE=baseten."""

from __future__ import annotations

import os
import stat
from dataclasses import replace

from ckpt_agent.config.settings import StoreConfig
from ckpt_agent.errors import ConfigError, StoreError
from ckpt_agent.stores.base import Listing, RangeReader, Store
from ckpt_agent.stores.routed import Routed

__all__ = ["Listing", "RangeReader", "Store", "open_load_store", "open_store", "refuse_read_only"]


def open_store(config: StoreConfig) -> Store:
    """The native S3 engine unless CKPT_AGENT_S3_ENGINE=boto3 asks for botocore's."""
    location = config.location
    if location.scheme == "s3" and config.engine == "boto3":
        from ckpt_agent.stores.s3boto import Boto3Store

        return Boto3Store(location.bucket, location.root, config.max_connections, config.read_timeout)
    if location.scheme == "s3":
        from ckpt_agent.stores.s3native import NativeS3Store

        return NativeS3Store(location.bucket, location.root, config.aws_env, config.read_timeout)
    if location.scheme == "baseten":
        from ckpt_agent.stores.baseten import BasetenStore

        if config.baseten is None:
            raise ValueError("open_store: a baseten store needs StoreConfig.baseten")
        return BasetenStore(config.baseten, config.aws_env, config.read_timeout)
    from ckpt_agent.stores.local import LocalStore

    if config.is_default:
        check_owned_folder(location.root)
    return LocalStore(location.root)


def open_load_store(config: StoreConfig) -> Routed:
    """BT_CHECKPOINT_STORE, and the buckets of s3_prefix references (keys `s3://bucket/key`) with its S3
    engine, credentials and endpoint settings."""
    def bucket(name: str) -> Store:
        return open_store(replace(config, location=replace(config.location, scheme="s3", bucket=name, root="")))

    return Routed(lambda: open_store(config), bucket)


def refuse_read_only(config: StoreConfig) -> None:
    """Before save and sync read anything: the baseten store takes no uploads (the platform uploads)."""
    if config.location.scheme == "baseten":
        from ckpt_agent.stores.baseten import SAVE_REFUSED

        raise ConfigError(SAVE_REFUSED)


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
