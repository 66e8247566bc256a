"""What the agent tells people and programs: JSON logs, progress, loaded-rank-<r>.json, the ready file,
dry runs, `ckpt_agent.latest_local_checkpoint`, and --help/--version. Local store: fast."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import crc32c
import pytest

from ckpt_agent.cli import build_parser
from ckpt_agent.disk.localstate import VerifiedIndex
from ckpt_agent.report import JsonReporter, Reporter, _LineSink, make_reporter
from ckpt_agent.stores import layout
from tests.support.helpers import clean_env, run_agent, save
from tests.support.specs import latest, named, spec


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return clean_env(BT_CHECKPOINT_STORE=f"file://{tmp_path / 'store'}", BT_TRAINING_PROJECT_NAME="proj")


def make_and_save(env: dict[str, str], tmp_path: Path, job: str, name: str, size: int = 200_000) -> Path:
    folder = tmp_path / "src" / job / name
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(size))
    (folder / "sub" / "state.pt").write_bytes(os.urandom(1000))
    (folder / "trainer_state.json").write_text(json.dumps({"checkpoint": name}))
    save(env, folder, job, name)
    return folder


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def job_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved once per module: job-a with checkpoint-20 committed before checkpoint-100."""
    base = tmp_path_factory.mktemp("job-template")
    env = clean_env(BT_CHECKPOINT_STORE=f"file://{base / 'store'}")
    for name in ("checkpoint-20", "checkpoint-100"):
        make_and_save(env, base, "job-a", name)
    return base


@pytest.fixture
def job(job_template: Path, tmp_path: Path) -> dict[str, Path]:
    """This test's own copy of the template store; the saved source folders, by checkpoint name."""
    shutil.copytree(job_template / "store", tmp_path / "store")
    return {name: job_template / "src" / "job-a" / name for name in ("checkpoint-20", "checkpoint-100")}


# --- BT_LOG_FORMAT ------------------------------------------------------------------------------


def test_json_log_format_writes_one_json_object_per_line_for_a_whole_load(env, job, tmp_path):
    env = {**env, "BT_LOG_FORMAT": "json",
           "BT_LOAD_CHECKPOINT_CONFIG": spec(tmp_path / "dl", latest(), latest("empty-project"))}
    result = run_agent(["load"], env)
    assert result.returncode == 0, result.stderr
    lines = json_lines(result.stderr)
    for line in lines:
        assert set(line) == {"timestamp", "level", "event", "message", "fields"}
        assert datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).tzinfo is not None
    by_event = {line["event"]: line for line in lines}
    assert by_event["no_checkpoint"]["level"] == "warning"
    assert by_event["resolved"]["fields"]["checkpoint_name"] == "checkpoint-100"
    assert by_event["loaded"]["fields"]["files_fetched"] == 3
    assert result.stdout == ""


def test_json_log_format_reports_an_error_as_one_json_line_with_its_exit_code(env, job, tmp_path):
    env = {**env, "BT_LOG_FORMAT": "json",
           "BT_LOAD_CHECKPOINT_CONFIG": spec(tmp_path / "dl", named("checkpoint-7", "job-a"))}
    result = run_agent(["load"], env)
    assert result.returncode == 3
    [line] = json_lines(result.stderr)
    assert line["level"] == "error" and line["fields"] == {"exit_code": 3, "error": "NotFoundError"}
    assert "checkpoint-7" in line["message"]


def test_default_log_format_stays_human_readable(env, job, tmp_path):
    result = run_agent(["load"], {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(tmp_path / "dl", latest())})
    assert result.returncode == 0
    assert all(line.startswith("ckpt-agent: ") for line in result.stderr.splitlines())
    assert "{" not in result.stderr


def test_unknown_log_format_is_a_configuration_error(env):
    result = run_agent(["ls"], {**env, "BT_LOG_FORMAT": "xml"})
    assert result.returncode == 2
    assert "BT_LOG_FORMAT" in result.stderr and len(result.stderr.splitlines()) == 1


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_in_logs_is_one_line_per_interval_never_a_flood():
    stream, clock = io.StringIO(), _Clock()
    sink = _LineSink(10_000_000, "download", Reporter(stream, interval=5.0), clock=clock)
    for _ in range(10_000):  # 12 simulated seconds of 1 kB updates
        clock.now += 0.0012
        sink(1000)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"ckpt-agent: download: \d+% [\d.]+ MB of 10\.0 MB, [\d.]+ KB/s, ETA \d+ s", lines[0])


