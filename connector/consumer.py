"""Reading pop3-kafka records downstream: decode, reassemble, verify, fetch.

This module is for consumers of the topics the connector writes. It needs this package (for
the schemas and the framing) and confluent-kafka only if you consume with it; nothing here
talks to a POP3 server or writes to Kafka.

What is on the topics
=====================

* ``topics.mail``: one **mail record** per mail (schemas/mail_record.avsc, version 3; versions
  1 and 2 in schemas/history/). Field guide: docs/record.md.
* ``topics.dead_letter``: one **dead letter** per mail that could not be decoded
  (schemas/dead_letter.avsc, version 2), holding the mail as retrieved.
* ``topics.attachments``: **chunk records** (schemas/attachment_chunk.avsc) carrying content
  too large to travel inside its record: attachments over the mailbox's
  ``attachments.inline_max_bytes``, and the raw mail (``raw_ref``) when it is too large.

Every attachment of a version 3 mail record is in one of four states, see
:func:`placement`:

``inline``
    the bytes are in ``attachments[i].data``;
``chunked``
    ``attachments[i].ref`` is a ContentRef with ``placement == "chunked"``: ``ref.chunks``
    chunk records on ``ref.topic``, with ``content_id == ref.id``;
``offload``
    ``ref.placement == "offload"``: one content-addressed object at ``ref.uri``
    (``file:///<dir>/sha256/<hex>`` or ``s3://<bucket>/<prefix>sha256/<hex>``);
``none``
    metadata only (version 1 and 2 records, or content the mailbox chose not to carry).

Consuming correctly
===================

* **isolation.level=read_committed.** The connector writes a mail record, its chunk records
  and its ledger entry in one Kafka transaction. With the default ``read_uncommitted`` you can
  see records of transactions that were later aborted: mail that was then delivered again, and
  chunks of content that never completed.
* **Key and partition.** A chunk record has the Kafka key of the record that references it, so
  with the same partition count on both topics it lands in the same partition number of the
  attachments topic. One consumer assigned (or subscribed) to both topics sees a mail and its
  chunks close together. The Kafka headers ``pop3kafka.record_id``, ``pop3kafka.content_id``
  and ``pop3kafka.chunk`` (``"<index>/<count>"``) let you route chunks without decoding them.
* **Order.** Within a partition, the committed records of one transaction keep the order the
  connector wrote them in, but do **not** rely on it: the mail record may come before or after
  its chunks, other transactions of other mailboxes interleave with it, and a consumer reading
  two topics gets them in no particular order relative to each other. An at-least-once
  connector (``delivery.mode: at_least_once``), or a consumer that rewinds, sees duplicates.
  :class:`ChunkAssembler` accepts chunks in any order and ignores exact duplicates.
* **Verify.** Every ContentRef, chunk and attachment carries the size and SHA-256 of the whole
  content. :class:`ChunkAssembler` and :func:`fetch_offloaded` check both before handing the
  content over and raise :class:`IntegrityError` otherwise.
* **Offloaded objects** are content-addressed (``sha256/<hex>``): the same bytes are stored once.
  Reading ``s3://`` needs boto3 (the ``s3`` extra) and credentials from the usual AWS sources or
  an ``OffloadSettings`` (connector/delivery/offload.py).

Framing
=======

:func:`decode_value` reads both framings the connector can be configured with:

* Avro single-object encoding: ``C3 01``, the 8-byte little-endian CRC-64-AVRO fingerprint of
  the writer schema, the Avro body. The writer schema is looked up among every schema file this
  package ships (schemas/ and schemas/history/);
* the Confluent Schema Registry wire format: ``00``, the 4-byte big-endian schema id, the Avro
  body; pass ``registry=`` anything with ``get_schema(schema_id)`` returning an object with a
  ``schema_str`` (confluent_kafka.schema_registry.SchemaRegistryClient does).

Either way the record is read with Avro schema resolution into the *current* schema of its type,
so an old record has every newer field, set to its default (``attachments[i].data`` None,
``parts`` empty, ...). Errors are :class:`ConsumerError` subclasses: :class:`NotOurRecord`,
:class:`UnknownSchema`, :class:`MalformedRecord`, :class:`IntegrityError`,
:class:`ContentUnavailable`, :class:`ContentTooLarge`.

Examples
========

Reassembling chunks, here made with the connector's own encoder and fed newest first (this
example runs as is: ``python -m doctest connector/consumer.py``)::

    >>> import hashlib, tempfile
    >>> from connector.records.content import ChunkHeader, chunk_count, encode_chunk
    >>> data = bytes(range(256)) * 4000  # a 1 MB attachment
    >>> n = chunk_count(len(data), 300_000)
    >>> h = ChunkHeader("mb:42", "mb", "mb:42/2", n, len(data), hashlib.sha256(data).hexdigest())
    >>> values = [encode_chunk(h, i, i * 300_000, data[i * 300_000 : (i + 1) * 300_000])[0] for i in range(n)]
    >>> decode_value(values[0]).kind
    'chunk'
    >>> n
    4
    >>> with ChunkAssembler(tempfile.mkdtemp()) as assembler:
    ...     results = [assembler.add(values[i]) for i in (2, 0, 2, 3, 1)]  # any order; 2 twice
    >>> done = results[-1]
    >>> results[:-1], done.content_id, done.size, done.path.read_bytes() == data
    ([None, None, None, None], 'mb:42/2', 1024000, True)

A consumer that saves the attachments of every mail into ``./out`` (``pop3-kafka tail
--attachments DIR`` does the same from the command line)::

    import tempfile
    from confluent_kafka import Consumer
    from connector.consumer import ChunkAssembler, decode_value, write_attachments

    consumer = Consumer({
        "bootstrap.servers": "localhost:9092",
        "group.id": "attachment-saver",
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
    })
    consumer.subscribe(["mail", "mail.attachments"])
    waiting = {}  # record id -> mail record whose chunked attachments are not all assembled
    assembler = ChunkAssembler(tempfile.mkdtemp())

    def chunked(record):
        return [a["ref"] for a in record["attachments"] if a["ref"] and a["ref"]["placement"] == "chunked"]

    while True:
        msg = consumer.poll(1.0)
        if msg is None or msg.error():
            continue
        decoded = decode_value(msg.value())
        if decoded.kind == "mail":
            if all(assembler.expect(ref) is not None for ref in chunked(decoded.record)):
                print(write_attachments(decoded.record, "out", assembler=assembler))
            else:
                waiting[decoded.record_id] = decoded.record
        elif decoded.kind == "chunk":
            done = assembler.add(decoded.record)
            record = waiting.get(done.record_id) if done else None
            if record and all(assembler.completed(ref["id"]) for ref in chunked(record)):
                del waiting[done.record_id]
                print(write_attachments(record, "out", assembler=assembler))

A real consumer also commits offsets only once the attachments of the mails before them are
written, and deletes assembled files it has written (they are hard-linked into ``out``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import unicodedata
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import quote

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import to_parsing_canonical_form

from connector.records.avro import SINGLE_OBJECT_MAGIC, Schema, _schema_dir, load_schema

if TYPE_CHECKING:
    from connector.delivery.offload import OffloadSettings

__all__ = [
    "DEFAULT_MAX_PENDING_BYTES",
    "MAX_NAME_BYTES",
    "REGISTRY_MAGIC",
    "ChunkAssembler",
    "CompletedContent",
    "ConsumerError",
    "ContentTooLarge",
    "ContentUnavailable",
    "DecodedRecord",
    "IntegrityError",
    "KnownSchema",
    "MalformedRecord",
    "NotOurRecord",
    "PendingContent",
    "RecordDecoder",
    "SchemaRegistry",
    "UnavailableAttachment",
    "UnknownSchema",
    "WrittenAttachments",
    "attachment_summary",
    "decode_value",
    "fetch_offloaded",
    "known_schemas",
    "placement",
    "safe_filename",
    "write_attachments",
]

log = logging.getLogger("pop3kafka.consumer")

Kind = Literal["mail", "dead_letter", "chunk"]
Framing = Literal["single_object", "registry"]
Placement = Literal["inline", "chunked", "offload", "none"]

#: First byte of the Confluent Schema Registry wire format (then a 4-byte big-endian schema id).
REGISTRY_MAGIC = 0
#: Default bound on the declared size of all incomplete contents of one :class:`ChunkAssembler`.
DEFAULT_MAX_PENDING_BYTES = 8 * 1024**3

_KINDS: dict[str, Kind] = {
    "io.pop3kafka.MailRecord": "mail",
    "io.pop3kafka.DeadLetter": "dead_letter",
    "io.pop3kafka.AttachmentChunk": "chunk",
}
_NOT_FOR_CONSUMERS = {
    "io.pop3kafka.LedgerEntry": "an entry of the connector's UIDL ledger (its internal state)",
}
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_READ_BLOCK = 1024 * 1024


# ------------------------------------------------------------------------------------ errors


class ConsumerError(ValueError):
    """Base of every error this module raises on purpose."""


class NotOurRecord(ConsumerError):  # noqa: N818 - the name says what it is
    """The value is not a pop3-kafka mail record, dead letter or chunk (a tombstone, another
    producer's data, a ledger entry, or garbage)."""


class UnknownSchema(ConsumerError):  # noqa: N818
    """The value is framed like ours but its writer schema cannot be found: an unknown
    fingerprint (written by a newer connector?), a registry id without a registry, or a registry
    lookup that failed."""


class MalformedRecord(ConsumerError):  # noqa: N818
    """The framing names a known schema but the Avro body does not decode with it."""


class IntegrityError(ConsumerError):
    """Content does not match its size or SHA-256, or chunks of one content contradict each other."""


class ContentUnavailable(ConsumerError):  # noqa: N818
    """Content could not be read: an offloaded object is missing or its store unreachable."""


class ContentTooLarge(ConsumerError):  # noqa: N818
    """A content is larger than a :class:`ChunkAssembler`'s ``max_pending_bytes`` on its own."""


# ------------------------------------------------------------------------------- schemas


@dataclass(frozen=True, slots=True)
class KnownSchema:
    """One schema file of this package."""

    #: path below schemas/, e.g. ``history/mail_record.v1.avsc``.
    file: str
    #: full name, e.g. ``io.pop3kafka.MailRecord``.
    name: str
    version: int
    #: the schema in schemas/ (not history/): the reader schema of its type.
    current: bool
    schema: Schema


@dataclass(frozen=True, slots=True)
class _Catalogue:
    by_fingerprint: dict[bytes, KnownSchema]
    by_canonical: dict[str, KnownSchema]
    current: dict[str, KnownSchema]


def _version_of(file: str, doc: str) -> int | None:
    m = re.search(r"\.v(\d+)\.avsc$", file) or re.search(r"\bVersion (\d+)\b", doc)
    return int(m[1]) if m else None


@cache
def _catalogue() -> _Catalogue:
    root = _schema_dir()
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("*.avsc"))
    files += sorted(p.relative_to(root).as_posix() for p in root.glob("history/*.avsc"))
    entries: list[tuple[str, Schema, int | None, bool]] = []
    for file in files:
        schema = load_schema(file)
        doc = json.loads((root / file).read_text(encoding="utf-8")).get("doc", "")
        entries.append((file, schema, _version_of(file, doc), "/" not in file))
    by_fp: dict[bytes, KnownSchema] = {}
    by_canonical: dict[str, KnownSchema] = {}
    current: dict[str, KnownSchema] = {}
    for file, schema, stated, is_current in entries:
        version = stated
        if version is None:  # no "Version N" in the doc: one past the newest in history/, else 1
            older = [v for _, s, v, c in entries if s.name == schema.name and not c and v is not None]
            version = max(older, default=0) + 1
        known = KnownSchema(file=file, name=schema.name, version=version, current=is_current, schema=schema)
        by_fp.setdefault(schema.fingerprint, known)
        by_canonical.setdefault(schema.canonical, known)
        if is_current:
            current[schema.name] = known
    return _Catalogue(by_fingerprint=by_fp, by_canonical=by_canonical, current=current)


