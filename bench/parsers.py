"""Throughput of the candidate mail parsers on a realistic mix, measured in one process.

Builds about 500 mails of about 20 KB each (multipart/mixed holding a multipart/alternative
text + HTML pair in quoted-printable and a small base64 attachment, RFC 2047 subjects and
display names, a realistic Received/DKIM header block) and times, per repetition, one pass
over all of them with:

* stdlib ``BytesParser(policy=email.policy.default)`` plus a full walk (header objects,
  ``get_content()`` of every leaf): what "just use the modern stdlib API" costs;
* stdlib ``BytesParser(policy=compat32)`` parse only, and ``connector.decoding.fastmime``
  parse only: the MIME splitter under ``decode_mail`` before and after it was replaced;
* ``connector.decoding.decode_mail`` (fastmime splitter, the default), and the same with the
  compat32 splitter, so before and after are measured in the same run;
* ``decode_mail`` + ``build_mail_record`` + Avro single-object encoding with a fixed
  Provenance: the full record, what the pipeline does per mail before producing;
* ``fast_mail_parser.parse_email`` and ``parse_email_tree`` (when importable).

The passes are interleaved (one pass of every candidate, then the next round), so load from
other work on the machine hits all rows alike. Reports the median of 5 rounds as mails/s and
MB/s, and the ratio of decode_mail's throughput to each. Prints a markdown table and writes it
to bench/results/parsers.md.

Run: .venv/bin/python bench/parsers.py [--mails 500] [--repeat 5]
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connector.decoding import decode_mail, mime  # noqa: E402
from connector.decoding.fastmime import PARSER as FASTMIME  # noqa: E402
from connector.records import Provenance, build_mail_record, encode_single_object, mail_schema  # noqa: E402

VOCABULARY = """
the of and to in is that for it as was with be by on not he this are or his from at which
but have an they you were her she there been one all we their has would when if so no
invoice meeting report quarter budget schedule delivery Grüße Straße café naïve Überweisung
façade résumé Zürich Ørsted smörgåsbord €100 日本語 ñandú
"""
WORDS = VOCABULARY.split()
SUBJECTS = [
    "Quarterly report Q{n}",
    "Re: Überweisung Nr. {n}",
    "Fwd: café meeting {n}",
    "Rechnung {n} – Grüße",
]
NAMES = ["Jörg Müller", "Anna Schmidt", "Zoë Brontë", "Bob Smith", "François Dupont"]


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def paragraph_text(rng: random.Random, size: int) -> str:
    lines: list[str] = []
    total = 0
    while total < size:
        line = sentence(rng, rng.randint(6, 14))
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines) + "\n"


def build_mail(rng: random.Random, n: int) -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    when = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(minutes=17 * n)
    for hop in range(4):
        msg["Received"] = (
            f"from mx{hop}.example.net (mx{hop}.example.net [192.0.2.{hop + 10}]) by mx{hop + 1}.example.org "
            f"with ESMTPS id {rng.getrandbits(48):x}; {format_datetime(when)}"
        )
    msg["DKIM-Signature"] = (
        "v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.net; s=sel1; h=from:to:subject:date; "
        f"bh={base64.b64encode(rng.randbytes(32)).decode()}; "
        f"b={base64.b64encode(rng.randbytes(128)).decode()}"
    )
    msg["Message-ID"] = f"<{n}.{rng.getrandbits(40):x}@example.net>"
    msg["From"] = f"{rng.choice(NAMES)} <sender{n % 17}@example.net>"
    msg["To"] = ", ".join(f"{rng.choice(NAMES)} <rcpt{i}@example.org>" for i in range(rng.randint(1, 4)))
    msg["Cc"] = f"{rng.choice(NAMES)} <cc@example.org>"
    msg["Subject"] = rng.choice(SUBJECTS).format(n=n)  # non-ASCII -> RFC 2047 encoded words
    msg["Date"] = format_datetime(when)
    text = paragraph_text(rng, 5500)
    html = "<html><body>" + "".join(f"<p>{line}</p>\n" for line in text.splitlines()) + "</body></html>\n"
    html += "<!-- " + "x" * max(0, 9000 - len(html)) + " -->\n"
    msg.set_content(text, cte="quoted-printable")
    msg.add_alternative(html, subtype="html", cte="quoted-printable")
    msg.add_attachment(
        rng.randbytes(rng.randint(2000, 4000)),
        maintype="application",
        subtype="pdf",
        filename=f"Rechnung-{n}-Übersicht.pdf",
    )
    return msg.as_bytes()


def stdlib_default_walk(raw: bytes) -> object:
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(raw)
    facts: list[object] = [msg["subject"], msg["message-id"], msg["date"].datetime]
    for name in ("from", "to", "cc"):
        header = msg[name]
        facts.append(header.addresses if header is not None else ())
    for part in msg.walk():
        if not part.is_multipart():
            facts.append(part.get_content())
            facts.append(part.get_filename())
    return facts


_COMPAT32 = email.parser.BytesParser(policy=email.policy.compat32)


def compat32_parse(raw: bytes) -> object:
    return _COMPAT32.parsebytes(raw)


def fastmime_parse(raw: bytes) -> object:
    return FASTMIME.parsebytes(raw)


def decode_mail_compat32(raw: bytes) -> object:
    """decode_mail as it was before fastmime: the stdlib's compat32 parser builds the tree."""
    saved = mime._PARSER
    mime._PARSER = mime.SPLITTERS["compat32"]
    try:
        return decode_mail(raw)
    finally:
        mime._PARSER = saved


