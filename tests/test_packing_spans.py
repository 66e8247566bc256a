"""The pack arithmetic: where a pack splits and where each member sits (save side), and which members
a load fetches together in one ranged GET (`_spans`, load side)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt_agent.load.plan import FileTask
from ckpt_agent.load.transfer import _spans
from ckpt_agent.stores.manifest import FileEntry
from ckpt_agent.upload.packing import Member, PackReader, assign_packs


def _open(member: Member) -> int:
    return os.open(member.path, os.O_RDONLY)


def files(tmp_path: Path, sizes: list[int]) -> list[tuple[str, Path, int]]:
    out = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"f{i:03d}"
        path.write_bytes(bytes([i + 1]) * size)
        out.append((path.name, path, size))
    return out


def test_a_file_that_exactly_fills_a_pack_stays_in_it(tmp_path):
    packs = assign_packs(files(tmp_path, [60, 40, 1]), max_file=100, pack_size=100, min_files=1)
    assert [[(m.rel, m.offset) for m in p.members] for p in packs] == [[("f000", 0), ("f001", 60)], [("f002", 0)]]
    assert [p.size for p in packs] == [100, 1]


def test_a_file_of_exactly_the_largest_packed_size_is_packed_and_one_byte_more_is_not(tmp_path):
    packs = assign_packs(files(tmp_path, [100, 101, 5]), max_file=100, pack_size=1000, min_files=1)
    assert [(m.rel, m.offset, m.size) for m in packs[0].members] == [("f000", 0, 100), ("f002", 100, 5)]


def test_the_fewest_small_files_that_make_packs_is_min_files(tmp_path):
    assert assign_packs(files(tmp_path, [1, 1, 1]), min_files=3) != []
    assert assign_packs(files(tmp_path, [1, 1, 1]), min_files=4) == []


def test_a_reader_seeked_to_any_offset_yields_the_pack_from_there(tmp_path):
    (pack,) = assign_packs(files(tmp_path, [3, 0, 0, 4, 1, 0, 2]), max_file=100, pack_size=1000, min_files=1)
    whole = b"".join(p.read_bytes() for _, p, _ in files(tmp_path, [3, 0, 0, 4, 1, 0, 2]))
    reader = PackReader(pack, _open)
    for offset in range(pack.size + 1):
        reader.seek(offset)
        assert reader.read() == whole[offset:], offset


def member(offset: int, size: int) -> FileTask:
    return FileTask("k", Path("/dl/x"), f"m{offset}", FileEntry(f"m{offset}", size, ("0",), 0, offset), 1 << 20)


def grouped(members: list[FileTask], max_bytes: int, max_gap: int) -> list[list[tuple[int, int]]]:
    return [[(t.entry.offset, t.entry.size) for t in span] for span in _spans(members, max_bytes, max_gap)]


def test_adjacent_members_share_a_span_until_it_would_pass_max_bytes():
    members = [member(0, 30), member(30, 30), member(60, 40), member(100, 10)]
    assert grouped(members, max_bytes=100, max_gap=0) == [[(0, 30), (30, 30), (60, 40)], [(100, 10)]]


def test_max_bytes_counts_the_gaps_a_span_reads_over():
    members = [member(0, 10), member(50, 10), member(95, 10)]
    assert grouped(members, max_bytes=100, max_gap=100) == [[(0, 10), (50, 10)], [(95, 10)]]


@pytest.mark.parametrize(("gap", "split"), [(20, False), (21, True)])
def test_a_gap_wider_than_max_gap_starts_a_new_span(gap, split):
    members = [member(0, 10), member(10 + gap, 10)]
    expected = [[(0, 10)], [(10 + gap, 10)]] if split else [[(0, 10), (10 + gap, 10)]]
    assert grouped(members, max_bytes=1000, max_gap=20) == expected


def test_a_member_larger_than_max_bytes_gets_a_span_of_its_own_and_none_is_lost():
    members = [member(0, 5), member(5, 500), member(505, 5), member(510, 0)]
    assert grouped(members, max_bytes=100, max_gap=0) == [[(0, 5)], [(5, 500)], [(505, 5), (510, 0)]]
