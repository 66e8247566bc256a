"""The issue-12 workloads: bytes that need not cross the network, counted by bench/relay.py.

restart            the checkpoint is still in BT_CHECKPOINT_DIR: `ckpt-agent load` vs `cp -r`
warm-cache         a second load with CKPT_AGENT_CACHE_DIR filled by a first (untimed) one
incremental-upload `ckpt-agent save` of checkpoint N+1 (N saved first) vs `s5cmd cp` of N+1
exclude-optimizer  `ckpt-agent load` with CKPT_AGENT_EXCLUDE=optimizer.pt vs `s5cmd cp --exclude`
cache-fill         the price of the cache being on by default: a cold load with BT_PROJECT_CACHE_DIR
                   set (every part also goes into an empty cache, after the load, by a background
                   filler waited for untimed) vs the same load without it

Every S3 contender here talks to the store through the relay; the row's store bytes are what
crossed it in the direction that matters (received for loads, sent for uploads). Loads also get
`metadata_bytes`: what the same command with `--dry-run` received (listings and manifests), so
checkpoint data bytes = store bytes - metadata bytes. The agent's own count (loaded-rank-<r>.json, or
the JSON log's summary) is kept next to it as a cross-check, never as the measurement.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bench import contenders as c
from bench.checks import BenchError, delete_prefix, remove, verify_store, verify_tree
from bench.datasets import Expected, derive_changed
from bench.harness import PREFIX, PROJECT, Harness
from bench.machine import find_tool
from bench.start import wait_for_fill
from bench.timing import check_exit, run_timed

REUSE_WORKLOADS = ("restart", "warm-cache", "incremental-upload", "exclude-optimizer", "cache-fill")
EXCLUDED = "optimizer.pt"
NEXT = "incremental-next"  # checkpoint N+1's folder and expected contents, derived from N


def lineup(h: Harness, workload: str, dest: Path) -> tuple[list[c.Contender], int]:
    """The contenders (ckpt-agent first) and the bytes the workload is about."""
    if workload == "restart":
        return _restart(h, dest), h.datasets["big"].total_bytes
    if workload == "warm-cache":
        return _warm_cache(h, dest), h.datasets["big"].total_bytes
    if workload == "incremental-upload":
        return _incremental(h), h.datasets["incremental"].total_bytes
    if workload == "exclude-optimizer":
        return _exclude(h, dest), sum(size for size, _ in included(h).values())
    if workload == "cache-fill":
        return _cache_fill(h, dest), h.datasets["big"].total_bytes
    raise BenchError(f"unknown workload {workload}")


def included(h: Harness) -> Expected:
    return {rel: v for rel, v in h.expected["trainer"].items() if rel != EXCLUDED}


def _counted_load(h: Harness, dataset: str, dest: Path, extra: dict[str, str], what: str,
                  expected: Expected | None = None) -> c.Contender:
    """`ckpt-agent load` through the relay, with its dry run's bytes as the metadata baseline."""
    base = c.ckpt_load(h, dataset, dest)
    env = {**base.env, **h.counted_env, **extra}
    expected = h.expected[dataset] if expected is None else expected

    def check(_r: int) -> dict:
        verified = verify_tree(dest / "rank-0" / dataset, expected, h.full, what)
        return {**verified, "agent": loaded_record(dest)}

    return dataclasses.replace(
        base, env=env, check=check, counted="received", shown_env={**extra, **base.shown_env},
        metadata_bytes=received_by(h, [*base.argv(0), "--dry-run"], env, f"{what} --dry-run"))


def received_by(h: Harness, argv: list[str], env: dict[str, str], what: str) -> int:
    """Bytes the store sent one untimed run of argv: a dry run's listings and manifests."""
    log = h.log(c.slug(what))
    before = h.relay.traffic()
    check_exit(run_timed(argv, env, log, h.timeout(0)), what, argv, log)
    return (h.relay.traffic() - before).received


def loaded_record(dest: Path) -> dict:
    """The agent's own account of the load: loaded-rank-<r>.json's byte counts."""
    record = json.loads((dest / ".ckpt-agent" / "loaded-rank-0.json").read_text())
    return {k: record[k] for k in ("bytes_fetched", "bytes_from", "files_fetched") if k in record}


def _restart(h: Harness, dest: Path) -> list[c.Contender]:
    source = h.sources["big"]  # <work>/source/big: what the trainer wrote and the sidecar saved
    folder = dest / "ckpt-agent"
    load = _counted_load(h, "big", folder, {"BT_CHECKPOINT_DIR": str(source.parent)},
                         "restart ckpt-agent load")
    copy = c.Contender("cp -r", lambda _r: [find_tool("cp"), "-r", str(source), str(dest / "cp")], h.env,
                       check=lambda _r: verify_tree(dest / "cp", h.expected["big"], h.full,
                                                    "restart cp -r"))
    return [c.cold(load, folder), c.cold(copy, dest / "cp")]


def _warm_cache(h: Harness, dest: Path) -> list[c.Contender]:
    cache = h.work / "cache" / "warm-cache"
    remove(cache)
    cache.mkdir(parents=True)
    extra = {"CKPT_AGENT_CACHE_DIR": str(cache)}
    fill = c.ckpt_load(h, "big", dest / "fill")
    argv = fill.argv(0)
    log = h.log("warm-cache-fill")
    check_exit(run_timed(argv, {**fill.env, **extra}, log, h.timeout(h.datasets["big"].total_bytes)),
               "warm-cache first load (untimed)", argv, log)
    wait_for_fill(dest / "fill", "warm-cache first load")
    fill.check(0)
    remove(dest / "fill")
    folder = dest / "ckpt-agent"
    return [c.cold(_counted_load(h, "big", folder, extra, "warm-cache ckpt-agent load"), folder)]


