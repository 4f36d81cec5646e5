"""The records written directly in Avro's binary encoding (connector/records/avro.py, "hand-made
bodies"): byte for byte what fastavro writes for the same record, over generated inputs."""

from __future__ import annotations

import hashlib
import io
import random
from typing import Any

import fastavro
import pytest

from connector import __version__
from connector.config import Config, parse_config
from connector.decoding.model import DecodedMail
from connector.errors import DecodeError
from connector.records import avro
from connector.records.avro import (
    Provenance,
    avro_long,
    build_mail_record,
    decode_single_object,
    encode_passthrough,
    encode_single_object,
    mail_schema,
)
from connector.records.framing import Framer, registry_header
from connector.records.ledger import LedgerEntry, ledger_schema
from connector.runtime import cycle

EDGE_LONGS = [0, 1, -1, 63, -64, 64, -65, 127, 128, 8191, 8192, 2**31 - 1, -(2**31), 2**53, 2**63 - 1, -(2**63)]


def strings(rng: random.Random) -> str:
    return rng.choice(
        [
            "",
            "x",
            "é€😀",
            "a" * 300,  # a length over one varint byte
            "".join(chr(rng.randrange(32, 0xD7FF)) for _ in range(rng.randrange(50))),
        ]
    )


def longs(rng: random.Random, bits: int = 64) -> int:
    fits = [n for n in EDGE_LONGS if -(2 ** (bits - 1)) <= n < 2 ** (bits - 1)]
    return rng.choice([*fits, rng.getrandbits(bits - 1)])


def fastavro_body(schema: Any, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record, strict=True)
    return buf.getvalue()


@pytest.mark.parametrize("n", EDGE_LONGS)
def test_avro_long_is_fastavros_long(n: int) -> None:
    assert avro_long(n) == fastavro_body("long", n)  # type: ignore[arg-type]


def test_ledger_entries_are_byte_identical_to_fastavros() -> None:
    rng = random.Random(20261127)
    for _ in range(3000):

        def maybe(v: Any) -> Any:
            return None if rng.random() < 0.3 else v

        e = LedgerEntry(
            mailbox_id=strings(rng) or "m",
            uidl=strings(rng) or "u",
            state=rng.choice(["delivered", "dead_lettered", "baseline"]),
            recorded_at=longs(rng),
            topic=maybe(strings(rng)),
            partition=maybe(longs(rng, 32)),
            offset=maybe(longs(rng)),
            raw_sha256=maybe(strings(rng)),
            list_size=maybe(longs(rng)),
            header_sha256=maybe(strings(rng)),
            first_seen_at=maybe(longs(rng)),
        )
        record = {
            "mailbox_id": e.mailbox_id,
            "uidl": e.uidl,
            "state": e.state,
            "topic": e.topic,
            "partition": e.partition,
            "offset": e.offset,
            "raw_sha256": e.raw_sha256,
            "list_size": e.list_size,
            "header_sha256": e.header_sha256,
            "recorded_at": e.recorded_at,
            "first_seen_at": e.first_seen_at,
            "connector_version": __version__,
        }
        assert e.encode() == encode_single_object(ledger_schema(), record), e


def test_a_ledger_entry_reads_back() -> None:
    e = LedgerEntry("orders", "UID-1", "dead_lettered", 1_767_258_000_000, "mail.dlq", 3, 42, "ab" * 32, 2048, None, 1)
    assert LedgerEntry.decode(e.encode()) == e


def general_passthrough(header: bytes, prov: Provenance, raw: bytes) -> bytes:
    """The record as the general path writes it (build_mail_record + fastavro)."""
    mail = DecodedMail(
        message_id=None, subject=None, date_raw=None, date_millis=None, from_=(), to=(), cc=(), headers=(),
        text_body=None, html_body=None, attachments=(), warnings=(), mime_decoded=False, raw=raw,
    )  # fmt: skip
    return avro.encode_with_header(header, mail_schema(), build_mail_record(mail, prov))


def test_the_direct_passthrough_path_is_on_for_this_schema() -> None:
    assert avro._passthrough_middle() is not None


