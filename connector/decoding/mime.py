"""Raw RFC 5322 bytes -> :class:`DecodedMail`.

The MIME tree comes from :mod:`connector.decoding.fastmime`, which builds the same tree as the
stdlib parser with the ``compat32`` policy (never raises on malformed input, records what it
repaired in ``defects``) at a fraction of the cost; compat32 itself stays selectable through
``_PARSER``. Everything above the tree is done here, because the stdlib helpers get the details
wrong for real-world mail:

* ``email.header.decode_header`` returns unencoded runs as ``raw-unicode-escape`` bytes,
  which mangles raw UTF-8 headers (RFC 6532), so RFC 2047 is decoded by :func:`_decode_words`;
* ``Message.get_filename`` returns the plain ``filename=`` when ``filename*=`` is also present
  (RFC 2231 / RFC 6266 §4.3 say the extended one wins) and reads 8-bit parameters through a
  lossy ``Header`` object, so parameters are parsed by :func:`_parse_params`;
* ``parsedate_to_datetime`` maps two-digit years 50-68 to 20xx and leaves three-digit years
  alone, both contrary to RFC 5322 §4.3 (see :meth:`_Decoder.date_millis`).

Contract of :func:`decode_mail`:

* it never raises anything but :class:`~connector.errors.DecodeError` (and its subclass
  :class:`~connector.errors.MailTooLargeError`); input that is not a mail at all still
  decodes, with warnings;
* every ``str`` in the result is valid Unicode (no lone surrogates);
* exception messages and warnings never contain mail content: only part numbers, header
  field names, charset labels and defect class names, each reduced to a safe alphabet.

Decoding is pure CPU-bound Python; it does no I/O and keeps no state between calls, so it is
safe to call from several threads (which, under the GIL, does not make it faster).
"""

from __future__ import annotations

import binascii
import codecs
import dataclasses
import email.headerregistry
import email.parser
import email.policy
import email.utils
import functools
import hashlib
import mmap
import re
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from email.message import Message
from typing import Any

from connector.decoding import fastmime
from connector.decoding.fastmime import Entity, Splitter
from connector.decoding.model import (
    Address,
    AddressGroup,
    Attachment,
    DecodedMail,
    Header,
    LargeContent,
    MessageSummary,
    Part,
    SelectedBody,
    SmimeFacts,
)
from connector.decoding.options import DEFAULT_OPTIONS, DecodeLimits, DecodeOptions
from connector.decoding.stream import DecodedStream
from connector.errors import DecodeError, MailTooLargeError, SignatureError, SmimeError

__all__ = ["decode_mail"]

_POLICY = email.policy.compat32
# The MIME splitter. fastmime builds the same tree as the stdlib's compat32 feed parser, several
# times faster; compat32 stays selectable (assign _PARSER) for the differential test
# (tests/unit/test_fastmime.py) and bench/parsers.py. Both are stateless between calls, so one
# instance serves all threads.
SPLITTERS: dict[str, Splitter] = {"fast": fastmime.PARSER, "compat32": email.parser.BytesParser(policy=_POLICY)}
_PARSER: Splitter = SPLITTERS["fast"]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLI = timedelta(milliseconds=1)

# ---------------------------------------------------------------- small string helpers

_SURROGATE = re.compile("[\ud800-\udfff]")
# RFC 5322 §2.2.3: unfolding removes every CRLF that is immediately followed by WSP.
# The parser keeps whatever line ending the mail used, so LF and CR alone are accepted too.
_FOLD = re.compile(r"(?:\r\n|\n|\r)(?=[ \t])")
_UNSAFE_LABEL = re.compile(r"[^A-Za-z0-9._:+-]")


def clean_str(text: str) -> str:
    """Return ``text`` with every lone surrogate replaced by U+FFFD.

    Python strings may hold surrogates (``surrogateescape`` from the parser, UTF-7 and
    UTF-16 quirks); they cannot be encoded as UTF-8 and would break Avro/JSON serialisation
    later, so every string leaving this module passes through here.
    """
    if text.isascii():  # O(1) in CPython: the flag is kept on the string
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def _safe_label(label: str) -> str:
    """A charset label or header name made safe for a warning: restricted alphabet, bounded length."""
    return repr(_UNSAFE_LABEL.sub("?", label[:40]))


def _to_bytes(text: str) -> bytes:
    """Recover the original bytes of a string produced by the parser (ASCII + surrogateescape)."""
    try:
        return text.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        # Not produced by BytesParser (a payload set by other means): best effort, never fails.
        return text.encode("utf-8", "surrogatepass")


def _unfold(value: str) -> str:
    return _FOLD.sub("", value) if ("\n" in value or "\r" in value) else value


# ---------------------------------------------------------------- charsets

# Labels seen in the wild that Python's codec registry does not know, or knows wrongly.
_CHARSET_ALIASES: dict[str, str] = {
    "uft-8": "utf-8",
    "utf8mb4": "utf-8",
    "unicode-1-1-utf-7": "utf-7",
    "iso-8859-8-i": "iso-8859-8",  # RFC 1556: logical ordering; same code points
    "iso-8859-8-e": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-6-e": "iso-8859-6",
    "x-user-defined": "windows-1252",
    "windows-874": "cp874",
    "x-sjis": "shift_jis",
    "ks_c_5601-1987": "cp949",  # Outlook's label; the real repertoire is Microsoft's cp949
    "ks_c_5601": "cp949",
    "gb2312": "gb18030",  # senders label GBK/GB18030 text as gb2312; GB18030 is a superset
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ansi_x3.110-1983": "latin-1",
    "x-mac-roman": "mac-roman",
}
# Labels that mean "some 8-bit charset, nobody knows which": guess UTF-8, then Latin-1.
_GUESS_LABELS = frozenset({"unknown-8bit", "x-unknown", "unknown", "default", "charset", "8bit"})
_ASCII_LABELS = frozenset({"us-ascii", "ascii", "us", "iso646-us", "ansi_x3.4-1968", "7bit"})
# Codecs that exist in Python but are not mail charsets; decoding with them is meaningless.
_DENIED_CODECS = frozenset({"undefined", "unicode-escape", "raw-unicode-escape", "idna", "punycode", "mbcs"})
_CP_LABEL = re.compile(r"(?:cp|windows|win|ibm)[-_ ]?(\d{3,4})")
# Strict decoders that cannot return a lone surrogate: UTF-8 rejects encoded surrogates
# (RFC 3629 §3), Latin-1 maps bytes to U+0000-U+00FF. Their text skips clean_str's O(n) check.
_SURROGATE_FREE_CODECS = frozenset({"utf-8", "iso8859-1"})


def _codec_known(label: str) -> bool:
    try:
        codecs.lookup(label)
    except (LookupError, ValueError, TypeError):
        return False
    return True


@functools.lru_cache(maxsize=512)
def _resolve_charset(label: str | None) -> tuple[str, str | None]:
    """Classify a charset label (RFC 2045 §5.1 ``charset`` parameter, RFC 2047 §2 charset).

    Returns ``(kind, codec)``: ``ascii`` (none/us-ascii), ``codec`` (known), ``alias``
    (repaired via the alias table), ``guess`` (unknown-8bit and friends) or ``unknown``.
    Cached: labels repeat across mails, and the cache is bounded against hostile input.
    """
    if label is None:
        return ("ascii", None)
    norm = label.strip().strip("\"'").strip().lower()
    if not norm or norm in _ASCII_LABELS:
        return ("ascii", None)
    if norm in _GUESS_LABELS:
        return ("guess", None)
    alias = _CHARSET_ALIASES.get(norm)
    if alias is None and (m := _CP_LABEL.fullmatch(norm)) and norm != f"cp{m[1]}" and not _codec_known(norm):
        # Only labels Python does not know are repaired: 'windows-1252' and 'ibm850' are IANA
        # registered names (RFC 2978 §2.3) for exactly that codec, not a guess worth a warning.
        alias = f"cp{m[1]}"  # 'cp-850', 'win-1252', 'ibm-437' -> 'cp850', ...
    try:
        info = codecs.lookup(alias or norm)
    except (LookupError, ValueError, TypeError):
        return ("unknown", None)
    if info.name in _DENIED_CODECS or not getattr(info, "_is_text_encoding", True):
        return ("unknown", None)
    if info.name == "ascii":
        return ("ascii", None)
    return ("alias" if alias else "codec", info.name)


# ---------------------------------------------------------------- transfer encodings

_B64_JUNK = re.compile(rb"[^A-Za-z0-9+/=]")
# RFC 2045 §6.7 rule (3): trailing whitespace on a line was added in transport and is deleted.
# The lookbehind and possessive quantifier keep this linear on long runs of blanks.
_QP_TRAILING_WS = re.compile(rb"(?<![ \t])[ \t]++(?=\r?\n|\Z)")
_WS_EOL_PROBE = bytes.maketrans(b"\t\r", b" \n")


