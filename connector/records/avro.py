"""Avro records: the mail record built from a decoded mail, and its wire framing.

Framing is Avro *single-object encoding* (Avro spec, "Single-object encoding"):

    0xC3 0x01 | 8-byte CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form,
              | little-endian | Avro binary body

so a consumer without a schema registry can find the writer schema in schemas/ by its
fingerprint. docs/record.md shows how to decode it in Python and Java.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from connector import __version__
from connector.decoding.model import Address, Attachment, DecodedMail, MessageSummary
from connector.errors import DecodeError

if TYPE_CHECKING:
    from connector.decoding.signature import SignatureCheck

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
MAIL_SCHEMA_FILE = "mail_record.avsc"
#: Kafka header names carried on every record, whatever the framing.
HEADER_RECORD_ID = "pop3kafka.record_id"
HEADER_MAILBOX = "pop3kafka.mailbox_id"


def _schema_dir() -> Path:
    """schemas/ of the source tree, or the copy packed into the wheel."""
    packed = resources.files("connector.records").joinpath("_schemas")
    if packed.is_dir():
        return Path(str(packed))
    return Path(__file__).resolve().parents[2] / "schemas"


@dataclass(frozen=True)
class Schema:
    """A parsed Avro schema with its single-object fingerprint."""

    name: str
    parsed: Any
    canonical: str
    #: 8 bytes, little-endian CRC-64-AVRO, as it appears in the single-object header.
    fingerprint: bytes

    @property
    def header(self) -> bytes:
        return SINGLE_OBJECT_MAGIC + self.fingerprint


def load_schema(filename: str) -> Schema:
    raw = json.loads((_schema_dir() / filename).read_text(encoding="utf-8"))
    parsed = fastavro.parse_schema(raw)
    canonical = to_parsing_canonical_form(raw)
    # fastavro returns the fingerprint as hex of the little-endian bytes (checked against an
    # independent CRC-64-AVRO implementation in tests/unit/test_records.py).
    fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    return Schema(name=raw["namespace"] + "." + raw["name"], parsed=parsed, canonical=canonical, fingerprint=fp)


@cache
def mail_schema() -> Schema:
    return load_schema(MAIL_SCHEMA_FILE)


def record_id(mailbox_id: str, uidl: str) -> str:
    """Stable id of a mail: mailbox ids cannot contain ':', so the first ':' splits it."""
    return f"{mailbox_id}:{uidl}"


@dataclass(frozen=True)
class Provenance:
    mailbox_id: str
    uidl: str
    server: str
    fetched_at_millis: int
    raw_size: int
    raw_sha256: str


def _addresses(items: tuple[Address, ...]) -> list[dict[str, str]]:
    return [{"name": a.name, "address": a.address} for a in items]


def _summary(m: MessageSummary | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {
        "message_id": m.message_id,
        "subject": m.subject,
        "from": _addresses(m.from_),
        "to": _addresses(m.to),
        "date": m.date_millis,
        "date_raw": m.date_raw,
    }


def _attachment(a: Attachment, data: bytes | None = None, ref: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "filename": a.filename,
        "content_type": a.content_type,
        "disposition": a.disposition,
        "content_id": a.content_id,
        "size": a.size,
        "sha256": a.sha256,
        "part": a.part,
        "kind": a.kind,
        "message": _summary(a.message),
        "data": data,
        "ref": ref,
    }


class PlacedContent(Protocol):
    """Where one content went (connector/runtime/placement.py): inline bytes, a ContentRef
    (anything with ``record()``), or neither."""

    @property
    def data(self) -> bytes | None: ...
    @property
    def ref(self) -> Any: ...


def _millis(moment: datetime | None) -> int | None:
    """timestamp-millis as the other fields of the record carry it (an int, not a datetime)."""
    return None if moment is None else round(moment.timestamp() * 1000)


def _signature(check: SignatureCheck) -> dict[str, Any]:
    return {
        "layer": check.layer,
        "type": check.type,
        "verdict": check.verdict,
        "reason": check.reason,
        "detail": check.detail,
        "verified_at": _millis(check.verified_at),
        "signers": [
            {
                "subject": s.subject,
                "issuer": s.issuer,
                "serial": s.serial,
                "sha256": s.sha256,
                "emails": list(s.emails),
                "not_before": _millis(s.not_before),
                "not_after": _millis(s.not_after),
                "signing_time": _millis(s.signing_time),
                "digest_algorithm": s.digest_algorithm,
                "signature_algorithm": s.signature_algorithm,
                "verdict": s.verdict,
                "reason": s.reason,
                "detail": s.detail,
            }
            for s in check.signers
        ],
    }


def build_mail_record(
    mail: DecodedMail,
    prov: Provenance,
    placed: Sequence[PlacedContent] | None = None,
    raw: PlacedContent | None = None,
) -> dict[str, Any]:
    """The MailRecord (schemas/mail_record.avsc) as a dict ready for fastavro.

    ``placed``: per attachment, in order, where its bytes went (None: metadata only);
    ``raw``: where the raw mail went (raw_mail: include, or a mail that is not MIME-decoded).
    """
    atts = (
        [
            _attachment(a, p.data, p.ref.record() if p.ref is not None else None)
            for a, p in zip(mail.attachments, placed, strict=True)
        ]
        if placed is not None
        else [_attachment(a) for a in mail.attachments]
    )
    if raw is not None:
        raw_data, raw_ref = raw.data, (raw.ref.record() if raw.ref is not None else None)
    else:
        raw_data, raw_ref = (None if mail.raw is None else bytes(mail.raw)), None
    return {
        "record_id": record_id(prov.mailbox_id, prov.uidl),
        "provenance": {
            "mailbox_id": prov.mailbox_id,
            "uidl": prov.uidl,
            "server": prov.server,
            "fetched_at": prov.fetched_at_millis,
            "raw_size": prov.raw_size,
            "raw_sha256": prov.raw_sha256,
            "connector_version": __version__,
        },
        "message_id": mail.message_id,
        "subject": mail.subject,
        "date": mail.date_millis,
        "date_raw": mail.date_raw,
        "from": _addresses(mail.from_),
        "to": _addresses(mail.to),
        "cc": _addresses(mail.cc),
        "headers": [{"name": h.name, "value": h.value, "raw": h.raw} for h in mail.headers],
        "text_body": mail.text_body,
        "html_body": mail.html_body,
        "attachments": atts,
        "decode_warnings": list(mail.warnings),
        "in_reply_to": mail.in_reply_to,
        "references": list(mail.references),
        "sender": {"name": mail.sender.name, "address": mail.sender.address} if mail.sender else None,
        "reply_to": _addresses(mail.reply_to),
        "bcc": _addresses(mail.bcc),
        "address_groups": [{"field": g.field, "name": g.name, "members": _addresses(g.members)} for g in mail.groups],
        "parts": [
            {
                "path": p.path,
                "depth": p.depth,
                "content_type": p.content_type,
                "params": dict(p.params),
                "disposition": p.disposition,
                "filename": p.filename,
                "content_id": p.content_id,
                "transfer_encoding": p.transfer_encoding,
                "size": p.size,
                "sha256": p.sha256,
                "role": p.role,
                "kind": p.kind,
            }
            for p in mail.parts
        ],
        "smime": (
            None
            if mail.smime is None
            else {
                "encrypted": mail.smime.encrypted,
                "decrypted": mail.smime.decrypted,
                "key": mail.smime.key,
                "cipher": mail.smime.cipher,
                "signed": mail.smime.signed,
                "signature_type": mail.smime.signature_type,
                "passthrough": mail.smime.passthrough,
                "signatures": [_signature(c) for c in mail.smime.signatures],
            }
        ),
        "body": (
            None
            if mail.body is None
            else {
                "path": mail.body.path,
                "content_type": mail.body.content_type,
                "text": mail.body.text,
                "data": mail.body.data,
            }
        ),
        "mime_decoded": mail.mime_decoded,
        "raw": raw_data,
        "raw_ref": raw_ref,
    }


# --------------------------------------------------------------------------- hand-made bodies
#
# Two records are written so often that fastavro's per-field work shows in a profile: the mail
# record of a mail published without MIME decoding (every field but four is empty) and the
# ledger entry (one per mail). Both are written here directly in Avro's binary encoding (Avro
# spec, "Binary Encoding": zig-zag varints, length-prefixed UTF-8 and bytes, a union as its
# branch index then the value, an enum as its index). Byte-identical output to fastavro's is
# checked over generated inputs in tests/unit/test_avro_direct.py; the mail record's constant
# middle is taken from fastavro itself, so a field added there with an empty default follows.


def avro_long(n: int) -> bytes:
    """An Avro int or long: zig-zag, then 7 bits per byte, low group first."""
    z = (n << 1) ^ (n >> 63)
    if z < 0x80:
        return _SMALL[z]
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_SMALL = tuple(bytes((i,)) for i in range(0x80))


def avro_string(s: str) -> bytes:
    """An Avro string: its UTF-8 length, then the UTF-8 (a lone surrogate raises ValueError)."""
    b = s.encode()
    return avro_long(len(b)) + b


def avro_optional_string(s: str | None) -> bytes:
    """A ["null", "string"] union."""
    return b"\x00" if s is None else b"\x02" + avro_string(s)


def avro_optional_long(n: int | None) -> bytes:
    """A ["null", "long"] (or "int") union."""
    return b"\x00" if n is None else b"\x02" + avro_long(n)


def _provenance_body(prov: Provenance) -> bytes:
    return b"".join(
        (
            avro_string(prov.mailbox_id),
            avro_string(prov.uidl),
            avro_string(prov.server),
            avro_long(prov.fetched_at_millis),
            avro_long(prov.raw_size),
            avro_string(prov.raw_sha256),
            avro_string(__version__),
        )
    )


#: what follows record_id and provenance in a passthrough record, up to mime_decoded (see below).
_PASSTHROUGH_TAIL = b"\x00\x02"  # mime_decoded false, then raw's "bytes" branch


@cache
def _passthrough_middle() -> bytes | None:
    """The fields between provenance and mime_decoded of a passthrough record, all empty: the
    same bytes for every such record, so taken once from fastavro. None (the direct path off,
    fastavro used for every record) if the schema no longer has the shape assumed here."""
    prov = Provenance("m", "u", "s", 0, 0, "")
    empty = DecodedMail(
        message_id=None, subject=None, date_raw=None, date_millis=None, from_=(), to=(), cc=(), headers=(),
        text_body=None, html_body=None, attachments=(), warnings=(), mime_decoded=False, raw=b"",
    )  # fmt: skip
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, mail_schema().parsed, build_mail_record(empty, prov), strict=True)
    whole = buf.getvalue()
    head = avro_string(record_id("m", "u")) + _provenance_body(prov)
    tail = _PASSTHROUGH_TAIL + b"\x00" + b"\x00"  # raw of length 0, raw_ref null
    if not (whole.startswith(head) and whole.endswith(tail)):
        return None
    return whole[len(head) : len(whole) - len(tail)]


def encode_passthrough(header: bytes, prov: Provenance, raw: bytes) -> bytes | None:
    """``header`` then the mail record of a mail published as it came (mime_decoding: false)
    with its raw bytes inline: what :func:`build_mail_record` and :func:`encode_with_header`
    make of it, byte for byte, in a fraction of the time. None when the schema's shape is not
    the one this knows (the caller then takes the general path)."""
    middle = _passthrough_middle()
    if middle is None:
        return None
    try:
        rid = avro_string(record_id(prov.mailbox_id, prov.uidl))
        body = _provenance_body(prov)
    except ValueError as exc:  # a string that is not UTF-8 encodable: as fastavro would refuse it
        raise _schema_mismatch(mail_schema(), exc) from exc
    return b"".join((header, rid, body, middle, _PASSTHROUGH_TAIL, avro_long(len(raw)), raw, b"\x00"))


def _schema_mismatch(schema: Schema, exc: Exception) -> DecodeError:
    """A record that does not fit ``schema`` (the exception's class only: its message may
    quote mail content)."""
    text = f"record does not match schema {schema.name}: {type(exc).__name__}"
    return DecodeError(text, stage="record", reason="schema")


def encode_single_object(schema: Schema, record: dict[str, Any]) -> bytes:
    """Serialise ``record`` with the single-object header."""
    return encode_with_header(schema.header, schema, record)


def encode_with_header(header: bytes, schema: Schema, record: dict[str, Any]) -> bytes:
    """``header`` then the Avro binary body of ``record``: the one encoding path of every framing
    (connector/records/framing.py), so both framings carry byte-identical bodies."""
    buf = io.BytesIO()
    buf.write(header)
    try:
        fastavro.schemaless_writer(buf, schema.parsed, record, strict=True)
    except (ValueError, TypeError, KeyError) as exc:
        # A decoded value that does not fit the schema is a decoding bug for this mail:
        # dead-letter material, never a crash of the cycle.
        raise _schema_mismatch(schema, exc) from exc
    return buf.getvalue()


class UnknownSchemaError(ValueError):
    """A single-object frame names a schema fingerprint we do not know."""


def decode_single_object(data: bytes, schemas: dict[bytes, Schema] | None = None) -> dict[str, Any]:
    """Inverse of :func:`encode_single_object`, resolving the writer schema by fingerprint."""
    if len(data) < 10 or data[:2] != SINGLE_OBJECT_MAGIC:
        raise ValueError("not an Avro single-object encoded value (missing C3 01 header)")
    known = schemas or {mail_schema().fingerprint: mail_schema()}
    fp = data[2:10]
    if fp not in known:
        raise UnknownSchemaError(f"unknown schema fingerprint {fp.hex()}; is schemas/ up to date?")
    schema = known[fp]
    result = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema.parsed, None)
    if not isinstance(result, dict):
        raise ValueError(f"schema {schema.name} is not a record schema")
    return result
