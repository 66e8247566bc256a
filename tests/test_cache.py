"""The persistent part cache (issue 12 item 2): every hit re-hashed, a bad entry removed and a miss,
several agents filling one cache at once, LRU eviction under a cap, nothing planted followed."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import stat
from pathlib import Path

import pytest

from ckpt_agent.config.settings import CACHE_DIR_NAME, DEFAULT_CACHE_MAX_BYTES, CacheSettings, cache_settings_from_env
from ckpt_agent.disk.cache import ENTRIES, LOCK, STALE_TMP_NS, PartCache
from ckpt_agent.disk.safefs import TEMP_PREFIX
from ckpt_agent.errors import ConfigError, LocalError

KIB = 1024


def part(seed: int, size: int = 64 * KIB) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entries(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (root / ENTRIES).iterdir() if p.name != LOCK}


@pytest.fixture
def cache(tmp_path):
    with PartCache(tmp_path / "cache", 1 << 30) as c:
        yield c


def put(c: PartCache, digest: str, data: bytes) -> bool:
    """What a load does with a part it has just verified: put_span of it, here from memory."""
    fd = os.memfd_create("part")
    try:
        os.write(fd, data)
        return c.put_span(digest, fd, 0, len(data))
    finally:
        os.close(fd)


def read_back(c: PartCache, digest: str, length: int, tmp_path: Path, offset: int = 0) -> bytes | None:
    """get_into a file prefilled with a sentinel; the bytes placed, or None on a miss (sentinel intact)."""
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"\xee" * (offset + length))
    fd = os.open(dest, os.O_RDWR)
    try:
        hit = c.get_into(digest, fd, offset, length)
    finally:
        os.close(fd)
    data = dest.read_bytes()
    if not hit:
        assert data == b"\xee" * (offset + length), "a miss wrote into the destination"
        return None
    return data[offset:]


# --- hits and misses ----------------------------------------------------------------------------


def test_a_stored_part_comes_back_byte_exact_at_the_asked_offset(cache, tmp_path):
    data = part(1, 3 * 1024 * KIB + 5)  # several copy chunks, not a round size
    assert put(cache, sha(data), data)
    assert read_back(cache, sha(data), len(data), tmp_path, offset=4096) == data
    assert (cache.stats.hits, cache.stats.misses) == (1, 0)


def test_a_part_never_stored_is_a_miss(cache, tmp_path):
    assert read_back(cache, sha(b"nothing"), 7, tmp_path) is None
    assert cache.stats.misses == 1


def test_a_span_of_an_open_file_is_stored_as_that_spans_bytes(cache, tmp_path):
    src = tmp_path / "src.bin"
    data = part(2, 300 * KIB)
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        assert cache.put_span(sha(data[100 * KIB:]), fd, 100 * KIB, 200 * KIB)
    finally:
        os.close(fd)
    assert read_back(cache, sha(data[100 * KIB:]), 200 * KIB, tmp_path) == data[100 * KIB:]


def test_a_span_stored_under_a_key_it_does_not_hash_to_is_discarded_at_its_first_get(cache, tmp_path):
    """put_span trusts the load's manifest for the key; a store that lied costs one refetch."""
    src = tmp_path / "src.bin"
    data = part(2, 300 * KIB)
    src.write_bytes(data)
    claimed = sha(b"what the manifest said")
    fd = os.open(src, os.O_RDONLY)
    try:
        assert cache.put_span(claimed, fd, 0, len(data))
    finally:
        os.close(fd)
    assert read_back(cache, claimed, len(data), tmp_path) is None
    assert cache.stats.discarded == 1
    assert entries(tmp_path / "cache") == {}


def test_a_span_the_file_cannot_fill_is_not_stored_and_leaves_no_temporary_file(cache, tmp_path):
    fd = os.memfd_create("short")
    try:
        os.write(fd, b"three")
        assert not cache.put_span(sha(b"three and more"), fd, 0, 14)
    finally:
        os.close(fd)
    assert entries(tmp_path / "cache") == {}  # no entry, no temporary file


def test_a_key_that_is_not_a_lower_case_sha256_is_refused(cache):
    for bad in ("ab" * 31, "AB" * 32, "../" + "a" * 61, "g" * 64):
        with pytest.raises(ValueError):
            put(cache, bad, b"x")


