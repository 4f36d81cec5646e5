"""Unit tests for connector.decoding: raw RFC 5322 bytes -> DecodedMail."""

from __future__ import annotations

import base64
import hashlib
import importlib
import os
import traceback
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.decoding import Address, DecodedMail, Header, clean_str, decode_mail
from connector.decoding import mime as mime_module
from connector.errors import DecodeError, MailTooLargeError


def crlf(text: str) -> bytes:
    """Mail text written with '\\n' in the test, sent with CRLF as POP3 delivers it."""
    return text.replace("\n", "\r\n").encode("utf-8")


def millis(date: str) -> int:
    """Milliseconds since the epoch of an ISO 8601 UTC timestamp, computed independently."""
    return int(datetime.fromisoformat(date).replace(tzinfo=UTC).timestamp() * 1000)


def assert_clean(mail: DecodedMail) -> None:
    """Every string in the result encodes as strict UTF-8 (no lone surrogates)."""
    strings: list[str | None] = [
        mail.message_id,
        mail.subject,
        mail.date_raw,
        mail.text_body,
        mail.html_body,
        *mail.warnings,
    ]
    for addr in (*mail.from_, *mail.to, *mail.cc):
        strings += [addr.name, addr.address]
    for header in mail.headers:
        strings += [header.name, header.raw, header.value]
    for att in mail.attachments:
        strings += [att.filename, att.content_type, att.disposition, att.content_id]
    for s in strings:
        if s is not None:
            s.encode("utf-8")


PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"


# ---------------------------------------------------------------- plain mail and headers


PLAIN = crlf(
    """Return-Path: <alice@example.org>
Received: from mx.example.org by pop.example.net;
\tMon, 3 Mar 2025 10:00:05 +0000
Message-ID:
 <1234@example.org>\x20\x20
From: Alice Example <alice@example.org>
To: bob@example.net, "Carol C." <carol@example.net>
Cc: Dave <dave@example.com>
Subject: Hello
 there
Date: Mon, 3 Mar 2025 11:00:00 +0100
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii

Hi Bob,
plain body.
"""
)


def test_plain_text_mail() -> None:
    mail = decode_mail(PLAIN)
    assert mail.message_id == "<1234@example.org>"
    assert mail.subject == "Hello there"
    assert mail.date_raw == "Mon, 3 Mar 2025 11:00:00 +0100"
    assert mail.date_millis == millis("2025-03-03T10:00:00")
    assert mail.from_ == (Address("Alice Example", "alice@example.org"),)
    assert mail.to == (Address("", "bob@example.net"), Address("Carol C.", "carol@example.net"))
    assert mail.cc == (Address("Dave", "dave@example.com"),)
    assert mail.text_body == "Hi Bob,\r\nplain body.\r\n"
    assert mail.html_body is None
    assert mail.attachments == ()
    assert mail.warnings == ()


def test_headers_in_order_unfolded() -> None:
    mail = decode_mail(PLAIN)
    assert [h.name for h in mail.headers] == [
        "Return-Path",
        "Received",
        "Message-ID",
        "From",
        "To",
        "Cc",
        "Subject",
        "Date",
        "MIME-Version",
        "Content-Type",
    ]
    # RFC 5322 §2.2.3: CRLF before WSP removed, the WSP itself kept.
    assert mail.headers[1] == Header(
        "Received",
        "from mx.example.org by pop.example.net;\tMon, 3 Mar 2025 10:00:05 +0000",
        "from mx.example.org by pop.example.net;\tMon, 3 Mar 2025 10:00:05 +0000",
    )
    assert mail.headers[2].raw == " <1234@example.org>  "
    assert mail.headers[6] == Header("Subject", "Hello there", "Hello there")


def test_lf_only_mail_and_repeated_headers() -> None:
    raw = b"Received: a\nReceived: b\nTo: x@example.org\nTo: y@example.org\nSubject: s\n\nbody\n"
    mail = decode_mail(raw)
    assert [h.raw for h in mail.headers if h.name == "Received"] == ["a", "b"]
    assert mail.to == (Address("", "x@example.org"), Address("", "y@example.org"))
    assert mail.text_body == "body\n"


