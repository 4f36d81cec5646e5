"""MIME entity splitter on bytes: the same tree as the stdlib's compat32 feed parser, faster.

``email.parser.BytesParser(policy=compat32)`` reads a mail line by line through a generator
stack, checks every line of every body against a regular expression per open multipart, and
compiles a new boundary regex for each multipart (boundaries are unique per mail, so the ``re``
cache never hits). That was about 60 % of :func:`connector.decoding.decode_mail`.

This module builds the same tree with ``bytes.find`` over the whole mail: a body is one slice
between two delimiter lines, found without looking at the lines in between. The tree is what
:mod:`connector.decoding.mime` reads of compat32's ``Message`` and nothing more (:class:`Entity`):
header fields as stored (name, raw value with folding kept, as ASCII + surrogateescape), content
type, children, leaf payloads as ``str``, ``defects``, ``preamble``, ``epilogue``.

It reproduces compat32's results, repairs included, because the layer above compensates for
some of them (``mime._kept_boundary_eol``) and because the differential test
(``tests/unit/test_fastmime.py``) holds the two to the same ``DecodedMail``:

* header section (RFC 5322 §2.2, §3.5): lines are ended by CRLF, LF or a bare CR; it ends at the
  first line that is not a field, a continuation (§2.2.3 folding) or an mbox ``From `` line. An
  empty line there is consumed; any other line starts the body and is a
  ``MissingHeaderBodySeparatorDefect``. Field values keep their folding; only the blanks after
  the colon and the final line break are removed (unfolding is mime.py's job);
* content type: the first Content-Type field; none -> ``text/plain``, or ``message/rfc822``
  for the parts of a multipart/digest (RFC 2046 §5.1.5); a value that is not ``type/subtype``
  -> ``text/plain`` (RFC 2045 §5.2);
* multipart (RFC 2046 §5.1.1): a delimiter is ``--boundary`` at the start of a line, then
  ``--`` for the close delimiter, then optional blanks up to the end of the line. A delimiter of
  an enclosing multipart also ends an inner part (§5.1.2); an inner one that reuses the outer
  boundary therefore ends at once. The line break before a delimiter belongs to it and is
  removed from the entity that ends there: the payload of a leaf, the epilogue of a multipart,
  but not the payload of a multipart that could not be split (compat32's rule, which mime.py
  undoes with ``_kept_boundary_eol``). Delimiter lines right after a delimiter are skipped;
  no opening delimiter -> ``StartBoundaryNotFoundDefect`` and the text read becomes the
  payload; no close delimiter -> ``CloseBoundaryNotFoundDefect``; no boundary ->
  ``NoBoundaryInMultipartDefect`` and the body stays one string;
* message/* (RFC 2046 §5.2) holds one embedded message, parsed the same way;
  message/delivery-status (RFC 3464 §2.1) holds blocks of header fields separated by empty lines,
  each one entity.

Work is linear in the size of the mail times the nesting depth (compat32: lines times depth),
also for hostile input: every search is bounded by where the current entity ends.

Known difference from compat32, on purpose: CPython 3.11 raises ``TypeError`` while decoding a
boundary given both as ``boundary*=`` and ``boundary*0=`` (RFC 2231 forms that contradict each
other); here that multipart has no usable boundary (``NoBoundaryInMultipartDefect``) instead of
failing the whole mail.
"""

from __future__ import annotations

import contextlib
import email.errors
import email.message
import email.policy
import email.utils
import mmap
import re
from collections.abc import Iterator
from typing import Any, Literal, Protocol, overload

__all__ = ["PARSER", "Buffer", "Entity", "FastParser", "Node", "Span", "Splitter", "SpoolMap"]


class Entity(Protocol):
    """What :mod:`connector.decoding.mime` reads of a parsed entity.

    :class:`Node` provides it, and so does the stdlib's ``email.message.Message``, so either
    splitter can produce the tree.
    """

    @property
    def defects(self) -> list[email.errors.MessageDefect]: ...

    @property
    def preamble(self) -> str | None: ...

    @property
    def epilogue(self) -> str | None: ...

    def raw_items(self) -> Iterator[tuple[str, str]]: ...

    def get_content_type(self) -> str: ...

    def get_content_maintype(self) -> str: ...

    def is_multipart(self) -> bool: ...

    @overload
    def get_payload(self, i: None = None, decode: Literal[False] = False) -> Any: ...

    @overload
    def get_payload(self, i: None = None, *, decode: Literal[True]) -> Any: ...

    def __len__(self) -> int: ...


