"""connector/consumer.py: decoding every framing and schema version, chunk reassembly,
offloaded content, and writing attachments safely."""

from __future__ import annotations

import datetime as dt
import doctest
import gc
import hashlib
import io
import json
import logging
import os
import random
import stat
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import fastavro
import pytest

import connector.consumer as consumer_module
from connector.consumer import (
    ChunkAssembler,
    CompletedContent,
    ConsumerError,
    ContentTooLarge,
    ContentUnavailable,
    IntegrityError,
    MalformedRecord,
    NotOurRecord,
    UnknownSchema,
    attachment_summary,
    decode_value,
    fetch_offloaded,
    known_schemas,
    placement,
    safe_filename,
    write_attachments,
)
from connector.delivery.offload import FilesystemStore
from connector.records.avro import _schema_dir, load_schema
from connector.records.content import ChunkHeader, chunk_count, encode_chunk

SCHEMAS = _schema_dir()
MAIL_V1, MAIL_V2, MAIL_V3 = "history/mail_record.v1.avsc", "history/mail_record.v2.avsc", "history/mail_record.v3.avsc"
MAIL_V4 = "mail_record.avsc"
DLQ_V1, DLQ_V2 = "history/dead_letter.v1.avsc", "dead_letter.avsc"
T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def body(schema_file: str, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, load_schema(schema_file).parsed, record, strict=True)
    return buf.getvalue()


def frame(schema_file: str, record: dict[str, Any]) -> bytes:
    """A single-object value written with exactly that schema file (old versions included)."""
    return load_schema(schema_file).header + body(schema_file, record)


def provenance() -> dict[str, Any]:
    return {
        "mailbox_id": "mb",
        "uidl": "u1",
        "server": "pop.example.net:995",
        "fetched_at": T0,
        "raw_size": 123,
        "raw_sha256": sha(b"raw"),
        "connector_version": "0.1.0",
    }


def mail_v1() -> dict[str, Any]:
    return {
        "record_id": "mb:u1",
        "provenance": provenance(),
        "message_id": "<m1@example.net>",
        "subject": "quarterly report",
        "date": T0,
        "date_raw": "Wed, 1 May 2024 12:00:00 +0000",
        "from": [{"name": "Alice", "address": "alice@example.net"}],
        "to": [{"name": "", "address": "bob@example.net"}],
        "cc": [],
        "headers": [{"name": "Subject", "value": "quarterly report", "raw": "quarterly report"}],
        "text_body": "see attached",
        "html_body": None,
        "attachments": [
            {
                "filename": "report.pdf",
                "content_type": "application/pdf",
                "disposition": "attachment",
                "content_id": None,
                "size": 3,
                "sha256": sha(b"pdf"),
            }
        ],
        "decode_warnings": [],
    }


def mail_v2() -> dict[str, Any]:
    rec = mail_v1()
    rec["attachments"][0].update({"part": "2", "kind": None, "message": None})
    rec.update(
        {
            "in_reply_to": "<m0@example.net>",
            "references": ["<m0@example.net>"],
            "sender": None,
            "reply_to": [],
            "bcc": [],
            "address_groups": [],
            "parts": [
                {
                    "path": "",
                    "depth": 0,
                    "content_type": "multipart/mixed",
                    "params": {"boundary": "b"},
                    "disposition": None,
                    "filename": None,
                    "content_id": None,
                    "transfer_encoding": None,
                    "size": 0,
                    "sha256": None,
                    "role": "container",
                    "kind": None,
                }
            ],
            "smime": None,
            "body": None,
            "mime_decoded": False,
            "raw": b"Subject: quarterly report\r\n\r\nsee attached\r\n",
        }
    )
    return rec


def ref(content_id: str, data: bytes, placement_: str, **kw: Any) -> dict[str, Any]:
    return {
        "id": content_id,
        "placement": placement_,
        "size": len(data),
        "sha256": sha(data),
        "topic": kw.get("topic"),
        "chunks": kw.get("chunks"),
        "chunk_bytes": kw.get("chunk_bytes"),
        "uri": kw.get("uri"),
    }


