"""Sans-IO SASL client mechanisms for POP3 ``AUTH`` (RFC 5034, which obsoletes RFC 1734).

Bytes in, bytes out: nothing here touches a socket. :class:`SaslExchange` turns one
mechanism into the POP3 lines of one ``AUTH`` exchange; the session sends and reads them.

The exchange (RFC 5034 §4)::

    C: AUTH <name> [<base64 initial response> | "="]      "=" = empty initial response
    S: + <base64 challenge>                                zero or more rounds
    C: <base64 response> | "" (empty response) | "*" (cancel)
    S: +OK ... | -ERR ...

* RFC 5034 §4: the AUTH line with its initial response must fit in 255 octets (the
  RFC 2449 §4 command limit); a longer initial response is sent instead as the answer to
  the server's first, empty, challenge. OAuth tokens (1-2 KB) therefore usually travel that
  way, which is also the form Exchange Online requires for XOAUTH2.
* ``-ERR`` ends the exchange; the session maps it to a typed error as for USER/PASS and adds
  :attr:`SaslExchange.error_json` (the OAuth error a server sent first, RFC 7628 §3.2.2).

Mechanisms (``plaintext`` = the wire carries the password or a bearer token, so the
session must refuse it without TLS unless ``allow_plaintext_auth``):

=================  ===============================================  =========
name               spec                                             plaintext
=================  ===============================================  =========
OAUTHBEARER        RFC 7628 §3.1 (GS2 header, kvpairs)              yes
XOAUTH2            Google / Microsoft documentation                 yes
XOAUTH2-TWO-STEP   XOAUTH2 without initial response (Exchange)      yes
SCRAM-SHA-256      RFC 5802 + RFC 7677 (mutual authentication)      no
SCRAM-SHA-1        RFC 5802                                         no
CRAM-MD5           RFC 2195                                         no
NTLM               [MS-NLMP] via pyspnego; [MS-POP3] framing        no
PLAIN              RFC 4616                                         yes
LOGIN              draft-murchison-sasl-login (de facto)            yes
=================  ===============================================  =========

The table is also the strength order :func:`choose` applies (:data:`STRENGTH`):

1. Token mechanisms first, only when a token is configured: a short-lived, scoped token is
   better to expose than a password, and a provider that offers OAuth (Google, Microsoft)
   is usually phasing passwords out. OAUTHBEARER before XOAUTH2 as the standard one.
2. SCRAM: the server proves it knows the password too, and a passive listener learns no
   password-equivalent (only material for an offline dictionary attack).
3. CRAM-MD5 before NTLM: both are challenge-response (no password on the wire); CRAM-MD5 is
   simple and universal, while NTLM pulls in a dependency and its v1 variants are weak.
4. PLAIN before LOGIN: same exposure, but PLAIN is standard and needs one round trip.

Secrets (passwords, tokens) are ``str`` in and never appear in exception messages or reprs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import stringprep
import struct
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Protocol

from connector.errors import ConfigError, Pop3AuthError, Pop3ProtocolError

__all__ = [
    "CANCEL",
    "MAX_AUTH_LINE",
    "PLAINTEXT_MECHANISMS",
    "SASL_MECHANISMS",
    "STRENGTH",
    "TOKEN_MECHANISMS",
    "CramMd5",
    "Login",
    "Mechanism",
    "Ntlm",
    "OAuthBearer",
    "Plain",
    "SaslExchange",
    "Scram",
    "XOAuth2",
    "apop_digest",
    "choose",
    "create",
    "encode_initial_response",
    "encode_response",
    "extract_apop_timestamp",
    "is_continuation",
    "parse_continuation",
    "saslprep",
]

#: RFC 5034 §4 / RFC 2449 §4: an AUTH command line, CRLF included, is at most 255 octets.
MAX_AUTH_LINE = 255
#: RFC 5034 §4: a client response of a single "*" cancels the exchange; the server answers -ERR.
CANCEL = b"*\r\n"
#: Strongest first; see the module docstring for the reasons. Names as in CAPA ``SASL``,
#: except the pseudo-name XOAUTH2-TWO-STEP, which is XOAUTH2 on the wire.
STRENGTH: tuple[str, ...] = (
    "OAUTHBEARER",
    "XOAUTH2",
    "XOAUTH2-TWO-STEP",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1",
    "CRAM-MD5",
    "NTLM",
    "PLAIN",
    "LOGIN",
)
SASL_MECHANISMS = frozenset(STRENGTH)
#: Mechanisms that need an OAuth 2.0 bearer token instead of a password.
TOKEN_MECHANISMS = frozenset({"OAUTHBEARER", "XOAUTH2", "XOAUTH2-TWO-STEP"})
#: Mechanisms that reveal the password or token to anyone who reads the connection.
PLAINTEXT_MECHANISMS = frozenset({"OAUTHBEARER", "XOAUTH2", "XOAUTH2-TWO-STEP", "PLAIN", "LOGIN"})
# Non-SASL login methods a mailbox's ``auth_mechanisms`` may also list; choose() skips them.
_NON_SASL = frozenset({"USER", "APOP"})
# RFC 6750 §2.1 b64token: what a bearer token may contain (Dovecot checks the same).
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 1939 §7: the APOP timestamp is a msg-id, "<" ... "@" ... ">", somewhere in the greeting.
_APOP_TIMESTAMP = re.compile(r"<[^<>\s@]*@[^<>\s]*>")
# Upper bound for a server-chosen SCRAM iteration count: RFC 7677 §4 asks for >= 4096 and real
# servers use 4096-100000; a hostile server could otherwise make us spin for minutes.
_SCRAM_MAX_ITERATIONS = 1_000_000


# ---------------------------------------------------------------------------- the protocol


class Mechanism(Protocol):
    """One client side of one SASL exchange (RFC 4422 §3). Instances are single-use.

    The driver (normally :class:`SaslExchange`) calls :meth:`initial_response` exactly once,
    then :meth:`respond` for each later server challenge, then :meth:`check_complete` after
    the server's ``+OK``. A mechanism that cannot answer a challenge raises
    :class:`~connector.errors.Pop3ProtocolError` or :class:`~connector.errors.Pop3AuthError`;
    the driver then cancels the exchange with ``*``.
    """

    #: the SASL name; for XOAUTH2-TWO-STEP this is ``XOAUTH2`` (what goes on the AUTH line).
    name: str
    #: True when the exchange reveals the password or a bearer token (refuse without TLS).
    plaintext: bool
    #: the error a server reported inside the exchange (OAuth JSON, RFC 7628 §3.2.2), if any.
    error_json: dict[str, object] | None

    def initial_response(self) -> bytes | None:
        """The RFC 4422 §3.3 initial response (``b""`` = send empty), or None to send none."""
        ...

    def respond(self, challenge: bytes) -> bytes:
        """The response to one server challenge, which is already base64-decoded."""
        ...

    def check_complete(self) -> None:
        """Called on ``+OK``; raises Pop3AuthError when the mechanism's own checks did not
        pass (SCRAM: the server never proved it knows the password)."""
        ...


class _Base:
    """Shared plumbing: a safe repr, the challenge counter, the no-op completion check."""

    name = ""
    plaintext = False

    def __init__(self, username: str) -> None:
        self.username = username
        self.error_json: dict[str, object] | None = None
        self._round = 0  # number of respond() calls so far

    def __repr__(self) -> str:
        # Never the password or the token; the username is fine (it is in every log line anyway).
        return f"{type(self).__name__}(name={self.name!r}, username={self.username!r})"

    def check_complete(self) -> None:
        return None

    def _unexpected(self, challenge: bytes) -> Pop3ProtocolError:
        return Pop3ProtocolError(
            f"{self.name}: unexpected server challenge #{self._round} ({len(challenge)} bytes); cancelling AUTH"
        )


def _utf8(value: str, what: str, mechanism: str, *, forbid: str = "\x00") -> bytes:
    """Encode one credential field as UTF-8, refusing separator characters (no value in the message)."""
    if any(ch in value for ch in forbid):
        raise ConfigError(f"{mechanism}: the {what} contains a character the mechanism cannot carry ({forbid!r})")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        raise ConfigError(f"{mechanism}: the {what} is not valid Unicode text") from None


def _saslname(value: str) -> str:
    """RFC 5801 §4 / RFC 5802 §5.1 saslname: "=" -> "=3D", "," -> "=2C"."""
    return value.replace("=", "=3D").replace(",", "=2C")


def _check_token(token: str, mechanism: str) -> str:
    """A bearer token must be an RFC 6750 §2.1 b64token (no spaces, no \\x01, no "Bearer ")."""
    if not _B64TOKEN.fullmatch(token):
        raise ConfigError(
            f"{mechanism}: the OAuth2 token is not an RFC 6750 bearer token (b64token characters only; "
            "check for surrounding whitespace, a newline, or a 'Bearer ' prefix)"
        )
    return token


def _parse_error_json(challenge: bytes) -> dict[str, object] | None:
    """The JSON object an OAuth server sends on failure (RFC 7628 §3.2.2); None if it is not one."""
    try:
        value = json.loads(challenge.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------- mechanisms


class Plain(_Base):
    """PLAIN (RFC 4616 §2): ``[authzid] NUL authcid NUL passwd`` in UTF-8, as initial response.

    ``authzid`` (optional) asks to act as another user, e.g. a master user on Dovecot.
    """

    name = "PLAIN"
    plaintext = True

    def __init__(self, username: str, password: str, *, authzid: str | None = None) -> None:
        super().__init__(username)
        self.authzid = authzid
        self._message = b"\x00".join(
            (
                _utf8(authzid or "", "authzid", self.name),
                _utf8(username, "username", self.name),
                _utf8(password, "password", self.name),
            )
        )

    def initial_response(self) -> bytes | None:
        return self._message

    def respond(self, challenge: bytes) -> bytes:
        # RFC 4616 §2: the mechanism is one client message; any challenge after it is wrong.
        self._round += 1
        raise self._unexpected(challenge)


class Login(_Base):
    """LOGIN (draft-murchison-sasl-login-00, de facto): the server prompts "Username:" then
    "Password:"; the client answers each in UTF-8. No initial response (servers differ on it).

    The prompt text is informational: it is honoured when recognisable, else the order decides.
    """

    name = "LOGIN"
    plaintext = True

    def __init__(self, username: str, password: str) -> None:
        super().__init__(username)
        self._user = _utf8(username, "username", self.name)
        self._password = _utf8(password, "password", self.name)
        self._sent_user = False
        self._sent_password = False

    def initial_response(self) -> bytes | None:
        return None

    def respond(self, challenge: bytes) -> bytes:
        self._round += 1
        prompt = challenge.lower()
        if b"pass" in prompt and not self._sent_password:
            self._sent_password = True
            return self._password
        if not self._sent_user:
            self._sent_user = True
            return self._user
        if not self._sent_password:
            self._sent_password = True
            return self._password
        raise self._unexpected(challenge)


class CramMd5(_Base):
    """CRAM-MD5 (RFC 2195 §2): answer the challenge with ``user SP hex(HMAC-MD5(password, challenge))``.

    The password never crosses the wire, but the server must store it in the clear (or
    an equivalent), and a recorded exchange allows an offline dictionary attack.
    """

    name = "CRAM-MD5"
    plaintext = False

    def __init__(self, username: str, password: str) -> None:
        super().__init__(username)
        self._user = _utf8(username, "username", self.name, forbid="\x00 ")
        self._password = _utf8(password, "password", self.name)

    def initial_response(self) -> bytes | None:
        return None

    def respond(self, challenge: bytes) -> bytes:
        self._round += 1
        if self._round != 1 or not challenge:
            raise self._unexpected(challenge)
        digest = hmac.new(self._password, challenge, hashlib.md5).hexdigest()
        return self._user + b" " + digest.encode("ascii")


class XOAuth2(_Base):
    """XOAUTH2 (Google "OAuth 2.0 Mechanism", Microsoft "Authenticate an IMAP, POP or SMTP
    connection using OAuth"): ``user=<user>\\x01auth=Bearer <token>\\x01\\x01``.

    * one-line form (Google, Dovecot): the message is the initial response;
    * ``two_step=True`` (Exchange Online): no initial response, the message answers the
      server's empty ``+`` challenge.

    On failure the server sends ``+ <base64 JSON>`` (e.g. ``{"status":"401","schemes":
    "bearer","scope":"..."}``) and expects an empty response, then answers ``-ERR``; the JSON
    is kept in :attr:`error_json`.
    """

    name = "XOAUTH2"
    plaintext = True

    def __init__(self, username: str, token: str, *, two_step: bool = False) -> None:
        super().__init__(username)
        self.two_step = two_step
        user = _utf8(username, "username", self.name, forbid="\x00\x01")
        self._message = b"user=" + user + b"\x01auth=Bearer " + _check_token(token, self.name).encode() + b"\x01\x01"
        self._sent = False

    def __repr__(self) -> str:
        return f"XOAuth2(username={self.username!r}, two_step={self.two_step})"

    def initial_response(self) -> bytes | None:
        if self.two_step:
            return None
        self._sent = True
        return self._message

    def respond(self, challenge: bytes) -> bytes:
        self._round += 1
        if not self._sent:
            self._sent = True
            if challenge:
                raise self._unexpected(challenge)
            return self._message
        if self.error_json is not None or self._round > 2:
            raise self._unexpected(challenge)
        # Google: "the client should send an empty response"; the server then sends -ERR.
        self.error_json = _parse_error_json(challenge) or {"status": "unknown"}
        return b""


class OAuthBearer(_Base):
    """OAUTHBEARER (RFC 7628 §3.1): GS2 header ``n,a=<user>,`` then
    ``\\x01host=<host>\\x01port=<port>\\x01auth=Bearer <token>\\x01\\x01`` as initial response.

    ``host``/``port`` (the server we connected to) are optional kvpairs; send them when
    known (RFC 7628 §3.1 says "SHOULD"). On failure the server sends ``+ <base64 JSON>``
    (RFC 7628 §3.2.2, e.g. ``{"status":"invalid_token"}``); the client answers with the dummy
    ``%x01`` (RFC 7628 §3.2.3) and the server ends with ``-ERR``. Dovecot fails the exchange
    whatever the answer is, so the RFC's dummy works there as well.
    """

    name = "OAUTHBEARER"
    plaintext = True

    def __init__(self, username: str, token: str, *, host: str | None = None, port: int | None = None) -> None:
        super().__init__(username)
        self.host = host
        self.port = port
        user = _utf8(_saslname(username), "username", self.name, forbid="\x00\x01")
        parts = [b"n,a=" + user + b","]
        if host:
            parts.append(b"host=" + _utf8(host, "host", self.name, forbid="\x00\x01"))
        if port is not None:
            parts.append(b"port=%d" % port)
        parts.append(b"auth=Bearer " + _check_token(token, self.name).encode())
        self._message = b"\x01".join(parts) + b"\x01\x01"

    def __repr__(self) -> str:
        return f"OAuthBearer(username={self.username!r}, host={self.host!r}, port={self.port!r})"

    def initial_response(self) -> bytes | None:
        return self._message

    def respond(self, challenge: bytes) -> bytes:
        self._round += 1
        if self._round > 1:
            raise self._unexpected(challenge)
        self.error_json = _parse_error_json(challenge) or {"status": "unknown"}
        return b"\x01"  # RFC 7628 §3.2.3: "a single %x01 (control A) character"


class Scram(_Base):
    """SCRAM-SHA-256 (RFC 7677) and SCRAM-SHA-1 (RFC 5802 §5, §7), without channel binding.

    Three client messages: client-first (initial response), client-final (proof), and an
    empty answer to the server-final message carrying the server signature, which is
    verified; :meth:`check_complete` fails the login if ``+OK`` came without it (RFC 5802 §9:
    the server must prove that it knows the password too).
    """

    plaintext = False
    _HASHES: ClassVar[Mapping[str, str]] = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-1": "sha1"}

    def __init__(self, username: str, password: str, *, name: str = "SCRAM-SHA-256", nonce: str | None = None) -> None:
        super().__init__(username)
        if name not in self._HASHES:
            raise ConfigError(f"unknown SCRAM variant {name!r}; use one of {sorted(self._HASHES)}")
        self.name = name
        self._hash = self._HASHES[name]
        self._password = saslprep(password, what="password").encode("utf-8")
        user = _saslname(saslprep(username, what="username"))
        self._nonce = nonce if nonce is not None else secrets.token_urlsafe(24)
        if not self._nonce or not all(0x21 <= ord(c) <= 0x7E and c != "," for c in self._nonce):
            raise ConfigError("SCRAM nonce must be printable ASCII without ','")  # RFC 5802 §7 c-nonce
        self._gs2_header = b"n,,"  # RFC 5802 §7: no channel binding, no authzid
        self._client_first_bare = f"n={user},r={self._nonce}".encode()
        self._server_signature: bytes | None = None
        self._verified = False

    def initial_response(self) -> bytes | None:
        return self._gs2_header + self._client_first_bare

    def respond(self, challenge: bytes) -> bytes:
        self._round += 1
        if self._round == 1:
            return self._client_final(challenge)
        if self._round == 2:
            self._check_server_final(challenge)
            return b""
        raise self._unexpected(challenge)

    def check_complete(self) -> None:
        if not self._verified:
            raise Pop3AuthError(
                f"{self.name}: the server accepted the login without proving it knows the password "
                "(no server signature, RFC 5802 §9); refusing the session"
            )

    def _client_final(self, server_first: bytes) -> bytes:
        """RFC 5802 §3: SaltedPassword, ClientKey, StoredKey, AuthMessage, ClientProof."""
        attrs = self._attributes(server_first)
        if "m" in attrs:
            raise Pop3ProtocolError(f"{self.name}: server requires an unsupported extension (m=)")
        try:
            nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"], validate=True), int(attrs["i"])
        except (KeyError, ValueError, binascii.Error):
            raise Pop3ProtocolError(f"{self.name}: malformed server-first-message") from None
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise Pop3ProtocolError(f"{self.name}: server nonce does not extend ours (RFC 5802 §5.1 r=)")
        if not 1 <= iterations <= _SCRAM_MAX_ITERATIONS:
            raise Pop3ProtocolError(f"{self.name}: iteration count {iterations} outside 1..{_SCRAM_MAX_ITERATIONS}")
        salted = hashlib.pbkdf2_hmac(self._hash, self._password, salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", self._hash)
        stored_key = hashlib.new(self._hash, client_key).digest()
        channel = base64.b64encode(self._gs2_header).decode()
        without_proof = f"c={channel},r={nonce}".encode()
        auth_message = self._client_first_bare + b"," + server_first + b"," + without_proof
        client_signature = hmac.digest(stored_key, auth_message, self._hash)
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", self._hash)
        self._server_signature = hmac.digest(server_key, auth_message, self._hash)
        return without_proof + b",p=" + base64.b64encode(proof)

    def _check_server_final(self, server_final: bytes) -> None:
        attrs = self._attributes(server_final)
        if "e" in attrs:  # RFC 5802 §7 server-error, e.g. "invalid-proof"
            raise Pop3AuthError(f"{self.name}: server rejected the login: {attrs['e'][:100]}")
        try:
            signature = base64.b64decode(attrs["v"], validate=True)
        except (KeyError, binascii.Error):
            raise Pop3ProtocolError(f"{self.name}: malformed server-final-message") from None
        if self._server_signature is None or not hmac.compare_digest(signature, self._server_signature):
            raise Pop3AuthError(
                f"{self.name}: wrong server signature: the server does not know the password "
                "(RFC 5802 §9; possible impostor); refusing the session"
            )
        self._verified = True

    def _attributes(self, message: bytes) -> dict[str, str]:
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            raise Pop3ProtocolError(f"{self.name}: server message is not UTF-8") from None
        attrs: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or len(key) != 1:
                raise Pop3ProtocolError(f"{self.name}: malformed server message (attribute {key[:10]!r})")
            attrs.setdefault(key, value)
        return attrs


class Ntlm(_Base):
    """NTLM ([MS-NLMP] messages built by pyspnego; POP3 framing per [MS-POP3] §2.2.1):

    ``AUTH NTLM`` -> ``+`` -> NEGOTIATE -> ``+ <CHALLENGE>`` -> AUTHENTICATE -> ``+OK``.

    pyspnego's pure-Python NTLM provider is forced (``use_ntlm``), so no system GSSAPI
    library is consulted; it sends NTLMv2 responses (LM_COMPAT_LEVEL 3, the library default).
    ``domain`` is the NetBIOS/AD domain; a username like ``DOM\\\\user`` or ``user@dom`` is passed
    through as is when no domain is given.
    """

    name = "NTLM"
    plaintext = False

    def __init__(self, username: str, password: str, *, domain: str | None = None) -> None:
        super().__init__(username)
        self.domain = domain
        principal = f"{domain}\\{username}" if domain else username
        # Imported here: pyspnego costs ~35 ms at start-up, and only NTLM mailboxes use it.
        import spnego  # noqa: PLC0415
        import spnego.exceptions  # noqa: PLC0415

        try:
            self._context = spnego.client(
                principal, password, protocol="ntlm", options=spnego.NegotiateOptions.use_ntlm
            )
        except spnego.exceptions.SpnegoError as exc:
            raise ConfigError(f"NTLM: cannot set up a client context ({type(exc).__name__})") from None

    def __repr__(self) -> str:
        return f"Ntlm(username={self.username!r}, domain={self.domain!r})"

    def initial_response(self) -> bytes | None:
        return None  # [MS-POP3] §3.1.5.1: the NEGOTIATE message answers the server's empty "+"

    def respond(self, challenge: bytes) -> bytes:
        self._round += 1
        if self._round == 1:
            if challenge:
                raise self._unexpected(challenge)
            return self._step(None)
        if self._round == 2 and challenge and not self._context.complete:
            return self._step(challenge)
        raise self._unexpected(challenge)

    def _step(self, token: bytes | None) -> bytes:
        import spnego.exceptions  # noqa: PLC0415 - see __init__

        try:
            out = self._context.step(token)
        except (spnego.exceptions.SpnegoError, ValueError, KeyError, IndexError, OverflowError, struct.error) as exc:
            # pyspnego's message parser lets ValueError/struct.error/KeyError escape on malformed input.
            what = "NEGOTIATE" if token is None else "server CHALLENGE"
            raise Pop3ProtocolError(f"NTLM: cannot process the {what} message ({type(exc).__name__})") from None
        if out is None:
            raise Pop3ProtocolError("NTLM: the library produced no message")
        return out


# ---------------------------------------------------------------------------- choice and construction


def choose(offered: Sequence[str], allowed: Sequence[str], have_token: bool) -> str:
    """The strongest mechanism (:data:`STRENGTH`) that the server offers and ``allowed`` permits.

    * ``offered``: the arguments of CAPA's ``SASL`` line (RFC 2449 §6.3 / RFC 5034 §7);
      names are compared case-insensitively.
    * ``allowed``: the mailbox's ``auth_mechanisms``; ``USER`` and ``APOP`` may appear and are
      skipped (they are not SASL); ``XOAUTH2-TWO-STEP`` matches an offered ``XOAUTH2``.
      The order of ``allowed`` does not matter: :data:`STRENGTH` decides.
    * token mechanisms are considered only when ``have_token``; password mechanisms are
      considered whenever allowed (leave them out of ``allowed`` if there is no password).

    Raises ConfigError when ``allowed`` names something unknown (a config bug: stop), and
    Pop3AuthError when nothing fits (this server and this mailbox's settings cannot log in:
    stop the mailbox); its message lists what the server offers and what is allowed.
    """
    wanted = [a.strip().upper() for a in allowed]
    unknown = [a for a in wanted if a not in SASL_MECHANISMS and a not in _NON_SASL]
    if unknown:
        raise ConfigError(
            f"auth_mechanisms: {', '.join(unknown)} not supported; use some of: "
            f"{', '.join((*sorted(_NON_SASL), *STRENGTH))}"
        )
    on_server = {o.strip().upper() for o in offered}
    for name in STRENGTH:
        wire = "XOAUTH2" if name == "XOAUTH2-TWO-STEP" else name
        if name in wanted and wire in on_server and (have_token or name not in TOKEN_MECHANISMS):
            return name
    sasl_wanted = [a for a in wanted if a in SASL_MECHANISMS]
    hint = ""
    if not have_token and any(a in TOKEN_MECHANISMS for a in sasl_wanted):
        hint = "; XOAUTH2/OAUTHBEARER need oauth2_token or an oauth2 token source"
    raise Pop3AuthError(
        f"no usable SASL mechanism: server offers [{' '.join(sorted(on_server)) or 'none'}], "
        f"allowed [{' '.join(sasl_wanted) or 'none'}]{hint}"
    )


def create(
    name: str,
    *,
    username: str,
    password: str | None = None,
    token: str | None = None,
    host: str | None = None,
    port: int | None = None,
    authzid: str | None = None,
    domain: str | None = None,
) -> Mechanism:
    """Build the mechanism called ``name`` (a :data:`STRENGTH` name, e.g. from :func:`choose`).

    ``host``/``port`` feed OAUTHBEARER's kvpairs, ``authzid`` PLAIN, ``domain`` NTLM.
    Raises ConfigError if the credential the mechanism needs (password or token) is missing.
    """
    key = name.strip().upper()
    if key in TOKEN_MECHANISMS:
        if not token:
            raise ConfigError(f"{key} needs an OAuth2 token (oauth2_token, or an oauth2 token source)")
        if key == "OAUTHBEARER":
            return OAuthBearer(username, token, host=host, port=port)
        return XOAuth2(username, token, two_step=key == "XOAUTH2-TWO-STEP")
    if key not in SASL_MECHANISMS:
        raise ConfigError(f"unknown SASL mechanism {name!r}; use one of: {', '.join(STRENGTH)}")
    if not password:
        raise ConfigError(f"{key} needs a password")
    builders: dict[str, Callable[[], Mechanism]] = {
        "PLAIN": lambda: Plain(username, password, authzid=authzid),
        "LOGIN": lambda: Login(username, password),
        "CRAM-MD5": lambda: CramMd5(username, password),
        "SCRAM-SHA-256": lambda: Scram(username, password, name="SCRAM-SHA-256"),
        "SCRAM-SHA-1": lambda: Scram(username, password, name="SCRAM-SHA-1"),
        "NTLM": lambda: Ntlm(username, password, domain=domain),
    }
    return builders[key]()


# ---------------------------------------------------------------------------- wire helpers


def is_continuation(line: bytes) -> bool:
    """True for an RFC 5034 §4 continuation line ``+ [base64]`` (also a bare ``+``), False for
    ``+OK``/``-ERR``. ``line`` may still end in CRLF."""
    body = line.rstrip(b"\r\n")
    return body == b"+" or body.startswith(b"+ ")


def parse_continuation(line: bytes) -> bytes:
    """Decode the challenge of a continuation line (RFC 5034 §4: ``"+" SP [base64] CRLF``).

    An empty challenge (``+``, ``+ ``) gives ``b""``. Anything else than a continuation, or
    a payload that is not strict base64, raises Pop3ProtocolError.
    """
    if not is_continuation(line):
        raise Pop3ProtocolError(f"expected a '+ ' continuation line, got {line[:40]!r}")
    payload = line.rstrip(b"\r\n")[1:].strip(b" ")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Pop3ProtocolError(f"AUTH continuation is not base64 (RFC 5034 §4): {payload[:40]!r}") from None


def encode_initial_response(data: bytes) -> str:
    """The AUTH-line form of an initial response: base64, or ``=`` when empty (RFC 5034 §4)."""
    return base64.b64encode(data).decode("ascii") if data else "="


def encode_response(data: bytes) -> bytes:
    """One client response line: base64 + CRLF; an empty response is an empty line (RFC 5034 §4)."""
    return base64.b64encode(data) + b"\r\n"


class SaslExchange:
    """Drive one ``AUTH`` exchange for a mechanism: lines in, lines out (RFC 5034 §4).

    Use::

        ex = SaslExchange(mech)
        send(ex.start())                       # transcript: ex.redacted_start()
        line = read_line()
        while is_continuation(line):
            send(ex.reply(line))                # transcript: "***"
            line = read_line()
        if +OK: ex.succeeded()                  # may raise Pop3AuthError (SCRAM)
        else:   raise ex.failure or <typed -ERR error>, with ex.error_json in the message

    ``max_line`` (default 255, RFC 5034 §4) bounds the AUTH line; a longer initial response
    is deferred to the server's first (empty) challenge. ``max_line=None`` never defers.
    If the mechanism cannot answer a challenge, :meth:`reply` returns :data:`CANCEL` and keeps
    the reason in :attr:`failure`, which the session raises after the server's ``-ERR``.
    """

    def __init__(self, mechanism: Mechanism, *, max_line: int | None = MAX_AUTH_LINE) -> None:
        self.mechanism = mechanism
        self.max_line = max_line
        self.failure: Pop3AuthError | Pop3ProtocolError | None = None
        self._deferred: bytes | None = None
        self._started = False
        self._initial_on_line = False

    def __repr__(self) -> str:
        return f"SaslExchange({self.mechanism!r})"

    @property
    def error_json(self) -> dict[str, object] | None:
        """The OAuth error JSON the server sent during the exchange, if any."""
        return self.mechanism.error_json

    def start(self) -> bytes:
        """The ``AUTH <name> [initial-response]`` line, CRLF included. Call once."""
        if self._started:
            raise Pop3ProtocolError("AUTH exchange already started")
        self._started = True
        line = f"AUTH {self.mechanism.name}".encode("ascii")
        initial = self.mechanism.initial_response()
        if initial is not None:
            arg = encode_initial_response(initial).encode("ascii")
            if self.max_line is None or len(line) + 1 + len(arg) + 2 <= self.max_line:
                self._initial_on_line = True
                return line + b" " + arg + b"\r\n"
            self._deferred = initial
        return line + b"\r\n"

    def redacted_start(self) -> str:
        """The AUTH line for transcripts and logs: the initial response shown as ``***``."""
        return f"AUTH {self.mechanism.name}" + (" ***" if self._initial_on_line else "")

    def reply(self, line: bytes) -> bytes:
        """The client line (CRLF included) answering one server continuation line."""
        if not self._started:
            raise Pop3ProtocolError("AUTH continuation before the AUTH command")
        if self.failure is not None:
            raise Pop3ProtocolError("AUTH exchange was cancelled; expected -ERR from the server")
        challenge = parse_continuation(line)
        if self._deferred is not None:
            # RFC 5034 §4: the initial response that did not fit answers the first, empty challenge.
            data, self._deferred = self._deferred, None
            if challenge:
                self.failure = Pop3ProtocolError(
                    f"{self.mechanism.name}: expected an empty challenge for the deferred initial response"
                )
                return CANCEL
            return encode_response(data)
        try:
            return encode_response(self.mechanism.respond(challenge))
        except (Pop3AuthError, Pop3ProtocolError) as exc:
            self.failure = exc
            return CANCEL

    def succeeded(self) -> None:
        """Call on ``+OK``: raises if the exchange was cancelled or the mechanism's final check
        fails (SCRAM without a verified server signature)."""
        if self.failure is not None:
            raise Pop3AuthError(f"{self.mechanism.name}: server answered +OK to a cancelled exchange ({self.failure})")
        self.mechanism.check_complete()


# ---------------------------------------------------------------------------- APOP and SASLprep


def extract_apop_timestamp(greeting: str) -> str | None:
    """The RFC 1939 §7 timestamp (``<...@...>``, brackets included) in a greeting, or None."""
    match = _APOP_TIMESTAMP.search(greeting)
    return match.group(0) if match else None


def apop_digest(greeting_timestamp: str, secret: str) -> str:
    """RFC 1939 §7 APOP digest: lower-case hex MD5 of ``timestamp + secret`` (UTF-8).

    MD5 is what the protocol mandates; ``usedforsecurity=False`` keeps FIPS builds working.
    APOP does not protect a weak secret against a recorded exchange: prefer TLS + SASL.
    """
    data = (greeting_timestamp + secret).encode("utf-8")
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def saslprep(value: str, *, what: str = "string") -> str:
    """SASLprep (RFC 4013) for queries (unassigned code points allowed, RFC 3454 §7).

    Maps non-ASCII spaces to SPACE and drops "commonly mapped to nothing" (RFC 4013 §2.1),
    NFKC-normalises (§2.2), refuses prohibited output (§2.3) and bad bidi (§2.4) with a
    ConfigError naming ``what`` but not the value.
    """
    if value.isascii() and value.isprintable():
        return value  # the common case: nothing to map, nothing prohibited
    mapped = "".join(" " if stringprep.in_table_c12(ch) else ch for ch in value if not stringprep.in_table_b1(ch))
    result = unicodedata.normalize("NFKC", mapped)
    prohibited: tuple[Callable[[str], bool], ...] = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    if any(check(ch) for ch in result for check in prohibited):
        raise ConfigError(f"the {what} contains a character SASLprep prohibits (RFC 4013 §2.3)")
    if any(stringprep.in_table_d1(ch) for ch in result) and (
        any(stringprep.in_table_d2(ch) for ch in result)
        or not (stringprep.in_table_d1(result[0]) and stringprep.in_table_d1(result[-1]))
    ):
        raise ConfigError(f"the {what} breaks the SASLprep bidirectional rules (RFC 4013 §2.4, RFC 3454 §6)")
    return result
