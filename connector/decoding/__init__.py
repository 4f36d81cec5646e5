"""Decoding layer: raw RFC 5322 bytes -> :class:`DecodedMail` (pure, CPU-bound, no I/O)."""

from __future__ import annotations

from connector.decoding.mime import clean_str, decode_mail
from connector.decoding.model import Address, Attachment, DecodedMail, Header

__all__ = ["Address", "Attachment", "DecodedMail", "Header", "clean_str", "decode_mail"]
