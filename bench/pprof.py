"""Reads a Go CPU profile (the gzipped protobuf `weed -cpuprofile` writes) without Go's tools: where a
Go server such as SeaweedFS spends its CPU, by function. Only the fields that question needs are
decoded (https://github.com/google/pprof/blob/main/proto/profile.proto): samples with their
location ids and values, locations with their lines' function ids, functions' names, the strings.
"""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

_SAMPLE, _LOCATION, _FUNCTION, _STRING = 2, 4, 5, 6  # Profile's field numbers


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of one message."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        kind = key & 7
        value: int | bytes
        if kind == 0:
            value, i = _varint(data, i)
        elif kind == 2:
            size, i = _varint(data, i)
            value, i = data[i:i + size], i + size
        else:  # fixed64 or fixed32: no field read here has them
            width = 8 if kind == 1 else 4
            value, i = data[i:i + width], i + width
        yield key >> 3, kind, value


def _ints(value: int | bytes) -> list[int]:
    """A repeated integer field, packed or not."""
    if isinstance(value, int):
        return [value]
    out, i = [], 0
    while i < len(value):
        number, i = _varint(value, i)
        out.append(number)
    return out


def stacks(path: Path) -> Iterator[tuple[list[str], int]]:
    """Each sample's stack (innermost function first) and its CPU nanoseconds."""
    data = gzip.decompress(path.read_bytes())
    strings: list[str] = []
    samples: list[tuple[list[int], int]] = []
    locations: dict[int, list[int]] = {}
    functions: dict[int, int] = {}
    for number, _, value in _fields(data):
        if number == _STRING:
            strings.append(bytes(value).decode() if isinstance(value, bytes) else "")
        elif number == _SAMPLE and isinstance(value, bytes):
            sample = list(_fields(value))
            ids = [x for f, _, v in sample if f == 1 for x in _ints(v)]
            values = [x for f, _, v in sample if f == 2 for x in _ints(v)]
            samples.append((ids, values[-1]))  # the last value type is CPU time
        elif number == _LOCATION and isinstance(value, bytes):
            location = list(_fields(value))
            lines = [v for f, _, v in location if f == 4 and isinstance(v, bytes)]
            ident = next(x for f, _, v in location if f == 1 for x in _ints(v))
            locations[ident] = [x for line in lines for f, _, v in _fields(line) if f == 1 for x in _ints(v)]
        elif number == _FUNCTION and isinstance(value, bytes):
            function = {f: x for f, _, v in _fields(value) for x in _ints(v) if f in (1, 2)}
            functions[function[1]] = function.get(2, 0)
    for ids, nanoseconds in samples:
        yield [strings[functions[f]] for i in ids for f in locations[i]], nanoseconds


def top(path: Path, count: int = 8) -> tuple[float, list[tuple[str, float]]]:
    """The profile's CPU seconds, and the `count` functions that spent most of it themselves, with
    their shares."""
    flat: Counter[str] = Counter()
    for stack, nanoseconds in stacks(path):
        if stack:
            flat[stack[0]] += nanoseconds
    total = sum(flat.values())
    return total / 1e9, [(name, spent / total) for name, spent in flat.most_common(count)]