# --- corruption ---------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "grow", "empty"])
def test_a_corrupt_entry_is_detected_removed_and_reported_as_a_miss(cache, tmp_path, damage):
    data = part(3)
    digest = sha(data)
    assert put(cache, digest, data)
    path = tmp_path / "cache" / ENTRIES / digest
    bad = {"flip a byte": data[:999] + bytes([data[999] ^ 1]) + data[1000:], "truncate": data[:-1],
           "grow": data + b"\0", "empty": b""}[damage]
    path.write_bytes(bad)
    assert read_back(cache, digest, len(data), tmp_path) is None
    assert not path.exists()
    assert (cache.stats.discarded, cache.stats.hits) == (1, 0)
    assert put(cache, digest, data)  # refetched bytes take its place
    assert read_back(cache, digest, len(data), tmp_path) == data


# --- nothing planted is followed ----------------------------------------------------------------


def test_a_link_planted_under_an_entrys_name_is_not_followed_and_is_removed(cache, tmp_path):
    data = part(4)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(data)  # the right bytes, so only not following the link makes this a miss
    planted = tmp_path / "cache" / ENTRIES / sha(data)
    planted.symlink_to(outside)
    assert read_back(cache, sha(data), len(data), tmp_path) is None
    assert not planted.is_symlink() and outside.read_bytes() == data


def test_a_fifo_planted_under_an_entrys_name_is_a_miss_not_a_hang(cache, tmp_path):
    planted = tmp_path / "cache" / ENTRIES / sha(b"x")
    os.mkfifo(planted)
    assert read_back(cache, sha(b"x"), 1, tmp_path) is None
    assert not planted.exists()


def test_a_put_replaces_a_planted_link_without_writing_through_it(cache, tmp_path):
    data = part(5)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    planted = tmp_path / "cache" / ENTRIES / sha(data)
    planted.symlink_to(victim)
    assert put(cache, sha(data), data)
    assert victim.read_bytes() == b"keep me"
    assert not planted.is_symlink() and planted.read_bytes() == data


def test_a_link_planted_as_the_entries_folder_is_refused(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "cache" / ENTRIES).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LocalError, match=f"{ENTRIES}: not a folder of the part cache"):
        PartCache(tmp_path / "cache", 1 << 20)


