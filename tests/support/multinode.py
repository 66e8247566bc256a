"""A multi-node job on one machine, as the platform runs one: every node a `ckpt-agent run` (or a
bare trainer) of its own, in a mount namespace of its own.

Frameworks rely on one path string meaning "this node's folder" on every node, and the
platform's BT_CHECKPOINT_DIR and download folder are node-local. So each node gets its own
folder on the host (`<job>/node-<r>/`), bind-mounted (`unshare -m`, private propagation; CI
runs as root) at the one path every node uses (`<job>/view/`): a node's `view/ckpts` is its own
checkpoint folder, `view/loaded` its own download folder, and nothing it writes there is seen
by another node. All nodes share the test's store and talk over torch.distributed with gloo on
127.0.0.1 (BT_LEADER_ADDR, MASTER_ADDR, MASTER_PORT), one process per node.

A resume: `launch(..., "--resume", "agent", load=[latest(job_id="job-1")])` loads into each
node's `view/loaded` before its trainer starts; `size=1` is a 1-node job (no process group).

The Popen of each node is the agent (or trainer) itself: `unshare` and `sh` exec into it, so a
signal sent to it reaches the agent, and the `procs` fixture kills it by its own pid.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ckpt_agent.stores import layout
from tests.support.helpers import AGENT, StoreUnderTest, start, sync_env
from tests.support.specs import spec

SCRIPTS = Path(__file__).parents[1] / "trainers"
TIMEOUT = 180
LOOPBACK = "127.0.0.1"
# Binds `$1` (the node's own folder) at `$2` (the path every node uses) in this namespace, then
# becomes the node's command.
_BIND = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def node_log(home: Path, rank: int) -> Path:
    """Beside the node's folder, not in it: the log is the test's, not the node's."""
    return home.parent / f"node-{rank}.log"


@dataclass
class Node:
    """One node: its process, and its own folder on the host (what it sees at the cluster's `view`)."""

    rank: int
    proc: subprocess.Popen
    home: Path

    @property
    def log(self) -> Path:
        return node_log(self.home, self.rank)

    @property
    def ckpts(self) -> Path:
        """This node's BT_CHECKPOINT_DIR, as the host sees it."""
        return self.home / "ckpts"

    @property
    def loaded(self) -> Path:
        """This node's download folder, as the host sees it."""
        return self.home / "loaded"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def result(self) -> dict:
        """What the trainer script wrote to `--out` (tests/trainers/common.py: finish)."""
        return json.loads((self.home / "result.json").read_text())


@dataclass
class Cluster:
    job: str
    view: Path  # the path every node sees its own folder at
    nodes: list[Node]

    @property
    def size(self) -> int:
        return len(self.nodes)

    def text(self) -> str:
        """Every node's log, headed by its rank (for assertion messages)."""
        return "\n".join(f"--- node {n.rank} ---\n{n.text()}" for n in self.nodes)

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        return [n.wait(timeout) for n in self.nodes]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        for n in self.nodes:
            n.proc.send_signal(signum)

    def trainer_args(self) -> list[str]:
        """`--dir` and `--out` for a tests/trainers script: the paths every node uses."""
        return ["--dir", str(self.view / "ckpts"), "--out", str(self.view / "result.json")]


def node_env(store: StoreUnderTest, job: str, view: Path, rank: int, size: int, port: int,
             **extra: str) -> dict[str, str]:
    """What the platform gives node `rank` (BT_NODE_RANK, BT_GROUP_SIZE, BT_LEADER_ADDR), what
    torch.distributed's env:// rendezvous reads (one process per node), and the sidecar's short
    test timings (tests.support.helpers.sync_env)."""
    return sync_env(store, view / "ckpts", job=job, BT_NODE_RANK=str(rank), BT_GROUP_SIZE=str(size),
                    BT_LEADER_ADDR=LOOPBACK, MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), RANK=str(rank),
                    WORLD_SIZE=str(size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GLOO_SOCKET_IFNAME="lo",
                    **extra)


def launch(procs: list, root: Path, store: StoreUnderTest, job: str, script: str, *args: object,
           size: int = 2, agent: bool = True, agent_flags: Sequence[str] = (), load: Sequence[dict] = (),
           env: dict[str, str] | None = None) -> Cluster:
    """`size` nodes of job `job`, each `ckpt-agent run [agent_flags] -- python tests/trainers/SCRIPT
    --dir VIEW/ckpts --out VIEW/result.json ARGS` with checkpointing on (`agent=False`: the script
    alone, e.g. an uninterrupted reference run). `load`: references to load into VIEW/loaded first
    (BT_LOAD_CHECKPOINT_CONFIG); `env`: more variables for every node."""
    base = root / job
    view = base / "view"
    view.mkdir(parents=True)
    cluster = Cluster(job, view, [])
    port = free_port()
    argv = [sys.executable, str(SCRIPTS / script), *cluster.trainer_args(), *map(str, args)]
    if agent:
        argv = [AGENT, "run", *agent_flags, "--", *argv]
    for rank in range(size):
        home = base / f"node-{rank}"
        (home / "ckpts").mkdir(parents=True)
        extra = dict(env or {}, BT_CHECKPOINTING_ENABLED="1" if agent else "0")
        if load:
            extra["BT_LOAD_CHECKPOINT_CONFIG"] = spec(view / "loaded", *load)
        wrapped = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _BIND, "sh",
                   str(home), str(view), *argv]
        proc = start(procs, wrapped, node_env(store, job, view, rank, size, port, **extra), node_log(home, rank))
        cluster.nodes.append(Node(rank, proc, home))
    return cluster


def rank_state(store: StoreUnderTest, job: str, name: str, rank: int) -> str | None:
    """"manifest" when node `rank` committed its files of `name`, "nothing" when it recorded that it
    has none, None when neither (yet)."""
    if store.exists(layout.manifest_key(job, name, rank)):
        return "manifest"
    if store.exists(layout.nothing_key(job, name, rank)):
        return "nothing"
    return None


def manifest_paths(store: StoreUnderTest, job: str, name: str, rank: int) -> list[str]:
    """The files node `rank` committed of `name`, as its manifest lists them."""
    return [f["path"] for f in json.loads(store.read(layout.manifest_key(job, name, rank)))["files"]]


def listing(store: StoreUnderTest, job: str) -> dict[str, dict]:
    """`ckpt-agent ls --job-id JOB --json`: each checkpoint's row, by name."""
    result = subprocess.run([AGENT, "ls", "--job-id", job, "--json"], env=sync_env(store, Path("/nonexistent")),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {c["name"]: c for c in json.loads(result.stdout)["checkpoints"]}


def committed_by_all(store: StoreUnderTest, job: str, name: str, size: int) -> bool:
    """Every node 0..size-1 committed `name` (its files, or that it has none): complete for the job."""
    return all(rank_state(store, job, name, r) for r in range(size))
