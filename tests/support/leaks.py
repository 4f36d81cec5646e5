"""Searching test output for a secret marker in every form it could leak in."""

from __future__ import annotations

import base64


def leak_forms(marker: str) -> list[bytes]:
    """The marker as it could appear: plain, UTF-16, and base64 at every alignment
    (quoted-printable of an ASCII marker is the marker itself)."""
    m = marker.encode()
    forms = [m, marker.encode("utf-16-le"), marker.encode("utf-16-be")]
    for pad in (b"", b"x", b"xy"):
        enc = base64.b64encode(pad + m)
        forms.append(enc[4:-4] if pad else enc[:-4])
    return forms


def assert_no_leak(marker: str, *texts: bytes | str) -> None:
    """Fail if any form of ``marker`` is in any of ``texts``."""
    for text in texts:
        data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
        for form in leak_forms(marker):
            assert form not in data, f"decrypted marker leaked in form {form!r}"
