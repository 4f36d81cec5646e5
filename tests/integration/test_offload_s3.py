"""S3Store (connector/delivery/offload.py) against a real S3-compatible server (SeaweedFS).

What is pinned down, each test in a bucket of its own:

* put_object for small objects (< part_bytes) and multipart uploads for large ones come back
  byte-identical through ``open`` and ``read_uri``; the server keeps the SHA-256 we send;
* a second put of the same key writes nothing (``reused``); an object of the right size but
  another server-side checksum is replaced;
* a size or SHA-256 mismatch, or an iterator that fails, leaves no object and no unfinished
  multipart upload;
* credentials refused (wrong secret), write refused (read-only identity) and a missing bucket
  give typed errors and ``check()`` problems naming the bucket and the fix, and the secret
  appears in no message, traceback or log line;
* SSE: SeaweedFS accepts ``AES256`` and really encrypts (the plaintext is not in its volume
  files); it answers ``aws:kms`` with HTTP 500 when no KMS is configured, which ``check()``
  reports as an encryption problem and ``put`` as a typed, retriable error;
* a 40 MiB multipart put holds about one part in memory.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import random
import traceback
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from objectstore import ObjectStore

from connector.delivery.offload import (
    OffloadAccessError,
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

# The first test to ask for the session store may have to build weed (minutes, once per machine).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MiB = 1024 * 1024
PART = 5 * MiB
PREFIX = "pop3-kafka/"


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunks(data: bytes, n: int = MiB) -> Iterator[bytes]:
    for i in range(0, len(data), n):
        yield data[i : i + n]


def never() -> Iterator[bytes]:
    raise AssertionError("a re-used object must not consume its pieces")
    yield b""  # pragma: no cover - makes this a generator


@pytest.fixture
def bucket(object_store: ObjectStore) -> str:
    name = f"offload-{uuid.uuid4().hex[:12]}"
    object_store.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(object_store: ObjectStore) -> Any:
    return object_store.client()


def write_credentials(directory: Path, access_key: str, secret_key: str) -> tuple[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    key_file, secret_file = directory / "access_key_id", directory / "secret_access_key"
    # As a Kubernetes secret often is: with a trailing newline (stripped by the store).
    key_file.write_text(access_key + "\n")
    secret_file.write_text(secret_key + "\n")
    return str(key_file), str(secret_file)


def settings_for(
    store: ObjectStore,
    bucket: str,
    tmp_path: Path,
    *,
    secret: str | None = None,
    access_key: str | None = None,
    **kw: Any,
) -> OffloadSettings:
    key_file, secret_file = write_credentials(
        tmp_path / f"creds-{uuid.uuid4().hex[:6]}",
        store.access_key if access_key is None else access_key,
        store.secret_key if secret is None else secret,
    )
    kw.setdefault("part_bytes", PART)
    kw.setdefault("prefix", PREFIX)
    return OffloadSettings(
        kind="s3",
        bucket=bucket,
        endpoint_url=store.endpoint_url,
        region=store.region,
        access_key_id_file=key_file,
        secret_access_key_file=secret_file,
        timeout_seconds=10,
        **kw,
    )


def keys(s3: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def pending_uploads(s3: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def read_all(it: Iterator[bytes]) -> bytes:
    return b"".join(it)


# --------------------------------------------------------------------------- round trips


def test_small_put_round_trip(object_store: ObjectStore, bucket: str, s3: Any, tmp_path: Path) -> None:
    settings = settings_for(object_store, bucket, tmp_path)
    store = open_store(settings)
    assert isinstance(store, S3Store)
    assert store.check() == []
    data = blob(300_000, seed=1)
    digest = sha(data)

    stored = store.put(digest, len(data), chunks(data, 7000))
    assert stored == Stored(f"s3://{bucket}/{PREFIX}sha256/{digest}", reused=False)
    assert stored.uri == store.uri_for(digest)

    head = s3.head_object(Bucket=bucket, Key=f"{PREFIX}sha256/{digest}", ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(data)
    assert head["ContentType"] == "application/octet-stream"
    # The whole object's SHA-256, verified by the server on receipt and kept.
    assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(digest)).decode()

    got = list(store.open(stored.uri))
    assert b"".join(got) == data
    assert max(len(c) for c in got) <= MiB  # streamed
    assert read_all(read_uri(stored.uri, settings)) == data
    assert keys(s3, bucket) == [f"{PREFIX}sha256/{digest}"]


def test_empty_object(object_store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    store = S3Store(settings_for(object_store, bucket, tmp_path))
    stored = store.put(sha(b""), 0, [])
    assert read_all(store.open(stored.uri)) == b""
    assert store.put(sha(b""), 0, never()).reused


def test_multipart_round_trip(object_store: ObjectStore, bucket: str, s3: Any, tmp_path: Path) -> None:
    settings = settings_for(object_store, bucket, tmp_path)
    store = S3Store(settings)
    data = blob(20 * MiB + 12345, seed=2)  # 4 full parts and a short fifth
    digest = sha(data)
    # Pieces of an awkward size, so parts are cut across pieces.
    stored = store.put(digest, len(data), chunks(data, 3 * MiB + 1))
    assert not stored.reused

    head = s3.head_object(Bucket=bucket, Key=f"{PREFIX}sha256/{digest}")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-5")
    assert pending_uploads(s3, bucket) == []

    assert read_all(store.open(stored.uri)) == data
    assert read_all(read_uri(stored.uri, settings)) == data
    # read_uri takes the bucket from the URI, the rest from the settings.
    other = settings_for(object_store, "some-other-bucket", tmp_path)
    assert read_all(read_uri(stored.uri, other)) == data


def test_exactly_one_part(object_store: ObjectStore, bucket: str, s3: Any, tmp_path: Path) -> None:
    store = S3Store(settings_for(object_store, bucket, tmp_path))
    data = blob(PART, seed=3)
    stored = store.put(sha(data), len(data), [data])
    assert s3.head_object(Bucket=bucket, Key=f"{PREFIX}sha256/{sha(data)}")["ETag"].strip('"').endswith("-1")
    assert read_all(store.open(stored.uri)) == data


def test_read_missing_object(object_store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    settings = settings_for(object_store, bucket, tmp_path)
    store = S3Store(settings)
    uri = store.uri_for(sha(b"never written"))
    with pytest.raises(OffloadNotFoundError, match="no such object"):
        store.open(uri)
    with pytest.raises(OffloadNotFoundError):
        read_uri(uri, settings)


def test_read_detects_replaced_content(object_store: ObjectStore, bucket: str, s3: Any, tmp_path: Path) -> None:
    store = S3Store(settings_for(object_store, bucket, tmp_path))
    data = blob(1000, seed=4)
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}sha256/{sha(data)}", Body=b"not the bytes of the key")
    with pytest.raises(OffloadIntegrityError, match="corrupted"):
        read_all(store.open(store.uri_for(sha(data))))


# --------------------------------------------------------------------------- re-use


@pytest.mark.parametrize("size", [200_000, 11 * MiB], ids=["put_object", "multipart"])
def test_second_put_reuses(object_store: ObjectStore, bucket: str, s3: Any, tmp_path: Path, size: int) -> None:
    store = S3Store(settings_for(object_store, bucket, tmp_path))
    data = blob(size, seed=5)
    key = f"{PREFIX}sha256/{sha(data)}"
    first = store.put(sha(data), len(data), chunks(data))
    before = s3.head_object(Bucket=bucket, Key=key)

    # As after an aborted Kafka transaction: a new store (a restarted process), the same key.
    again = S3Store(settings_for(object_store, bucket, tmp_path)).put(sha(data), len(data), never())
    assert again == Stored(first.uri, reused=True)
    after = s3.head_object(Bucket=bucket, Key=key)
    assert (after["ETag"], after["LastModified"]) == (before["ETag"], before["LastModified"])


def test_same_size_other_checksum_is_replaced(object_store: ObjectStore, bucket: str, s3: Any, tmp_path: Path) -> None:
    store = S3Store(settings_for(object_store, bucket, tmp_path))
    data = blob(4096, seed=6)
    impostor = blob(4096, seed=7)
    key = f"{PREFIX}sha256/{sha(data)}"
    s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=impostor,
        ChecksumSHA256=base64.b64encode(hashlib.sha256(impostor).digest()).decode(),
    )
    stored = store.put(sha(data), len(data), [data])
    assert not stored.reused
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data


# --------------------------------------------------------------------------- nothing left behind


@pytest.mark.parametrize(
    "case",
    [(size, mangle) for size in (100_000, 12 * MiB) for mangle in ("bytes", "short", "long")],
    ids=lambda case: f"{'put_object' if case[0] < PART else 'multipart'}-{case[1]}",
)
def test_mismatch_leaves_no_object_and_no_upload(
    object_store: ObjectStore, bucket: str, s3: Any, tmp_path: Path, case: tuple[int, str]
) -> None:
    size, mangle = case
    store = S3Store(settings_for(object_store, bucket, tmp_path))
    data = blob(size, seed=8)
    fed = {"bytes": data[:-1] + bytes([data[-1] ^ 1]), "short": data[:-1], "long": data + b"!"}[mangle]
    with pytest.raises(OffloadIntegrityError, match="nothing was stored") as exc:
        store.put(sha(data), size, chunks(fed))
    assert isinstance(exc.value, OffloadError)
    assert keys(s3, bucket) == []
    assert pending_uploads(s3, bucket) == []


def test_failing_pieces_abort_the_upload(object_store: ObjectStore, bucket: str, s3: Any, tmp_path: Path) -> None:
    store = S3Store(settings_for(object_store, bucket, tmp_path))
    data = blob(16 * MiB, seed=9)

    def broken() -> Iterator[bytes]:
        yield from chunks(data[: 11 * MiB])  # two parts are already on the server
        raise RuntimeError("decoder failed")

    with pytest.raises(RuntimeError, match="decoder failed"):
        store.put(sha(data), len(data), broken())
    assert keys(s3, bucket) == []
    assert pending_uploads(s3, bucket) == []


# --------------------------------------------------------------------------- refusals


def all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def test_wrong_secret_is_typed_and_never_shown(
    object_store: ObjectStore, bucket: str, s3: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "WRONG" + uuid.uuid4().hex + "secret"
    caplog.set_level(logging.DEBUG)  # botocore's request logging included
    store = S3Store(settings_for(object_store, bucket, tmp_path, secret=wrong))

    problems = store.check()
    assert len(problems) == 1
    assert "refused the credentials" in problems[0]
    assert "SignatureDoesNotMatch" in problems[0]
    assert bucket in problems[0]
    assert "secret_access_key_file" in problems[0]  # the fix

    data = blob(1000, seed=10)
    with pytest.raises(OffloadError) as small:
        store.put(sha(data), len(data), [data])
    assert isinstance(small.value, OffloadAccessError)
    assert "refused the credentials (HTTP 403 SignatureDoesNotMatch" in str(small.value)
    assert small.value.operation == "check bucket"  # the first request of a store's first put
    # A store that saw its bucket before the secret went bad fails at the HEAD, whose 403 has no
    # body; a listing then tells refused credentials from a missing permission.
    store._bucket_seen = True
    with pytest.raises(OffloadAccessError, match=r"refused the credentials \(HTTP 403 SignatureDoesNotMatch") as head:
        store.put(sha(data), len(data), [data])
    assert head.value.operation == "head"
    big = blob(6 * MiB, seed=11)
    with pytest.raises(OffloadAccessError, match="refused the credentials") as multi:
        store.put(sha(big), len(big), chunks(big))
    with pytest.raises(OffloadAccessError, match="refused the credentials") as read:
        store.open(store.uri_for(sha(data)))

    texts = [*problems, *(all_text(e.value) for e in (small, head, multi, read)), caplog.text]
    for text in texts:
        for secret in (wrong, object_store.secret_key):
            assert secret not in text
    assert "Signature" in caplog.text  # botocore did log the requests: the check above saw them
    assert keys(s3, bucket) == []
    assert pending_uploads(s3, bucket) == []


def test_unknown_access_key(object_store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    store = S3Store(settings_for(object_store, bucket, tmp_path, access_key="POP3KNOSUCHKEY000000", secret="x" * 40))
    problems = store.check()
    assert len(problems) == 1
    assert "InvalidAccessKeyId" in problems[0]
    assert "x" * 40 not in problems[0]


def test_rotated_secret_is_read_again(object_store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    settings = settings_for(object_store, bucket, tmp_path, secret="stale-secret-before-rotation")
    store = S3Store(settings)
    with pytest.raises(OffloadAccessError):
        store.put(sha(b"x"), 1, [b"x"])
    assert settings.secret_access_key_file is not None
    Path(settings.secret_access_key_file).write_text(object_store.secret_key + "\n")  # the kubelet updates it
    assert not store.put(sha(b"x"), 1, [b"x"]).reused


def test_read_only_identity(object_store: ObjectStore, bucket: str, s3: Any, tmp_path: Path) -> None:
    store = S3Store(
        settings_for(
            object_store,
            bucket,
            tmp_path,
            access_key=object_store.readonly_access_key,
            secret=object_store.readonly_secret_key,
        )
    )
    problems = store.check()
    assert len(problems) == 1
    assert "create upload" in problems[0]
    assert "access denied" in problems[0]
    assert "s3:PutObject" in problems[0]
    with pytest.raises(OffloadAccessError, match="access denied"):
        store.put(sha(b"x"), 1, [b"x"])
    assert keys(s3, bucket) == []
    assert pending_uploads(s3, bucket) == []


def test_missing_bucket(object_store: ObjectStore, tmp_path: Path) -> None:
    name = f"offload-missing-{uuid.uuid4().hex[:8]}"
    store = S3Store(settings_for(object_store, name, tmp_path))
    problems = store.check()
    assert len(problems) == 1
    assert f"bucket {name!r} does not exist" in problems[0]
    assert "create it" in problems[0]
    with pytest.raises(OffloadConfigError, match=f"bucket {name!r} does not exist"):
        store.put(sha(b"x"), 1, [b"x"])
    big = blob(6 * MiB, seed=12)
    with pytest.raises(OffloadConfigError, match=name):
        store.put(sha(big), len(big), chunks(big))
    # SeaweedFS would create the bucket on a PutObject; the store asks first, so it does not.
    assert name not in [b["Name"] for b in object_store.client().list_buckets()["Buckets"]]


def test_unreachable_endpoint(tmp_path: Path) -> None:
    settings = OffloadSettings(
        kind="s3",
        bucket="b",
        endpoint_url="http://127.0.0.1:9",  # discard: nothing listens
        access_key_id_file=write_credentials(tmp_path, "AK", "SK")[0],
        secret_access_key_file=str(tmp_path / "secret_access_key"),
        timeout_seconds=2,
    )
    store = S3Store(settings)
    problems = store.check()
    assert len(problems) == 1
    assert "cannot connect" in problems[0]
    assert "http://127.0.0.1:9" in problems[0]
    with pytest.raises(OffloadError, match="cannot connect") as exc:
        store.put(sha(b"x"), 1, [b"x"])
    assert not isinstance(exc.value, OffloadAccessError)


# --------------------------------------------------------------------------- server-side encryption


def volume_files(store: ObjectStore, bucket: str) -> list[Path]:
    # SeaweedFS gives every bucket volumes of its own: <data>/<bucket>_<volume id>.dat
    return sorted(store.data_dir.rglob(f"{bucket}_*.dat"))


def test_sse_aes256_is_accepted_and_encrypts(object_store: ObjectStore, bucket: str, s3: Any, tmp_path: Path) -> None:
    store = S3Store(settings_for(object_store, bucket, tmp_path, server_side_encryption="AES256"))
    assert store.check() == []
    small, big = blob(200_000, seed=13), blob(11 * MiB, seed=14)
    plain = blob(200_000, seed=15)
    s3.put_object(Bucket=bucket, Key="control-plaintext", Body=plain)  # no SSE: the control
    for data in (small, big):
        stored = store.put(sha(data), len(data), chunks(data))
        head = s3.head_object(Bucket=bucket, Key=f"{PREFIX}sha256/{sha(data)}")
        assert head["ServerSideEncryption"] == "AES256"
        assert read_all(store.open(stored.uri)) == data

    contents = [p.read_bytes() for p in volume_files(object_store, bucket)]
    assert contents, f"no volume files for {bucket} under {object_store.data_dir}"
    assert any(plain[5000:5064] in c for c in contents)  # the scan does find plaintext...
    for data in (small, big):
        for offset in (5000, len(data) - 100):
            assert not any(data[offset : offset + 64] in c for c in contents)  # ...but not ours


def test_sse_kms_without_a_kms_is_reported(object_store: ObjectStore, bucket: str, s3: Any, tmp_path: Path) -> None:
    """SeaweedFS without a KMS answers aws:kms with HTTP 500 InternalError (on PutObject and
    UploadPart; CreateMultipartUpload accepts it): check() pins it on the encryption, put fails
    typed and retriable, and nothing is left behind."""
    store = S3Store(settings_for(object_store, bucket, tmp_path, server_side_encryption="aws:kms"))
    problems = store.check()
    assert len(problems) == 1
    assert "server_side_encryption=aws:kms" in problems[0]
    assert "without server_side_encryption=aws:kms works" in problems[0]
    assert "upload part" in problems[0]

    for data in (blob(1000, seed=16), blob(6 * MiB, seed=17)):
        with pytest.raises(OffloadError, match="server_side_encryption=aws:kms") as exc:
            store.put(sha(data), len(data), chunks(data))
        assert "HTTP 500" in str(exc.value)
    assert keys(s3, bucket) == []
    assert pending_uploads(s3, bucket) == []


# --------------------------------------------------------------------------- memory


def test_multipart_put_memory_is_about_one_part(object_store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    store = S3Store(settings_for(object_store, bucket, tmp_path))
    assert store.check() == []  # client made and service model loaded before tracing
    size = 40 * MiB
    source = blob(size, seed=18)  # like a spooled mail: allocated before tracing starts
    digest = sha(source)
    tracemalloc.start()
    try:
        stored = store.put(digest, size, chunks(source))  # each 1 MiB piece a fresh (traced) copy
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not stored.reused
    assert peak < 3 * PART, f"peak {peak / MiB:.1f} MiB"
    print(f"40 MiB multipart put: traced peak {peak / MiB:.2f} MiB with {PART // MiB} MiB parts")

    tracemalloc.start()
    try:
        h = hashlib.sha256()
        for chunk in store.open(stored.uri):
            h.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert h.hexdigest() == digest
    assert peak < 3 * MiB, f"read peak {peak / MiB:.1f} MiB"
