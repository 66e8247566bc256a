"""ckpt-agent: load verified checkpoints before training starts, upload them as it runs."""

__version__ = "0.1.0"


def latest_local_checkpoint(rank: int | None = None) -> str | None:
    """The newest loaded checkpoint folder under BT_LOAD_CHECKPOINT_DIR/rank-<rank>/ (rank defaults to
    BT_NODE_RANK, else 0), newest by the store's order as recorded at load time, or None when nothing
    was loaded. The folder keeps the store's name, e.g. `.../rank-0/checkpoint-100`."""
    from agent.verify import latest_local_checkpoint as _latest

    return _latest(rank)
