"""Content-addressed object stores for attachment offload (claim checks), with bounded memory.

What: an attachment too large to travel inside a Kafka record is written to an object store
and the record carries a claim check instead: a URI, the size and the SHA-256 of the bytes
(docs/decisions/0004-large-mail.md). Two stores implement :class:`ContentStore`:

* :class:`FilesystemStore` - ``<directory>/sha256/<hex>``, URI ``file:///abs/dir/sha256/<hex>``
  (a shared volume: NFS, a PersistentVolume, a mounted bucket);
* :class:`S3Store` - ``s3://<bucket>/<prefix>sha256/<hex>`` on AWS S3 or any S3-compatible server
  (boto3 is the optional ``s3`` extra: ``pip install 'pop3-kafka[s3]'``).

Why content-addressed: the key is the lowercase hex SHA-256 of the bytes, so the key is known
before anything is written, the same attachment sent in many mails is stored once, and a
reader can verify what it got against the key alone (:meth:`ContentStore.open` does so).

Re-use after aborts: the object is written before the Kafka transaction that carries its
claim check commits. When the transaction aborts (broker failover, fencing, a crash), nothing is
deleted from POP3 and the cycle runs again; ``put`` then finds the key with the declared size
and returns ``Stored(uri, reused=True)`` without writing. Because the key is the hash, an
existing object of the right size holds the right bytes (a server-stored full-object SHA-256 is
also compared when the server returns one).

Writes are all-or-nothing: the bytes are hashed and counted as they arrive, and when the total
size or the SHA-256 differs from what the caller declared, ``put`` raises
:class:`OffloadIntegrityError` and leaves no object behind - no temp file (filesystem), no
unfinished multipart upload (S3; it is aborted on any failure, including an exception raised by
the caller's iterator of pieces). Memory is bounded by one part buffer (``part_bytes``, 8 MiB by
default) for S3 and by one piece for the filesystem; pieces are never joined.

Orphans and lifecycle. The connector never deletes objects (it cannot know who still needs
one). Objects nobody references appear when a mail is offloaded and then never committed
(it vanished from the server, was dead-lettered on the retry, the configuration changed), and
every object becomes unreferenced once the records carrying its claim check leave the topic
(``retention.ms``). Expire them outside the connector:

* S3: a lifecycle rule on the prefix, and one that removes unfinished multipart uploads (a
  process killed mid-upload cannot abort its own)::

      aws s3api put-bucket-lifecycle-configuration --bucket B --lifecycle-configuration '{"Rules": [
        {"ID": "pop3-kafka-mpu", "Status": "Enabled", "Filter": {"Prefix": "pop3-kafka/"},
         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
        {"ID": "pop3-kafka-expire", "Status": "Enabled", "Filter": {"Prefix": "pop3-kafka/sha256/"},
         "Expiration": {"Days": 30}}]}'

* filesystem: ``find DIR/sha256 -type f -name '.tmp-*' -mmin +60 -delete`` (temp files of a
  killed process) and ``find DIR/sha256 -type f -mtime +30 -delete``.

An age-based expiry (the second rule) is only safe when downstream consumers copy the objects
they keep as soon as they read the record: a re-use does not rewrite the object, so its age is
that of its *first* write, and a popular attachment may expire shortly after a new record
referenced it. Choose N well above ``retention.ms`` plus the worst consumer lag, and let
consumers copy; without that, use a sweeper that deletes only keys no record in the topic (within
retention) references, or no expiry at all.

Encryption at rest. Attachments of S/MIME mail are offloaded *after decryption*: the store holds
plaintext of mail that was encrypted in transit. Filesystem objects are created mode 0600 in a
0700 ``sha256/`` directory; put the directory on an encrypted volume (dm-crypt, an encrypted EBS
StorageClass). For S3 prefer the bucket's default encryption (readers and writers then need no
settings); ``server_side_encryption: AES256`` (SSE-S3) or ``aws:kms`` (SSE-KMS, with
``sse_kms_key_id`` for a customer-managed key: key access is audited and revocable, and the
writer needs ``kms:GenerateDataKey``, every reader ``kms:Decrypt``) asks for it per request.
A server that cannot do the requested kind refuses the write; ``pop3-kafka doctor`` (``check``)
finds that before a run. The S3 identity needs ``s3:PutObject``, ``s3:GetObject``,
``s3:AbortMultipartUpload`` and ``s3:ListBucket`` on the bucket (without ListBucket, a HEAD of a
missing key answers 403 instead of 404 and every put fails).

Errors: :class:`OffloadError` (a :class:`~connector.errors.DeliveryError`: the cycle aborts and
is retried, nothing is deleted) and :class:`OffloadConfigError` (a
:class:`~connector.errors.ConfigError`: stop and fix the settings). Messages name the
bucket or directory, the step (head, put, create upload, upload part, complete, read) and the
fix, and never contain credentials.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import functools
import hashlib
import logging
import os
import re
import stat
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

# The settings are configuration (connector/config/offload.py): config must not import delivery.
from connector.config.offload import (
    MiB,
    OffloadConfigError,
    OffloadSettings,
)
from connector.errors import DeliveryError

log = logging.getLogger("pop3kafka.offload")

S3_MAX_PARTS = 10_000
#: chunk size of streamed reads (open/read_uri): a bounded, I/O-efficient unit.
READ_CHUNK_BYTES = 1 * MiB
#: the content address of zero bytes (names the probe of ``check``; never written as an object).
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_TAIL = re.compile(r"(?:^|/)sha256/([0-9a-f]{64})$")
# S3 error codes meaning "these credentials are not accepted" (as opposed to "not allowed").
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "AuthorizationHeaderMalformed",
    }
)
# Codes with which servers refuse an encryption request they cannot honour.
_SSE_CODES = frozenset(
    {"InvalidArgument", "NotImplemented", "InvalidEncryptionAlgorithmError", "KMS.NotFoundException"}
)


# --------------------------------------------------------------------------- errors


class OffloadError(DeliveryError):
    """Writing or reading an offloaded object failed (retry the cycle; nothing is deleted).

    ``operation`` is the store step that failed (head, put, create upload, upload part,
    complete, read, write...), ``location`` the bucket or directory.
    """

    def __init__(self, message: str, *, operation: str | None = None, location: str | None = None) -> None:
        super().__init__(message)
        self.operation = operation
        self.location = location


class OffloadIntegrityError(OffloadError):
    """The bytes did not match: a put whose pieces differ in size or SHA-256 from what was
    declared (nothing was stored), or a read whose content does not hash to its key."""


class OffloadNotFoundError(OffloadError):
    """A read found no object under the URI (expired by a lifecycle rule, or never written)."""


class OffloadAccessError(OffloadError):
    """The store refused the credentials or the action (HTTP 403). Retriable, so a rotated
    secret or a fixed policy heals without a restart; the message names what to grant."""


# --------------------------------------------------------------------------- settings and protocol


@dataclass(frozen=True)
class Stored:
    """Where ``put`` left the bytes; ``reused``: the object was already there (same key, same
    size) and was not written again."""

    uri: str
    reused: bool


class ContentStore(Protocol):
    def uri_for(self, sha256_hex: str) -> str:
        """The URI the object with this SHA-256 has (or would have) in this store."""
        ...

    def put(self, sha256_hex: str, size: int, pieces: Iterable[bytes]) -> Stored:
        """Store ``pieces`` (``size`` bytes hashing to ``sha256_hex``) unless already stored."""
        ...

    def open(self, uri: str) -> Iterator[bytes]:
        """Stream an object in chunks; the last ``next`` raises if the bytes do not match the key."""
        ...

    def check(self) -> list[str]:
        """Problems for ``pop3-kafka doctor`` (empty when the store is usable)."""
        ...


# --------------------------------------------------------------------------- shared helpers


def _normalize_sha(sha256_hex: str) -> str:
    sha = sha256_hex.lower()
    if not _HEX64.fullmatch(sha):
        raise ValueError(f"not a SHA-256 hex digest: {sha256_hex[:80]!r}")
    return sha


def _check_size(size: int) -> None:
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")


def _mismatch(where: str, size: int, total: int, *, sha: str | None = None, got: str | None = None) -> str:
    if sha is None:
        return (
            f"offload to {where}: the attachment produced more than the declared {size} bytes; "
            "nothing was stored (a decoder bug: the size is computed before the offload)"
        )
    if total != size:
        return f"offload to {where}: got {total} bytes, {size} declared; nothing was stored"
    return (
        f"offload to {where}: the bytes hash to sha256 {got}, {sha} declared; nothing was stored "
        "(a decoder bug or corrupted spool)"
    )


class _VerifiedStream(Iterator[bytes]):
    """Chunks of one stored object, hashed as they pass; at the end, a content that does not
    hash to its key raises :class:`OffloadIntegrityError` instead of ending quietly.

    Chunks already handed out are unverified until the iteration ends: a consumer writes them
    to a temporary place and uses them only after ``StopIteration``.
    """

    def __init__(
        self,
        read: Callable[[int], bytes],
        release: Callable[[], None],
        sha256_hex: str,
        where: str,
        translate: Callable[[Exception], Exception | None],
    ) -> None:
        self._read = read
        self._release = release
        self._sha = sha256_hex
        self._where = where
        self._translate = translate
        self._hasher = hashlib.sha256()
        self._size = 0
        self._closed = False

    def __iter__(self) -> _VerifiedStream:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise StopIteration
        try:
            chunk = self._read(READ_CHUNK_BYTES)
        except Exception as exc:
            self.close()
            mapped = self._translate(exc)
            if mapped is None:
                raise
            raise mapped from exc
        if chunk:
            self._hasher.update(chunk)
            self._size += len(chunk)
            return chunk
        self.close()
        got = self._hasher.hexdigest()
        if got != self._sha:
            raise OffloadIntegrityError(
                f"read {self._where}: the {self._size} bytes hash to sha256 {got}, not to the key; "
                "the object is corrupted or was replaced: do not use it",
                operation="read",
                location=self._where,
            )
        raise StopIteration

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self) -> _VerifiedStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # An abandoned iterator must not keep a file descriptor or an HTTP connection.
        self.close()


# --------------------------------------------------------------------------- filesystem


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (the data fsync does not cover it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_uri_path(uri: str) -> tuple[Path, str]:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise ValueError(f"not a local file:// URI: {uri[:200]!r}")
    path = Path(urllib.parse.unquote(parts.path))
    match = _KEY_TAIL.search(path.as_posix())
    if not path.is_absolute() or match is None:
        raise ValueError(f"not an offload URI (file:///<dir>/sha256/<64 hex>): {uri[:200]!r}")
    return path, match.group(1)


def _open_file(path: Path, sha: str) -> Iterator[bytes]:
    where = path.as_uri()
    try:
        f = path.open("rb")
    except FileNotFoundError as exc:
        raise OffloadNotFoundError(
            f"read {where}: no such object (never written, or removed by an expiry); "
            "the claim check cannot be redeemed",
            operation="read",
            location=str(path.parent.parent),
        ) from exc
    except OSError as exc:
        raise OffloadError(
            f"read {where}: {exc.strerror or exc} (check that the volume is mounted and readable)",
            operation="read",
            location=str(path.parent.parent),
        ) from exc

    def translate(exc: Exception) -> Exception | None:
        if isinstance(exc, OSError):
            return OffloadError(
                f"read {where}: {exc.strerror or exc}", operation="read", location=str(path.parent.parent)
            )
        return None

    return _VerifiedStream(f.read, f.close, sha, where, translate)


class FilesystemStore:
    """Objects as files ``<directory>/sha256/<hex>`` on a local or shared volume.

    Offloaded attachments of decrypted S/MIME mail are plaintext at rest here: files are created
    mode 0600 (``sha256/`` 0700), owned by the connector's user; use an encrypted volume.

    A put writes a ``.tmp-*`` file in ``sha256/`` (the same file system, so the rename is
    atomic), fsyncs it, renames it into place with ``os.replace`` and fsyncs the directory: a
    reader sees either no file or the whole file, and two concurrent puts of the same key just
    replace identical bytes. A process killed mid-write leaves a ``.tmp-*`` file (see the
    module docstring for the cleanup).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        # Absolute at construction: the URIs must not depend on a later chdir.
        self.directory = Path(os.path.abspath(directory))
        self.objects = self.directory / "sha256"

    def uri_for(self, sha256_hex: str) -> str:
        return (self.objects / _normalize_sha(sha256_hex)).as_uri()

    def _config_error(self, problem: str) -> OffloadConfigError:
        return OffloadConfigError(
            f"offload directory {self.directory}: {problem}; create it and make it writable by the "
            f"connector's user (mkdir -p {self.directory} && chmod 700 {self.directory}), "
            "or fix offload.directory",
        )

    def _require_directory(self) -> None:
        try:
            st = self.directory.stat()
        except FileNotFoundError:
            raise self._config_error("does not exist") from None
        except OSError as exc:
            raise self._config_error(f"cannot be accessed ({exc.strerror or exc})") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise self._config_error("is not a directory")

    def _ensure_objects_dir(self) -> None:
        try:
            os.mkdir(self.objects, 0o700)
        except FileExistsError:
            return
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise self._config_error(f"is not writable ({exc.strerror})") from exc
            raise OffloadError(
                f"offload directory {self.directory}: cannot create sha256/ ({exc.strerror or exc})",
                operation="mkdir",
                location=str(self.directory),
            ) from exc
        # The new directory entry must survive a crash like the objects inside it.
        _fsync_dir(self.directory)

    def put(self, sha256_hex: str, size: int, pieces: Iterable[bytes]) -> Stored:
        sha = _normalize_sha(sha256_hex)
        _check_size(size)
        final = self.objects / sha
        uri = final.as_uri()
        self._require_directory()
        try:
            existing = final.stat().st_size
        except FileNotFoundError:
            existing = None
        except OSError as exc:
            raise self._os_error("stat", final, exc) from exc
        if existing == size:
            log.debug("offload: %s already stored (%d bytes), re-used", uri, size)
            return Stored(uri, reused=True)
        if existing is not None:
            # Same address, other size: a truncated copy from outside the connector. Replace it.
            log.warning("offload: %s has %d bytes, %d expected; writing it again", uri, existing, size)
        self._ensure_objects_dir()
        try:
            # mkstemp creates the file O_EXCL with mode 0600: never readable by others, not even briefly.
            fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=self.objects)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise self._config_error(f"is not writable ({exc.strerror})") from exc
            raise self._os_error("create temp file in", self.objects, exc) from exc
        tmp = Path(tmp_name)
        t0 = time.monotonic()
        try:
            hasher = hashlib.sha256()
            total = 0
            with os.fdopen(fd, "wb") as f:
                for piece in pieces:
                    total += len(piece)
                    if total > size:
                        raise OffloadIntegrityError(
                            _mismatch(uri, size, total), operation="write", location=str(self.directory)
                        )
                    hasher.update(piece)
                    f.write(piece)
                if total != size or hasher.hexdigest() != sha:
                    raise OffloadIntegrityError(
                        _mismatch(uri, size, total, sha=sha, got=hasher.hexdigest()),
                        operation="write",
                        location=str(self.directory),
                    )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.objects)
        except BaseException as exc:
            # Whatever failed (our check, the disk, the caller's iterator), leave no partial file.
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            except OSError as cleanup:
                log.warning("offload: could not remove %s: %s", tmp, cleanup.strerror or cleanup)
            if isinstance(exc, OSError):
                raise self._os_error("write", final, exc) from exc
            raise
        log.debug("offload: wrote %s (%d bytes) in %.3fs", uri, size, time.monotonic() - t0)
        return Stored(uri, reused=False)

    def _os_error(self, operation: str, path: Path, exc: OSError) -> OffloadError:
        hint = " (the volume is full: free space or grow it)" if exc.errno == errno.ENOSPC else ""
        return OffloadError(
            f"offload {operation} {path}: {exc.strerror or exc}{hint}",
            operation=operation,
            location=str(self.directory),
        )

    def open(self, uri: str) -> Iterator[bytes]:
        path, sha = _file_uri_path(uri)
        if os.path.normpath(path.parent) != os.path.normpath(self.objects):
            raise ValueError(f"{uri[:200]!r} is not in this store ({self.objects}); use read_uri for other places")
        return _open_file(self.objects / sha, sha)

    def check(self) -> list[str]:
        try:
            self._require_directory()
            self._ensure_objects_dir()
            # Writability is tried, not inferred from mode bits (root, ACLs, read-only mounts).
            fd, name = tempfile.mkstemp(prefix=".tmp-doctor-", dir=self.objects)
            os.close(fd)
            os.unlink(name)
        except (OffloadConfigError, OffloadError) as exc:
            return [str(exc)]
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return [str(self._config_error(f"is not writable ({exc.strerror})"))]
            return [str(self._os_error("create a file in", self.objects, exc))]
        return []