def _b64decode(data: bytes) -> tuple[bytes, bool]:
    """Decode base64 (RFC 2045 §6.8) leniently; the flag says whether repair was needed.

    Strict first (fast path). Otherwise characters outside the alphabet are dropped
    (§6.8 says decoders must ignore them), each '='-terminated run is decoded on its own
    (senders that concatenate separately encoded blocks) and missing padding is supplied;
    a dangling single character, which cannot carry a whole byte, is dropped.
    """
    compact = data.translate(None, b" \t\r\n")
    try:
        return binascii.a2b_base64(compact, strict_mode=True), False
    except binascii.Error:
        pass
    out = bytearray()
    for run in _B64_JUNK.sub(b"", compact).split(b"="):
        rem = len(run) % 4
        chunk = run[:-1] if rem == 1 else run + b"=" * ((4 - rem) % 4)
        if chunk:
            out += binascii.a2b_base64(chunk)
    return bytes(out), True


def _qpdecode(data: bytes, *, header: bool = False) -> tuple[bytes, bool]:
    """Decode quoted-printable (RFC 2045 §6.7; RFC 2047 §4.2 'Q' when ``header``) leniently.

    Invalid '=' escapes are kept literally (what §6.7 note (2) recommends); the flag
    reports them. Soft line breaks ('=' at end of line) are removed.
    """
    # One search for blank-before-line-end instead of four: mapping TAB to SP and CR to LF first
    # finds a superset of the cases, and on the extra ones the substitution only does the rstrip.
    if not header and b" \n" in data.translate(_WS_EOL_PROBE):
        data = _QP_TRAILING_WS.sub(b"", data)
    elif not header and data.endswith((b" ", b"\t")):
        data = data.rstrip(b" \t")
    decoded = binascii.a2b_qp(data, header=header)
    # a2b_qp keeps an invalid '=' literally; the only other source of '=' in its output is
    # '=3D'. Counting is much cheaper than scanning for bad escapes with a regex, and most
    # decoded text holds no '=' at all.
    bad = b"=" in decoded and decoded.count(b"=") > data.count(b"=3D") + data.count(b"=3d")
    return decoded, bad


# ---------------------------------------------------------------- parameters (RFC 2045/2183/2231)

_CONTINUATION = re.compile(r"(.+?)\*(\d{1,6})(\*?)")


def _split_params(value: str) -> list[str]:
    """Split a structured header value on ';' outside quoted strings (RFC 5322 §3.2.4)."""
    if '"' not in value:
        return value.split(";")
    items: list[str] = []
    pos, size = 0, len(value)
    while True:
        end = _PARAM_ITEM.match(value, pos).end()  # type: ignore[union-attr]  # '*' always matches
        items.append(value[pos:end])
        if end >= size:
            return items
        pos = end + 1  # past the ';'


# One item of a parameter list: text outside quotes up to ';', quoted strings (RFC 5322 §3.2.4)
# whole, with '\' escaping the next character inside them; an unclosed quote runs to the end.
_PARAM_ITEM = re.compile(r'(?:[^";]|"(?:[^"\\]|\\.)*+(?:\\\Z)?"?)*+', re.S)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        # Only \\ and \" are unescaped: Windows paths in filenames are often left unescaped.
        return value[1:-1].replace("\\\\", "\\").replace('\\"', '"')
    return value.strip('"')


class _Params:
    """Main value and parameters of a Content-Type / Content-Disposition header."""

    __slots__ = ("params", "value")

    def __init__(self, value: str, params: dict[str, str]) -> None:
        self.value = value
        self.params = params


# ---------------------------------------------------------------- RFC 2047 encoded words

# RFC 2047 §2: =?charset?encoding?encoded-text?=, with RFC 2231 §5 '*language' after the charset.
# Encoded text is matched leniently (spaces allowed) as many senders break the rules.
_ENCODED_WORD = re.compile(r"=\?([^?\s*]*)(?:\*[^?\s]*)?\?([QqBb])\?([^?]*)\?=")


# ---------------------------------------------------------------- the decoder


_PART_FIELDS = frozenset({"content-type", "content-disposition", "content-transfer-encoding", "content-id"})


def _children(part: Entity) -> list[Entity] | None:
    """Sub-entities of a multipart or message/* part, None for a leaf."""
    if not part.is_multipart():
        return None
    payload = part.get_payload()
    return [p for p in payload if isinstance(p, (Message, fastmime.Node))] if isinstance(payload, list) else None


def _entities(roots: list[Entity]) -> Iterator[Entity]:
    """Every entity under ``roots`` (depth-first); depth was bounded by survey()."""
    stack = list(reversed(roots))
    while stack:
        e = stack.pop()
        yield e
        children = _children(e)
        if children:
            stack.extend(reversed(children))


def _kept_boundary_eol(part: Entity) -> bool:
    """Whether compat32 left the line break that belongs to the next boundary on ``part``.

    RFC 2046 §5.1.1: the CRLF before a boundary delimiter belongs to the delimiter. compat32
    removes it from the last entity parsed before the delimiter, except when that entity is
    typed multipart/* but could not be split (no usable boundary): then it stays on the payload.
    """
    return part.get_content_maintype() == "multipart" and isinstance(
        getattr(part, "_payload", None), (str, fastmime.Span)
    )


def _strip_eol(data: bytes) -> bytes:
    for eol in (b"\r\n", b"\n", b"\r"):
        if data.endswith(eol):
            return data[: -len(eol)]
    return data


def _part_name(path: tuple[int, ...]) -> str:
    return "part " + ".".join(map(str, path)) if path else "message"


_SMIME_SUBTYPES = frozenset({"pkcs7-mime", "x-pkcs7-mime"})
_SIGNATURE_SUBTYPES = frozenset({"pkcs7-signature", "x-pkcs7-signature"})
_SIGNATURE_TYPES = frozenset({"application/pkcs7-signature", "application/x-pkcs7-signature"})
_SMIME_PROTOCOLS = frozenset({"application/pkcs7-signature", "application/x-pkcs7-signature"})
_TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})
# message/* whose body is blocks of header-like fields, not a message (RFC 3464, RFC 6533, RFC 8098, RFC 5965).
_FIELD_BLOCK_SUBTYPES = frozenset(
    {"delivery-status", "global-delivery-status", "disposition-notification", "global-disposition-notification",
     "feedback-report"}
)  # fmt: skip
_UU_CTES = frozenset({"x-uuencode", "uuencode", "uue", "x-uue"})
# A uuencoded block inside a text part (POSIX uuencode): "begin <octal mode> <name>" ... "end".
_UU_BEGIN = re.compile(rb"(?m)^begin [0-7]{3,4} ([^\r\n]+)\r?\n")
_UU_END = re.compile(rb"(?m)^end[ \t]*\r?$")
_MESSAGE_ID = re.compile(r"<[^<>\s]*>")
# One or more empty groups (RFC 5322 §3.4 group with no group-list), comments allowed as CFWS.
# Possessive quantifiers: linear on hostile input (header values may be 64 KiB of blanks).
_EMPTY_GROUPS = re.compile(r"(?:[^:;]*+:(?:\s|\([^()]*+\))*+;[\s,]*+)++")


#: S/MIME layers unwrapped in one mail at most (RFC 8551 §3.7 triple wrapping).
MAX_SMIME_LAYERS = 3
#: A text/plain or text/html part over this many encoded octets is not taken as the mail's
#: body (it could not travel in a record anyway) but kept as an attachment, placed like one.
MAX_HELD_BODY = 8 * 1024 * 1024
#: An embedded message streamed from the buffer passes on what it flattened at about this size.
_FLUSH_BYTES = 1 << 20


def _p7m_name(ct: _Params, disposition: _Params) -> bool:
    """An octet-stream part named *.p7m: how some clients label S/MIME (RFC 8551 §3.2.1)."""
    name = disposition.params.get("filename") or ct.params.get("name") or ""
    return name.lower().endswith(".p7m")


class _PassthroughSignal(Exception):  # noqa: N818 - a signal, not an error
    """Internal: the mail is S/MIME encrypted and the mailbox publishes such mail as is."""