def attachment(data: bytes, *, filename: str | None, part: str | None, **kw: Any) -> dict[str, Any]:
    return {
        "filename": filename,
        "content_type": kw.get("content_type", "application/octet-stream"),
        "disposition": "attachment",
        "content_id": None,
        "size": len(data),
        "sha256": sha(data),
        "part": part,
        "kind": None,
        "message": None,
        "data": kw.get("inline"),
        "ref": kw.get("ref"),
    }


def mail_v3(attachments: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rec = mail_v2()
    rec["attachments"] = attachments if attachments is not None else [attachment(b"pdf", filename="a.pdf", part="2")]
    rec.update({"mime_decoded": True, "raw": None, "raw_ref": None})
    return rec


def dead_letter_v1() -> dict[str, Any]:
    return {
        "record_id": "mb:u9",
        "provenance": provenance(),
        "stage": "mime",
        "reason": "structure",
        "error_class": "connector.errors.DecodeError",
        "error_message": "boundary never closed",
        "failed_at": T0,
        "raw": b"Subject: broken\r\n",
    }


# ------------------------------------------------------------------------ decode_value


def test_every_schema_file_is_known_with_its_version() -> None:
    got = {(k.file, k.version, k.current) for k in known_schemas()}
    assert (MAIL_V1, 1, False) in got and (MAIL_V2, 2, False) in got and (MAIL_V3, 3, False) in got
    assert (MAIL_V4, 4, True) in got
    assert (DLQ_V1, 1, False) in got and (DLQ_V2, 2, True) in got
    assert ("attachment_chunk.avsc", 1, True) in got
    on_disk = {p.relative_to(SCHEMAS).as_posix() for p in SCHEMAS.rglob("*.avsc")}
    assert {k.file for k in known_schemas()} == on_disk


def test_mail_v1_is_read_into_the_current_schema_with_defaults() -> None:
    d = decode_value(frame(MAIL_V1, mail_v1()))
    assert (d.kind, d.schema_version, d.schema_name, d.framing) == (
        "mail",
        1,
        "io.pop3kafka.MailRecord",
        "single_object",
    )
    r = d.record
    assert d.record_id == "mb:u1" and r["subject"] == "quarterly report" and r["date"] == T0
    # v2 defaults
    assert r["parts"] == [] and r["references"] == [] and r["mime_decoded"] is True and r["raw"] is None
    # v3 defaults, top level and inside attachments[]
    assert r["raw_ref"] is None
    att = r["attachments"][0]
    assert att["filename"] == "report.pdf" and att["part"] is None
    assert att["data"] is None and att["ref"] is None and placement(att) == "none"


def test_mail_v2_keeps_its_fields_and_gets_v3_defaults() -> None:
    d = decode_value(frame(MAIL_V2, mail_v2()))
    assert d.kind == "mail" and d.schema_version == 2
    r = d.record
    assert r["parts"][0]["params"] == {"boundary": "b"} and r["mime_decoded"] is False
    assert r["raw"] == b"Subject: quarterly report\r\n\r\nsee attached\r\n" and r["raw_ref"] is None
    assert r["attachments"][0]["part"] == "2" and r["attachments"][0]["ref"] is None
    assert r["attachments"][0]["data"] is None


def test_mail_v3_round_trips_inline_chunked_and_offloaded_attachments() -> None:
    big = b"x" * 5000
    atts = [
        attachment(b"hello", filename="a.txt", part="2", inline=b"hello", content_type="text/plain"),
        attachment(big, filename="b.bin", part="3", ref=ref("mb:u1/3", big, "chunked", topic="t", chunks=3)),
        attachment(big, filename="c.bin", part="4", ref=ref("mb:u1/4", big, "offload", uri="file:///x/sha256/ab")),
    ]
    rec = mail_v3(atts)
    rec["raw_ref"] = ref("mb:u1/raw", b"raw", "chunked", chunks=1)
    d = decode_value(frame(MAIL_V3, rec))
    assert d.schema_version == 3 and d.record == rec
    assert [placement(a) for a in d.record["attachments"]] == ["inline", "chunked", "offload"]
    summary = attachment_summary(d.record)
    assert summary[0] == {
        "filename": "a.txt",
        "content_type": "text/plain",
        "size": 5,
        "sha256": sha(b"hello")[:12],
        "placement": "inline",
    }
    assert summary[1]["content_id"] == "mb:u1/3" and summary[2]["placement"] == "offload"


def test_dead_letters_v1_and_v2() -> None:
    d1 = decode_value(frame(DLQ_V1, dead_letter_v1()))
    assert (d1.kind, d1.schema_version) == ("dead_letter", 1)
    assert d1.record["raw"] == b"Subject: broken\r\n" and d1.record["raw_ref"] is None
    assert d1.record["failed_at"] == T0

    v2 = {**dead_letter_v1(), "raw": b"", "raw_ref": ref("mb:u9/raw", b"R" * 10, "offload", uri="s3://b/sha256/x")}
    d2 = decode_value(frame(DLQ_V2, v2))
    assert (d2.kind, d2.schema_version) == ("dead_letter", 2)
    assert d2.record["raw_ref"]["placement"] == "offload" and d2.record["raw_ref"]["size"] == 10


def test_dead_letter_written_by_the_connector_decodes() -> None:
    from connector.errors import DecodeError
    from connector.records.avro import Provenance
    from connector.records.dead_letter import DeadLetter

    prov = Provenance("mb", "u2", "pop:995", 1_700_000_000_000, 5, sha(b"bytes"))
    dl = DeadLetter.of(DecodeError("bad", stage="mime", reason="x"), prov, b"bytes", 1_700_000_000_001)
    d = decode_value(dl.encode())
    assert d.kind == "dead_letter" and d.schema_version == 2 and d.record["raw"] == b"bytes"
    assert d.record_id == "mb:u2"


def test_chunk_records_decode() -> None:
    h = ChunkHeader("mb:u1", "mb", "mb:u1/2", 2, 7, sha(b"abcdefg"))
    value, headers = encode_chunk(h, 1, 4, b"efg")
    d = decode_value(value)
    assert d.kind == "chunk" and d.schema_version == 1
    assert (d.record["index"], d.record["offset"], d.record["data"]) == (1, 4, b"efg")
    assert ("pop3kafka.chunk", b"1/2") in headers


class FakeSchema:
    def __init__(self, schema_str: str, schema_type: str | None = "AVRO") -> None:
        self.schema_str = schema_str
        self.schema_type = schema_type


class FakeRegistry:
    def __init__(self, schemas: dict[int, FakeSchema]) -> None:
        self.schemas = schemas
        self.calls: list[int] = []

    def get_schema(self, schema_id: int) -> FakeSchema:
        self.calls.append(schema_id)
        if schema_id not in self.schemas:
            raise LookupError(f"Schema {schema_id} not found (40403)")
        return self.schemas[schema_id]


def wire(schema_id: int, payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", schema_id) + payload


def schema_text(file: str) -> str:
    return (SCHEMAS / file).read_text()


def test_registry_framing_resolves_old_versions_and_caches_per_id() -> None:
    reg = FakeRegistry({7: FakeSchema(schema_text(MAIL_V1)), 8: FakeSchema(schema_text(MAIL_V3))})
    v1 = wire(7, body(MAIL_V1, mail_v1()))
    d = decode_value(v1, registry=reg)
    assert (d.kind, d.schema_version, d.framing, d.schema_id) == ("mail", 1, "registry", 7)
    assert d.record["parts"] == [] and d.record["attachments"][0]["ref"] is None
    decode_value(v1, registry=reg)
    rec = mail_v3()
    d3 = decode_value(wire(8, body(MAIL_V3, rec)), registry=reg)
    assert d3.schema_version == 3 and d3.record == rec
    assert reg.calls == [7, 8]  # the second id-7 value came from the cache


def test_registry_schema_of_an_unknown_newer_version_still_decodes() -> None:
    newer = json.loads(schema_text(MAIL_V4))
    newer["fields"].append({"name": "future", "type": ["null", "string"], "default": None})
    reg = FakeRegistry({3: FakeSchema(json.dumps(newer))})
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(newer), {**mail_v3(), "future": "x"})
    d = decode_value(wire(3, buf.getvalue()), registry=reg)
    assert d.kind == "mail" and d.schema_version is None and "future" not in d.record
    assert d.record["subject"] == "quarterly report"


def test_registry_errors_are_typed() -> None:
    payload = body(MAIL_V1, mail_v1())
    with pytest.raises(UnknownSchema, match="no registry was given"):
        decode_value(wire(7, payload))
    reg = FakeRegistry({})
    with pytest.raises(UnknownSchema, match=r"schema id 9 failed.*40403"):
        decode_value(wire(9, payload), registry=reg)
    foreign = {"type": "record", "name": "Order", "namespace": "shop", "fields": [{"name": "id", "type": "int"}]}
    reg = FakeRegistry({1: FakeSchema(json.dumps(foreign)), 2: FakeSchema("syntax = 'proto3';", "PROTOBUF")})
    with pytest.raises(NotOurRecord, match=r"shop\.Order"):
        decode_value(wire(1, b"\x02"), registry=reg)
    with pytest.raises(NotOurRecord, match="PROTOBUF"):
        decode_value(wire(2, b"\x02"), registry=reg)
    with pytest.raises(NotOurRecord):
        decode_value(wire(1, b"\x02"), registry=reg)
    assert reg.calls == [1, 2]  # "not ours" is cached too


def test_unknown_fingerprint_garbage_and_tombstones_are_typed_errors() -> None:
    with pytest.raises(UnknownSchema, match="unknown schema fingerprint 0102030405060708"):
        decode_value(b"\xc3\x01" + bytes(range(1, 9)) + b"\x00")
    for value in (None, b""):
        with pytest.raises(NotOurRecord, match="empty value"):
            decode_value(value)
    with pytest.raises(NotOurRecord, match="neither Avro single-object"):
        decode_value(b'{"json": true}')
    with pytest.raises(NotOurRecord, match="too short"):
        decode_value(b"\xc3\x01\x00")
    good = frame(MAIL_V3, mail_v3())
    with pytest.raises(MalformedRecord, match="MailRecord"):
        decode_value(good[:40])
    with pytest.raises(MalformedRecord, match="left over"):
        decode_value(good + b"\x00\x00")
    ledger = load_schema("ledger_entry.avsc")
    with pytest.raises(NotOurRecord, match=r"LedgerEntry.*ledger"):
        decode_value(ledger.header + b"\x00")
    rng = random.Random(5)
    for _ in range(200):  # random bodies behind a valid header never escape as other exceptions
        junk = load_schema(MAIL_V3).header + rng.randbytes(rng.randrange(0, 64))
        with pytest.raises(ConsumerError):
            decode_value(junk)
    assert issubclass(ConsumerError, ValueError)


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(consumer_module)
    assert result.attempted >= 8 and result.failed == 0


# ------------------------------------------------------------------------ ChunkAssembler


def chunk_values(
    data: bytes, chunk_bytes: int, content_id: str = "mb:u1/2", *, sha256: str | None = None, total: int | None = None
) -> list[bytes]:
    n = chunk_count(len(data), chunk_bytes)
    h = ChunkHeader(
        content_id.rpartition("/")[0], "mb", content_id, n, len(data) if total is None else total, sha256 or sha(data)
    )
    return [encode_chunk(h, i, i * chunk_bytes, data[i * chunk_bytes : (i + 1) * chunk_bytes])[0] for i in range(n)]


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_random_order_with_duplicates_completes_once(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(10_000)
    values = chunk_values(data, 700)
    assert len(values) == 15
    feed = values + values[3:9] + [values[0]]
    random.Random(2).shuffle(feed)
    asm = ChunkAssembler(tmp_path / "work")
    results = [asm.add(v) for v in feed]
    done = [r for r in results if r is not None]
    assert len(done) == 1
    c = done[0]
    assert isinstance(c, CompletedContent)
    assert (c.content_id, c.record_id, c.size, c.sha256) == ("mb:u1/2", "mb:u1", 10_000, sha(data))
    assert c.path is not None and c.path.read_bytes() == data
    assert stat.S_IMODE(c.path.stat().st_mode) == 0o600
    assert files_in(tmp_path / "work") == [c.path.name] and "/" not in c.path.name
    assert asm.pending() == [] and asm.completed("mb:u1/2") == c
    # a late duplicate of a completed content is ignored, not assembled again
    assert asm.add(values[4]) is None and asm.pending() == []


def test_chunk_dicts_and_decoded_records_are_accepted(tmp_path: Path) -> None:
    data = b"0123456789"
    values = chunk_values(data, 4)
    asm = ChunkAssembler(tmp_path)
    assert asm.add(decode_value(values[2]).record) is None
    assert asm.add(decode_value(values[0])) is None
    done = asm.add(values[1])
    assert done is not None and done.path is not None and done.path.read_bytes() == data
    with pytest.raises(NotOurRecord, match="not an attachment chunk"):
        asm.add(frame(MAIL_V1, mail_v1()))


def test_conflicting_duplicate_raises_and_keeps_the_content(tmp_path: Path) -> None:
    data = bytes(100)
    values = chunk_values(data, 40)
    asm = ChunkAssembler(tmp_path)
    asm.add(values[1])
    forged = chunk_values(b"\x00" * 40 + b"\xff" * 40 + b"\x00" * 20, 40, sha256=sha(data))
    with pytest.raises(IntegrityError, match="chunk 1 of mb:u1/2 arrived twice with different content"):
        asm.add(forged[1])
    assert [p.received for p in asm.pending()] == [1]
    asm.add(values[0])
    done = asm.add(values[2])
    assert done is not None and done.path is not None and done.path.read_bytes() == data


def test_missing_chunk_stays_pending_in_a_private_temp_file(tmp_path: Path) -> None:
    data = b"a" * 1000
    values = chunk_values(data, 100)
    asm = ChunkAssembler(tmp_path)
    for i, v in enumerate(values):
        if i != 6:
            assert asm.add(v) is None
    (p,) = asm.pending()
    assert (p.content_id, p.record_id, p.count, p.received, p.bytes_received, p.total_size, p.expected) == (
        "mb:u1/2",
        "mb:u1",
        10,
        9,
        900,
        1000,
        False,
    )
    assert asm.missing("mb:u1/2") == [6]
    (tmp,) = list(tmp_path.iterdir())
    assert tmp.name.endswith(".part") and stat.S_IMODE(tmp.stat().st_mode) == 0o600
    assert asm.discard("mb:u1/2") is True and asm.pending() == [] and files_in(tmp_path) == []
    assert asm.discard("mb:u1/2") is False


def test_sha_mismatch_raises_and_deletes_the_file(tmp_path: Path) -> None:
    data = b"payload" * 100
    values = chunk_values(data, 64, sha256=sha(b"something else"))
    asm = ChunkAssembler(tmp_path)
    for v in values[:-1]:
        asm.add(v)
    with pytest.raises(IntegrityError, match="reassembled 700 bytes with sha256"):
        asm.add(values[-1])
    assert files_in(tmp_path) == [] and asm.pending() == [] and asm.completed("mb:u1/2") is None


def test_inconsistent_chunk_metadata_is_refused(tmp_path: Path) -> None:
    asm = ChunkAssembler(tmp_path)
    data = b"z" * 30
    asm.add(chunk_values(data, 10)[0])
    with pytest.raises(IntegrityError, match="disagrees with the earlier chunks"):
        asm.add(chunk_values(b"y" * 30, 10)[1])
    with pytest.raises(IntegrityError, match="do not fit in total_size"):
        asm.add(chunk_values(b"q" * 30, 10, "mb:u2/1", total=15)[2])
    h = ChunkHeader("mb:u3", "mb", "mb:u3/1", 2, 4, sha(b"abcd"))
    asm.add(encode_chunk(h, 0, 0, b"ab")[0])
    with pytest.raises(IntegrityError, match="overlaps or gaps"):
        asm.add(encode_chunk(h, 1, 1, b"bcd")[0])
    with pytest.raises(IntegrityError, match=r"outside 0\.\.count-1"):
        asm.add(encode_chunk(h, 2, 2, b"cd")[0])


def test_empty_content_is_one_empty_chunk(tmp_path: Path) -> None:
    (value,) = chunk_values(b"", 512)
    done = ChunkAssembler(tmp_path).add(value)
    assert done is not None and done.size == 0 and done.sha256 == sha(b"")
    assert done.path is not None and done.path.read_bytes() == b""


def test_expect_checks_the_content_ref(tmp_path: Path) -> None:
    data = b"k" * 50
    values = chunk_values(data, 20)
    asm = ChunkAssembler(tmp_path)
    good = ref("mb:u1/2", data, "chunked", chunks=3, chunk_bytes=20)
    assert asm.expect(good) is None
    asm.add(values[0])
    assert asm.pending()[0].expected is True
    asm.add(values[2])
    done = asm.add(values[1])
    assert done is not None and asm.expect(good) == done  # already complete: returned
    with pytest.raises(IntegrityError, match="ContentRef mb:u1/2 says 51 bytes"):
        asm.expect(ref("mb:u1/2", data + b"!", "chunked", chunks=3))

    asm.expect(ref("mb:u4/2", b"other", "chunked", chunks=1))
    with pytest.raises(IntegrityError, match="its ContentRef says 5 bytes"):
        asm.add(chunk_values(b"other!", 20, "mb:u4/2")[0])
    assert asm.pending() == [] and [p.name for p in tmp_path.iterdir() if p.suffix == ".part"] == []
    with pytest.raises(ValueError, match="not chunked"):
        asm.expect(ref("mb:u5/2", b"x", "offload", uri="file:///x"))


def test_max_open_drops_the_oldest_incomplete_content(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    asm = ChunkAssembler(tmp_path, max_open=2)
    contents = {f"mb:u{i}/2": bytes([i]) * 30 for i in range(3)}
    first = {cid: chunk_values(data, 10, cid) for cid, data in contents.items()}
    with caplog.at_level(logging.WARNING, "pop3kafka.consumer"):
        for cid in contents:
            asm.add(first[cid][0])
    assert [p.content_id for p in asm.pending()] == ["mb:u1/2", "mb:u2/2"]
    assert asm.dropped == 1
    assert any("dropping incomplete content mb:u0/2" in r.getMessage() for r in caplog.records)
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".part"]) == 2
    for v in first["mb:u2/2"][1:]:
        done = asm.add(v)
    assert done is not None and done.path is not None and done.path.read_bytes() == contents["mb:u2/2"]


def test_max_pending_bytes_bounds_declared_sizes(tmp_path: Path) -> None:
    asm = ChunkAssembler(tmp_path, max_pending_bytes=100)
    with pytest.raises(ContentTooLarge, match="101 bytes"):
        asm.add(chunk_values(b"x" * 101, 50, "mb:big/2")[0])
    asm.add(chunk_values(b"a" * 60, 20, "mb:a/2")[0])
    asm.add(chunk_values(b"b" * 60, 20, "mb:b/2")[0])  # 120 > 100: drops mb:a/2
    assert [p.content_id for p in asm.pending()] == ["mb:b/2"] and asm.dropped == 1


def test_close_removes_temp_files(tmp_path: Path) -> None:
    with ChunkAssembler(tmp_path) as asm:
        asm.add(chunk_values(b"a" * 60, 20)[0])
        assert len(list(tmp_path.iterdir())) == 1
    assert files_in(tmp_path) == []


def test_memory_stays_bounded_for_a_64_mib_content(tmp_path: Path) -> None:
    chunk, count = 512 * 1024, 128  # 64 MiB

    def piece(i: int) -> bytes:
        return random.Random(i).randbytes(chunk)

    h = hashlib.sha256()
    for i in range(count):
        h.update(piece(i))
    header = ChunkHeader("mb:big", "mb", "mb:big/2", count, chunk * count, h.hexdigest())
    order = list(range(count))
    random.Random(3).shuffle(order)
    asm = ChunkAssembler(tmp_path)
    gc.collect()
    tracemalloc.start()
    try:
        done = None
        for i in order + order[:5]:  # with a few duplicates
            value, _ = encode_chunk(header, i, i * chunk, piece(i))
            result = asm.add(value)
            done = result or done
            del value, result
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert done is not None and done.size == 64 * 1024 * 1024 and done.sha256 == h.hexdigest()
    assert done.path is not None and done.path.stat().st_size == 64 * 1024 * 1024
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes while assembling 64 MiB"


# ------------------------------------------------------------------------ fetch_offloaded


@pytest.fixture
def store(tmp_path: Path) -> FilesystemStore:
    (tmp_path / "store").mkdir()
    return FilesystemStore(tmp_path / "store")


def offloaded(store: FilesystemStore, data: bytes, content_id: str = "mb:u1/3") -> dict[str, Any]:
    stored = store.put(sha(data), len(data), [data[i : i + 1000] for i in range(0, len(data), 1000)] or [b""])
    return ref(content_id, data, "offload", uri=stored.uri)


def test_fetch_offloaded_round_trip(tmp_path: Path, store: FilesystemStore) -> None:
    data = random.Random(4).randbytes(3_000_001)
    r = offloaded(store, data)
    dest = tmp_path / "out" / "file.bin"
    dest.parent.mkdir()
    got = fetch_offloaded(r, dest)
    assert (got.content_id, got.record_id, got.path, got.size, got.sha256) == (
        "mb:u1/3",
        "mb:u1",
        dest,
        len(data),
        sha(data),
    )
    assert dest.read_bytes() == data and files_in(dest.parent) == ["file.bin"]
    buf = io.BytesIO(b"keep:")
    buf.seek(0, io.SEEK_END)
    assert fetch_offloaded(r, buf).path is None and buf.getvalue() == b"keep:" + data


def test_fetch_offloaded_corrupted_object_leaves_nothing(tmp_path: Path, store: FilesystemStore) -> None:
    data = b"original bytes" * 1000
    r = offloaded(store, data)
    obj = Path(r["uri"].removeprefix("file://"))
    obj.write_bytes(b"X" + data[1:])  # same size, other bytes
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError, match="mb:u1/3"):
        fetch_offloaded(r, out / "a.bin")
    assert files_in(out) == []
    buf = io.BytesIO(b"prefix")
    buf.seek(0, io.SEEK_END)
    with pytest.raises(IntegrityError):
        fetch_offloaded(r, buf)
    assert buf.getvalue() == b"prefix"
    obj.write_bytes(data + b"more")  # longer than the ref says
    with pytest.raises(IntegrityError, match="more than the"):
        fetch_offloaded(r, out / "a.bin")
    assert files_in(out) == []
    obj.unlink()
    with pytest.raises(ContentUnavailable, match="no such object"):
        fetch_offloaded(r, out / "a.bin")
    assert files_in(out) == []