def test_addresses_groups_and_encoded_names() -> None:
    raw = crlf(
        """From: =?utf-8?q?Doe=2C_J=C3=B6rg?= <joerg@example.org>
To: team: a@example.org, "B" <b@example.org>;, c@example.org
Cc: undisclosed-recipients:;

x"""
    )
    mail = decode_mail(raw)
    # The encoded comma must not split the mailbox: addresses are parsed before RFC 2047 decoding.
    assert mail.from_ == (Address("Doe, Jörg", "joerg@example.org"),)
    assert mail.to == (
        Address("", "a@example.org"),
        Address("B", "b@example.org"),
        Address("", "c@example.org"),
    )
    assert mail.cc == ()
    assert mail.warnings == ()


# ---------------------------------------------------------------- multipart structure


def alternative_with_attachment() -> bytes:
    msg = EmailMessage()
    msg["From"] = "a@example.org"
    msg["Subject"] = "report"
    msg.set_content("plain version\n")
    msg.add_alternative("<p>html version</p>\n", subtype="html")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="report.pdf")
    return msg.as_bytes()


def test_alternative_text_and_html_with_pdf_attachment() -> None:
    mail = decode_mail(alternative_with_attachment())
    assert mail.text_body == "plain version\n"
    assert mail.html_body == "<p>html version</p>\n"
    (att,) = mail.attachments
    assert att.filename == "report.pdf"
    assert att.content_type == "application/pdf"
    assert att.disposition == "attachment"
    assert att.content_id is None
    assert att.size == len(PDF)
    assert att.sha256 == hashlib.sha256(PDF).hexdigest()
    assert att.content == PDF
    assert mail.warnings == ()


def test_html_first_in_alternative_and_related_root() -> None:
    raw = crlf(
        """Content-Type: multipart/alternative; boundary="alt"

--alt
Content-Type: multipart/related; boundary="rel"; start="<root@x>"

--rel
Content-Type: image/png
Content-ID: <img@x>
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--rel
Content-Type: text/html; charset=utf-8
Content-ID: <root@x>

<img src="cid:img@x">
--rel--
--alt
Content-Type: text/plain; charset=utf-8

plain
--alt--
"""
    )
    mail = decode_mail(raw)
    assert mail.html_body == '<img src="cid:img@x">'
    assert mail.text_body == "plain"
    (img,) = mail.attachments
    assert img.content_type == "image/png"
    assert img.content_id == "<img@x>"
    assert img.disposition is None
    assert img.content == b"\x89PNG\r\n\x1a\n"


def test_mixed_first_inline_text_is_body_later_ones_attachments() -> None:
    raw = crlf(
        """Content-Type: multipart/mixed; boundary="b"

--b
Content-Type: text/plain

first
--b
Content-Type: text/html

<p>later html</p>
--b
Content-Type: text/plain
Content-Disposition: inline

second
--b
Content-Type: text/plain
Content-Disposition: attachment; filename="notes.txt"

third
--b--
"""
    )
    mail = decode_mail(raw)
    assert mail.text_body == "first"
    assert mail.html_body is None
    assert [(a.content_type, a.filename, a.content) for a in mail.attachments] == [
        ("text/html", None, b"<p>later html</p>"),
        ("text/plain", None, b"second"),
        ("text/plain", "notes.txt", b"third"),
    ]


def test_text_attachment_is_not_the_body() -> None:
    raw = crlf(
        """Content-Type: multipart/mixed; boundary="b"

--b
Content-Type: text/plain
Content-Disposition: attachment; filename=a.txt

attached
--b
Content-Type: text/plain

the body
--b--
"""
    )
    mail = decode_mail(raw)
    assert mail.text_body == "the body"
    assert [a.filename for a in mail.attachments] == ["a.txt"]


