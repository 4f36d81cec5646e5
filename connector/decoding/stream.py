"""Streaming Content-Transfer-Encoding decoders for large MIME leaf parts.

Why: a mail over ``runtime.spool_threshold_bytes`` lives in a spool file that is memory-mapped,
and its large attachments are located as ``(offset, length)`` spans (issue 6, docs/decisions/
0004-large-mail.md). Decoding such a part with :func:`connector.decoding.mime._b64decode` or
``_qpdecode`` would copy the whole encoded part and build the whole decoded part in memory, a few
times the attachment's size. :class:`DecodedStream` reads the span in windows of ``read_bytes``,
decodes each window and yields the result, so memory stays at a few windows whatever the size,
and hands consumed pages back through ``release`` so they do not stay resident either.

Contract: the concatenation of the pieces, and the ``repaired`` flag, are byte for byte those of
the whole-buffer functions in :mod:`connector.decoding.mime` (the tests check it differentially):

* base64 (RFC 2045 §6.8): the lenient algorithm of ``_b64decode`` (characters outside the
  alphabet dropped, each '='-terminated run decoded on its own with padding supplied, a dangling
  single character dropped), which gives the same bytes as its strict fast path whenever that
  one succeeds. The partial quantum (< 4 characters) of the current run is carried across
  windows. ``repaired`` is whether ``binascii.a2b_base64(compact, strict_mode=True)`` would fail
  on the whole input, tracked incrementally (counts of data characters and of '=' after them)
  with the rule CPython's binascii implements, see :func:`_strict_b64_valid`.
* quoted-printable (RFC 2045 §6.7): decoded in line-aligned pieces (cut after the last LF of a
  window). No ``binascii.a2b_qp`` escape (a soft break ends at the first LF) and no match of the
  trailing-blank rule can cross an LF, so decoding the pieces one by one equals decoding the
  whole; the end-of-data rules (a final '=' dropped, blanks at the very end removed) can only
  apply to the final piece, which is the only one not ending in LF.
* anything else is an identity encoding: the pieces are the windows themselves.

Throughput, measured in one script run on the same 50 MB inputs (Python 3.11, 1 MiB windows,
best of 3; base64 of random bytes in 76-character CRLF lines, QP from ``quopri`` of text with
about 19% of its bytes in escapes): base64 ~330 MB/s of encoded input streaming vs ~310 MB/s for
``_b64decode`` on the whole buffer; QP ~205 MB/s streaming vs ~175 MB/s for ``_qpdecode``. From
an mmap with ``release`` doing MADV_DONTNEED the figures are the same. Streaming costs nothing:
the decoder dominates, and a window stays in the CPU caches between the passes over it.

The base64 decoder itself is pybase64's (SIMD), not ``binascii.a2b_base64``: it only ever sees
the alphabet in whole quanta, where both give the same bytes, and on a 50 MB attachment it took
0.020 s instead of 0.147 s. A 50 MB mail's record path went 0.55 -> 0.27 CPU s; what is left is
the two ``translate`` passes, the SHA-256s and ``find`` (docs/decisions/0001, "Fourth round").
"""

from __future__ import annotations

import binascii
import mmap
import re
from collections.abc import Callable, Iterator

import pybase64

#: What can be decoded: the mail in memory, or a read-only mapping of its spool file.
Buffer = bytes | bytearray | memoryview | mmap.mmap

_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
#: Deleting these keeps the alphabet and '=': what the lenient decoder works on (_B64_JUNK
#: plus the blanks and line breaks _b64decode removes first).
_B64_NOISE = bytes(sorted(set(range(256)) - set(_B64_ALPHABET + b"=")))
#: Deleting these leaves only what strict mode would reject ("Only base64 data is allowed").
_B64_STRICT_OK = _B64_ALPHABET + b"=" + b" \t\r\n"

# The trailing-blank rule of _qpdecode, repeated here because mime.py imports this module (a
# test checks that both stay identical). RFC 2045 §6.7 rule (3): blanks at the end of a line
# were added in transport; the lookbehind and possessive quantifier keep it linear.
_QP_TRAILING_WS = re.compile(rb"(?<![ \t])[ \t]++(?=\r?\n|\Z)")
_WS_EOL_PROBE = bytes.maketrans(b"\t\r", b" \n")

_CTE_BASE64 = "base64"
_CTE_QP = "quoted-printable"


def _b64_run_end(run: bytes) -> bytes:
    """Decode the rest of a '='-terminated run exactly as ``_b64decode`` decodes a whole run."""
    rem = len(run) % 4
    chunk = run[:-1] if rem == 1 else run + b"=" * ((4 - rem) % 4)
    return binascii.a2b_base64(chunk) if chunk else b""


def _probe_pads_after_whole_quanta() -> bool:
    """Whether this CPython's strict mode accepts '=' after a whole number of quanta ("AAAA=").

    CPython 3.11 (checked on 3.11.7) skips such '=' without complaint; releases with the fix for
    gh-145264 refuse them as "Excess padding". As far as known that is the only difference in
    what the versions accept, so it is asked of the running interpreter once rather than
    assumed (the tests compare with the real function, whichever version runs them).
    """
    try:
        binascii.a2b_base64(b"AAAA=", strict_mode=True)
    except binascii.Error:
        return False
    return True


