"""One exception hierarchy, grouped by cause.

Every layer raises only these types; lower-layer exceptions (socket, ssl, librdkafka,
email parsing) are translated at the boundary with ``raise X from exc`` and never leak
upward. Each class says what the runtime does with it:

* retry    - the cycle is abandoned without deleting anything and tried again later;
* dead     - the mail goes to the dead-letter topic (or stays on the server with the mailbox's
             ``on_undecodable: leave``) and the cycle goes on (docs/delivery.md, "Dead letters");
* stop     - the mailbox (or the process, for config) stops with a message naming the fix.

Messages never contain passwords, tokens, mail bodies or decrypted text.
"""

from __future__ import annotations


class ConnectorError(Exception):
    """Base of every error this package raises on purpose."""

    #: mailbox id this error concerns, when known (set by the runtime).
    mailbox: str | None = None
    #: the step of the cycle that failed, when known (connect, login, uidl, retr, decode, produce, dele, quit).
    step: str | None = None

    def with_context(self, *, mailbox: str | None = None, step: str | None = None) -> ConnectorError:
        if mailbox is not None and self.mailbox is None:
            self.mailbox = mailbox
        if step is not None and self.step is None:
            self.step = step
        return self

    def describe(self) -> str:
        """Human message naming mailbox and step, as logged and printed by the CLI."""
        where = []
        if self.mailbox:
            where.append(f"mailbox {self.mailbox!r}")
        if self.step:
            where.append(f"step {self.step}")
        prefix = f"[{', '.join(where)}] " if where else ""
        return f"{prefix}{type(self).__name__}: {self}"


# ---------------------------------------------------------------- configuration (stop)


class ConfigError(ConnectorError):
    """The configuration is invalid; the message names the key, the value and what is allowed."""


# ---------------------------------------------------------------- POP3 side


class Pop3Error(ConnectorError):
    """Anything that went wrong talking to a POP3 server."""


class Pop3ConnectError(Pop3Error):
    """DNS, TCP or TLS setup failed (retry; check host, port, tls mode and CA)."""


class Pop3TimeoutError(Pop3Error):
    """The server did not answer within the configured timeout (retry)."""


class Pop3TlsError(Pop3ConnectError):
    """TLS handshake or certificate verification failed (stop the mailbox until fixed)."""


class Pop3AuthError(Pop3Error):
    """The server refused the credentials (stop the mailbox; fix username/password)."""


class Pop3MailboxBusyError(Pop3Error):
    """[IN-USE] (RFC 2449 §8.1.1): another session holds the maildrop lock (retry later, not an alarm)."""


class Pop3LoginDelayError(Pop3Error):
    """[LOGIN-DELAY] (RFC 2449 §8.1.2): logged in too soon after the last session (retry later)."""


class Pop3TempError(Pop3Error):
    """[SYS/TEMP] (RFC 3206): a transient server-side problem (retry)."""


class Pop3ProtocolError(Pop3Error):
    """The server broke the protocol: malformed status line, unexpected -ERR, oversized line (retry)."""


class Pop3CommandError(Pop3ProtocolError):
    """A command got -ERR; ``response`` holds the server's text (never mail content)."""

    def __init__(self, command: str, response: str) -> None:
        super().__init__(f"{command} failed: {response}")
        self.command = command
        self.response = response


class Pop3UnsupportedError(Pop3Error):
    """The server lacks something we need, e.g. UIDL (stop; the message names the fallback)."""


# ---------------------------------------------------------------- decoding (dead letter)