class Splitter(Protocol):
    """Raw mail bytes -> the root :class:`Entity` (``BytesParser(policy=compat32)`` fits too)."""

    def parsebytes(self, text: bytes, /) -> Entity: ...


_COMPAT32 = email.policy.compat32


class Span:
    """A leaf payload left where it is: ``data[start:stop]`` of the mail being parsed.

    Large mail (issue 6) is parsed from a memory-mapped spool file; copying a 50 MB attachment
    into a ``str`` would cost its size twice over. Leaves longer than the parser's
    ``lazy_above`` are kept as a Span, and mime.py transfer-decodes them piece by piece
    (connector/decoding/stream.py) instead of reading them whole.
    """

    __slots__ = ("data", "start", "stop")

    def __init__(self, data: Buffer, start: int, stop: int) -> None:
        self.data = data
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __repr__(self) -> str:  # no content
        return f"<Span {self.stop - self.start} bytes>"

    def tobytes(self) -> bytes:
        return bytes(self.data[self.start : self.stop])

    def text(self) -> str:
        """What compat32 would have stored: the bytes as ASCII + surrogateescape."""
        return _text(self.tobytes())

    def strip_eol(self) -> None:
        """RFC 2046 §5.1.1: the line break before a delimiter belongs to the delimiter."""
        tail = bytes(self.data[max(self.start, self.stop - 2) : self.stop])
        if tail.endswith(b"\r\n"):
            self.stop -= 2
        elif tail.endswith((b"\r", b"\n")):
            self.stop -= 1


class SpoolMap(mmap.mmap):
    """A read-only mapping of a spool file that the splitter can search like ``bytes``.

    ``mmap`` has ``find`` and works with ``re``, but lacks ``startswith``. Pages read once are
    handed back with :meth:`release` (``MADV_DONTNEED``): for a file mapping that only drops
    them from this process (they stay in the page cache and are read again on the next
    access), so a 200 MB mail scanned front to back never shows as 200 MB of resident memory.
    """

    def startswith(self, prefix: bytes, start: int = 0) -> bool:
        return self[start : start + len(prefix)] == prefix

    def release(self, upto: int) -> None:
        """Drop the pages before ``upto`` from the process (never an error: advice only)."""
        end = (min(upto, len(self)) // mmap.PAGESIZE) * mmap.PAGESIZE
        if end > 0:
            with contextlib.suppress(OSError, ValueError):
                self.madvise(mmap.MADV_DONTNEED, 0, end)


#: What the splitter searches: the mail as bytes, or a mapping of its spool file.
Buffer = bytes | SpoolMap


class Node:
    """One MIME entity: the part of compat32's ``Message`` that mime.py uses, read-only."""

    __slots__ = ("_ctype", "_default_type", "_headers", "_payload", "defects", "epilogue", "preamble", "span")

    def __init__(self, default_type: str) -> None:
        self._headers: list[tuple[str, str]] = []
        #: list of child Nodes (multipart, message/*), str for a leaf (ASCII + surrogateescape),
        #: or a Span for a leaf longer than the parser's ``lazy_above``.
        self._payload: list[Node] | str | Span | None = None
        self._default_type = default_type
        self._ctype = default_type
        self.defects: list[email.errors.MessageDefect] = []
        self.preamble: str | None = None
        self.epilogue: str | None = None
        #: a part of a multipart: where its bytes are in the parsed buffer, header block included,
        #: without the line break that belongs to the next delimiter (RFC 2046 §5.1.1). What a
        #: detached signature covers (RFC 8551 §3.5.3) is read from here, so the bytes checked are
        #: exactly the bytes this tree was built from. None for other entities.
        self.span: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self._headers)

    def __repr__(self) -> str:  # no content: part trees end up in logs and test failures
        return f"<Node {self._ctype} headers={len(self._headers)}>"

    def raw_items(self) -> Iterator[tuple[str, str]]:
        return iter(self._headers)

    def get_content_type(self) -> str:
        return self._ctype

    def get_content_maintype(self) -> str:
        return self._ctype.partition("/")[0]

    def is_multipart(self) -> bool:
        return isinstance(self._payload, list)

    def get_payload(self, i: int | None = None, decode: bool = False) -> Any:
        """Children of a multipart or message/* entity; otherwise what compat32 returns.

        mime.py reads leaf payloads directly and calls this with ``decode=True`` only for
        uuencoded parts, which are rare: that path is delegated to the stdlib's ``Message``
        holding the same header fields and payload, so the result is compat32's by construction
        (including its refusal to decode when the field is not exactly ``x-uuencode`` & co.).
        """
        if isinstance(self._payload, list):
            if decode:
                return None
            return self._payload if i is None else self._payload[i]
        if self._payload is None:
            return None
        msg = email.message.Message(policy=_COMPAT32)
        for name, value in self._headers:
            msg.set_raw(name, value)
        msg.set_payload(self._payload.text() if isinstance(self._payload, Span) else self._payload)
        if decode:
            return msg.get_payload(i, True) if i is not None else msg.get_payload(decode=True)
        return msg.get_payload(i)