_PADS_AFTER_WHOLE_QUANTA = _probe_pads_after_whole_quanta()


def _strict_b64_valid(n_data: int, n_pad: int) -> bool:
    """Whether ``a2b_base64(s, strict_mode=True)`` accepts ``s``.

    Precondition: ``s`` holds only alphabet characters and '=', as ``n_data`` data characters
    followed by ``n_pad`` '=' (the caller checks both; anything else is rejected as "Only base64
    data", "Discontinuous padding" or "Excess data after padding"). Then strict mode accepts
    exactly:

    * no padding after a whole number of quanta (including the empty string);
    * in 3.11 (see :data:`_PADS_AFTER_WHOLE_QUANTA`) also any number of '=' after a non-empty
      whole number of quanta; a leading '=' is always refused;
    * two data characters and exactly "==", or three and exactly "=". One '=' fewer is
      "Incorrect padding"; one more is "Excess data after padding" (the quantum was complete).

    A remainder of one data character is always refused. Checked exhaustively against 3.11.7's
    function for every string of up to 9 characters over "AB=*", and by the tests.
    """
    rem = n_data % 4
    if rem == 0:
        return n_pad == 0 or (n_data > 0 and _PADS_AFTER_WHOLE_QUANTA)
    return (rem == 2 and n_pad == 2) or (rem == 3 and n_pad == 1)


def _qp_piece(piece: bytes) -> tuple[bytes, int, int]:
    """``_qpdecode`` on one line-aligned piece: decoded bytes, '=' in the output, '=3D' escapes.

    The two counts are summed over the pieces: ``_qpdecode`` flags a bad escape when the output
    holds more '=' than the input has '=3D'/'=3d', and neither count can straddle a cut after an
    LF, so the sums equal the counts on the whole.
    """
    # Same two-step test as _qpdecode: the translate probe finds every blank before CR/LF (and
    # some harmless extra cases); the rstrip branch only ever fires on the final piece, as every
    # other piece ends with LF.
    if b" \n" in piece.translate(_WS_EOL_PROBE):
        piece = _QP_TRAILING_WS.sub(b"", piece)
    elif piece.endswith((b" ", b"\t")):
        piece = piece.rstrip(b" \t")
    decoded = binascii.a2b_qp(piece)
    if b"=" not in piece:
        # No '=' in: nothing was escaped, so none can come out either.
        return decoded, 0, 0
    # Counted even when the output has no '=': a soft break '=\r...' can swallow a '=3D' that
    # another piece's literal '=' must be balanced against.
    return decoded, decoded.count(b"="), piece.count(b"=3D") + piece.count(b"=3d")


#: a quoted-printable line is held for at most this many windows before it is cut mid-line.
_QP_HOLD_WINDOWS = 4


def _qp_safe_cut(data: bytes) -> int:
    """A position near the end of ``data`` (which has no LF) where quoted-printable may be cut
    with the same result as decoding it whole, or 0. binascii.a2b_qp reads '=' + two hex
    digits (or '==') as one token, '=' + CR as a soft break that swallows everything up to the
    next LF, and _qpdecode strips blanks before a line end or the end of data: so no '=' in
    the two bytes before the cut, no blank or CR just before it, and no '=' CR before it."""
    if b"=\r" in data:
        return 0
    for cut in range(len(data), max(2, len(data) - 64), -1):
        if data[cut - 1] not in b" \t\r=" and data[cut - 2] != 0x3D:  # 0x3D: '='
            return cut
    return 0


