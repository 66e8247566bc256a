"""The behaviour every Store must have, run against each backend.

`StoreContract` holds the tests; each `Test*` subclass only supplies a `store` fixture. Keys in
every test are relative to the store root, so the same test runs unchanged on a local folder,
on moto and on the real SeaweedFS server (where the root is a prefix unique to the test).
"""

from __future__ import annotations

import io
import os
import traceback
import uuid

import pytest

from ckpt_agent.disk.safefs import temp_name
from ckpt_agent.errors import IntegrityError, NotFoundError, StoreError
from ckpt_agent.stores.base import Listing, Store
from ckpt_agent.stores.local import LocalStore
from ckpt_agent.stores.s3boto import Boto3Store
from ckpt_agent.stores.s3native import NativeS3Store
from tests.support.helpers import payload

MIB = 1 << 20
BIG_UPLOAD_SIZE = 65 * MIB + 1  # over the 64 MiB multipart threshold: two parts


def read_range(store: Store, key: str, start: int, length: int, chunk: int = 100_000) -> bytes:
    """Read a range the way the loader does: readinto a fixed buffer until the stream ends.

    The buffer is deliberately larger than what is left, so a reader that returns bytes past
    the requested range is caught rather than hidden by the caller's bookkeeping.
    """
    out = bytearray()
    buffer = memoryview(bytearray(chunk))
    reader = store.open_range(key, start, length)
    try:
        while True:
            n = reader.readinto(buffer)
            if n == 0:
                break
            out += buffer[:n]
            assert len(out) <= length, "reader returned bytes past the requested range"
    finally:
        reader.close()
    return bytes(out)