def test_missing_closing_boundary() -> None:
    raw = crlf(
        """Subject: cut
Content-Type: multipart/mixed; boundary="b"

--b
Content-Type: text/plain

still here
--b
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64

AAEC
"""
    )
    mail = decode_mail(raw)
    assert mail.text_body == "still here"
    assert [a.content for a in mail.attachments] == [b"\x00\x01\x02"]
    assert "message: defect CloseBoundaryNotFoundDefect" in mail.warnings


def test_nested_message_rfc822_is_one_attachment() -> None:
    inner = crlf(
        """From: inner@example.org
Subject: inner subject
Content-Type: text/plain

inner body
"""
    )
    raw = (
        crlf(
            """From: outer@example.org
Subject: Fwd
Content-Type: multipart/mixed; boundary="b"

--b
Content-Type: text/plain

see attached
--b
Content-Type: message/rfc822
Content-Disposition: attachment; filename="fwd.eml"

"""
        )
        + inner
        + b"--b--\r\n"
    )
    mail = decode_mail(raw)
    assert mail.subject == "Fwd"
    assert mail.text_body == "see attached"
    (att,) = mail.attachments
    assert att.content_type == "message/rfc822"
    assert att.filename == "fwd.eml"
    assert att.sha256 == hashlib.sha256(att.content).hexdigest()
    assert att.size == len(att.content)
    # The serialised embedded message round-trips (header fields and body unchanged).
    assert att.content == inner.rstrip(b"\r\n")
    nested = decode_mail(att.content)
    assert nested.subject == "inner subject"
    assert nested.text_body == "inner body"


def test_base64_encoded_message_rfc822() -> None:
    inner = b"Subject: hidden\r\n\r\nbody\r\n"
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(inner).replace(b"\n", b"\r\n")
        + b"--b--\r\n"
    )
    mail = decode_mail(raw)
    (att,) = mail.attachments
    assert att.content == inner
    assert "part 1: message part with base64 encoding" in mail.warnings


# ---------------------------------------------------------------- RFC 2047 headers


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        ("=?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=", "Grüße aus Köln"),
        ("=?utf-8?Q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=", "Grüße aus Köln"),
        ("=?ISO-8859-1?Q?Gr=FC=DFe_aus_K=F6ln?=", "Grüße aus Köln"),
        ("=?iso-8859-1?b?R3L833tl?=", "Grüß{e"),
        # RFC 2047 §6.2: whitespace between adjacent encoded words is dropped ...
        ("=?utf-8?q?Gr=C3=BC?= =?utf-8?q?=C3=9Fe?=", "Grüße"),
        ("=?utf-8?q?a?=\t  =?iso-8859-1?q?=E9?=", "aé"),
        # ... but kept between an encoded word and ordinary text.
        ("Re: =?utf-8?q?caf=C3=A9?= ist zu", "Re: café ist zu"),
        # A UTF-8 character split across two words (illegal, common) is joined as bytes.
        ("=?utf-8?B?4oI=?= =?utf-8?B?rA==?=", "€"),
        # RFC 2231 §5 language suffix.
        ("=?utf-8*de?q?Stra=C3=9Fe?=", "Straße"),
        ("no encoded words", "no encoded words"),
    ],
)
def test_rfc2047_subject(encoded: str, expected: str) -> None:
    mail = decode_mail(f"Subject: {encoded}\r\n\r\nx".encode("ascii"))
    assert mail.subject == expected
    assert mail.headers[0].raw == encoded
    assert mail.headers[0].value == expected
    assert mail.warnings == ()


def test_folded_adjacent_encoded_words() -> None:
    raw = b"Subject: =?utf-8?q?one_?=\r\n =?utf-8?q?two?=\r\n\r\nx"
    assert decode_mail(raw).subject == "one two"


def test_raw_utf8_header_rfc6532() -> None:
    raw = "Subject: Grüße — Ωmega =?utf-8?q?caf=C3=A9?=\r\nFrom: Jörg <jörg@exämple.org>\r\n\r\nx".encode()
    mail = decode_mail(raw)
    assert mail.subject == "Grüße — Ωmega café"
    assert mail.headers[0].raw == "Grüße — Ωmega =?utf-8?q?caf=C3=A9?="
    assert mail.from_ == (Address("Jörg", "jörg@exämple.org"),)
    assert mail.warnings == ()