def test_json_progress_lines_carry_percent_rate_and_eta():
    stream, clock = io.StringIO(), _Clock()
    sink = _LineSink(1000, "download", JsonReporter(stream, interval=1.0), clock=clock)
    clock.now = 2.0
    sink(250)
    [line] = json_lines(stream.getvalue())
    assert line["event"] == "progress"
    assert line["fields"] == {"label": "download", "percent": 25.0, "bytes_done": 250, "bytes_total": 1000,
                              "bytes_per_second": 125, "eta_seconds": 6}


def test_json_reporter_never_draws_a_bar_even_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(make_reporter("json", Terminal()).progress(10, "download"), _LineSink)
    assert not isinstance(make_reporter(None, Terminal()).progress(10, "download"), _LineSink)


# --- loaded-rank-<r>.json and the ready file -------------------------------------------------------------


def test_loaded_json_records_resolution_manifest_checksums_bytes_duration_and_version(env, job, tmp_path):
    dl = tmp_path / "dl"
    refs = (latest(job_id="job-a"), named("checkpoint-20", "job-a"))
    result = run_agent(["load"], {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, *refs)})
    assert result.returncode == 0, result.stderr
    record = json.loads((dl / ".ckpt-agent" / "loaded-rank-0.json").read_text())
    from ckpt_agent import __version__

    assert record["agent_version"] == __version__ and record["seconds"] >= 0
    assert record["bytes_total"] == record["bytes_fetched"] == 2 * (200_000 + 1000) + sum(
        len(json.dumps({"checkpoint": n})) for n in ("checkpoint-20", "checkpoint-100"))
    store = tmp_path / "store"
    newest, older = record["checkpoints"]
    assert (newest["reference"], newest["checkpoint_name"], newest["order"]) == \
        ("latest(job_id=job-a)", "checkpoint-100", 0)
    assert (older["reference"], older["checkpoint_name"], older["order"]) == \
        ("named(checkpoint_name=checkpoint-20, job_id=job-a)", "checkpoint-20", 1)
    for entry in record["checkpoints"]:
        raw = (store / layout.manifest_key("job-a", entry["checkpoint_name"], 0)).read_bytes()
        assert entry["manifest_crc32c"] == f"{crc32c.crc32c(raw):08x}"
        assert entry["path"] == f"rank-0/{entry['checkpoint_name']}"
        assert entry["files"] == 3 and entry["reason"]


def test_ready_file_is_written_only_after_everything_is_in_place(env, job, tmp_path):
    dl, ready = tmp_path / "dl", tmp_path / "shared" / "ready"
    result = run_agent(["load", "--ready-file", str(ready)], {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest())})
    assert result.returncode == 0, result.stderr
    content = json.loads(ready.read_text())
    assert content["ready"] is True and Path(content["download_folder"]) == dl
    assert ready.stat().st_mtime_ns >= (dl / ".ckpt-agent" / "loaded-rank-0.json").stat().st_mtime_ns
    assert (dl / "rank-0" / "checkpoint-100" / "model.safetensors").read_bytes() == \
        (job["checkpoint-100"] / "model.safetensors").read_bytes()


def test_failed_load_removes_a_stale_ready_file_and_writes_none(env, job, tmp_path):
    ready = tmp_path / "ready"
    ready.write_text("from an earlier run")
    env = {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(tmp_path / "dl", named("checkpoint-7", "job-a"))}
    assert run_agent(["load", "--ready-file", str(ready)], env).returncode == 3
    assert not ready.exists()


def test_failed_load_leaves_no_record_of_the_previous_one(env, job, tmp_path):
    dl = tmp_path / "dl"
    env = {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest())}
    assert run_agent(["load"], env).returncode == 0
    make_and_save(env, tmp_path, "job-a", "checkpoint-200")
    key = tmp_path / "store" / layout.file_key("job-a", "checkpoint-200", 0, "model.safetensors")
    data = bytearray(key.read_bytes())
    data[7] ^= 1
    key.write_bytes(bytes(data))
    assert run_agent(["load"], env).returncode == 5
    assert not (dl / ".ckpt-agent" / "loaded-rank-0.json").exists()


