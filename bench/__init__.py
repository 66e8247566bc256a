"""The ckpt-agent benchmark harness (see README.md); run it as `python bench/run.py`."""
