"""A hostile download folder (issue 10): planted symlinks, hardlinks, FIFOs, leftovers and
colliding names must never redirect a write, hang a load or mix two checkpoints.

Most cases run the installed `ckpt-agent` against a local directory store (no network). Attacks
"at a moment of the load" run the load in-process, with a store whose reads call a hook: the
attack happens exactly when the given file is being fetched, with no sleeps.
"""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from ckpt_agent.disk.digests import checksum, format_checksum
from ckpt_agent.disk.safefs import INCOMPLETE_SUFFIX
from ckpt_agent.errors import IntegrityError
from ckpt_agent.runtime.cancel import Cancel
from ckpt_agent.stores import layout
from ckpt_agent.stores.manifest import FileEntry, JobRecord, parse_manifest
from tests.support.helpers import AGENT, clean_env
from tests.support.specs import named, spec

JOB, NAME, PART = "job-h", "checkpoint-1", 64 << 10
FILES = {"model.bin": random.Random(1).randbytes(200_000), "sub/state.json": b'{"step": 7}'}


def _entry(path: str, data: bytes) -> dict:
    parts = [format_checksum(checksum(data[i:i + PART])) for i in range(0, max(len(data), 1), PART)]
    return FileEntry(path, len(data), tuple(parts)).to_dict()


def commit(store: Path, files: dict[str, bytes], name: str = NAME, raw: bytes | None = None,
           objects: bool = True) -> None:
    """Write a checkpoint straight into a local store; `raw` replaces the manifest body, and
    `objects=False` writes only the manifest (for names no file system could hold)."""
    (store / layout.job_record_key(JOB)).parent.mkdir(parents=True, exist_ok=True)
    (store / layout.job_record_key(JOB)).write_text(JobRecord(JOB, "proj", "2026-01-01T00:00:00Z").to_json())
    for path, data in files.items() if objects else ():
        key = store / layout.file_key(JOB, name, 0, path)
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(data)
    body = {"format": 1, "project_name": "proj", "job_id": JOB, "checkpoint_name": name, "rank": 0,
            "committed_at": "2026-01-01T00:00:00Z", "algorithm": "crc32c", "part_size": PART,
            "files": [_entry(p, d) for p, d in files.items()]}
    (store / layout.manifest_key(JOB, name, 0)).parent.mkdir(parents=True, exist_ok=True)
    (store / layout.manifest_key(JOB, name, 0)).write_bytes(raw if raw is not None else json.dumps(body).encode())