# ---------------------------------------------------------------- header fields and parameters

# A field line (RFC 5322 §3.6.8: name of printable ASCII except ':'), followed by its
# continuation lines (§2.2.3). Lines end in CRLF, LF or a bare CR, like compat32's lines.
# _FIELD only starts at a line start (the lookbehind fails at once elsewhere), so findall over a
# long line that is not a field stays linear; possessive quantifiers: nothing to backtrack into.
_NAME = rb"[\x21-\x39\x3b-\x7e]++"
_REST = rb"[^\r\n]*+(?:\r\n|\r|\n|\Z)"
_FIELD = re.compile(rb"(?<![^\r\n])(" + _NAME + rb"):(" + _REST + rb"(?:[ \t]" + _REST + rb")*+)")
_FIELDS = re.compile(rb"(?:" + _NAME + rb":" + _REST + rb"(?:[ \t]" + _REST + rb")*+)*+")
# What compat32 takes for a line of the header section: a field, an mbox "From " line, a
# continuation; also a line starting with ':' (dropped, with a defect).
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
_EOL = re.compile(rb"\r\n?|\n")
_EOL_CHAR = re.compile(rb"[\r\n]")
# After "--boundary": "--" for the close delimiter, transport padding, end of the line (RFC 2046 §5.1.1).
_DELIMITER_TAIL = re.compile(rb"(--)?[ \t]*(?:[\r\n]|\Z)")
# An empty line after some other line: the blank-line ends of message/delivery-status blocks.
_BLANK_AFTER = re.compile(rb"\n[\r\n]|\r\r")
# First search window of _Split.scan; most parts end within it.
_WINDOW = 16384
# Largest window over a spool mapping; the scan slides on from there (see _Split.scan).
_SLIDE = 4 * 1024 * 1024
# Up to this many open multiparts, each delimiter is searched on its own (long needles: fast);
# deeper, the lines that start with "--" are visited once and looked up among all delimiters.
_FEW_ENDS = 8


def _fetch(value: str) -> str:
    """A field value as compat32's ``Message.get`` hands it out: with 8-bit bytes it is a
    ``Header`` whose ``str`` turns every such byte into U+FFFD. Rare; delegated for exactness."""
    return value if value.isascii() else str(_COMPAT32.header_fetch_parse("Content-Type", value))


def _content_type(value: str | None, default: str) -> str:
    """compat32's ``get_content_type``: RFC 2045 §5.2 - missing or not type/subtype -> default/text/plain."""
    if value is None:
        return default
    ctype = _fetch(value).partition(";")[0].strip().lower()
    return ctype if ctype.count("/") == 1 else "text/plain"


def _strip_quotes(value: str) -> str:
    # compat32 (email.utils.unquote): a quoted string or an <angle-bracketed> token loses its delimiters.
    if len(value) > 1:
        if value[0] == '"' and value[-1] == '"':
            return value[1:-1].replace("\\\\", "\\").replace('\\"', '"')
        if value[0] == "<" and value[-1] == ">":
            return value[1:-1]
    return value


