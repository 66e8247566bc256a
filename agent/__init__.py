"""ckpt-agent: load verified checkpoints before training starts, upload them as it runs."""

__version__ = "0.1.0"