class Box:
    """A store, a download folder `dl` and an `outside` folder holding a victim file."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.store, self.dl = tmp, tmp / "store", tmp / "dl"
        self.outside = tmp / "outside"
        self.outside.mkdir()
        self.victim = self.outside / "victim.bin"
        self.victim.write_bytes(b"keep me")
        self.marker = tmp / "trained"

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(**{"BT_CHECKPOINT_STORE": f"file://{self.store}", "CKPT_AGENT_WORKERS": "1",
                            "BT_LOAD_CHECKPOINT_CONFIG": spec(self.dl, named(NAME, JOB)), **extra})

    def run(self, *args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
        argv = list(args) or ["run", "--", "touch", str(self.marker)]
        return subprocess.run([AGENT, *argv], env=self.env(**extra), capture_output=True, text=True,
                              timeout=timeout)

    def ckpt(self, rank: int = 0) -> Path:
        return self.dl / f"rank-{rank}" / NAME

    def outside_untouched(self) -> None:
        assert sorted(p.name for p in self.outside.iterdir()) == ["victim.bin"]
        assert self.victim.read_bytes() == b"keep me"

    def refused(self, result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
        assert result.returncode == code, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("ckpt-agent: error: ")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        assert all(n in errors[0] for n in needles), errors[0]
        assert not self.marker.exists(), "the training command ran"

    def exact(self, files: dict[str, bytes] = FILES, rank: int = 0) -> None:
        for path, data in files.items():
            assert (self.ckpt(rank) / path).read_bytes() == data, path


@pytest.fixture
def box(tmp_path: Path) -> Box:
    b = Box(tmp_path)
    commit(b.store, FILES)
    return b


def latest_local(box: Box, rank: int) -> subprocess.CompletedProcess:
    """ckpt_agent.latest_local_checkpoint in a child, so a hang is a timeout, not a stuck suite."""
    code = f"import ckpt_agent; print(ckpt_agent.latest_local_checkpoint({rank}))"
    env = {**box.env(), "BT_LOAD_CHECKPOINT_DIR": str(box.dl)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)


# ---- item 1 and 12: names that collide, are too long or too deep ------------------------------

COLLIDING = {
    "a file and its temporary name": ["model.bin", "model.bin" + INCOMPLETE_SUFFIX],
    "the same, one folder down": ["sub/x", "sub/x" + INCOMPLETE_SUFFIX],
    "the temporary suffix in capitals": ["model.bin", "model.bin" + INCOMPLETE_SUFFIX.upper()],
    "a folder named like a temporary file": ["a" + INCOMPLETE_SUFFIX + "/b"],
    "names that differ in case": ["Model.bin", "model.bin"],
    "NFC and NFD spellings": [unicodedata.normalize("NFC", "caf\u00e9"), unicodedata.normalize("NFD", "caf\u00e9")],
    "NFKC compatibility forms": ["\ufb01le", "file"],
    "a file and a folder that differ in case": ["A", "a/b"],
}


@pytest.mark.parametrize("name", COLLIDING)
def test_manifest_with_colliding_or_temporary_names_is_refused(name):
    files = [_entry(p, b"x") for p in COLLIDING[name]]
    body = {"format": 1, "job_id": JOB, "checkpoint_name": NAME, "rank": 0, "committed_at": "x",
            "algorithm": "crc32c", "part_size": PART, "files": files}
    with pytest.raises(IntegrityError) as info:
        parse_manifest(json.dumps(body), "m.json")
    assert str(info.value).startswith("m.json: ")


def test_manifest_listing_a_file_and_its_temporary_name_fails_with_exit_5_and_writes_nothing(tmp_path):
    box = Box(tmp_path)
    commit(box.store, {"X": os.urandom(300_000), "X" + INCOMPLETE_SUFFIX: os.urandom(300_000)})
    box.refused(box.run(), 5, layout.manifest_key(JOB, NAME, 0), INCOMPLETE_SUFFIX)
    assert not box.dl.exists()


LONG = {
    "a 300-byte name": "a" * 300,
    "a name that fits but whose temporary twin does not": "b" * 250,
    "a 300-byte name one folder down": "sub/" + "c" * 300,
    "a path longer than PATH_MAX": "/".join(["d" * 200] * 30),
}


@pytest.mark.parametrize("name", LONG)
def test_overlong_manifest_path_fails_with_exit_5_naming_the_manifest_not_enametoolong(name, tmp_path):
    box = Box(tmp_path)
    commit(box.store, {LONG[name]: b"x"}, objects=False)
    result = box.run()
    box.refused(result, 5, layout.manifest_key(JOB, NAME, 0), "longer than a file system allows")
    assert "Traceback" not in result.stderr and not box.dl.exists()


def test_deeply_nested_manifest_fails_with_exit_5_not_recursionerror(tmp_path):
    box = Box(tmp_path)
    commit(box.store, {}, raw=b'{"format": 1, "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    result = box.run()
    box.refused(result, 5, layout.manifest_key(JOB, NAME, 0))
    assert "RecursionError" not in result.stderr


# ---- item 2: hardlinks are never written through ----------------------------------------------

HARDLINKS = {  # where the link to the outside victim is planted; the exit code a load ends with
    "at a checkpoint file": ("rank-0/checkpoint-1/model.bin", 5),
    "at a file one folder down": ("rank-0/checkpoint-1/sub/state.json", 5),
    "at a temporary file": ("rank-0/checkpoint-1/model.bin" + INCOMPLETE_SUFFIX, 5),
    "at the lock file": (".ckpt-agent/lock", 5),
    "at the index (replaced, not written)": (".ckpt-agent/verified.json", 0),
    "at the load record (replaced, not written)": (".ckpt-agent/loaded-rank-0.json", 0),
}


@pytest.mark.parametrize("name", HARDLINKS)
def test_hardlink_planted_in_the_download_folder_is_never_written_through(name, box):
    rel, code = HARDLINKS[name]
    (box.dl / rel).parent.mkdir(parents=True, exist_ok=True)
    os.link(box.victim, box.dl / rel)
    result = box.run()
    if code:
        box.refused(result, code, str(box.dl / rel), "hard links")
    else:
        assert result.returncode == 0, result.stderr
        box.exact()
    box.outside_untouched()


# ---- item 4: links planted at any depth, at any moment -----------------------------------------

class HookedStore:
    """The real store, with `hook(key)` called as each file's bytes are requested."""

    def __init__(self, store, hook) -> None:
        self._store, self._hook = store, hook

    def open_range(self, key: str, start: int, length: int):
        self._hook(key)
        return self._store.open_range(key, start, length)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def load_with_hook(box: Box, monkeypatch: pytest.MonkeyPatch, hook) -> None:
    from ckpt_agent.config.settings import settings_from_env
    from ckpt_agent.load import pipeline as load
    from ckpt_agent.report import Reporter

    real = load.open_load_store
    monkeypatch.setattr(load, "open_load_store", lambda s: HookedStore(real(s), hook))
    with open(os.devnull, "w") as sink:
        load.load_checkpoints(settings_from_env(box.env(), workers=1), Reporter(sink), Cancel())


