"""Benchmark: ckpt-agent against s5cmd and a hand-written boto3 script, on a local SeaweedFS.

    python bench/run.py [--quick] [--runs N] [--workloads big,sharded,...] [--out results.json]

Starts SeaweedFS (127.0.0.1 only) in a temporary folder, fills it with `ckpt-agent save`, then
times whole processes (wall time and the child's peak RSS from os.wait4), alternating the
contenders round by round, rotating who goes first (ABC BCA CAB ...). Every download is
verified afterwards (file set, sizes and, by default, crc32c of every byte); a mismatch stops
the benchmark with an error.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BOTO3_SCRIPT = Path(__file__).resolve().parent / "boto3_download.py"

KiB, MiB, GiB = 1024, 1024**2, 1024**3
MB = 1_000_000  # throughput is reported in MB/s (10^6 bytes per second)
CHUNK = 8 * MiB
PREFIX = "bench"  # the store is s3://<bucket>/bench
PROJECT = "bench"
ALL_WORKLOADS = ("big", "sharded", "small", "warm-big", "warm-small", "noop", "upload")
ALIASES = {"warm": ("warm-big", "warm-small"), "all": ALL_WORKLOADS}
# Which generated data set each workload uses, and whether it must be in the store first.
DATASET_OF = {"big": "big", "sharded": "sharded", "small": "small", "warm-big": "big",
              "warm-small": "small", "upload": "sharded"}
NEEDS_FILL = {"big", "sharded", "small", "warm-big", "warm-small"}
TAIL_LINES = 40


class BenchError(Exception):
    """The benchmark cannot give a trustworthy answer (a contender failed or lied)."""


# --------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class Dataset:
    name: str
    files: tuple[tuple[str, int], ...]  # (relative path, size)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        sizes = sorted({size for _, size in self.files})
        each = "/".join(human(s) for s in sizes)
        return f"{len(self.files)} x {each} = {human(self.total_bytes)}"


def human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


def make_datasets(quick: bool) -> dict[str, Dataset]:
    big = 8 * MiB if quick else 2 * GiB
    shards, shard = (4, 2 * MiB) if quick else (16, 128 * MiB)
    smalls, small = (50, 4 * KiB) if quick else (2000, 64 * KiB)
    return {
        "big": Dataset("big", (("model.safetensors", big),)),
        "sharded": Dataset("sharded", tuple(
            (f"model-{i + 1:05d}-of-{shards:05d}.safetensors", shard) for i in range(shards))),
        # nested folders, 100 files each, so relative paths with '/' are exercised
        "small": Dataset("small", tuple(
            (f"part-{i // 100:02d}/file-{i:05d}.bin", small) for i in range(smalls))),
    }


def checksum_file(path: Path) -> int:
    import crc32c

    value = 0
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            value = crc32c.crc32c(view[:n], value)
    return value


def generate(dataset: Dataset, root: Path) -> dict[str, tuple[int, int]]:
    """Random files under root; returns {relative path: (size, crc32c)}. Not timed."""
    import crc32c

    expected = {}
    for rel, size in dataset.files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        value = 0
        with open(path, "wb") as f:
            left = size
            while left:
                block = os.urandom(min(CHUNK, left))
                f.write(block)
                value = crc32c.crc32c(block, value)
                left -= len(block)
        expected[rel] = (size, value)
    return expected


# --------------------------------------------------------------------------- verification


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """{relative path: (inode, size, mtime_ns, ctime_ns)} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            st = path.lstat()
            out[path.relative_to(root).as_posix()] = (st.st_ino, st.st_size, st.st_mtime_ns,
                                                      st.st_ctime_ns)
    return out