_PROVENANCE = Provenance("bench", "uidl-1", "pop.example.net:995", 1_767_225_600_000, 24_000, "0" * 64)
_SCHEMA = mail_schema()


def full_record(raw: bytes) -> object:
    return encode_single_object(_SCHEMA, build_mail_record(decode_mail(raw), _PROVENANCE))


def measure(
    candidates: list[tuple[str, Callable[[bytes], object]]], mails: list[bytes], repeat: int
) -> dict[str, float]:
    """Median seconds for one pass over ``mails``, per candidate; passes interleaved."""
    for _, fn in candidates:
        for raw in mails[:20]:  # warm-up (imports, caches)
            fn(raw)
    times: dict[str, list[float]] = {name: [] for name, _ in candidates}
    for _ in range(repeat):
        for name, fn in candidates:
            start = time.perf_counter()
            for raw in mails:
                fn(raw)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


DEFAULT_WALK = "stdlib BytesParser(policy.default) + full walk"
OURS = "connector.decoding.decode_mail"
OURS_COMPAT32 = "decode_mail with compat32 splitter"
FULL_RECORD = "decode_mail + record + Avro (full record)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mails", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "parsers.md")
    args = ap.parse_args()

    rng = random.Random(20250303)
    mails = [build_mail(rng, n) for n in range(args.mails)]
    total_bytes = sum(map(len, mails))

    # Sanity: our decoder must really find what the mix contains, or the timing means nothing.
    sample = decode_mail(mails[0])
    assert sample.text_body and sample.html_body and len(sample.attachments) == 1, sample
    assert not sample.warnings, sample.warnings

    assert decode_mail_compat32(mails[0]) == sample  # both splitters, same result

    candidates: list[tuple[str, Callable[[bytes], object]]] = [
        (DEFAULT_WALK, stdlib_default_walk),
        ("stdlib BytesParser(compat32), parse only", compat32_parse),
        ("connector.decoding.fastmime, parse only", fastmime_parse),
        (OURS, decode_mail),
        (OURS_COMPAT32, decode_mail_compat32),
        (FULL_RECORD, full_record),
    ]
    try:
        import fast_mail_parser

        fmp_version = getattr(fast_mail_parser, "__version__", None)
        if fmp_version is None:
            from importlib.metadata import version

            fmp_version = version("fast-mail-parser")
        candidates.append((f"fast_mail_parser.parse_email ({fmp_version})", fast_mail_parser.parse_email))
        candidates.append((f"fast_mail_parser.parse_email_tree ({fmp_version})", fast_mail_parser.parse_email_tree))
    except ImportError:
        print("fast_mail_parser not importable: skipped", file=sys.stderr)

    results = measure(candidates, mails, args.repeat)
    for name, seconds in results.items():
        print(f"  {name}: {args.mails / seconds:.0f} mails/s", file=sys.stderr)

    ours = results[OURS]
    lines = [
        "# Parser throughput",
        "",
        f"{args.mails} mails, mean {total_bytes / len(mails) / 1024:.1f} KiB "
        "(multipart/mixed: text + HTML alternative in quoted-printable, 2-4 KB base64 attachment, "
        "RFC 2047 subject and names, 4 Received + DKIM-Signature). "
        f"Median of {args.repeat} interleaved passes, one thread, same process.",
        "",
        f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}, load average at the end "
        f"{os.getloadavg()[0]:.2f} (other work on the machine skews all rows alike). "
        "Generated by `bench/parsers.py`.",
        "",
        "| parser | mails/s | MB/s | ms/mail | decode_mail speed relative to this |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, seconds in results.items():
        rate = args.mails / seconds
        lines.append(
            f"| {name} | {rate:,.0f} | {total_bytes / seconds / 1e6:.1f} | {seconds / args.mails * 1000:.3f} "
            f"| {seconds / ours:.2f}x |"
        )
    lines += [
        "",
        "Last column: decode_mail's throughput divided by this parser's (2.00x: decode_mail is twice "
        "as fast; 0.25x: decode_mail reaches a quarter of this parser's throughput).",
        "",
        f"Full record (decode + record + Avro) vs the stdlib's policy.default walk: "
        f"**{results[DEFAULT_WALK] / results[FULL_RECORD]:.2f}x**; decode_mail with the fastmime splitter "
        f"vs with the compat32 splitter: **{results[OURS_COMPAT32] / ours:.2f}x**.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