def _when(path: str, attack):
    """A hook that runs `attack` once, when `path` of the checkpoint starts downloading."""
    done = []

    def hook(key: str) -> None:
        if key == layout.file_key(JOB, NAME, 0, path) and not done:
            done.append(attack())
    return hook


MID_DOWNLOAD = {  # (the folder swapped for a link to outside, the file being fetched when it happens)
    "a nested folder before it is made": ("sub", "model.bin"),
    "a nested folder two down before it is made": ("sub/deeper", "model.bin"),
    "a nested folder after its file landed": ("sub", "z.bin"),
    "the checkpoint folder after a file landed": ("", "z.bin"),
}


@pytest.mark.parametrize("name", MID_DOWNLOAD)
def test_symlink_planted_while_downloading_is_refused_and_never_written_through(name, tmp_path, monkeypatch):
    box = Box(tmp_path)
    files = {"model.bin": FILES["model.bin"], "sub/deeper/a.bin": b"a" * 1000, "sub/b.bin": b"b", "z.bin": b"z"}
    commit(box.store, files)
    rel, during = MID_DOWNLOAD[name]
    target = box.ckpt() / rel if rel else box.ckpt()

    def plant() -> None:
        if target.exists():
            target.rename(tmp_path / "dl" / "moved-aside")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(box.outside, target_is_directory=True)
    with pytest.raises(IntegrityError, match="symlink"):
        load_with_hook(box, monkeypatch, _when(during, plant))
    box.outside_untouched()
    assert not (box.dl / ".ckpt-agent" / "loaded-rank-0.json").exists()


def test_folder_moved_away_while_downloading_fails_the_load_before_it_is_recorded(tmp_path, monkeypatch):
    box = Box(tmp_path)
    commit(box.store, {"sub/a.bin": b"a" * 1000, "z.bin": b"z"})
    with pytest.raises(IntegrityError, match="disappeared during the load"):
        load_with_hook(box, monkeypatch, _when("z.bin", lambda: (box.ckpt() / "sub").rename(box.dl / "moved")))
    assert not (box.dl / ".ckpt-agent" / "loaded-rank-0.json").exists()


