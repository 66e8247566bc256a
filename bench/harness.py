"""What every contender shares: the server, the tools, a clean environment, and the data in the store.

The store is s3://<bucket>/bench. Each data set is saved there once by `ckpt-agent save` as
project `bench`, job `bench-<data set>`, checkpoint `<data set>`, and checked object by object.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from bench.checks import BenchError, list_store, verify_store
from bench.datasets import MB, Expected, generate, make_datasets
from bench.machine import find_tool, tool_version
from bench.relay import Relay
from bench.seaweed import SeaweedServer
from bench.timing import check_exit, run_timed

PREFIX = "bench"  # the store is s3://<bucket>/bench
PROJECT = "bench"


def _compile_agent() -> None:
    """Bytecode for every module up front, as `pip install` leaves it in an image: otherwise a
    checkout edited since its last run (or PYTHONDONTWRITEBYTECODE=1) times the compiler too."""
    import compileall

    import ckpt_agent

    compileall.compile_dir(Path(ckpt_agent.__file__).parent, quiet=1)


class Harness:
    def __init__(self, work: Path, server: SeaweedServer, relay: Relay, quick: bool, full: bool,
                 run_timeout: float | None) -> None:
        self.work = work
        self.server = server
        self.relay = relay
        self.client = server.client()
        self.bucket = server.bucket
        self.full = full
        self.run_timeout = run_timeout
        self.ckpt_agent = find_tool("ckpt-agent")
        _compile_agent()
        self.s5cmd = find_tool("s5cmd")
        self.true = "/bin/true" if os.path.exists("/bin/true") else find_tool("true")
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("AWS_", "BT_", "S3_", "CKPT_AGENT_"))}
        venv_bin = str(Path(sys.executable).parent)
        if venv_bin not in base.get("PATH", "").split(os.pathsep):
            base["PATH"] = venv_bin + os.pathsep + base.get("PATH", "")
        self.store = f"s3://{self.bucket}/{PREFIX}"
        # BT_CHECKPOINT_DIR names a folder that does not exist: a load finds no local copy
        # unless a workload (restart) points it at one
        self.env = {**base, **server.env(), "BT_CHECKPOINT_STORE": self.store,
                    "BT_CHECKPOINT_DIR": str(work / "no-trainer-folder")}
        self.counted_env = {"AWS_ENDPOINT_URL": relay.endpoint}  # the store, through the relay
        self.datasets = make_datasets(quick)
        self.sources: dict[str, Path] = {}
        self.expected: dict[str, Expected] = {}
        self.fill: dict[str, dict] = {}

    def tools(self) -> dict[str, str]:
        return {
            "s5cmd": f"{self.s5cmd} {tool_version([self.s5cmd, 'version'])}",
            "weed": tool_version([find_tool("weed"), "version"]),
            "boto3": tool_version([sys.executable, "-c",
                                   "import boto3; print('boto3', boto3.__version__)"]),
            "ckpt-agent": self.ckpt_agent,
        }

    def job(self, dataset: str) -> str:
        return f"bench-{dataset}"

    def checkpoint_prefix(self, job_dataset: str, name: str) -> str:
        return f"{PREFIX}/jobs/{self.job(job_dataset)}/checkpoints/{name}/"

    def rank_prefix(self, dataset: str) -> str:
        return self.checkpoint_prefix(dataset, dataset) + "rank-0/"

    def timeout(self, nbytes: int) -> float:
        if self.run_timeout:
            return self.run_timeout
        return 120 + nbytes / (5 * MB)  # generous: a healthy run is >100x faster

    def log(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"

    def prepare_data(self, names: list[str]) -> None:
        for name in names:
            dataset = self.datasets[name]
            root = self.work / "source" / name
            started = time.perf_counter()
            self.expected[name] = generate(dataset, root)
            self.sources[name] = root
            print(f"generated {name}: {dataset.describe()} in "
                  f"{time.perf_counter() - started:.1f}s (not timed)", flush=True)

    def fill_store(self, names: list[str]) -> None:
        for name in names:
            argv = [self.ckpt_agent, "save", str(self.sources[name]), "--project", PROJECT,
                    "--job-id", self.job(name), "--name", name]
            log = self.log(f"fill-{name}")
            m = run_timed(argv, self.env, log, self.timeout(self.datasets[name].total_bytes))
            what = f"fill {name} (ckpt-agent save)"
            check_exit(m, f"fill {name} with ckpt-agent save", argv, log)
            checked = verify_store(self.client, self.bucket, self.rank_prefix(name),
                                   self.expected[name], self.full, what)
            self.check_manifest(name, name, what)
            self.fill[name] = {"command": shlex.join(argv), "wall_s": m.wall_s,
                               "peak_rss_mib": m.maxrss_kib / 1024, **checked}
            print(f"filled {name} via ckpt-agent save in {m.wall_s:.2f}s", flush=True)

    def check_manifest(self, job_dataset: str, name: str, what: str) -> None:
        """ckpt-agent's upload is complete only with its manifest next to the files."""
        folder = self.checkpoint_prefix(job_dataset, name)
        keys = [k for k in list_store(self.client, self.bucket, folder)
                if not k.startswith("rank-0/")]
        if not any("manifest" in k for k in keys):
            raise BenchError(f"{what}: no manifest next to the files under "
                             f"s3://{self.bucket}/{folder} (found {keys[:5]})")