def test_raw_latin1_header_falls_back_with_warning() -> None:
    mail = decode_mail(b"Subject: Gr\xfc\xdfe\r\n\r\nx")
    assert mail.subject == "Grüße"
    assert mail.warnings == ("header 'Subject': 8-bit data is not UTF-8, read as 'latin-1'",)


@pytest.mark.parametrize(
    ("charset", "payload", "expected", "warning"),
    [
        ("uft-8", "é".encode(), "é", "charset 'uft-8' read as 'utf-8'"),
        ("cp-850", "é".encode("cp850"), "é", "charset 'cp-850' read as 'cp850'"),
        ("iso-8859-8-i", "ש".encode("iso-8859-8"), "ש", "charset 'iso-8859-8-i' read as 'iso8859-8'"),
        ("x-user-defined", "€".encode("cp1252"), "€", "charset 'x-user-defined' read as 'cp1252'"),
        ("unknown-8bit", b"caf\xe9", "café", "charset 'unknown-8bit' read as 'latin-1'"),
        ("x-unknown", "café".encode(), "café", "charset 'x-unknown' read as 'utf-8'"),
        ("no-such-charset", b"caf\xc3\xa9 \xff", "café \ufffd", "unknown charset 'no-such-charset'"),
        ("utf-8", b"caf\xe9", "caf\ufffd", "bytes invalid in charset 'utf-8' replaced"),
        ("rot13", b"abc", "abc", "unknown charset 'rot13'"),  # not a text encoding
        ("zlib", b"abc", "abc", "unknown charset 'zlib'"),
    ],
)
def test_body_charsets(charset: str, payload: bytes, expected: str, warning: str) -> None:
    raw = b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n\r\n" + payload
    mail = decode_mail(raw)
    assert mail.text_body == expected
    assert len(mail.warnings) == 1
    assert mail.warnings[0].startswith(f"message: {warning}")


def test_undeclared_8bit_body() -> None:
    utf8 = decode_mail("Subject: x\r\n\r\nGrüße".encode())
    assert utf8.text_body == "Grüße"
    assert utf8.warnings == ("message: undeclared 8-bit data read as 'utf-8'",)
    latin = decode_mail(b"Content-Type: text/plain; charset=us-ascii\r\n\r\nGr\xfc\xdfe")
    assert latin.text_body == "Grüße"
    assert latin.warnings == ("message: undeclared 8-bit data read as 'latin-1'",)


def test_bogus_charset_in_encoded_word() -> None:
    mail = decode_mail(b"Subject: =?uft-8?q?caf=C3=A9?=\r\n\r\nx")
    assert mail.subject == "café"
    assert mail.warnings == ("header 'Subject': charset 'uft-8' read as 'utf-8'",)


# ---------------------------------------------------------------- transfer encodings


def test_quoted_printable_soft_breaks_and_trailing_whitespace() -> None:
    raw = (
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Gr=C3=BC=C3=9Fe, this line is so=\r\n"
        b" long that it was wrapped.   \r\n"  # trailing blanks: added in transport, removed
        b"Encoded blank at end=20\r\n"
        b"soft break with transport blanks=  \r\n"
        b"joined\r\n"
    )
    mail = decode_mail(raw)
    assert mail.text_body == (
        "Grüße, this line is so long that it was wrapped.\r\n"
        "Encoded blank at end \r\n"
        "soft break with transport blanks"
        "joined\r\n"
    )
    assert mail.warnings == ()


def test_broken_quoted_printable_is_lenient() -> None:
    raw = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: Quoted-Printable\r\n\r\n50=% off =ZZ and =c3=a9"
    mail = decode_mail(raw)
    assert mail.text_body == "50=% off =ZZ and é"
    assert "message: invalid quoted-printable escape kept as is" in mail.warnings


