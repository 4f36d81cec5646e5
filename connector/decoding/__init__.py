"""Decoding layer: raw RFC 5322 bytes -> :class:`DecodedMail` (pure, CPU-bound, no I/O).

The names below are loaded on first use (PEP 562), not when the package is: the configuration
imports ``connector.decoding.options`` and the records ``connector.decoding.model``, and a
raw-passthrough poll-once never decodes, so it need not import the decoder (~20 ms of its start,
before its first POP3 session opens; docs/decisions/0001, "Fourth round")."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connector.decoding.mime import clean_str, decode_mail
    from connector.decoding.model import Address, Attachment, DecodedMail, Header

__all__ = ["Address", "Attachment", "DecodedMail", "Header", "clean_str", "decode_mail"]

_WHERE = {
    "clean_str": "connector.decoding.mime",
    "decode_mail": "connector.decoding.mime",
    "Address": "connector.decoding.model",
    "Attachment": "connector.decoding.model",
    "DecodedMail": "connector.decoding.model",
    "Header": "connector.decoding.model",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # once: later lookups find it without this function
    return value