def _param_segments(value: str) -> list[str]:
    """Split a Content-Type value at ';' as compat32 does: a ';' after an odd number of '"'
    (not counting '\\"') since the segment's start is inside a quoted string."""
    segments: list[str] = []
    start, size = 0, len(value)
    while True:
        end = value.find(";", start)
        quotes = value.count('"', start, end) - value.count('\\"', start, end) if end > start else 0
        while end > start and quotes % 2:  # counted on as ';' are skipped: linear, not quadratic
            nxt = value.find(";", end + 1)
            if nxt >= 0:
                quotes += value.count('"', end, nxt) - value.count('\\"', end, nxt)
            end = nxt
        if end < 0:
            end = size
        segments.append(value[start:end])
        if end >= size:
            return segments
        start = end + 1


def _boundary(value: str) -> str | None:
    """The ``boundary`` parameter of a Content-Type value, as compat32's ``get_boundary`` reads it.

    The first parameter named ``boundary`` wins (RFC 2231 §3/§4 forms decoded by the stdlib's
    public helpers); its value loses quotes twice (compat32 unquotes it once while decoding
    parameters and once more when collapsing RFC 2231 values) and trailing white space (RFC 2046
    §5.1.1: a boundary may not end in it).
    """
    params: list[tuple[str, Any]] = []
    for segment in _param_segments(_fetch(value)):
        name, eq, param = segment.partition("=")
        params.append((name.strip().lower(), param.strip()) if eq else (segment.strip(), ""))
    if "*" in value:
        try:
            params = email.utils.decode_params(params)
        except (TypeError, ValueError):
            # CPython 3.11 fails on 'boundary*=x; boundary*0=y' (RFC 2231 forms that contradict
            # each other): no usable boundary, where compat32 fails the whole mail (module docstring).
            return None
        for key, decoded in params:
            if key.lower() == "boundary":
                if isinstance(decoded, tuple):  # (charset, language, text) from an RFC 2231 value
                    unquoted: Any = (decoded[0], decoded[1], _strip_quotes(decoded[2]))
                else:
                    unquoted = _strip_quotes(decoded)
                return email.utils.collapse_rfc2231_value(unquoted).rstrip()
        return None
    for name, param in params:
        if name.lower() == "boundary":
            return _strip_quotes(_strip_quotes(param)).rstrip()
    return None


def _strip_eol(text: str) -> str:
    # RFC 2046 §5.1.1: the line break before a delimiter is part of the delimiter.
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith(("\r", "\n")):
        return text[:-1]
    return text


def _text(data: bytes) -> str:
    return data.decode("ascii", "surrogateescape")


# ---------------------------------------------------------------- the splitter


