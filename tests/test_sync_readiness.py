"""ckpt_agent.sync.readiness: the one decision of when a checkpoint may be committed, as a pure function."""

from __future__ import annotations

import pytest

from ckpt_agent.config.sidecar import Rules
from ckpt_agent.sync.formats import Format
from ckpt_agent.sync.readiness import Facts, NotReady, Trainer, Why, is_quiet, readiness

QUIET = 5.0


@pytest.mark.parametrize(("since", "now", "ctime_ns", "now_ns", "quiet"), [
    (0.0, 4.9, 0, 4_900_000_000, False),  # changed 4.9 s ago by both clocks
    (0.0, 5.0, 0, 1_000_000_000, True),  # unchanged across polls for the whole period
    (4.0, 5.0, 0, 5_000_000_000, True),  # first seen 1 s ago, but every ctime is 5 s old (`--once`)
    (4.0, 5.0, 1_000_000_000, 5_000_000_000, False),  # first seen 1 s ago, a file changed 4 s ago
])
def test_quiet_is_either_unchanged_across_polls_or_every_ctime_that_old(since, now, ctime_ns, now_ns, quiet):
    assert is_quiet(since, ctime_ns, now, now_ns, QUIET) is quiet


COMPLETE = {
    Format.HF: dict(markers={"trainer_state.json": b"{}"}),
    Format.DCP: dict(markers={".metadata": b"x"}),
    Format.DEEPSPEED: dict(name="global_step5", deepspeed_latest="global_step5"),
    Format.FILE: dict(structure=""),
    Format.MARKER: dict(markers={"DONE": b""}),
    Format.UNKNOWN: dict(),
}


@pytest.mark.parametrize("fmt", list(COMPLETE))
def test_every_format_that_is_complete_and_quiet_is_ready(fmt):
    facts = Facts(format=fmt, files=("a",), quiet=True, **COMPLETE[fmt])
    assert readiness(facts, Rules(markers=("DONE",), commit_on_quiet=True), Trainer.RUNNING) is None


@pytest.mark.parametrize("fmt", list(COMPLETE))
def test_a_checkpoint_that_is_not_quiet_is_still_being_written_whatever_else_it_shows(fmt):
    """The loop reads nothing more of a checkpoint that is not quiet outside a flush: this is why it need not."""
    facts = Facts(format=fmt, files=("a",), quiet=False, **COMPLETE[fmt])
    for trainer in Trainer:
        assert readiness(facts, Rules(markers=("DONE",), commit_on_quiet=True), trainer) == NotReady(Why.WRITING)


def test_an_open_writer_is_named_in_the_reason():
    why = readiness(Facts(format=Format.FILE, files=("a.pt",), quiet=True, writing="a.pt", structure=""),
                    Rules(), Trainer.RUNNING)
    assert why == NotReady(Why.OPEN, "a.pt")
    assert why is not None and why.may_still_finish(Trainer.RUNNING)


def test_an_empty_folder_is_never_ready_even_by_opt_in():
    facts = Facts(format=Format.UNKNOWN, files=(), quiet=True)
    assert readiness(facts, Rules(commit_on_quiet=True), Trainer.EXITED_OK) == NotReady(Why.EMPTY)
