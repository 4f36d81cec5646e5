"""The S3-compatible object store the claim-check (offload) tests use: a real SeaweedFS server.

What is pinned down here, against the server process from deploy/local/objectstore.py:

* the round trip of a content-addressed object (key = SHA-256 hex of the bytes): put with the
  SHA-256 checksum (the server verifies it: a wrong one is BadDigest), head (size, MD5 ETag),
  get byte-identical, a conditional put of an existing key refused with 412, an overwrite with
  the same bytes harmless, list, delete;
* a multipart upload (what boto3 does for large attachments) comes back byte-identical;
* requests are authenticated: a wrong secret, an unknown access key and unsigned requests are
  refused, and the read-only identity cannot write or delete;
* a stopped and restarted server keeps its endpoint, credentials and objects.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import uuid
from pathlib import Path

import pytest
from botocore import UNSIGNED
from botocore.exceptions import ClientError
from objectstore import ObjectStore, pid_alive

# The first test to ask for the session store may have to build weed (minutes, once per machine).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MiB = 1024 * 1024


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def content_key(data: bytes) -> str:
    return "sha256/" + hashlib.sha256(data).hexdigest()


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def new_bucket(store: ObjectStore) -> str:
    name = f"claims-{uuid.uuid4().hex[:12]}"
    store.client().create_bucket(Bucket=name)
    return name


def test_content_addressed_round_trip(object_store: ObjectStore) -> None:
    s3 = object_store.client()
    bucket = new_bucket(object_store)
    assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]

    data = blob(6 * MiB + 12345, seed=1)  # spans two of the filer's 4 MiB chunks, not aligned
    key = content_key(data)
    sha_b64 = base64.b64encode(hashlib.sha256(data).digest()).decode()
    md5_etag = f'"{hashlib.md5(data).hexdigest()}"'

    put = s3.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*", ChecksumSHA256=sha_b64)
    assert put["ETag"] == md5_etag

    head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(data)
    assert head["ETag"] == md5_etag
    assert head["ChecksumSHA256"] == sha_b64

    got = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert got == data
    assert content_key(got) == key

    # A claim-check writer that finds its key taken: the content is already there.
    with pytest.raises(ClientError) as refused:
        s3.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    # An unconditional overwrite with the same bytes is harmless.
    again = s3.put_object(Bucket=bucket, Key=key, Body=data, ChecksumSHA256=sha_b64)
    assert again["ETag"] == md5_etag
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data

    # The server checks the checksum it is given: corrupted bytes are not stored.
    other = blob(1000, seed=2)
    with pytest.raises(ClientError) as bad:
        s3.put_object(Bucket=bucket, Key=content_key(other), Body=other, ChecksumSHA256=sha_b64)
    assert error_code(bad.value) == "BadDigest"

    listed = s3.list_objects_v2(Bucket=bucket, Prefix="sha256/")
    assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [(key, len(data))]

    s3.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(ClientError) as gone:
        s3.head_object(Bucket=bucket, Key=key)
    assert gone.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    s3.delete_bucket(Bucket=bucket)


def test_multipart_upload_round_trip(object_store: ObjectStore) -> None:
    from boto3.s3.transfer import TransferConfig

    s3 = object_store.client()
    bucket = new_bucket(object_store)
    data = blob(13 * MiB + 7, seed=3)
    key = content_key(data)
    parts = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    s3.upload_fileobj(io.BytesIO(data), bucket, key, Config=parts)

    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: MD5 of the part MD5s, "-<parts>"
    out = io.BytesIO()
    s3.download_fileobj(bucket, key, out, Config=parts)
    assert out.getvalue() == data


def test_wrong_credentials_are_refused(object_store: ObjectStore) -> None:
    s3 = object_store.client()
    bucket = new_bucket(object_store)
    data = b"only for the right key\n"
    s3.put_object(Bucket=bucket, Key="k", Body=data)

    wrong_secret = object_store.client(secret_key=object_store.secret_key[::-1])
    with pytest.raises(ClientError) as exc:
        wrong_secret.list_buckets()
    assert error_code(exc.value) == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as exc:
        wrong_secret.get_object(Bucket=bucket, Key="k")
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

    unknown = object_store.client(access_key="POP3KNOSUCHKEY000000", secret_key="x" * 40)
    with pytest.raises(ClientError) as exc:
        unknown.put_object(Bucket=bucket, Key="k2", Body=b"x")
    assert error_code(exc.value) == "InvalidAccessKeyId"

    anonymous = object_store.client(signature_version=UNSIGNED)
    for call in (lambda: anonymous.get_object(Bucket=bucket, Key="k"), anonymous.list_buckets):
        with pytest.raises(ClientError) as exc:
            call()
        assert error_code(exc.value) == "AccessDenied"

    readonly = object_store.client(
        access_key=object_store.readonly_access_key, secret_key=object_store.readonly_secret_key
    )
    assert readonly.get_object(Bucket=bucket, Key="k")["Body"].read() == data
    for call in (
        lambda: readonly.put_object(Bucket=bucket, Key="k3", Body=b"x"),
        lambda: readonly.delete_object(Bucket=bucket, Key="k"),
    ):
        with pytest.raises(ClientError) as exc:
            call()
        assert error_code(exc.value) == "AccessDenied"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["k"]


@pytest.mark.slow
def test_restart_keeps_endpoint_and_objects(object_store: ObjectStore, tmp_path: Path) -> None:
    """A store of its own (the session one stays up): stop, start, same endpoint, same bytes."""
    store = ObjectStore(tmp_path / "restart")
    store.start(timeout=90)
    try:
        endpoint, key_id = store.endpoint_url, store.access_key
        data = os.urandom(MiB)
        store.client().create_bucket(Bucket="restart-test")
        store.client().put_object(Bucket="restart-test", Key=content_key(data), Body=data)
        pid = store.pid
        store.stop()
        assert not pid_alive(pid)
        assert store.pid == 0

        again = ObjectStore.at(tmp_path / "restart")  # as the CLI would: from the saved state
        again.start(timeout=90)
        store = again
        assert (again.endpoint_url, again.access_key) == (endpoint, key_id)
        got = again.client().get_object(Bucket="restart-test", Key=content_key(data))["Body"].read()
        assert got == data
    finally:
        store.stop()
    for name in ("master", "volume", "filer", "s3", "admin"):
        assert not Path(f"/tmp/seaweedfs-{name}-grpc-{getattr(store, name + '_grpc_port')}.sock").exists()