def test_the_cache_folder_is_created_private(tmp_path):
    PartCache(tmp_path / "new" / "cache", 1 << 20).close()
    assert stat.S_IMODE((tmp_path / "new" / "cache").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new" / "cache" / ENTRIES).stat().st_mode) == 0o700


# --- eviction -----------------------------------------------------------------------------------


def _age(root: Path, digest: str, seconds_ago: int) -> None:
    t = 1_700_000_000 - seconds_ago
    os.utime(root / ENTRIES / digest, (t, t))


def test_eviction_removes_the_least_recently_used_first_and_a_hit_counts_as_use(tmp_path):
    root = tmp_path / "cache"
    a, b, c, d = (part(i, 100 * KIB) for i in range(4))
    with PartCache(root, 300 * KIB) as cache:
        for age, data in zip((30, 20, 10), (a, b, c), strict=True):
            assert put(cache, sha(data), data)
            _age(root, sha(data), age)  # a oldest, then b, then c: no clock resolution in the way
        assert read_back(cache, sha(a), len(a), tmp_path) == a  # now a is the most recently used
        assert put(cache, sha(d), d)
        assert set(entries(root)) == {sha(a), sha(c), sha(d)}
        assert cache.stats.evicted == 1


def test_the_cache_stays_under_its_cap_after_every_put(tmp_path):
    root = tmp_path / "cache"
    cap = 500 * KIB
    rng = random.Random(7)
    with PartCache(root, cap) as cache:
        for i in range(40):
            data = part(100 + i, rng.randrange(1, 200 * KIB))
            assert put(cache, sha(data), data)
            assert sum(entries(root).values()) <= cap
        assert cache.stats.evicted > 0


def test_a_part_larger_than_the_cap_is_not_stored(tmp_path):
    with PartCache(tmp_path / "cache", 10 * KIB) as cache:
        assert not put(cache, sha(part(8, 11 * KIB)), part(8, 11 * KIB))
    assert entries(tmp_path / "cache") == {}


def test_a_reader_after_another_agent_evicted_everything_sees_a_clean_miss(tmp_path):
    data = part(9)
    with PartCache(tmp_path / "cache", 1 << 20) as mine, PartCache(tmp_path / "cache", 1) as other:
        assert put(mine, sha(data), data)
        assert other.evict() == len(data)
        assert read_back(mine, sha(data), len(data), tmp_path) is None
        assert mine.stats.discarded == 0


def test_eviction_clears_temporary_files_of_agents_that_died_but_not_fresh_ones(tmp_path):
    root = tmp_path / "cache"
    with PartCache(root, 1 << 20) as cache:
        dead, live = root / ENTRIES / f"{TEMP_PREFIX}dead", root / ENTRIES / f"{TEMP_PREFIX}live"
        dead.write_bytes(b"x")
        live.write_bytes(b"x")
        old = (os.stat(dead).st_mtime_ns - 2 * STALE_TMP_NS) / 1e9
        os.utime(dead, (old, old))
        cache.evict()
        assert not dead.exists() and live.exists()


# --- several agents at once ---------------------------------------------------------------------

SHARED, OWN, PART_SIZE = 12, 12, 96 * KIB


def _agent(root: str, cap: int, who: int, start: multiprocessing.synchronize.Barrier, out: str) -> None:
    """Assemble a file of shared and own parts: each part from the cache, or 'fetched' and put."""
    seeds = [s for pair in zip(range(SHARED), range(1000 * (who + 1), 1000 * (who + 1) + OWN), strict=True)
             for s in pair]
    start.wait(timeout=60)
    with PartCache(root, cap) as cache:
        fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for _ in range(2):  # the second round finds what either agent put (or evicted) meanwhile
                for i, seed in enumerate(seeds):
                    data = part(seed, PART_SIZE)
                    if not cache.get_into(sha(data), fd, i * PART_SIZE, PART_SIZE):
                        os.pwrite(fd, data, i * PART_SIZE)
                        put(cache, sha(data), data)
        finally:
            os.close(fd)


@pytest.mark.parametrize("cap", [1 << 30, 6 * PART_SIZE], ids=["roomy", "evicting"])
def test_two_agents_filling_one_cache_at_once_both_end_byte_exact(tmp_path, cap):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    outs = [tmp_path / f"agent-{who}.bin" for who in range(2)]
    procs = [ctx.Process(target=_agent, args=(str(tmp_path / "cache"), cap, who, start, str(outs[who])))
             for who in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    for who, out in enumerate(outs):
        seeds = [s for pair in zip(range(SHARED), range(1000 * (who + 1), 1000 * (who + 1) + OWN), strict=True)
                 for s in pair]
        assert out.read_bytes() == b"".join(part(s, PART_SIZE) for s in seeds)
    left = entries(tmp_path / "cache")
    assert not [n for n in left if n.startswith(TEMP_PREFIX)]
    assert sum(left.values()) <= cap
    for name in left:  # every entry that survived holds exactly the bytes its name promises
        assert sha((tmp_path / "cache" / ENTRIES / name).read_bytes()) == name


# --- settings -----------------------------------------------------------------------------------


def test_the_cache_is_off_unless_a_folder_is_configured():
    assert cache_settings_from_env({}) is None


def test_the_platform_project_cache_is_the_default_folder():
    assert cache_settings_from_env({"BT_PROJECT_CACHE_DIR": "/cache"}) == \
        CacheSettings(f"/cache/{CACHE_DIR_NAME}", DEFAULT_CACHE_MAX_BYTES)


def test_the_cache_folder_and_cap_can_be_set_with_units():
    env = {"BT_PROJECT_CACHE_DIR": "/cache", "CKPT_AGENT_CACHE_DIR": "/mine"}
    assert cache_settings_from_env({**env, "CKPT_AGENT_CACHE_MAX_BYTES": "50GB"}) == CacheSettings("/mine", 50 * 10**9)
    assert cache_settings_from_env({**env, "CKPT_AGENT_CACHE_MAX_BYTES": "20GiB"}).max_bytes == 20 << 30


def test_a_cap_of_zero_turns_the_cache_off():
    assert cache_settings_from_env({"BT_PROJECT_CACHE_DIR": "/cache", "CKPT_AGENT_CACHE_MAX_BYTES": "0"}) is None


@pytest.mark.parametrize(("env", "field"), [
    ({"CKPT_AGENT_CACHE_MAX_BYTES": "lots"}, "CKPT_AGENT_CACHE_MAX_BYTES"),
    ({"CKPT_AGENT_CACHE_MAX_BYTES": "-5GB"}, "CKPT_AGENT_CACHE_MAX_BYTES"),
    ({"CKPT_AGENT_CACHE_DIR": "relative/cache"}, "CKPT_AGENT_CACHE_DIR"),
    ({"BT_PROJECT_CACHE_DIR": "relative"}, "BT_PROJECT_CACHE_DIR"),
])
def test_a_bad_cache_setting_is_a_config_error_naming_its_variable(env, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        cache_settings_from_env(env)
