"""Where the bytes of attachments (and of raw mail) go: inline, chunk records, or an object store.

Called once a mail has decoded successfully, inside the cycle (and, in exactly-once mode,
inside the open transaction), while the mail's spool file is still mapped:

* placement ``none``: nothing (record version 2: size and SHA-256 only);
* content up to ``attachments.inline_max_bytes``: in the record (``data`` / ``raw``);
* larger, ``chunked``: AttachmentChunk records on topics.attachments with the mail record's key
  (same partition), produced before the mail record and in the same transaction, so a
  read_committed consumer sees all of them with the record or none;
* larger, ``offload``: one content-addressed object (``sha256/<hex>``), written before the
  transaction commits; a retry after an abort finds the same key and re-uses it.

Content is read piece by piece (the second transfer-decoding pass over the spool mapping,
connector/decoding/stream.py) and never joined, so memory stays bounded by a chunk plus the
producer's queue (``queue.buffering.max.kbytes``, connector/delivery/kafka.py).
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from connector import faults
from connector.config.model import Config, MailboxConfig
from connector.decoding.model import Attachment
from connector.delivery.kafka import Delivery
from connector.delivery.offload import ContentStore
from connector.errors import DeliveryError
from connector.records.content import (
    RAW_CONTENT,
    ChunkHeader,
    ContentRef,
    chunk_count,
    content_id,
    encode_chunk,
)
from connector.records.framing import SINGLE_OBJECT, Framer

#: how much of a buffer one read takes (the spool mapping hands pages back after each).
READ_BYTES = 1 << 20
#: inline content of one record, all attachments together (or inline_max_bytes when larger):
#: beyond it, content under inline_max_bytes goes by reference too, so that the record keeps
#: well under the broker's default message.max.bytes (1 MB) with its bodies and headers.
INLINE_BUDGET = 512 * 1024

Send = Callable[[str, bytes, bytes, Sequence[tuple[str, bytes]]], Delivery]


@dataclass(frozen=True, slots=True)
class Placed:
    """One content's fate: inline bytes, a reference, or neither (placement none)."""

    data: bytes | None = None
    ref: ContentRef | None = None


def buffer_pieces(buffer: bytes | mmap.mmap, read_bytes: int = READ_BYTES) -> Iterator[bytes]:
    """The bytes of ``buffer`` in pieces; a spool mapping hands its pages back as it goes."""
    release = getattr(buffer, "release", None)
    size = len(buffer)
    for start in range(0, size, read_bytes):
        yield bytes(buffer[start : start + read_bytes])
        if release is not None:
            release(start + read_bytes)


