"""Seeded hostile-mail generators for the splitter's differential test (tests/unit/test_fastmime.py).

``random_mail`` writes MIME trees by hand with the irregularities real mail has and the parsers
must agree on: LF, CR and CRLF line ends (mixed within a mail), boundaries that are reused,
empty, 8-bit, quoted, RFC 2231-encoded or followed by blanks, repeated and missing delimiters,
multipart/digest, message/rfc822 and message/delivery-status parts, mbox "From " lines,
continuation lines without a field, fields without a name, bodies that look like header blocks.

``mutate`` damages any mail: byte flips, truncation, removed or duplicated (delimiter) lines,
line-end conversions, stray NUL/CR/LF bytes, a removed header/body separator, spliced chunks.

Everything is a pure function of the ``random.Random`` passed in, so a failing case is
reproduced from its seed.
"""

from __future__ import annotations

import random

EOLS = (b"\r\n", b"\n", b"\r")

_ODD_BOUNDARIES = (b"a:b", b"x y", b"=_Part_1", b'q"q', b"in\xc3\xa9", b"<ab>", b"b0 ", b"--", b"b0--", b"")
_LEAF_TYPES = (
    b"text/plain",
    b"text/html",
    b"application/octet-stream",
    b"message/delivery-status",
    b"text/plain; charset=utf-8",
    b"bogus",
    b"image/png",
    b"message/rfc822",
    b"text/x-uu",
)
_MULTIPART_TYPES = (
    b"multipart/mixed",
    b"multipart/alternative",
    b"multipart/digest",
    b"multipart/related",
    b"Multipart/Mixed",
    b"multipart/x",
)
_FIELDS = (
    b"Subject: hi",
    b"X-A: 1",
    b"From: a@b",
    b"Content-Transfer-Encoding: base64",
    b"Content-Transfer-Encoding: 7bit ",
    b"Content-Transfer-Encoding: x-uuencode",
    b"Content-Disposition: attachment; filename=a.txt",
    b"X-Folded: a\r\n\tb",
    b"X-8: \xff\xfe",
    b"From x@y Mon",  # mbox envelope line in the wrong place
    b": nameless",
    b" leading continuation",
    b"X-Empty:",
    b"Received: a\n b",
)


def _content_type(rng: random.Random, ctype: bytes, boundary: bytes) -> bytes:
    forms = (
        (40, b'Content-Type: %s; boundary="%s"'),
        (20, b"Content-Type: %s; boundary=%s"),
        (5, b'Content-Type: %s;\r\n boundary="%s"'),
        (5, b"Content-type: %s; BOUNDARY=%s; charset=x"),
        (2, b"Content-Type: %s; boundary*=utf-8''%s"),
        (2, b"Content-Type: %s; boundary*0=%s; boundary*1=x"),
        (3, b'Content-Type: %s; name="a;b"; boundary=%s'),
        (2, b'Content-Type: %s; boundary="<%s>"'),
        (3, b"Content-Type: %s; boundary=%s  "),
    )
    weights, templates = zip(*forms, strict=True)
    if rng.random() < 0.03:
        return b"Content-Type: " + ctype + rng.choice((b"", b"; boundary"))
    return rng.choices(templates, weights)[0] % (ctype, boundary)


def _header_block(rng: random.Random, eol: bytes, required: list[bytes]) -> bytes:
    fields = list(required)
    for _ in range(rng.randrange(4)):
        fields.insert(rng.randrange(len(fields) + 1), rng.choice(_FIELDS))
    return eol.join(fields)


def _body(rng: random.Random, eol: bytes) -> bytes:
    pieces = (
        b"hello",
        b"",
        b"--",
        b"line1" + eol + b"line2",
        b"begin 644 a.txt" + eol + b"#86)C" + eol + b"`" + eol + b"end",
        b"Key: value" + eol + eol + b"Key2: v2",
        b"\x00\x01",
        b"caf\xc3\xa9",
        b"From me",
        b"QUJD",
    )
    return eol.join(rng.choice(pieces) for _ in range(rng.randrange(4)))