# --------------------------------------------------------------------------- S3


def _import_boto3() -> tuple[Any, Any, Any]:
    """boto3 is optional (the ``s3`` extra): imported only when an S3 store is used."""
    try:
        import boto3  # noqa: PLC0415 - optional dependency, loaded on demand
        import botocore.config  # noqa: PLC0415
        import botocore.exceptions  # noqa: PLC0415
    except ImportError as exc:
        raise OffloadConfigError(
            "offload kind 's3' needs boto3, which is not installed: pip install 'pop3-kafka[s3]'"
        ) from exc
    return boto3, botocore.config.Config, botocore.exceptions


def _parse_s3_uri(uri: str) -> tuple[str, str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri[:200]!r}")
    bucket, _, key = uri[5:].partition("/")
    match = _KEY_TAIL.search(key)
    if not bucket or match is None:
        raise ValueError(f"not an offload URI (s3://<bucket>/<prefix>sha256/<64 hex>): {uri[:200]!r}")
    return bucket, key, match.group(1)


def _read_secret_file(path: str, what: str) -> str:
    # The error names the file, never its content.
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise OffloadConfigError(
            f"offload {what} {path}: cannot be read ({exc.strerror or exc}); mount the secret there or fix the path"
        ) from exc
    except UnicodeDecodeError as exc:
        raise OffloadConfigError(f"offload {what} {path}: not UTF-8 text") from exc
    if not value:
        raise OffloadConfigError(f"offload {what} {path}: the file is empty")
    return value


