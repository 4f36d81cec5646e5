"""Filesystem offload store (connector/delivery/offload.py): content-addressed, atomic, bounded memory.

The S3 store is tested against a real S3 server in tests/integration/test_offload_s3.py; here
only its settings checks and the missing-boto3 error, which need no server.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import stat
import sys
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.delivery.offload import (
    FilesystemStore,
    OffloadConfigError,
    OffloadError,
    OffloadIntegrityError,
    OffloadNotFoundError,
    OffloadSettings,
    S3Store,
    Stored,
    open_store,
    read_uri,
)
from connector.errors import ConfigError, DeliveryError

MiB = 1024 * 1024


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunks(data: bytes, n: int) -> Iterator[bytes]:
    for i in range(0, len(data), n):
        yield data[i : i + n]


def never() -> Iterator[bytes]:
    raise AssertionError("a re-used object must not consume its pieces")
    yield b""  # pragma: no cover - makes this a generator


def leftovers(store: FilesystemStore) -> list[str]:
    """Every entry of sha256/ that is not a finished object (temp files)."""
    if not store.objects.exists():
        return []
    return sorted(p.name for p in store.objects.iterdir() if p.name.startswith("."))


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Run the body as nobody when we are root (root writes anywhere, whatever the mode bits)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def store(tmp_path: Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "offload-root")


@pytest.fixture(autouse=True)
def _base_dir(tmp_path: Path) -> None:
    (tmp_path / "offload-root").mkdir()


def test_round_trip_is_byte_identical_and_streamed(store: FilesystemStore) -> None:
    data = blob(3 * MiB + 17, seed=1)
    stored = store.put(sha(data), len(data), chunks(data, 64 * 1024))
    assert stored == Stored(store.uri_for(sha(data)), reused=False)
    assert stored.uri == (store.directory / "sha256" / sha(data)).as_uri()
    assert stored.uri.startswith("file:///")

    got = list(store.open(stored.uri))
    assert len(got) == 4  # streamed in 1 MiB chunks, not one read
    assert b"".join(got) == data
    assert b"".join(read_uri(stored.uri)) == data
    assert leftovers(store) == []


def test_uri_and_key_are_lowercase_hex(store: FilesystemStore) -> None:
    data = b"case"
    upper = sha(data).upper()
    stored = store.put(upper, len(data), [data])
    assert stored.uri.endswith("/sha256/" + sha(data))
    with pytest.raises(ValueError, match="SHA-256"):
        store.uri_for("abc")


def test_empty_object(store: FilesystemStore) -> None:
    stored = store.put(sha(b""), 0, [])
    assert b"".join(store.open(stored.uri)) == b""


def test_second_put_reuses_without_writing(store: FilesystemStore) -> None:
    data = blob(200_000, seed=2)
    first = store.put(sha(data), len(data), chunks(data, 10_000))
    path = store.objects / sha(data)
    before = path.stat()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns - 10_000_000_000))  # mtime 10 s ago
    before = path.stat()

    again = store.put(sha(data), len(data), never())
    assert again == Stored(first.uri, reused=True)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)


def test_existing_object_of_another_size_is_rewritten(store: FilesystemStore) -> None:
    data = blob(5000, seed=3)
    store.objects.mkdir(mode=0o700)
    (store.objects / sha(data)).write_bytes(data[:100])  # a truncated copy from elsewhere
    stored = store.put(sha(data), len(data), [data])
    assert not stored.reused
    assert (store.objects / sha(data)).read_bytes() == data


@pytest.mark.parametrize(
    ("declared_size", "feed"),
    [
        (10_000, lambda d: chunks(d[:9_999], 1000)),  # short
        (10_000, lambda d: chunks(d + b"x", 1000)),  # long
        (10_000, lambda d: chunks(d[:-1] + b"\x00", 1000)),  # right size, other bytes
    ],
    ids=["short", "long", "other-bytes"],
)
def test_mismatch_raises_and_leaves_nothing(store: FilesystemStore, declared_size: int, feed: object) -> None:
    data = blob(10_000, seed=4)
    with pytest.raises(OffloadIntegrityError) as exc:
        store.put(sha(data), declared_size, feed(data))  # type: ignore[operator]
    assert isinstance(exc.value, OffloadError)
    assert isinstance(exc.value, DeliveryError)  # retriable: the cycle aborts, nothing deleted
    assert "nothing was stored" in str(exc.value)
    assert not (store.objects / sha(data)).exists()
    assert leftovers(store) == []


def test_long_input_stops_reading_at_once(store: FilesystemStore) -> None:
    pulled = 0

    def endless() -> Iterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x" * 1000

    with pytest.raises(OffloadIntegrityError, match="more than the declared 2500 bytes"):
        store.put(sha(b"x" * 2500), 2500, endless())
    assert pulled == 3
    assert leftovers(store) == []


def test_failing_pieces_propagate_and_leave_nothing(store: FilesystemStore) -> None:
    def broken() -> Iterator[bytes]:
        yield b"a" * 1000
        raise RuntimeError("decoder failed")

    with pytest.raises(RuntimeError, match="decoder failed"):
        store.put(sha(b"a" * 2000), 2000, broken())
    assert leftovers(store) == []
    assert list(store.objects.iterdir()) == []


def test_files_are_private(store: FilesystemStore) -> None:
    old = os.umask(0o022)
    try:
        stored = store.put(sha(b"secret attachment"), 17, [b"secret attachment"])
    finally:
        os.umask(old)
    path = store.objects / sha(b"secret attachment")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.objects.stat().st_mode) == 0o700
    assert stored.uri == path.as_uri()


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"
    store = FilesystemStore(missing)
    problems = store.check()
    assert len(problems) == 1
    assert str(missing) in problems[0]
    assert "does not exist" in problems[0]
    assert "mkdir -p" in problems[0]

    with pytest.raises(OffloadConfigError) as exc:
        store.put(sha(b"x"), 1, [b"x"])
    assert isinstance(exc.value, ConfigError)
    assert str(missing) in str(exc.value)
    assert not missing.exists()  # the base directory (a volume) is never created by us


def test_file_instead_of_directory(tmp_path: Path) -> None:
    path = tmp_path / "a-file"
    path.write_text("")
    store = FilesystemStore(path)
    assert "is not a directory" in store.check()[0]
    with pytest.raises(OffloadConfigError, match="is not a directory"):
        store.put(sha(b"x"), 1, [b"x"])


def test_not_writable_directory_is_a_config_error() -> None:
    # Under /tmp (traversable by nobody), not under pytest's 0700 tmp_path.
    base = Path(tempfile.mkdtemp(prefix="pop3k-offload-ro-"))
    try:
        base.chmod(0o555)
        store = FilesystemStore(base)
        with unprivileged():
            problems = store.check()
            with pytest.raises(OffloadConfigError) as exc:
                store.put(sha(b"x"), 1, [b"x"])
        assert len(problems) == 1
        assert str(base) in problems[0]
        assert "not writable" in problems[0]
        assert str(base) in str(exc.value)
        assert "not writable" in str(exc.value)
        assert "chmod" in str(exc.value)  # the fix

        # sha256/ exists but is read-only: same error from put, and no temp file left.
        base.chmod(0o755)
        (base / "sha256").mkdir(mode=0o555)
        with unprivileged():
            assert "not writable" in store.check()[0]
            with pytest.raises(OffloadConfigError, match="not writable"):
                store.put(sha(b"x"), 1, [b"x"])
        assert list((base / "sha256").iterdir()) == []
    finally:
        base.chmod(0o755)
        with contextlib.suppress(FileNotFoundError):
            (base / "sha256").chmod(0o755)
        shutil.rmtree(base)


def test_check_ok_creates_nothing_but_the_objects_dir(store: FilesystemStore) -> None:
    assert store.check() == []
    assert store.objects.is_dir()
    assert list(store.objects.iterdir()) == []


def test_read_missing_object_is_typed(store: FilesystemStore) -> None:
    uri = store.uri_for(sha(b"never written"))
    with pytest.raises(OffloadNotFoundError) as exc:
        store.open(uri)
    assert isinstance(exc.value, OffloadError)
    assert "no such object" in str(exc.value)
    with pytest.raises(OffloadNotFoundError):
        read_uri(uri)


def test_read_detects_corruption_at_the_end(store: FilesystemStore) -> None:
    data = blob(2 * MiB + 5, seed=5)
    stored = store.put(sha(data), len(data), [data])
    path = store.objects / sha(data)
    path.chmod(0o600)
    with path.open("r+b") as f:
        f.seek(MiB + 3)
        f.write(b"\x00")
    seen = []
    with pytest.raises(OffloadIntegrityError, match="corrupted"):
        for chunk in store.open(stored.uri):
            seen.append(len(chunk))
    # Every chunk came out (unverified until the end); the error replaces the quiet end.
    assert seen == [MiB, MiB, 5]


def test_open_refuses_uris_of_other_places(store: FilesystemStore, tmp_path: Path) -> None:
    data = b"elsewhere"
    other = FilesystemStore(tmp_path / "other")
    (tmp_path / "other").mkdir()
    uri = other.put(sha(data), len(data), [data]).uri
    with pytest.raises(ValueError, match="not in this store"):
        store.open(uri)
    assert b"".join(read_uri(uri)) == data  # read_uri reads any file:// claim check
    for bad in ("file:///etc/passwd", "http://x/sha256/" + sha(data), "file://host/x/sha256/" + sha(data)):
        with pytest.raises(ValueError):
            read_uri(bad)


def test_uri_of_a_directory_with_spaces(tmp_path: Path) -> None:
    base = tmp_path / "with space%"
    base.mkdir()
    store = FilesystemStore(base)
    stored = store.put(sha(b"x"), 1, [b"x"])
    assert "with%20space%25" in stored.uri
    assert b"".join(read_uri(stored.uri)) == b"x"
    assert b"".join(store.open(stored.uri)) == b"x"


def test_concurrent_puts_of_the_same_key(store: FilesystemStore) -> None:
    import threading

    data = blob(MiB, seed=6)
    results: list[Stored] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        results.append(store.put(sha(data), len(data), chunks(data, 4096)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    assert (store.objects / sha(data)).read_bytes() == data
    assert leftovers(store) == []


def test_put_memory_is_bounded() -> None:
    """64 MiB in 1 MiB pieces: peak traced memory stays near one piece (never joined)."""
    base = Path(tempfile.mkdtemp(prefix="pop3k-offload-mem-"))
    try:
        store = FilesystemStore(base)
        total, piece = 64 * MiB, MiB
        # Made before tracing starts, like the spooled mail a decoder reads from; each piece is a
        # fresh 1 MiB copy (traced), as a decoder's output would be.
        source = blob(total, seed=7)
        digest = sha(source)

        def pieces() -> Iterator[bytes]:
            for i in range(0, total, piece):
                yield source[i : i + piece]

        tracemalloc.start()
        try:
            stored = store.put(digest, total, pieces())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert not stored.reused
        assert peak < 3 * MiB, f"peak {peak / MiB:.1f} MiB"

        tracemalloc.start()
        try:
            check = hashlib.sha256()
            for chunk in read_uri(stored.uri):
                check.update(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert check.hexdigest() == digest
        assert peak < 3 * MiB, f"read peak {peak / MiB:.1f} MiB"
    finally:
        shutil.rmtree(base)


# --------------------------------------------------------------------------- settings


def test_open_store_filesystem(tmp_path: Path) -> None:
    store = open_store(OffloadSettings(kind="filesystem", directory=str(tmp_path / "offload-root")))
    assert isinstance(store, FilesystemStore)
    assert store.check() == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "filesystem"}, "needs a directory"),
        ({"kind": "s3"}, "needs a bucket"),
        ({"kind": "ftp"}, "not supported"),
        ({"kind": "s3", "bucket": "b", "part_bytes": 4 * MiB}, "part_bytes=4194304"),
        ({"kind": "s3", "bucket": "b", "server_side_encryption": "aes256"}, "AES256"),
        ({"kind": "s3", "bucket": "b", "sse_kms_key_id": "k"}, "aws:kms"),
        ({"kind": "s3", "bucket": "b", "access_key_id_file": "/x"}, "go together"),
        ({"kind": "s3", "bucket": "b", "prefix": "/p/"}, "leading slash"),
        ({"kind": "s3", "bucket": "b", "timeout_seconds": 0}, "timeout_seconds"),
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(OffloadConfigError, match=message):
        OffloadSettings(**kwargs)  # type: ignore[arg-type]


def test_s3_without_boto3_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "boto3" or m.startswith(("boto3.", "botocore"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` raise ImportError
    with pytest.raises(OffloadConfigError, match=r"pip install 'pop3-kafka\[s3\]'"):
        open_store(OffloadSettings(kind="s3", bucket="b"))


def test_s3_unreadable_credential_files_are_named_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET-VALUE\n")
    store = S3Store(
        OffloadSettings(
            kind="s3",
            bucket="b",
            endpoint_url="http://127.0.0.1:9",
            access_key_id_file=str(tmp_path / "missing-key-id"),
            secret_access_key_file=str(secret),
        )
    )
    problems = store.check()
    assert len(problems) == 1
    assert "missing-key-id" in problems[0]
    with pytest.raises(OffloadConfigError, match="missing-key-id") as exc:
        store.put(sha(b"x"), 1, [b"x"])
    assert "TOP-SECRET-VALUE" not in str(exc.value)


def test_s3_uri_and_key_shape() -> None:
    store = S3Store(OffloadSettings(kind="s3", bucket="claims", prefix="pop3-kafka/"))
    h = sha(b"x")
    assert store.uri_for(h.upper()) == f"s3://claims/pop3-kafka/sha256/{h}"
    for bad in (
        "s3://claims/pop3-kafka/other/" + h,
        "s3:///sha256/" + h,
        "s3://claims/sha256/XYZ",
        f"s3://another-bucket/pop3-kafka/sha256/{h}",  # not this store's: read_uri reads those
    ):
        with pytest.raises(ValueError):
            store.open(bad)


def test_doctor_checks_the_offload_store(tmp_path: Path) -> None:
    from connector.config import parse_config
    from connector.delivery.doctor import check_offload

    def config(directory: Path, placement: str = "offload") -> Any:
        return parse_config(
            {
                "kafka": {"bootstrap_servers": "127.0.0.1:1"},
                "topics": {"mail": "m"},
                "offload": {"kind": "filesystem", "directory": str(directory)},
                "mailboxes": [
                    {
                        "id": "a",
                        "host": "h",
                        "username": "u",
                        "password": {"env": "PW"},
                        "attachments": {"placement": placement},
                    }
                ],
            },
            environ={"PW": "x"},
        )

    store = tmp_path / "store"
    store.mkdir()
    [ok] = check_offload(config(store))
    assert ok.ok and ok.check == "offload.store" and "usable" in ok.detail
    assert list((store / "sha256").iterdir()) == []  # the test write is gone
    assert check_offload(config(store, placement="chunked")) == []
    cfg = config(store)
    store.rename(tmp_path / "moved")
    [bad] = check_offload(cfg)
    assert not bad.ok and "store" in bad.detail