class StoreContract:
    """Subclasses provide a `store` fixture returning an empty Store."""

    # --- whole objects -------------------------------------------------------------------

    def test_write_bytes_then_read_bytes_round_trips(self, store: Store) -> None:
        store.write_bytes("a.bin", b"hello\x00world")
        store.write_bytes("nested/deeper/b.bin", b"")
        assert store.read_bytes("a.bin") == b"hello\x00world"
        assert store.read_bytes("nested/deeper/b.bin") == b""

    def test_write_bytes_overwrite_replaces_the_whole_object(self, store: Store) -> None:
        store.write_bytes("obj", b"a much longer first version")
        store.write_bytes("obj", b"short")
        assert store.read_bytes("obj") == b"short"

    def test_read_bytes_of_missing_key_raises_not_found(self, store: Store) -> None:
        with pytest.raises(NotFoundError) as info:
            store.read_bytes("no/such/key")
        assert isinstance(info.value, FileNotFoundError)
        assert "no/such/key" in str(info.value)

    def test_read_bytes_below_an_object_raises_not_found(self, store: Store) -> None:
        store.write_bytes("file", b"x")
        with pytest.raises(NotFoundError):
            store.read_bytes("file/child")

    # --- listing -------------------------------------------------------------------------

    def test_list_dir_returns_immediate_files_and_sorted_subfolders(self, store: Store) -> None:
        for key in ["run/b.bin", "run/a.bin", "run/C.json", "run/sub2/x", "run/sub1/y",
                    "run/sub1/deeper/z", "other/ignored"]:
            store.write_bytes(key, b"1")
        assert store.list_dir("run/") == Listing(("C.json", "a.bin", "b.bin"), ("sub1", "sub2"))

    def test_list_dir_does_not_recurse(self, store: Store) -> None:
        store.write_bytes("top/mid/leaf/file", b"1")
        assert store.list_dir("top/") == Listing((), ("mid",))
        assert store.list_dir("top/mid/") == Listing((), ("leaf",))
        assert store.list_dir("top/mid/leaf/") == Listing(("file",), ())

    def test_list_dir_of_store_root(self, store: Store) -> None:
        store.write_bytes("root.txt", b"1")
        store.write_bytes("dir/inner.txt", b"1")
        assert store.list_dir("") == Listing(("root.txt",), ("dir",))

    def test_list_dir_of_missing_prefix_is_empty(self, store: Store) -> None:
        store.write_bytes("present/x", b"1")
        assert store.list_dir("absent/") == Listing((), ())
        assert store.list_dir("present/absent/") == Listing((), ())

    def test_list_dir_does_not_match_sibling_with_same_name_start(self, store: Store) -> None:
        store.write_bytes("ckpt-1/a", b"1")
        store.write_bytes("ckpt-10/b", b"1")
        assert store.list_dir("ckpt-1/") == Listing(("a",), ())

    def test_list_recursive_returns_every_key_under_prefix_sorted(self, store: Store) -> None:
        for key in ["job/z", "job/a/2", "job/a/1", "job/b/c/d/e", "elsewhere/q"]:
            store.write_bytes(key, b"1")
        assert store.list_recursive("job/") == ["job/a/1", "job/a/2", "job/b/c/d/e", "job/z"]
        assert store.list_recursive("") == ["elsewhere/q", "job/a/1", "job/a/2", "job/b/c/d/e",
                                            "job/z"]
        assert store.list_recursive("missing/") == []

    # --- ranges --------------------------------------------------------------------------

    RANGE_OBJECT_SIZE = 2 * MIB + 123

    @pytest.mark.parametrize(
        ("start", "length"),
        [
            pytest.param(0, 10, id="head"),
            pytest.param(5, 1000, id="start-after-zero"),
            pytest.param(RANGE_OBJECT_SIZE - 17, 17, id="tail-to-end-of-object"),
            pytest.param(0, RANGE_OBJECT_SIZE, id="whole-object"),
            pytest.param(MIB - 3, MIB + 7, id="across-1mib-boundaries"),
            pytest.param(12345, 1, id="single-byte"),
        ],
    )
    def test_open_range_reads_exactly_the_requested_slice(
        self, store: Store, start: int, length: int
    ) -> None:
        data = payload(self.RANGE_OBJECT_SIZE, "range")
        store.write_bytes("weights.bin", data)
        assert read_range(store, "weights.bin", start, length) == data[start:start + length]

    def test_open_range_of_zero_length_reads_nothing(self, store: Store) -> None:
        store.write_bytes("weights.bin", b"0123456789")
        assert read_range(store, "weights.bin", 3, 0) == b""

    def test_open_range_of_missing_key_raises_not_found(self, store: Store) -> None:
        with pytest.raises(NotFoundError):
            store.open_range("missing.bin", 0, 10)
        with pytest.raises(NotFoundError):
            store.open_range("missing.bin", 0, 0)

    # --- upload_file ---------------------------------------------------------------------

    @pytest.mark.parametrize("size", [0, 1, 4097], ids=["empty", "one-byte", "small"])
    def test_upload_file_stores_the_file_objects_bytes(self, store: Store, size: int) -> None:
        data = payload(size, "upload")
        store.upload_file("up/obj", io.BytesIO(data), size)
        assert store.read_bytes("up/obj") == data

    def test_upload_file_from_a_real_file_overwrites(self, store: Store, tmp_path) -> None:
        source = tmp_path / "source.bin"
        source.write_bytes(payload(300_000, "file"))
        store.write_bytes("up/obj", b"old")
        with open(source, "rb") as f:
            store.upload_file("up/obj", f, source.stat().st_size)
        assert store.read_bytes("up/obj") == source.read_bytes()

    # --- delete, copy, exists ------------------------------------------------------------

    def test_delete_removes_the_object(self, store: Store) -> None:
        store.write_bytes("d/gone", b"1")
        store.write_bytes("d/kept", b"2")
        store.delete("d/gone")
        with pytest.raises(NotFoundError):
            store.read_bytes("d/gone")
        assert store.list_dir("d/") == Listing(("kept",), ())

    def test_deleting_the_last_object_under_a_prefix_leaves_nothing_under_it(self, store: Store) -> None:
        store.write_bytes("top/ckpt/rank-0/a", b"1")
        store.write_bytes("top/other", b"2")
        store.delete("top/ckpt/rank-0/a")
        assert store.list_recursive("top/") == ["top/other"]

    def test_delete_of_missing_key_is_not_an_error(self, store: Store) -> None:
        store.delete("never/existed")

    def test_copy_duplicates_the_object_and_keeps_the_source(self, store: Store) -> None:
        store.write_bytes("src/obj", b"payload")
        store.write_bytes("dst/obj", b"to be replaced")
        store.copy("src/obj", "dst/obj")
        store.copy("src/obj", "fresh/dir/obj")
        assert store.read_bytes("src/obj") == b"payload"
        assert store.read_bytes("dst/obj") == b"payload"
        assert store.read_bytes("fresh/dir/obj") == b"payload"

    def test_copy_of_missing_source_raises_not_found(self, store: Store) -> None:
        with pytest.raises(NotFoundError):
            store.copy("missing", "dst")

    def test_exists_is_true_only_for_objects(self, store: Store) -> None:
        store.write_bytes("top.txt", b"1")
        store.write_bytes("folder/inner.txt", b"1")
        assert store.exists("top.txt")
        assert store.exists("folder/inner.txt")
        assert not store.exists("folder")
        assert not store.exists("folder/missing.txt")
        assert not store.exists("missing/inner.txt")


