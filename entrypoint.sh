#!/bin/sh
# Container entrypoint: ckpt-agent loads the configured checkpoints (if any), then runs the
# training command (the container's arguments, else BT_START_COMMANDS): a plain command is
# exec'd in its place and keeps this PID; a shell command runs as its child so SIGTERM reaches it.
set -eu
# `docker run IMAGE -- CMD ...` works too: a leading `--` only separates, it is not the command.
if [ "${1-}" = "--" ]; then
    shift
fi
exec ckpt-agent run -- "$@"