# ---- item 5: the ready file --------------------------------------------------------------------

def test_ready_file_temporary_name_cannot_be_planted_and_a_link_at_it_is_replaced(box):
    from ckpt_agent.load.pipeline import write_ready_file

    ready = box.tmp / "shared" / "ready"
    ready.parent.mkdir()
    os.symlink(box.victim, f"{ready}.{os.getpid()}.tmp")  # the name main used to write through
    os.symlink(box.victim, ready)
    write_ready_file(ready, box.dl, 0)
    assert not ready.is_symlink() and json.loads(ready.read_text())["ready"] is True
    assert box.victim.read_bytes() == b"keep me"


# ---- item 6: FIFOs never hang ------------------------------------------------------------------

@pytest.mark.parametrize("rel", [".ckpt-agent/verified.json", ".ckpt-agent/lock", "rank-0/checkpoint-1/model.bin",
                                 "rank-0/checkpoint-1/sub/state.json"])
def test_fifo_where_a_file_is_written_fails_a_load_with_exit_5_without_hanging(rel, box):
    (box.dl / rel).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(box.dl / rel)
    box.refused(box.run(), 5, str(box.dl / rel), "not a regular file")


def test_fifo_at_the_load_record_fails_verify_and_latest_local_checkpoint_without_hanging(box):
    assert box.run("load").returncode == 0
    record = box.dl / ".ckpt-agent" / "loaded-rank-0.json"
    record.unlink()
    os.mkfifo(record)
    box.refused(box.run("verify", str(box.dl)), 5, str(record))
    result = latest_local(box, 0)
    assert result.returncode == 1 and "not a load record" in result.stderr


def test_planted_load_record_naming_a_parent_folder_is_ignored_by_latest_local_checkpoint(box):
    assert box.run("load").returncode == 0
    record = box.dl / ".ckpt-agent" / "loaded-rank-0.json"
    body = json.loads(record.read_text())
    body["checkpoints"].insert(0, {**body["checkpoints"][0], "path": "rank-0/..", "order": -1})
    record.write_text(json.dumps(body))
    assert latest_local(box, 0).stdout.strip() == str(box.ckpt())


def test_fifo_at_a_loaded_file_is_flagged_by_verify_without_hanging(box):
    assert box.run("load").returncode == 0
    (box.ckpt() / "model.bin").unlink()
    os.mkfifo(box.ckpt() / "model.bin")
    result = box.run("verify", str(box.dl))
    assert result.returncode == 5 and "changed  rank-0/checkpoint-1/model.bin" in result.stdout


# ---- item 7: ranks sharing a folder ------------------------------------------------------------

def test_ranks_sharing_a_download_folder_keep_their_own_records(box):
    assert box.run("load", BT_NODE_RANK="0").returncode == 0
    assert box.run("load", BT_NODE_RANK="1").returncode == 0
    assert latest_local(box, 0).stdout.strip() == str(box.ckpt(0))
    assert latest_local(box, 1).stdout.strip() == str(box.ckpt(1))
    result = box.run("verify", str(box.dl))
    assert result.returncode == 0, result.stderr
    assert {line.split()[1] for line in result.stdout.splitlines()} == {
        f"rank-{r}/{NAME}/{p}" for r in (0, 1) for p in FILES}


def test_a_rank_loading_again_keeps_the_other_ranks_manifests(box):
    assert box.run("load", BT_NODE_RANK="0").returncode == 0
    assert box.run("load", BT_NODE_RANK="1").returncode == 0
    assert box.run("load", BT_NODE_RANK="1").returncode == 0
    assert (box.dl / ".ckpt-agent" / "manifests" / "rank-0" / f"{NAME}.json").is_file()
    assert box.run("verify", str(box.dl)).returncode == 0


# ---- item 11: a file edited in place with its mtime restored -----------------------------------

