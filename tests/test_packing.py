"""Small files are grouped into packs in path order, and a pack streams their bytes back to back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt_agent.upload.packing import Member, PackReader, assign_packs


def _open(member: Member) -> int:
    return os.open(member.path, os.O_RDONLY)


def make_files(tmp_path: Path, sizes: list[int]) -> list[tuple[str, Path, int]]:
    files = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"f{i:03d}"
        path.write_bytes(os.urandom(size))
        files.append((path.name, path, size))
    return files


def test_few_small_files_make_no_pack(tmp_path):
    assert assign_packs(make_files(tmp_path, [10] * 3), min_files=4) == []


def test_large_files_stay_out_of_packs(tmp_path):
    files = make_files(tmp_path, [10, 5000, 10, 10])
    packs = assign_packs(files, max_file=100, min_files=2)
    assert [m.rel for p in packs for m in p.members] == ["f000", "f002", "f003"]


def test_packs_split_at_the_pack_size_and_offsets_are_contiguous(tmp_path):
    files = make_files(tmp_path, [40, 40, 40, 0, 40])
    packs = assign_packs(files, max_file=100, pack_size=100, min_files=1)
    assert [[m.rel for m in p.members] for p in packs] == [["f000", "f001"], ["f002", "f003", "f004"]]
    assert [(m.offset, m.size) for m in packs[1].members] == [(0, 40), (40, 0), (40, 40)]
    assert [p.size for p in packs] == [80, 80]
    assert [p.id for p in packs] == [0, 1]


@pytest.mark.parametrize("read_size", [1, 7, 40, 1000])
def test_pack_reader_streams_members_back_to_back_and_rewinds(tmp_path, read_size):
    files = make_files(tmp_path, [40, 0, 13, 40])
    (pack,) = assign_packs(files, max_file=100, pack_size=1000, min_files=1)
    expected = b"".join(path.read_bytes() for _, path, _ in files)
    reader = PackReader(pack, _open)
    for _ in range(2):
        got = b""
        while chunk := reader.read(read_size):
            got += chunk
        assert got == expected
        reader.seek(0)


def test_pack_reader_fails_when_a_member_shrank(tmp_path):
    files = make_files(tmp_path, [40, 40])
    (pack,) = assign_packs(files, max_file=100, pack_size=1000, min_files=1)
    files[1][1].write_bytes(b"short")
    with pytest.raises(OSError, match="changed while packing"):
        PackReader(pack, _open).read()


def test_pack_reader_seeks_into_the_middle_of_a_member(tmp_path):
    files = make_files(tmp_path, [40, 0, 13, 40])
    (pack,) = assign_packs(files, max_file=100, pack_size=1000, min_files=1)
    expected = b"".join(path.read_bytes() for _, path, _ in files)
    reader = PackReader(pack, _open)
    for offset in (0, 5, 40, 45, 53, 60):
        reader.seek(offset)
        assert reader.read(10) == expected[offset:offset + 10]
