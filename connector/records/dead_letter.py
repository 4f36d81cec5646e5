"""Dead letters: a mail we could not decode, kept as the bytes we retrieved (schemas/dead_letter.avsc).

The value uses the same framing as mail records (record.framing, connector/records/framing.py), so
a consumer tells the two apart by the schema fingerprint, or the registry schema id, alone. The
Kafka headers follow Kafka Connect's dead-letter-queue error headers (KIP-298: ``__connect.errors.stage``,
``__connect.errors.exception.class.name``, ``__connect.errors.exception.message``), in our own
namespace, plus the record id and mailbox every record of ours carries. Kafka Connect also
sends the stack trace; we do not: a traceback of the decoder could quote mail content.

This module is plain data: no Kafka, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from connector import __version__
from connector.errors import DecodeError
from connector.records.avro import (
    HEADER_MAILBOX,
    HEADER_RECORD_ID,
    Provenance,
    Schema,
    decode_single_object,
    load_schema,
    record_id,
)
from connector.records.framing import SINGLE_OBJECT, Framer

DEAD_LETTER_SCHEMA_FILE = "dead_letter.avsc"
HEADER_STAGE = "pop3kafka.errors.stage"
HEADER_REASON = "pop3kafka.errors.reason"
HEADER_EXCEPTION_CLASS = "pop3kafka.errors.exception.class.name"
HEADER_EXCEPTION_MESSAGE = "pop3kafka.errors.exception.message"
#: A header is not the place for a long text; the record has the whole message.
MAX_HEADER_MESSAGE = 1000


@cache
def dead_letter_schema() -> Schema:
    return load_schema(DEAD_LETTER_SCHEMA_FILE)


def _text(value: str) -> str:
    """Valid UTF-8 whatever the exception carried (a lone surrogate would make Avro refuse it)."""
    return value.encode("utf-8", "replace").decode("utf-8")


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter: provenance, why decoding failed, and the original bytes."""

    provenance: Provenance
    stage: str
    reason: str
    error_class: str
    error_message: str
    failed_at_millis: int
    raw: bytes
    #: where the raw bytes went when too large to travel here (ContentRef; ``raw`` is then empty).
    raw_ref: Any = None

    @classmethod
    def of(
        cls, exc: DecodeError, provenance: Provenance, raw: bytes, failed_at_millis: int, raw_ref: Any = None
    ) -> DeadLetter:
        """The dead letter for ``raw`` that failed with ``exc``. ``raw`` must be the bytes as
        retrieved: for an S/MIME mail the still encrypted ones (never decrypted content).
        With ``raw_ref`` (chunks or an offloaded object holding them), ``raw`` is empty."""
        cls_ = type(exc)
        return cls(
            provenance=provenance,
            stage=_text(exc.stage),
            reason=_text(exc.reason),
            error_class=f"{cls_.__module__}.{cls_.__qualname__}",
            # DecodeError's contract: its message never carries mail content (connector/errors.py).
            error_message=_text(str(exc)),
            failed_at_millis=failed_at_millis,
            raw=bytes(raw),
            raw_ref=raw_ref,
        )

    @property
    def record_id(self) -> str:
        return record_id(self.provenance.mailbox_id, self.provenance.uidl)

    def record(self) -> dict[str, Any]:
        """The DeadLetter (schemas/dead_letter.avsc) as a dict ready for fastavro."""
        p = self.provenance
        return {
            "record_id": self.record_id,
            "provenance": {
                "mailbox_id": p.mailbox_id,
                "uidl": p.uidl,
                "server": p.server,
                "fetched_at": p.fetched_at_millis,
                "raw_size": p.raw_size,
                "raw_sha256": p.raw_sha256,
                "connector_version": __version__,
            },
            "stage": self.stage,
            "reason": self.reason,
            "error_class": self.error_class,
            "error_message": self.error_message,
            "failed_at": self.failed_at_millis,
            "raw": self.raw,
            "raw_ref": self.raw_ref.record() if self.raw_ref is not None else None,
        }

    def encode(self, framer: Framer = SINGLE_OBJECT) -> bytes:
        """The Avro value framed by ``framer`` (default: C3 01, fingerprint, body)."""
        return framer.encode(dead_letter_schema(), self.record())

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers: our record headers, then the error headers."""
        return [
            (HEADER_RECORD_ID, self.record_id.encode()),
            (HEADER_MAILBOX, self.provenance.mailbox_id.encode()),
            (HEADER_STAGE, self.stage.encode()),
            (HEADER_REASON, self.reason.encode()),
            (HEADER_EXCEPTION_CLASS, self.error_class.encode()),
            (HEADER_EXCEPTION_MESSAGE, self.error_message[:MAX_HEADER_MESSAGE].encode()),
        ]


def decode_dead_letter(value: bytes) -> dict[str, Any]:
    """A dead-letter value back to its record (``failed_at``/``fetched_at`` as datetimes)."""
    s = dead_letter_schema()
    return decode_single_object(value, {s.fingerprint: s})
