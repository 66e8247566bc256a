"""Store backends behind one factory; an S3 client is built only when an s3:// store is used, an API
client only for BT_CHECKPOINT_STORE=baseten."""

from __future__ import annotations

import os
import stat

from ckpt_agent.config import settings as defaults
from ckpt_agent.config.settings import Settings
from ckpt_agent.errors import ConfigError, StoreError
from ckpt_agent.stores.base import Listing, RangeReader, Store
from ckpt_agent.stores.routed import Routed

__all__ = ["Listing", "RangeReader", "Store", "open_load_store", "open_store", "refuse_read_only"]


def open_store(settings: Settings) -> Store:
    """The native S3 engine unless CKPT_AGENT_S3_ENGINE=boto3 asks for botocore's."""
    location = settings.store
    if location.scheme == "s3":
        return _s3(settings, location.bucket, location.root)
    if location.scheme == "baseten":
        from ckpt_agent.stores.baseten import BasetenStore

        return BasetenStore(settings.baseten, settings.aws_env, settings.read_timeout)
    from ckpt_agent.stores.local import LocalStore

    if location.root == defaults.DEFAULT_STORE:
        check_owned_folder(location.root)
    return LocalStore(location.root)


def _s3(settings: Settings, bucket: str, root: str) -> Store:
    if settings.s3_engine == "boto3":
        from ckpt_agent.stores.s3boto import Boto3Store

        return Boto3Store(bucket, root, settings.workers, settings.read_timeout)
    from ckpt_agent.stores.s3native import NativeS3Store

    return NativeS3Store(bucket, root, settings.aws_env, settings.read_timeout)


def open_load_store(settings: Settings) -> Routed:
    """BT_CHECKPOINT_STORE, and the buckets of s3_prefix references (keys `s3://bucket/key`) with its S3
    settings and credentials."""
    return Routed(open_store(settings), lambda bucket: _s3(settings, bucket, ""))


def refuse_read_only(settings: Settings) -> None:
    """Before save and sync read anything: the baseten store takes no uploads (the platform uploads)."""
    if settings.store.scheme == "baseten":
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