def _entity(rng: random.Random, depth: int, eol: bytes, open_boundaries: list[bytes]) -> bytes:
    roll = rng.random()
    if depth < 4 and roll < 0.45:
        if rng.random() < 0.3:
            boundary = rng.choice((*_ODD_BOUNDARIES, b"b0", b"b1", b"b"))
        elif rng.random() < 0.8 or not open_boundaries:
            boundary = b"b%d" % depth
        else:
            boundary = rng.choice(open_boundaries)  # reuses an enclosing boundary
        ctype = _content_type(rng, rng.choice(_MULTIPART_TYPES), boundary)
        out = _header_block(rng, eol, [ctype]) + eol + rng.choice((eol, b"", eol + eol))
        if rng.random() < 0.3:
            out += b"preamble" + eol
        for _ in range(rng.randrange(4)):
            delimiter = b"--" + boundary + rng.choice((b"", b"", b" ", b"\t ", b"--", b"x"))
            out += delimiter + eol
            if rng.random() < 0.1:
                out += delimiter + eol
            child_eol = eol if rng.random() < 0.75 else rng.choice(EOLS)
            out += _entity(rng, depth + 1, child_eol, [*open_boundaries, boundary])
            out += rng.choice((eol, eol, b"", eol + eol))
        if rng.random() < 0.8:
            out += b"--" + boundary + b"--" + rng.choice((b"", b" ")) + rng.choice((eol, b""))
        if rng.random() < 0.3:
            out += b"epilogue" + eol
        if rng.random() < 0.2:
            out += eol
        return out
    if depth < 4 and roll < 0.55:
        inner = _entity(rng, depth + 1, eol, open_boundaries)
        return _header_block(rng, eol, [b"Content-Type: message/rfc822"]) + eol + eol + inner
    if roll < 0.6:
        blocks = (
            _header_block(rng, eol, [b"Reporting-MTA: dns; x"]),
            _header_block(rng, eol, [b"Action: failed", b"Status: 5.0.0"]),
        )
        head = _header_block(rng, eol, [b"Content-Type: message/delivery-status"])
        return head + eol + eol + (eol + eol).join(blocks) + rng.choice((b"", eol, eol + eol))
    required = [b"Content-Type: " + rng.choice(_LEAF_TYPES)] if rng.random() < 0.8 else []
    separator = rng.choice((eol + eol, eol, eol + eol + eol, b""))
    return _header_block(rng, eol, required) + separator + _body(rng, eol)


def random_mail(rng: random.Random) -> bytes:
    eol = rng.choice((b"\r\n", b"\r\n", b"\n", b"\r"))
    mail = _entity(rng, 0, eol, [])
    if rng.random() < 0.1:
        mail = b"From sender Mon Jan 1" + eol + mail
    return mail


def deep_mail(rng: random.Random) -> bytes:
    """Nesting around and beyond the default depth limit (32): multiparts and message/rfc822."""
    depth = rng.choice((30, 31, 32, 33, 40, 64, 150))
    out, tail = b"", b""
    for level in range(depth):
        if rng.random() < 0.7:
            boundary = b"d%d" % (level if rng.random() < 0.9 else 0)
            out += b"Content-Type: multipart/mixed; boundary=" + boundary + b"\r\n\r\n--" + boundary + b"\r\n"
            tail = b"\r\n--" + boundary + b"--" + tail
        else:
            out += b"Content-Type: message/rfc822\r\n\r\n"
    return out + b"Content-Type: text/plain\r\n\r\ndeep" + tail + b"\r\n"


def _lines(data: bytearray) -> list[bytes]:
    return bytes(data).splitlines(keepends=True)


def mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randrange(1, 4)):
        if not data:
            break
        op = rng.randrange(12)
        if op == 0:  # flip a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:  # truncate
            del data[rng.randrange(len(data)) :]
        elif op == 2:  # remove a line
            lines = _lines(data)
            del lines[rng.randrange(len(lines))]
            data = bytearray(b"".join(lines))
        elif op == 3:  # duplicate a line
            lines = _lines(data)
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            data = bytearray(b"".join(lines))
        elif op == 4:
            data = bytearray(bytes(data).replace(b"\r\n", b"\n"))
        elif op == 5:
            data = bytearray(bytes(data).replace(b"\r\n", b"\r"))
        elif op == 6:
            data = bytearray(bytes(data).replace(b"\n", b"\r\n"))
        elif op == 7:  # a stray byte
            data.insert(rng.randrange(len(data) + 1), rng.choice(b"\x00\r\n- :\t"))
        elif op == 8:  # remove delimiter lines
            data = bytearray(b"".join(ln for ln in _lines(data) if not (ln.startswith(b"--") and rng.random() < 0.5)))
        elif op == 9:  # duplicate delimiter lines
            out: list[bytes] = []
            for ln in _lines(data):
                out.append(ln)
                if ln.startswith(b"--") and rng.random() < 0.4:
                    out.append(ln)
            data = bytearray(b"".join(out))
        elif op == 10:  # remove the first header/body separator
            text = bytes(data)
            for sep in (b"\r\n\r\n", b"\n\n"):
                i = text.find(sep)
                if i >= 0:
                    data = bytearray(text[:i] + text[i + len(sep) // 2 :])
                    break
        else:  # copy a chunk elsewhere
            i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
            chunk = data[i:j][:200]
            k = rng.randrange(len(data) + 1)
            data[k:k] = chunk
    return bytes(data)
