"""connector.decoding.stream: streaming base64 / quoted-printable decoding of large parts.

Differential tests: for every input, the pieces yielded by :class:`DecodedStream` must join to
exactly what ``mime._b64decode`` / ``mime._qpdecode`` return for the whole buffer, with the same
repair flag. Windows of 1 to 64 bytes put a window edge at every position of the inputs (inside
quanta, between '=' and its hex digits, between CR and LF, inside runs of trailing blanks), and
each input is read from ``bytes``, a ``memoryview`` and a real ``mmap`` of a temporary file,
with other bytes before and after the span so that reading outside it would show.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import itertools
import mmap
import os
import quopri
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.decoding import mime, stream
from connector.decoding.stream import DecodedStream

KINDS = ("bytes", "memoryview", "mmap")
# Bytes around the span: '=', a line end and junk, which would change the result if read.
PREFIX = b"QUJD=\r\nX="
SUFFIX = b"=\n ==41YWJj"
IDENTITY_CTES = ("", "7bit", "8bit", "binary", "x-uuencode-ish")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def buffer_of(kind: str, blob: bytes) -> Iterator[bytes | memoryview | mmap.mmap]:
    """``blob`` as the given kind of buffer (the mmap is of a real temporary file)."""
    if kind == "bytes":
        yield blob
    elif kind == "memoryview":
        yield memoryview(blob)
    else:
        with tempfile.TemporaryFile() as f:
            f.write(blob)
            f.flush()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                yield m


@dataclass
class Run:
    out: bytes
    pieces: list[bytes]
    releases: list[int]
    stream: DecodedStream
    start: int
    stop: int


def decode(buf: bytes | memoryview | mmap.mmap, start: int, stop: int, cte: str, read_bytes: int) -> Run:
    releases: list[int] = []
    s = DecodedStream(buf, start, stop, cte, read_bytes=read_bytes, release=releases.append)
    pieces = list(s)
    return Run(b"".join(pieces), pieces, releases, s, start, stop)


def check_common(run: Run) -> None:
    """What holds for every encoding: counters, non-empty pieces, release positions."""
    assert all(run.pieces), "a piece was empty"
    assert run.stream.decoded_bytes == len(run.out)
    assert run.stream.encoded_bytes == run.stop - run.start
    assert run.releases == sorted(run.releases), "release positions went backwards"
    assert all(run.start < pos <= run.stop for pos in run.releases)
    if run.stop > run.start:
        assert run.releases[-1] == run.stop, "the whole span must be released in the end"
    else:
        assert run.releases == []


def check_base64(data: bytes, read_bytes: int, kind: str) -> None:
    expected, repaired = mime._b64decode(data)
    with buffer_of(kind, PREFIX + data + SUFFIX) as buf:
        run = decode(buf, len(PREFIX), len(PREFIX) + len(data), "base64", read_bytes)
    assert run.out == expected
    assert run.stream.repaired is repaired
    check_common(run)
    # A window of read_bytes characters plus a carried partial quantum decodes to at most this.
    assert max(map(len, run.pieces), default=0) <= (read_bytes + 3) * 3 // 4


def check_qp(data: bytes, read_bytes: int, kind: str) -> None:
    expected, bad = mime._qpdecode(data)
    with buffer_of(kind, PREFIX + data + SUFFIX) as buf:
        run = decode(buf, len(PREFIX), len(PREFIX) + len(data), "quoted-printable", read_bytes)
    assert run.out == expected
    assert run.stream.repaired is bad
    check_common(run)
    longest_line = max(map(len, data.split(b"\n")), default=0) + 1
    min_read = max(1, read_bytes >> 4)
    bound = read_bytes + min_read - 1 if longest_line <= read_bytes else longest_line + read_bytes
    assert max(map(len, run.pieces), default=0) <= bound


# ---------------------------------------------------------------- strategies

B64_JUNK = b"*!#-_.~\x00\x0b\x0c\x80\xff\xc3\xa9"


def wrap(text: bytes, width: int, eol: bytes) -> bytes:
    return eol.join(text[i : i + width] for i in range(0, len(text), width))


@st.composite
def valid_base64(draw: st.DrawFn) -> bytes:
    raw = draw(st.binary(max_size=300))
    width = draw(st.sampled_from([4, 7, 60, 76, 1000]))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    text = wrap(base64.b64encode(raw), width, eol)
    return text + (eol if draw(st.booleans()) else b"")


@st.composite
def damaged_base64(draw: st.DrawFn) -> bytes:
    """Valid base64 blocks (often several, concatenated), then damaged in random places."""
    blocks = draw(st.lists(st.binary(max_size=80), min_size=1, max_size=4))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    text = bytearray(eol.join(wrap(base64.b64encode(b), draw(st.sampled_from([5, 76])), eol) for b in blocks))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["junk", "delete", "pad", "space", "strip-pad"]))
        pos = draw(st.integers(0, len(text)))
        if op == "junk":
            text[pos:pos] = draw(st.binary(min_size=1, max_size=3).filter(lambda b: b[0] in B64_JUNK))
        elif op == "delete" and text:
            del text[min(pos, len(text) - 1)]
        elif op == "pad":
            text[pos:pos] = b"=" * draw(st.integers(1, 3))
        elif op == "space":
            text[pos:pos] = draw(st.sampled_from([b" ", b"\t", b"\r\n", b"\n", b"\r"]))
        else:
            text = bytearray(bytes(text).rstrip(b"=\r\n"))
    return bytes(text)


# Structural fuzz: short strings over the characters that matter to the state machine.
base64_soup = st.lists(st.sampled_from([b"A", b"Q", b"/", b"+", b"=", b"==", b"\r\n", b"\n", b" ", b"*"]), max_size=40)

QP_TOKENS = [b"a", b"=", b"=3D", b"=3d", b"=41", b"=e9", b"=E9", b"=4", b"=G1", b"==", b" ", b"\t", b"\r", b"\n"]
QP_TOKENS += [b"\r\n", b"=\r\n", b"=\n", b"=\r", b"  \r\n", b"\t\n", b"x" * 70]
qp_soup = st.lists(st.sampled_from(QP_TOKENS), max_size=40)


@st.composite
def encoded_qp(draw: st.DrawFn) -> bytes:
    """quopri output (soft breaks every 76 characters) of text or binary, with either line end."""
    raw = draw(st.text(max_size=400)).encode() if draw(st.booleans()) else draw(st.binary(max_size=300))
    text = quopri.encodestring(raw, quotetabs=draw(st.booleans()))
    if draw(st.booleans()):
        text = text.replace(b"\n", b"\r\n")
    return text


# ---------------------------------------------------------------- base64


@SETTINGS
@given(data=valid_base64(), read_bytes=st.integers(1, 64), kind=st.sampled_from(KINDS))
def test_base64_valid_with_line_breaks(data: bytes, read_bytes: int, kind: str) -> None:
    check_base64(data, read_bytes, kind)


@SETTINGS
@given(data=damaged_base64(), read_bytes=st.integers(1, 64), kind=st.sampled_from(KINDS))
def test_base64_damaged_junk_padding_concatenated(data: bytes, read_bytes: int, kind: str) -> None:
    check_base64(data, read_bytes, kind)


@SETTINGS
@given(parts=base64_soup, read_bytes=st.integers(1, 16), kind=st.sampled_from(KINDS))
def test_base64_soup(parts: list[bytes], read_bytes: int, kind: str) -> None:
    check_base64(b"".join(parts), read_bytes, kind)


def test_base64_every_short_string() -> None:
    """Exhaustive over short strings: the strict-mode rule is right in every corner."""
    checked = 0
    for n in range(7):
        for chars in itertools.product(b"AQ=*\n", repeat=n):
            data = bytes(chars)
            for read_bytes in (1, 3):
                check_base64(data, read_bytes, "bytes")
                checked += 1
    assert checked == 2 * sum(5**n for n in range(7))


@pytest.mark.parametrize(
    ("data", "repaired"),
    [
        (b"", False),
        (b"\r\n", False),
        (b"QUJD", False),
        (b"QUI=", False),
        (b"QQ==", False),
        (b"QQ", True),  # missing padding
        (b"QQ=", True),  # short padding
        (b"QQ===", True),  # excess data after complete padding
        (b"Q", True),  # a dangling single character carries no byte
        (b"QUJDR", True),
        (b"QQ==QUI=", True),  # two blocks concatenated
        (b"=QUJD", True),  # leading padding
        (b"QU*JD", True),  # junk
        (b"QQ=\r\n=", False),  # padding split by a line break
    ],
)
@pytest.mark.parametrize("read_bytes", [1, 2, 3, 5])
def test_base64_corners(data: bytes, repaired: bool, read_bytes: int) -> None:
    assert mime._b64decode(data)[1] is repaired
    check_base64(data, read_bytes, "bytes")


def test_base64_excess_padding_after_whole_quanta_follows_the_interpreter() -> None:
    """3.11 strict mode accepts '=' after whole quanta ("QUJD="), later versions refuse it."""
    try:
        binascii.a2b_base64(b"QUJD==", strict_mode=True)
        accepted = True
    except binascii.Error:
        accepted = False
    assert stream._PADS_AFTER_WHOLE_QUANTA is accepted
    for read_bytes in (1, 2, 4, 64):
        run = decode(b"QUJD\r\n==", 0, 8, "base64", read_bytes)
        assert run.out == b"ABC"
        assert run.stream.repaired is (not accepted)
        check_base64(b"QUJD\r\n==", read_bytes, "mmap")


def test_base64_many_padding_runs() -> None:
    """'=' after every few characters: one run each, as _b64decode splits them."""
    data = b"QQ==QUI=QUJD=Q=QU=\n" * 50 + b"===="
    for read_bytes in (1, 7, 64, 1 << 20):
        check_base64(data, read_bytes, "bytes")


# ---------------------------------------------------------------- quoted-printable


@SETTINGS
@given(data=encoded_qp(), read_bytes=st.integers(1, 64), kind=st.sampled_from(KINDS))
def test_qp_encoded_text_and_binary(data: bytes, read_bytes: int, kind: str) -> None:
    check_qp(data, read_bytes, kind)


@SETTINGS
@given(parts=qp_soup, read_bytes=st.integers(1, 64), kind=st.sampled_from(KINDS))
def test_qp_soup(parts: list[bytes], read_bytes: int, kind: str) -> None:
    check_qp(b"".join(parts), read_bytes, kind)


def test_qp_every_short_string() -> None:
    checked = 0
    for n in range(6):
        for chars in itertools.product(b"=3D \r\nx", repeat=n):
            data = bytes(chars)
            check_qp(data, 1, "bytes")
            checked += 1
    assert checked == sum(7**n for n in range(6))


@pytest.mark.parametrize(
    "data",
    [
        b"caf=C3=A9 ok\r\n",
        b"soft=\r\nbreak=\nand=",  # soft breaks with either line end; a final '=' is dropped
        b"trailing  \r\nblanks\t \nat the end \t",
        b"lower =c3=a9 hex\n",
        b"bad =ZZ escape =4\n=",
        b"bare\rCR \r in a line\r",
        b"=\r swallowed up to the LF\nnext",  # '=' CR skips to the first LF
        b"=\rno line end at all",
        b"x" * 500 + b" \r\n" + b"y=3D" * 200,  # lines much longer than the window
        b"==41 literal\n",
        b"",
        b"   ",
    ],
)
@pytest.mark.parametrize("read_bytes", [1, 2, 3, 4, 7, 64])
def test_qp_corners(data: bytes, read_bytes: int) -> None:
    check_qp(data, read_bytes, "bytes")


def test_qp_bad_escape_flag_sums_counts_over_pieces() -> None:
    """A soft break '=' CR swallows a '=3D' in one piece that balances a bad '=' in another.

    _qpdecode compares whole counts, and finds no bad escape here; flagging per piece would.
    """
    data = b"=\r=3D\nx=zz\n"
    assert mime._qpdecode(data) == (b"x=zz\n", False)
    for read_bytes in (1, 4, 6, 64):
        run = decode(data, 0, len(data), "quoted-printable", read_bytes)
        assert run.out == b"x=zz\n"
        assert run.stream.repaired is False
    real_bad = b"a=zz\nb=3D\n"
    assert mime._qpdecode(real_bad)[1] is True
    assert decode(real_bad, 0, len(real_bad), "quoted-printable", 3).stream.repaired is True


def test_qp_long_line_is_cut_where_it_is_safe_and_pieces_stay_bounded() -> None:
    lines = [b"short line =C3=A9\r\n"] * 40 + [b"L" * 5000 + b"\r\n"] + [b"tail line\r\n"] * 40
    data = b"".join(lines)
    run = decode(data, 0, len(data), "quoted-printable", 64)
    assert run.out == mime._qpdecode(data)[0]
    # The long line is cut after at most 4 windows held (plus the window read): never whole.
    assert max(map(len, run.pieces)) <= 6 * 64
    assert all(len(p) <= 64 + 4 for p in run.pieces if b"L" not in p)


@pytest.mark.parametrize("read_bytes", [1, 2, 3, 5, 8, 13])
def test_qp_without_line_ends_is_equal_to_the_whole_decoder(read_bytes: int) -> None:
    rnd = random.Random(read_bytes)
    alphabet = [b"a", b" ", b"\t", b"=", b"=3D", b"=C3", b"==", b"=4", b"\r", b"x y", b"=0A"]
    for _ in range(300):
        data = b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 60)))
        run = decode(data, 0, len(data), "quoted-printable", read_bytes)
        assert (run.out, run.stream.repaired) == mime._qpdecode(data), data


def test_qp_soft_break_with_cr_only_is_held_until_the_line_ends() -> None:
    data = b"abc=\r" + b"swallowed " * 100 + b"\nafter\n"
    run = decode(data, 0, len(data), "quoted-printable", 8)
    assert (run.out, run.stream.repaired) == mime._qpdecode(data)


def test_qp_trailing_blank_rule_is_the_one_of_mime() -> None:
    assert stream._QP_TRAILING_WS.pattern == mime._QP_TRAILING_WS.pattern
    assert stream._QP_TRAILING_WS.flags == mime._QP_TRAILING_WS.flags
    assert stream._WS_EOL_PROBE == mime._WS_EOL_PROBE


# ---------------------------------------------------------------- identity and the API


@pytest.mark.parametrize("cte", IDENTITY_CTES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("read_bytes", [1, 5, 64])
def test_identity_encodings_return_the_exact_slice(cte: str, kind: str, read_bytes: int) -> None:
    data = bytes(range(256)) * 3 + b"=3D==\r\n"
    with buffer_of(kind, PREFIX + data + SUFFIX) as buf:
        run = decode(buf, len(PREFIX), len(PREFIX) + len(data), cte, read_bytes)
    assert run.out == data
    assert all(isinstance(p, bytes) for p in run.pieces)
    assert [len(p) for p in run.pieces[:-1]] == [read_bytes] * (len(run.pieces) - 1)
    assert run.stream.repaired is False
    check_common(run)


class RecordingBytes(bytes):
    """bytes that remember the length of every slice taken of them."""

    def __new__(cls, data: bytes) -> RecordingBytes:
        self = super().__new__(cls, data)
        self.slices: list[int] = []
        return self

    def __getitem__(self, key):  # type: ignore[no-untyped-def, override]
        got = bytes.__getitem__(self, key)
        if isinstance(key, slice):
            self.slices.append(len(got))
        return got


@pytest.mark.parametrize("cte", ["base64", "quoted-printable", "binary"])
def test_the_buffer_is_only_read_in_windows(cte: str) -> None:
    data = base64.encodebytes(os.urandom(3000)) if cte == "base64" else quopri.encodestring(os.urandom(3000))
    buf = RecordingBytes(data)
    run = decode(buf, 0, len(buf), cte, 100)
    expected = {"base64": mime._b64decode, "quoted-printable": mime._qpdecode}.get(cte, lambda d: (d, False))(data)
    assert run.out == expected[0]
    assert buf.slices, "nothing was read"
    assert max(buf.slices) <= 100
    assert sum(buf.slices) == len(data), "every byte is read exactly once"


def test_iterating_again_starts_over() -> None:
    data = b"QQ\r\nQUJD"  # six characters: repaired
    expected = mime._b64decode(data)
    assert expected[1] is True
    s = DecodedStream(data, 0, len(data), "base64", read_bytes=3)
    for _ in range(2):
        assert b"".join(s) == expected[0]
        assert (s.repaired, s.decoded_bytes) == (True, len(expected[0]))


@pytest.mark.parametrize(
    ("start", "stop", "read_bytes"),
    [(-1, 4, 10), (3, 2, 10), (0, 9, 10), (0, 4, 0)],
)
def test_bad_arguments_are_refused(start: int, stop: int, read_bytes: int) -> None:
    with pytest.raises(ValueError):
        DecodedStream(b"QUJD", start, stop, "base64", read_bytes=read_bytes)


# ---------------------------------------------------------------- a large part from a mapped file


def test_30_mb_base64_from_mmap_in_1_mib_windows() -> None:
    raw = random.Random(6).randbytes(22_500_000)
    encoded = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    assert len(encoded) > 30_000_000
    released: list[int] = []
    digest = hashlib.sha256()
    largest = 0
    with tempfile.TemporaryFile() as f:
        f.write(encoded)
        f.flush()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:

            def release(pos: int) -> None:
                released.append(pos)
                m.madvise(mmap.MADV_DONTNEED, 0, pos // mmap.PAGESIZE * mmap.PAGESIZE)

            s = DecodedStream(m, 0, len(m), "base64", read_bytes=1 << 20, release=release)
            for piece in s:
                digest.update(piece)
                largest = max(largest, len(piece))
    assert digest.hexdigest() == hashlib.sha256(raw).hexdigest()
    assert s.decoded_bytes == len(raw)
    assert s.repaired is False
    assert 0 < largest <= 1 << 20
    assert released == sorted(released)
    assert released[-1] == len(encoded)
    assert len(released) == -(-len(encoded) // (1 << 20))
