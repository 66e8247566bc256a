#!/bin/sh
# Container entrypoint: ckpt-agent loads the configured checkpoints (if any), then
# execs the training command in its place, so the trainer keeps this PID and its exit status.
set -eu
exec ckpt-agent run -- "$@"