class _Decoder:
    """State of one decode_mail call: the warnings collected so far, the part tree, limits."""

    def __init__(self, options: DecodeOptions) -> None:
        self.options = options
        self.limits: DecodeLimits = options.limits
        self.max_depth = self.limits.max_depth
        self.max_parts = self.limits.max_parts
        self.deadline = time.monotonic() + self.limits.max_decode_seconds
        self._warnings: dict[str, None] = {}  # ordered set
        self.text_body: str | None = None
        self.html_body: str | None = None
        self.attachments: list[Attachment] = []
        self.parts: list[Part] = []
        #: every leaf in document order: (path, content type, charset, bytes) for body selection;
        #: None for a part too large to be held (options.stream_above).
        self.leaves: list[tuple[str, str, str | None, bytes | LargeContent]] = []
        self.linesep = "\r\n"
        self.entities = 0
        self.decoded_bytes = 0
        self.smime: dict[str, object] = {}
        #: where an S/MIME layer is the message content (RFC 8551 §3.1) and gets unwrapped: the
        #: top-level entity, what an unwrap produced, the content of a top-level multipart/signed.
        #: A .p7m anywhere else is an attachment someone sent, kept as is (kind smime-*).
        self.smime_body_paths: set[tuple[int, ...]] = {()}
        self.smime_layers = 0
        #: signature verdicts, outermost layer first (connector.decoding.signature).
        self.signatures: list[Any] = []
        #: the buffers the splitter parsed, by the path of their root entity: the message, and
        #: each unwrapped S/MIME layer; part offsets (Node.span) point into them.
        self.layer_buffers: dict[tuple[int, ...], Any] = {}

    def warn(self, message: str) -> None:
        self._warnings[message] = None

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(clean_str(w) for w in self._warnings)

    # ------------------------------------------------------------ text and charsets

    def decode_bytes(self, data: bytes, label: str | None, where: str) -> str:
        """Decode ``data`` declared as charset ``label``; never fails, warns on every guess.

        The result is clean (no lone surrogates, see clean_str). Strict UTF-8 and Latin-1, most
        bodies, cannot produce any, so only other codecs pay for the check.
        """
        kind, codec = _resolve_charset(label)
        if codec is not None:
            if kind == "alias":
                self.warn(f"{where}: charset {_safe_label(label or '')} read as {codec!r}")
            try:
                text = data.decode(codec)
            except (UnicodeError, ValueError):
                self.warn(f"{where}: bytes invalid in charset {codec!r} replaced")
            else:
                return text if codec in _SURROGATE_FREE_CODECS else clean_str(text)
            try:
                return clean_str(data.decode(codec, "replace"))
            except (UnicodeError, ValueError, LookupError):
                return data.decode("utf-8", "replace")
        if kind == "unknown":
            self.warn(f"{where}: unknown charset {_safe_label(label or '')} read as 'utf-8' with replacement")
            return data.decode("utf-8", "replace")
        if data.isascii():
            return data.decode("ascii")
        # 8-bit data without a usable label: UTF-8 is by far the most likely, and valid UTF-8 is
        # very unlikely to be anything else; Latin-1 cannot fail. RFC 6532 makes UTF-8 the default.
        what = f"charset {_safe_label(label or '')}" if kind == "guess" else "undeclared 8-bit data"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.warn(f"{where}: {what} read as 'latin-1'")
            return data.decode("latin-1")
        self.warn(f"{where}: {what} read as 'utf-8'")
        return text

    def recover_header(self, value: str, where: str) -> str:
        """Turn a raw header value from the parser into Unicode.

        RFC 6532 §3.2 allows raw UTF-8 in headers; compat32 hands it over as surrogateescape'd
        ASCII. Anything that is not UTF-8 is read as Latin-1 (cannot fail) with a warning.
        """
        if value.isascii():
            return value
        data = _to_bytes(value)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.warn(f"{where}: 8-bit data is not UTF-8, read as 'latin-1'")
            return data.decode("latin-1")

    def decode_words(self, value: str, where: str) -> str:
        """Decode RFC 2047 encoded words in an (already unfolded, already Unicode) header value.

        RFC 2047 §6.2: whitespace between two adjacent encoded words is dropped. Adjacent words
        in the same charset are joined as bytes before decoding, so a multi-byte character split
        across two words (forbidden by §5 but common) survives.
        """
        if "=?" not in value:
            return value
        out: list[str] = []
        pending = bytearray()
        pending_charset: str | None = None
        pos = 0
        after_word = False

        def flush() -> None:
            nonlocal pending, pending_charset
            if pending_charset is not None:
                out.append(self.decode_bytes(bytes(pending), pending_charset or None, where))
            pending = bytearray()
            pending_charset = None

        for match in _ENCODED_WORD.finditer(value):
            gap = value[pos : match.start()]
            if gap and not (after_word and not gap.strip(" \t")):
                flush()
                out.append(gap)
            charset, encoding, text = match.groups()
            raw = text.encode("utf-8", "surrogatepass")
            if encoding in "Bb":
                data, repaired = _b64decode(raw)
            else:
                data, repaired = _qpdecode(raw, header=True)
            if repaired:
                self.warn(f"{where}: malformed encoded word repaired")
            charset = charset.lower()
            if pending_charset is not None and charset != pending_charset:
                flush()
            pending += data
            pending_charset = charset
            pos = match.end()
            after_word = True
        flush()
        out.append(value[pos:])
        return "".join(out)

    # ------------------------------------------------------------ headers of a part

    def part_headers(self, part: Entity, where: str) -> dict[str, str]:
        """First occurrence of each MIME header field (RFC 2045 §3) of ``part``.

        Lower-cased name -> unfolded Unicode value; other fields are not looked at.
        """
        found: dict[str, str] = {}
        prefix = "" if where == "message" else f"{where} "
        for name, value in part.raw_items():
            key = str(name).lower()
            if key in _PART_FIELDS and key not in found:
                text = _unfold(str(value))
                if not text.isascii():
                    text = self.recover_header(text, f"{prefix}header {_safe_label(str(name))}")
                found[key] = text
        return found

    def parse_params(self, value: str | None, where: str) -> _Params:
        """Parse ``value *(";" attribute=value)`` (RFC 2045 §5.1, RFC 2183 §2) with RFC 2231.

        RFC 2231 §3 continuations (``name*0=``, ``name*1*=``) are joined in index order; §4
        extended values (``charset'language'percent-encoded``) are decoded. An extended or
        continued value wins over a plain one of the same name (RFC 6266 §4.3 reasoning).
        """
        if value is None:
            return _Params("", {})
        items = _split_params(value)
        plain: dict[str, str] = {}
        extended: dict[str, str] = {}
        continued: dict[str, dict[int, tuple[str, bool]]] = {}
        for item in items[1:]:
            name, sep, val = item.partition("=")
            if not sep:
                continue
            name = name.strip().lower()
            if "*" in name and (m := _CONTINUATION.fullmatch(name)):  # the test skips the regex for most names
                continued.setdefault(m[1], {})[int(m[2])] = (_unquote(val), bool(m[3]))
            elif name.endswith("*"):
                extended.setdefault(name[:-1], _unquote(val))
            elif name:
                plain.setdefault(name, _unquote(val))
        params = dict(plain)
        for name, segments in continued.items():
            params[name] = self._join_continuations(segments, where)
        for name, val in extended.items():
            params[name] = self._decode_extended(val, where)
        return _Params(items[0].strip().lower(), params)

    def _decode_extended(self, value: str, where: str) -> str:
        # RFC 2231 §4: charset'language'%XX-encoded; without the quotes, take it as %-encoded UTF-8.
        parts = value.split("'", 2)
        charset, text = (parts[0], parts[2]) if len(parts) == 3 else ("utf-8", value)
        return self.decode_bytes(urllib.parse.unquote_to_bytes(text), charset or None, where)

    def _join_continuations(self, segments: dict[int, tuple[str, bool]], where: str) -> str:
        charset: str | None = None
        data = bytearray()
        for index in sorted(segments):
            text, encoded = segments[index]
            if encoded:
                if index == 0 and text.count("'") >= 2:
                    label, _lang, text = text.split("'", 2)
                    charset = label or None
                data += urllib.parse.unquote_to_bytes(text)
            else:
                data += text.encode("utf-8")
        if charset is None and data.isascii():
            return data.decode("ascii")
        return self.decode_bytes(bytes(data), charset or "utf-8", where)

    # ------------------------------------------------------------ top-level header fields

    def headers(self, msg: Entity, prefix: str = "") -> list[Header]:
        result: list[Header] = []
        for field, value in msg.raw_items():
            name = clean_str(str(field))
            raw = _unfold(str(value))
            if raw.isascii() and "=?" not in raw:  # the common case, and cheap
                result.append(Header(name=name, raw=raw, value=raw))
                continue
            where = f"{prefix}header {_safe_label(name)}"
            raw = clean_str(self.recover_header(raw, where))
            result.append(Header(name=name, raw=raw, value=clean_str(self.decode_words(raw, where))))
        return result

    def addresses(self, values: Sequence[str], where: str) -> tuple[Address, ...]:
        """Mailboxes of address header fields (RFC 5322 §3.4); groups are flattened.

        Parsed before RFC 2047 decoding, so an encoded comma or '<' in a display name cannot
        split or invent addresses; the display names are decoded afterwards (RFC 2047 §5 (3)).
        """
        if not values:
            return ()
        result = []
        for name, addr in _plain_mailboxes(", ".join(values)) or email.utils.getaddresses(list(values)):
            if addr:
                decoded = self.decode_words(name, where) if name else ""
                result.append(Address(name=clean_str(decoded), address=clean_str(addr)))
        # RFC 5322 §3.4: a group may be empty and CFWS may precede its ';' ("Hidden: ;",
        # "undisclosed-recipients: (none) ;"): nothing to parse there, nothing to warn about.
        if not result and any(v.strip() and not _EMPTY_GROUPS.fullmatch(v) for v in values):
            self.warn(f"{where}: no address could be parsed")
        return tuple(result)

    def date_millis(self, raw: str) -> int | None:
        """Milliseconds since the epoch (UTC) of an RFC 5322 §3.3 date, or None with a warning.

        A date without zone information ('-0000', or a naive result) is taken as UTC. Years
        follow RFC 5322 §4.3 (obs-year): 00-49 -> 20xx, 50-99 and three digits -> +1900;
        Python maps 50-68 to 20xx and leaves three-digit years unchanged, so both are corrected.
        """
        try:
            dt = email.utils.parsedate_to_datetime(raw)
            if 2050 <= dt.year <= 2068 and not re.search(rf"(?<![\d+-]){dt.year}(?!\d)", raw):
                dt = dt.replace(year=dt.year - 100)
            elif 100 <= dt.year <= 999:
                dt = dt.replace(year=dt.year + 1900)
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            return (dt - _EPOCH) // _MILLI
        except (ValueError, TypeError, OverflowError, IndexError, AttributeError):
            self.warn("header 'Date': unparseable date")
            return None

    # ------------------------------------------------------------ structure

    def survey(self, root: Entity, base: tuple[int, ...] = ()) -> None:
        """Enforce the depth, part and header limits and turn parser defects into warnings.

        Iterative, so a hostile tree cannot exhaust the Python stack here; everything after
        this runs on a tree known to be at most ``max_depth`` deep. ``base``: where an entity
        unwrapped from S/MIME sits in the outer tree (its parts count toward the same limits).
        """
        limits = self.limits
        stack: list[tuple[Entity, tuple[int, ...]]] = [(root, base)]
        while stack:
            part, path = stack.pop()
            self.entities += 1
            if self.entities > self.max_parts:
                raise MailTooLargeError(f"more than {self.max_parts} MIME parts", reason="max_parts")
            if len(path) > self.max_depth:
                raise MailTooLargeError(f"MIME nesting deeper than {self.max_depth} levels", reason="max_depth")
            if len(part) > limits.max_headers:
                raise MailTooLargeError(
                    f"{_part_name(path)}: more than {limits.max_headers} header fields", reason="max_headers"
                )
            for name, value in part.raw_items():
                if len(value) > limits.max_header_bytes:
                    # Inside decrypted content even a field name may be secret: not named then.
                    shown = "a header field" if self.smime.get("decrypted") else f"header {_safe_label(str(name))}"
                    raise MailTooLargeError(
                        f"{_part_name(path)}: {shown} longer than {limits.max_header_bytes} octets",
                        reason="max_header_bytes",
                    )
            for defect in part.defects:
                self.warn(f"{_part_name(path)}: defect {type(defect).__name__}")
            children = _children(part)
            if children is not None:
                stack.extend((child, (*path, i)) for i, child in reversed(list(enumerate(children, 1))))

    def walk(self, part: Entity, path: tuple[int, ...], can_claim: bool) -> bool:
        """Assign ``part`` and its descendants to the bodies or the attachments.

        Returns whether a body was claimed below ``part``. RFC 2046 §5.1.4: the children of
        multipart/alternative are versions of the same content, so each may supply the plain or
        the HTML body. RFC 2387 §3.2: in multipart/related only the root (``start``, else the
        first child) can be a body. Any other multipart (mixed §5.1.3, signed, report and
        unknown subtypes per §5.1.7) is treated as mixed: the first child that yields a body
        ends body claiming, later text parts become attachments.
        """
        if time.monotonic() > self.deadline:
            raise MailTooLargeError(
                f"decoding took longer than {self.limits.max_decode_seconds:g} s", reason="max_decode_seconds"
            )
        where = _part_name(path)
        ctype = clean_str(part.get_content_type())
        maintype, _, subtype = ctype.partition("/")
        children = _children(part)
        headers = self.part_headers(part, where)
        ct = self.parse_params(headers.get("content-type"), where)
        pstr = ".".join(map(str, path))
        if children is not None and maintype == "multipart":
            self.add_part(pstr, path, ctype, ct, headers, None, b"", "container")
            # RFC 1847 §2.1: 'protocol' says which signature this is; PGP/MIME (RFC 3156 §5,
            # application/pgp-signature) is no S/MIME layer. An S/MIME signature part without the
            # parameter is still noted below, as a leaf.
            if (
                subtype == "signed"
                and path in self.smime_body_paths
                and ct.params.get("protocol", "").strip().lower() in _SMIME_PROTOCOLS
            ):
                self.note_signed("detached")
                # RFC 8551 §3.5.3: the first part is the signed content, still the message body.
                self.smime_body_paths.add((*path, 1))
                self._verify_detached(path, part, children)
            claimed = False
            if subtype == "alternative":
                for i, child in enumerate(children, 1):
                    claimed = self.walk(child, (*path, i), can_claim) or claimed
            elif subtype == "related":
                root = self._related_root(part, children, where)
                for i, child in enumerate(children, 1):
                    claimed = self.walk(child, (*path, i), can_claim and i == root) or claimed
            else:
                for i, child in enumerate(children, 1):
                    claimed = self.walk(child, (*path, i), can_claim and not claimed) or claimed
            return claimed

        disposition = self.parse_params(headers.get("content-disposition"), where)
        summary: MessageSummary | None = None
        large: LargeContent | None = None
        kind: str | None = None
        if children is not None:
            # message/rfc822 and other message/* (RFC 2046 §5.2): one attachment, the whole
            # embedded message as bytes. Bodies are never taken from inside it.
            large = self._large_message(children, headers, subtype, where, inside_multipart=bool(path))
            data = b"" if large is not None else self._serialise(children, headers, where, inside_multipart=bool(path))
            nl = self.linesep.encode("ascii")
            if (
                subtype in _FIELD_BLOCK_SUBTYPES
                and children
                and getattr(children[-1], "_payload", None) == ""
                and data.endswith(nl + nl)
                and headers.get("content-transfer-encoding", "").strip().lower() not in ("base64", "quoted-printable")
            ):
                # RFC 3464 §2.1 (RFC 8098 §3.1, RFC 5965 §3.1 alike): the body is blocks of fields
                # separated by blank lines, the last block ending with its last field's CRLF. The
                # parser keeps no trace of a blank line after it, _flatten writes one: drop it, so
                # size and sha256 are those of the octets sent.
                data = data[: -len(nl)]
            if subtype in ("rfc822", "global") and children:
                kind, summary = "message", self._summary(children[0], where)
            elif subtype == "delivery-status":
                kind = "delivery-status"  # RFC 3464 §2.1: parsed as header blocks by the stdlib
        else:
            if path in self.smime_body_paths and (
                (maintype == "application" and subtype in _SMIME_SUBTYPES)
                or (ctype == "application/octet-stream" and _p7m_name(ct, disposition))
            ):
                unwrapped = self._smime(part, path, ctype, ct, headers, can_claim)
                if unwrapped is not None:
                    return unwrapped
            body_slot = (
                can_claim
                and ctype in ("text/plain", "text/html")
                and disposition.value != "attachment"
                and (self.text_body if subtype == "plain" else self.html_body) is None
            )
            large = self._large(part, headers, where, body_slot=body_slot, strip_eol=bool(path))
            if large is not None:
                data = b""  # left in the buffer: an attachment, whatever its type
            else:
                data = self._transfer_decode(part, headers, where, strip_eol=bool(path) and _kept_boundary_eol(part))
            if body_slot and large is None:
                charset = ct.params.get("charset")
                text = self.decode_bytes(data, charset, where)  # clean already
                if subtype == "plain":
                    self.text_body = text
                    self._uudecode_blocks(data, pstr, where)
                else:
                    self.html_body = text
                role = "text_body" if subtype == "plain" else "html_body"
                self.add_part(pstr, path, ctype, ct, headers, disposition, data, role)
                self.leaves.append((pstr, ctype, charset, data))
                return True
            kind = self._kind(ctype, headers, subtype)

        att = self._attachment(
            ctype, headers, disposition, data, where, part=pstr, kind=kind, message=summary, large=large
        )
        if att.filename and att.filename.lower() == "winmail.dat" and kind is None:
            att = dataclasses.replace(att, kind="tnef")
        self.attachments.append(att)
        self.add_part(pstr, path, ctype, ct, headers, disposition, data, "attachment", kind=att.kind, att=att)
        self.leaves.append((pstr, ctype, ct.params.get("charset"), data if large is None else large))
        if maintype == "application" and subtype in _SIGNATURE_SUBTYPES and path[:-1] in self.smime_body_paths:
            self.note_signed("detached")
        return False

    # ------------------------------------------------------------ part tree and kinds

    def add_part(  # noqa: PLR0917 - one call per entity; keywords would only add noise
        self,
        pstr: str,
        path: tuple[int, ...],
        ctype: str,
        ct: _Params,
        headers: dict[str, str],
        disposition: _Params | None,
        data: bytes,
        role: str,
        *,
        kind: str | None = None,
        att: Attachment | None = None,
    ) -> None:
        leaf = role != "container"
        size = att.size if att is not None else len(data)
        if leaf:
            self.decoded_bytes += size
            if self.decoded_bytes > self.limits.max_decoded_bytes:
                raise MailTooLargeError(
                    f"decoded parts exceed {self.limits.max_decoded_bytes} bytes", reason="max_decoded_bytes"
                )
        cte = headers.get("content-transfer-encoding")
        self.parts.append(
            Part(
                path=pstr,
                depth=len(path),
                content_type=ctype,
                params=tuple((clean_str(k), clean_str(v)) for k, v in ct.params.items()),
                disposition=clean_str(disposition.value) if disposition is not None and disposition.value else None,
                filename=att.filename if att is not None else None,
                content_id=clean_str(headers["content-id"].strip()) if headers.get("content-id") else None,
                transfer_encoding=clean_str(cte.split(";")[0].strip().strip('"').lower()) if cte else None,
                size=size if leaf else 0,
                sha256=(att.sha256 if att is not None else hashlib.sha256(data).hexdigest()) if leaf else None,
                role=role,
                kind=kind,
            )
        )

    @staticmethod
    def _kind(ctype: str, headers: dict[str, str], subtype: str) -> str | None:
        if ctype in _TNEF_TYPES:
            return "tnef"
        if ctype in {"text/calendar", "application/ics"}:
            return "calendar"
        cte = headers.get("content-transfer-encoding", "").split(";")[0].strip().strip('"').lower()
        if cte in _UU_CTES:
            return "uuencoded"
        if subtype in _SIGNATURE_SUBTYPES:
            return "smime-signature"
        if subtype in _SMIME_SUBTYPES:
            return "smime-signed" if "signed" in headers.get("content-type", "").lower() else "smime-encrypted"
        return None

    def _uudecode_blocks(self, data: bytes, pstr: str, where: str) -> None:
        """uuencoded files pasted into a plain-text body (old clients, some scanners) become
        attachments of kind 'uuencoded'; the text body keeps them as text."""
        if b"begin " not in data:
            return
        # Found with two searches per block, not one lazy regex: that one rescanned the rest of
        # the text for every 'begin' line without an 'end' (quadratic; found by fuzzing).
        pos = 0
        while (m := _UU_BEGIN.search(data, pos)) is not None:
            end = _UU_END.search(data, m.end())
            if end is None:
                break  # no 'end' after this 'begin', so none after any later one either
            pos = end.end()
            out = bytearray()
            bad = False
            for line in data[m.end() : end.start()].splitlines():  # only the block's lines
                if not line.strip() or line.strip() == b"`":
                    continue
                try:
                    out += binascii.a2b_uu(line)
                except binascii.Error:
                    bad = True
            if bad:
                self.warn(f"{where}: malformed uuencoded line skipped")
            content = bytes(out)
            self.attachments.append(
                Attachment(
                    filename=clean_str(self.recover_header(m[1].decode("latin-1").strip(), where)),
                    content_type="application/octet-stream",
                    disposition=None,
                    content_id=None,
                    size=len(content),
                    sha256=hashlib.sha256(content).hexdigest(),
                    content=content,
                    part=pstr,
                    kind="uuencoded",
                )
            )

    def _summary(self, inner: Entity, where: str) -> MessageSummary:
        heads = self.headers(inner, f"{where} ")

        def first(name: str) -> Header | None:
            return _first(heads, name)

        def values(name: str) -> list[str]:
            return [h.raw for h in heads if h.name.lower() == name]

        date = first("date")
        date_raw = date.raw.strip() if date is not None else None
        mid, subject = first("message-id"), first("subject")
        return MessageSummary(
            message_id=mid.raw.strip() if mid is not None else None,
            subject=subject.value if subject is not None else None,
            from_=self.addresses(values("from"), f"{where} header 'From'"),
            to=self.addresses(values("to"), f"{where} header 'To'"),
            date_raw=date_raw,
            date_millis=self.date_millis(date_raw) if date_raw else None,
        )

    # ------------------------------------------------------------ S/MIME (RFC 8551)

    def note_signed(self, how: str) -> None:
        self.smime.setdefault("signed", True)
        self.smime.setdefault("signature_type", how)

    def _smime(  # noqa: PLR0917
        self, part: Entity, path: tuple[int, ...], ctype: str, ct: _Params, headers: dict[str, str], can_claim: bool
    ) -> bool | None:
        """Unwrap an application/pkcs7-mime part: decrypt enveloped-data (RFC 8551 §3.3),
        open opaque signed-data (§3.5.2, not verified here), then walk the inner entity in
        its place. None: not something to unwrap (certs-only...), an ordinary attachment."""
        from connector.decoding import smime  # noqa: PLC0415 - asn1crypto only for S/MIME mail

        where = _part_name(path)
        data = self._transfer_decode(part, headers, where, strip_eol=bool(path) and _kept_boundary_eol(part))
        # Without a smime-type parameter (RFC 8551 §3.2.2 makes it optional) the CMS content
        # type inside tells what it is.
        what = smime.smime_type(ctype, ct.params, body=data)
        if what not in ("enveloped-data", "authEnveloped-data", "signed-data"):
            return None
        self.smime_layers += 1
        if self.smime_layers > MAX_SMIME_LAYERS:
            # RFC 8551 §3.7 triple wrapping (sign, encrypt, sign) is the deepest real use; more
            # layers only multiply memory (each keeps its bytes while the next is decoded).
            raise MailTooLargeError(f"{where}: more than {MAX_SMIME_LAYERS} S/MIME layers", reason="max_smime_layers")
        pstr = ".".join(map(str, path))
        if what == "signed-data":
            self.note_signed("opaque")
            inner = self._verify_opaque(data, pstr)
            self.add_part(pstr, path, ctype, ct, headers, None, data, "smime", kind="smime-signed")
        else:
            self.smime["encrypted"] = True
            if self.options.smime == "passthrough":
                raise _PassthroughSignal
            if self.options.keys is None:
                raise SmimeError(
                    f"{where}: S/MIME encrypted, but the mailbox has no decryption keys (smime.keys)", reason="no_key"
                )
            result = smime.decrypt(data, self.options.keys)
            self.smime.update(decrypted=True, key=result.key_label, cipher=result.cipher)
            inner = result.content
            self.add_part(pstr, path, ctype, ct, headers, None, data, "smime", kind="smime-encrypted")
        del data  # the outer layer is not needed while the inner one is walked
        inner_msg = _PARSER.parsebytes(inner)
        child = (*path, 1)
        if inner_msg.get_content_type() == "multipart/signed":
            self.layer_buffers[child] = inner  # a detached signature inside: checked on these bytes
        del inner
        self.smime_body_paths.add(child)
        self.survey(inner_msg, child)
        return self.walk(inner_msg, child, can_claim)

    def _verify_opaque(self, data: bytes, pstr: str) -> bytes:
        """Verify opaque signed-data (RFC 8551 §3.5.2) and return its content; a bad signature
        is a fact of the record (smime.signatures), only unreadable structure is an error."""
        from connector.decoding import signature, smime  # noqa: PLC0415 - only for signed mail

        check, content = signature.verify_opaque(
            data, layer=pstr, trust=self.options.trust, at=self.options.verify_at, deadline=self.deadline
        )
        self.signatures.append(check)
        return content if content is not None else smime.unwrap_signed_data(data)

    def _verify_detached(self, path: tuple[int, ...], part: Entity, children: list[Entity]) -> None:
        """Verify a multipart/signed (RFC 1847, RFC 8551 §3.5.3) over the exact bytes its first
        part was parsed from: the splitter's own offsets (fastmime ``Node.span``) into the
        buffer this layer was parsed from. Never re-serialised, and never found by a second
        scan of our own, which could disagree with the parser about where the part is and so
        let a record show bytes other than the ones verified."""
        from connector.decoding import signature  # noqa: PLC0415 - only for signed mail

        pstr = ".".join(map(str, path))
        where = _part_name(path)
        at, trust = self.options.verify_at, self.options.trust
        self.smime_layers += 1
        if self.smime_layers > MAX_SMIME_LAYERS:
            raise MailTooLargeError(f"{where}: more than {MAX_SMIME_LAYERS} S/MIME layers", reason="max_smime_layers")
        if time.monotonic() > self.deadline:
            raise MailTooLargeError(
                f"decoding took longer than {self.limits.max_decode_seconds:g} s", reason="max_decode_seconds"
            )
        layer = max((p for p in self.layer_buffers if path[: len(p)] == p), key=len, default=None)
        raw = self.layer_buffers.get(layer) if layer is not None else None
        span = getattr(children[0], "span", None) if children else None
        defects = {type(d).__name__ for d in part.defects}
        problem = ""
        if len(children) != 2:
            problem = f"multipart/signed with {len(children)} parts instead of 2"
        elif defects & {"StartBoundaryNotFoundDefect", "CloseBoundaryNotFoundDefect", "NoBoundaryInMultipartDefect"}:
            problem = "multipart/signed whose delimiters are incomplete"
        elif children[1].get_content_type() not in _SIGNATURE_TYPES:
            problem = f"the second part of the multipart/signed is {children[1].get_content_type()}, not a signature"
        elif raw is None or span is None:
            problem = "the exact bytes of the signed part are not known (the stdlib splitter keeps no offsets)"
        if problem:
            self.signatures.append(_unreadable_signature(pstr, problem, at))
            return
        assert span is not None and raw is not None  # for the type checker: problem covers it
        sig_part = children[1]
        sig_headers = self.part_headers(sig_part, f"{where}.2")
        sig = self._transfer_decode(sig_part, sig_headers, f"{where}.2", strip_eol=_kept_boundary_eol(sig_part))
        start, stop = span
        view = memoryview(raw)
        content = view[start:stop]
        try:
            self.signatures.append(
                signature.verify_detached(sig, content, layer=pstr, trust=trust, at=at, deadline=self.deadline)
            )
        finally:
            # A spool mapping is closed right after decoding; a view still exported (held by a
            # traceback's reference cycle, say) would make that close fail.
            content.release()
            view.release()

    def _related_root(self, part: Entity, children: list[Entity], where: str) -> int:
        ctype = self.part_headers(part, where).get("content-type")
        start = self.parse_params(ctype, where).params.get("start")
        if start:
            for i, child in enumerate(children, 1):
                cid = self.part_headers(child, f"{where}.{i}").get("content-id")
                if cid is not None and cid.strip() == start.strip():
                    return i
        return 1

    def _attachment(
        self,
        ctype: str,
        headers: dict[str, str],
        disposition: _Params,
        data: bytes,
        where: str,
        *,
        part: str | None = None,
        kind: str | None = None,
        message: MessageSummary | None = None,
        large: LargeContent | None = None,
    ) -> Attachment:
        # RFC 2183 §2.3 filename, else the older Content-Type name (RFC 1341); RFC 2047 inside
        # a quoted parameter is illegal (RFC 2047 §5) but so common that it is decoded too.
        filename = disposition.params.get("filename")
        if not filename:
            filename = self.parse_params(headers.get("content-type"), where).params.get("name")
        if filename:
            filename = self.decode_words(filename, where).strip()
        content_id = headers.get("content-id")
        content_id = content_id.strip() if content_id else None
        return Attachment(
            filename=clean_str(filename) if filename else None,
            content_type=ctype,
            disposition=clean_str(disposition.value) if disposition.value else None,
            content_id=clean_str(content_id) if content_id else None,
            size=large.size if large is not None else len(data),
            sha256=large.sha256 if large is not None else hashlib.sha256(data).hexdigest(),
            content=data,
            part=part,
            kind=kind,
            message=message,
            large=large,
        )

    def _large(
        self, part: Entity, headers: dict[str, str], where: str, *, body_slot: bool, strip_eol: bool
    ) -> LargeContent | None:
        """For a leaf the parser left in the buffer (options.stream_above): transfer-decode it
        piece by piece, hashing as it goes, and return where its bytes are; None when the part
        is to be held like any other (S/MIME and uuencoded content, a text body of a size a
        record can carry, a multipart that could not be split)."""
        payload = getattr(part, "_payload", None)
        if not isinstance(payload, fastmime.Span):
            return None
        if strip_eol and _kept_boundary_eol(part):
            # A multipart that could not be split keeps the delimiter's line break (compat32);
            # _transfer_decode drops it: so does a copy of the span (the node keeps its own).
            payload = fastmime.Span(payload.data, payload.start, payload.stop)
            payload.strip_eol()
        cte = headers.get("content-transfer-encoding", "").split(";")[0].strip().strip('"').lower()
        if cte in _UU_CTES:
            return None
        if body_slot:
            if len(payload) <= MAX_HELD_BODY:
                return None
            self.warn(f"{where}: text part too large for a body (over {MAX_HELD_BODY} octets), kept as an attachment")
        if cte not in ("", "7bit", "8bit", "binary", "base64", "quoted-printable"):
            self.warn(f"{where}: unknown Content-Transfer-Encoding {_safe_label(cte)}, body kept encoded")
            cte = "binary"
        digest = hashlib.sha256()
        release = getattr(payload.data, "release", None)
        stream = DecodedStream(payload.data, payload.start, payload.stop, cte, release=release)
        for piece in stream:
            digest.update(piece)
            if time.monotonic() > self.deadline:
                raise MailTooLargeError(
                    f"decoding took longer than {self.limits.max_decode_seconds:g} s", reason="max_decode_seconds"
                )
        if stream.repaired:
            self.warn(
                f"{where}: malformed base64 repaired"
                if cte == "base64"
                else f"{where}: invalid quoted-printable escape kept as is"
            )
        return LargeContent.span(
            payload.data, payload.start, payload.stop, cte, stream.decoded_bytes, digest.hexdigest()
        )

    def _transfer_decode(self, part: Entity, headers: dict[str, str], where: str, *, strip_eol: bool) -> bytes:
        """The part's body with its Content-Transfer-Encoding (RFC 2045 §6) removed."""
        # The stored payload, not get_payload(): that one decodes 8-bit bodies with the declared
        # charset and errors='replace' before we could see the bytes.
        payload = getattr(part, "_payload", None)
        if isinstance(payload, fastmime.Span):
            data = payload.tobytes()
        else:
            data = _to_bytes(payload) if isinstance(payload, str) else b""
        if strip_eol:
            data = _strip_eol(data)
        cte = headers.get("content-transfer-encoding", "").split(";")[0].strip().strip('"').lower()
        if cte in ("", "7bit", "8bit", "binary"):
            return data
        if cte == "base64":
            decoded, repaired = _b64decode(data)
            if repaired:
                self.warn(f"{where}: malformed base64 repaired")
            return decoded
        if cte == "quoted-printable":
            decoded, bad = _qpdecode(data)
            if bad:
                self.warn(f"{where}: invalid quoted-printable escape kept as is")
            return decoded
        if cte in ("x-uuencode", "uuencode", "uue", "x-uue"):
            result = part.get_payload(decode=True)
            return result if isinstance(result, bytes) else data
        self.warn(f"{where}: unknown Content-Transfer-Encoding {_safe_label(cte)}, body kept encoded")
        return data

    def _large_message(
        self, children: list[Entity], headers: dict[str, str], subtype: str, where: str, *, inside_multipart: bool
    ) -> LargeContent | None:
        """An embedded message holding a part the parser left in the buffer (a forwarded mail
        with a large attachment): its bytes are produced by flattening it again whenever they
        are read, never held. None when it is small, or when its serialisation needs the whole
        (a transfer encoding on the message part, RFC 3464 field blocks): then it is held."""
        if not any(isinstance(getattr(e, "_payload", None), fastmime.Span) for e in _entities(children)):
            return None
        cte = headers.get("content-transfer-encoding", "").strip().lower()
        if cte in ("base64", "quoted-printable") or subtype in _FIELD_BLOCK_SUBTYPES:
            return None

        def pieces(read_bytes: int) -> Iterator[bytes]:
            return self._serialised_pieces(children, read_bytes, inside_multipart=inside_multipart)

        digest, size = hashlib.sha256(), 0
        for piece in pieces(1 << 20):
            digest.update(piece)
            size += len(piece)
            if time.monotonic() > self.deadline:
                raise MailTooLargeError(
                    f"decoding took longer than {self.limits.max_decode_seconds:g} s", reason="max_decode_seconds"
                )
        return LargeContent.of(pieces, size, digest.hexdigest())

    def _serialised_pieces(self, children: list[Entity], read_bytes: int, *, inside_multipart: bool) -> Iterator[bytes]:
        """What _serialise returns, as pieces: the children flattened, large payloads read in
        ``read_bytes`` slices (pages handed back), the final line break held back until the
        end, where _serialise's rule may drop it."""
        last = children[-1] if children else None
        while last is not None and last.get_content_maintype() == "message" and (inner := _children(last)):
            last = inner[-1]
        strip = inside_multipart and last is not None and _kept_boundary_eol(last)
        tail = b""
        for item in self._flatten_items(children):
            if isinstance(item, fastmime.Span):
                release = getattr(item.data, "release", None)
                for a in range(item.start, item.stop, read_bytes):
                    b = min(item.stop, a + read_bytes)
                    chunk, tail = tail + bytes(item.data[a:b]), b""
                    if release is not None:
                        release(b)
                    tail, chunk = chunk[-2:], chunk[:-2]
                    if chunk:
                        yield chunk
            else:
                chunk = tail + item
                tail, chunk = chunk[-2:], chunk[:-2]
                if chunk:
                    yield chunk
        if strip:
            tail = _strip_eol(tail)
        if tail:
            yield tail

    def _flatten_items(self, children: list[Entity]) -> Iterator[bytes | fastmime.Span]:
        for child in children:
            out = bytearray()
            yield from self._flatten(child, out, lazy=True)
            if out:
                yield bytes(out)

    def _serialise(
        self, children: list[Entity], headers: dict[str, str], where: str, *, inside_multipart: bool
    ) -> bytes:
        out = bytearray()
        for child in children:
            self._flatten_into(child, out)
        data = bytes(out)
        last = children[-1] if children else None
        while last is not None and last.get_content_maintype() == "message" and (inner := _children(last)):
            last = inner[-1]
        if inside_multipart and last is not None and _kept_boundary_eol(last):
            data = _strip_eol(data)
        cte = headers.get("content-transfer-encoding", "").strip().lower()
        if cte in ("base64", "quoted-printable"):
            # Forbidden by RFC 2046 §5.2.1 but sent anyway: the parser saw encoded text as a
            # header-less message, so undo the encoding on the serialised form.
            self.warn(f"{where}: message part with {cte} encoding")
            data = data.lstrip(b"\r\n")
            data = _b64decode(data)[0] if cte == "base64" else _qpdecode(data)[0]
        return data

    def _flatten(self, msg: Entity, out: bytearray, *, lazy: bool = False) -> Iterator[fastmime.Span]:
        """Write ``msg`` back as bytes, as close to the original as compat32 allows.

        Not email.generator: it re-derives boundaries through lossy Header objects and fails on
        8-bit ones. Here header fields are written as stored (original folding kept), bodies
        byte for byte, and a multipart is re-assembled per RFC 2046 §5.1.1 with the boundary as
        it appeared. Recursion is bounded: survey() has checked the depth.

        A generator: with ``lazy``, a payload left in the buffer (a Span) is not copied into
        ``out``: what ``out`` holds so far is yielded as bytes, then the Span, and ``out`` starts
        again empty (see _serialised_pieces). Otherwise every Span is copied and nothing is
        yielded; run it with :meth:`_flatten_into`.
        """
        nl = self.linesep.encode("ascii")
        for name, value in msg.raw_items():
            out += _to_bytes(f"{name}: {value}") + nl
        out += nl
        payload = getattr(msg, "_payload", None)
        if isinstance(payload, str):
            out += _to_bytes(payload)
            if lazy and len(out) >= _FLUSH_BYTES:  # many small parts: pass them on, keep none
                held = bytes(out)
                out.clear()
                yield fastmime.Span(held, 0, len(held))
            return
        if isinstance(payload, fastmime.Span):
            if lazy:
                held = bytes(out)
                out.clear()
                if held:
                    yield fastmime.Span(held, 0, len(held))
                yield payload
            else:
                out += payload.tobytes()
            return
        children = _children(msg)
        if children is None:
            return
        if msg.get_content_maintype() != "multipart":
            for child in children:
                yield from self._flatten(child, out, lazy=lazy)
            return
        raw_type = next((str(v) for k, v in msg.raw_items() if str(k).lower() == "content-type"), "")
        boundary = _to_bytes(self.parse_params(_unfold(raw_type), "message").params.get("boundary", ""))
        if msg.preamble is not None:
            out += _to_bytes(msg.preamble) + nl
        for i, child in enumerate(children):
            out += (nl if i else b"") + b"--" + boundary + nl
            yield from self._flatten(child, out, lazy=lazy)
        out += nl + b"--" + boundary + b"--"
        if msg.epilogue is not None:
            out += nl + _to_bytes(msg.epilogue)

    def _flatten_into(self, msg: Entity, out: bytearray) -> None:
        for _ in self._flatten(msg, out):
            pass


