"""What a mailbox asks of the decoder: limits against hostile mail, body selection, S/MIME.

Plain data; connector/config builds it from the mailbox's settings (docs/configuration.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Exceeding any of these makes the mail a dead letter naming the limit
    (:class:`~connector.errors.MailTooLargeError` with ``reason`` = the field name)."""

    #: deepest MIME nesting; the top-level entity is depth 0.
    max_depth: int = 32
    #: MIME entities in the whole tree, containers and embedded messages included.
    max_parts: int = 2000
    #: header fields of one entity.
    max_headers: int = 1000
    #: octets of one header field, unfolded.
    max_header_bytes: int = 64 * 1024
    #: sum of the transfer-decoded sizes of all parts.
    max_decoded_bytes: int = 512 * 1024 * 1024
    #: wall-clock seconds for one mail, checked between parts.
    max_decode_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class BodySelection:
    """BizTalk's "body part index" and "body part content type": the ``index``-th leaf part
    (0-based, document order), counting only parts of ``content_type`` when it is given."""

    index: int = 0
    content_type: str | None = None
    #: nothing matches: a dead letter (reason "body_part_missing"), or the first text part.
    on_missing: Literal["dead_letter", "first_text"] = "dead_letter"


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    body_part: BodySelection | None = None
    #: false: publish the raw mail with provenance only (BizTalk's "Apply MIME decoding" off).
    mime_decoding: bool = True
    #: "passthrough": encrypted mail is published still encrypted (raw), never decrypted here.
    smime: Literal["decrypt", "passthrough"] = "decrypt"
    #: connector.decoding.smime.KeyRing (typed loosely so this module stays import-light).
    keys: Any = None
    #: connector.decoding.signature.TrustStore: signature chains are validated against it.
    #: None: signatures are still checked for integrity, with the verdict "unchecked".
    trust: Any = None
    #: a mail that is not signed, or whose signature is not valid, is a dead letter.
    require_valid_signature: bool = False
    #: the moment signature chains are validated at; None = now (the fetch). Tests fix it.
    verify_at: datetime | None = None
    #: attachment parts whose encoded octets exceed this are not held in memory: they are
    #: transfer-decoded piece by piece from the mail's buffer (size and SHA-256 while decoding,
    #: the bytes again when placed). None: every part is held (small mail, tests).
    stream_above: int | None = None
    #: where a mapped mail whose header block needs repair is rewritten (an anonymous file):
    #: runtime.spool_directory; None = the system temp directory.
    spool_directory: str | None = None


DEFAULT_OPTIONS = DecodeOptions()
