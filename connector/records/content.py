"""Large content: references in records, and the chunk records that carry it (schema v3).

Brokers cap a record at about 1 MB by default (``message.max.bytes``), and mail carries scans,
drawings and archives of tens of megabytes. Content over a mailbox's
``attachments.inline_max_bytes`` therefore travels outside its mail record (docs/record.md,
"Large content"):

* ``chunked``: :data:`ATTACHMENT_CHUNK_SCHEMA_FILE` records on ``topics.attachments``, with the
  key of the mail record (so the same partition) and in the same transaction;
* ``offload``: one content-addressed object (``sha256/<hex>``) in a directory or an S3 bucket
  (connector/delivery/offload.py), written before the transaction commits.

The record keeps a :class:`ContentRef` (schemas/mail_record.avsc ``ContentRef``): id, placement,
size and SHA-256 of the whole, plus the chunk count or the URI. This module is plain data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from connector.records.avro import HEADER_MAILBOX, HEADER_RECORD_ID, Schema, load_schema
from connector.records.framing import SINGLE_OBJECT, Framer

ATTACHMENT_CHUNK_SCHEMA_FILE = "attachment_chunk.avsc"
#: Kafka headers of a chunk record, beside the record id and mailbox of every record of ours:
#: a consumer can route or skip chunks without decoding the value.
HEADER_CONTENT_ID = "pop3kafka.content_id"
HEADER_CHUNK = "pop3kafka.chunk"  # "<index>/<count>"
#: the content id suffix of the raw mail (attachments use their part path).
RAW_CONTENT = "raw"

Placement = Literal["chunked", "offload"]


@cache
def chunk_schema() -> Schema:
    return load_schema(ATTACHMENT_CHUNK_SCHEMA_FILE)


def content_id(record_id: str, part: str) -> str:
    """``<record_id>/<part path>``; ``part`` is "raw" for the raw mail. Part paths are digits
    and dots (or "" for a single-part mail's body), so the id is unambiguous."""
    return f"{record_id}/{part}"


@dataclass(frozen=True, slots=True)
class ContentRef:
    """Where content too large for its record went."""

    id: str
    placement: Placement
    size: int
    sha256: str
    topic: str | None = None
    chunks: int | None = None
    chunk_bytes: int | None = None
    uri: str | None = None

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "placement": self.placement,
            "size": self.size,
            "sha256": self.sha256,
            "topic": self.topic,
            "chunks": self.chunks,
            "chunk_bytes": self.chunk_bytes,
            "uri": self.uri,
        }


def chunk_count(size: int, chunk_bytes: int) -> int:
    """Chunks for ``size`` bytes; empty content still gets one (empty) chunk, so a consumer
    always sees the set complete."""
    return max(1, -(-size // chunk_bytes))


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """What every chunk of one content repeats."""

    record_id: str
    mailbox_id: str
    content_id: str
    count: int
    total_size: int
    sha256: str


def encode_chunk(
    h: ChunkHeader, index: int, offset: int, data: bytes, framer: Framer = SINGLE_OBJECT
) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The AttachmentChunk value framed by ``framer`` (record.framing) and its Kafka headers."""
    value = framer.encode(
        chunk_schema(),
        {
            "record_id": h.record_id,
            "content_id": h.content_id,
            "index": index,
            "count": h.count,
            "offset": offset,
            "total_size": h.total_size,
            "sha256": h.sha256,
            "data": data,
        },
    )
    headers = [
        (HEADER_RECORD_ID, h.record_id.encode()),
        (HEADER_MAILBOX, h.mailbox_id.encode()),
        (HEADER_CONTENT_ID, h.content_id.encode()),
        (HEADER_CHUNK, f"{index}/{h.count}".encode()),
    ]
    return value, headers
