"""Mail that today's decoder refuses, for the dead-letter tests.

connector/decoding/mime.py decode_mail refuses MIME nesting deeper than max_depth (32) with
MailTooLargeError(stage "limits", reason "max_depth"): a hostile-mail limit, so the mail is
dead-letter material whatever else the decoder learns later.
"""

from __future__ import annotations


def nested_mail(n: int, *, depth: int = 40, marker: str = "BODY-MARKER-DO-NOT-LOG") -> bytes:
    """A mail with ``depth`` nested multipart/mixed levels around one text part holding
    ``marker`` (tests check that the marker never reaches a log line). CRLF line ends."""
    inner = f"Content-Type: text/plain; charset=us-ascii\r\n\r\n{marker} {n}\r\n"
    for level in range(depth):
        b = f"nest-{n}-{level}"
        inner = f'Content-Type: multipart/mixed; boundary="{b}"\r\n\r\n--{b}\r\n{inner}\r\n--{b}--\r\n'
    head = (
        "From: Sender <sender@example.com>\r\n"
        "To: rcpt@example.com\r\n"
        f"Subject: nested {n}\r\n"
        f"Message-ID: <nested-{n}@test>\r\n"
        "Date: Thu, 01 Jan 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
    )
    return (head + inner).encode("ascii")