def _cache_fill(h: Harness, dest: Path) -> list[c.Contender]:
    """Both rows fetch every byte from the store; the first also writes each part into an emptied
    project cache (CKPT_AGENT_CACHE_DIR's default).

    The cache is emptied as soon as a round's fill is over and checked, not just before the next
    timed run: deleting the 2 GiB a fill wrote right before a run made that run 1.6-1.7x slower on
    this VM (2026-12-06, docs/benchmarks.md), a cost of the harness, not of the load."""
    project_cache = h.work / "cache" / "cache-fill"
    extra = {"BT_PROJECT_CACHE_DIR": str(project_cache)}
    loaded = c.ckpt_load(h, "big", dest / "cached")

    def empty_cache() -> None:
        remove(project_cache)
        project_cache.mkdir(parents=True)

    def filled(r: int) -> dict:
        """The load's own check, once its background fill is over: no fill runs during a timed run."""
        wait_for_fill(dest / "cached", "cache-fill ckpt-agent")
        try:
            return loaded.check(r)
        finally:
            empty_cache()

    cached = c.cold(dataclasses.replace(loaded, check=filled), dest / "cached")
    empty_cache()
    cached = dataclasses.replace(cached, env={**cached.env, **extra}, shown_env={**extra, **cached.shown_env})
    plain = dataclasses.replace(c.ckpt_load(h, "big", dest / "plain"), name="ckpt-agent, no cache")
    return [cached, c.cold(plain, dest / "plain")]


def _incremental(h: Harness) -> list[c.Contender]:
    """Checkpoint N is in the store (the harness saved it, untimed); each round saves N+1 under
    a new name in the same job, then deletes it, so N stays the job's previous checkpoint."""
    job = h.job("incremental")
    if NEXT not in h.sources:
        h.sources[NEXT] = h.work / "source" / NEXT
        h.expected[NEXT] = derive_changed(h.sources["incremental"], h.sources[NEXT],
                                          h.datasets["incremental"])
    env = {**h.env, **h.counted_env, "BT_LOG_FORMAT": "json"}

    def check_save(r: int) -> dict:
        folder = h.checkpoint_prefix("incremental", f"next-{r}")
        try:
            verified = verify_store(h.client, h.bucket, folder + "rank-0/", h.expected[NEXT],
                                    h.full, f"incremental ckpt-agent save round {r}")
            h.check_manifest("incremental", f"next-{r}", f"incremental save round {r}")
        finally:
            delete_prefix(h.client, h.bucket, folder)
        return {**verified, "agent": save_summary(h.log(f"incremental-upload-ckpt-agent-save-{r}"))}

    save = c.Contender(
        "ckpt-agent save", lambda r: [h.ckpt_agent, "save", str(h.sources[NEXT]), "--project",
                                      PROJECT, "--job-id", job, "--name", f"next-{r}"],
        env, check=check_save, counted="sent")

    def check_s5cmd(r: int) -> dict:
        folder = f"{PREFIX}/incremental-s5cmd-{r}/"
        try:
            return verify_store(h.client, h.bucket, folder, h.expected[NEXT], h.full,
                                f"incremental s5cmd upload round {r}")
        finally:
            delete_prefix(h.client, h.bucket, folder)

    s5cmd = c.Contender(
        "s5cmd cp", lambda r: [h.s5cmd, "--endpoint-url", h.relay.endpoint, "cp",
                               f"{h.sources[NEXT]}/", f"s3://{h.bucket}/{PREFIX}/incremental-s5cmd-{r}/"],
        h.env, check=check_s5cmd, counted="sent")
    return [save, s5cmd]


def save_summary(log: Path) -> dict:
    """The byte counts in the fields of the save's last JSON event (empty if it gives none)."""
    fields: dict = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("fields"), dict):
            fields = event["fields"]
    return {k: v for k, v in fields.items() if "bytes" in k and "per_second" not in k}


def _exclude(h: Harness, dest: Path) -> list[c.Contender]:
    folder = dest / "ckpt-agent"
    load = _counted_load(h, "trainer", folder, {"CKPT_AGENT_EXCLUDE": EXCLUDED},
                         "exclude-optimizer ckpt-agent load", included(h))
    source = f"s3://{h.bucket}/{h.rank_prefix('trainer')}*"
    flags = ["--endpoint-url", h.relay.endpoint]
    s5cmd = c.Contender(
        "s5cmd cp --exclude", lambda _r: [h.s5cmd, *flags, "cp", "--exclude", EXCLUDED, source,
                                          f"{dest / 's5cmd'}/"],
        h.env, check=lambda _r: verify_tree(dest / "s5cmd", included(h), h.full,
                                            "exclude-optimizer s5cmd"), counted="received")
    listing = [h.s5cmd, *flags, "--dry-run", "cp", "--exclude", EXCLUDED, source, f"{dest}/x/"]
    s5cmd = dataclasses.replace(s5cmd, metadata_bytes=received_by(
        h, listing, h.env, "exclude-optimizer s5cmd --dry-run"))
    return [c.cold(load, folder), c.cold(s5cmd, dest / "s5cmd")]