def _first(headers: Iterable[Header], name: str) -> Header | None:
    name = name.lower()
    return next((h for h in headers if h.name.lower() == name), None)


def _groups(dec: _Decoder, headers: list[Header]) -> tuple[AddressGroup, ...]:
    """RFC 5322 §3.4 groups (``name: a, b;``) of the address fields; getaddresses() flattens
    them, so fields that can hold one are read once more with the stdlib's structured parser."""
    found: list[AddressGroup] = []
    for h in headers:
        key = h.name.lower()
        if key not in _GROUP_FIELDS or ":" not in h.raw or ";" not in h.raw:
            continue
        try:
            parsed = _HEADER_FACTORY(key, h.raw)
            groups = getattr(parsed, "groups", ())
        except Exception:  # noqa: BLE001 - a group we cannot read is a warning, not a failure
            dec.warn(f"header {_safe_label(h.name)}: address group unreadable")
            continue
        for g in groups:
            if g.display_name is None:
                continue
            members = tuple(
                Address(name=clean_str(a.display_name or ""), address=clean_str(a.addr_spec))
                for a in g.addresses
                if a.addr_spec and a.addr_spec != "<>"
            )
            found.append(AddressGroup(field=key, name=clean_str(g.display_name), members=members))
    return tuple(found)