def known_schemas() -> list[KnownSchema]:
    """Every schema this package can decode, current and historical."""
    return list(_catalogue().by_fingerprint.values())


def _kind_of(name: str) -> Kind:
    kind = _KINDS.get(name)
    if kind is None:
        what = _NOT_FOR_CONSUMERS.get(name, "not a mail record, dead letter or attachment chunk")
        raise NotOurRecord(f"value is a {name}: {what}")
    return kind


# ------------------------------------------------------------------------------- decoding


class SchemaRegistry(Protocol):
    """What :func:`decode_value` needs of a schema registry client (SchemaRegistryClient fits):
    ``get_schema(schema_id)`` returning an object with ``schema_str`` (and optionally
    ``schema_type``)."""

    def get_schema(self, schema_id: int) -> Any: ...


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    """A decoded value."""

    kind: Kind
    #: the record as a dict of the current schema of its type (timestamps as aware datetimes).
    record: dict[str, Any]
    #: version of the writer schema (1, 2, 3...); None for a registry schema that matches none
    #: of this package's files (a newer version, or one registered by hand).
    schema_version: int | None
    #: full Avro name of the writer schema, e.g. ``io.pop3kafka.MailRecord``.
    schema_name: str
    framing: Framing
    #: the registry's schema id (registry framing only).
    schema_id: int | None = None

    @property
    def record_id(self) -> str:
        return str(self.record["record_id"])


