"""Layered POP3 client (RFC 1939, RFC 2449 CAPA/response codes, RFC 2595 STLS).

* :mod:`.core`      - sans-IO: command encoding, status lines, multi-line bodies, listings;
* :mod:`.transport` - blocking sockets: TCP, implicit TLS, STLS upgrade, bulk reads;
* :mod:`.spool`     - where a retrieved mail goes: memory, or a spool file when large;
* :mod:`.session`   - :class:`Pop3Session`, the API the runtime uses.
"""

from __future__ import annotations

from connector.protocol.core import (
    MAX_STATUS_LINE,
    MAX_UIDL_LENGTH,
    LineBuffer,
    MultilineReader,
    ServerPolicy,
    StatusLine,
    dot_stuff,
    encode_command,
    find_duplicate_uidls,
    parse_capa,
    parse_list,
    parse_server_policy,
    parse_stat,
    parse_status,
    parse_uidl,
    unstuff_response,
    validate_uidl,
)
from connector.protocol.session import PLAINTEXT_REFUSED, Pop3Session, SessionState, TlsMode, Transcript
from connector.protocol.spool import BodySink, Retrieved, SpoolPolicy
from connector.protocol.transport import RECV_SIZE, TLS_FIX_HINT, Transport, make_tls_context

__all__ = [
    "MAX_STATUS_LINE",
    "MAX_UIDL_LENGTH",
    "PLAINTEXT_REFUSED",
    "RECV_SIZE",
    "TLS_FIX_HINT",
    "BodySink",
    "LineBuffer",
    "MultilineReader",
    "Pop3Session",
    "Retrieved",
    "ServerPolicy",
    "SessionState",
    "SpoolPolicy",
    "StatusLine",
    "TlsMode",
    "Transcript",
    "Transport",
    "dot_stuff",
    "encode_command",
    "find_duplicate_uidls",
    "make_tls_context",
    "parse_capa",
    "parse_list",
    "parse_server_policy",
    "parse_stat",
    "parse_status",
    "parse_uidl",
    "unstuff_response",
    "validate_uidl",
]