_GROUP_FIELDS = frozenset({"from", "sender", "reply-to", "to", "cc", "bcc"})
_HEADER_FACTORY = email.headerregistry.HeaderRegistry()

# RFC 5322 §3.2.3 atext; display-name words may also hold '.' (obs-phrase, §4.1), as the stdlib reads them.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]++"
_WORD = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]++"
_ADDR_SPEC = rf"{_ATEXT}(?:\.{_ATEXT})*+@{_ATEXT}(?:\.{_ATEXT})*+"
_PLAIN_MAILBOX = re.compile(rf"[ \t]*+(?:((?:{_WORD}[ \t]+)*{_WORD})?[ \t]*<({_ADDR_SPEC})>|({_ADDR_SPEC}))[ \t]*+")


def _plain_mailboxes(value: str) -> list[tuple[str, str]] | None:
    """``email.utils.getaddresses`` for the common case, about ten times cheaper; None otherwise.

    Only a list of plain mailboxes (RFC 5322 §3.4: ``name <local@domain>`` or ``local@domain``;
    atoms only, no quoted strings, comments, groups, routes or 8-bit text) is taken here; the
    result is the stdlib's for those (display-name words joined by one space).
    tests/unit/test_fastmime.py holds the two to the same answers on random address lists.
    """
    found: list[tuple[str, str]] = []
    for element in value.split(","):
        m = _PLAIN_MAILBOX.fullmatch(element)
        if m is None:
            return None
        phrase, routed, bare = m.groups()
        found.append(("", bare) if bare else (" ".join(phrase.split()) if phrase else "", routed))
    return found