@dataclass(frozen=True, slots=True)
class _Writer:
    name: str
    kind: Kind
    version: int | None
    parsed: Any
    #: None when the writer schema is the current reader schema (no resolution needed).
    reader: Any


class RecordDecoder:
    """:func:`decode_value` with its own cache of registry schemas (one per registry)."""

    def __init__(self, registry: SchemaRegistry | None = None) -> None:
        self.registry = registry
        self._by_id: dict[int, _Writer | NotOurRecord] = {}

    def decode(self, value: bytes | bytearray | memoryview | None) -> DecodedRecord:
        if value is None or len(value) == 0:
            raise NotOurRecord("empty value (a tombstone?): not a pop3-kafka record")
        data = bytes(value)
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < 10:
                raise NotOurRecord(f"value of {len(data)} bytes is too short for an Avro single-object frame")
            fp = data[2:10]
            known = _catalogue().by_fingerprint.get(fp)
            if known is None:
                raise UnknownSchema(
                    f"unknown schema fingerprint {fp.hex()}: not among the {len(_catalogue().by_fingerprint)} "
                    "schemas of this package (schemas/, schemas/history/); a newer pop3-kafka may have written "
                    "it: upgrade this package, or decode with the schema registry"
                )
            reader = _catalogue().current[known.name]
            writer = _Writer(
                name=known.name,
                kind=_kind_of(known.name),
                version=known.version,
                parsed=known.schema.parsed,
                reader=None if reader is known else reader.schema.parsed,
            )
            record = _read(data, 10, writer)
            return DecodedRecord(writer.kind, record, writer.version, writer.name, "single_object")
        if data[0] == REGISTRY_MAGIC:
            if len(data) < 5:
                raise NotOurRecord(f"value of {len(data)} bytes is too short for the schema registry wire format")
            schema_id = int.from_bytes(data[1:5], "big")
            writer = self._registry_writer(schema_id)
            record = _read(data, 5, writer)
            return DecodedRecord(writer.kind, record, writer.version, writer.name, "registry", schema_id)
        raise NotOurRecord(
            f"value starts with {data[:4].hex()}: neither Avro single-object encoding (c301) nor the "
            "schema registry wire format (00 + schema id)"
        )

    def _registry_writer(self, schema_id: int) -> _Writer:
        cached = self._by_id.get(schema_id)
        if isinstance(cached, NotOurRecord):
            raise cached
        if cached is not None:
            return cached
        if self.registry is None:
            raise UnknownSchema(
                f"value is in the schema registry wire format (schema id {schema_id}) but no registry was "
                "given: pass registry=SchemaRegistryClient({'url': ...})"
            )
        try:
            registered = self.registry.get_schema(schema_id)
        except Exception as exc:  # any client's error: unknown id, HTTP, auth
            raise UnknownSchema(f"schema registry lookup of schema id {schema_id} failed: {exc}") from exc
        schema_type = getattr(registered, "schema_type", None) or "AVRO"
        schema_str = getattr(registered, "schema_str", None)
        try:
            if schema_type.upper() != "AVRO" or not isinstance(schema_str, str):
                raise NotOurRecord(f"schema id {schema_id} is a {schema_type} schema, not Avro")
            raw = json.loads(schema_str)
            if not isinstance(raw, dict) or raw.get("type") != "record":
                raise NotOurRecord(f"schema id {schema_id} is not an Avro record schema")
            name = str(raw.get("name", ""))
            if "." not in name and raw.get("namespace"):
                name = f"{raw['namespace']}.{name}"
            kind = _kind_of(name)
        except NotOurRecord as exc:
            self._by_id[schema_id] = exc
            raise
        except ValueError as exc:  # JSONDecodeError
            raise UnknownSchema(f"schema id {schema_id}: the registry returned invalid JSON ({exc})") from exc
        try:
            parsed = fastavro.parse_schema(raw)
            known = _catalogue().by_canonical.get(to_parsing_canonical_form(raw))
        except Exception as exc:  # fastavro raises several types for a bad schema
            raise UnknownSchema(f"schema id {schema_id} ({name}) is not a valid Avro schema: {exc}") from exc
        reader = _catalogue().current[name]
        writer = _Writer(
            name=name,
            kind=kind,
            version=known.version if known is not None else None,
            parsed=parsed,
            reader=None if known is reader else reader.schema.parsed,
        )
        self._by_id[schema_id] = writer
        return writer


