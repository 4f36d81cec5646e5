"""Sans-IO POP3 protocol core: bytes in, bytes and values out; no sockets, no clocks.

In the spirit of h11: everything here is a pure function of the bytes it is given, so it
can be tested exhaustively (every chunking, every split point) and reused by any I/O
layer (the blocking :mod:`connector.protocol.transport`, or an async one later).

References
----------
* RFC 1939 (POP3): §3 command/response syntax, multi-line responses and dot-stuffing;
  §5-§7 STAT, LIST, UIDL, RETR; §7 unique-id syntax.
* RFC 2449 (POP3 extensions): §5 CAPA, §6.7 EXPIRE and §6.8 LOGIN-DELAY, §8 extended
  response codes.
* RFC 3206 (SYS and AUTH response codes).

Contracts
---------
* Every malformed server input raises :class:`~connector.errors.Pop3ProtocolError`;
  nothing here raises ``ValueError``/``IndexError``/``UnicodeDecodeError`` to callers,
  except :func:`encode_command`, whose :class:`~connector.errors.Pop3ArgumentError` is
  both a ``Pop3ProtocolError`` and a ``ValueError`` (it is a caller bug, not a server one).
* Bodies are handled with ``bytes.find`` / ``bytes.replace`` only: a 50 MB message costs a
  handful of C-level passes, never one Python call per line, and lines inside bodies have
  no length limit. Status lines are limited to :data:`MAX_STATUS_LINE` bytes.
* Line endings: RFC 1939 §3 mandates CRLF. Status lines also accept a bare LF (trivial and
  harmless); multi-line bodies require CRLF: with a bare-LF server the terminator is not
  recognised and the read runs into the timeout, and dot-stuffing after bare-LF line breaks
  is not undone. Dovecot, Courier, GNU pop3d and every RFC-conforming server send CRLF.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from connector.errors import Pop3ArgumentError, Pop3ProtocolError

__all__ = [
    "CRLF",
    "MAX_STATUS_LINE",
    "MAX_UIDL_LENGTH",
    "LineBuffer",
    "MultilineReader",
    "ServerPolicy",
    "StatusLine",
    "dot_stuff",
    "encode_command",
    "find_duplicate_uidls",
    "parse_capa",
    "parse_list",
    "parse_server_policy",
    "parse_stat",
    "parse_status",
    "parse_uidl",
    "unstuff_response",
    "validate_uidl",
]

CRLF = b"\r\n"
#: Upper bound for one status line including CRLF. RFC 2449 §4 limits responses to 512
#: octets; real servers exceed that with long texts, so we allow 8 KiB and refuse beyond.
MAX_STATUS_LINE = 8192
#: RFC 1939 §7 (UIDL): "The unique-id of a message ... consists of 1 to 70 characters".
MAX_UIDL_LENGTH = 70

# The end of a multi-line response: CRLF "." CRLF (RFC 1939 §3), where the first CRLF ends
# the last body line. The reader keeps a virtual CRLF before the body so that the first
# line is handled exactly like every other one (and an empty body is ".\r\n").
_TERMINATOR = b"\r\n.\r\n"
# A line that starts with the termination octet (RFC 1939 §3 dot-stuffing).
_LINE_START_DOT = b"\r\n."
_CR = 0x0D
_KEYWORD = re.compile(r"[A-Za-z]{3,4}")
_FORBIDDEN_IN_ARGS = (b"\r", b"\n", b"\x00")
_UIDL_CHARS = re.compile(rb"[\x21-\x7e]{1,70}")


# ---------------------------------------------------------------------------- commands


def encode_command(name: str, *args: str | bytes) -> bytes:
    """Encode one POP3 command line ``NAME arg1 arg2 CRLF`` (RFC 1939 §3).

    * ``name`` must be a 3-4 letter keyword (RFC 1939 §3, RFC 2449 §3); it is upper-cased.
    * ``str`` arguments are encoded as UTF-8 (RFC 6856 permits UTF-8 credentials; ASCII is
      unchanged); ``bytes`` arguments are sent as they are.
    * CR, LF and NUL are refused in any argument: they would end the command early and let
      the rest be read as a second command (command injection).
    * Spaces separate arguments, so they are refused inside arguments, except for the
      single argument of ``PASS``: RFC 1939 §7 lets the server treat the rest of the line
      as the password, and real passwords do contain spaces. For the same reason an empty
      argument is only accepted for ``PASS``.
    * The RFC 1939 §3 limit of 40 octets per argument is deliberately not enforced: it
      would reject legitimate long passwords and usernames, and servers accept them.

    Raises :class:`~connector.errors.Pop3ArgumentError` (a ``Pop3ProtocolError`` and a
    ``ValueError``); its message never repeats a ``PASS`` argument.
    """
    if not _KEYWORD.fullmatch(name):
        raise Pop3ArgumentError(f"invalid POP3 command keyword {name!r}")
    keyword = name.upper()
    is_pass = keyword == "PASS"
    parts = [keyword.encode("ascii")]
    for i, arg in enumerate(args, start=1):
        raw = arg.encode("utf-8") if isinstance(arg, str) else bytes(arg)
        shown = "***" if is_pass else repr(arg)
        if any(bad in raw for bad in _FORBIDDEN_IN_ARGS):
            raise Pop3ArgumentError(f"{keyword} argument {i} {shown} contains CR, LF or NUL")
        if not is_pass:
            if not raw:
                raise Pop3ArgumentError(f"{keyword} argument {i} is empty")
            if b" " in raw or b"\t" in raw:
                raise Pop3ArgumentError(f"{keyword} argument {i} {shown} contains whitespace")
        parts.append(raw)
    return b" ".join(parts) + CRLF


# ---------------------------------------------------------------------------- status lines


@dataclass(frozen=True, slots=True)
class StatusLine:
    """One parsed status line (RFC 1939 §3).

    ``ok`` is True for ``+OK``; ``code`` is the RFC 2449 §8 extended response code without
    brackets and upper-cased (``"IN-USE"``, ``"SYS/TEMP"``, ...) or None; ``text`` is the
    human-readable rest with the code removed, decoded as UTF-8 with replacement.
    """

    ok: bool
    text: str
    code: str | None = None

    def describe(self) -> str:
        """The line as a server would print it, minus the status indicator (for messages)."""
        return f"[{self.code}] {self.text}".rstrip() if self.code else self.text


def parse_status(line: bytes) -> StatusLine:
    """Parse ``+OK [text]`` / ``-ERR [[CODE] text]``; a trailing CRLF (or bare LF) is allowed.

    RFC 1939 §3: the indicator is upper case and followed by end of line or a space.
    RFC 2449 §8: an extended response code, ``[`` level *("/" level) ``]``, may follow the
    indicator and its space. It is extracted from ``+OK`` lines too (harmless, and RFC 2449
    does not forbid it); a ``[`` without a closing ``]`` is left in the text.

    Raises :class:`~connector.errors.Pop3ProtocolError` for an over-long line, an embedded
    CR/LF/NUL, or anything that is not a status line (e.g. the server talking out of turn).
    """
    if len(line) > MAX_STATUS_LINE:
        raise Pop3ProtocolError(f"status line longer than {MAX_STATUS_LINE} bytes")
    if line.endswith(b"\n"):
        line = line[:-2] if line.endswith(CRLF) else line[:-1]
    if b"\r" in line or b"\n" in line or b"\x00" in line:
        raise Pop3ProtocolError(f"malformed status line {_preview(line)}")
    if line.startswith(b"+OK"):
        ok, rest = True, line[3:]
    elif line.startswith(b"-ERR"):
        ok, rest = False, line[4:]
    else:
        raise Pop3ProtocolError(f"expected +OK or -ERR, got {_preview(line)}")
    if rest and rest[:1] != b" ":
        raise Pop3ProtocolError(f"expected +OK or -ERR, got {_preview(line)}")
    text = rest[1:].decode("utf-8", errors="replace")
    code: str | None = None
    if text.startswith("["):
        end = text.find("]")
        # RFC 2449 §8: resp-level = 1*<any CHAR except "/" and "]">; CHAR excludes NUL,
        # and a level never contains a space in any registered code.
        candidate = text[1:end] if end > 0 else ""
        levels = candidate.split("/")
        if candidate and all(lv and " " not in lv for lv in levels):
            code = candidate.upper()
            text = text[end + 1 :].lstrip(" ")
    return StatusLine(ok=ok, text=text, code=code)


def _preview(data: bytes, limit: int = 60) -> str:
    """A short, printable excerpt of server bytes for error messages (never a body)."""
    shown = data[:limit].decode("ascii", errors="backslashreplace")
    return repr(shown + ("..." if len(data) > limit else ""))


class LineBuffer:
    """Receive buffer that frames status lines (sans-IO).

    ``feed()`` raw bytes as they arrive; ``next_line()`` returns one complete line
    including its line ending, or None when more data is needed. Bytes after the line stay
    buffered: after a status line that starts a multi-line response they are the start of
    the body, taken with :meth:`take`. A line that is not complete within
    ``max_line`` bytes raises :class:`~connector.errors.Pop3ProtocolError` (a server that
    streams garbage cannot make us buffer without bound).
    """

    __slots__ = ("_buf", "max_line")

    def __init__(self, max_line: int = MAX_STATUS_LINE) -> None:
        self._buf = bytearray()
        self.max_line = max_line

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buf += data

    def next_line(self) -> bytes | None:
        """Pop one line ending in LF (normally CRLF), or None if no full line is buffered yet."""
        end = self._buf.find(b"\n", 0, self.max_line)
        if end < 0:
            if len(self._buf) >= self.max_line:
                raise Pop3ProtocolError(f"status line longer than {self.max_line} bytes")
            return None
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        return line

    def take(self) -> bytes:
        """Remove and return everything buffered (the start of a body, or stray bytes)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def unread(self, data: bytes) -> None:
        """Put bytes back in front (what a body reader received past its terminator)."""
        if data:
            self._buf[:0] = data