def test_fetch_offloaded_refuses_a_ref_whose_sha_differs_from_the_object(
    tmp_path: Path, store: FilesystemStore
) -> None:
    r = offloaded(store, b"abc")
    r["sha256"] = sha(b"abd")
    with pytest.raises(IntegrityError):
        fetch_offloaded(r, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------ write_attachments


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\Windows\\evil.dll", "evil.dll"),
        ("/abs/path/x.txt", "x.txt"),
        ("a\x00b.txt", "a_b.txt"),
        ("line\r\nbreak.txt", "line__break.txt"),
        ("invoice\u202efdp.exe", "invoice_fdp.exe"),
        ("..", "FALLBACK"),
        ("foo/..", "FALLBACK"),
        (".hidden", "hidden"),
        ("   ", "FALLBACK"),
        ("", "FALLBACK"),
        (None, "FALLBACK"),
        ("CON", "_CON"),
        ("nul.txt", "_nul.txt"),
        ("-rf", "_rf"),
        ('a<b>c:d"e|f?g*h', "a_b_c_d_e_f_g_h"),
        ("trailing. . ", "trailing"),
    ],
)
def test_safe_filename(name: str | None, expected: str) -> None:
    assert safe_filename(name, "FALLBACK") == expected


def test_safe_filename_truncates_keeping_the_extension() -> None:
    got = safe_filename("é" * 300 + ".pdf", "f")
    assert got.endswith(".pdf") and len(got.encode()) <= 200 and got.startswith("é")


