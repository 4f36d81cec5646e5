"""Large mail decoded in place (issue 6): the streamed path gives the records the held path gives.

* Differential: every mail of the golden corpus and of the MIME fuzzer, decoded (a) from bytes
  with every part held and (b) from a SpoolMap of a file with every leaf left in place
  (``stream_above=0``) and the scan sliding in tiny windows, gives the same record.
* A multi-megabyte mail with base64 and quoted-printable attachments: sizes and SHA-256 of the
  streamed parts match the originals, the pages of the mapping are handed back.
* Placement: chunk records reassemble to the attachment, byte-identical; inline below the limit;
  an offloaded object in a directory store; content ids unique per mail.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import mmap
import random
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from support.mimefuzz import mutate, random_mail

from connector.config.model import AttachmentsConfig, parse_config
from connector.decoding import decode_mail, fastmime
from connector.decoding.fastmime import SpoolMap
from connector.decoding.options import DecodeOptions
from connector.delivery.kafka import Delivery
from connector.delivery.offload import FilesystemStore, read_uri
from connector.records import Provenance, build_mail_record
from connector.records.avro import decode_single_object
from connector.records.content import chunk_schema
from connector.runtime.placement import Placer

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "mail"
PROV = Provenance(mailbox_id="m", uidl="u", server="h:1", fetched_at_millis=0, raw_size=0, raw_sha256="0" * 64)


@pytest.fixture(autouse=True)
def fixed_signature_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two decodes of a signed mail compare equal only with one validation moment."""
    from connector.decoding import signature

    monkeypatch.setattr(signature, "_now", lambda: datetime(2026, 1, 1, tzinfo=UTC))


def spool_map(tmp_path: Path, data: bytes) -> SpoolMap:
    f = tmp_path / f"spool-{hashlib.sha256(data).hexdigest()[:12]}"
    f.write_bytes(data)
    with f.open("rb") as fh:
        return SpoolMap(fh.fileno(), 0, access=mmap.ACCESS_READ)


