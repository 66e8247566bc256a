"""ckpt-agent: load verified checkpoints before training starts, upload them as it runs."""
from __future__ import annotations

__all__ = ["CheckpointLoadError", "__version__", "latest_local_checkpoint"]


def __getattr__(name: str) -> object:
    """`ckpt_agent.__version__` on demand: a trainer's `import ckpt_agent` loads nothing else."""
    if name == "__version__":
        from ckpt_agent.version import __version__

        return __version__
    if name == "CheckpointLoadError":
        from ckpt_agent.runtime.loadstatus import CheckpointLoadError

        return CheckpointLoadError
    raise AttributeError(f"module 'ckpt_agent' has no attribute {name!r}")


def latest_local_checkpoint(rank: int | None = None) -> str | None:
    """The newest loaded checkpoint under BT_LOAD_CHECKPOINT_DIR/rank-<rank>/ (rank defaults to
    BT_NODE_RANK, else 0), newest by the store's order as recorded at load time, or None when nothing
    was loaded: the folder (`.../rank-0/checkpoint-100`), or for a single-file checkpoint the file
    (`.../rank-0/ckpt-5.pt/ckpt-5.pt`), so it goes straight into the framework's resume call.

    With an early start (`run --start-early`) it first waits until the load is complete and verified,
    with a progress line on stderr every few seconds, and raises CheckpointLoadError if it failed."""
    import os

    from ckpt_agent.disk.resume import latest_local_checkpoint as _latest
    from ckpt_agent.runtime.loadstatus import wait_for_load

    wait_for_load(os.environ)

    return _latest(rank)