@dataclass
class Placer:
    """Places the content of one mail (its record id and key) per its mailbox's settings."""

    config: Config
    mailbox: MailboxConfig
    record_id: str
    key: bytes
    send: Send
    store: ContentStore | None = None
    #: record.framing of the chunk records.
    framer: Framer = SINGLE_OBJECT
    #: chunk records produced; the mail may only be deleted once all of them are confirmed.
    deliveries: list[Delivery] = field(default_factory=list)
    #: offloaded objects (uri, reused) for the cycle's log line and tests.
    stored: list[tuple[str, bool]] = field(default_factory=list)
    #: bytes placed inline in this record so far (see INLINE_BUDGET).
    inline_total: int = 0

    def attachments(self, attachments: Sequence[Attachment]) -> list[Placed]:
        """One Placed per attachment, in order. Content ids are ``<record_id>/<part path>``; a
        path shared by several attachments (uuencoded blocks of one text part) gets ``#n``."""
        seen: dict[str, int] = {}
        out: list[Placed] = []
        for a in attachments:
            part = a.part if a.part is not None else "?"
            n = seen.get(part, 0)
            seen[part] = n + 1
            out.append(self.content(part if n == 0 else f"{part}#{n}", a.size, a.sha256, a.pieces))
        return out

    def content(self, part: str, size: int, sha256: str, pieces: Callable[[], Iterator[bytes]]) -> Placed:
        policy = self.mailbox.attachments
        if policy.placement == "none":
            return Placed()
        if size <= policy.inline_max_bytes and self.inline_total + size <= max(INLINE_BUDGET, policy.inline_max_bytes):
            # Inline while the record stays small: many small attachments together would make a
            # record Kafka refuses (message.max.bytes); past the budget they go by reference.
            self.inline_total += size
            return Placed(data=b"".join(pieces()))
        cid = content_id(self.record_id, part)
        if policy.placement == "chunked":
            return Placed(ref=self._chunks(cid, size, sha256, pieces()))
        if self.store is None:  # config validation makes this unreachable
            raise DeliveryError("placement offload without an offload store")
        stored = self.store.put(sha256, size, pieces())
        self.stored.append((stored.uri, stored.reused))
        return Placed(ref=ContentRef(cid, "offload", size, sha256, uri=stored.uri))

    def raw(
        self, buffer: bytes | mmap.mmap, sha256: str, *, force_ref: bool = False, dead_letter: bool = False
    ) -> Placed:
        """The raw mail: inline when small (or with placement none), else like an attachment.
        ``force_ref``: never inline (a dead letter for mail too large for any record).
        ``dead_letter``: the raw mail of a dead letter; its chunk records go to the dead-letter
        topic itself, so they share its retention (kept until an operator removes them) and a
        replay finds them in the partition it reads, before the dead letter."""
        size = len(buffer)
        policy = self.mailbox.attachments
        budget = max(INLINE_BUDGET, policy.inline_max_bytes)
        if policy.placement == "none" or (
            not force_ref and size <= policy.inline_max_bytes and self.inline_total + size <= budget
        ):
            self.inline_total += size
            return Placed(data=bytes(buffer))
        return self._raw_ref(buffer, size, sha256, self.config.topics.dead_letter if dead_letter else None)

    def _raw_ref(self, buffer: bytes | mmap.mmap, size: int, sha256: str, topic: str | None) -> Placed:
        cid = content_id(self.record_id, RAW_CONTENT)
        if self.mailbox.attachments.placement == "chunked":
            return Placed(ref=self._chunks(cid, size, sha256, buffer_pieces(buffer), topic))
        if self.store is None:
            raise DeliveryError("placement offload without an offload store")
        stored = self.store.put(sha256, size, buffer_pieces(buffer))
        self.stored.append((stored.uri, stored.reused))
        return Placed(ref=ContentRef(cid, "offload", size, sha256, uri=stored.uri))

    def _chunks(
        self, cid: str, size: int, sha256: str, pieces: Iterator[bytes], topic: str | None = None
    ) -> ContentRef:
        """Cut ``pieces`` into chunk records of topics.chunk_bytes and produce them to ``topic``
        (default topics.attachments)."""
        step = self.config.topics.chunk_bytes
        topic = topic or self.config.topics.attachments
        count = chunk_count(size, step)
        header = ChunkHeader(self.record_id, self.mailbox.id, cid, count, size, sha256)
        digest = hashlib.sha256()
        pending = bytearray()
        index = offset = 0

        def emit(data: bytes) -> None:
            nonlocal index, offset
            value, headers = encode_chunk(header, index, offset, data, self.framer)
            self.deliveries.append(self.send(topic, self.key, value, headers))
            faults.point("during_chunks")
            index += 1
            offset += len(data)

        for piece in pieces:
            digest.update(piece)
            pending += piece
            while len(pending) >= step and index < count - 1:
                emit(bytes(pending[:step]))
                del pending[:step]
        emit(bytes(pending))
        # The content was decoded twice (hashing pass, then this one): both must agree, or the
        # records would promise bytes the chunks do not hold. Raising aborts the transaction.
        if offset != size or index != count or digest.hexdigest() != sha256:
            raise DeliveryError(
                f"content {cid!r} changed between decoding and chunking ({offset} of {size} bytes); retried next cycle"
            )
        return ContentRef(cid, "chunked", size, sha256, topic=topic, chunks=count, chunk_bytes=step)
