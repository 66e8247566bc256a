"""A trainer whose start-up takes argv[1] seconds (imports, CUDA set-up, model, data on a GPU node;
here a sleep), and whose first step asks for its checkpoint: it exits right there, so the wall time
of `ckpt-agent run -- python slow_trainer.py S` is the time to the first step."""

import sys
import time

import ckpt_agent

time.sleep(float(sys.argv[1]))
if ckpt_agent.latest_local_checkpoint() is None:
    sys.exit("slow_trainer: nothing was loaded")