def verify_tree(root: Path, expected: dict[str, tuple[int, int]], full: bool, what: str) -> dict:
    """The folder holds exactly the expected files with the expected sizes (and contents)."""
    if not root.is_dir():
        raise BenchError(f"{what}: {root} does not exist after the run")
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                raise BenchError(f"{what}: {path} is not a regular file")
            found[path.relative_to(root).as_posix()] = path
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise BenchError(
            f"{what}: {root} has {len(found)} files, expected {len(expected)}; "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    total = 0
    for rel, path in found.items():
        size, crc = expected[rel]
        actual = path.stat().st_size
        if actual != size:
            raise BenchError(f"{what}: {rel} has {actual} bytes, expected {size}")
        if full and checksum_file(path) != crc:
            raise BenchError(f"{what}: {rel} has the right size but wrong contents (crc32c)")
        total += actual
    return {"files": len(found), "bytes": total, "contents": "crc32c" if full else "size"}


def list_store(client, bucket: str, prefix: str) -> dict[str, int]:
    """{key relative to prefix: size} of every object under prefix."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix):]] = obj["Size"]
    return out


def checksum_object(client, bucket: str, key: str) -> int:
    import crc32c

    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    value = 0
    try:
        while block := body.read(CHUNK):
            value = crc32c.crc32c(block, value)
    finally:
        body.close()
    return value


def verify_store(client, bucket: str, prefix: str, expected: dict[str, tuple[int, int]],
                 full: bool, what: str) -> dict:
    found = list_store(client, bucket, prefix)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise BenchError(
            f"{what}: s3://{bucket}/{prefix} has {len(found)} objects, expected "
            f"{len(expected)}; missing {missing[:5]}, unexpected {extra[:5]}")
    for rel, (size, crc) in expected.items():
        if found[rel] != size:
            raise BenchError(f"{what}: object {prefix}{rel} has {found[rel]} bytes, expected {size}")
        if full and checksum_object(client, bucket, prefix + rel) != crc:
            raise BenchError(f"{what}: object {prefix}{rel} has wrong contents (crc32c)")
    return {"files": len(found), "bytes": sum(found.values()), "contents": "crc32c" if full else "size"}


def delete_prefix(client, bucket: str, prefix: str) -> None:
    keys = [prefix + rel for rel in list_store(client, bucket, prefix)]
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --------------------------------------------------------------------------- timing


@dataclass
class Measurement:
    wall_s: float
    maxrss_kib: int
    returncode: int
    timed_out: bool
    outer_wall_s: float  # as seen from here, including the launcher's own start-up


# Runs the contender as its own child and reports that child's wall time and os.wait4 rusage.
# Why a launcher: a child forked by this (large) Python process inherits its RSS high-water mark
# through fork/vfork + exec, so ru_maxrss would report the harness's peak instead of the
# contender's. Forked from this minimal interpreter (python -S -I, ~5 MiB) the floor is ~5 MiB,
# and ru_maxrss is a max, so every contender that peaks above that is measured exactly.
LAUNCHER = r"""
import os, sys, time
result, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        os.write(2, ("launcher: cannot run %s: %s\n" % (argv[0], exc)).encode())
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(result, "w") as f:
    f.write("%r %d %d\n" % (wall, usage.ru_maxrss, os.waitstatus_to_exitcode(status)))
"""


def run_timed(argv: list[str], env: dict[str, str], log: Path, timeout: float) -> Measurement:
    """Run one whole process; wall time from just before fork to after reaping, and its peak RSS.

    stdout and stderr go to `log`; the process gets its own session so a timeout (or our own
    interruption) kills it and anything it started.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    result = log.with_suffix(".rusage")
    result.unlink(missing_ok=True)
    timed_out = threading.Event()
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-I", "-c", LAUNCHER, str(result), *argv],
                                env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, _ = os.wait4(proc.pid, 0)
            outer = time.perf_counter() - start
        except BaseException:
            kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, tell Popen
    with contextlib.suppress(ProcessLookupError):  # nothing it started may outlive it
        os.killpg(proc.pid, signal.SIGKILL)
    if timed_out.is_set():
        return Measurement(outer, 0, -9, True, outer)
    try:
        wall, maxrss, code = result.read_text().split()
    except (OSError, ValueError):
        raise BenchError(f"the launcher for {shlex.join(argv)} failed (exit status "
                         f"{proc.returncode}):\n{tail(log)}") from None
    return Measurement(float(wall), int(maxrss), int(code), False, outer)


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def check_exit(m: Measurement, what: str, argv: list[str], log: Path) -> None:
    if m.timed_out:
        raise BenchError(f"{what}: timed out after {m.wall_s:.0f}s: {shlex.join(argv)}\n"
                         f"--- last lines of {log}:\n{tail(log)}")
    if m.returncode != 0:
        raise BenchError(f"{what}: exit status {m.returncode}: {shlex.join(argv)}\n"
                         f"--- last lines of {log}:\n{tail(log)}")


# --------------------------------------------------------------------------- machine


def machine_info(folder: Path) -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 1024**2, 1)
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu,
        "memory_gib": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "disk": disk_info(folder),
        "loadavg_at_start": os.getloadavg(),
    }