def test_passthrough_records_are_byte_identical_to_fastavros() -> None:
    rng = random.Random(7)
    headers = [mail_schema().header, registry_header(17)]
    for i in range(2000):
        raw = rng.randbytes(rng.choice([0, 1, 63, 64, 200, 20_000, 70_000]))
        prov = Provenance(
            mailbox_id=strings(rng) or "m",
            uidl=strings(rng) or "u",
            server=strings(rng),
            fetched_at_millis=longs(rng),
            raw_size=len(raw),
            raw_sha256=hashlib.sha256(raw).hexdigest(),
        )
        header = headers[i % 2]
        got = encode_passthrough(header, prov, raw)
        assert got == general_passthrough(header, prov, raw), prov
    prov = Provenance("orders", "UID-1", "pop.test:995", 1_767_258_000_000, len(raw), hashlib.sha256(raw).hexdigest())
    back = decode_single_object(encode_passthrough(mail_schema().header, prov, raw) or b"")
    assert back["raw"] == raw and back["mime_decoded"] is False and back["record_id"] == "orders:UID-1"
    assert back["provenance"]["raw_sha256"] == prov.raw_sha256
    assert back["provenance"]["connector_version"] == __version__


def test_a_string_fastavro_refuses_is_refused_the_same_way() -> None:
    prov = Provenance("m", "bad\udcff", "s", 0, 1, "00")
    with pytest.raises(DecodeError) as direct:
        encode_passthrough(mail_schema().header, prov, b"x")
    with pytest.raises(DecodeError) as general:
        general_passthrough(mail_schema().header, prov, b"x")
    assert (direct.value.stage, direct.value.reason) == ("record", "schema")
    assert (general.value.stage, general.value.reason) == ("record", "schema")


def raw_config(**mailbox: Any) -> Config:
    return parse_config(
        {
            "kafka": {"bootstrap_servers": "x:9092"},
            "topics": {"mail": "mail"},
            "mailboxes": [
                {"id": "raw1", "host": "pop.test", "username": "u", "password": {"env": "PW"}, "mime_decoding": False}
                | mailbox
            ],
        },
        environ={"PW": "pw"},
    )


@pytest.mark.parametrize("framer", [Framer(), Framer("schema_registry", {mail_schema().fingerprint: 5})])
def test_a_mailbox_without_mime_decoding_publishes_the_same_bytes_either_way(
    framer: Framer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """encode_mail_checked through the direct path, then with it off (the general path)."""
    config = raw_config()
    box = config.mailboxes[0]
    mails = [b"Subject: a\r\n\r\nbody\r\n", b"", b"no header at all", random.Random(3).randbytes(30_000)]

    def encode_all() -> list[bytes]:
        out = []
        for i, raw in enumerate(mails):
            placer = cycle.placer_for(config, box, lambda *a: pytest.fail("nothing is chunked"), framer)(f"r{i}")
            value, signatures = cycle.encode_mail_checked(
                box, f"U{i}", raw, 1_767_258_000_000 + i, mail_schema(), placer=placer, framer=framer
            )
            assert signatures == ()
            out.append(value)
        return out

    direct = encode_all()
    monkeypatch.setattr(avro, "_passthrough_middle", lambda: None)
    assert encode_all() == direct
    # and without a placer (metadata-only callers): the raw mail inline all the same
    value, _ = cycle.encode_mail_checked(box, "U9", mails[0], 5, mail_schema(), framer=framer)
    assert value.endswith(b"\x02" + avro_long(len(mails[0])) + mails[0] + b"\x00")


def test_a_raw_mail_too_large_to_inline_takes_the_general_path_as_a_reference() -> None:
    config = raw_config(attachments={"placement": "chunked", "inline_max_bytes": 1024})
    box = config.mailboxes[0]
    sent: list[tuple[str, bytes]] = []

    def send(topic: str, key: bytes, value: bytes, headers: Any) -> Any:
        sent.append((topic, value))
        return None

    raw = b"Subject: big\r\n\r\n" + b"x" * 5000
    placer = cycle.placer_for(config, box, send)("raw1:U1")
    value, _ = cycle.encode_mail_checked(box, "U1", raw, 1, mail_schema(), placer=placer)
    record = decode_single_object(value)
    assert record["raw"] is None and record["raw_ref"]["size"] == len(raw) and record["mime_decoded"] is False
    assert sent and all(topic == config.topics.attachments for topic, _ in sent)