# --- dry run ------------------------------------------------------------------------------------


def test_load_dry_run_prints_each_choice_and_why_and_creates_nothing(env, job, tmp_path):
    dl = tmp_path / "not-yet" / "dl"
    result = run_agent(["load", "--dry-run", "--ready-file", str(tmp_path / "ready")],
                   {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest(), latest("empty-project"))})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "latest() -> job job-a, checkpoint checkpoint-100 (rank 0)" in out
    assert "the most recent job of project proj" in out
    assert "to download:  3 files" in out and "does not exist yet" in out
    assert "warning: latest(project_name=empty-project): no checkpoint found" in out
    assert not (tmp_path / "not-yet").exists() and not (tmp_path / "ready").exists()


def test_dry_run_after_a_load_shows_what_is_already_present(env, job, tmp_path):
    dl = tmp_path / "dl"
    env = {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest())}
    assert run_agent(["load"], env).returncode == 0
    (dl / "rank-0" / "checkpoint-100" / "trainer_state.json").write_text("edited")
    before = sorted(p for p in dl.rglob("*"))
    result = run_agent(["load", "--dry-run"], env)
    assert result.returncode == 0, result.stderr
    assert "present:      2 files intact" in result.stdout and "to download:  1 files" in result.stdout
    assert sorted(p for p in dl.rglob("*")) == before
    assert (dl / "rank-0" / "checkpoint-100" / "trainer_state.json").read_text() == "edited"


def test_run_dry_run_prints_the_command_and_executes_nothing(env, job, tmp_path):
    marker = tmp_path / "trained"
    env = {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(tmp_path / "dl", latest())}
    result = run_agent(["run", "--dry-run", "--", "touch", str(marker)], env)
    assert result.returncode == 0, result.stderr
    assert f"would exec: touch {marker}" in result.stdout and "checkpoint-100" in result.stdout
    assert not marker.exists() and not (tmp_path / "dl").exists()


def test_dry_run_does_not_wait_for_a_load_holding_the_folder(env, job, tmp_path):
    dl = tmp_path / "dl"
    (dl / ".ckpt-agent").mkdir(parents=True)
    with open(dl / ".ckpt-agent" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        started = time.monotonic()
        result = run_agent(["load", "--dry-run"], {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest())})
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10 and "in use" not in result.stderr


def test_verified_index_of_a_missing_folder_creates_nothing(tmp_path):
    index = VerifiedIndex(None)  # what a dry run uses when the download folder does not exist
    assert not index.is_intact("rank-0/x", "1:00000000", os.stat(tmp_path))
    index.save()
    assert list(tmp_path.iterdir()) == []


# --- ckpt_agent.latest_local_checkpoint --------------------------------------------------------------


def _get_last_checkpoint(folder: Path) -> str | None:
    """transformers.trainer_utils.get_last_checkpoint, which is not installed here: the highest N of
    the `checkpoint-N` folders."""
    found = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return str(max(found, key=lambda p: int(p.name.split("-")[1]))) if found else None


def test_latest_local_checkpoint_is_the_store_newest_and_matches_get_last_checkpoint(env, job, tmp_path,
                                                                                     monkeypatch):
    import ckpt_agent as package

    dl = tmp_path / "dl"
    refs = (named("checkpoint-100", "job-a"), named("checkpoint-20", "job-a"))
    assert run_agent(["load"], {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, *refs)}).returncode == 0
    os.utime(dl / "rank-0" / "checkpoint-20", (time.time() + 100, time.time() + 100))  # newer on disk
    monkeypatch.setenv("BT_LOAD_CHECKPOINT_DIR", str(dl))
    monkeypatch.delenv("BT_NODE_RANK", raising=False)
    assert package.latest_local_checkpoint() == str(dl / "rank-0" / "checkpoint-100")
    assert package.latest_local_checkpoint() == _get_last_checkpoint(dl / "rank-0")


