"""folder_lock: one agent per download folder. A second one waits (saying for whom, once), can be
cancelled while it waits, and gets the folder as soon as the first lets go, even after an error.

flock conflicts between two opens of the lock file even in one process, so a thread stands in
for the second agent; every wait is on an event with a deadline."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from ckpt_agent.disk.localstate import folder_lock, prepare_root
from ckpt_agent.errors import IntegrityError, Interrupted

DEADLINE = 30


class Second:
    """The second agent: tries to lock in a thread and reports each step through events."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.told: list[str] = []
        self.waiting, self.entered, self.done = threading.Event(), threading.Event(), threading.Event()
        self.cancelled, self.polled_twice = threading.Event(), threading.Event()
        self.polls = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _wait(self, message: str) -> None:
        self.told.append(message)
        self.waiting.set()

    def _check_cancel(self) -> None:
        self.polls += 1
        if self.polls >= 2:
            self.polled_twice.set()
        if self.cancelled.is_set():
            raise Interrupted(signal.SIGTERM)

    def _run(self) -> None:
        try:
            with prepare_root(self.root) as folder, folder_lock(folder, self._wait, self._check_cancel):
                self.entered.set()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc
        finally:
            self.done.set()

    def start(self) -> Second:
        self.thread.start()
        return self


def lock_file(root: Path) -> Path:
    return root / ".ckpt-agent" / "lock"


def test_the_holder_writes_its_pid_into_the_lock_file(tmp_path):
    with prepare_root(tmp_path) as folder, folder_lock(folder, pytest.fail, lambda: None):
        assert lock_file(tmp_path).read_text() == str(os.getpid())


def test_a_second_agent_waits_saying_for_whom_and_enters_once_the_first_lets_go(tmp_path):
    with prepare_root(tmp_path) as folder, folder_lock(folder, pytest.fail, lambda: None):
        second = Second(tmp_path).start()
        assert second.waiting.wait(DEADLINE) and second.polled_twice.wait(DEADLINE)
        assert not second.entered.is_set()
        assert second.told == [f"download folder {tmp_path} is in use by pid {os.getpid()}; "
                               "waiting for it to finish"]
    assert second.done.wait(DEADLINE)
    assert second.error is None and second.entered.is_set()
    assert len(second.told) == 1  # told once, though it polled more than once


def test_a_waiting_agent_can_be_cancelled_and_never_enters(tmp_path):
    with prepare_root(tmp_path) as folder, folder_lock(folder, pytest.fail, lambda: None):
        second = Second(tmp_path).start()
        assert second.waiting.wait(DEADLINE)
        second.cancelled.set()
        assert second.done.wait(DEADLINE)
    assert isinstance(second.error, Interrupted) and not second.entered.is_set()


def test_an_error_inside_the_lock_releases_it(tmp_path):
    with prepare_root(tmp_path) as folder, pytest.raises(RuntimeError, match="boom"), \
            folder_lock(folder, pytest.fail, lambda: None):
        raise RuntimeError("boom")
    with prepare_root(tmp_path) as folder, folder_lock(folder, pytest.fail, lambda: None):
        pass  # entered without waiting: pytest.fail would have been called


def test_a_symlink_planted_at_the_lock_file_is_refused_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    root = tmp_path / "dl"
    lock_file(root).parent.mkdir(parents=True)
    lock_file(root).symlink_to(victim)
    with prepare_root(root) as folder, pytest.raises(IntegrityError, match="symlink"), \
            folder_lock(folder, pytest.fail, lambda: None):
        pass
    assert victim.read_text() == "keep"
