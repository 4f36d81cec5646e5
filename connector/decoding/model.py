"""The decoded mail: what the decoding layer hands to the records layer.

Plain data, no I/O, no Kafka. Every string is valid Unicode (no lone surrogates), so the
records layer can serialise it without further checks.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the verifier pulls in pyhanko-certvalidator; only S/MIME mail needs it
    from connector.decoding.signature import SignatureCheck


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
class AddressGroup:
    """An RFC 5322 §3.4 group (``name: member, member;``) in one address field."""

    field: str
    name: str
    members: tuple[Address, ...]


@dataclass(frozen=True, slots=True)
class MessageSummary:
    """The main headers of an embedded message/rfc822, decoded."""

    message_id: str | None
    subject: str | None
    from_: tuple[Address, ...]
    to: tuple[Address, ...]
    date_raw: str | None
    date_millis: int | None


class LargeContent:
    """The decoded bytes of a part too large to be held: its encoded octets stay in the mail's
    buffer (the spool mapping of a large mail) and are transfer-decoded again, piece by piece,
    whenever they are read (connector/decoding/stream.py); for an embedded message, its parts
    are flattened again. Size and SHA-256 were computed by the first such pass, during
    decoding."""

    __slots__ = ("_source", "sha256", "size")

    def __init__(self, source: Callable[[int], Iterator[bytes]], size: int, sha256: str) -> None:
        self._source = source
        self.size = size
        self.sha256 = sha256

    @classmethod
    def of(cls, source: Callable[[int], Iterator[bytes]], size: int, sha256: str) -> LargeContent:
        return cls(source, size, sha256)

    @classmethod
    def span(cls, buffer: Any, start: int, stop: int, cte: str, size: int, sha256: str) -> LargeContent:  # noqa: PLR0917
        """``buffer[start:stop]`` with Content-Transfer-Encoding ``cte``."""

        def source(read_bytes: int) -> Iterator[bytes]:
            from connector.decoding.stream import DecodedStream  # noqa: PLC0415 - keeps this module plain data

            release = getattr(buffer, "release", None)
            return iter(DecodedStream(buffer, start, stop, cte, read_bytes=read_bytes, release=release))

        return cls(source, size, sha256)

    def __repr__(self) -> str:  # no content
        return f"<LargeContent {self.size} bytes>"

    def pieces(self, read_bytes: int = 1 << 20) -> Iterator[bytes]:
        """The decoded bytes again, in pieces of about ``read_bytes``."""
        yield from self._source(read_bytes)


@dataclass(frozen=True, slots=True)
class Attachment:
    """A non-body leaf part (or a nested message/rfc822) and its facts.

    ``content`` holds the decoded bytes while the mail is processed, unless the part was too
    large to be held (decode option ``stream_above``): then ``large`` re-reads them on demand
    and ``content`` is empty. Where the bytes go (inline, chunks, offload) is the records
    layer's business (connector/records/placement.py).
    """

    filename: str | None
    content_type: str
    disposition: str | None
    content_id: str | None
    size: int
    sha256: str
    content: bytes = field(repr=False, default=b"")
    #: path in the part tree ("1.2"); for content found inside a text part, that part's path.
    part: str | None = None
    #: "tnef", "uuencoded", "message", "delivery-status", "calendar", or None.
    kind: str | None = None
    message: MessageSummary | None = None
    large: LargeContent | None = field(repr=False, default=None, compare=False)

    def pieces(self, read_bytes: int = 1 << 20) -> Iterator[bytes]:
        """The decoded bytes, in pieces (all at once when they are held)."""
        if self.large is not None:
            yield from self.large.pieces(read_bytes)
        elif self.content:
            yield self.content


@dataclass(frozen=True, slots=True)
class Part:
    """One MIME entity of the tree, in document order (containers included)."""

    path: str
    depth: int
    content_type: str
    params: tuple[tuple[str, str], ...]
    disposition: str | None
    filename: str | None
    content_id: str | None
    transfer_encoding: str | None
    size: int
    sha256: str | None
    role: str
    kind: str | None = None


@dataclass(frozen=True, slots=True)
class SmimeFacts:
    """What the S/MIME layers of the mail were and what we did with them."""

    encrypted: bool = False
    decrypted: bool = False
    key: str | None = None
    cipher: str | None = None
    signed: bool = False
    signature_type: str | None = None
    passthrough: bool = False
    #: one connector.decoding.signature.SignatureCheck per signature layer, outermost first.
    signatures: tuple[SignatureCheck, ...] = ()


@dataclass(frozen=True, slots=True)
class SelectedBody:
    """The part picked by the mailbox's body_part option."""

    path: str
    content_type: str
    text: str | None
    data: bytes | None


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
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    sender: Address | None = None
    reply_to: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    groups: tuple[AddressGroup, ...] = ()
    parts: tuple[Part, ...] = ()
    smime: SmimeFacts | None = None
    body: SelectedBody | None = None
    #: False: not MIME-decoded (mime_decoding off, S/MIME passthrough); ``raw`` is the mail.
    mime_decoded: bool = True
    #: (a spool mapping, ``mmap``, for mail too large to be held: read it in place).
    raw: bytes | mmap.mmap | None = field(repr=False, default=None)
