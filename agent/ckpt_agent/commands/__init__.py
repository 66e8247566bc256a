"""One module per command, each a plain function: (Context, its options) -> exit status.

No command imports argparse or reads os.environ: ckpt_agent.cli turns flags into the options
dataclass and the environment into the Context. What a command needs only on some paths is
imported on those paths, so `run` hands over to the trainer without loading what it did not use.
"""
