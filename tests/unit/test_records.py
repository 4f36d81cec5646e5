"""Records: schema, Avro single-object framing, record ids."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fastavro
import pytest

from connector.decoding.model import Address, Attachment, DecodedMail, Header
from connector.errors import DecodeError
from connector.records import (
    Provenance,
    UnknownSchemaError,
    build_mail_record,
    decode_single_object,
    encode_single_object,
    mail_schema,
)

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schemas" / "mail_record.avsc"


def crc64_avro(data: bytes) -> int:
    """Independent CRC-64-AVRO, straight from the Avro specification's reference code."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for b in data:
        fp = (fp >> 8) ^ table[(fp ^ b) & 0xFF]
    return fp


def sample() -> tuple[DecodedMail, Provenance]:
    mail = DecodedMail(
        message_id="<m1@x>",
        subject="Grüße",
        date_raw="Thu, 01 Jan 2026 09:00:00 +0000",
        date_millis=1767258000000,
        from_=(Address("Jürgen", "j@example.de"),),
        to=(Address("", "o@example.org"),),
        cc=(),
        headers=(Header("Subject", "=?utf-8?q?x?=", "x"),),
        text_body="hi\r\n",
        html_body=None,
        attachments=(Attachment("a.pdf", "application/pdf", "attachment", None, 3, "ab" * 32, b"abc"),),
        warnings=("bad charset",),
    )
    prov = Provenance("orders", "00000001abc", "pop:995", 1767258000123, 1234, "cd" * 32)
    return mail, prov


def test_round_trip_and_frame() -> None:
    mail, prov = sample()
    value = encode_single_object(mail_schema(), build_mail_record(mail, prov))
    assert value[:2] == b"\xc3\x01"
    rec = decode_single_object(value)
    assert rec["record_id"] == "orders:00000001abc"
    assert rec["subject"] == "Grüße" and rec["from"] == [{"name": "Jürgen", "address": "j@example.de"}]
    assert rec["attachments"][0]["sha256"] == "ab" * 32 and rec["attachments"][0]["size"] == 3
    assert rec["provenance"]["connector_version"]
    assert rec["decode_warnings"] == ["bad charset"]


def test_fingerprint_is_crc64_avro_little_endian_of_canonical_form() -> None:
    s = mail_schema()
    assert s.fingerprint == crc64_avro(s.canonical.encode()).to_bytes(8, "little")


def test_frame_decodes_with_plain_fastavro_and_the_schema_file() -> None:
    """What a consumer without our package does (docs/record.md)."""
    mail, prov = sample()
    value = encode_single_object(mail_schema(), build_mail_record(mail, prov))
    schema = fastavro.parse_schema(json.loads(SCHEMA_FILE.read_text()))
    rec = fastavro.schemaless_reader(io.BytesIO(value[10:]), schema, None)
    assert rec["record_id"] == "orders:00000001abc"


def test_every_field_is_documented() -> None:
    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("type") == "record":
                for f in node["fields"]:
                    assert f.get("doc"), f"field {f['name']} of {node['name']} has no doc"
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(SCHEMA_FILE.read_text()))


def test_bad_frames() -> None:
    with pytest.raises(ValueError, match="C3 01"):
        decode_single_object(b"nope-nope-nope")
    with pytest.raises(UnknownSchemaError):
        decode_single_object(b"\xc3\x01" + b"\x00" * 8 + b"\x02")


def test_value_not_fitting_schema_is_a_decode_error() -> None:
    mail, prov = sample()
    rec = build_mail_record(mail, prov)
    rec["subject"] = 42
    with pytest.raises(DecodeError):
        encode_single_object(mail_schema(), rec)
