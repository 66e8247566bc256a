#!/bin/sh
# Saves a small sample checkpoint to the embedded local store (/tmp/ckpt-store), then runs the
# main job: `ckpt-agent run` loads the newest checkpoint of project "demo" into
# /tmp/loaded_checkpoints and execs a command that shows what it got. No network.
# Uses the repository's .venv, or the ckpt-agent named by $CKPT_AGENT.
set -eu
agent=${CKPT_AGENT:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/ckpt-agent}
sample=$(mktemp -d)
trap 'rm -rf "$sample"' EXIT

mkdir "$sample/checkpoint-1"
echo '{"global_step": 1}' > "$sample/checkpoint-1/trainer_state.json"
head -c 10000000 /dev/urandom > "$sample/checkpoint-1/model.safetensors"

export BT_CHECKPOINT_STORE=/tmp/ckpt-store
"$agent" save "$sample/checkpoint-1" --project demo --job-id job-1

# The single quotes are meant: the command expands BT_LOAD_CHECKPOINT_DIR that run sets for it.
# shellcheck disable=SC2016
BT_TRAINING_PROJECT_NAME=demo \
BT_LOAD_CHECKPOINT_CONFIG='{"enabled": true, "checkpoints": [{"typ": "baseten_latest_checkpoint", "project_name": null, "job_id": null}], "download_folder": "/tmp/loaded_checkpoints"}' \
  "$agent" run -- sh -c 'echo "BT_LOAD_CHECKPOINT_DIR=$BT_LOAD_CHECKPOINT_DIR"; find "$BT_LOAD_CHECKPOINT_DIR/rank-0" -type f | sort'