def _read(data: bytes, start: int, writer: _Writer) -> dict[str, Any]:
    buf = io.BytesIO(data)
    buf.seek(start)
    version = f"version {writer.version}" if writer.version is not None else "unknown version"
    try:
        record = fastavro.schemaless_reader(buf, writer.parsed, writer.reader)
    except SchemaResolutionError as exc:
        raise UnknownSchema(
            f"{writer.name} ({version}) cannot be read as the current schema of its type: {exc}"
        ) from exc
    except (EOFError, ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError) as exc:
        raise MalformedRecord(f"Avro body does not decode as {writer.name} ({version}): {exc!r}") from exc
    if buf.tell() != len(data):
        raise MalformedRecord(
            f"{len(data) - buf.tell()} bytes left over after decoding {writer.name} ({version}): "
            "the body was written with another schema"
        )
    if not isinstance(record, dict):  # pragma: no cover - every schema of ours is a record
        raise MalformedRecord(f"{writer.name} did not decode to a record")
    return record


_decoders: weakref.WeakKeyDictionary[Any, RecordDecoder] = weakref.WeakKeyDictionary()
_plain_decoder = RecordDecoder()


def decode_value(
    value: bytes | bytearray | memoryview | None, *, registry: SchemaRegistry | None = None
) -> DecodedRecord:
    """Decode a Kafka value of ours, in either framing (module docstring, "Framing").

    Registry schemas are cached per registry object and schema id (a registry that cannot be
    weakly referenced gets no cache: use :class:`RecordDecoder` then). Raises
    :class:`NotOurRecord`, :class:`UnknownSchema` or :class:`MalformedRecord`.
    """
    if registry is None:
        return _plain_decoder.decode(value)
    try:
        decoder = _decoders.get(registry)
        if decoder is None:
            decoder = _decoders[registry] = RecordDecoder(registry)
    except TypeError:  # not hashable or not weakly referenceable
        decoder = RecordDecoder(registry)
    return decoder.decode(value)


# ----------------------------------------------------------------------- attachment helpers


def placement(attachment: Mapping[str, Any]) -> Placement:
    """Where an attachment's bytes are: ``inline``, ``chunked``, ``offload`` or ``none``."""
    if attachment.get("data") is not None:
        return "inline"
    ref = attachment.get("ref")
    if ref is not None and ref.get("placement") in ("chunked", "offload"):
        return "chunked" if ref["placement"] == "chunked" else "offload"
    return "none"


def attachment_summary(record: Mapping[str, Any], *, sha_chars: int = 12) -> list[dict[str, Any]]:
    """One short dict per attachment of a mail record: filename, content_type, size, a prefix
    of the sha256, placement (and the content id of a ref)."""
    out = []
    for att in record.get("attachments") or []:
        item = {
            "filename": att.get("filename"),
            "content_type": att.get("content_type"),
            "size": att.get("size"),
            "sha256": str(att.get("sha256") or "")[:sha_chars],
            "placement": placement(att),
        }
        if att.get("ref") is not None:
            item["content_id"] = att["ref"].get("id")
        out.append(item)
    return out


def _record_id_of(content_id: str) -> str:
    """``<record_id>/<part>``: part paths never contain '/', record ids may."""
    return content_id.rpartition("/")[0] or content_id


