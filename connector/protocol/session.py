"""The POP3 session API: one authenticated conversation with one maildrop.

Glues the sans-IO core (:mod:`connector.protocol.core`) to the blocking transport
(:mod:`connector.protocol.transport`) and tracks the RFC 1939 §3 session states:

    AUTHORIZATION --USER/PASS +OK--> TRANSACTION --QUIT--> (UPDATE) --> CLOSED
          |                              |
          +-------- close() / abort() / any I/O failure ---------------> CLOSED

Exactly-once relevant rules (RFC 1939 §6):

* DELE only *marks* a message; it is removed when the server enters the UPDATE state,
  which happens only on QUIT, and ``+OK`` to QUIT confirms the removal. ``-ERR`` to QUIT
  ("some deleted messages not removed") raises :class:`~connector.errors.Pop3CommandError`.
* A connection that ends any other way (``close()``, a timeout, a reset) removes nothing.
* ``abort()`` sends RSET and then QUIT (releasing the maildrop lock at once rather than when
  the server notices the drop), and only sends QUIT if RSET got ``+OK``: otherwise it just
  drops the connection, so pending deletes can never be committed by accident.

Errors: socket/ssl exceptions are translated by the transport; ``-ERR`` replies become
typed errors (RFC 2449 §8 / RFC 3206 codes): ``[IN-USE]`` -> Pop3MailboxBusyError,
``[LOGIN-DELAY]`` -> Pop3LoginDelayError, ``[SYS/TEMP]`` -> Pop3TempError, ``[AUTH]`` and any
other ``-ERR`` to USER/PASS -> Pop3AuthError, any other ``-ERR`` -> Pop3CommandError.
After a timeout, connection error or framing error the session is closed (the response
stream is out of sync); after a plain ``-ERR`` it stays usable.

Extension points for later issues: APOP needs the greeting's timestamp (``greeting.text``);
SASL (RFC 5034) needs ``+ `` continuation lines, which :meth:`Pop3Session._read_status`
deliberately rejects today; both will be new ``login_*`` methods sharing ``_command``.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Generator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from connector import faults
from connector.errors import (
    ConfigError,
    ConnectorError,
    Pop3ArgumentError,
    Pop3AuthError,
    Pop3CommandError,
    Pop3Error,
    Pop3LoginDelayError,
    Pop3LoginRefusedError,
    Pop3MailboxBusyError,
    Pop3PermError,
    Pop3ProtocolError,
    Pop3TempError,
    Pop3TlsError,
    Pop3UnsupportedError,
)
from connector.protocol.core import (
    LineBuffer,
    MultilineReader,
    ServerPolicy,
    StatusLine,
    encode_command,
    parse_capa,
    parse_list,
    parse_server_policy,
    parse_stat,
    parse_status,
    parse_uidl,
)
from connector.protocol.sasl import Mechanism, SaslExchange, apop_digest, extract_apop_timestamp, is_continuation
from connector.protocol.spool import BodySink, Retrieved, SpoolPolicy
from connector.protocol.transport import Transport, make_tls_context

log = logging.getLogger("pop3kafka.pop3")

#: a mail address in a message we log: its local part is shown by its first character only
#: (issue 8: full addresses only at debug level). Server replies quote them too ("-ERR
#: [AUTH] Authentication failed for jane.doe@example.com").
_ADDRESS = re.compile(r"\b([A-Za-z0-9._%+=-])[A-Za-z0-9._%+=-]*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")


def redact_addresses(text: str) -> str:
    """``jane.doe@example.com`` -> ``j***@example.com`` wherever it appears in ``text``."""
    return _ADDRESS.sub(r"\1***@\2", text)


if TYPE_CHECKING:
    import ssl

__all__ = ["Pop3Session", "SessionState", "TlsMode", "Transcript"]

TlsMode = Literal["implicit", "starttls", "none"]
#: a server asking more than this many SASL questions is looping
MAX_SASL_ROUNDS = 10
#: RETRs kept in flight with PIPELINING: enough to hide a WAN round trip behind ~20 KB mails,
#: few enough that an early stop drains little.
PIPELINE_WINDOW = 16
#: DELEs kept in flight with PIPELINING. Their answers are short (~30 octets): 256 of them
#: stay far below any socket buffer, so the server never stalls writing answers we have not
#: read yet while we are still writing commands (the pipelining deadlock of RFC 2449 §6.6).
DELE_WINDOW = 256


#: ``transcript(direction, line)``: direction is ``"C"`` (client) or ``"S"`` (server); the
#: line has no CRLF, the PASS argument is ``***``, and bodies are never passed.
Transcript = Callable[[str, str], None]

_TLS_MODES: tuple[TlsMode, ...] = ("implicit", "starttls", "none")
#: the fix named when a server refuses a login because the connection is not encrypted
PLAINTEXT_FIX = "set tls: starttls (STLS on this port) or tls: implicit (the POP3S port)"
PLAINTEXT_REFUSED = (
    "refusing to send a password over an unencrypted connection; "
    "set tls: implicit|starttls or allow_plaintext_auth: true"
)


class SessionState(enum.Enum):
    """RFC 1939 §3 states as seen by the client (UPDATE is the QUIT exchange itself)."""

    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    CLOSED = "closed"


def _has_code(status: StatusLine, code: str) -> bool:
    """True if the response code is ``code`` or a sub-level of it (RFC 2449 §8 hierarchy)."""
    return status.code is not None and (status.code == code or status.code.startswith(code + "/"))


class Pop3Session:
    """A blocking POP3 client session. Build it with :meth:`connect`; not thread-safe.

    Use as a context manager: a clean exit calls :meth:`quit` (committing DELEs), an exit
    by exception calls :meth:`abort` (committing nothing).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        allow_plaintext_auth: bool = False,
        transcript: Transcript | None = None,
    ) -> None:
        """Wrap a connected transport; no I/O happens here (see :meth:`connect`)."""
        self._transport = transport
        self._buffer = LineBuffer()
        self._caps: dict[str, list[str]] | None = None
        #: the last CAPA read in AUTHORIZATION state; it outlives the login (server_policy()).
        self._caps_before_login: dict[str, list[str]] | None = None
        self._transcript = transcript
        self.allow_plaintext_auth = allow_plaintext_auth
        self.state = SessionState.AUTHORIZATION
        self.greeting: StatusLine | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        tls: TlsMode,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        allow_plaintext_auth: bool = False,
        transcript: Transcript | None = None,
    ) -> Pop3Session:
        """Connect, (for ``implicit``) handshake TLS, read the greeting, (for ``starttls``) upgrade.

        * ``tls="implicit"``: POP3S, TLS from the first byte (RFC 8314, port 995).
        * ``tls="starttls"``: plain connect, then CAPA must list STLS (RFC 2595 §4) or
          :class:`~connector.errors.Pop3TlsError` is raised; capabilities are re-read after.
        * ``tls="none"``: no TLS; :meth:`login_user_pass` then refuses unless
          ``allow_plaintext_auth``.

        ``ssl_context`` defaults to :func:`make_tls_context` (system CAs, verification on).
        ``timeout`` is per socket operation. On any failure the socket is closed.
        """
        if tls not in _TLS_MODES:
            raise ConfigError(f"tls {tls!r} is not one of {list(_TLS_MODES)}")
        if tls != "none" and ssl_context is None:
            ssl_context = make_tls_context(None)
        transport = Transport.connect(host, port, timeout, ssl_context if tls == "implicit" else None)
        session = cls(transport, allow_plaintext_auth=allow_plaintext_auth, transcript=transcript)
        try:
            session.read_greeting()
            if tls == "starttls":
                assert ssl_context is not None
                session.starttls(ssl_context)
        except BaseException:
            session.close()
            raise
        return session

    def read_greeting(self) -> StatusLine:
        """Read the server greeting (RFC 1939 §4); ``-ERR`` raises (typed by its code)."""
        if self.greeting is not None:
            raise Pop3ProtocolError("greeting already read")
        status = self._read_status()
        if not status.ok:
            self.close()
            raise self._error("greeting", status)
        self.greeting = status
        return status

    def close(self) -> None:
        """Drop the connection without QUIT: no pending DELE is applied (RFC 1939 §6).
        Never raises; idempotent."""
        self.state = SessionState.CLOSED
        self._transport.close()

    def quit(self) -> None:
        """Send QUIT and close. From TRANSACTION this commits the DELEs (RFC 1939 §6 UPDATE).

        ``+OK`` means every marked message was removed. ``-ERR`` raises Pop3CommandError
        (some were not removed); a timeout or lost connection raises as usual and leaves it
        unknown whether the server reached UPDATE. The session is closed in every case.
        """
        self._require("QUIT", SessionState.AUTHORIZATION, SessionState.TRANSACTION)
        try:
            status = self._command("QUIT", _before_reply=lambda: faults.point("during_quit"))
        finally:
            self.close()
        if not status.ok:
            raise Pop3CommandError("QUIT", status.describe())

    def abort(self) -> None:
        """Best effort RSET + QUIT, then close; never raises. No DELE is ever committed:
        QUIT is only sent if RSET was acknowledged (or nothing could be pending)."""
        if self.state is SessionState.CLOSED:
            return
        try:
            if self.state is SessionState.TRANSACTION and not self._command("RSET").ok:
                return  # cannot be sure the marks are gone: dropping the line keeps the mail
            self._command("QUIT")
        except ConnectorError:
            pass
        finally:
            self.close()

    def __enter__(self) -> Pop3Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self.state is not SessionState.CLOSED:
            self.quit()

    # ------------------------------------------------------------------ properties

    @property
    def is_tls(self) -> bool:
        """True when the connection is encrypted (implicit TLS or after STLS)."""
        return self._transport.is_tls

    @property
    def certificate_not_after(self) -> float | None:
        """Unix time at which the server's TLS certificate expires; None without TLS."""
        return self._transport.peer_not_after()

    @property
    def host(self) -> str:
        return self._transport.host

    @property
    def port(self) -> int:
        return self._transport.port

    # ------------------------------------------------------------------ AUTHORIZATION state

    def capabilities(self, *, refresh: bool = False) -> dict[str, list[str]]:
        """CAPA (RFC 2449 §5) as ``{TAG: [args]}``; ``{}`` if the server has no CAPA.

        Cached per state: the cache is dropped after STLS (RFC 2595 §4 requires it) and
        after login (RFC 2449 §5: capabilities may differ in TRANSACTION state).
        """
        self._require("CAPA", SessionState.AUTHORIZATION, SessionState.TRANSACTION)
        if self._caps is None or refresh:
            status = self._command("CAPA")
            self._caps = parse_capa(self._read_body()) if status.ok else {}
        if self.state is SessionState.AUTHORIZATION:
            self._caps_before_login = self._caps
        return {tag: list(args) for tag, args in self._caps.items()}

    def server_policy(self) -> ServerPolicy:
        """EXPIRE and LOGIN-DELAY as this session sees them (RFC 2449 §6.7, §6.8).

        In AUTHORIZATION state: from the CAPA already read (one CAPA if none was). Those values
        may be placeholders: a ``USER`` suffix says the value differs per user, and the user's
        own value is announced by the CAPA in TRANSACTION state (RFC 2449 §5, §6.7, §6.8). So
        after login the CAPA is re-read when a value before login said ``USER`` (or no CAPA was
        read before login); otherwise the values from before login stand, without a round trip.
        A CAPA already read after login is used as it is.
        """
        self._require("CAPA", SessionState.AUTHORIZATION, SessionState.TRANSACTION)
        if self.state is SessionState.TRANSACTION and self._caps is None and self._caps_before_login is not None:
            before = parse_server_policy(self._caps_before_login)
            if not before.per_user:
                return before
        return parse_server_policy(self.capabilities())

    def starttls(self, ssl_context: ssl.SSLContext) -> None:
        """Upgrade to TLS with STLS (RFC 2595 §4). Any failure closes the session.

        Raises Pop3TlsError if the server does not list STLS, refuses it, sends anything
        between its ``+OK`` and the handshake (a plaintext injection, cf. CVE-2011-0411),
        or fails the handshake/verification.
        """
        self._require("STLS", SessionState.AUTHORIZATION)
        try:
            if self.is_tls:
                raise Pop3TlsError("connection is already TLS")
            if "STLS" not in self.capabilities():
                raise Pop3TlsError(
                    f"server {self.host}:{self.port} does not offer STLS; "
                    "use tls: implicit with the POP3S port, or fix the server"
                )
            status = self._command("STLS")
            if not status.ok:
                raise Pop3TlsError(f"server {self.host}:{self.port} refused STLS: {status.describe()}")
            if len(self._buffer):
                raise Pop3TlsError(
                    f"server {self.host}:{self.port} sent data after +OK to STLS, before the TLS "
                    "handshake (possible injection); refusing to continue"
                )
            self._transport.start_tls(ssl_context)
            self._caps = None  # RFC 2595 §4: discard capabilities learnt before TLS
            self._caps_before_login = None
        except BaseException:
            self.close()
            raise

    def login_user_pass(self, username: str, password: str) -> None:
        """USER/PASS login (RFC 1939 §7); on success the session is in TRANSACTION state.

        Refuses (Pop3TlsError, nothing sent) on an unencrypted connection unless
        ``allow_plaintext_auth``. ``-ERR`` raises Pop3MailboxBusyError ([IN-USE]),
        Pop3LoginDelayError ([LOGIN-DELAY]), Pop3TempError ([SYS/TEMP]) or Pop3AuthError
        (anything else); the session stays in AUTHORIZATION. Messages name the user and
        the server's text, never the password.
        """
        self._require("USER", SessionState.AUTHORIZATION)
        if not self.is_tls and not self.allow_plaintext_auth:
            raise Pop3TlsError(PLAINTEXT_REFUSED)
        encode_command("USER", username)  # validate both arguments before sending anything
        encode_command("PASS", password)
        for command, arg in (("USER", username), ("PASS", password)):
            status = self._command(command, arg)
            if not status.ok:
                raise self._error(command, status, auth=True, what=f"login as {username!r}")
        self.state = SessionState.TRANSACTION
        self._caps = None  # RFC 2449 §5: capabilities may change after authentication

    def login_apop(self, username: str, secret: str) -> None:
        """APOP (RFC 1939 §7): MD5 of the greeting's timestamp and the shared secret.

        The secret never crosses the wire, so APOP is allowed without TLS; it needs a server
        that stores the secret in the clear and put a ``<...>`` timestamp in its greeting.
        """
        self._require("APOP", SessionState.AUTHORIZATION)
        stamp = extract_apop_timestamp(self.greeting.text if self.greeting is not None else "")
        if stamp is None:
            raise Pop3UnsupportedError("the server's greeting has no APOP timestamp; it does not offer APOP")
        digest = apop_digest(stamp, secret)
        status = self._command("APOP", username, digest)
        if not status.ok:
            raise self._error("APOP", status, auth=True, what=f"login as {username!r} with APOP")
        self.state = SessionState.TRANSACTION
        self._caps = None

    def login_sasl(self, mechanism: Mechanism, *, username: str) -> None:
        """AUTH (RFC 5034) driven by :class:`~connector.protocol.sasl.SaslExchange`.

        ``+`` lines are challenges, answered base64-encoded on their own line; an initial
        response that would make the AUTH line longer than 255 octets (most OAuth tokens) is
        sent after the server's first empty challenge instead, which is also the two-step form
        Exchange Online requires. A mechanism that reveals a secret or a bearer token
        (``plaintext``) is refused on an unencrypted connection unless ``allow_plaintext_auth``.
        An OAuth failure (RFC 7628 §3.2.2 error JSON) is named in the Pop3AuthError.
        """
        self._require("AUTH", SessionState.AUTHORIZATION)
        if mechanism.plaintext and not self.is_tls and not self.allow_plaintext_auth:
            raise Pop3TlsError(PLAINTEXT_REFUSED)
        exchange = SaslExchange(mechanism)
        self._send_secret_line(exchange.start(), exchange.redacted_start())
        for _ in range(MAX_SASL_ROUNDS):
            line = self._read_line()
            if is_continuation(line):
                self._send_secret_line(exchange.reply(line), "***")
                continue
            status = self._parse(line)
            if status.ok:
                exchange.succeeded()
                self.state = SessionState.TRANSACTION
                self._caps = None
                return
            if exchange.failure is not None:
                raise exchange.failure
            error = self._error(f"AUTH {mechanism.name}", status, auth=True, what=f"login as {username!r}")
            if exchange.error_json:
                error.args = (f"{error.args[0]} (the server said: {exchange.error_json})",)
            raise error
        self.close()
        raise Pop3ProtocolError(f"AUTH {mechanism.name}: more than {MAX_SASL_ROUNDS} challenges")

    def _send(self, data: bytes) -> None:
        """Put bytes on the wire; a failed send leaves the session unusable, so it is closed."""
        try:
            self._transport.send(data)
        except ConnectorError:
            self.close()
            raise

    def _send_secret_line(self, data: bytes, shown: str) -> None:
        """Send a line that carries credentials; the transcript shows ``shown`` instead."""
        if self._transcript is not None:
            self._transcript("C", shown)
        self._send(data)

    # ------------------------------------------------------------------ TRANSACTION state

    def stat(self) -> tuple[int, int]:
        """STAT (RFC 1939 §5): (message count, maildrop size in octets), deleted excluded."""
        return parse_stat(self._simple("STAT"))

    def uidl(self) -> list[tuple[int, str]]:
        """UIDL (RFC 1939 §7) for all messages: ``[(msg_num, unique_id)]``.

        A server without UIDL raises Pop3UnsupportedError: without unique ids the
        connector cannot tell mails it already delivered from new ones.
        """
        self._require("UIDL", SessionState.TRANSACTION)
        status = self._command("UIDL")
        if not status.ok:
            error = self._error("UIDL", status)
            if type(error) is Pop3CommandError:
                raise Pop3UnsupportedError(
                    f"server {self.host}:{self.port} does not support UIDL ({status.describe()}); "
                    "unique ids are required to avoid duplicates: enable UIDL on the server "
                    "(RFC 1939 §7, optional command)"
                )
            raise error
        return parse_uidl(self._read_body())

    def list(self) -> list[tuple[int, int]]:
        """LIST (RFC 1939 §5) for all messages: ``[(msg_num, size_in_octets)]``."""
        self._require("LIST", SessionState.TRANSACTION)
        status = self._command("LIST")
        if not status.ok:
            raise self._error("LIST", status)
        return parse_list(self._read_body())

    def retr(self, msg_num: int) -> bytes:
        """RETR (RFC 1939 §7): the whole message, dot-stuffing undone, CRLF line endings."""
        pieces: list[bytes] = []
        self.retr_into(msg_num, pieces.append)
        return b"".join(pieces)

    def retr_into(self, msg_num: int, sink: Callable[[bytes], None]) -> int:
        """RETR streaming each unstuffed piece into ``sink`` as it arrives; returns the byte
        count. If ``sink`` raises, the session is closed (the body was not fully read) and
        the exception propagates unchanged."""
        self._require("RETR", SessionState.TRANSACTION)
        status = self._command("RETR", self._msg_arg(msg_num))
        if not status.ok:
            raise self._error(f"RETR {msg_num}", status)
        return self._read_body_into(sink)

    def top(self, msg_num: int, lines: int = 0) -> bytes:
        """TOP (RFC 1939 §7, optional): the header section, the blank line, ``lines`` body lines."""
        self._require("TOP", SessionState.TRANSACTION)
        status = self._command("TOP", self._msg_arg(msg_num), str(lines))
        if not status.ok:
            raise self._error(f"TOP {msg_num}", status)
        return self._read_body()

    @property
    def pipelining(self) -> bool:
        """RFC 2449 §6.6: the server accepts several commands before answering."""
        return "PIPELINING" in self.capabilities()

    def retr_many(
        self,
        msg_nums: Sequence[int],
        *,
        limit: int | None = None,
        window: int | None = None,
        spool: SpoolPolicy | None = None,
        max_line: int | None = None,
    ) -> Generator[tuple[int, Retrieved], None, None]:
        """RETR every message in order, yielding ``(msg_num, Retrieved)``.

        With PIPELINING (RFC 2449 §6.6) up to :data:`PIPELINE_WINDOW` RETRs are in flight, so
        the server streams the next mail while the caller decodes this one and a slow link
        costs a handful of round trips instead of one per mail. Without it, one at a time.
        Each body is hashed while it arrives and, past ``spool.threshold``, written to a spool
        file (connector/protocol/spool.py). A body over ``limit`` bytes, or with a line over
        ``max_line`` octets, is read to its end and dropped (``Retrieved.refused``): the
        session stays in step. The caller closes each Retrieved (spool files). Closing the
        iterator early (or an error) reads and drops the responses still in flight.
        """
        self._require("RETR", SessionState.TRANSACTION)
        queue = list(msg_nums)
        window = window or (PIPELINE_WINDOW if self.pipelining else 1)
        sent = received = 0
        try:
            sent = self._refill(b"RETR", queue, sent, received, window)
            while received < len(queue):
                n = queue[received]
                status = self._read_status()
                received += 1
                sent = self._refill(b"RETR", queue, sent, received, window)
                if not status.ok:
                    raise self._error(f"RETR {n}", status)
                yield n, self._read_retrieved(limit, spool, max_line)
        finally:
            self._drain(sent - received)

    def dele_many(self, msg_nums: Sequence[int]) -> None:
        """DELE each message (RFC 1939 §6), pipelined when the server allows it; raises the
        first -ERR after reading every answer, so the session stays in step."""
        self._require("DELE", SessionState.TRANSACTION)
        queue = list(msg_nums)
        window = DELE_WINDOW if self.pipelining else 1
        first: Pop3Error | None = None
        sent = 0
        for answered, n in enumerate(queue):
            sent = self._refill(b"DELE", queue, sent, answered, window)
            status = self._read_status()
            if not status.ok and first is None:
                first = self._error(f"DELE {n}", status)
        if first is not None:
            raise first

    def _refill(self, keyword: bytes, queue: Sequence[int], sent: int, answered: int, window: int) -> int:
        """Pipelining's sliding window (RFC 2449 §6.6), shared by RETR and DELE: once no more
        than half of ``window`` commands are unanswered, send ``keyword`` for the next ones,
        up to a window ahead of the answers; returns how many of ``queue`` are sent now. One
        write (one TLS record, one system call) per window/2 commands instead of one per
        mail, and never fewer than window/2 commands queued at the server."""
        if sent < len(queue) and sent - answered <= window // 2:
            upto = min(answered + window, len(queue))
            self._send_numbered(keyword, queue[sent:upto])
            return upto
        return sent

    def _send_numbered(self, keyword: bytes, msg_nums: Sequence[int]) -> None:
        """``keyword msg_num`` for each message, pipelined in one write; each is shown in the
        transcript. Formatted directly: the number is checked by _msg_arg, and encode_command's
        checks for free-form arguments cost ~3 us per command (2,000 RETRs and 2,000 DELEs
        per poll-once of the bench's mailbox)."""
        for n in msg_nums:
            self._msg_arg(n)
        if self._transcript is not None:
            for n in msg_nums:
                self._transcript("C", f"{keyword.decode()} {n}")
        self._send(b"".join([b"%s %d\r\n" % (keyword, n) for n in msg_nums]))

    def retr_spooled(
        self,
        msg_num: int,
        *,
        limit: int | None = None,
        spool: SpoolPolicy | None = None,
        max_line: int | None = None,
    ) -> Retrieved:
        """RETR one message into memory or a spool file, hashed while received (see
        :meth:`retr_many` for ``limit``, ``spool`` and ``max_line``)."""
        self._require("RETR", SessionState.TRANSACTION)
        status = self._command("RETR", self._msg_arg(msg_num))
        if not status.ok:
            raise self._error(f"RETR {msg_num}", status)
        return self._read_retrieved(limit, spool, max_line)

    def _read_retrieved(self, limit: int | None, spool: SpoolPolicy | None, max_line: int | None) -> Retrieved:
        sink = BodySink(limit, spool)
        reader = MultilineReader(max_line)
        try:
            self._read_body_into(sink, reader)
        except BaseException:
            sink.abandon()
            raise
        return sink.finish(line_too_long=reader.line_too_long)

    def _drain(self, outstanding: int) -> None:
        """Read and drop the answers to commands still in flight (pipelined RETRs)."""
        try:
            for _ in range(outstanding):
                if self.state is SessionState.CLOSED:
                    return
                if self._read_status().ok:
                    self._read_body_into(lambda _piece: None)
        except ConnectorError:
            self.close()

    def dele(self, msg_num: int) -> None:
        """DELE (RFC 1939 §6): mark for deletion; only a successful QUIT removes it."""
        self._simple("DELE", self._msg_arg(msg_num))

    def rset(self) -> None:
        """RSET (RFC 1939 §6): unmark every message marked by DELE in this session."""
        self._simple("RSET")

    def noop(self) -> None:
        """NOOP (RFC 1939 §6): keep-alive."""
        self._simple("NOOP")

    # ------------------------------------------------------------------ internals

    def _require(self, command: str, *states: SessionState) -> None:
        if self.state not in states:
            if self.state is SessionState.CLOSED:
                raise Pop3ProtocolError(f"{command}: the session is closed")
            allowed = " or ".join(s.value for s in states)
            raise Pop3ProtocolError(f"{command} is not allowed in state {self.state.value} (only {allowed})")

    @staticmethod
    def _msg_arg(msg_num: int) -> str:
        if isinstance(msg_num, bool) or not isinstance(msg_num, int) or msg_num < 1:
            raise Pop3ArgumentError(f"message number must be a positive int, got {msg_num!r}")
        return str(msg_num)

    def _simple(self, command: str, *args: str) -> StatusLine:
        """A single-line TRANSACTION command; ``-ERR`` raises."""
        self._require(command, SessionState.TRANSACTION)
        status = self._command(command, *args)
        if not status.ok:
            raise self._error(" ".join((command, *args)), status)
        return status

    def _error(self, command: str, status: StatusLine, *, auth: bool = False, what: str = "") -> Pop3Error:
        """Map a ``-ERR`` status to the typed error (RFC 2449 §8, RFC 3206)."""
        raw = f"{what or command} refused by {self.host}:{self.port}: {status.describe()}"
        where = redact_addresses(raw)
        if where != raw:  # the error (logged at ERROR) shortens addresses; DEBUG has them whole
            log.debug("%s", raw)
        if _has_code(status, "IN-USE"):
            return Pop3MailboxBusyError(where)
        if _has_code(status, "LOGIN-DELAY"):
            return Pop3LoginDelayError(where)
        if _has_code(status, "SYS/TEMP"):
            return Pop3TempError(where)
        if _has_code(status, "SYS/PERM"):
            return Pop3PermError(where)
        hint = self._unencrypted_login_hint(status) if auth else ""
        if _has_code(status, "AUTH"):
            return Pop3AuthError(where + hint)
        if auth:
            # RFC 3206 §4: without AUTH-RESP-CODE a bare -ERR to a login is ambiguous: bad
            # credentials, or a locked/busy maildrop (older servers, and the "authentication
            # warnings" of BizTalk's adapter). The scheduler retries a few times before it
            # treats it as bad credentials.
            caps = self._caps or {}
            if status.code is None and "AUTH-RESP-CODE" not in caps:
                return Pop3LoginRefusedError(
                    where + " (the server gives no reason code: busy mailbox or bad credentials)" + hint
                )
            return Pop3AuthError(where + hint)
        return Pop3CommandError(command, status.describe())

    def _unencrypted_login_hint(self, status: StatusLine) -> str:
        """The likely cause of a refused login on an unencrypted connection, and the fix.

        A server configured to refuse plaintext passwords before TLS (RFC 2595 §2.2 requires
        servers to offer that setting; Dovecot's disable_plaintext_auth) answers USER, PLAIN and
        LOGIN with ``[AUTH]`` (RFC 3206), the code a wrong password gets: the message has to
        tell the two apart.
        """
        if self.is_tls:
            return ""
        if "plaintext" in status.text.lower():
            return f"; the server refuses logins over an unencrypted connection: {PLAINTEXT_FIX}"
        return f"; the connection is not encrypted and many servers refuse logins without TLS: if so, {PLAINTEXT_FIX}"

    def _command(self, name: str, *args: str, _before_reply: Callable[[], None] | None = None) -> StatusLine:
        """Send one command and read its status line (the body, if any, is the caller's)."""
        if self.state is SessionState.CLOSED:
            raise Pop3ProtocolError(f"{name}: the session is closed")
        data = encode_command(name, *args)
        if self._transcript is not None:
            shown = f"{name} ***" if name.upper() == "PASS" else data[:-2].decode("utf-8", "replace")
            self._transcript("C", shown)
        self._send(data)
        if _before_reply is not None:
            _before_reply()  # crash-injection point: the command is on the wire, the reply unread
        return self._read_status()

    def _read_line(self) -> bytes:
        """One line from the server (status or SASL continuation), length-limited."""
        try:
            line = self._buffer.next_line()
            while line is None:
                self._buffer.feed(self._transport.recv())
                line = self._buffer.next_line()
        except ConnectorError:
            self.close()
            raise
        if self._transcript is not None:
            shown = line.rstrip(b"\r\n").decode("utf-8", "replace")
            self._transcript("S", "+ ***" if line.startswith(b"+ ") else shown)
        return line

    def _parse(self, line: bytes) -> StatusLine:
        try:
            return parse_status(line)
        except ConnectorError:
            self.close()
            raise

    def _read_status(self) -> StatusLine:
        return self._parse(self._read_line())

    def _read_body(self) -> bytes:
        pieces: list[bytes] = []
        self._read_body_into(pieces.append)
        return b"".join(pieces)

    def _read_body_into(self, sink: Callable[[bytes], None], reader: MultilineReader | None = None) -> int:
        """Stream one multi-line body (RFC 1939 §3) into ``sink``; returns the byte count."""
        reader = reader or MultilineReader()
        total = 0
        try:
            data = self._buffer.take()
            while True:
                if data:
                    piece = reader.feed(data)
                    if piece:
                        total += len(piece)
                        sink(piece)
                    if reader.done:
                        break
                data = self._transport.recv()
        except BaseException:
            self.close()
            raise
        self._buffer.unread(reader.leftover)
        return total
