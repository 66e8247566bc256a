"""The sidecar: uploads checkpoints from BT_CHECKPOINT_DIR as training writes them (docs/sidecar.md).

formats (which entries are checkpoints) and observe (what is on disk) feed readiness (may it be
committed now, and if not, why); ledger remembers what this job has committed, retention deletes
beyond --keep-last, loop runs it all and standalone is `ckpt-agent sync` itself.
"""