@pytest.mark.parametrize(
    "encoded",
    [
        b"AAECAwQF\r\nBgc=\r\n",  # fine
        b"AAECAwQFBgc",  # missing padding
        b"AAEC*AwQF!Bgc=",  # characters outside the alphabet
        b"AAECAwQFBgc==",  # excess padding
    ],
)
def test_base64_lenient(encoded: bytes) -> None:
    raw = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + encoded
    mail = decode_mail(raw)
    (att,) = mail.attachments
    assert att.content == bytes(range(8))
    assert att.size == 8
    repaired = "message: malformed base64 repaired" in mail.warnings
    assert repaired == (encoded != b"AAECAwQF\r\nBgc=\r\n")


def test_concatenated_base64_blocks() -> None:
    raw = b"Content-Transfer-Encoding: base64\r\nContent-Type: image/gif\r\n\r\nYQ==\r\nYmM=\r\n"
    assert decode_mail(raw).attachments[0].content == b"abc"


def test_unknown_transfer_encoding_kept() -> None:
    raw = b"Content-Type: application/x-thing\r\nContent-Transfer-Encoding: x-gzip64\r\n\r\nABC"
    mail = decode_mail(raw)
    assert mail.attachments[0].content == b"ABC"
    assert mail.warnings == ("message: unknown Content-Transfer-Encoding 'x-gzip64', body kept encoded",)


def test_8bit_and_binary_bodies() -> None:
    raw = b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xe9t\xe9"
    assert decode_mail(raw).text_body == "été"


# ---------------------------------------------------------------- filenames


def attachment_with(disposition: str, content_type: str = "application/pdf") -> DecodedMail:
    raw = (
        "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nbody\r\n"
        f"--b\r\nContent-Type: {content_type}\r\n{disposition}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        "JVBERg==\r\n--b--\r\n"
    )
    mail = decode_mail(raw.encode("utf-8"))
    assert mail.text_body == "body"
    return mail


@pytest.mark.parametrize(
    ("disposition", "content_type", "expected"),
    [
        # RFC 2231 §4 extended value
        ("Content-Disposition: attachment; filename*=UTF-8''%C3%A9t%C3%A9.pdf", "application/pdf", "été.pdf"),
        # RFC 2231 §4.1 continuations, encoded and not
        (
            "Content-Disposition: attachment;\r\n filename*0*=UTF-8''%C3%A9t;\r\n filename*1*=%C3%A9.pdf",
            "application/pdf",
            "été.pdf",
        ),
        (
            'Content-Disposition: attachment; filename*1="part two.pdf"; filename*0="part one "',
            "application/pdf",
            "part one part two.pdf",
        ),
        (
            "Content-Disposition: attachment; filename*0*=iso-8859-1'fr'%E9t; filename*1=\"e.pdf\"",
            "application/pdf",
            "éte.pdf",
        ),
        # the extended value wins over the plain one, whichever comes first
        (
            "Content-Disposition: attachment; filename=\"ete.pdf\"; filename*=UTF-8''%C3%A9t%C3%A9.pdf",
            "application/pdf",
            "été.pdf",
        ),
        # RFC 2047 inside the quoted filename (illegal, very common)
        (
            'Content-Disposition: attachment; filename="=?UTF-8?B?w6l0w6kucGRm?="',
            "application/pdf",
            "été.pdf",
        ),
        # falls back to Content-Type name=, RFC 2047 there too
        (
            "Content-Disposition: attachment",
            'application/pdf; name="=?iso-8859-1?Q?=E9t=E9.pdf?="',
            "été.pdf",
        ),
        ("Content-Disposition: inline", "application/pdf; name=plain.pdf", "plain.pdf"),
        # raw UTF-8 in a quoted filename (RFC 6532 style)
        ('Content-Disposition: attachment; filename="été.pdf"', "application/pdf", "été.pdf"),
        # quoted string with ';' and an escaped quote
        (
            'Content-Disposition: attachment; filename="a;b \\"c\\".pdf"; size=3',
            "application/pdf",
            'a;b "c".pdf',
        ),
        ("Content-Disposition: attachment", "application/pdf", None),
    ],
)
def test_attachment_filenames(disposition: str, content_type: str, expected: str | None) -> None:
    mail = attachment_with(disposition, content_type)
    (att,) = mail.attachments
    assert att.filename == expected
    assert att.content_type == "application/pdf"
    assert att.content == b"%PDF"
    assert mail.warnings == ()