def _select_body(dec: _Decoder, options: DecodeOptions) -> SelectedBody | None:
    sel = options.body_part
    if sel is None:
        return None
    wanted = sel.content_type.lower() if sel.content_type else None
    candidates = [leaf for leaf in dec.leaves if wanted is None or leaf[1] == wanted]
    if sel.index < len(candidates):
        path, ctype, charset, data = candidates[sel.index]
    elif sel.on_missing == "first_text":
        texts = [leaf for leaf in dec.leaves if leaf[1].startswith("text/")]
        if not texts:
            raise DecodeError("body_part: no part matches and the mail has no text part", reason="body_part_missing")
        path, ctype, charset, data = texts[0]
        dec.warn("body_part: no part matches; the first text part was taken")
    else:
        shown = f" of type {_safe_label(wanted)}" if wanted else ""
        raise DecodeError(
            f"body_part: the mail has {len(candidates)} leaf parts{shown}; index {sel.index} does not exist",
            reason="body_part_missing",
        )
    if isinstance(data, LargeContent):
        if data.size > MAX_HELD_BODY:
            dec.warn("body_part: the selected part is too large to be held; see its attachment entry")
            return SelectedBody(path=path, content_type=ctype, text=None, data=None)
        data = b"".join(data.pieces())  # chosen as the body: held like a text body would be
    if ctype.startswith("text/"):
        return SelectedBody(
            path=path, content_type=ctype, text=clean_str(dec.decode_bytes(data, charset, "body_part")), data=None
        )
    return SelectedBody(path=path, content_type=ctype, text=None, data=data)