# ---------------------------------------------------------------------------- multi-line bodies


class MultilineReader:
    """Incremental decoder for one multi-line response body (RFC 1939 §3).

    Feed it the bytes that follow the ``+OK`` status line, in chunks of any size (1 byte
    or 50 MB); each :meth:`feed` returns the next piece of the *unstuffed* body (possibly
    ``b""``), so callers can stream a message to disk without holding it in memory.
    Concatenating all returned pieces gives exactly the body: every line with its CRLF,
    the terminating ``.CRLF`` removed, and dot-stuffing undone.

    Dot-stuffing (RFC 1939 §3): a line that starts with "." has the "." removed; a line
    that is exactly "." ends the response. Note that this is the RFC's rule ("if octets
    other than CRLF follow, the first octet of the line is stripped away"), which equals
    replacing ``CRLF ".."`` by ``CRLF "."`` for a conforming server, and also decodes a
    server that forgot to stuff a ``.x`` line the way the RFC prescribes.

    Implementation: a virtual CRLF is placed before the body, so "line start" is always
    "after CRLF" and an empty body is just the terminator. Each feed finds the ``CRLF "."``
    sequences with ``bytes.find`` in one pass (each a stuffed line or the terminator) and
    joins the pieces between them; at most 4 bytes (a possible partial terminator or
    ``CRLF "."``) are held back between chunks, so there is no line-length limit and no
    quadratic re-scanning.

    After the terminator, :attr:`done` is True and :attr:`leftover` holds any bytes that
    followed it (the start of the next pipelined response). Feeding after :attr:`done`
    raises :class:`~connector.errors.Pop3ProtocolError`.

    ``max_line`` (octets, CRLF included) is checked, not enforced: the reader keeps going to
    the terminator so the session stays in step, and :attr:`line_too_long` records the first
    line over the limit for the caller to refuse the mail. RFC 5322 §2.1.1 allows 1000 octets;
    real mail (unwrapped HTML, base64 without line breaks) is longer, so callers choose a
    generous limit that protects the decoder, not the RFC's. The check costs two ``find``
    calls per chunk; lines are only split when a chunk is longer than the limit.
    """

    __slots__ = ("_pending", "_run", "_skip", "done", "leftover", "line_too_long", "max_line", "raw_bytes")

    #: bytes held back at most: len(terminator) - 1.
    _HOLD = len(_TERMINATOR) - 1

    def __init__(self, max_line: int | None = None) -> None:
        if max_line is not None and max_line < 3:
            raise ValueError("max_line must be at least 3 (a line of one octet and CRLF)")
        self.max_line = max_line
        #: length of the first line found over max_line, or a lower bound for it when it was
        #: not complete yet (None: none so far).
        self.line_too_long: int | None = None
        # Octets of the current, not yet terminated line (raw, as received).
        self._run = 0
        # Not-yet-emitted raw bytes; begins with the virtual CRLF, later with held-back bytes.
        self._pending = CRLF
        # How many leading bytes of _pending are the virtual CRLF (never emitted).
        self._skip = len(CRLF)
        self.done = False
        self.leftover = b""
        #: raw (still stuffed) bytes consumed so far, terminator included.
        self.raw_bytes = 0

    def feed(self, data: bytes) -> bytes:
        """Consume one chunk; return the unstuffed body bytes it completes (maybe ``b""``)."""
        if self.done:
            raise Pop3ProtocolError("data fed to a multi-line reader after its terminator")
        if not data:
            return b""
        buf = self._pending + data if self._pending else bytes(data)
        # One left-to-right pass over the CRLF "." sequences: each is a stuffed line (its dot
        # dropped), the terminator (CRLF "." CRLF), or, at the very end of buf, undecided
        # until the next chunk. Replacing find(terminator) + replace() (three scans of the
        # chunk and a copy) saved ~25 % of a 24 KB mail's retrieval CPU (docs/decisions/0001,
        # "Fifth round"). Bodies come out as views joined once: one copy per chunk.
        view = memoryview(buf)
        pieces: list[memoryview] = []
        start = self._skip  # the first byte not yet emitted (the virtual CRLF never is)
        keep = len(buf) - self._HOLD  # held back from here on
        at = 0
        while (i := buf.find(_LINE_START_DOT, at)) >= 0:
            after = i + len(_LINE_START_DOT)
            if buf.startswith(CRLF, after):
                # The terminator: the body ends with the CRLF before its dot.
                pieces.append(view[start : i + len(CRLF)])
                self.leftover = buf[after + len(CRLF) :]
                self.raw_bytes += len(data) - len(self.leftover)
                if self.max_line is not None and self.line_too_long is None:
                    # Only this response's bytes: the leftover is the next pipelined one.
                    self._check_lines(data[: len(data) - len(self.leftover)] if self.leftover else data)
                self.done = True
                self._pending = b""
                self._skip = 0
                return b"".join(pieces)
            if after == len(buf) or (after + 1 == len(buf) and buf[after] == _CR):
                break  # CRLF "." (CR) ends buf: the next chunk decides; it starts at keep or later
            pieces.append(view[start : i + len(CRLF)])  # a stuffed line: drop its dot
            start = at = after
        self.raw_bytes += len(data)
        if self.max_line is not None and self.line_too_long is None:
            self._check_lines(data)
        if not pieces and keep <= start:
            # Nothing decided yet (a tiny chunk): keep all of it, the virtual CRLF included.
            self._pending = buf
            return b""
        # Every CRLF "." that starts before the last _HOLD bytes was found above, so nothing
        # held back can complete one with bytes already emitted.
        cut = max(keep, start)
        pieces.append(view[start:cut])
        self._pending = buf[cut:]
        self._skip = 0
        return b"".join(pieces)

    def _check_lines(self, data: bytes) -> None:
        """Track line lengths across chunks; record the first line over max_line."""
        limit = self.max_line
        assert limit is not None
        first = data.find(b"\n")
        if first < 0:
            self._run += len(data)
            if self._run >= limit:  # even a CRLF right after it makes the line too long
                self.line_too_long = self._run + 1  # a lower bound: the line is not complete
            return
        if self._run + first + 1 > limit:
            self.line_too_long = self._run + first + 1
            return
        last = data.rfind(b"\n")
        if last - first > limit:  # whole lines between the first and last LF may be too long
            longest = max(map(len, data[first + 1 : last].split(b"\n"))) + 1
            if longest > limit:
                self.line_too_long = longest
                return
        self._run = len(data) - last - 1
        if self._run >= limit:
            self.line_too_long = self._run + 1

    def feed_all(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Feed chunks until the terminator, yielding non-empty pieces (streaming helper)."""
        for chunk in chunks:
            piece = self.feed(chunk)
            if piece:
                yield piece
            if self.done:
                return
        raise Pop3ProtocolError("multi-line response ended without its terminator")


def unstuff_response(raw: bytes) -> bytes:
    """Decode one complete multi-line body (everything after the status line, terminator
    included) in one go. Bytes after the terminator raise Pop3ProtocolError."""
    reader = MultilineReader()
    body = reader.feed(raw)
    if not reader.done:
        raise Pop3ProtocolError("multi-line response ended without its terminator")
    if reader.leftover:
        raise Pop3ProtocolError("unexpected bytes after the multi-line terminator")
    return body


def dot_stuff(body: bytes) -> bytes:
    """Server-side encoding (RFC 1939 §3): stuff lines starting with "." and append the
    terminator; a body not ending in CRLF gets one. The inverse of :class:`MultilineReader`
    for CRLF bodies; used by test servers and tools."""
    if body and not body.endswith(CRLF):
        body += CRLF
    stuffed = (CRLF + body).replace(_LINE_START_DOT, b"\r\n..")[len(CRLF) :]
    return stuffed + b".\r\n"


# ---------------------------------------------------------------------------- listings


def _lines(body: bytes, what: str) -> list[bytes]:
    """Split a (small) listing body into lines; the body must end with CRLF or be empty."""
    if not body:
        return []
    if not body.endswith(CRLF):
        raise Pop3ProtocolError(f"{what} listing does not end with CRLF")
    return body[: -len(CRLF)].split(CRLF)


def _msg_num(token: bytes, what: str) -> int:
    if not token.isdigit() or len(token) > 10:
        raise Pop3ProtocolError(f"{what}: invalid message number {_preview(token)}")
    num = int(token)
    if num < 1:
        raise Pop3ProtocolError(f"{what}: message number {num} is not positive")
    return num


def validate_uidl(uid: bytes | str) -> str:
    """Check an RFC 1939 §7 unique-id (1-70 octets in 0x21-0x7E) and return it as str."""
    raw = uid.encode("utf-8", errors="replace") if isinstance(uid, str) else uid
    if not _UIDL_CHARS.fullmatch(raw):
        raise Pop3ProtocolError(
            f"invalid UIDL {_preview(raw)}: RFC 1939 requires 1-{MAX_UIDL_LENGTH} characters in 0x21-0x7E"
        )
    return raw.decode("ascii")


def parse_uidl(body: bytes) -> list[tuple[int, str]]:
    """Parse a UIDL multi-line body (RFC 1939 §7) into ``[(msg_num, unique_id), ...]``.

    Each line is ``msg_num SP unique-id``. Invalid numbers, invalid unique-ids, extra
    fields and repeated message numbers raise Pop3ProtocolError. Repeated unique-ids are
    *not* rejected here (see :func:`find_duplicate_uidls`): the policy is the caller's.
    """
    out: list[tuple[int, str]] = []
    seen: set[int] = set()
    for line in _lines(body, "UIDL"):
        fields = line.split(b" ")
        if len(fields) != 2:
            raise Pop3ProtocolError(f"UIDL: malformed line {_preview(line)}")
        num = _msg_num(fields[0], "UIDL")
        if num in seen:
            raise Pop3ProtocolError(f"UIDL: message number {num} listed twice")
        seen.add(num)
        out.append((num, validate_uidl(fields[1])))
    return out


def parse_list(body: bytes) -> list[tuple[int, int]]:
    """Parse a LIST multi-line body (RFC 1939 §5 scan listings) into ``[(msg_num, size)]``.

    RFC 1939 §5 allows (discourages) more information after the size; it is ignored.
    """
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for line in _lines(body, "LIST"):
        fields = line.split(b" ")
        if len(fields) < 2:
            raise Pop3ProtocolError(f"LIST: malformed line {_preview(line)}")
        num = _msg_num(fields[0], "LIST")
        if num in seen:
            raise Pop3ProtocolError(f"LIST: message number {num} listed twice")
        seen.add(num)
        if not fields[1].isdigit():
            raise Pop3ProtocolError(f"LIST: invalid size {_preview(fields[1])}")
        out.append((num, int(fields[1])))
    return out


def parse_stat(status: StatusLine) -> tuple[int, int]:
    """Parse the ``+OK nn mm`` drop listing of STAT (RFC 1939 §5): (messages, octets)."""
    fields = status.text.split()
    if not status.ok or len(fields) < 2 or not (fields[0].isdigit() and fields[1].isdigit()):
        raise Pop3ProtocolError(f"STAT: malformed response {status.describe()!r}")
    return int(fields[0]), int(fields[1])


def parse_capa(body: bytes) -> dict[str, list[str]]:
    """Parse a CAPA body (RFC 2449 §5) into ``{TAG: [args...]}``; tags are upper-cased.

    Capability names are case-insensitive (RFC 2449 §6), arguments are kept as sent. A tag
    listed twice keeps its last arguments. Empty lines are skipped.
    """
    caps: dict[str, list[str]] = {}
    for line in _lines(body, "CAPA"):
        fields = line.decode("utf-8", errors="replace").split()
        if fields:
            caps[fields[0].upper()] = fields[1:]
    return caps


# ---------------------------------------------------------------------------- server policy

#: A policy value with more digits is not a policy any server means (and no schedule needs it).
_POLICY_DIGITS = 9
# GNU Mailutils 3.x pop3d prints a capability's tag and value without the separating space
# ("EXPIRE30", "EXPIRENEVER") and its LOGIN-DELAY line as the bare number ("900"); seen on
# Debian's mailutils-pop3d 3.15 (tests/integration/test_gnu_pop3d.py).
_RUN_TOGETHER_EXPIRE = re.compile(r"EXPIRE(\d{1,9}|NEVER)", re.ASCII)


@dataclass(frozen=True, slots=True)
class ServerPolicy:
    """Retention and login-frequency policy a server advertises in CAPA (RFC 2449 §6.7, §6.8).

    * ``expire_days``: RFC 2449 §6.7 EXPIRE, the minimum number of days the server keeps a
      message after a client retrieved it. ``0`` means the server deletes retrieved mail itself
      (leaving mail on the server is not possible). None when the server says NEVER *or* does
      not advertise EXPIRE; ``expire_advertised`` / :attr:`expire_never` tell them apart.
    * ``login_delay_seconds``: RFC 2449 §6.8 LOGIN-DELAY, the minimum number of seconds after a
      successful login before the server accepts the next login of the same user.
    * ``expire_per_user`` / ``login_delay_per_user``: the value was followed by ``USER``. RFC
      2449 §6.7/§6.8 allow that in AUTHORIZATION state: the value may differ per user, and the
      user's own value is the one the CAPA after login announces (RFC 2449 §5).
    * ``notes``: advertisements ignored because they are malformed, or read leniently, and why.
      Malformed values are ignored rather than raised: the policy is advice for the scheduler,
      and a server that garbles it must not stop mail from being fetched.
    """

    expire_days: int | None = None
    expire_advertised: bool = False
    expire_per_user: bool = False
    login_delay_seconds: int | None = None
    login_delay_per_user: bool = False
    notes: tuple[str, ...] = ()

    @property
    def expire_never(self) -> bool:
        """The server said ``EXPIRE NEVER``: it never deletes mail on its own."""
        return self.expire_advertised and self.expire_days is None

    @property
    def per_user(self) -> bool:
        """Some value is a per-user placeholder (``USER`` suffix): re-read CAPA after login."""
        return self.expire_per_user or self.login_delay_per_user

    def describe(self) -> str:
        """``EXPIRE=30 LOGIN-DELAY=900s`` for logs; ``""`` when the server advertises neither."""
        parts = []
        if self.expire_advertised:
            parts.append(f"EXPIRE={'NEVER' if self.expire_days is None else self.expire_days}")
        if self.login_delay_seconds is not None:
            parts.append(f"LOGIN-DELAY={self.login_delay_seconds}s")
        return " ".join(parts)


def _policy_value(args: list[str], *, never: bool) -> tuple[int | None, bool] | None:
    """``[value]`` or ``[value, "USER"]`` -> (number or None for NEVER, per_user); None if malformed."""
    if not 1 <= len(args) <= 2 or (len(args) == 2 and args[1].upper() != "USER"):
        return None
    value = args[0]
    if never and value.upper() == "NEVER":
        return None, len(args) == 2
    if value.isascii() and value.isdigit() and len(value) <= _POLICY_DIGITS:
        return int(value), len(args) == 2
    return None


def parse_server_policy(caps: dict[str, list[str]]) -> ServerPolicy:
    """The EXPIRE (RFC 2449 §6.7) and LOGIN-DELAY (§6.8) advertisements of a parsed CAPA.

    Accepted forms: ``EXPIRE <days>``, ``EXPIRE NEVER``, ``LOGIN-DELAY <seconds>``, each
    optionally followed by ``USER``; ``NEVER`` and ``USER`` in any case. Anything else in those
    tags (no value, a word, a negative or fractional number, more than nine digits, an extra
    argument) is ignored with a reason in :attr:`ServerPolicy.notes`: never an exception.

    GNU Mailutils 3.x sends ``EXPIRE<value>`` with no space and LOGIN-DELAY as a line holding
    only the number. The run-together EXPIRE is read as EXPIRE; a line that is only digits is
    read as LOGIN-DELAY only next to that run-together EXPIRE (which Mailutils always sends),
    so a lone number from any other server is not mistaken for a delay. Both are noted.
    """
    notes: list[str] = []
    expire_days: int | None = None
    expire_advertised = expire_per_user = False
    delay: int | None = None
    delay_per_user = False

    expire_args = caps.get("EXPIRE")
    run_together = False
    if expire_args is None:
        quirk = sorted(tag for tag in caps if _RUN_TOGETHER_EXPIRE.fullmatch(tag))
        if quirk:
            run_together = True
            expire_args = [quirk[0][len("EXPIRE") :]]
            notes.append(f"read {quirk[0]!r} as 'EXPIRE {expire_args[0]}' (GNU Mailutils form: no space after the tag)")
    if expire_args is not None:
        parsed = _policy_value(expire_args, never=True)
        if parsed is None:
            notes.append(
                f"ignored {' '.join(['EXPIRE', *expire_args])!r}: RFC 2449 §6.7 wants a number of days "
                "or NEVER, optionally followed by USER"
            )
        else:
            expire_days, expire_per_user = parsed
            expire_advertised = True

    delay_args = caps.get("LOGIN-DELAY")
    if delay_args is None and run_together:
        bare = [tag for tag in caps if tag.isascii() and tag.isdigit() and not caps[tag]]
        if len(bare) == 1:
            delay_args = bare
            notes.append(f"read the bare line {bare[0]!r} as 'LOGIN-DELAY {bare[0]}' (GNU Mailutils form)")
    if delay_args is not None:
        parsed = _policy_value(delay_args, never=False)
        if parsed is None or parsed[0] is None:
            notes.append(
                f"ignored {' '.join(['LOGIN-DELAY', *delay_args])!r}: RFC 2449 §6.8 wants a number of "
                "seconds, optionally followed by USER"
            )
        else:
            delay, delay_per_user = parsed

    return ServerPolicy(
        expire_days=expire_days,
        expire_advertised=expire_advertised,
        expire_per_user=expire_per_user,
        login_delay_seconds=delay,
        login_delay_per_user=delay_per_user,
        notes=tuple(notes),
    )


def find_duplicate_uidls(entries: Iterable[tuple[int, str]]) -> dict[str, list[int]]:
    """Return ``{unique_id: [msg_nums...]}`` for every unique-id listed more than once.

    RFC 1939 §7 requires unique-ids to be unique within a maildrop; some servers break this
    (e.g. copies of one file). Deduplication by UIDL must not silently skip such mails.
    """
    by_uid: dict[str, list[int]] = {}
    for num, uid in entries:
        by_uid.setdefault(uid, []).append(num)
    return {uid: nums for uid, nums in by_uid.items() if len(nums) > 1}