class CopyPartContract:
    """An object assembled from ranges copied inside the store and uploaded ones (incremental
    uploads). Parts are >= 5 MiB but the last, as S3 requires."""

    def test_copy_part_assembles_copied_and_uploaded_ranges_byte_exact(self, store: Store, tmp_path) -> None:
        source = payload(12 * MIB, "copy-src")
        store.write_bytes("prev/obj", source)
        fresh = tmp_path / "fresh.bin"
        fresh.write_bytes(payload(5 * MIB, "fresh"))
        lengths = [5 * MIB, 5 * MIB, 3]
        upload = store.start_upload("next/obj", sum(lengths), lengths)
        with open(fresh, "rb") as f:
            upload.put_part(1, f, 0, 5 * MIB)
        upload.copy_part(2, "prev/obj", 12 * MIB - 3, 3)
        upload.copy_part(0, "prev/obj", MIB, 5 * MIB)
        upload.complete()
        assert store.read_bytes("next/obj") == source[MIB:6 * MIB] + fresh.read_bytes() + source[-3:]
        assert store.read_bytes("prev/obj") == source

    def test_copy_part_of_a_missing_source_raises_not_found_and_nothing_is_written(self, store: Store) -> None:
        upload = store.start_upload("next/obj", 5 * MIB, [5 * MIB])
        with pytest.raises(NotFoundError):
            upload.copy_part(0, "prev/missing", 0, 5 * MIB)
        upload.abort()
        assert not store.exists("next/obj")


class ShortSourceContract:
    """Stores that check a copied range against the source's size (moto does not; save checks the
    source's size itself before it copies from it)."""

    def test_copy_part_past_the_end_of_the_source_fails(self, store: Store) -> None:
        store.write_bytes("prev/short", payload(MIB, "short"))
        upload = store.start_upload("next/obj", 2 * MIB, [2 * MIB])
        with pytest.raises((IntegrityError, StoreError)):
            upload.copy_part(0, "prev/short", 0, 2 * MIB)
        upload.abort()
        assert not store.exists("next/obj")


class BigUploadContract:
    """upload_file of a file big enough for S3 multipart (kept off moto: slow there)."""

    def test_upload_file_of_65_mib_plus_one_round_trips(self, store: Store, tmp_path) -> None:
        source = tmp_path / "big.bin"
        with open(source, "wb") as f:
            f.write(payload(BIG_UPLOAD_SIZE, "big"))
        with open(source, "rb") as f:
            store.upload_file("big/obj", f, BIG_UPLOAD_SIZE)
        expected = source.read_bytes()
        assert store.read_bytes("big/obj") == expected
        tail = read_range(store, "big/obj", BIG_UPLOAD_SIZE - MIB - 5, MIB + 5)
        assert tail == expected[-(MIB + 5):]


class S3ErrorContract:
    """Failures of the S3 store that must reach the user as StoreError with a useful message.

    Subclasses provide `s3_store_for(bucket)`, returning a Boto3Store on the test's server.
    """

    @pytest.mark.parametrize(
        "operation",
        [
            pytest.param(lambda s: s.read_bytes("k"), id="read_bytes"),
            pytest.param(lambda s: s.list_dir("a/"), id="list_dir"),
            pytest.param(lambda s: s.open_range("k", 0, 1), id="open_range"),
        ],
    )
    def test_missing_bucket_raises_store_error_saying_bucket_does_not_exist(
        self, s3_store_for, operation
    ) -> None:
        bucket = f"missing-{uuid.uuid4().hex[:16]}"
        store = s3_store_for(bucket)
        with pytest.raises(StoreError) as info:
            operation(store)
        assert not isinstance(info.value, NotFoundError)
        assert bucket in str(info.value)
        assert "bucket does not exist" in str(info.value)


# --- the backends ----------------------------------------------------------------------------