def test_latest_local_checkpoint_follows_commit_order_over_names(env, tmp_path, monkeypatch):
    import ckpt_agent as package

    make_and_save(env, tmp_path, "job-x", "checkpoint-100")
    make_and_save(env, tmp_path, "job-x", "checkpoint-20")  # committed last: the store's newest
    dl = tmp_path / "dl"
    refs = (named("checkpoint-100", "job-x"), named("checkpoint-20", "job-x"))
    assert run_agent(["load"], {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, *refs)}).returncode == 0
    monkeypatch.setenv("BT_LOAD_CHECKPOINT_DIR", str(dl))
    assert package.latest_local_checkpoint(0) == str(dl / "rank-0" / "checkpoint-20")


def test_latest_local_checkpoint_is_none_when_nothing_was_loaded(env, tmp_path, monkeypatch):
    import ckpt_agent as package

    monkeypatch.delenv("BT_LOAD_CHECKPOINT_DIR", raising=False)
    assert package.latest_local_checkpoint() is None
    dl = tmp_path / "dl"
    monkeypatch.setenv("BT_LOAD_CHECKPOINT_DIR", str(dl))
    assert package.latest_local_checkpoint() is None  # no folder at all
    result = run_agent(["load"], {**env, "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest("empty-project"))})
    assert result.returncode == 0 and "WARNING" in result.stderr
    assert package.latest_local_checkpoint() is None  # a load that found nothing


def test_latest_local_checkpoint_takes_the_rank_from_bt_node_rank(env, job, tmp_path, monkeypatch):
    import ckpt_agent as package

    dl = tmp_path / "dl"
    result = run_agent(["load"], {**env, "BT_NODE_RANK": "1", "BT_LOAD_CHECKPOINT_CONFIG": spec(dl, latest())})
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv("BT_LOAD_CHECKPOINT_DIR", str(dl))
    monkeypatch.setenv("BT_NODE_RANK", "1")
    assert package.latest_local_checkpoint() == str(dl / "rank-1" / "checkpoint-100")
    assert package.latest_local_checkpoint(rank=0) is None


def test_import_ckpt_agent_stays_cheap():
    code = ("import sys, ckpt_agent; "
            "print(sorted(m for m in sys.modules if m.startswith(('ckpt_agent', 'agent', 'boto', 'tqdm'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "['ckpt_agent']", result.stderr


# --- --help and --version -----------------------------------------------------------------------


def test_every_command_has_help_with_examples_and_a_version(capsys):
    from ckpt_agent import __version__

    parser = build_parser()
    commands = next(a for a in parser._actions if a.choices and "load" in a.choices).choices
    assert {"run", "load", "save", "ls", "verify"} <= set(commands)
    for argv in [[], *([name] for name in commands)]:
        for flag, expect in (("--help", "example"), ("--version", f"ckpt-agent {__version__}")):
            with pytest.raises(SystemExit) as exit_info:
                parser.parse_args([*argv, flag])
            assert exit_info.value.code == 0
            out = capsys.readouterr().out
            assert expect in out, (argv, flag)
            if flag == "--help" and argv:
                assert f"ckpt-agent {argv[0]}" in out.split("example")[1], argv  # the examples use it


class _LineCheckingStream(io.StringIO):
    """Records every write and whether two writes ever overlapped (a write while another is in it)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.overlapped = False
        self._inside = threading.Event()

    def write(self, text: str) -> int:
        if self._inside.is_set():
            self.overlapped = True
        self._inside.set()
        try:
            self.writes.append(text)
            time.sleep(0)  # let another thread in, if nothing keeps it out
            return super().write(text)
        finally:
            self._inside.clear()


@pytest.mark.parametrize("make", [Reporter, JsonReporter])
def test_log_lines_from_two_threads_are_whole_lines_and_never_interleave(make):
    stream = _LineCheckingStream()
    reporter = make(stream)
    start = threading.Barrier(2)

    def log(who: str) -> None:
        start.wait()
        for i in range(200):
            reporter.info(f"{who} line {i}")
            reporter.warn(f"{who} warning {i}")

    threads = [threading.Thread(target=log, args=(who,)) for who in ("sync", "main")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not stream.overlapped
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in stream.writes)
    assert len(stream.getvalue().splitlines()) == 800
