"""Record version 2 from the decoder: the part tree, more address fields and groups, threading
headers, special content (uuencode, TNEF, embedded messages), body selection, raw-only records,
hostile-mail limits, and schema compatibility with version 1."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fastavro
import pytest

from connector.decoding import decode_mail
from connector.decoding.options import BodySelection, DecodeLimits, DecodeOptions
from connector.errors import DecodeError, MailTooLargeError, SmimeError
from connector.records import Provenance, build_mail_record, decode_single_object, encode_single_object, mail_schema

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
PROV = Provenance("box", "u1", "pop.test:995", 1_700_000_000_000, 10, "0" * 64)

MIXED = (
    b"From: Alice <a@x.org>\r\nSender: Bot <s@x.org>\r\nReply-To: r@x.org, R2 <r2@x.org>\r\n"
    b"To: Team: b@x.org, C <c@x.org>;, d@x.org\r\nBcc: undisclosed-recipients:;\r\n"
    b"In-Reply-To: <p@x>\r\nReferences: <a@x>\r\n <b@x> <c@x>\r\nSubject: t\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
    b"--B\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nhello\r\nbegin 644 f.txt\r\n#:&D*\r\n`\r\nend\r\n\r\n"
    b"--B\r\nContent-Type: application/ms-tnef\r\nContent-Transfer-Encoding: base64\r\n\r\neJ8+IgAA\r\n"
    b"--B\r\nContent-Type: message/rfc822\r\n\r\nFrom: Inner <x@y.org>\r\nTo: z@y.org\r\n"
    b"Subject: =?utf-8?q?inn=C3=A9r?=\r\nDate: Tue, 1 Nov 99 10:00:00 +0000\r\nMessage-ID: <in@y>\r\n\r\nbody\r\n"
    b"--B\r\nContent-Type: text/calendar; method=REQUEST\r\n\r\nBEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n"
    b"--B--\r\n"
)


def test_threading_and_address_fields_and_groups() -> None:
    m = decode_mail(MIXED)
    assert m.in_reply_to == "<p@x>" and m.references == ("<a@x>", "<b@x>", "<c@x>")
    assert m.sender is not None and (m.sender.name, m.sender.address) == ("Bot", "s@x.org")
    assert [(a.name, a.address) for a in m.reply_to] == [("", "r@x.org"), ("R2", "r2@x.org")]
    assert [a.address for a in m.to] == ["b@x.org", "c@x.org", "d@x.org"]  # group members flattened too
    groups = {(g.field, g.name): [a.address for a in g.members] for g in m.groups}
    assert groups == {("to", "Team"): ["b@x.org", "c@x.org"], ("bcc", "undisclosed-recipients"): []}
    assert m.bcc == ()


def test_part_tree_roles_kinds_and_special_content() -> None:
    m = decode_mail(MIXED)
    tree = [(p.path, p.depth, p.content_type, p.role, p.kind) for p in m.parts]
    assert tree == [
        ("", 0, "multipart/mixed", "container", None),
        ("1", 1, "text/plain", "text_body", None),
        ("2", 1, "application/ms-tnef", "attachment", "tnef"),
        ("3", 1, "message/rfc822", "attachment", "message"),
        ("4", 1, "text/calendar", "attachment", "calendar"),
    ]
    root, text = m.parts[0], m.parts[1]
    assert root.size == 0 and root.sha256 is None and dict(root.params) == {"boundary": "B"}
    assert text.size == len(m.text_body or "") and text.sha256 is not None
    kinds = [(a.kind, a.part, a.filename) for a in m.attachments]
    assert kinds == [("uuencoded", "1", "f.txt"), ("tnef", "2", None), ("message", "3", None), ("calendar", "4", None)]
    uu = m.attachments[0]
    assert uu.content == b"hi\n"  # POSIX uuencode of "hi\n"
    summary = m.attachments[2].message
    assert summary is not None and summary.subject == "innér" and summary.message_id == "<in@y>"
    assert [a.address for a in summary.from_] == ["x@y.org"]
    assert summary.date_millis == 941450400000  # RFC 5322 §4.3: '99' is 1999


def test_record_v2_round_trips_through_avro() -> None:
    record = build_mail_record(decode_mail(MIXED), PROV)
    back = decode_single_object(encode_single_object(mail_schema(), record))
    assert back["in_reply_to"] == "<p@x>" and back["sender"] == {"name": "Bot", "address": "s@x.org"}
    assert [p["role"] for p in back["parts"]] == ["container", "text_body", "attachment", "attachment", "attachment"]
    assert back["attachments"][2]["message"]["subject"] == "innér"
    assert back["mime_decoded"] is True and back["raw"] is None and back["smime"] is None


def test_version_1_and_2_read_each_other() -> None:
    """Evolution rule: new fields optional with defaults, so a v1 reader skips them and a v2
    reader fills them in (Avro schema resolution)."""
    v1 = fastavro.parse_schema(json.loads((SCHEMAS / "history" / "mail_record.v1.avsc").read_text()))
    v2 = mail_schema().parsed
    record = build_mail_record(decode_mail(MIXED), PROV)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v2, record)
    old = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), v2, v1)
    assert old["subject"] == "t" and "parts" not in old
    v1_record = {k: old[k] for k in old}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v1, v1_record)
    new = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), v1, v2)
    assert new["parts"] == [] and new["mime_decoded"] is True and new["smime"] is None
    assert new["attachments"][0]["kind"] is None


# ------------------------------------------------------------------ body selection


def test_body_part_by_index_and_by_type() -> None:
    def pick(**kw: object) -> object:
        return decode_mail(MIXED, options=DecodeOptions(body_part=BodySelection(**kw))).body  # type: ignore[arg-type]

    first = pick()
    assert first.path == "1" and first.content_type == "text/plain" and first.text.startswith("hello")  # type: ignore[attr-defined]
    tnef = pick(index=1)
    assert tnef.path == "2" and tnef.text is None and tnef.data == b'x\x9f>"\x00\x00'  # type: ignore[attr-defined]
    cal = pick(content_type="text/calendar")
    assert cal.path == "4" and "VCALENDAR" in cal.text  # type: ignore[attr-defined]


def test_body_part_missing_is_a_dead_letter_or_falls_back() -> None:
    with pytest.raises(DecodeError, match="index 0 does not exist") as exc:
        decode_mail(MIXED, options=DecodeOptions(body_part=BodySelection(content_type="image/png")))
    assert exc.value.reason == "body_part_missing" and exc.value.stage == "parse"
    m = decode_mail(
        MIXED, options=DecodeOptions(body_part=BodySelection(content_type="image/png", on_missing="first_text"))
    )
    assert m.body is not None and m.body.path == "1"
    assert any("first text part" in w for w in m.warnings)


# ------------------------------------------------------------------ raw-only records


def test_mime_decoding_off_publishes_raw_with_provenance_only() -> None:
    m = decode_mail(MIXED, options=DecodeOptions(mime_decoding=False))
    assert not m.mime_decoded and m.raw == MIXED and m.subject is None and m.parts == ()
    back = decode_single_object(encode_single_object(mail_schema(), build_mail_record(m, PROV)))
    assert back["raw"] == MIXED and back["mime_decoded"] is False and back["headers"] == []


ENCRYPTED = (
    b"From: a@x.org\r\nTo: b@x.org\r\nSubject: secret\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHA6CAMIACAQA=\r\n"
)


def test_smime_passthrough_keeps_the_mail_encrypted_and_raw() -> None:
    m = decode_mail(ENCRYPTED, options=DecodeOptions(smime="passthrough"))
    assert not m.mime_decoded and m.raw == ENCRYPTED
    assert m.smime is not None and m.smime.encrypted and m.smime.passthrough and not m.smime.decrypted
    assert m.subject == "secret" and m.text_body is None and m.attachments == ()


def test_encrypted_mail_without_keys_is_a_no_key_dead_letter() -> None:
    with pytest.raises(SmimeError, match="no decryption keys") as exc:
        decode_mail(ENCRYPTED)
    assert (exc.value.stage, exc.value.reason) == ("decrypt", "no_key")


# ------------------------------------------------------------------ hostile-mail limits


def limited(**kw: object) -> DecodeOptions:
    return DecodeOptions(limits=DecodeLimits(**kw))  # type: ignore[arg-type]


def test_header_count_limit() -> None:
    raw = b"".join(b"X-H%d: v\r\n" % i for i in range(50)) + b"\r\nbody\r\n"
    assert decode_mail(raw, options=limited(max_headers=50)).text_body == "body\r\n"
    with pytest.raises(MailTooLargeError, match="more than 49 header fields") as exc:
        decode_mail(raw, options=limited(max_headers=49))
    assert exc.value.reason == "max_headers" and exc.value.stage == "limits"


def test_header_size_limit_names_the_field_not_its_content() -> None:
    raw = b"Subject: " + b"s3cr3t" * 400 + b"\r\n\r\nbody\r\n"
    with pytest.raises(MailTooLargeError) as exc:
        decode_mail(raw, options=limited(max_header_bytes=1000))
    assert exc.value.reason == "max_header_bytes" and "'Subject'" in str(exc.value)
    assert "s3cr3t" not in str(exc.value)


def test_decoded_size_limit() -> None:
    data = b"QUFB" * 5000  # 15,000 bytes decoded
    raw = (
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + data + b"\r\n--B--\r\n"
    )
    assert decode_mail(raw, options=limited(max_decoded_bytes=15_000)).attachments[0].size == 15_000
    with pytest.raises(MailTooLargeError, match="exceed 14999 bytes") as exc:
        decode_mail(raw, options=limited(max_decoded_bytes=14_999))
    assert exc.value.reason == "max_decoded_bytes"


def test_decode_time_limit() -> None:
    with pytest.raises(MailTooLargeError) as exc:
        decode_mail(MIXED, options=limited(max_decode_seconds=0.0))
    assert exc.value.reason == "max_decode_seconds"


def test_depth_and_part_limits_carry_their_reason() -> None:
    nested = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(5))
    with pytest.raises(MailTooLargeError) as exc:
        decode_mail(nested + b"\r\nx\r\n", options=limited(max_depth=3))
    assert exc.value.reason == "max_depth"
    with pytest.raises(MailTooLargeError) as exc:
        decode_mail(MIXED, options=limited(max_parts=3))
    assert exc.value.reason == "max_parts"


# ------------------------------------------------------------------ mailbox configuration


def box_config(**mailbox: object) -> DecodeOptions:
    from connector.config import parse_config

    cfg = parse_config(
        {
            "kafka": {"bootstrap_servers": "k:9092"},
            "topics": {"mail": "m"},
            "mailboxes": [{"id": "a", "host": "pop.test", "username": "u", "password": {"env": "PW"}, **mailbox}],
        },
        environ={"PW": "pw"},
    )
    return cfg.mailboxes[0].decode


def test_decode_options_from_the_mailbox_config() -> None:
    d = box_config()
    assert d.mime_decoding and d.smime == "decrypt" and d.keys is None and d.body_part is None
    assert d.limits == DecodeLimits()
    d = box_config(
        mime_decoding=False,
        body_part={"index": 2, "content_type": "application/pdf", "on_missing": "first_text"},
        smime={"mode": "passthrough"},
        decode_limits={"max_depth": 10, "max_decode_seconds": 2.5},
    )
    assert not d.mime_decoding and d.smime == "passthrough"
    assert d.body_part == BodySelection(index=2, content_type="application/pdf", on_missing="first_text")
    assert (d.limits.max_depth, d.limits.max_decode_seconds, d.limits.max_parts) == (10, 2.5, 2000)


@pytest.mark.parametrize(
    ("mailbox", "match"),
    [
        ({"body_part": {"content_type": "pdf"}}, "body_part.content_type: 'pdf' is not a content type"),
        ({"body_part": {"index": -1}}, "body_part.index"),
        ({"body_part": {"on_missing": "skip"}}, "body_part.on_missing"),
        ({"smime": {"mode": "decrypt-all"}}, "smime.mode"),
        ({"decode_limits": {"max_depth": 0}}, "decode_limits.max_depth"),
        ({"decode_limits": {"max_headers": 1}}, "decode_limits.max_headers"),
        ({"decode_limits": {"max_size": 1}}, "decode_limits.max_size"),
        ({"decode_limits": {"max_decode_seconds": 60}}, "more than 3/4 of delivery.transaction_timeout_seconds"),
    ],
)
def test_bad_decode_settings_name_the_key(mailbox: dict[str, object], match: str) -> None:
    from connector.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        box_config(**mailbox)