class DecodedStream:
    """Iterate to get the decoded bytes of ``buf[start:stop]`` piece by piece.

    ``cte`` is the lowercased Content-Transfer-Encoding token; "base64" and "quoted-printable"
    are decoded, anything else passes through. Pieces are never empty and hold at most about
    ``read_bytes`` bytes (base64 decodes to 3/4 of that, QP to at most ~1.07x; a single QP line
    longer than a window is kept whole). ``release(pos)``, if given, is called with increasing
    positions once every byte of ``buf`` below ``pos`` has been copied out and will not be read
    again, so the caller can drop those pages of a mapped file.

    After a full iteration ``repaired`` is the flag ``_b64decode``/``_qpdecode`` would return
    for the whole part (always False for identity encodings) and ``decoded_bytes`` the total
    length yielded. Iterating again starts over.
    """

    def __init__(
        self,
        buf: Buffer,
        start: int,
        stop: int,
        cte: str,
        *,
        read_bytes: int = 1 << 20,
        release: Callable[[int], None] | None = None,
    ) -> None:
        if read_bytes < 1:
            raise ValueError("read_bytes must be at least 1")
        if not 0 <= start <= stop <= len(buf):
            raise ValueError("span outside the buffer")
        self._buf = buf
        self._start = start
        self._stop = stop
        self._cte = cte.lower()
        self._read_bytes = read_bytes
        self._release = release
        self.repaired = False
        self.encoded_bytes = stop - start
        self.decoded_bytes = 0

    def __iter__(self) -> Iterator[bytes]:
        self.repaired = False
        self.decoded_bytes = 0
        if self._cte == _CTE_BASE64:
            pieces = self._base64()
        elif self._cte == _CTE_QP:
            pieces = self._quoted_printable()
        else:
            pieces = self._windows()
        for piece in pieces:
            self.decoded_bytes += len(piece)
            yield piece

    # ------------------------------------------------------------ reading

    def _read(self, lo: int, hi: int) -> bytes:
        """Copy ``buf[lo:hi]`` out and release it: the copy is all this stream reads again."""
        chunk = self._buf[lo:hi]
        data = chunk if isinstance(chunk, bytes) else bytes(chunk)
        if self._release is not None:
            self._release(hi)
        return data

    def _windows(self) -> Iterator[bytes]:
        step = self._read_bytes
        for lo in range(self._start, self._stop, step):
            yield self._read(lo, min(lo + step, self._stop))

    # ------------------------------------------------------------ base64

    def _base64(self) -> Iterator[bytes]:
        # What reaches the decoder below is only the alphabet, in whole quanta, without '=':
        # there pybase64's validating decoder gives binascii's bytes, ~7x faster (SIMD).
        b64 = pybase64.b64decode
        tail = b""  # the partial quantum (< 4 characters) of the current '='-delimited run
        # Strict-mode validity of the whole compacted input, see _strict_b64_valid.
        strict_ok = True
        n_data = 0  # alphabet characters before the first '='
        n_pad = 0  # '=' characters seen
        for window in self._windows():
            if strict_ok and window.translate(None, _B64_STRICT_OK):
                strict_ok = False  # a character strict mode rejects
            clean = window.translate(None, _B64_NOISE)
            if not clean:
                continue
            if strict_ok:
                first_pad = clean.find(b"=")
                if first_pad < 0:
                    strict_ok = not n_pad  # data after padding
                    n_data += len(clean)
                elif (n_pad and first_pad) or clean.count(b"=", first_pad) != len(clean) - first_pad:
                    strict_ok = False  # data after padding
                else:
                    n_data += first_pad
                    n_pad += len(clean) - first_pad
            text = tail + clean if tail else clean
            pieces: list[bytes] = []
            if b"=" in clean:
                # Every run but the last ends inside this window. Rarely more than one '=' group:
                # the loop is per run, as in _b64decode, never per character.
                runs = text.split(b"=")
                pieces.extend(_b64_run_end(run) for run in runs[:-1] if run)
                text = runs[-1]
            whole = len(text) & ~3
            if whole:
                pieces.append(b64(memoryview(text)[:whole], validate=True))
            tail = text[whole:]
            out = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            if out:
                yield out
        if tail:
            out = _b64_run_end(tail)
            if out:
                yield out
        self.repaired = not (strict_ok and _strict_b64_valid(n_data, n_pad))

    # ------------------------------------------------------------ quoted-printable

    def _quoted_printable(self) -> Iterator[bytes]:
        read_bytes = self._read_bytes
        # After a cut the next read tops the held partial line up to read_bytes, but reads at
        # least 1/16 window so that a long carried line does not cause many tiny reads.
        min_read = max(1, read_bytes >> 4)
        held: list[bytes | memoryview] = []  # the unfinished line(s) after the last cut
        held_len = 0
        eq_out = eq_escaped = 0
        pos = self._start
        while pos < self._stop:
            room = read_bytes - held_len
            step = room if room >= min_read else (min_read if room > 0 else read_bytes)
            hi = min(pos + step, self._stop)
            window = self._read(pos, hi)
            pos = hi
            nl = window.rfind(b"\n")
            if nl < 0:
                # No line end yet: keep reading until one is found. A line longer than a few
                # windows (hostile, or bare-CR line ends; max_line_bytes stops most of them at
                # RETR) is cut where no escape, soft break or trailing blank can span the cut.
                held.append(window)
                held_len += len(window)
                if held_len > _QP_HOLD_WINDOWS * read_bytes:
                    joined = b"".join(held)
                    cut = _qp_safe_cut(joined)
                    if cut > 0:
                        decoded, n_eq, n_esc = _qp_piece(joined[:cut])
                        eq_out += n_eq
                        eq_escaped += n_esc
                        rest = joined[cut:]
                        held, held_len = ([rest] if rest else []), len(rest)
                        if decoded:
                            yield decoded
                    else:
                        held, held_len = [joined], len(joined)
                continue
            cut = nl + 1
            if held:
                held.append(memoryview(window)[:cut])
                piece = b"".join(held)
            else:
                piece = window if cut == len(window) else window[:cut]
            rest = window[cut:]
            held = [rest] if rest else []
            held_len = len(rest)
            decoded, n_eq, n_esc = _qp_piece(piece)
            eq_out += n_eq
            eq_escaped += n_esc
            if decoded:
                yield decoded
        if held:
            # The final piece: the only one where the end-of-data rules can apply.
            decoded, n_eq, n_esc = _qp_piece(b"".join(held))
            eq_out += n_eq
            eq_escaped += n_esc
            if decoded:
                yield decoded
        self.repaired = eq_out > eq_escaped