def _empty(warnings: tuple[str, ...], **kw: object) -> DecodedMail:
    return DecodedMail(
        message_id=None, subject=None, date_raw=None, date_millis=None, from_=(), to=(), cc=(),
        headers=(), text_body=None, html_body=None, attachments=(), warnings=warnings, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


# RFC 5322 §4.1/§4.5: obsolete syntax allows WSP between a field name and its colon
# ("Subject : x"), and §4 says parsers MUST accept it; compat32 takes such a line for the first
# body line and loses every field after it. Possessive quantifiers keep the search linear.
_OBS_COLON = re.compile(rb"(?m)^([!-9;-~]++)[ \t]++:")
_HEADER_LINE = re.compile(rb"[!-9;-~]++:|[ \t]|From ")
_HEADER_END = re.compile(rb"\n\r?\n")
_NOT_BLANK = re.compile(rb"\S")


def _repair_obs_colons(raw: fastmime.Buffer, spool_directory: str | None = None) -> fastmime.Buffer:
    """``raw`` with ``Name<WSP>:`` turned into ``Name:`` in the top-level header block.

    Only lines up to where the parser ends the header block anyway (a blank line, or a line
    that is neither a field, a continuation nor an obsolete field) are looked at: nothing that
    the parser would treat as body is ever changed. Part headers are left as they are.

    A spool mapping is not copied into memory: the repaired header block and the rest are
    written to an anonymous file in ``spool_directory`` and that file is mapped instead (the
    mapping keeps it alive; it vanishes with the mapping).
    """
    m = _HEADER_END.search(raw)
    end = m.end() if m else len(raw)
    if not _OBS_COLON.search(raw, 0, end):
        return raw
    lines = bytes(raw[:end]).splitlines(keepends=True)
    out: list[bytes] = []
    for i, line in enumerate(lines):
        if (obs := _OBS_COLON.match(line)) is not None:
            out.append(obs[1] + b":" + line[obs.end() :])
        elif line.strip(b"\r\n") and _HEADER_LINE.match(line):
            out.append(line)
        else:
            out.extend(lines[i:])
            break
    head = b"".join(out)
    if not isinstance(raw, fastmime.SpoolMap):
        return head + raw[end:]
    with tempfile.TemporaryFile(prefix="pop3k-spool-", dir=spool_directory) as f:
        f.write(head)
        for a in range(end, len(raw), 1 << 20):
            f.write(raw[a : a + (1 << 20)])
            raw.release(a + (1 << 20))
        f.flush()
        return fastmime.SpoolMap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _decode(raw: fastmime.Buffer, options: DecodeOptions) -> DecodedMail:
    dec = _Decoder(options)
    if not options.mime_decoding:
        return _empty((), mime_decoded=False, raw=raw)
    if _NOT_BLANK.search(raw) is None:
        dec.warn("empty input: not a mail")
        return _empty(dec.warnings)
    if b"\r\n" not in raw[:65536]:
        dec.linesep = "\n"
    repaired = _repair_obs_colons(raw, options.spool_directory)
    if isinstance(_PARSER, fastmime.FastParser):
        msg: Entity = _PARSER.parse(repaired, lazy_above=options.stream_above)
    else:
        msg = _PARSER.parsebytes(bytes(repaired))
    dec.survey(msg)
    headers = dec.headers(msg)
    if not headers:
        dec.warn("message: no header fields")

    by_name: dict[str, list[Header]] = {}  # one pass over the fields instead of one per lookup
    for h in headers:
        by_name.setdefault(h.name.lower(), []).append(h)

    def raw_values(name: str) -> list[str]:
        return [h.raw for h in by_name.get(name, ())]

    def first(name: str) -> Header | None:
        found = by_name.get(name)
        return found[0] if found else None

    subject = first("subject")
    message_id = first("message-id")
    in_reply_to = first("in-reply-to")
    references = " ".join(raw_values("references"))
    date = first("date")
    date_raw = date.raw.strip() if date is not None else None
    passthrough = False
    dec.layer_buffers[()] = repaired  # the buffer the splitter parsed: part offsets point into it
    try:
        dec.walk(msg, (), True)
    except _PassthroughSignal:
        passthrough = True
    dec.layer_buffers.clear()
    if options.require_valid_signature:
        _require_valid_signature(dec)
    sender = dec.addresses(raw_values("sender"), "header 'Sender'")
    smime = None
    if dec.smime or passthrough:
        smime = SmimeFacts(
            encrypted=bool(dec.smime.get("encrypted")),
            decrypted=bool(dec.smime.get("decrypted")),
            key=dec.smime.get("key"),  # type: ignore[arg-type]
            cipher=dec.smime.get("cipher"),  # type: ignore[arg-type]
            signed=bool(dec.smime.get("signed")),
            signature_type=dec.smime.get("signature_type"),  # type: ignore[arg-type]
            passthrough=passthrough,
            signatures=tuple(dec.signatures),
        )
    common = {
        "message_id": message_id.raw.strip() if message_id is not None else None,
        "subject": subject.value if subject is not None else None,
        "date_raw": date_raw,
        "date_millis": dec.date_millis(date_raw) if date_raw is not None else None,
        "from_": dec.addresses(raw_values("from"), "header 'From'"),
        "to": dec.addresses(raw_values("to"), "header 'To'"),
        "cc": dec.addresses(raw_values("cc"), "header 'Cc'"),
        "headers": tuple(headers),
        "in_reply_to": in_reply_to.raw.strip() if in_reply_to is not None else None,
        "references": tuple(_MESSAGE_ID.findall(references)) or tuple(references.split()),
        "sender": sender[0] if sender else None,
        "reply_to": dec.addresses(raw_values("reply-to"), "header 'Reply-To'"),
        "bcc": dec.addresses(raw_values("bcc"), "header 'Bcc'"),
        "groups": _groups(dec, headers),
        "smime": smime,
    }
    if passthrough:
        # Still encrypted, published as is: the outer header fields were never secret; no part
        # of the content is looked at (RFC 8551 §3.3 content stays with the consumer).
        return DecodedMail(
            **common, text_body=None, html_body=None, attachments=(), warnings=dec.warnings,  # type: ignore[arg-type]
            mime_decoded=False, raw=raw,
        )  # fmt: skip
    body = _select_body(dec, options)
    return DecodedMail(
        **common,  # type: ignore[arg-type]
        text_body=dec.text_body,
        html_body=dec.html_body,
        attachments=tuple(dec.attachments),
        warnings=dec.warnings,
        parts=tuple(dec.parts),
        body=body,
    )


def _unreadable_signature(layer: str, problem: str, at: datetime | None) -> Any:
    from connector.decoding import signature  # noqa: PLC0415 - only for signed mail

    moment = at or signature._now()
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    return signature.SignatureCheck(layer, "detached", "invalid", "malformed", problem, (), moment)


def _require_valid_signature(dec: _Decoder) -> None:
    """smime.require_valid_signature: every signature layer valid, and at least one.

    The message names the layer and the reason only: a layer inside an encrypted one is
    decrypted content, and the dead letter (RFC 8551 §3.3 content stays encrypted there) must not
    reveal who signed it either.
    """
    if not dec.signatures:
        raise SignatureError(
            "the mailbox requires a valid S/MIME signature and the mail is not signed", reason="not_signed"
        )
    for check in dec.signatures:
        if check.verdict != "valid":
            raise SignatureError(
                f"{_part_name(tuple(int(i) for i in check.layer.split('.')) if check.layer else ())}: "
                f"S/MIME signature ({check.type}) is {check.verdict}: {check.reason}; the mailbox requires a valid one",
                reason="signature_invalid",
            )


def decode_mail(
    raw: bytes | fastmime.SpoolMap,
    *,
    max_depth: int | None = None,
    max_parts: int | None = None,
    options: DecodeOptions | None = None,
) -> DecodedMail:
    """Decode one raw RFC 5322 message (as retrieved by POP3 RETR, dot-unstuffed).

    * ``max_depth``: deepest allowed MIME nesting (the top-level message is depth 0; each
      multipart child or message/rfc822 body adds one). Deeper -> :class:`MailTooLargeError`.
    * ``max_parts``: most MIME entities (containers included) allowed in the whole tree,
      embedded messages included. More -> :class:`MailTooLargeError`.

    Bodies keep their line endings as received. The first inline text/plain and text/html
    parts become ``text_body``/``html_body``; every other leaf and every message/* part is an
    attachment, in tree order.

    Raises only :class:`DecodeError` / :class:`MailTooLargeError`, chained to the cause; their
    messages and the warnings never contain mail content.
    """
    options = options or DEFAULT_OPTIONS
    if max_depth is not None or max_parts is not None:
        limits = dataclasses.replace(
            options.limits,
            max_depth=options.limits.max_depth if max_depth is None else max_depth,
            max_parts=options.limits.max_parts if max_parts is None else max_parts,
        )
        options = dataclasses.replace(options, limits=limits)
    try:
        # A spool mapping is read in place (never copied); anything else becomes bytes.
        return _decode(raw if isinstance(raw, fastmime.SpoolMap) else bytes(raw), options)
    except DecodeError:
        raise
    except RecursionError:
        # The stdlib parser recurses once per nesting level; far past max_depth it overflows.
        raise MailTooLargeError("MIME nesting too deep for the parser", reason="max_depth") from None
    except Exception as exc:  # noqa: BLE001 - the contract: nothing but DecodeError leaves here
        # Not chained: the cause's message and frames may hold mail text (decrypted text, too),
        # and a traceback logged anywhere up the stack would print them. The type is enough.
        raise DecodeError(f"unexpected {type(exc).__name__} while decoding the mail", reason="unknown") from None
