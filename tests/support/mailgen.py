"""Test mail generator: raw RFC 5322 bytes plus the facts a correct decoder must recover.

The expected values are written down here, from the generator's inputs, never taken from the
decoder's output. MIME is written by hand (not with email.generator) so the decoder under test
and the fixture share no code.
"""

from __future__ import annotations

import base64
import hashlib
import quopri
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

SHAPES = (
    "plain",
    "alternative",
    "attachments",
    "subject_utf8",
    "subject_latin1",
    "filename_2231",
    "qp_body",
    "addresses",
)


@dataclass
class ExpectedAttachment:
    filename: str | None
    content_type: str
    size: int
    sha256: str


@dataclass
class ExpectedMail:
    shape: str
    message_id: str
    subject: str
    date_millis: int
    from_: list[tuple[str, str]]
    to: list[tuple[str, str]]
    cc: list[tuple[str, str]] = field(default_factory=list)
    text_body: str | None = None
    html_body: str | None = None
    attachments: list[ExpectedAttachment] = field(default_factory=list)


def _b64_lines(data: bytes) -> str:
    enc = base64.b64encode(data).decode()
    return "\r\n".join(enc[i : i + 76] for i in range(0, len(enc), 76))


def _ew_b(text: str, charset: str = "utf-8") -> str:
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode()}?="


def _ew_q(text: str, charset: str = "iso-8859-1") -> str:
    out = []
    for byte in text.encode(charset):
        ch = chr(byte)
        if ch == " ":
            out.append("_")
        elif ch.isalnum() and byte < 128:
            out.append(ch)
        else:
            out.append(f"={byte:02X}")
    return f"=?{charset}?Q?{''.join(out)}?="


def make_mail(i: int, shape: str | None = None, seed: int = 0) -> tuple[bytes, ExpectedMail]:
    """Mail number ``i``; the shape cycles through SHAPES unless given."""
    rnd = random.Random(seed * 100_003 + i)
    shape = shape or SHAPES[i % len(SHAPES)]
    mid = f"<gen-{seed}-{i}-{shape}@test.pop3kafka>"
    when = datetime(2026, 1, 1, 9, 0, tzinfo=UTC) + timedelta(minutes=i)
    sender = ("Sender Nr. " + str(i), f"sender{i}@example.com")
    rcpt = [("", f"orders{i % 3}@example.org")]
    subject = f"Order {i} ({shape})"
    subject_header = subject
    text = f"Hello,\nthis is mail {i} of shape {shape}.\nToken: {rnd.getrandbits(64):016x}\n"
    html: str | None = None
    atts: list[ExpectedAttachment] = []
    cc: list[tuple[str, str]] = []
    extra_headers: list[str] = []
    body: str

    def text_part(t: str) -> str:
        return (
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + _b64_lines(t.encode("utf-8"))
            + "\r\n"
        )

    if shape == "subject_utf8":
        subject = f"Grüße aus Köln – Bestellung #{i} ✓"
        subject_header = _ew_b(subject)
    elif shape == "subject_latin1":
        subject = f"Café crème pour commande {i}"
        subject_header = _ew_q(subject)
    elif shape == "addresses":
        sender = ("Jürgen Müller", f"jm{i}@example.de")
        rcpt = [("Orders Desk", "orders@example.org"), ("", "audit@example.org")]
        cc = [("Ana Lucía", "ana@example.es")]
        extra_headers.append(f"Cc: {_ew_b(cc[0][0])} <{cc[0][1]}>")

    if shape == "alternative":
        html = f"<html><body><p>Hello,</p><p>mail <b>{i}</b></p></body></html>\n"
        b = f"alt-{i}-{rnd.getrandbits(32):08x}"
        body = (
            f'Content-Type: multipart/alternative; boundary="{b}"\r\n\r\n'
            f"--{b}\r\n{text_part(text)}--{b}\r\n"
            "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
            f"{html.replace(chr(10), chr(13) + chr(10))}--{b}--\r\n"
        )
    elif shape in ("attachments", "filename_2231"):
        b = f"mix-{i}-{rnd.getrandbits(32):08x}"
        parts = [text_part(text)]
        blobs: list[tuple[str, str, bytes, str]] = []
        if shape == "attachments":
            pdf = b"%PDF-1.4\n" + rnd.randbytes(rnd.randint(2000, 9000))
            png = b"\x89PNG\r\n\x1a\n" + rnd.randbytes(rnd.randint(500, 3000))
            blobs.append(
                (
                    f"invoice-{i}.pdf",
                    "application/pdf",
                    pdf,
                    f'Content-Disposition: attachment; filename="invoice-{i}.pdf"',
                )
            )
            blobs.append(
                (f"logo-{i}.png", "image/png", png, f'Content-Disposition: attachment; filename="logo-{i}.png"')
            )
        else:
            name = f"résumé-{i}.pdf"
            data = b"%PDF-1.7\n" + rnd.randbytes(4000)
            enc = "".join(
                c if c.isascii() and (c.isalnum() or c in ".-") else "".join(f"%{x:02X}" for x in c.encode())
                for c in name
            )
            blobs.append((name, "application/pdf", data, f"Content-Disposition: attachment; filename*=UTF-8''{enc}"))
        for fname, ctype, data, disp in blobs:
            parts.append(
                f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: base64\r\n{disp}\r\n\r\n"
                + _b64_lines(data)
                + "\r\n"
            )
            atts.append(ExpectedAttachment(fname, ctype, len(data), hashlib.sha256(data).hexdigest()))
        body = (
            f'Content-Type: multipart/mixed; boundary="{b}"\r\n\r\n'
            + "".join(f"--{b}\r\n{p}" for p in parts)
            + f"--{b}--\r\n"
        )
    elif shape == "qp_body":
        text = f"Prix: 12,50 € — quantité {i}\nLigne très longue " + "x" * 90 + "\nfin\n"
        qp = quopri.encodestring(text.replace("\n", "\r\n").encode("utf-8")).decode()
        body = (
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
            + qp.replace("\r\n", "\n").replace("\n", "\r\n")
        )
    else:
        body = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + text.replace(
            "\n", "\r\n"
        )

    from_name = _ew_b(sender[0]) if not sender[0].isascii() else f'"{sender[0]}"'
    to_hdr = ", ".join(f'"{n}" <{a}>' if n else a for n, a in rcpt)
    head = [
        f"From: {from_name} <{sender[1]}>",
        f"To: {to_hdr}",
        *extra_headers,
        f"Subject: {subject_header}",
        f"Date: {format_datetime(when)}",
        f"Message-ID: {mid}",
        "MIME-Version: 1.0",
    ]
    raw = ("\r\n".join(head) + "\r\n" + body).encode("utf-8")
    exp = ExpectedMail(
        shape=shape,
        message_id=mid,
        subject=subject,
        date_millis=int(when.timestamp() * 1000),
        from_=[sender],
        to=rcpt,
        cc=cc,
        text_body=text,
        html_body=html,
        attachments=atts,
    )
    return raw, exp


def norm_text(value: str | None) -> str | None:
    """Compare bodies independent of CRLF/LF and of the final line break."""
    if value is None:
        return None
    return value.replace("\r\n", "\n").rstrip("\n")
