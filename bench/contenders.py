"""The contenders: each one command line, with what to do before a run and how to verify after it.

Both of ckpt-agent's S3 engines run as separate contenders (`CKPT_AGENT_S3_ENGINE`, see ENGINES)
so every S3 workload compares them on the same objects in the same rounds.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.checks import BenchError, delete_prefix, remove, snapshot, verify_store, verify_tree
from bench.harness import PREFIX, PROJECT, Harness
from bench.timing import check_exit, run_timed

BOTO3_SCRIPT = Path(__file__).resolve().parent / "boto3_download.py"
ENGINES = ("http", "boto3")  # CKPT_AGENT_S3_ENGINE values; http (the default) is the reference


def _nothing(_round: int) -> None:
    pass


@dataclass(frozen=True)
class Contender:
    name: str
    argv: Callable[[int], list[str]]  # round -> command line
    env: dict[str, str]
    check: Callable[[int], dict]  # after a successful run: verify (raises BenchError)
    prepare: Callable[[int], None] = _nothing  # before a run, not timed
    shown_env: dict[str, str] = field(default_factory=dict)  # env worth printing with argv
    counted: str = ""  # through bench/relay.py: "received" (loads) or "sent" (uploads) is its bytes
    metadata_bytes: int | None = None  # what its --dry-run received: listings and manifests

    def command(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.shown_env.items())
        return (prefix + " " if prefix else "") + shlex.join(self.argv(0))


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def engine_row(base: str, engine: str) -> tuple[str, dict[str, str]]:
    """A ckpt-agent row's name and environment for one S3 engine (http rows keep plain names)."""
    if engine == "http":
        return base, {}
    return f"{base} {engine}", {"CKPT_AGENT_S3_ENGINE": engine}


def ckpt_folder(root: Path, engine: str) -> Path:
    """Where one engine's ckpt-agent downloads to, under a workload's destination."""
    return root / slug(engine_row("ckpt-agent", engine)[0])


def ckpt_load(h: Harness, dataset: str, dest: Path, engine: str = "http") -> Contender:
    name, engine_env = engine_row("ckpt-agent", engine)
    config = json.dumps({"enabled": True, "checkpoints": [{
        "typ": "baseten_named_checkpoint", "checkpoint_name": dataset,
        "job_id": h.job(dataset)}], "download_folder": str(dest)})
    shown = {**engine_env, "BT_LOAD_CHECKPOINT_CONFIG": config}
    return Contender(
        name, lambda _r: [h.ckpt_agent, "load"], {**h.env, **shown},
        check=lambda _r: verify_tree(dest / "rank-0" / dataset, h.expected[dataset], h.full,
                                     f"{name} load of {dataset}"),
        shown_env=shown)


def s5cmd_get(h: Harness, dataset: str, dest: Path, name: str = "s5cmd",
              flags: tuple[str, ...] = ()) -> Contender:
    source = f"s3://{h.bucket}/{h.rank_prefix(dataset)}*"
    argv = [h.s5cmd, "--endpoint-url", h.server.endpoint, "cp", *flags, source, f"{dest}/"]
    return Contender(
        name, lambda _r: argv, h.env,
        check=lambda _r: verify_tree(dest, h.expected[dataset], h.full,
                                     f"{name} download of {dataset}"))


def boto3_get(h: Harness, dataset: str, dest: Path) -> Contender:
    argv = [sys.executable, str(BOTO3_SCRIPT), "--bucket", h.bucket,
            "--prefix", h.rank_prefix(dataset), "--dest", str(dest)]
    return Contender(
        "boto3", lambda _r: argv, h.env,
        check=lambda _r: verify_tree(dest, h.expected[dataset], h.full,
                                     f"boto3 download of {dataset}"))


def cold(contender: Contender, dest: Path) -> Contender:
    """Each run starts without the destination and deletes it again once verified."""
    check = contender.check

    def checked(r: int) -> dict:
        try:
            return check(r)
        finally:
            remove(dest)

    return dataclasses.replace(contender, prepare=lambda _r: remove(dest), check=checked)


def warm(h: Harness, contender: Contender, dest: Path, workload: str, nbytes: int,
         data: Path | None = None) -> Contender:
    """Download once (untimed, verified), then every timed run must leave files alone.

    `data` is where the checkpoint's files land (default: dest); only those are watched,
    so a contender's own bookkeeping elsewhere under dest may change.
    """
    data = data or dest
    remove(dest)
    argv = contender.argv(0)
    log = h.log(f"{workload}-{slug(contender.name)}-populate")
    m = run_timed(argv, contender.env, log, h.timeout(nbytes))
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

    return dataclasses.replace(contender, check=checked)


def ckpt_save(h: Harness, engine: str = "http", dataset: str = "sharded") -> Contender:
    """`ckpt-agent save` of a data set as a new checkpoint upload-<round> (deleted after)."""
    name, engine_env = engine_row("ckpt-agent save", engine)
    source = h.sources[dataset]
    job_dataset = ("upload" if dataset == "sharded" else dataset) + ("" if engine == "http" else f"-{engine}")
    job = h.job(job_dataset)

    def check(r: int) -> dict:
        folder = h.checkpoint_prefix(job_dataset, f"upload-{r}")
        try:
            result = verify_store(h.client, h.bucket, folder + "rank-0/", h.expected[dataset],
                                  h.full, f"{name} round {r}")
            h.check_manifest(job_dataset, f"upload-{r}", f"{name} round {r}")
            return result
        finally:
            delete_prefix(h.client, h.bucket, folder)  # keep the disk bounded

    return Contender(
        name, lambda r: [h.ckpt_agent, "save", str(source), "--project", PROJECT,
                         "--job-id", job, "--name", f"upload-{r}"],
        {**h.env, **engine_env}, check=check, shown_env=engine_env)


def s5cmd_put(h: Harness, dataset: str = "sharded") -> Contender:
    source = h.sources[dataset]

    def check(r: int) -> dict:
        folder = f"{PREFIX}/upload-{r}/"
        try:
            return verify_store(h.client, h.bucket, folder, h.expected[dataset], h.full,
                                f"s5cmd upload round {r}")
        finally:
            delete_prefix(h.client, h.bucket, folder)

    return Contender(
        "s5cmd cp",
        lambda r: [h.s5cmd, "--endpoint-url", h.server.endpoint, "cp", f"{source}/",
                   f"s3://{h.bucket}/{PREFIX}/upload-{r}/"],
        h.env, check=check)


def noop(h: Harness) -> list[Contender]:
    """The cost of ckpt-agent itself: `run -- true` with loading disabled, against /bin/true."""
    return [Contender("ckpt-agent run", lambda _r: [h.ckpt_agent, "run", "--", "true"], h.env,
                      check=lambda _r: {}),
            Contender("/bin/true", lambda _r: [h.true], h.env, check=lambda _r: {})]