class MemoryStore(Store):
    """Only the abstract methods: the base class's fallbacks (read back + put) are what it copies with."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        if key not in self.objects:
            raise NotFoundError(f"{key}: not found")
        return self.objects[key]

    def write_bytes(self, key: str, data: bytes) -> None:
        self.objects[key] = bytes(data)

    def list_dir(self, prefix: str) -> Listing:
        below = [k[len(prefix):] for k in self.objects if k.startswith(prefix)]
        return Listing(tuple(sorted(k for k in below if "/" not in k)),
                       tuple(sorted({k.split("/", 1)[0] for k in below if "/" in k})))

    def open_range(self, key: str, start: int, length: int):
        data = self.read_bytes(key)[start:start + length]
        return io.BytesIO(data)

    def upload_file(self, key: str, source, size: int) -> None:
        self.objects[key] = source.read(size)

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)


class TestBaseStoreFallback(CopyPartContract, ShortSourceContract):
    @pytest.fixture
    def store(self) -> Store:
        return MemoryStore()


class TestLocalStore(StoreContract, CopyPartContract, ShortSourceContract, BigUploadContract):
    @pytest.fixture
    def store(self, tmp_path) -> Store:
        return LocalStore(str(tmp_path / "store"))

    def test_delete_prunes_folders_it_left_empty_as_an_object_store_would(self, store: LocalStore) -> None:
        store.write_bytes("top/ckpt/rank-0/a", b"1")
        store.write_bytes("top/other", b"2")
        store.delete("top/ckpt/rank-0/a")
        assert store.list_dir("top/") == Listing(("other",), ())
        assert store.root.is_dir()

    def test_list_dir_hides_incomplete_writes(self, store: LocalStore) -> None:
        store.write_bytes("d/done", b"1")
        (store.root / "d" / temp_name()).write_bytes(b"partial")  # the name a write in progress has
        assert store.list_dir("d/") == Listing(("done",), ())


class TestS3StoreOnMoto(StoreContract, CopyPartContract, S3ErrorContract):
    @pytest.fixture
    def s3_store_for(self, moto_s3):
        stores = []

        def make(bucket: str, root: str = "") -> Boto3Store:
            stores.append(Boto3Store(bucket, root))
            return stores[-1]

        yield make
        for s in stores:
            s.close()

    @pytest.fixture
    def store(self, moto_s3, s3_store_for) -> Boto3Store:
        # An empty root: the seaweed variant covers a prefixed root.
        return s3_store_for(moto_s3.bucket)


@pytest.mark.seaweed
class TestS3StoreOnSeaweed(StoreContract, CopyPartContract, ShortSourceContract, BigUploadContract,
                           S3ErrorContract):
    """The boto3 engine (CKPT_AGENT_S3_ENGINE=boto3)."""

    @staticmethod
    def make(bucket: str, root: str) -> Store:
        return Boto3Store(bucket, root)

    @pytest.fixture
    def s3_store_for(self, s3_env, s3_prefix):
        stores = []

        def make(bucket: str, root: str = s3_prefix) -> Store:
            stores.append(self.make(bucket, root))
            return stores[-1]

        yield make
        for s in stores:
            s.close()

    @pytest.fixture
    def store(self, s3_env, s3_store_for) -> Boto3Store:
        return s3_store_for(s3_env.bucket)

    def test_store_keys_live_under_the_root_prefix(self, store: Boto3Store, s3_env, s3_prefix):
        store.write_bytes("a/b", b"1")
        listed = s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix=s3_prefix)
        assert [o["Key"] for o in listed["Contents"]] == [f"{s3_prefix}/a/b"]

    def test_upload_file_of_65_mib_plus_one_round_trips(self, store: Boto3Store, s3_env, tmp_path):
        super().test_upload_file_of_65_mib_plus_one_round_trips(store, tmp_path)
        # ...and it really took the multipart path (an ETag "<md5>-<parts>").
        head = s3_env.client().head_object(Bucket=s3_env.bucket, Key=f"{store.root}/big/obj")
        assert head["ContentLength"] == BIG_UPLOAD_SIZE
        assert head["ETag"].strip('"').endswith("-2")

    FAKE_SECRET = "fAkE-sEcReT-9f3c1e7a-never-print-me"

    def _assert_denied_without_secret(self, error: StoreError) -> None:
        message = str(error)
        assert not isinstance(error, NotFoundError)
        assert "access denied" in message.lower()
        assert "credentials" in message.lower()
        assert self.FAKE_SECRET not in message
        assert self.FAKE_SECRET not in repr(error)
        assert self.FAKE_SECRET not in "".join(traceback.format_exception(error))

    @pytest.mark.parametrize(
        "operation",
        [
            pytest.param(lambda s: s.read_bytes("k"), id="read_bytes"),
            pytest.param(lambda s: s.write_bytes("k", b"1"), id="write_bytes"),
            pytest.param(lambda s: s.list_dir(""), id="list_dir"),
            pytest.param(lambda s: s.open_range("k", 0, 1), id="open_range"),
        ],
    )
    def test_wrong_secret_key_raises_access_denied_without_leaking_the_secret(
        self, s3_env, s3_prefix, monkeypatch, operation
    ) -> None:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", self.FAKE_SECRET)
        store = self.make(s3_env.bucket, s3_prefix)
        try:
            with pytest.raises(StoreError) as info:
                operation(store)
        finally:
            store.close()
        self._assert_denied_without_secret(info.value)

    def test_unknown_access_key_raises_access_denied_without_leaking_the_secret(
        self, s3_env, s3_prefix, monkeypatch
    ) -> None:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHACCESSKEY0000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", self.FAKE_SECRET)
        store = self.make(s3_env.bucket, s3_prefix)
        try:
            with pytest.raises(StoreError) as info:
                store.read_bytes("k")
        finally:
            store.close()
        self._assert_denied_without_secret(info.value)


@pytest.mark.seaweed
class TestS3HttpStoreOnSeaweed(TestS3StoreOnSeaweed):
    """The native engine, the default: held to exactly the boto3 engine's contract."""

    @staticmethod
    def make(bucket: str, root: str) -> Store:
        return NativeS3Store(bucket, root, dict(os.environ))
