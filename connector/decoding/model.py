"""The decoded mail: what the decoding layer hands to the records layer.

Plain data, no I/O, no Kafka. Every string is valid Unicode (no lone surrogates), so the
records layer can serialise it without further checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox address; ``name`` is the decoded display name ('' when absent)."""

    name: str
    address: str


@dataclass(frozen=True, slots=True)
class Header:
    """One header field as it appeared, in order: raw value (unfolded, undecoded) and decoded value."""

    name: str
    raw: str
    value: str


@dataclass(frozen=True, slots=True)
class Attachment:
    """A non-body leaf part (or a nested message/rfc822) and its facts.

    ``content`` holds the decoded bytes while the mail is processed; the record carries
    size and sha256 only (placement of the bytes is a later issue).
    """

    filename: str | None
    content_type: str
    disposition: str | None
    content_id: str | None
    size: int
    sha256: str
    content: bytes = field(repr=False, default=b"")


@dataclass(frozen=True, slots=True)
class DecodedMail:
    """Everything the first record version needs from one raw RFC 5322 message."""

    message_id: str | None
    subject: str | None
    date_raw: str | None
    #: milliseconds since the epoch, UTC; None when absent or unparseable.
    date_millis: int | None
    from_: tuple[Address, ...]
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    headers: tuple[Header, ...]
    text_body: str | None
    html_body: str | None
    attachments: tuple[Attachment, ...]
    #: what was repaired or guessed (bad charset, missing boundary...), never mail content.
    warnings: tuple[str, ...] = ()