def disk_info(folder: Path) -> dict:
    """The mount holding `folder`: device, file system, rotational flag, free space."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            device, mountpoint, fstype = parts[0], parts[1].replace("\\040", " "), parts[2]
            inside = str(folder) == mountpoint or str(folder).startswith(mountpoint.rstrip("/") + "/")
            if inside and len(mountpoint) >= len(best[0]):
                best = (mountpoint, device, fstype)
    rotational = None
    dev_name = Path(best[1]).name
    for candidate in (dev_name, dev_name.rstrip("0123456789").removesuffix("p")):
        flag = Path(f"/sys/class/block/{candidate}/queue/rotational")
        if flag.exists():
            rotational = flag.read_text().strip() == "1"
            break
    usage = shutil.disk_usage(folder)
    return {"folder": str(folder), "mountpoint": best[0], "device": best[1], "fstype": best[2],
            "rotational": rotational, "free_gib": round(usage.free / GiB, 1)}


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def find_tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        raise BenchError(f"{name} not found on PATH or next to {sys.executable}")
    return found


# --------------------------------------------------------------------------- benchmark


@dataclass
class Contender:
    name: str
    argv: Callable[[int], list[str]]  # round -> command line
    env: dict[str, str]
    check: Callable[[int], dict]  # after a successful run: verify (raises BenchError)
    prepare: Callable[[int], None] = lambda _round: None  # before a run, not timed
    shown_env: dict[str, str] = field(default_factory=dict)  # env worth printing with argv

    def command(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.shown_env.items())
        return (prefix + " " if prefix else "") + shlex.join(self.argv(0))


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, server) -> None:
        self.args = args
        self.work = work
        self.server = server
        self.client = server.client()
        self.bucket = server.bucket
        self.full = args.verify == "full"
        self.ckpt_agent = find_tool("ckpt-agent")
        self.s5cmd = find_tool("s5cmd")
        self.true = "/bin/true" if os.path.exists("/bin/true") else find_tool("true")
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("AWS_", "BT_", "S3_", "CKPT_AGENT_"))}
        venv_bin = str(Path(sys.executable).parent)
        if venv_bin not in base.get("PATH", "").split(os.pathsep):
            base["PATH"] = venv_bin + os.pathsep + base.get("PATH", "")
        self.store = f"s3://{self.bucket}/{PREFIX}"
        self.env = {**base, **server.env(), "BT_CHECKPOINT_STORE": self.store}
        self.datasets = make_datasets(args.quick)
        self.sources: dict[str, Path] = {}
        self.expected: dict[str, dict[str, tuple[int, int]]] = {}
        self.fill: dict[str, dict] = {}
        self.rows: list[dict] = []

    # ---- setup

    def job(self, dataset: str) -> str:
        return f"bench-{dataset}"

    def rank_prefix(self, dataset: str) -> str:
        return f"{PREFIX}/jobs/{self.job(dataset)}/checkpoints/{dataset}/rank-0/"

    def timeout(self, nbytes: int) -> float:
        if self.args.run_timeout:
            return self.args.run_timeout
        return 120 + nbytes / (5 * MB)  # generous: a healthy run is >100x faster

    def prepare_data(self, workloads: list[str]) -> None:
        for name in dict.fromkeys(DATASET_OF[w] for w in workloads if w in DATASET_OF):
            dataset = self.datasets[name]
            root = self.work / "source" / name
            started = time.perf_counter()
            self.expected[name] = generate(dataset, root)
            self.sources[name] = root
            print(f"generated {name}: {dataset.describe()} in "
                  f"{time.perf_counter() - started:.1f}s (not timed)", flush=True)

    def fill_store(self, workloads: list[str]) -> None:
        for name in dict.fromkeys(DATASET_OF[w] for w in workloads if w in NEEDS_FILL):
            argv = [self.ckpt_agent, "save", str(self.sources[name]), "--project", PROJECT,
                    "--job-id", self.job(name), "--name", name]
            log = self.work / "logs" / f"fill-{name}.log"
            m = run_timed(argv, self.env, log, self.timeout(self.datasets[name].total_bytes))
            check_exit(m, f"fill {name} with ckpt-agent save", argv, log)
            checked = verify_store(self.client, self.bucket, self.rank_prefix(name),
                                   self.expected[name], self.full,
                                   f"fill {name} (ckpt-agent save)")
            self.check_manifest(name, name, f"fill {name} (ckpt-agent save)")
            self.fill[name] = {"command": shlex.join(argv), "wall_s": m.wall_s,
                               "peak_rss_mib": m.maxrss_kib / 1024, **checked}
            print(f"filled {name} via ckpt-agent save in {m.wall_s:.2f}s", flush=True)

    def check_manifest(self, job_dataset: str, name: str, what: str) -> None:
        folder = f"{PREFIX}/jobs/{self.job(job_dataset)}/checkpoints/{name}/"
        keys = [k for k in list_store(self.client, self.bucket, folder)
                if not k.startswith("rank-0/")]
        if not any("manifest" in k for k in keys):
            raise BenchError(f"{what}: no manifest next to the files under "
                             f"s3://{self.bucket}/{folder} (found {keys[:5]})")

    # ---- contenders

    def load_config(self, dataset: str, dest: Path) -> str:
        return json.dumps({"enabled": True, "checkpoints": [{
            "typ": "baseten_named_checkpoint", "checkpoint_name": dataset,
            "job_id": self.job(dataset)}], "download_folder": str(dest)})

    def ckpt_load(self, dataset: str, dest: Path, name: str = "ckpt-agent") -> Contender:
        config = self.load_config(dataset, dest)
        return Contender(
            name, lambda _r: [self.ckpt_agent, "load"],
            {**self.env, "BT_LOAD_CHECKPOINT_CONFIG": config},
            check=lambda _r: verify_tree(dest / "rank-0" / dataset, self.expected[dataset],
                                         self.full, f"{name} load of {dataset}"),
            shown_env={"BT_LOAD_CHECKPOINT_CONFIG": config})

    def s5cmd_get(self, dataset: str, dest: Path, name: str = "s5cmd",
                  flags: tuple[str, ...] = ()) -> Contender:
        source = f"s3://{self.bucket}/{self.rank_prefix(dataset)}*"
        argv = [self.s5cmd, "--endpoint-url", self.server.endpoint, "cp", *flags, source,
                f"{dest}/"]
        return Contender(
            name, lambda _r: argv, self.env,
            check=lambda _r: verify_tree(dest, self.expected[dataset], self.full,
                                         f"{name} download of {dataset}"))

    def boto3_get(self, dataset: str, dest: Path) -> Contender:
        argv = [sys.executable, str(BOTO3_SCRIPT), "--bucket", self.bucket,
                "--prefix", self.rank_prefix(dataset), "--dest", str(dest)]
        return Contender(
            "boto3", lambda _r: argv, self.env,
            check=lambda _r: verify_tree(dest, self.expected[dataset], self.full,
                                         f"boto3 download of {dataset}"))

    def cold(self, contender: Contender, dest: Path) -> Contender:
        """Each run starts without the destination and deletes it again once verified."""
        check = contender.check

        def checked(r: int) -> dict:
            try:
                return check(r)
            finally:
                remove(dest)

        contender.prepare = lambda _r: remove(dest)
        contender.check = checked
        return contender

    def warm(self, contender: Contender, dest: Path, workload: str, nbytes: int,
             data: Path | None = None) -> Contender:
        """Download once (untimed, verified), then every timed run must leave files alone.

        `data` is where the checkpoint's files land (default: dest); only those are watched,
        so a contender's own bookkeeping elsewhere under dest may change.
        """
        data = data or dest
        remove(dest)
        argv = contender.argv(0)
        log = self.work / "logs" / f"{workload}-{slug(contender.name)}-populate.log"
        m = run_timed(argv, contender.env, log, self.timeout(nbytes))
        check_exit(m, f"{workload}/{contender.name} populating run", argv, log)
        contender.check(0)
        before = snapshot(data)
        check = contender.check

        def checked(r: int) -> dict:
            result = check(r)
            after = snapshot(data)
            changed = sorted(k for k in before if after.get(k) != before[k])
            added = sorted(set(after) - set(before))
            if changed or added:
                first = changed[0] if changed else added[0]
                raise BenchError(
                    f"{workload}/{contender.name} round {r}: a warm run must download nothing, "
                    f"but it rewrote or touched {len(changed)} files and added {len(added)} "
                    f"under {data} (e.g. {first}: (inode, size, mtime_ns, ctime_ns) "
                    f"{before.get(first)} -> {after.get(first)})")
            return {**result, "untouched": True}

        contender.check = checked
        return contender

    def contenders(self, workload: str) -> tuple[list[Contender], int]:
        """The contenders (reference first) and the byte count throughput is based on."""
        dest = self.work / "dest" / workload
        if workload in ("big", "sharded", "small"):
            return [self.cold(self.ckpt_load(workload, dest / "ckpt-agent"), dest / "ckpt-agent"),
                    self.cold(self.s5cmd_get(workload, dest / "s5cmd"), dest / "s5cmd"),
                    self.cold(self.boto3_get(workload, dest / "boto3"), dest / "boto3"),
                    ], self.datasets[workload].total_bytes
        if workload in ("warm-big", "warm-small"):
            data = DATASET_OF[workload]
            nbytes = self.datasets[data].total_bytes
            return [self.warm(self.ckpt_load(data, dest / "ckpt-agent"), dest / "ckpt-agent",
                              workload, nbytes, dest / "ckpt-agent" / "rank-0" / data),
                    self.warm(self.s5cmd_get(data, dest / "s5cmd", "s5cmd cp --if-size-differ",
                                             ("--if-size-differ",)), dest / "s5cmd", workload,
                              nbytes),
                    ], nbytes
        if workload == "noop":
            return [Contender("ckpt-agent run", lambda _r: [self.ckpt_agent, "run", "--", "true"],
                              self.env, check=lambda _r: {}),
                    Contender("/bin/true", lambda _r: [self.true], self.env,
                              check=lambda _r: {})], 0
        if workload == "upload":
            return [self.upload_ckpt(), self.upload_s5cmd()], self.datasets["sharded"].total_bytes
        raise BenchError(f"unknown workload {workload}")

    def upload_ckpt(self) -> Contender:
        source = self.sources["sharded"]
        job = self.job("upload")

        def check(r: int) -> dict:
            folder = f"{PREFIX}/jobs/{job}/checkpoints/upload-{r}/"
            try:
                result = verify_store(self.client, self.bucket, folder + "rank-0/",
                                      self.expected["sharded"], self.full,
                                      f"ckpt-agent save round {r}")
                self.check_manifest("upload", f"upload-{r}", f"ckpt-agent save round {r}")
                return result
            finally:
                delete_prefix(self.client, self.bucket, folder)  # keep the disk bounded

        return Contender(
            "ckpt-agent save",
            lambda r: [self.ckpt_agent, "save", str(source), "--project", PROJECT,
                       "--job-id", job, "--name", f"upload-{r}"],
            self.env, check=check)

    def upload_s5cmd(self) -> Contender:
        source = self.sources["sharded"]

        def check(r: int) -> dict:
            folder = f"{PREFIX}/upload-{r}/"
            try:
                return verify_store(self.client, self.bucket, folder, self.expected["sharded"],
                                    self.full, f"s5cmd upload round {r}")
            finally:
                delete_prefix(self.client, self.bucket, folder)

        return Contender(
            "s5cmd cp",
            lambda r: [self.s5cmd, "--endpoint-url", self.server.endpoint, "cp", f"{source}/",
                       f"s3://{self.bucket}/{PREFIX}/upload-{r}/"],
            self.env, check=check)

    # ---- the loop

    def run_workload(self, workload: str) -> None:
        contenders, nbytes = self.contenders(workload)
        timeout = self.timeout(nbytes)
        runs: dict[str, list[dict]] = {c.name: [] for c in contenders}
        for r in range(self.args.runs):
            shift = r % len(contenders)  # ABC BCA CAB...: no contender always runs right after another's cleanup
            for c in contenders[shift:] + contenders[:shift]:
                c.prepare(r)
                os.sync()  # flush the previous run's dirty pages so they are not billed here
                argv = c.argv(r)
                log = self.work / "logs" / f"{workload}-{slug(c.name)}-{r}.log"
                m = run_timed(argv, c.env, log, timeout)
                check_exit(m, f"{workload}/{c.name} round {r}", argv, log)
                verified = c.check(r)
                runs[c.name].append({"round": r, "wall_s": m.wall_s, "outer_wall_s": m.outer_wall_s,
                                     "peak_rss_mib": m.maxrss_kib / 1024, "verified": verified})
                print(f"  {workload:<10} {c.name:<28} round {r}: {m.wall_s:8.3f}s "
                      f"{m.maxrss_kib / 1024:8.1f} MiB", flush=True)
        reference = runs[contenders[0].name]
        for c in contenders:
            walls = [x["wall_s"] for x in runs[c.name]]
            ratios = [x["wall_s"] / ref["wall_s"] for x, ref in zip(runs[c.name], reference,
                                                                    strict=True)]
            median = statistics.median(walls)
            self.rows.append({
                "workload": workload,
                "contender": c.name,
                "reference": contenders[0].name,
                "command": c.command(),
                "bytes": nbytes,
                "files": len(self.datasets[DATASET_OF[workload]].files)
                if workload in DATASET_OF else 0,
                "runs": runs[c.name],
                "median_s": median,
                "min_s": min(walls),
                "max_s": max(walls),
                "mb_per_s": nbytes / MB / median if nbytes else None,
                "peak_rss_mib": max(x["peak_rss_mib"] for x in runs[c.name]),
                "ratio_vs_ckpt_agent": statistics.median(ratios),
                "ratios": ratios,
            })
        if workload.startswith("warm"):
            remove(self.work / "dest" / workload)


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict]) -> str:
    lines = ["| workload | contender | median s | min-max s | MB/s | peak RSS MiB | "
             "ratio vs ckpt-agent |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        mbps = f"{row['mb_per_s']:.0f}" if row["mb_per_s"] else "-"
        lines.append(
            f"| {row['workload']} | {row['contender']} | {row['median_s']:.3f} | "
            f"{row['min_s']:.3f}-{row['max_s']:.3f} | {mbps} | {row['peak_rss_mib']:.0f} | "
            f"{row['ratio_vs_ckpt_agent']:.2f} |")
    return "\n".join(lines)


def describe_machine(info: dict) -> str:
    disk = info["disk"]
    kind = {True: "rotational", False: "non-rotational", None: "unknown"}[disk["rotational"]]
    busy = info["loadavg_at_start"][0] > (info["nproc"] or 1) / 2  # before we added any load
    return (f"- nproc: {info['nproc']} (usable: {info['usable_cpus']}), "
            f"CPU: {info['cpu_model']}, memory: {info['memory_gib']} GiB\n"
            f"- Python {info['python']}, kernel {info['kernel']}, load average "
            f"{info['loadavg_at_start'][0]:.1f} at start, {info['loadavg_at_end'][0]:.1f} at end"
            f"{' (machine busy before the benchmark started: expect noise)' if busy else ''}\n"
            f"- temp folder {disk['folder']} on {disk['device']} ({disk['fstype']}, {kind}, "
            f"mounted at {disk['mountpoint']}, {disk['free_gib']} GiB free)")


def parse_workloads(text: str) -> list[str]:
    chosen: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        names = ALIASES.get(item, (item,))
        for name in names:
            if name not in ALL_WORKLOADS:
                raise argparse.ArgumentTypeError(
                    f"unknown workload {item!r} (choose from {', '.join(ALL_WORKLOADS)}, warm, all)")
            if name not in chosen:
                chosen.append(name)
    if not chosen:
        raise argparse.ArgumentTypeError("no workloads given")
    return [w for w in ALL_WORKLOADS if w in chosen]


def needed_disk(datasets: dict[str, Dataset], workloads: list[str]) -> int:
    used = {DATASET_OF[w] for w in workloads if w in DATASET_OF}
    filled = {DATASET_OF[w] for w in workloads if w in NEEDS_FILL}
    total = sum(datasets[d].total_bytes for d in used)  # sources
    total += sum(datasets[d].total_bytes for d in filled)  # the store
    largest = max((datasets[d].total_bytes for d in used), default=0)
    total += 2 * largest  # one cold destination or one upload, plus slack
    total += 2 * sum(datasets[DATASET_OF[w]].total_bytes for w in workloads if w.startswith("warm"))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark ckpt-agent against s5cmd and boto3 on a local SeaweedFS.")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and 1 run each (exercises the harness; numbers are noise)")
    parser.add_argument("--runs", type=int, default=None, help="runs per contender (default 5; "
                        "1 with --quick)")
    parser.add_argument("--workloads", type=parse_workloads, default=list(ALL_WORKLOADS),
                        help=f"comma-separated: {','.join(ALL_WORKLOADS)} (warm = both warm "
                        "workloads; default: all)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--verify", choices=("full", "size"), default="full",
                        help="after each run check every byte (crc32c, default) or sizes only")
    parser.add_argument("--run-timeout", type=float, default=None,
                        help="seconds before a single run is killed (default: scaled by size)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="parent folder for the temporary data (default: the system temp "
                        "folder; it must be on the disk you want to measure)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    sys.path.insert(0, str(REPO))
    from bench.seaweed import start_seaweed

    def terminate(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=parent)).resolve()
    info = machine_info(work)
    result: dict = {"machine": info, "config": {
        "quick": args.quick, "runs": args.runs, "workloads": args.workloads,
        "verify": args.verify, "workdir": str(work)}}
    server = None
    status = 0
    try:
        bench_datasets = make_datasets(args.quick)
        need = needed_disk(bench_datasets, args.workloads)
        free = shutil.disk_usage(work).free
        if free < need:
            raise BenchError(f"{work} has {human(free)} free, the benchmark needs about "
                             f"{human(need)}")
        server = start_seaweed(work / "seaweed")
        bench = Bench(args, work, server)
        result["tools"] = {
            "s5cmd": f"{bench.s5cmd} {tool_version([bench.s5cmd, 'version'])}",
            "weed": tool_version([find_tool("weed"), "version"]),
            "boto3": tool_version([sys.executable, "-c",
                                   "import boto3; print('boto3', boto3.__version__)"]),
            "ckpt-agent": bench.ckpt_agent,
        }
        result["datasets"] = {k: v.describe() for k, v in bench.datasets.items()}
        print(f"ckpt-agent benchmark in {work}; SeaweedFS at {server.endpoint}; "
              f"{args.runs} run(s) per contender", flush=True)
        bench.prepare_data(args.workloads)
        bench.fill_store(args.workloads)
        result["fill"] = bench.fill
        for workload in args.workloads:
            bench.run_workload(workload)
            result["rows"] = bench.rows
        result["rows"] = bench.rows
        info["loadavg_at_end"] = os.getloadavg()
        print()
        print("## Machine\n")
        print(describe_machine(info))
        print(f"- tools: {result['tools']['s5cmd']}; {result['tools']['weed']}; "
              f"{result['tools']['boto3']}")
        print("- data sets: " + "; ".join(f"{k}: {v}" for k, v in result["datasets"].items()))
        print(f"\n## Results ({args.runs} run(s) each, contenders alternated per round)\n")
        print(markdown(bench.rows))
        print("\nratio = contender wall / ckpt-agent wall in the same round (median over rounds); "
              "> 1 means ckpt-agent was faster. MB = 10^6 bytes.\n")
        print("## Commands (round 0)\n")
        seen = set()
        for row in bench.rows:
            key = (row["workload"], row["contender"])
            if key not in seen:
                seen.add(key)
                print(f"- {row['workload']} / {row['contender']}: `{row['command']}`")
    except BenchError as exc:
        result["error"] = str(exc)
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr, flush=True)
        status = 2
    finally:
        if server is not None:
            server.stop()
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