def _check_sha(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        raise IntegrityError(f"{what}: sha256 {value!r} is not 64 lowercase hex digits")
    return value


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedRecord(f"{what} is {value!r}, not an integer")
    return value


# ---------------------------------------------------------------------------- reassembly


@dataclass(frozen=True, slots=True)
class CompletedContent:
    """A content reassembled (or downloaded) and verified."""

    content_id: str
    record_id: str
    #: the file holding it; None when written to a caller's file object.
    path: Path | None
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class PendingContent:
    """An incomplete content of a :class:`ChunkAssembler`."""

    content_id: str
    record_id: str
    count: int
    received: int
    bytes_received: int
    total_size: int
    #: a ContentRef for it was passed to :meth:`ChunkAssembler.expect`.
    expected: bool


@dataclass(frozen=True, slots=True)
class _Expectation:
    size: int
    sha256: str
    chunks: int | None


@dataclass(slots=True)
class _Open:
    content_id: str
    record_id: str
    count: int
    total_size: int
    sha256: str
    path: Path
    fd: int
    #: index -> (offset, length, digest of the chunk's bytes): the only per-chunk state kept.
    chunks: dict[int, tuple[int, int, bytes]] = field(default_factory=dict)
    bytes_received: int = 0


def _final_name(content_id: str) -> str:
    name = quote(content_id, safe="-_.@+=,~")
    if len(name) > 200:
        name = "content-" + hashlib.sha256(content_id.encode()).hexdigest()
    if name.startswith("."):
        name = "%2E" + name[1:]
    return name


class ChunkAssembler:
    """Reassembles chunked content (AttachmentChunk records) into verified files in ``directory``.

    * :meth:`add` takes chunks in **any order**, from any number of contents interleaved. A
      chunk's bytes go straight to a per-content temporary file (mode 0600) at the chunk's
      ``offset`` (``pwrite``); memory holds only an (offset, length, digest) triple per chunk
      received, whatever the content's size.
    * **Duplicates** (an at-least-once producer, a rewound consumer) are ignored when they carry
      the same bytes at the same offset, and raise :class:`IntegrityError` when they do not (the
      content stays open: the first copy may be the right one, the final SHA-256 check decides).
      A chunk of a content completed earlier is ignored as well (the last ``remember``
      completed contents are remembered).
    * When all ``count`` chunks are there, the chunks must tile ``0..total_size`` exactly and
      the file's size and SHA-256 must match the chunks' ``total_size`` and ``sha256`` (and the
      ContentRef given to :meth:`expect`, if any); then the file is renamed to a final name in
      ``directory`` (the percent-encoded content id) and :meth:`add` returns a
      :class:`CompletedContent`. The file is then the caller's. On a mismatch the file is
      deleted and :class:`IntegrityError` raised.
    * **Bounds.** At most ``max_open`` contents are incomplete at once (one open file each), and
      their declared sizes add up to at most ``max_pending_bytes`` (disk, not memory). Opening
      one more content beyond either bound **drops the oldest incomplete content** (by its first
      chunk's arrival), with a warning on the ``pop3kafka.consumer`` logger: its temporary file
      is deleted and :attr:`dropped` counts it. Chunks of a dropped content that arrive later
      start it over, and it can complete only if all its chunks are delivered again (rewind the
      consumer). Size ``max_open`` above the number of contents in flight at once: with
      read_committed, that is about the number of transactions interleaving in a partition
      times the partitions you read. A content larger than ``max_pending_bytes`` on its own
      raises :class:`ContentTooLarge`.

    Use it as a context manager, or call :meth:`close`, to delete incomplete temporary files.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_open: int = 64,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        remember: int | None = None,
        registry: SchemaRegistry | None = None,
    ) -> None:
        if max_open < 1:
            raise ValueError("max_open must be at least 1")
        if max_pending_bytes < 0:
            raise ValueError("max_pending_bytes must not be negative")
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.max_open = max_open
        self.max_pending_bytes = max_pending_bytes
        self.remember = remember if remember is not None else max(1024, 16 * max_open)
        #: incomplete contents dropped to stay within the bounds.
        self.dropped = 0
        self._decoder = RecordDecoder(registry)
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._done: OrderedDict[str, CompletedContent] = OrderedDict()
        self._expected: OrderedDict[str, _Expectation] = OrderedDict()
        self._pending_bytes = 0

    # ------------------------------------------------------------------ public API

    def add(self, chunk: Mapping[str, Any] | DecodedRecord | bytes) -> CompletedContent | None:
        """Take one chunk: a record dict from :func:`decode_value`, a :class:`DecodedRecord`, or
        the raw Kafka value. Returns the :class:`CompletedContent` when this chunk completed its
        content, else None."""
        record = self._chunk_record(chunk)
        cid = record.get("content_id")
        if not isinstance(cid, str) or not cid:
            raise MalformedRecord(f"chunk has no content_id: {cid!r}")
        rid = record.get("record_id")
        index = _int(record.get("index"), f"chunk of {cid}: index")
        count = _int(record.get("count"), f"chunk of {cid}: count")
        offset = _int(record.get("offset"), f"chunk of {cid}: offset")
        total = _int(record.get("total_size"), f"chunk of {cid}: total_size")
        sha = _check_sha(record.get("sha256"), f"chunk {index} of {cid}")
        data = record.get("data")
        if not isinstance(rid, str) or not isinstance(data, bytes | bytearray | memoryview):
            raise MalformedRecord(f"chunk {index} of {cid}: record_id or data missing")
        length = len(data)
        if count < 1 or not 0 <= index < count:
            raise IntegrityError(f"chunk of {cid}: index {index} is outside 0..count-1 (count {count})")
        if total < 0 or offset < 0 or offset + length > total:
            raise IntegrityError(
                f"chunk {index} of {cid}: {length} bytes at offset {offset} do not fit in total_size {total}"
            )
        if count > max(1, total):
            raise IntegrityError(f"chunk of {cid}: {count} chunks for {total} bytes")

        done = self._done.get(cid)
        if done is not None:
            if (done.size, done.sha256) != (total, sha):
                raise IntegrityError(
                    f"chunk {index} of {cid} says {total} bytes, sha256 {sha[:12]}..., but the content "
                    f"completed earlier has {done.size} bytes, sha256 {done.sha256[:12]}..."
                )
            log.debug("chunk %d of %s: content already completed; ignored", index, cid)
            return None

        entry = self._open.get(cid)
        if entry is None:
            entry = self._start(cid, rid, count, total, sha)
        elif (entry.record_id, entry.count, entry.total_size, entry.sha256) != (rid, count, total, sha):
            raise IntegrityError(
                f"chunk {index} of {cid} disagrees with the earlier chunks: record_id/count/total_size/sha256 "
                f"{rid!r}/{count}/{total}/{sha[:12]}... vs {entry.record_id!r}/{entry.count}/"
                f"{entry.total_size}/{entry.sha256[:12]}..."
            )

        digest = hashlib.blake2b(data, digest_size=16).digest()
        seen = entry.chunks.get(index)
        if seen is not None:
            if seen == (offset, length, digest):
                log.debug("chunk %d of %s: duplicate; ignored", index, cid)
                return None
            raise IntegrityError(
                f"chunk {index} of {cid} arrived twice with different content "
                f"({seen[1]} bytes at {seen[0]}, then {length} bytes at {offset})"
            )
        before = entry.chunks.get(index - 1)
        after = entry.chunks.get(index + 1)
        if (before is not None and before[0] + before[1] != offset) or (
            after is not None and offset + length != after[0]
        ):
            raise IntegrityError(f"chunk {index} of {cid} ({length} bytes at {offset}) overlaps or gaps its neighbours")
        if index == 0 and offset != 0:
            raise IntegrityError(f"chunk 0 of {cid} starts at offset {offset}, not 0")

        view = memoryview(data)
        written = 0
        while written < length:
            written += os.pwrite(entry.fd, view[written:], offset + written)
        entry.chunks[index] = (offset, length, digest)
        entry.bytes_received += length
        if len(entry.chunks) < entry.count:
            return None
        return self._finish(entry)

    def expect(self, ref: Mapping[str, Any]) -> CompletedContent | None:
        """Register a ``chunked`` ContentRef from a mail record (``attachments[i].ref`` or
        ``raw_ref``): its size, SHA-256 and chunk count must agree with the chunks. Returns the
        :class:`CompletedContent` if the content is already complete (checked against the ref),
        else None. A disagreement raises :class:`IntegrityError` (now, or when the content
        completes: the file is deleted then)."""
        if ref.get("placement") != "chunked":
            raise ValueError(f"ContentRef {ref.get('id')!r} is {ref.get('placement')!r}, not chunked")
        cid = str(ref["id"])
        exp = _Expectation(
            size=_int(ref.get("size"), f"ContentRef {cid}: size"),
            sha256=_check_sha(ref.get("sha256"), f"ContentRef {cid}"),
            chunks=ref.get("chunks"),
        )
        done = self._done.get(cid)
        if done is not None:
            if (done.size, done.sha256) != (exp.size, exp.sha256):
                raise IntegrityError(
                    f"ContentRef {cid} says {exp.size} bytes, sha256 {exp.sha256[:12]}..., but its chunks "
                    f"assembled to {done.size} bytes, sha256 {done.sha256[:12]}..."
                )
            return done
        entry = self._open.get(cid)
        if entry is not None:
            self._check_expectation(entry, exp)
        self._expected[cid] = exp
        self._expected.move_to_end(cid)
        while len(self._expected) > self.remember:
            self._expected.popitem(last=False)
        return None

    def completed(self, content_id: str) -> CompletedContent | None:
        """The completed content of this id, if it completed here recently (``remember``)."""
        return self._done.get(content_id)

    def pending(self) -> list[PendingContent]:
        """Incomplete contents, oldest first."""
        return [
            PendingContent(
                content_id=e.content_id,
                record_id=e.record_id,
                count=e.count,
                received=len(e.chunks),
                bytes_received=e.bytes_received,
                total_size=e.total_size,
                expected=e.content_id in self._expected,
            )
            for e in self._open.values()
        ]

    def missing(self, content_id: str) -> list[int]:
        """Chunk indexes not yet received of an incomplete content ([] if it is not open)."""
        entry = self._open.get(content_id)
        if entry is None:
            return []
        return [i for i in range(entry.count) if i not in entry.chunks]

    def discard(self, content_id: str) -> bool:
        """Forget a content: an incomplete one's temporary file is deleted; a completed one is
        only forgotten (its file is the caller's), so its chunks would be assembled again.
        Returns whether there was anything to forget."""
        found = self._expected.pop(content_id, None) is not None
        found = self._done.pop(content_id, None) is not None or found
        entry = self._open.pop(content_id, None)
        if entry is not None:
            self._drop_file(entry)
            found = True
        return found

    def close(self) -> None:
        """Delete the temporary files of every incomplete content."""
        for cid in list(self._open):
            self.discard(cid)

    def __enter__(self) -> ChunkAssembler:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _chunk_record(self, chunk: Mapping[str, Any] | DecodedRecord | bytes) -> Mapping[str, Any]:
        if isinstance(chunk, bytes | bytearray | memoryview):
            chunk = self._decoder.decode(chunk)
        if isinstance(chunk, DecodedRecord):
            if chunk.kind != "chunk":
                raise NotOurRecord(f"{chunk.schema_name} {chunk.record.get('record_id')!r} is not an attachment chunk")
            return chunk.record
        return chunk

    def _start(self, cid: str, rid: str, count: int, total: int, sha: str) -> _Open:
        if total > self.max_pending_bytes:
            raise ContentTooLarge(
                f"content {cid} has {total} bytes, more than max_pending_bytes={self.max_pending_bytes} of this "
                "ChunkAssembler on its own"
            )
        exp = self._expected.get(cid)
        while self._open and (len(self._open) >= self.max_open or self._pending_bytes + total > self.max_pending_bytes):
            _, oldest = self._open.popitem(last=False)
            self.dropped += 1
            log.warning(
                "dropping incomplete content %s (%d of %d chunks, %d of %d bytes) to stay within max_open=%d, "
                "max_pending_bytes=%d; it completes only if all its chunks are delivered again",
                oldest.content_id,
                len(oldest.chunks),
                oldest.count,
                oldest.bytes_received,
                oldest.total_size,
                self.max_open,
                self.max_pending_bytes,
            )
            self._drop_file(oldest)
        fd, name = tempfile.mkstemp(prefix=".chunks-", suffix=".part", dir=self.directory)  # mode 0600
        entry = _Open(content_id=cid, record_id=rid, count=count, total_size=total, sha256=sha, path=Path(name), fd=fd)
        self._open[cid] = entry
        self._pending_bytes += total
        if exp is not None:
            try:
                self._check_expectation(entry, exp)
            except IntegrityError:
                self.discard(cid)
                raise
        return entry

    def _check_expectation(self, entry: _Open, exp: _Expectation) -> None:
        if (entry.total_size, entry.sha256) != (exp.size, exp.sha256) or (
            exp.chunks is not None and exp.chunks != entry.count
        ):
            raise IntegrityError(
                f"content {entry.content_id}: its ContentRef says {exp.size} bytes in {exp.chunks} chunks, sha256 "
                f"{exp.sha256[:12]}..., its chunks say {entry.total_size} bytes in {entry.count} chunks, sha256 "
                f"{entry.sha256[:12]}..."
            )

    def _drop_file(self, entry: _Open) -> None:
        self._pending_bytes -= entry.total_size
        with contextlib.suppress(OSError):
            os.close(entry.fd)
        with contextlib.suppress(FileNotFoundError):
            entry.path.unlink()

    def _finish(self, entry: _Open) -> CompletedContent:
        cid = entry.content_id
        del self._open[cid]
        try:
            expected_offset = 0
            for i in range(entry.count):
                offset, length, _ = entry.chunks[i]
                if offset != expected_offset:
                    raise IntegrityError(f"content {cid}: chunk {i} starts at {offset}, expected {expected_offset}")
                expected_offset += length
            if expected_offset != entry.total_size:
                raise IntegrityError(
                    f"content {cid}: chunks hold {expected_offset} bytes, total_size is {entry.total_size}"
                )
            size = os.fstat(entry.fd).st_size
            h = hashlib.sha256()
            pos = 0
            while pos < size:
                block = os.pread(entry.fd, min(_READ_BLOCK, size - pos), pos)
                if not block:
                    break
                h.update(block)
                pos += len(block)
            if size != entry.total_size or h.hexdigest() != entry.sha256:
                raise IntegrityError(
                    f"content {cid}: reassembled {size} bytes with sha256 {h.hexdigest()[:12]}..., the chunks say "
                    f"{entry.total_size} bytes with sha256 {entry.sha256[:12]}..."
                )
            exp = self._expected.pop(cid, None)
            if exp is not None:
                self._check_expectation(entry, exp)
        except BaseException:
            self._drop_file(entry)
            raise
        self._pending_bytes -= entry.total_size
        os.close(entry.fd)
        final = self.directory / _final_name(cid)
        try:
            os.replace(entry.path, final)
        except BaseException:
            entry.path.unlink(missing_ok=True)
            raise
        done = CompletedContent(
            content_id=cid, record_id=entry.record_id, path=final, size=entry.total_size, sha256=entry.sha256
        )
        self._done[cid] = done
        while len(self._done) > self.remember:
            self._done.popitem(last=False)
        return done


# -------------------------------------------------------------------------- offloaded content


def _ref_fields(ref: Mapping[str, Any], placement_: str) -> tuple[str, int, str]:
    if ref.get("placement") != placement_:
        raise ValueError(f"ContentRef {ref.get('id')!r} is {ref.get('placement')!r}, not {placement_}")
    cid = str(ref.get("id") or "")
    return cid, _int(ref.get("size"), f"ContentRef {cid}: size"), _check_sha(ref.get("sha256"), f"ContentRef {cid}")


def _stream_verified(
    uri: str, settings: OffloadSettings | None, out: IO[bytes], *, cid: str, size: int, sha256: str
) -> None:
    # Lazy: the store module pulls in confluent_kafka (connector.delivery); decoding does not need it.
    from connector.delivery.offload import (  # noqa: PLC0415
        OffloadConfigError,
        OffloadError,
        OffloadIntegrityError,
        read_uri,
    )

    h = hashlib.sha256()
    got = 0
    pieces: Iterator[bytes] = iter(())
    try:
        pieces = read_uri(uri, settings)
        for piece in pieces:
            got += len(piece)
            if got > size:
                raise IntegrityError(f"content {cid} at {uri}: more than the {size} bytes its ContentRef says")
            h.update(piece)
            out.write(piece)
    except ConsumerError:
        raise
    except OffloadIntegrityError as exc:
        raise IntegrityError(f"content {cid}: {exc}") from exc
    except (OffloadError, OffloadConfigError, OSError, ValueError) as exc:
        # missing object, store unreachable or refusing, boto3 not installed, not an offload URI
        raise ContentUnavailable(f"content {cid}: cannot read {uri}: {exc}") from exc
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
    if got != size or h.hexdigest() != sha256:
        raise IntegrityError(
            f"content {cid} at {uri}: {got} bytes with sha256 {h.hexdigest()[:12]}..., its ContentRef says "
            f"{size} bytes with sha256 {sha256[:12]}..."
        )


def fetch_offloaded(
    ref: Mapping[str, Any],
    dest: str | os.PathLike[str] | IO[bytes],
    settings: OffloadSettings | None = None,
) -> CompletedContent:
    """Download an ``offload`` ContentRef to ``dest`` (a path, or a binary file object),
    verifying size and SHA-256 while writing.

    A path is written through a temporary file (mode 0600) in its directory, renamed over
    ``dest`` only once verified. A file object is written from its current position; on failure
    it is truncated back to that position when seekable. Raises :class:`IntegrityError` on a
    mismatch and :class:`ContentUnavailable` when the object cannot be read; nothing partial
    is left behind at a path.
    """
    cid, size, sha = _ref_fields(ref, "offload")
    uri = ref.get("uri")
    if not isinstance(uri, str) or not uri:
        raise ContentUnavailable(f"ContentRef {cid} is offloaded but has no uri")
    if isinstance(dest, str | os.PathLike):
        target = Path(dest)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:60]}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                _stream_verified(uri, settings, f, cid=cid, size=size, sha256=sha)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return CompletedContent(content_id=cid, record_id=_record_id_of(cid), path=target, size=size, sha256=sha)
    start = dest.tell() if dest.seekable() else None
    try:
        _stream_verified(uri, settings, dest, cid=cid, size=size, sha256=sha)
    except BaseException:
        if start is not None:
            dest.seek(start)
            dest.truncate()
        raise
    return CompletedContent(content_id=cid, record_id=_record_id_of(cid), path=None, size=size, sha256=sha)


# ------------------------------------------------------------------------ writing attachments

#: Device names Windows reserves in any directory, with any extension.
_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CLOCK$", "CONIN$", "CONOUT$"}
    | {f"COM{i}" for i in range(10)}
    | {f"LPT{i}" for i in range(10)}
    | {"COM¹", "COM²", "COM³", "LPT¹", "LPT²", "LPT³"}
)
_UNSAFE = frozenset('<>:"/\\|?*')
#: bytes of a file name (UTF-8); filesystems allow 255, this leaves room for a "-N" suffix.
MAX_NAME_BYTES = 200


def _truncate(name: str, limit: int) -> str:
    if len(name.encode()) <= limit:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext.encode()) > 16:
        stem, ext, dot = name, "", ""
    budget = limit - len((dot + ext).encode())
    cut = stem.encode()[:budget].decode("utf-8", "ignore")
    return cut + dot + ext


def safe_filename(name: str | None, fallback: str) -> str:
    """A file name safe to create in a directory from an untrusted attachment filename.

    Keeps only the last path component (``/`` and ``\\`` both separate), replaces control and
    format characters (NUL, newlines, bidi overrides that fake an extension, ...) and the
    characters Windows forbids with ``_``, strips leading and trailing dots and spaces (so no
    ``..``, no hidden file), defuses a leading ``-`` and Windows device names (``CON``,
    ``NUL.txt``...), and truncates to :data:`MAX_NAME_BYTES` keeping the extension. Returns
    ``fallback`` when nothing usable is left.
    """
    if not name:
        return fallback
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rpartition("/")[2]
    name = "".join(
        "_" if c in _UNSAFE or unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") else c
        for c in name
    )
    name = name.strip(" .\t")
    if name.startswith("-"):
        name = "_" + name[1:]
    if name.partition(".")[0].rstrip(" ").upper() in _RESERVED:
        name = "_" + name
    name = _truncate(name, MAX_NAME_BYTES)
    if not name.strip("_ ."):
        return fallback
    return name


@dataclass(frozen=True, slots=True)
class UnavailableAttachment:
    """An attachment :func:`write_attachments` did not write, and why."""

    index: int
    filename: str | None
    placement: Placement
    reason: str


class WrittenAttachments(list[Path]):
    """The paths written, in attachment order; :attr:`unavailable` lists what was not written."""

    def __init__(self) -> None:
        super().__init__()
        self.unavailable: list[UnavailableAttachment] = []


def _claim(directory: Path, name: str, used: set[str]) -> tuple[Path, int]:
    """Create ``name`` (or ``stem-2.ext``, ``stem-3.ext``...) exclusively; never follows or
    overwrites anything already there."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, dot, ext = name, "", ""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for n in range(1, 100_000):
        candidate = name if n == 1 else f"{stem}-{n}{dot}{ext}"
        if candidate.casefold() in used:
            continue
        path = directory / candidate
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            continue
        used.add(candidate.casefold())
        return path, fd
    raise OSError(f"no free file name for {name!r} in {directory}")


def _fallback_name(att: Mapping[str, Any], index: int) -> str:
    part = att.get("part")
    if isinstance(part, str):
        clean = re.sub(r"[^0-9.]", "_", part).strip(".") or "0"
        return f"part-{clean}.bin"
    return f"attachment-{index + 1}.bin"


class _Skip(Exception):  # noqa: N818 - control flow inside write_attachments
    def __init__(self, reason: str, *, integrity: bool = False) -> None:
        super().__init__(reason)
        self.integrity = integrity


def write_attachments(
    record: Mapping[str, Any],
    directory: str | os.PathLike[str],
    *,
    assembler: ChunkAssembler | None = None,
    offload_settings: OffloadSettings | None = None,
) -> WrittenAttachments:
    """Write every attachment of a mail record whose bytes are available into ``directory``
    (created if missing), as files of mode 0600 with safe, unique names (:func:`safe_filename`;
    ``part-<path>.bin`` when the attachment has no usable name). Existing files are never
    overwritten: a clash (ignoring case) gets ``-2``, ``-3``... before the extension.

    * ``inline``: from ``data``, checked against the attachment's size and sha256;
    * ``offload``: downloaded with :func:`fetch_offloaded` (``offload_settings`` for S3);
    * ``chunked``: the content ``assembler`` completed for ``ref.id`` (hard-linked when it is on
      the same filesystem, else copied).

    Returns the paths written; what could not be written (metadata only, chunks not complete,
    store unreachable, integrity failure) is in the result's ``unavailable``, with the reason.
    Integrity failures are also logged as warnings.
    """
    out = WrittenAttachments()
    target = Path(directory)
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Names compared case-insensitively, so the set stays unique on (or copied to) a
    # case-insensitive filesystem; O_EXCL in _claim settles races with other writers.
    used = {entry.casefold() for entry in os.listdir(target)}
    for index, att in enumerate(record.get("attachments") or []):
        where = placement(att)
        name = safe_filename(att.get("filename"), _fallback_name(att, index))
        try:
            out.append(
                _write_one(
                    att, where, target, name=name, used=used, assembler=assembler, offload_settings=offload_settings
                )
            )
        except (_Skip, IntegrityError, ContentUnavailable) as exc:
            integrity = isinstance(exc, IntegrityError) or (isinstance(exc, _Skip) and exc.integrity)
            out.unavailable.append(UnavailableAttachment(index, att.get("filename"), where, str(exc)))
            if integrity:
                log.warning("attachment %d (%r) not written: %s", index, att.get("filename"), exc)
    return out


def _write_one(
    att: Mapping[str, Any],
    where: Placement,
    target: Path,
    *,
    name: str,
    used: set[str],
    assembler: ChunkAssembler | None,
    offload_settings: OffloadSettings | None,
) -> Path:
    if where == "none":
        raise _Skip("the record carries no bytes for it (metadata only)")
    if where == "inline":
        data = bytes(att["data"])
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != att.get("size") or digest != att.get("sha256"):
            raise _Skip(
                f"inline data is {len(data)} bytes with sha256 {digest[:12]}..., the record says "
                f"{att.get('size')} bytes with sha256 {str(att.get('sha256'))[:12]}...",
                integrity=True,
            )
        path, fd = _claim(target, name, used)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path
    ref = att["ref"]
    if (ref.get("size"), ref.get("sha256")) != (att.get("size"), att.get("sha256")):
        raise _Skip(f"its ContentRef {ref.get('id')} disagrees with the attachment's size/sha256", integrity=True)
    if where == "offload":
        path, fd = _claim(target, name, used)
        try:
            with os.fdopen(fd, "wb") as f:
                fetch_offloaded(ref, f, offload_settings)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path
    done = assembler.completed(str(ref["id"])) if assembler is not None else None
    if done is None:
        why = "no ChunkAssembler given" if assembler is None else "its chunks are not all assembled (yet)"
        raise _Skip(f"chunked content {ref['id']}: {why}")
    if (done.size, done.sha256) != (ref["size"], ref["sha256"]):
        raise _Skip(f"chunked content {ref['id']} assembled to other bytes than its ContentRef says", integrity=True)
    if done.path is None or not done.path.exists():
        raise _Skip(f"chunked content {ref['id']}: the assembled file {done.path} is gone")
    path, fd = _claim(target, name, used)
    try:
        _place(done.path, path, fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _place(src: Path, dst: Path, fd: int) -> None:
    """Put ``src``'s content at ``dst`` (already created empty as ``fd``): a hard link swapped
    in atomically when possible, else a copy."""
    link = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    try:
        os.link(src, link)
    except OSError:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, _READ_BLOCK)
        return
    os.close(fd)
    try:
        os.replace(link, dst)
    except BaseException:
        link.unlink(missing_ok=True)
        raise