def test_stdlib_get_filename_prefers_plain_which_is_why_we_parse_ourselves() -> None:
    raw = b"Content-Disposition: attachment; filename=\"ete.pdf\"; filename*=UTF-8''%C3%A9t%C3%A9.pdf\r\n\r\nx"
    assert BytesParser(policy=compat32).parsebytes(raw).get_filename() == "ete.pdf"


# ---------------------------------------------------------------- dates


@pytest.mark.parametrize(
    ("date", "expected"),
    [
        ("Tue, 1 Jul 2003 10:52:37 +0200", millis("2003-07-01T08:52:37")),
        ("1 Jul 2003 10:52:37 -0000", millis("2003-07-01T10:52:37")),  # no zone info -> UTC
        ("Tue, 1 Jul 2003 10:52:37 GMT", millis("2003-07-01T10:52:37")),
        ("Thu, 31 Dec 98 23:00:00 -0100", millis("1999-01-01T00:00:00")),  # RFC 5322 §4.3 two-digit year
        ("Sat, 1 Jan 49 00:00:00 +0000", millis("2049-01-01T00:00:00")),
        ("Sat, 1 Jan 55 00:00:00 +0000", millis("1955-01-01T00:00:00")),  # Python alone would say 2055
        ("1 Jan 105 00:00:00 +0000", millis("2005-01-01T00:00:00")),  # three-digit year: +1900
        ("Mon, 1 Jan 2055 00:00:00 +0000", millis("2055-01-01T00:00:00")),
    ],
)
def test_dates(date: str, expected: int) -> None:
    mail = decode_mail(f"Date: {date}\r\n\r\nx".encode())
    assert mail.date_raw == date
    assert mail.date_millis == expected
    assert mail.warnings == ()


@pytest.mark.parametrize("date", ["yesterday", "Mon, 32 Foo 2003 99:99:99 +0000", "", "31 Feb 2020 10:00 +0000"])
def test_invalid_date(date: str) -> None:
    mail = decode_mail(f"Date: {date}\r\n\r\nx".encode())
    assert mail.date_raw == date
    assert mail.date_millis is None
    assert mail.warnings == ("header 'Date': unparseable date",)


# ---------------------------------------------------------------- limits and garbage


def nested(depth: int) -> bytes:
    """A mail whose innermost text part sits ``depth`` multipart levels below the top."""
    head = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(depth))
    tail = "".join(f"\r\n--b{i}--\r\n" for i in reversed(range(depth)))
    return (head + "Content-Type: text/plain\r\n\r\ndeep" + tail).encode()


def test_depth_limit() -> None:
    assert decode_mail(nested(32)).text_body == "deep"
    with pytest.raises(MailTooLargeError, match="nesting deeper than 32"):
        decode_mail(nested(33))
    with pytest.raises(MailTooLargeError, match="nesting deeper than 3 "):
        decode_mail(nested(4), max_depth=3)


def test_nesting_beyond_the_parsers_recursion_is_mail_too_large() -> None:
    with pytest.raises(MailTooLargeError):
        decode_mail(nested(1200), max_depth=5000)


def test_part_limit() -> None:
    parts = "".join("--b\r\nContent-Type: application/octet-stream\r\n\r\nx\r\n" for _ in range(10))
    raw = f"Content-Type: multipart/mixed; boundary=b\r\n\r\n{parts}--b--\r\n".encode()
    assert len(decode_mail(raw).attachments) == 10
    assert len(decode_mail(raw, max_parts=11).attachments) == 10  # 10 leaves + the container
    with pytest.raises(MailTooLargeError, match="more than 10 MIME parts"):
        decode_mail(raw, max_parts=10)


