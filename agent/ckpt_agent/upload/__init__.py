"""An upload, stage by stage: scan what a checkpoint on disk holds, pack small files, reuse parts the
store already has, and commit (files first, the manifest last)."""
