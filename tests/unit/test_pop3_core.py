"""Sans-IO POP3 core: command encoding, status lines, multi-line bodies, listings (no network)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.errors import Pop3ArgumentError, Pop3ProtocolError
from connector.protocol.core import (
    MAX_STATUS_LINE,
    LineBuffer,
    MultilineReader,
    StatusLine,
    dot_stuff,
    encode_command,
    find_duplicate_uidls,
    parse_capa,
    parse_list,
    parse_stat,
    parse_status,
    parse_uidl,
    unstuff_response,
    validate_uidl,
)

# ---------------------------------------------------------------------------- helpers


def reference_stuff(body: bytes) -> bytes:
    """Independent, line-by-line RFC 1939 §3 encoder (what a server does)."""
    assert body == b"" or body.endswith(b"\r\n")
    lines = body.split(b"\r\n")[:-1]
    out = [(b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines]
    return b"".join(out) + b".\r\n"


def feed_chunks(wire: bytes, cuts: list[int]) -> tuple[bytes, MultilineReader, int]:
    """Feed ``wire`` split at ``cuts``; return (body, reader, bytes consumed until done)."""
    reader = MultilineReader()
    pieces: list[bytes] = []
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(wire))), len(wire)]
    consumed = 0
    for a, b in itertools.pairwise(bounds):
        pieces.append(reader.feed(wire[a:b]))
        consumed = b
        if reader.done:
            break
    return b"".join(pieces), reader, consumed


TRICKY_BODIES = [
    pytest.param(b"", id="empty"),
    pytest.param(b".\r\n", id="dot-line"),
    pytest.param(b"..\r\n", id="dotdot-line"),
    pytest.param(b".x\r\n", id="dot-x"),
    pytest.param(b"\r\n\r\n\r\n", id="crlf-only-lines"),
    pytest.param(b"a\r\n.\r\nb\r\n", id="dot-in-middle"),
    pytest.param(b"a\r\n.\r\n", id="dot-last"),
    pytest.param(b"...\r\n.\r\n..\r\n", id="dots"),
    pytest.param(b"x.\r\n.y.\r\n", id="inner-dots"),
    pytest.param(b"a\rb\nc\r\n", id="bare-cr-lf-inside-line"),
    pytest.param(b"\r\n.\r\n", id="empty-then-dot"),
    pytest.param(b"From: a\r\n\r\n.\r\n..\r\n.x\r\n\r\nend\r\n", id="mail"),
]


# ---------------------------------------------------------------------------- commands


def test_encode_command_basic() -> None:
    assert encode_command("user", "alice") == b"USER alice\r\n"
    assert encode_command("STAT") == b"STAT\r\n"
    assert encode_command("RETR", "12") == b"RETR 12\r\n"
    assert encode_command("USER", b"raw") == b"USER raw\r\n"
    assert encode_command("USER", "jörg") == "USER jörg\r\n".encode()


def test_encode_pass_allows_spaces_long_and_empty() -> None:
    assert encode_command("PASS", "p@ss wörd ünïcode") == "PASS p@ss wörd ünïcode\r\n".encode()
    long_pw = "x" * 200  # RFC 1939 §3's 40-octet argument limit is not enforced
    assert encode_command("PASS", long_pw) == b"PASS " + long_pw.encode() + b"\r\n"
    assert encode_command("PASS", "") == b"PASS \r\n"


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\x00b", "\r\n", "x\r\nDELE 1"])
@pytest.mark.parametrize("name", ["USER", "PASS", "RETR"])
def test_encode_refuses_cr_lf_nul(name: str, bad: str) -> None:
    with pytest.raises(Pop3ArgumentError) as info:
        encode_command(name, bad)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, Pop3ProtocolError)
    if name == "PASS":
        assert bad not in str(info.value) and "***" in str(info.value)


@pytest.mark.parametrize("bad", ["a b", "a\tb", ""])
def test_encode_refuses_whitespace_and_empty_outside_pass(bad: str) -> None:
    with pytest.raises(Pop3ArgumentError):
        encode_command("USER", bad)


@pytest.mark.parametrize("name", ["", "US", "USERS", "US3R", "US R", "ÜSER"])
def test_encode_refuses_bad_keyword(name: str) -> None:
    with pytest.raises(Pop3ArgumentError):
        encode_command(name)


# ---------------------------------------------------------------------------- status lines


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"+OK\r\n", StatusLine(True, "", None)),
        (b"+OK \r\n", StatusLine(True, "", None)),
        (b"+OK Dovecot ready.\r\n", StatusLine(True, "Dovecot ready.", None)),
        (b"+OK 2 320", StatusLine(True, "2 320", None)),
        (b"-ERR\r\n", StatusLine(False, "", None)),
        (b"-ERR no such message\r\n", StatusLine(False, "no such message", None)),
        (b"-ERR [IN-USE] Mailbox is locked\r\n", StatusLine(False, "Mailbox is locked", "IN-USE")),
        (b"-ERR [LOGIN-DELAY] wait 5 min\r\n", StatusLine(False, "wait 5 min", "LOGIN-DELAY")),
        (b"-ERR [SYS/TEMP] try later\r\n", StatusLine(False, "try later", "SYS/TEMP")),
        (b"-ERR [SYS/PERM] gone\r\n", StatusLine(False, "gone", "SYS/PERM")),
        (b"-ERR [AUTH] Authentication failed.\r\n", StatusLine(False, "Authentication failed.", "AUTH")),
        (b"-ERR [auth] lower\r\n", StatusLine(False, "lower", "AUTH")),
        (b"-ERR [AUTH]\r\n", StatusLine(False, "", "AUTH")),
        (b"-ERR [unclosed text\r\n", StatusLine(False, "[unclosed text", None)),
        (b"-ERR [] empty\r\n", StatusLine(False, "[] empty", None)),
        (b"-ERR [SYS//TEMP] bad levels\r\n", StatusLine(False, "[SYS//TEMP] bad levels", None)),
        (b"-ERR [has space] x\r\n", StatusLine(False, "[has space] x", None)),
        (b"+OK bare LF\n", StatusLine(True, "bare LF", None)),
        (b"-ERR caf\xc3\xa9 \xff\r\n", StatusLine(False, "café \ufffd", None)),
    ],
)
def test_parse_status(line: bytes, expected: StatusLine) -> None:
    assert parse_status(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"\r\n",
        b"OK\r\n",
        b"+ok\r\n",
        b"+OKAY\r\n",
        b"-ERROR x\r\n",
        b"* OK imap\r\n",
        b"+OK a\rb\r\n",
        b"+OK a\x00b\r\n",
        b"+OK a\r\nb\r\n",
        b"+ continuation\r\n",
    ],
)
def test_parse_status_malformed(line: bytes) -> None:
    with pytest.raises(Pop3ProtocolError):
        parse_status(line)


def test_parse_status_length_limit() -> None:
    ok = b"+OK " + b"x" * (MAX_STATUS_LINE - 6) + b"\r\n"
    assert len(ok) == MAX_STATUS_LINE
    assert parse_status(ok).ok
    with pytest.raises(Pop3ProtocolError, match="longer than"):
        parse_status(b"+OK " + b"x" * MAX_STATUS_LINE + b"\r\n")


def test_status_describe() -> None:
    assert parse_status(b"-ERR [SYS/TEMP] later").describe() == "[SYS/TEMP] later"
    assert parse_status(b"-ERR plain").describe() == "plain"


def test_line_buffer_framing_and_limit() -> None:
    buf = LineBuffer(max_line=16)
    buf.feed(b"+OK a\r")
    assert buf.next_line() is None
    buf.feed(b"\n+OK b\r\nBODY")
    assert buf.next_line() == b"+OK a\r\n"
    assert buf.next_line() == b"+OK b\r\n"
    assert buf.next_line() is None
    assert buf.take() == b"BODY"
    buf.unread(b"xy")
    buf.unread(b"")
    assert len(buf) == 2
    buf.take()
    buf.feed(b"x" * 16)
    with pytest.raises(Pop3ProtocolError):
        buf.next_line()


# ---------------------------------------------------------------------------- multi-line bodies


@pytest.mark.parametrize("body", TRICKY_BODIES)
def test_multiline_examples_every_split(body: bytes) -> None:
    wire = reference_stuff(body)
    assert dot_stuff(body) == wire
    assert unstuff_response(wire) == body
    for cut in range(len(wire) + 1):
        out, reader, _ = feed_chunks(wire, [cut])
        assert out == body and reader.done and reader.leftover == b""
    for two in range(len(wire) + 1):
        for three in range(two, len(wire) + 1):
            out, reader, _ = feed_chunks(wire, [two, three])
            assert out == body, (two, three)


@pytest.mark.parametrize("body", TRICKY_BODIES)
def test_multiline_byte_by_byte(body: bytes) -> None:
    wire = reference_stuff(body)
    out, reader, consumed = feed_chunks(wire, list(range(len(wire))))
    assert out == body and reader.done and consumed == len(wire)
    assert reader.raw_bytes == len(wire)


def test_multiline_terminator_split_at_every_offset_in_large_body() -> None:
    body = (b"line of text\r\n" * 50) + b".\r\n..\r\n"
    wire = reference_stuff(body)
    for offset in range(len(wire) - 10, len(wire) + 1):
        out, reader, _ = feed_chunks(wire, [offset])
        assert out == body and reader.done


def test_multiline_one_megabyte_line() -> None:
    body = b"." + b"A" * (1 << 20) + b"\r\n" + b"tail\r\n"
    wire = reference_stuff(body)
    out, reader, _ = feed_chunks(wire, list(range(0, len(wire), 65536)))
    assert out == body and reader.done
    out, reader, _ = feed_chunks(wire, [])
    assert out == body


def test_multiline_leftover_and_raw_bytes() -> None:
    reader = MultilineReader()
    first = reader.feed(b"a\r\n.\r")
    assert not reader.done
    assert first + reader.feed(b"\n+OK next\r\n") == b"a\r\n"
    assert reader.done
    assert reader.leftover == b"+OK next\r\n"
    assert reader.raw_bytes == len(b"a\r\n.\r\n")
    with pytest.raises(Pop3ProtocolError):
        reader.feed(b"more")


def test_multiline_streams_before_terminator() -> None:
    reader = MultilineReader()
    first = reader.feed(b"x" * 1000 + b"\r\n")
    assert first.startswith(b"x" * 990)  # emitted without waiting for the end
    rest = reader.feed(b".\r\n")
    assert first + rest == b"x" * 1000 + b"\r\n"


def test_multiline_unstuffed_dot_line_is_stripped_per_rfc() -> None:
    # RFC 1939 §3: a line starting with "." followed by non-CRLF loses the dot, even when
    # the server forgot to stuff it.
    assert unstuff_response(b".x\r\n.\r\n") == b"x\r\n"


def test_unstuff_response_errors() -> None:
    with pytest.raises(Pop3ProtocolError, match="without its terminator"):
        unstuff_response(b"a\r\nb\r\n")
    with pytest.raises(Pop3ProtocolError, match="after the multi-line terminator"):
        unstuff_response(b"a\r\n.\r\nextra")


def test_feed_all() -> None:
    wire = reference_stuff(b".a\r\nb\r\n")
    chunks = [wire[i : i + 2] for i in range(0, len(wire), 2)]
    assert b"".join(MultilineReader().feed_all(chunks)) == b".a\r\nb\r\n"
    with pytest.raises(Pop3ProtocolError):
        list(MultilineReader().feed_all([b"a\r\n"]))


def test_dot_stuff_appends_missing_crlf() -> None:
    assert dot_stuff(b".no newline") == b"..no newline\r\n.\r\n"


line_strategy = st.one_of(
    st.sampled_from([b"", b".", b"..", b".x", b"...", b"x.", b"\r", b"\n", b". ", b".\r"]),
    st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b"")),
)
body_strategy = st.lists(line_strategy, max_size=30).map(
    lambda lines: b"".join(line.replace(b"\r\n", b"") + b"\r\n" for line in lines)
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=body_strategy,
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=40),
    trailer=st.sampled_from([b"", b"+OK\r\n", b".\r\n", b"\r\n.\r\n"]),
)
def test_property_any_chunking_roundtrips(body: bytes, cuts: list[int], trailer: bytes) -> None:
    # A line ending in "\r" followed by the line's CRLF would form "\r\r\n": still one line.
    wire = reference_stuff(body)
    out, reader, consumed = feed_chunks(wire + trailer, [c % (len(wire) + len(trailer) + 1) for c in cuts])
    assert out == body
    assert reader.done
    assert reader.leftover + (wire + trailer)[consumed:] == trailer


# ---------------------------------------------------------------------------- listings


def test_parse_uidl_ok() -> None:
    body = b"1 whqtswO00WBw418f9t5JxYwZ\r\n2 QhdPYR:00WBw1Ph7x7\r\n10 " + b"~" * 70 + b"\r\n"
    assert parse_uidl(body) == [(1, "whqtswO00WBw418f9t5JxYwZ"), (2, "QhdPYR:00WBw1Ph7x7"), (10, "~" * 70)]
    assert parse_uidl(b"") == []


@pytest.mark.parametrize(
    "body",
    [
        b"1 " + b"a" * 71 + b"\r\n",  # RFC 1939 §7: at most 70 characters
        b"1 caf\xc3\xa9\r\n",  # outside 0x21-0x7E
        b"1 a\x7fb\r\n",
        b"1 \r\n",
        b"1\r\n",
        b"1 a b\r\n",
        b"1  a\r\n",
        b"0 a\r\n",
        b"-1 a\r\n",
        b"x a\r\n",
        b"1 a\r\n1 b\r\n",  # message number twice
        b"1 a",  # no CRLF
        b"\r\n",
    ],
)
def test_parse_uidl_invalid(body: bytes) -> None:
    with pytest.raises(Pop3ProtocolError):
        parse_uidl(body)


def test_validate_uidl() -> None:
    assert validate_uidl("abc") == "abc"
    for bad in ("", "a b", "ü", "x" * 71):
        with pytest.raises(Pop3ProtocolError):
            validate_uidl(bad)


def test_find_duplicate_uidls() -> None:
    assert find_duplicate_uidls([(1, "a"), (2, "b"), (3, "a"), (4, "a")]) == {"a": [1, 3, 4]}
    assert find_duplicate_uidls([(1, "a"), (2, "b")]) == {}


def test_parse_list() -> None:
    assert parse_list(b"1 120\r\n2 200 extra info\r\n") == [(1, 120), (2, 200)]
    assert parse_list(b"") == []
    for bad in (b"1\r\n", b"1 x\r\n", b"a 1\r\n", b"1 1\r\n1 2\r\n", b"1 -5\r\n"):
        with pytest.raises(Pop3ProtocolError):
            parse_list(bad)


def test_parse_stat() -> None:
    assert parse_stat(parse_status(b"+OK 2 320\r\n")) == (2, 320)
    assert parse_stat(parse_status(b"+OK 0 0 extra\r\n")) == (0, 0)
    for bad in (b"+OK\r\n", b"+OK two 3\r\n", b"-ERR 1 2\r\n", b"+OK 1\r\n"):
        with pytest.raises(Pop3ProtocolError):
            parse_stat(parse_status(bad))


def test_parse_capa() -> None:
    body = b"CAPA\r\nTOP\r\nuidl\r\nSASL PLAIN LOGIN\r\nRESP-CODES\r\nIMPLEMENTATION Dovecot\r\n\r\nSTLS\r\n"
    assert parse_capa(body) == {
        "CAPA": [],
        "TOP": [],
        "UIDL": [],
        "SASL": ["PLAIN", "LOGIN"],
        "RESP-CODES": [],
        "IMPLEMENTATION": ["Dovecot"],
        "STLS": [],
    }
    assert parse_capa(b"") == {}