@pytest.mark.parametrize("raw", [b"", b"\r\n", b"   \r\n\r\n"])
def test_empty_input(raw: bytes) -> None:
    mail = decode_mail(raw)
    assert mail == DecodedMail(
        message_id=None,
        subject=None,
        date_raw=None,
        date_millis=None,
        from_=(),
        to=(),
        cc=(),
        headers=(),
        text_body=None,
        html_body=None,
        attachments=(),
        warnings=("empty input: not a mail",),
    )


def test_not_a_mail_still_decodes() -> None:
    mail = decode_mail(b"\x00\xff\xfe garbage without any header\r\nsecond line")
    assert mail.headers == ()
    assert mail.text_body == "\x00ÿþ garbage without any header\r\nsecond line"
    assert mail.warnings == (
        "message: defect MissingHeaderBodySeparatorDefect",
        "message: no header fields",
        "message: undeclared 8-bit data read as 'latin-1'",
    )
    assert_clean(mail)


def test_unexpected_errors_become_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class Boom:
        def parsebytes(self, raw: bytes) -> None:
            raise KeyError("secret mail content")

    monkeypatch.setattr(mime_module, "_PARSER", Boom())
    with pytest.raises(DecodeError) as info:
        decode_mail(b"Subject: x\r\n\r\ny")
    assert type(info.value) is DecodeError
    assert "secret" not in str(info.value)
    # Not chained (``from None``): a logged traceback must not print the cause's message.
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "secret" not in "".join(traceback.format_exception(info.value))


def test_stdlib_parser_crash_becomes_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # CPython 3.11's compat32 parser raises TypeError while sorting RFC 2231 continuations
    # when 'boundary*=' and 'boundary*0=' are mixed (found by fuzzing).
    raw = b"Content-Type: multipart/mixed; boundary*=x; boundary*0=y\r\n\r\nbody"
    with monkeypatch.context() as m:
        m.setattr(mime_module, "_PARSER", mime_module.SPLITTERS["compat32"])
        with pytest.raises(DecodeError, match="unexpected TypeError") as info:
            decode_mail(raw)
    assert info.value.__cause__ is None
    # The default splitter (fastmime) takes such a boundary as unusable instead: the multipart
    # stays one opaque part and the mail is delivered (tests/unit/test_fastmime.py).
    mail = decode_mail(raw)
    assert "message: defect NoBoundaryInMultipartDefect" in mail.warnings
    assert [a.content_type for a in mail.attachments] == ["multipart/mixed"]


def test_warnings_never_contain_content() -> None:
    secret = "TOPSECRET"
    raw = (
        f"Subject: =?{secret}?q?{secret}?=\r\n"
        f"Date: {secret}\r\n"
        f"To: {secret} <<<\r\n"
        f"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        f"--b\r\nContent-Type: text/plain; charset=x-{secret}-x\r\n"
        f"Content-Transfer-Encoding: quoted-printable\r\n\r\n{secret}=ZZ\xff\r\n"
        f"--b\r\nContent-Type: application/x; name={secret}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        f"{secret}!!\r\n"
    ).encode("latin-1")
    mail = decode_mail(raw)
    assert len(mail.warnings) >= 5
    # Charset labels are reported (reduced to a safe alphabet, at most 40 characters);
    # nothing else from the mail is.
    for warning in mail.warnings:
        assert secret not in warning.replace(f"x-{secret}-x", "").replace(f"'{secret}'", ""), warning


def test_clean_str() -> None:
    assert clean_str("plain é") == "plain é"
    assert clean_str("a\udcffb\ud800") == "a\ufffdb\ufffd"