def _edit_in_place(path: Path) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 8)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_file_edited_in_place_with_its_mtime_restored_is_refetched_on_the_next_load(box):
    assert box.run("load").returncode == 0
    _edit_in_place(box.ckpt() / "model.bin")
    result = box.run()
    assert result.returncode == 0, result.stderr
    box.exact()
    assert "fetched 1 files" in result.stderr and "1 already intact" in result.stderr


def test_file_edited_in_place_is_flagged_by_verify_and_repaired_by_load(box):
    assert box.run("load").returncode == 0
    _edit_in_place(box.ckpt() / "model.bin")
    assert box.run("verify", str(box.dl)).returncode == 5
    assert box.run("load").returncode == 0
    assert box.run("verify", str(box.dl)).returncode == 0


# ---- item 14: the checkpoint folder holds exactly its manifest's files ------------------------

def test_load_removes_files_its_manifest_does_not_list_and_says_so(box):
    stale = box.ckpt() / "optimizer.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from another job")
    (box.ckpt() / "old" / "deep").mkdir(parents=True)
    (box.ckpt() / "old" / "deep" / "x").write_bytes(b"x")
    (box.ckpt() / "sub").mkdir()
    (box.ckpt() / "sub" / "extra.json").write_bytes(b"{}")
    (box.ckpt() / "link-to-outside").symlink_to(box.outside, target_is_directory=True)
    (box.ckpt() / "link-to-victim").symlink_to(box.victim)
    os.mkfifo(box.ckpt() / "a-fifo")
    result = box.run()
    assert result.returncode == 0, result.stderr
    assert "removed 6 entries" in result.stderr and "optimizer.pt" in result.stderr
    found = sorted(p.relative_to(box.ckpt()).as_posix() for p in box.ckpt().rglob("*") if not p.is_dir())
    assert found == sorted(FILES)
    box.outside_untouched()
    assert box.run("verify", str(box.dl)).returncode == 0


def test_load_removes_a_planted_link_in_a_listed_folder_without_following_it(tmp_path, monkeypatch):
    box = Box(tmp_path)
    commit(box.store, FILES)

    def plant() -> None:  # while the first file downloads, a link appears beside a listed file
        (box.ckpt() / "sub").mkdir(parents=True, exist_ok=True)
        (box.ckpt() / "sub" / "extra").symlink_to(box.outside, target_is_directory=True)
    load_with_hook(box, monkeypatch, _when("model.bin", plant))
    assert not (box.ckpt() / "sub" / "extra").is_symlink()
    box.exact()
    box.outside_untouched()


# ---- a default folder in world-writable /tmp ---------------------------------------------------

def _shared(tmp_path: Path) -> Path:
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


def _load_named_into(box, dl: Path):
    return box.run(BT_LOAD_CHECKPOINT_CONFIG=spec(dl, {"typ": "baseten_named_checkpoint",
                                                       "checkpoint_name": NAME, "job_id": JOB}))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a folder owned by another user")
def test_download_folder_another_user_made_in_a_world_writable_parent_is_refused_with_exit_6(box):
    dl = _shared(box.tmp) / "loaded_checkpoints"
    dl.mkdir()
    os.chown(dl, 65534, 65534)
    result = _load_named_into(box, dl)
    box.refused(result, 6, str(dl), "owned by uid 65534")
    assert list(dl.iterdir()) == []


def test_world_writable_download_folder_in_a_world_writable_parent_is_refused_with_exit_6(box):
    dl = _shared(box.tmp) / "loaded_checkpoints"
    dl.mkdir()
    dl.chmod(0o777)
    result = _load_named_into(box, dl)
    box.refused(result, 6, str(dl), "writable by others")
    assert list(dl.iterdir()) == []


def test_own_download_folder_in_a_world_writable_parent_is_created_and_loaded(box):
    dl = _shared(box.tmp) / "loaded_checkpoints"
    result = _load_named_into(box, dl)
    assert result.returncode == 0, result.stderr
    assert dl.stat().st_uid == os.geteuid() and not dl.stat().st_mode & stat.S_IWOTH