class S3Store:
    """Objects ``<prefix>sha256/<hex>`` in an S3 bucket (AWS or an S3-compatible server).

    Up to ``part_bytes`` an object is buffered (one buffer of its size), verified and sent
    with one PutObject carrying its SHA-256 checksum (the server refuses corrupted bytes and
    keeps the checksum, which a later re-use compares). Larger objects go as a multipart upload
    through one reused buffer of ``part_bytes``, each part with its own SHA-256 checksum; the
    whole object's size and SHA-256 are checked before CompleteMultipartUpload, so a mismatch
    aborts the upload and no object ever appears. Any failure aborts the upload.

    The client is made on first use; credential files are read then, and again after the
    server refused them (a rotated Kubernetes secret is picked up without a restart).
    """

    def __init__(self, settings: OffloadSettings) -> None:
        if settings.kind != "s3" or not settings.bucket:
            raise OffloadConfigError("S3Store needs offload settings of kind 's3' with a bucket")
        self.settings = settings
        self.bucket: str = settings.bucket
        self.prefix = settings.prefix
        self._boto3, self._config_cls, self._exceptions = _import_boto3()
        self._lock = threading.Lock()
        self._client: Any = None
        # Set once the bucket was seen to exist (see _require_bucket).
        self._bucket_seen = False
        # Strings to scrub from any message built from a server's or botocore's text.
        self._secrets: tuple[str, ...] = ()

    # ---- client

    def _s3(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        s = self.settings
        kwargs: dict[str, Any] = {}
        if s.access_key_id_file and s.secret_access_key_file:
            key_id = _read_secret_file(s.access_key_id_file, "access_key_id_file")
            secret = _read_secret_file(s.secret_access_key_file, "secret_access_key_file")
            self._secrets = (secret, key_id)
            kwargs = {"aws_access_key_id": key_id, "aws_secret_access_key": secret}
        config = self._config_cls(
            connect_timeout=s.timeout_seconds,
            read_timeout=s.timeout_seconds,
            # Bounded: a cycle waits at most a few attempts, then aborts and retries later as a whole.
            retries={"max_attempts": 3, "mode": "standard"},
            # S3-compatible servers rarely serve virtual-host buckets (DNS per bucket); AWS does both.
            s3={"addressing_style": "path" if s.endpoint_url else "auto"},
        )
        # A session of our own: boto3's default session is shared and not thread-safe.
        session = self._boto3.session.Session(region_name=s.region, **kwargs)
        return session.client(
            "s3",
            endpoint_url=s.endpoint_url,
            config=config,
            verify=s.ca_bundle if s.ca_bundle else None,
        )

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    # ---- error translation

    def _where(self, key: str | None) -> str:
        endpoint = f" at {self.settings.endpoint_url}" if self.settings.endpoint_url else ""
        return f"s3://{self.bucket}/{key or ''}" + endpoint

    def _fail(self, exc: Exception, operation: str, key: str | None) -> OffloadError | OffloadConfigError:
        """One of our errors for a botocore one; the message names bucket, step and fix."""
        where = self._where(key)
        exceptions = self._exceptions
        if isinstance(exc, exceptions.ClientError):
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code", "") or "")
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            server_msg = self._scrub(str(err.get("Message", "") or ""))[:200]
            # A HEAD error has no body: botocore then uses the status as the code and its reason as message.
            bare = code in ("", str(status))
            answer = (
                f"HTTP {status}" + ("" if bare else f" {code}") + ("" if bare or not server_msg else f": {server_msg}")
            )
            if code == "NoSuchBucket" or (status == 404 and operation in ("check bucket", "create upload", "put")):
                return OffloadConfigError(
                    f"offload {operation} {where}: the bucket {self.bucket!r} does not exist ({answer}); "
                    "create it or fix offload.bucket"
                )
            if code in _CREDENTIAL_CODES:
                # Drop the client: the next attempt re-reads the credential files (rotation).
                with self._lock:
                    self._client = None
                source = (
                    "access_key_id_file/secret_access_key_file"
                    if self.settings.access_key_id_file
                    else "boto3's default credential chain (AWS_* environment, web identity, instance profile)"
                )
                return OffloadAccessError(
                    f"offload {operation} {where}: the server refused the credentials ({answer}); check {source}",
                    operation=operation,
                    location=self.bucket,
                )
            if status == 403:
                return OffloadAccessError(
                    f"offload {operation} {where}: access denied ({answer}); grant the identity s3:PutObject, "
                    f"s3:GetObject, s3:AbortMultipartUpload and s3:ListBucket on {self.bucket!r} "
                    "(without ListBucket a missing key answers 403)" + self._sse_hint(),
                    operation=operation,
                    location=self.bucket,
                )
            sse = self.settings.server_side_encryption
            if sse and (code in _SSE_CODES or code.startswith("KMS") or status >= 500) and operation != "read":
                return OffloadError(
                    f"offload {operation} {where}: {answer} with server_side_encryption={sse}; if it persists the "
                    f"server may not support {sse} (SeaweedFS without a KMS answers 500 to aws:kms): run "
                    "pop3-kafka doctor, or change offload.server_side_encryption",
                    operation=operation,
                    location=self.bucket,
                )
            return OffloadError(f"offload {operation} {where}: {answer}", operation=operation, location=self.bucket)
        if isinstance(exc, exceptions.NoCredentialsError | exceptions.PartialCredentialsError):
            return OffloadAccessError(
                f"offload {operation} {where}: no S3 credentials found ({type(exc).__name__}); set "
                "access_key_id_file/secret_access_key_file or provide them to boto3's default chain",
                operation=operation,
                location=self.bucket,
            )
        if isinstance(exc, exceptions.EndpointConnectionError | exceptions.ConnectTimeoutError):
            return OffloadError(
                f"offload {operation} {where}: cannot connect ({type(exc).__name__}); check offload.endpoint_url, "
                "the network and the server",
                operation=operation,
                location=self.bucket,
            )
        if isinstance(exc, exceptions.ReadTimeoutError):
            return OffloadError(
                f"offload {operation} {where}: no answer within {self.settings.timeout_seconds:g}s "
                "(offload.timeout_seconds)",
                operation=operation,
                location=self.bucket,
            )
        if isinstance(exc, exceptions.SSLError):
            return OffloadError(
                f"offload {operation} {where}: TLS failed ({type(exc).__name__}); check offload.ca_bundle",
                operation=operation,
                location=self.bucket,
            )
        return OffloadError(
            f"offload {operation} {where}: {type(exc).__name__}: {self._scrub(str(exc))[:300]}",
            operation=operation,
            location=self.bucket,
        )

    def _sse_hint(self) -> str:
        if self.settings.server_side_encryption == "aws:kms":
            return "; with aws:kms also kms:GenerateDataKey (write) and kms:Decrypt (read) on the key"
        return ""

    def _catchable(self) -> tuple[type[Exception], ...]:
        return (self._exceptions.BotoCoreError, self._exceptions.ClientError)

    def _call(self, operation: str, key: str | None, method: str, **params: Any) -> Any:
        client = self._s3()
        try:
            return getattr(client, method)(**params)
        except self._catchable() as exc:
            raise self._fail(exc, operation, key) from exc

    def _sse_params(self, sse: bool = True) -> dict[str, str]:
        s = self.settings
        params: dict[str, str] = {}
        if sse and s.server_side_encryption:
            params["ServerSideEncryption"] = s.server_side_encryption
            if s.sse_kms_key_id:
                params["SSEKMSKeyId"] = s.sse_kms_key_id
        return params

    # ---- the store

    def key_for(self, sha256_hex: str) -> str:
        return f"{self.prefix}sha256/{_normalize_sha(sha256_hex)}"

    def uri_for(self, sha256_hex: str) -> str:
        return f"s3://{self.bucket}/{self.key_for(sha256_hex)}"

    def _head(self, key: str) -> tuple[int, str | None] | None:
        """(size, full-object SHA-256 in base64 if the server keeps one) or None when missing."""
        client = self._s3()
        try:
            head = client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except self._exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code")
            # A HEAD answer has no body: a missing key and a missing bucket are both a bare 404.
            if status == 404 and code != "NoSuchBucket":
                return None
            if status == 403 and code not in _CREDENTIAL_CODES:
                raise self._explain_forbidden_head(key) from exc
            raise self._fail(exc, "head", key) from exc
        except self._exceptions.BotoCoreError as exc:
            raise self._fail(exc, "head", key) from exc
        checksum = head.get("ChecksumSHA256")
        # "<b64>-<n>" is a composite checksum of a multipart upload's parts, not of the object.
        full = checksum if isinstance(checksum, str) and "-" not in checksum else None
        return int(head["ContentLength"]), full

    def _explain_forbidden_head(self, key: str) -> OffloadError | OffloadConfigError:
        """A bare 403 to a HEAD means refused credentials, a missing ListBucket (a missing key then
        answers 403) or a missing GetObject; a listing answers with an error code that says which."""
        try:
            self._s3().list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1)
        except self._catchable() as exc:
            return self._fail(exc, "head", key)
        return OffloadAccessError(
            f"offload head {self._where(key)}: HTTP 403 although listing the bucket works; grant the identity "
            f"s3:GetObject (and s3:PutObject, s3:AbortMultipartUpload) on {self.bucket!r}" + self._sse_hint(),
            operation="head",
            location=self.bucket,
        )

    def _require_bucket(self) -> None:
        """Raise unless the bucket exists. Some servers (SeaweedFS with an admin identity) create a
        missing bucket on the first PutObject: a mistyped bucket name would then fill a new bucket
        without the lifecycle rules and encryption of the real one. Checked once per store."""
        if self._bucket_seen:
            return
        self._call(
            "check bucket", None, "list_objects_v2", Bucket=self.bucket, Prefix=f"{self.prefix}sha256/", MaxKeys=1
        )
        self._bucket_seen = True

    def put(self, sha256_hex: str, size: int, pieces: Iterable[bytes]) -> Stored:
        sha = _normalize_sha(sha256_hex)
        _check_size(size)
        key = self.key_for(sha)
        uri = f"s3://{self.bucket}/{key}"
        digest_b64 = base64.b64encode(bytes.fromhex(sha)).decode("ascii")
        self._require_bucket()
        existing = self._head(key)
        if existing is not None:
            existing_size, existing_sha = existing
            if existing_size == size and existing_sha in (None, digest_b64):
                log.debug("offload: %s already stored (%d bytes), re-used", uri, size)
                return Stored(uri, reused=True)
            # Same address, other content (written from outside): replace it with verified bytes.
            log.warning("offload: %s exists with other size or checksum; writing it again", uri)
        t0 = time.monotonic()
        if size < self.settings.part_bytes:
            self._put_small(key, uri, sha, digest_b64=digest_b64, size=size, pieces=pieces)
        else:
            self._put_multipart(key, uri, sha, size, pieces)
        log.debug("offload: wrote %s (%d bytes) in %.3fs", uri, size, time.monotonic() - t0)
        return Stored(uri, reused=False)

    def _put_small(self, key: str, uri: str, sha: str, *, digest_b64: str, size: int, pieces: Iterable[bytes]) -> None:
        # One buffer of exactly `size` (< part_bytes), filled in place: no joins, no growth copies.
        buf = bytearray(size)
        view = memoryview(buf)
        hasher = hashlib.sha256()
        total = 0
        try:
            for piece in pieces:
                end = total + len(piece)
                if end > size:
                    raise OffloadIntegrityError(_mismatch(uri, size, end), operation="put", location=self.bucket)
                hasher.update(piece)
                view[total:end] = piece
                total = end
        finally:
            view.release()
        if total != size or hasher.hexdigest() != sha:
            raise OffloadIntegrityError(
                _mismatch(uri, size, total, sha=sha, got=hasher.hexdigest()), operation="put", location=self.bucket
            )
        # ChecksumSHA256 is the whole object's: the server verifies what it received and keeps it.
        self._call(
            "put",
            key,
            "put_object",
            Bucket=self.bucket,
            Key=key,
            Body=buf,
            ContentLength=size,
            ContentType="application/octet-stream",
            ChecksumSHA256=digest_b64,
            **self._sse_params(),
        )

    def _put_multipart(self, key: str, uri: str, sha: str, size: int, pieces: Iterable[bytes]) -> None:
        # Grow the part only for objects S3's 10,000-part limit would refuse (> 78 GiB at 8 MiB).
        part_size = max(self.settings.part_bytes, -(-size // S3_MAX_PARTS))
        created = self._call(
            "create upload",
            key,
            "create_multipart_upload",
            Bucket=self.bucket,
            Key=key,
            ContentType="application/octet-stream",
            ChecksumAlgorithm="SHA256",
            **self._sse_params(),
        )
        upload_id: str = created["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            # One buffer for the whole upload, reused for every part once the part is sent.
            buf = bytearray(part_size)
            view = memoryview(buf)
            fill = 0
            hasher = hashlib.sha256()
            total = 0
            for piece in pieces:
                total += len(piece)
                if total > size:
                    raise OffloadIntegrityError(
                        _mismatch(uri, size, total), operation="upload part", location=self.bucket
                    )
                hasher.update(piece)
                src = memoryview(piece)
                while src:
                    n = min(part_size - fill, len(src))
                    view[fill : fill + n] = src[:n]
                    fill += n
                    src = src[n:]
                    if fill == part_size:
                        parts.append(self._upload_part(key, upload_id, len(parts) + 1, buf))
                        fill = 0
            if total != size or hasher.hexdigest() != sha:
                raise OffloadIntegrityError(
                    _mismatch(uri, size, total, sha=sha, got=hasher.hexdigest()),
                    operation="complete",
                    location=self.bucket,
                )
            if fill or not parts:
                # Shrink in place to the last part's length (a bytearray cannot resize while viewed).
                view.release()
                del buf[fill:]
                parts.append(self._upload_part(key, upload_id, len(parts) + 1, buf))
            self._call(
                "complete",
                key,
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # Whatever failed (our check, the server, the caller's iterator): no unfinished upload stays.
            self._abort(key, upload_id)
            raise

    def _upload_part(self, key: str, upload_id: str, number: int, body: bytearray) -> dict[str, Any]:
        checksum = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
        answer = self._call(
            f"upload part {number}",
            key,
            "upload_part",
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
            ContentLength=len(body),
            ChecksumSHA256=checksum,
        )
        return {"ETag": answer["ETag"], "PartNumber": number, "ChecksumSHA256": answer.get("ChecksumSHA256", checksum)}

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._call("abort upload", key, "abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (OffloadError, OffloadConfigError) as exc:
            # Not fatal for the cycle (the original error is raised); an AbortIncompleteMultipartUpload
            # lifecycle rule removes what is left.
            log.warning("offload: could not abort the multipart upload %s: %s", upload_id, exc)

    def open(self, uri: str) -> Iterator[bytes]:
        bucket, key, sha = _parse_s3_uri(uri)
        if bucket != self.bucket:
            raise ValueError(f"{uri[:200]!r} is not in this store (bucket {self.bucket!r}); use read_uri for others")
        client = self._s3()
        where = f"s3://{bucket}/{key}"
        try:
            answer = client.get_object(Bucket=bucket, Key=key)
        except self._exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                raise OffloadNotFoundError(
                    f"offload read {where}: no such object (never written, or expired by a lifecycle rule); "
                    "the claim check cannot be redeemed",
                    operation="read",
                    location=bucket,
                ) from exc
            raise self._fail(exc, "read", key) from exc
        except self._exceptions.BotoCoreError as exc:
            raise self._fail(exc, "read", key) from exc
        body = answer["Body"]

        def translate(exc: Exception) -> Exception | None:
            if isinstance(exc, self._catchable()):
                return self._fail(exc, "read", key)
            if isinstance(exc, OSError):
                return OffloadError(f"offload read {where}: {exc}", operation="read", location=bucket)
            return None

        return _VerifiedStream(body.read, body.close, sha, where, translate)

    def check(self) -> list[str]:
        """List the bucket (exists? credentials? ListBucket?), then start a multipart upload with the
        configured encryption and checksum, send one tiny part and abort it: PutObject, the
        encryption and AbortMultipartUpload are tried without leaving an object behind."""
        self._bucket_seen = False  # doctor asks the server, not a cached answer
        try:
            self._require_bucket()
        except (OffloadError, OffloadConfigError) as exc:
            return [str(exc)]
        problem = self._probe_write(sse=True)
        if problem is None:
            return []
        if self.settings.server_side_encryption and self._probe_write(sse=False) is None:
            return [
                f"{problem}; the same write without server_side_encryption="
                f"{self.settings.server_side_encryption} works: the server (or the key policy) refuses that "
                "encryption; change offload.server_side_encryption or configure the server's KMS"
            ]
        return [problem]

    def _probe_write(self, *, sse: bool) -> str | None:
        key = f"{self.prefix}sha256/{EMPTY_SHA256}.doctor-probe"
        body = b"pop3-kafka doctor probe"
        try:
            created = self._call(
                "create upload",
                key,
                "create_multipart_upload",
                Bucket=self.bucket,
                Key=key,
                ChecksumAlgorithm="SHA256",
                **self._sse_params(sse),
            )
        except (OffloadError, OffloadConfigError) as exc:
            return str(exc)
        upload_id = created["UploadId"]
        try:
            self._upload_part(key, upload_id, 1, bytearray(body))
        except (OffloadError, OffloadConfigError) as exc:
            self._abort(key, upload_id)
            return str(exc)
        try:
            self._call("abort upload", key, "abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (OffloadError, OffloadConfigError) as exc:
            return f"{exc} (grant s3:AbortMultipartUpload: a failed put must be able to abort its upload)"
        return None


# --------------------------------------------------------------------------- entry points


def open_store(settings: OffloadSettings) -> ContentStore:
    """The store the settings describe (no I/O: problems surface in ``check()`` or on use)."""
    if settings.kind == "filesystem":
        assert settings.directory is not None  # guaranteed by OffloadSettings
        return FilesystemStore(settings.directory)
    return S3Store(settings)


@functools.lru_cache(maxsize=8)
def _reader(settings: OffloadSettings) -> S3Store:
    # A boto3 client costs tens of milliseconds and a connection pool: one per settings, reused.
    return S3Store(settings)


def read_uri(uri: str, settings: OffloadSettings | None = None) -> Iterator[bytes]:
    """Stream the object a claim check names (``file://`` or ``s3://``), verified against its key.

    ``s3://`` URIs use ``settings`` (kind s3) for the endpoint, region, credentials and TLS; the
    bucket comes from the URI. Without settings, boto3's defaults (AWS, default credential chain).
    ``file://`` URIs are read directly and need no settings.
    """
    if uri.startswith("file:"):
        path, sha = _file_uri_path(uri)
        return _open_file(path, sha)
    bucket, _key, _sha = _parse_s3_uri(uri)
    if settings is None:
        settings = OffloadSettings(kind="s3", bucket=bucket)
    elif settings.kind != "s3":
        raise OffloadConfigError(f"reading {uri[:200]} needs offload settings of kind 's3' (got {settings.kind!r})")
    elif settings.bucket != bucket:
        settings = dataclasses.replace(settings, bucket=bucket)
    return _reader(settings).open(uri)


__all__ = [
    "ContentStore",
    "FilesystemStore",
    "OffloadAccessError",
    "OffloadConfigError",
    "OffloadError",
    "OffloadIntegrityError",
    "OffloadNotFoundError",
    "OffloadSettings",
    "S3Store",
    "Stored",
    "open_store",
    "read_uri",
]