class DecodeError(ConnectorError):
    """The mail could not be turned into a record (dead letter; the original bytes are kept).

    ``stage`` says where it failed and ``reason`` is a short, stable code for dashboards and
    dead-letter headers. The message, like the codes, never carries mail content (and never
    decrypted content): part numbers, header names, charset labels, limits only.
    """

    #: "parse" (MIME), "decrypt" (S/MIME), "verify" (a required signature), "limits" (a
    #: hostile-mail limit), "record" (Avro).
    default_stage = "parse"
    default_reason = "malformed"

    def __init__(self, message: str, *, stage: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage or self.default_stage
        self.reason = reason or self.default_reason


class MailTooLargeError(DecodeError):
    """The mail exceeds a configured limit (size, MIME depth, part count, header count...);
    ``reason`` names the limit (e.g. "max_depth", "max_parts")."""

    default_stage = "limits"
    default_reason = "limit"


class SmimeError(DecodeError):
    """An S/MIME message could not be decrypted; ``reason`` says why: "no_key" (encrypted to a
    key we do not hold), "unsupported_cipher" (3DES, AES-GCM AuthEnvelopedData...),
    "unsupported_key_transport" (RSA-OAEP, EC key agreement...), "malformed", "decrypt_failed",
    "not_enveloped" (valid CMS, but not EnvelopedData/AuthEnvelopedData, e.g. signed-data sent
    as smime-type=enveloped-data)."""

    default_stage = "decrypt"
    default_reason = "decrypt_failed"


class SignatureError(SmimeError):
    """The mailbox requires a valid S/MIME signature (smime.require_valid_signature) and the
    mail has none: ``reason`` "not_signed", or "signature_invalid" (the message names the
    layer and the verdict's reason; never signer facts of a decrypted layer, never content)."""

    default_stage = "verify"
    default_reason = "signature_invalid"


# ---------------------------------------------------------------- Kafka side


class DeliveryError(ConnectorError):
    """Kafka did not confirm the record (retry the cycle; nothing is deleted)."""


class DeliveryTimeoutError(DeliveryError):
    """No delivery report within the configured timeout (broker unreachable or slow)."""


class DeliveryFatalError(DeliveryError):
    """librdkafka reported a fatal producer error (stop the producer; needs operator attention)."""


class RecordTooLargeError(DeliveryError):
    """The broker refused the record as too large (message.max.bytes / max.request.size)."""


# ---------------------------------------------------------------- appended: POP3 protocol layer


class Pop3ArgumentError(Pop3ProtocolError, ValueError):
    """A command argument cannot be sent (CR/LF/NUL, whitespace): a caller or config bug, not the server's."""


class UidlResetError(Pop3Error):
    """Most known UIDLs vanished and new ones appeared at once, or a known UIDL now names other
    mail: the server reset its UIDLs. Stop and report instead of republishing everything
    (mailbox option on_uidl_reset decides: stop, republish, rebaseline)."""


class Pop3LoginRefusedError(Pop3AuthError):
    """A bare -ERR to a login from a server without AUTH-RESP-CODE (RFC 3206 §4): bad
    credentials or a busy maildrop, the server does not say. Retry a few times before treating
    it as a credentials failure."""


class Pop3PermError(Pop3Error):
    """[SYS/PERM] (RFC 3206 §4): a permanent server-side problem; needs the server's operator."""


# ---------------------------------------------------------------- appended: OAuth2 token sources


class OAuthError(Pop3Error):
    """Getting an OAuth2 access token for an XOAUTH2/OAUTHBEARER login failed (connector/auth).

    A Pop3Error because it happens in the login step of a POP3 session, which must then end
    without deletes. Messages name the token endpoint, never the client secret, the assertion,
    the private key or a token. ``oauth_error`` is the RFC 6749 §5.2 error code when the
    endpoint sent one; ``hint`` says what to check (doctor prints it as the fix).
    """

    def __init__(self, message: str, *, oauth_error: str | None = None, hint: str = "") -> None:
        super().__init__(message)
        self.oauth_error = oauth_error
        self.hint = hint

    def copy(self) -> OAuthError:
        """A fresh instance with the same message, to raise in another thread."""
        return type(self)(str(self), oauth_error=self.oauth_error, hint=self.hint)


class OAuthTokenError(OAuthError, Pop3AuthError):
    """The token endpoint refused us (invalid_client, invalid_grant, unauthorized_client,
    invalid_scope...), or answered something that is not a token: an authentication failure
    (stop the mailbox; fix the oauth2 settings or the app registration)."""


class OAuthTokenUnavailableError(OAuthError, Pop3TempError):
    """The token endpoint could not be asked: unreachable, timed out, HTTP 5xx or 429, or a
    token file not written yet (retry later; nothing is wrong with the credentials)."""


# ---------------------------------------------------------------- appended: spool


class SpoolError(ConnectorError):
    """A retrieved mail could not be written to its spool file (disk full, directory gone):
    the cycle ends without deletes and is retried; the fix is on the spool directory."""