class _Split:
    """One parse. ``ends`` holds what ends the entity being read, innermost last: the delimiter
    (``b"--" + boundary``) of every enclosing multipart, or None for the empty line that ends a
    message/delivery-status block. A line matching any of them is the end of the current entity
    for every reader below it (RFC 2046 §5.1.2), exactly like compat32's false-EOF stack."""

    __slots__ = (
        "blank_ends",
        "colon_ends",
        "data",
        "end_counts",
        "ends",
        "last",
        "lazy_above",
        "pending",
        "pos",
        "release",
        "size",
    )

    def __init__(self, data: Buffer, lazy_above: int | None = None) -> None:
        self.data = data
        self.size = len(data)
        #: leaves longer than this stay in ``data`` as a Span (None: every leaf is a str).
        self.lazy_above = lazy_above
        #: a spool mapping's page release, called as the scan moves on (None for bytes).
        self.release = data.release if isinstance(data, SpoolMap) else None
        self.pos = 0
        self.ends: list[bytes | None] = []
        #: how many entries of ``ends`` contain ':' (such a delimiter line looks like a header field).
        self.colon_ends = 0
        #: how many entries of ``ends`` are None (empty lines end the entity).
        self.blank_ends = 0
        #: the delimiters in ``ends``, counted (a boundary may be reused by a nested multipart).
        self.end_counts: dict[bytes, int] = {}
        #: the entity created last; compat32 strips the delimiter's line break from it.
        self.last: Node | None = None
        #: an mbox "From " line taken back from the end of a header section (see _headers_slow).
        self.pending: bytes | None = None

    # ------------------------------------------------------------ lines and delimiters

    def line_end(self, p: int) -> int:
        m = _EOL.search(self.data, p)
        return m.end() if m else self.size

    def own(self, p: int, sep: bytes) -> bool | None:
        """Whether the line at ``p`` is the delimiter ``sep``: None no, False yes, True close delimiter."""
        data = self.data
        if not data.startswith(sep, p):
            return None
        m = _DELIMITER_TAIL.match(data, p + len(sep))
        return None if m is None else m.group(1) is not None

    def at_end(self, p: int) -> bool:
        """Whether reading stops at the line starting at ``p``: end of input or an enclosing end."""
        if p >= self.size:
            return True
        data = self.data
        if self.blank_ends and data[p] in b"\r\n":
            return True
        if not data.startswith(b"--", p):
            return False  # the common case: not a delimiter
        if len(self.ends) > _FEW_ENDS:
            return self.core_is_end(self.line_core(p))
        for end in self.ends:  # noqa: SIM110 - a loop, not any(<generator>): runs several times per entity
            if end is not None and self.own(p, end) is not None:
                return True
        return False

    def line_core(self, p: int) -> bytes:
        """The line at ``p`` without its line break and trailing blanks. A delimiter line is
        ``sep`` or ``sep + "--"`` in this form (boundaries never end in blanks: compat32 strips them)."""
        eol = _EOL_CHAR.search(self.data, p)
        return self.data[p : eol.start() if eol else self.size].rstrip(b" \t")

    def core_is_end(self, core: bytes) -> bool:
        counts = self.end_counts
        return core in counts or (core.endswith(b"--") and core[:-2] in counts)

    def push_end(self, sep: bytes) -> None:
        self.ends.append(sep)
        self.end_counts[sep] = self.end_counts.get(sep, 0) + 1
        self.colon_ends += b":" in sep

    def pop_end(self, sep: bytes) -> None:
        self.ends.pop()
        if self.end_counts[sep] == 1:
            del self.end_counts[sep]
        else:
            self.end_counts[sep] -= 1
        self.colon_ends -= b":" in sep

    def find_delimiter(self, sep: bytes, p: int, limit: int) -> tuple[int, bool]:
        """First line starting in [p, limit) that is the delimiter ``sep``: (position, close), or (-1, False)."""
        data = self.data
        stop = min(self.size, limit + len(sep) - 1)
        i = data.find(sep, p, stop)
        while i >= 0:
            if i == p or data[i - 1] in b"\r\n":
                m = _DELIMITER_TAIL.match(data, i + len(sep))
                if m is not None:
                    return i, m.group(1) is not None
                nxt = i + 1
            else:  # inside a line: go on at the next line
                eol = _EOL_CHAR.search(data, i, stop)
                if eol is None:
                    break
                nxt = eol.end()
            i = data.find(sep, nxt, stop)
        return -1, False

    def first_blank(self, p: int) -> int:
        """Start of the first empty line at or after the line start ``p``, or the end of input.

        An empty line follows LF or a bare CR, so it starts with the second byte of LF CR, LF LF
        or CR CR: three ``bytes.find`` in a growing window, much cheaper than a regex over the
        header section, and never a scan of the whole mail.
        """
        data, size = self.data, self.size
        if p < size and data[p] in b"\r\n":
            return p
        width = 4096
        while True:
            limit = min(size, p + width)
            best, end = -1, min(size, limit + 1)
            for pair in (b"\n\r", b"\n\n", b"\r\r"):
                i = data.find(pair, p, end)
                if i >= 0:
                    best, end = i, i + 1  # the next pairs must start before this one
            if best >= 0:
                return best + 1
            if limit >= size:
                return size
            width *= 8

    def find_blank(self, p: int, limit: int) -> int:
        if p < limit and self.data[p] in b"\r\n":
            return p
        m = _BLANK_AFTER.search(self.data, p, min(self.size, limit + 1))
        return m.start() + 1 if m else -1

    def scan(self, p: int, sep: bytes | None) -> tuple[int, bool | None]:
        """Where reading from ``p`` stops: the first line that ends an enclosing entity (or the
        end of input), unless the delimiter ``sep`` comes first: (position, None) or
        (position, close). A line that is both is an enclosing end, as in compat32.

        Searched in growing windows, own delimiter first and then the enclosing ones up to it,
        innermost first: the work is proportional to the distance actually read times the
        nesting depth, even when the enclosing delimiters are far away or missing.
        """
        if len(self.ends) > _FEW_ENDS:
            return self.scan_lines(p, sep)
        size = self.size
        width = _WINDOW
        # ``lo``: the line start the window begins at. With bytes every window starts at ``p``
        # and grows; with a spool mapping the window stops growing at _SLIDE and slides on from
        # the last line start it covered, handing the pages behind it back (SpoolMap.release):
        # same result (lines are only ever matched from their start), bounded resident memory.
        lo = p
        while True:
            limit = min(size, lo + width)
            own, close = self.find_delimiter(sep, lo, limit) if sep is not None else (-1, False)
            best = own + 1 if own >= 0 else limit  # an enclosing end on the same line wins
            found = -1
            for end in reversed(self.ends):
                if lo >= best:
                    break
                q = self.find_blank(lo, best) if end is None else self.find_delimiter(end, lo, best)[0]
                if q >= 0:
                    best = found = q
            if found >= 0:
                return found, None
            if own >= 0:
                return own, close
            if limit >= size:
                return size, None
            if self.release is not None and width >= _SLIDE:
                nl = self.data.rfind(b"\n", lo, limit)
                if nl >= 0:  # else one line fills the window: grow it as with bytes
                    lo = nl + 1
                    self.release(lo)
                    continue
            width *= 8

    def scan_lines(self, p: int, sep: bytes | None) -> tuple[int, bool | None]:
        """scan() under deep nesting: only lines that can end something are visited (starting
        with "--", or empty inside a delivery-status block), each compared once with all the
        delimiters, so the work no longer grows with the depth."""
        data, size = self.data, self.size
        examined, line, width = p - 1, p, _WINDOW
        while True:
            limit = min(size, p + width)
            while line < limit:
                if line > examined:
                    examined = line
                    if data.startswith(b"--", line):
                        core = self.line_core(line)
                        if self.core_is_end(core):
                            return line, None
                        if core == sep:
                            return line, False
                        if sep is not None and core.endswith(b"--") and core[:-2] == sep:
                            return line, True
                    elif self.blank_ends and data[line] in b"\r\n":
                        return line, None
                line = self.next_candidate(line, limit)
            if limit >= size:
                return size, None
            line, width = examined, width * 8

    def next_candidate(self, line: int, limit: int) -> int:
        """The first line start in (line, limit) that scan_lines must look at, else ``limit``."""
        data, size = self.data, self.size
        best = limit
        for pattern in (b"\n--", b"\r--"):  # a line break, then a line starting with "--"
            i = data.find(pattern, line, min(size, best + 1))
            if i >= 0:
                best = i + 1
        if self.blank_ends:
            m = _BLANK_AFTER.search(data, line, min(size, best))
            if m is not None:
                best = m.start() + 1
        return best

    def rest(self) -> str | Span:
        """Everything up to where reading stops: a leaf's payload."""
        start = self.pos
        self.pos = stop = self.scan(start, None)[0]
        if self.pending is None and self.lazy_above is not None and stop - start > self.lazy_above:
            return Span(self.data, start, stop)
        chunk = self.data[start:stop]
        if self.pending is not None:
            chunk, self.pending = self.pending + chunk, None
        return _text(chunk)

    # ------------------------------------------------------------ entities

    def entity(self, parent: Node | None) -> Node:
        node = Node("message/rfc822" if parent is not None and parent._ctype == "multipart/digest" else "text/plain")
        if parent is not None:
            if isinstance(parent._payload, list):
                parent._payload.append(node)
            else:
                parent._payload = [node]
        self.last = node
        ct_value = self.headers(node)
        ctype = node._ctype
        maintype = ctype.partition("/")[0]
        if ctype == "message/delivery-status":
            # RFC 3464 §2.1: blocks of header fields separated by empty lines, one entity each.
            while True:
                self.ends.append(None)
                self.blank_ends += 1
                self.entity(node)
                self.ends.pop()
                self.blank_ends -= 1
                if self.at_end(self.pos):
                    break
                self.pos = self.line_end(self.pos)  # the empty line
                if self.at_end(self.pos):
                    break
        elif maintype == "message":
            self.entity(node)
        elif maintype == "multipart":
            # The loop over the parts is here, not in a helper, so that each nesting level costs
            # one Python frame, as in compat32: both reach the recursion limit at the same depth.
            sep = self.open_multipart(node, ct_value)
            if sep is not None:
                closed = False
                while not self.at_end(self.pos):
                    kind = self.own(self.pos, sep)
                    # Every reader below stops at a delimiter or where the enclosing entity ends.
                    assert kind is not None
                    self.pos = self.line_end(self.pos)
                    if kind:
                        closed = True
                        break
                    # Delimiter lines in a row delimit no empty parts (compat32's reading).
                    while not self.at_end(self.pos) and self.own(self.pos, sep) is not None:
                        self.pos = self.line_end(self.pos)
                    self.push_end(sep)
                    start = self.pos
                    child = self.entity(node)
                    self.pop_end(sep)
                    self._strip_delimiter_eol()
                    child.span = (start, _without_eol(self.data, start, self.pos))
                    self.last = node
                self.close_multipart(node, closed)
        else:
            node._payload = self.rest()
        return node

    def headers(self, node: Node) -> str | None:
        """Read the header section into ``node``; returns the raw first Content-Type value."""
        data, p = self.data, self.pos
        if self.pending is not None or self.colon_ends:
            return self._headers_slow(node)
        # Usual case, one regex pass: the section ends at the first empty line (or the end of
        # input), and the fields found before it cover every byte up to there.
        q = self.first_blank(p)
        fields = _FIELD.findall(data, p, q)
        if sum([len(name) + len(value) for name, value in fields]) + len(fields) != q - p:
            # Something else comes first: the fields end at the first line that is not one.
            q = _FIELDS.match(data, p).end()  # type: ignore[union-attr]  # '*' always matches
            if not self.at_end(q) and _HEADER_LINE.match(data, q):
                return self._headers_slow(node)
            fields = _FIELD.findall(data, p, q)
        node._headers = [(name.decode("ascii"), _text(value.lstrip(b" \t").rstrip(b"\r\n"))) for name, value in fields]
        if not self.at_end(q):
            if data[q] in b"\r\n":
                q = self.line_end(q)  # the empty line ending the header section
            else:
                node.defects.append(email.errors.MissingHeaderBodySeparatorDefect())
        self.pos = q
        return self._content_type(node)

    def _headers_slow(self, node: Node) -> str | None:
        """compat32's reading of an unusual header section, line by line: an mbox ``From `` line
        (dropped when first, a defect elsewhere, the first body line when last), a continuation
        with nothing to continue or a line starting with ':' (defects, dropped)."""
        data = self.data
        lines: list[tuple[int, bytes]] = []
        if self.pending is not None:
            lines.append((-1, self.pending))
            self.pending = None
        q = self.pos
        empty_line = False
        while not self.at_end(q):
            e = self.line_end(q)
            if not _HEADER_LINE.match(data, q):
                if data[q] in b"\r\n":
                    empty_line, q = True, e
                else:
                    node.defects.append(email.errors.MissingHeaderBodySeparatorDefect())
                break
            lines.append((q, data[q:e]))
            q = e
        self.pos = q
        fields: list[tuple[str, str]] = []
        current: list[str] = []
        for lineno, (start, raw) in enumerate(lines):
            line = _text(raw)
            if line[0] in " \t":
                if not current:
                    node.defects.append(email.errors.FirstHeaderLineIsContinuationDefect(line))
                else:
                    current.append(line)
                continue
            if current:
                fields.append(_field(current))
                current = []
            if line.startswith("From "):
                if lineno == 0:
                    continue  # mbox envelope line, not a header field
                if lineno == len(lines) - 1:
                    # Taken as the first line of the body. When the empty line after it has
                    # been consumed already, it is read back from ``pending``.
                    if empty_line:
                        self.pending = raw
                    else:
                        self.pos = start
                    break
                node.defects.append(email.errors.MisplacedEnvelopeHeaderDefect(line))
                continue
            if line.startswith(":"):
                node.defects.append(email.errors.InvalidHeaderDefect("Missing header name."))
                continue
            current = [line]
        if current:
            fields.append(_field(current))
        node._headers = fields
        return self._content_type(node)

    @staticmethod
    def _content_type(node: Node) -> str | None:
        value = next((v for k, v in node._headers if k.lower() == "content-type"), None)
        node._ctype = _content_type(value, node._default_type)
        return value

    def open_multipart(self, node: Node, ct_value: str | None) -> bytes | None:
        """Start a multipart body (RFC 2046 §5.1.1): read the preamble up to the first delimiter.

        Returns the delimiter to split at, or None when the body stays one string: no boundary
        parameter, or no opening delimiter before the end.
        """
        boundary = _boundary(ct_value) if ct_value is not None else None
        if boundary is None:
            node.defects.append(email.errors.NoBoundaryInMultipartDefect())
            node._payload = self.rest()
            return None
        # RFC 2045 §6.4: a multipart may only be 7bit, 8bit or binary (compat32 compares the raw value).
        cte = next((v for k, v in node._headers if k.lower() == "content-transfer-encoding"), "8bit")
        if _fetch(cte).lower() not in ("7bit", "8bit", "binary"):
            node.defects.append(email.errors.InvalidMultipartContentTransferEncodingDefect())
        try:
            sep: bytes | None = b"--" + boundary.encode("ascii")
        except UnicodeEncodeError:  # RFC 2231-decoded or U+FFFD from 8-bit bytes: no line can match
            sep = None
        if sep is not None and (b"\r" in sep or b"\n" in sep):
            sep = None  # a delimiter is one line
        start = self.pos
        q, close = self.scan(start, sep)
        head = self.data[start:q]
        if self.pending is not None:
            head, self.pending = self.pending + head, None
        if close is not False:
            # No opening delimiter before the end (or only a close delimiter): what was read is
            # the payload; after a close delimiter compat32 reads the rest and drops it.
            node.defects.append(email.errors.StartBoundaryNotFoundDefect())
            node._payload = _text(head)
            self.pos = self.scan(self.line_end(q), None)[0] if close else q
            node.epilogue = ""
            return None
        if head:
            node.preamble = _strip_eol(_text(head))
        self.pos = q
        return sep

    def close_multipart(self, node: Node, closed: bool) -> None:
        """After the last part: the epilogue follows a close delimiter, up to where reading stops."""
        if not closed:
            node.defects.append(email.errors.CloseBoundaryNotFoundDefect())
            return
        start = self.pos
        self.pos = stop = self.scan(start, None)[0]
        node.epilogue = _text(self.data[start:stop])

    def _strip_delimiter_eol(self) -> None:
        """RFC 2046 §5.1.1: the line break before a delimiter belongs to it; compat32 removes it
        from the entity created last, or from the epilogue when that is a multipart (whose
        unsplit payload therefore keeps it)."""
        last = self.last
        if last is None:
            return
        if last._ctype.partition("/")[0] == "multipart":
            if last.epilogue == "":
                last.epilogue = None
            elif last.epilogue is not None:
                last.epilogue = _strip_eol(last.epilogue)
        elif isinstance(last._payload, str):
            last._payload = _strip_eol(last._payload)
        elif isinstance(last._payload, Span):
            last._payload.strip_eol()