def both_ways(raw: bytes, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    held = build_mail_record(decode_mail(raw), PROV)
    view = spool_map(tmp_path, raw)
    try:
        streamed = build_mail_record(decode_mail(view, options=DecodeOptions(stream_above=0)), PROV)
    finally:
        view.close()
    return held, streamed


@pytest.fixture
def tiny_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the spool scan slide after a few bytes, so window edges fall everywhere."""
    monkeypatch.setattr(fastmime, "_WINDOW", 7)
    monkeypatch.setattr(fastmime, "_SLIDE", 50)


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.eml")))
def test_corpus_streamed_equals_held(name: str, tmp_path: Path, tiny_windows: None) -> None:
    raw = (CORPUS / name).read_bytes()
    assert raw.strip(), "an empty file cannot be mapped"
    held, streamed = both_ways(raw, tmp_path)
    assert streamed == held


def test_fuzzed_mail_streamed_equals_held(tmp_path: Path, tiny_windows: None) -> None:
    checked = 0
    rng = random.Random(6)
    for i in range(300):
        raw = random_mail(rng) if i % 3 == 0 else mutate(rng, random_mail(rng))
        if not raw.strip():
            continue
        try:
            held = build_mail_record(decode_mail(raw), PROV)
        except Exception as exc:
            view = spool_map(tmp_path, raw)
            with pytest.raises(type(exc)):
                decode_mail(view, options=DecodeOptions(stream_above=0))
            view.close()
            continue
        view = spool_map(tmp_path, raw)
        try:
            streamed = build_mail_record(decode_mail(view, options=DecodeOptions(stream_above=0)), PROV)
        finally:
            view.close()
        assert streamed == held
        checked += 1
    assert checked > 200


def big_mail(sizes: Sequence[int], seed: int = 1) -> tuple[bytes, list[bytes]]:
    rnd = random.Random(seed)
    files = [rnd.randbytes(n) for n in sizes]
    out = [
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: big\r\nMessage-ID: <big@x>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\npreamble\r\n"
        b"--BB\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
    ]
    for i, f in enumerate(files):
        if i % 2 == 0:
            enc, cte = base64.encodebytes(f).replace(b"\n", b"\r\n"), b"base64"
        else:
            enc, cte = binascii.b2a_qp(f, istext=False).replace(b"\n", b"\r\n"), b"quoted-printable"
        out.append(
            b"--BB\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=f"
            + str(i).encode()
            + b".bin\r\nContent-Transfer-Encoding: "
            + cte
            + b"\r\n\r\n"
            + enc
            + b"\r\n"
        )
    out.append(b"--BB--\r\n")
    return b"".join(out), files


def test_multi_megabyte_attachments_are_hashed_in_place(tmp_path: Path) -> None:
    raw, files = big_mail([3_000_000, 2_500_000, 10])
    view = spool_map(tmp_path, raw)
    try:
        mail = decode_mail(view, options=DecodeOptions(stream_above=1 << 20))
        atts = mail.attachments
        assert [a.size for a in atts] == [len(f) for f in files]
        assert [a.sha256 for a in atts] == [hashlib.sha256(f).hexdigest() for f in files]
        # The two large ones were not held; the small one was.
        assert atts[0].large is not None and atts[0].content == b""
        assert atts[1].large is not None and atts[2].large is None and atts[2].content == files[2]
        assert b"".join(atts[0].pieces()) == files[0] and b"".join(atts[1].pieces()) == files[1]
        assert mail.text_body == "see attached"
    finally:
        view.close()


# ------------------------------------------------------------------ placement


class FakeSend:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = []

    def __call__(self, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> Delivery:
        self.records.append((topic, key, value, list(headers)))
        d = Delivery(topic)
        d.done = True
        return d


def config(tmp_path: Path, placement: str, inline: int = 1000) -> Any:
    (tmp_path / "objects").mkdir(exist_ok=True)
    return parse_config(
        {
            "kafka": {"bootstrap_servers": "127.0.0.1:1"},
            "topics": {"mail": "mail", "chunk_bytes": 64 * 1024},
            "offload": {"kind": "filesystem", "directory": str(tmp_path / "objects")},
            "mailboxes": [
                {
                    "id": "m",
                    "host": "127.0.0.1",
                    "tls": "implicit",
                    "username": "u",
                    "password": {"env": "PW"},
                    "attachments": {"placement": placement, "inline_max_bytes": inline},
                }
            ],
        },
        environ={"PW": "x"},
    )


def reassemble(records: Iterator[tuple[str, bytes, bytes, list[tuple[str, bytes]]]]) -> dict[str, bytes]:
    parts: dict[str, dict[int, bytes]] = {}
    meta: dict[str, dict[str, Any]] = {}
    s = chunk_schema()
    for _topic, _key, value, _headers in records:
        c = decode_single_object(value, {s.fingerprint: s})
        parts.setdefault(c["content_id"], {})[c["index"]] = c["data"]
        meta[c["content_id"]] = c
    out = {}
    for cid, chunks in parts.items():
        assert sorted(chunks) == list(range(meta[cid]["count"]))
        whole = b"".join(chunks[i] for i in sorted(chunks))
        assert len(whole) == meta[cid]["total_size"] and hashlib.sha256(whole).hexdigest() == meta[cid]["sha256"]
        out[cid] = whole
    return out


def test_chunked_placement_round_trip(tmp_path: Path) -> None:
    raw, files = big_mail([300_000, 200_001, 10])
    cfg = config(tmp_path, "chunked")
    mb = cfg.mailboxes[0]
    assert mb.attachments == AttachmentsConfig("chunked", 1000)
    view = spool_map(tmp_path, raw)
    try:
        mail = decode_mail(view, options=DecodeOptions(stream_above=1000))
        send = FakeSend()
        placer = Placer(cfg, mb, "m:u", b"m", send)
        placed = placer.attachments(mail.attachments)
        record = build_mail_record(mail, PROV, placed)
    finally:
        view.close()
    assert {t for t, *_ in send.records} == {"mail.attachments"} and {k for _, k, *_ in send.records} == {b"m"}
    assert len(placer.deliveries) == len(send.records) == 5 + 4  # 300,000 and 200,001 bytes in 64 KiB chunks
    got = reassemble(iter(send.records))
    a0, a1, a2 = record["attachments"]
    assert a0["ref"]["placement"] == "chunked" and a0["ref"]["chunks"] == 5 and a0["data"] is None
    assert got[a0["ref"]["id"]] == files[0] and got[a1["ref"]["id"]] == files[1]
    assert a0["ref"]["id"] == "m:u/2" and a1["ref"]["id"] == "m:u/3"
    assert a2["data"] == files[2] and a2["ref"] is None  # under inline_max_bytes: inline
    headers = dict(send.records[0][3])
    assert headers["pop3kafka.chunk"] == b"0/5" and headers["pop3kafka.content_id"] == b"m:u/2"


def test_offload_placement_writes_content_addressed_objects(tmp_path: Path) -> None:
    raw, files = big_mail([150_000, 70_000])
    cfg = config(tmp_path, "offload")
    mb = cfg.mailboxes[0]
    assert cfg.offload is not None
    store = FilesystemStore(cfg.offload.directory)
    for attempt in range(2):  # the second cycle (a retry after an abort) re-uses the objects
        mail = decode_mail(raw, options=DecodeOptions(stream_above=1000))
        placer = Placer(cfg, mb, "m:u", b"m", FakeSend(), store)
        record = build_mail_record(mail, PROV, placer.attachments(mail.attachments))
        assert [reused for _, reused in placer.stored] == [attempt == 1] * 2
    for att, f in zip(record["attachments"], files, strict=True):
        ref = att["ref"]
        assert ref["placement"] == "offload" and ref["sha256"] == hashlib.sha256(f).hexdigest()
        assert ref["uri"].endswith("sha256/" + ref["sha256"])
        assert b"".join(read_uri(ref["uri"])) == f


def test_placement_none_keeps_metadata_only(tmp_path: Path) -> None:
    raw, _ = big_mail([5000])
    cfg = config(tmp_path, "none")
    mail = decode_mail(raw)
    send = FakeSend()
    record = build_mail_record(
        mail, PROV, Placer(cfg, cfg.mailboxes[0], "m:u", b"m", send).attachments(mail.attachments)
    )
    assert record["attachments"][0]["data"] is None and record["attachments"][0]["ref"] is None
    assert send.records == []


def test_raw_mail_placement(tmp_path: Path) -> None:
    raw, _ = big_mail([200_000])
    cfg = config(tmp_path, "chunked")
    send = FakeSend()
    placer = Placer(cfg, cfg.mailboxes[0], "m:u", b"m", send)
    placed = placer.raw(raw, hashlib.sha256(raw).hexdigest())
    assert placed.data is None and placed.ref is not None and placed.ref.id == "m:u/raw"
    assert reassemble(iter(send.records))["m:u/raw"] == raw
    small = placer.raw(b"Subject: x\r\n\r\nhi\r\n", "")
    assert small.data == b"Subject: x\r\n\r\nhi\r\n" and small.ref is None


def test_forwarded_mail_with_a_large_attachment_is_not_held(tmp_path: Path) -> None:
    inner, files = big_mail([2_500_000])
    outer = (
        b"From: fw@example.com\r\nSubject: Fwd: big\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=OUT\r\n\r\n--OUT\r\nContent-Type: text/plain\r\n\r\nsee below\r\n"
        b"--OUT\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--OUT--\r\n"
    )
    held = decode_mail(outer)
    [h_msg] = [a for a in held.attachments if a.kind == "message"]
    view = spool_map(tmp_path, outer)
    try:
        mail = decode_mail(view, options=DecodeOptions(stream_above=1 << 20))
        [msg] = [a for a in mail.attachments if a.kind == "message"]
        assert msg.large is not None and msg.content == b""
        assert (msg.size, msg.sha256) == (h_msg.size, h_msg.sha256)
        assert msg.message is not None and msg.message.subject == "big"
        pieces = list(msg.pieces(64 * 1024))
        assert b"".join(pieces) == h_msg.content and max(len(p) for p in pieces) <= 64 * 1024 + 2
        assert build_mail_record(mail, PROV) == build_mail_record(held, PROV)
    finally:
        view.close()
    assert files  # the inner attachment itself is inside the message's bytes


def test_many_small_attachments_stay_within_the_inline_budget(tmp_path: Path) -> None:
    raw, files = big_mail([200_000] * 6)  # each under inline_max_bytes, together 1.2 MB
    cfg = config(tmp_path, "chunked", inline=256 * 1024)
    mail = decode_mail(raw, options=DecodeOptions(stream_above=64 * 1024))
    send = FakeSend()
    placed = Placer(cfg, cfg.mailboxes[0], "m:u", b"m", send).attachments(mail.attachments)
    inline = [p for p in placed if p.data is not None]
    assert len(inline) == 2 and sum(len(p.data or b"") for p in inline) <= 512 * 1024
    refs = [p.ref for p in placed if p.ref is not None]
    assert len(refs) == 4 and all(r.placement == "chunked" for r in refs)
    got = reassemble(iter(send.records))
    assert [got[r.id] for r in refs] == files[2:]


def test_nested_multipart_without_boundary_is_streamed_like_a_leaf(tmp_path: Path, tiny_windows: None) -> None:
    body = b"x" * 300_000
    raw = (
        b"Subject: nb\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=OUT\r\n\r\n"
        b"--OUT\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b"--OUT\r\nContent-Type: multipart/related\r\n\r\n" + body + b"\r\n--OUT--\r\n"
    )
    held = decode_mail(raw)
    view = spool_map(tmp_path, raw)
    try:
        mail = decode_mail(view, options=DecodeOptions(stream_above=1000))
        [att] = [a for a in mail.attachments if a.content_type == "multipart/related"]
        assert att.large is not None and b"".join(att.pieces()) == body
        assert build_mail_record(mail, PROV) == build_mail_record(held, PROV)
    finally:
        view.close()


def test_body_part_selection_of_a_streamed_part_is_held_up_to_the_body_limit(tmp_path: Path) -> None:
    from connector.decoding.options import BodySelection

    text = b"line of the selected part\r\n" * 4000  # 108,000 bytes, streamed above 64 KiB
    raw = (
        b"Subject: sel\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/html\r\n\r\n<p>hi</p>\r\n--B\r\nContent-Type: text/plain\r\n"
        b"Content-Disposition: attachment; filename=a.txt\r\n\r\n" + text + b"--B--\r\n"
    )
    options = DecodeOptions(body_part=BodySelection(content_type="text/plain"))
    held = decode_mail(raw, options=options)
    streamed = decode_mail(raw, options=DecodeOptions(body_part=options.body_part, stream_above=64 * 1024))
    assert streamed.body is not None and streamed.body.text == text[:-2].decode()  # CRLF: the delimiter's
    assert streamed.attachments[0].large is not None
    assert build_mail_record(streamed, PROV) == build_mail_record(held, PROV)