def test_surrogates_never_leak() -> None:
    # Python's UTF-7 decoder returns lone surrogates for unpaired UTF-16 code units.
    assert b"+2DQ-".decode("utf-7") == "\ud834"
    raw = (
        b"Subject: \xff\xfe =?utf-7?q?+2DQ-?=\r\nX-Bin: \x80\x81\r\n"
        b"Content-Type: text/plain; charset=utf-7\r\n\r\n+2DQ- lone"
    )
    mail = decode_mail(raw)
    assert_clean(mail)
    assert mail.subject == "ÿþ \ufffd"
    assert mail.text_body == "\ufffd lone"
    assert mail.headers[1] == Header("X-Bin", "\x80\x81", "\x80\x81")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=2000),
        st.lists(
            st.sampled_from(
                [
                    b"Content-Type: multipart/mixed; boundary=b\r\n",
                    b"Content-Type: message/rfc822\r\n",
                    b"Content-Type: text/plain; charset=uft-8\r\n",
                    b"Content-Transfer-Encoding: base64\r\n",
                    b"Content-Transfer-Encoding: quoted-printable\r\n",
                    b"Content-Disposition: attachment; filename*0*=utf-8''%C3; filename*1*=%A9\r\n",
                    b"Subject: =?utf-8?b?w6k?= =?iso-8859-1?q?=E9?=\r\n",
                    b"Date: Mon, 1 Jan 55 10:00 +0000\r\n",
                    b"From: a@b, =?utf-8?q?x?= <c@d>\r\n",
                    b"\r\n",
                    b"--b\r\n",
                    b"--b--\r\n",
                    b"\xff\xfe\xc3\r\n",
                    b"QUJD=ZZ==\r\n",
                ]
            ),
            max_size=40,
        ).map(b"".join),
    )
)
def test_property_arbitrary_bytes(raw: bytes) -> None:
    try:
        mail = decode_mail(raw)
    except (DecodeError, MailTooLargeError):
        return
    assert isinstance(mail, DecodedMail)
    assert_clean(mail)


# ---------------------------------------------------------------- the CPython email test corpus


def corpus_dir() -> Path | None:
    debian = Path("/usr/lib/python3.11/test/test_email/data")
    if debian.is_dir():
        return debian
    try:
        test_package = importlib.import_module("test")  # CPython's own test package, when installed
    except ImportError:
        return None
    candidate = Path(os.path.dirname(test_package.__file__ or "")) / "test_email" / "data"
    return candidate if candidate.is_dir() else None


def test_cpython_email_corpus() -> None:
    directory = corpus_dir()
    if directory is None:
        pytest.skip("CPython's test_email data is not installed")
    files = sorted(directory.glob("msg_*.txt"))
    assert files
    for path in files:
        try:
            mail = decode_mail(path.read_bytes())
        except (DecodeError, MailTooLargeError):
            continue
        assert_clean(mail)


@pytest.mark.parametrize("boundary", [b"inner", b"in\xc3\xa9ner"])
def test_nested_multipart_message_round_trips_byte_for_byte(boundary: bytes) -> None:
    inner = (
        b"From: inner@example.org\r\n"
        b"Subject: =?utf-8?q?folded?=\r\n  continued\r\n"
        b'Content-Type: multipart/alternative; boundary="' + boundary + b'"\r\n'
        b"\r\n"
        b"preamble\r\n"
        b"--" + boundary + b"\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"\r\n"
        b"caf\xc3\xa9\r\n"
        b"--" + boundary + b"\r\n"
        b"Content-Type: text/html\r\n"
        b"\r\n"
        b"<p>x</p>\r\n"
        b"--" + boundary + b"--\r\n"
        b"epilogue"
    )
    raw = (
        b"Content-Type: multipart/mixed; boundary=out\r\n\r\n--out\r\nContent-Type: text/plain\r\n\r\nouter\r\n"
        b"--out\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--out--\r\n"
    )
    mail = decode_mail(raw)
    assert mail.text_body == "outer"
    assert mail.html_body is None  # never taken from inside an attached message
    (att,) = mail.attachments
    assert att.content == inner
    nested = decode_mail(att.content)
    assert nested.subject == "folded  continued"
    if boundary.isascii():
        assert (nested.text_body, nested.html_body) == ("café", "<p>x</p>")
    else:
        # RFC 2046 §5.1.1 allows only 7-bit boundaries; compat32 cannot split on an 8-bit one,
        # so the whole multipart stays one opaque attachment (no crash, nothing lost).
        assert (nested.text_body, nested.html_body) == (None, None)
        assert [a.content_type for a in nested.attachments] == ["multipart/alternative"]