def _without_eol(data: Buffer, start: int, stop: int) -> int:
    """``stop`` moved before the line break that ends ``data[start:stop]``, as _strip_eol
    removes it from the entity (CRLF, LF or a bare CR)."""
    if stop - start >= 2 and data[stop - 2 : stop] == b"\r\n":
        return stop - 2
    if stop > start and data[stop - 1 : stop] in (b"\n", b"\r"):
        return stop - 1
    return stop


def _field(lines: list[str]) -> tuple[str, str]:
    # compat32: name up to the first ':', value without the blanks after it and the final line break.
    name, _, value = lines[0].partition(":")
    return name, (value.lstrip(" \t") + "".join(lines[1:])).rstrip("\r\n")


class FastParser:
    """Drop-in for ``BytesParser(policy=compat32).parsebytes`` as far as mime.py is concerned.

    Stateless between calls, so one instance serves all threads.
    """

    def parsebytes(self, text: bytes, /) -> Node:
        return self.parse(bytes(text))

    def parse(self, data: Buffer, *, lazy_above: int | None = None) -> Node:
        """The tree of ``data`` (bytes, or a :class:`SpoolMap` of a spool file, read in
        place); leaves longer than ``lazy_above`` stay in ``data`` as :class:`Span`."""
        split = _Split(data, lazy_above)
        root = split.entity(None)
        if root.get_content_maintype() == "multipart" and not root.is_multipart():
            root.defects.append(email.errors.MultipartInvariantViolationDefect())
        return root


PARSER = FastParser()
