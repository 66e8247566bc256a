"""Where the CPU of a new 1 GiB upload goes: the client's own (its rusage) against the store's (the
SeaweedFS process's CPU time in /proc), `ckpt-agent save` and `s5cmd cp` in alternated rounds.

    python bench/upload_cpu.py [--mib 1024] [--rounds 4] [--profile]

On a machine where the store shares the client's cores, the sum of the two bounds the wall time:
this is what says whether an upload is limited by the client or by the store (docs/benchmarks.md).
The last line says how far ahead of s5cmd a client that used no CPU at all could be here: s5cmd's
CPU (its own and the store's) over the store's alone, both medians. `--profile` runs SeaweedFS with
`-cpuprofile` and says which of its functions spent that CPU (bench/pprof.py reads the profile).
Each round saves under a new job id, so no round reuses an earlier one's parts inside the store.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import pprof  # noqa: E402
from bench.datasets import Dataset, MiB, generate  # noqa: E402
from bench.seaweed import start_seaweed  # noqa: E402

BIN = Path(sys.executable).parent
TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system seconds of a process and its reaped children, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / TICKS


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="profile SeaweedFS's CPU by function")
    args = parser.parse_args()
    cpu: dict[str, list[tuple[float, float]]] = {}  # contender -> (client CPU, store CPU) per round
    with tempfile.TemporaryDirectory(prefix="upload-cpu-") as tmp:
        source, profile = Path(tmp) / "source", Path(tmp) / "weed.pprof"
        generate(Dataset("upload", (("model.bin", args.mib * MiB),)), source)
        extra = [f"-cpuprofile={profile}"] if args.profile else []
        with start_seaweed(Path(tmp) / "weed", extra_args=extra) as server:
            env = {**os.environ, **server.env(), "BT_CHECKPOINT_STORE": "s3://checkpoints/cpu"}
            for r in range(args.rounds):
                order = [("ckpt-agent save", [str(BIN / "ckpt-agent"), "save", str(source), "--project", "p",
                                              "--job-id", f"job-{r}", "--name", f"upload-{r}"]),
                         ("s5cmd cp", [str(BIN / "s5cmd"), "--endpoint-url", server.endpoint, "cp",
                                       f"{source}/", f"s3://checkpoints/s5cmd/upload-{r}/"])]
                for name, argv in order if r % 2 else order[::-1]:
                    store_before, client_before = process_cpu(server.process.pid), children_cpu()
                    started = time.perf_counter()
                    subprocess.run(argv, env=env, check=True, capture_output=True)
                    wall = time.perf_counter() - started
                    client, store = children_cpu() - client_before, process_cpu(server.process.pid) - store_before
                    cpu.setdefault(name, []).append((client, store))
                    print(f"round {r} {name:16s} wall {wall:5.2f} s  client CPU {client:5.2f} s"
                          f"  store CPU {store:5.2f} s", flush=True)
        s5cmd = cpu["s5cmd cp"]
        store_median = statistics.median(store for runs in cpu.values() for _, store in runs)
        best = statistics.median(client + store for client, store in s5cmd) / store_median
        print(f"a client of no CPU at all would be at most {best:.2f}x s5cmd here "
              f"(s5cmd's CPU with the store's over the store's alone, medians)")
        if args.profile:  # written when the server stops
            seconds, functions = pprof.top(profile)
            print(f"SeaweedFS CPU in the profile: {seconds:.1f} s; spent in the function itself:")
            for function, share in functions:
                print(f"  {share:6.1%}  {function}")


if __name__ == "__main__":
    main()