def test_write_attachments_sanitises_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.pdf").write_bytes(b"do not touch")
    outside = tmp_path / "passwd"
    blobs = [b"one", b"two", b"three", b"four", b"five", b"six"]
    names = ["report.pdf", "REPORT.pdf", "../passwd", "a\x00b.txt", "..", None]
    atts = [
        attachment(b, filename=n, part=str(i + 2), inline=b) for i, (b, n) in enumerate(zip(blobs, names, strict=True))
    ]
    written = write_attachments(mail_v3(atts), out)
    assert [p.name for p in written] == [
        "report-2.pdf",
        "REPORT-3.pdf",
        "passwd",
        "a_b.txt",
        "part-6.bin",
        "part-7.bin",
    ]
    assert [p.read_bytes() for p in written] == blobs
    assert (out / "report.pdf").read_bytes() == b"do not touch" and not outside.exists()
    assert all(p.parent == out and stat.S_IMODE(p.stat().st_mode) == 0o600 for p in written)
    assert written.unavailable == []
    again = write_attachments(mail_v3(atts[:1]), out)
    assert [p.name for p in again] == ["report-4.pdf"]


def test_write_attachments_from_every_placement(tmp_path: Path, store: FilesystemStore) -> None:
    chunked = random.Random(8).randbytes(5000)
    off = b"offloaded content" * 300
    asm = ChunkAssembler(tmp_path / "asm")
    for v in chunk_values(chunked, 1024, "mb:u1/3"):
        asm.add(v)
    atts = [
        attachment(b"inline!", filename="in.txt", part="2", inline=b"inline!"),
        attachment(chunked, filename="chunked.bin", part="3", ref=ref("mb:u1/3", chunked, "chunked", chunks=5)),
        attachment(off, filename="off.bin", part="4", ref=offloaded(store, off, "mb:u1/4")),
        attachment(b"meta only", filename="meta.bin", part="5"),
        attachment(b"later", filename="later.bin", part="6", ref=ref("mb:u1/6", b"later", "chunked", chunks=1)),
        attachment(b"wrong", filename="bad.txt", part="7", inline=b"WRONG"),
    ]
    written = write_attachments(mail_v3(atts), tmp_path / "out", assembler=asm)
    assert {p.name: p.read_bytes() for p in written} == {"in.txt": b"inline!", "chunked.bin": chunked, "off.bin": off}
    why = {u.filename: (u.placement, u.reason) for u in written.unavailable}
    assert why["meta.bin"] == ("none", "the record carries no bytes for it (metadata only)")
    assert why["later.bin"][0] == "chunked" and "not all assembled" in why["later.bin"][1]
    assert why["bad.txt"][0] == "inline" and "sha256" in why["bad.txt"][1]
    assert set(why) == {"meta.bin", "later.bin", "bad.txt"}
    # without an assembler the chunked one is reported, the rest still written
    plain = write_attachments(mail_v3(atts[:3]), tmp_path / "out2")
    assert [p.name for p in plain] == ["in.txt", "off.bin"]
    assert "no ChunkAssembler" in plain.unavailable[0].reason


def test_write_attachments_reports_an_unreadable_offload(tmp_path: Path, store: FilesystemStore) -> None:
    data = b"gone soon"
    r = offloaded(store, data)
    Path(r["uri"].removeprefix("file://")).unlink()
    written = write_attachments(mail_v3([attachment(data, filename="g.bin", part="3", ref=r)]), tmp_path / "o")
    assert list(written) == [] and files_in(tmp_path / "o") == []
    (u,) = written.unavailable
    assert u.placement == "offload" and "no such object" in u.reason


def test_temp_files_of_the_assembler_are_never_world_readable(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        asm = ChunkAssembler(tmp_path / "w")
        asm.add(chunk_values(b"s" * 20, 10)[0])
        (part,) = (tmp_path / "w").iterdir()
        assert stat.S_IMODE(part.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "w").stat().st_mode) == 0o700
    finally:
        os.umask(old)
