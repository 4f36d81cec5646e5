"""Blocking socket transport for POP3: TCP connect, implicit TLS, STLS upgrade, bulk reads.

This is the only module that touches ``socket`` and ``ssl``. Every exception they raise
is translated here (``raise ... from exc``):

* ``TimeoutError`` (``socket.timeout``)             -> :class:`~connector.errors.Pop3TimeoutError`
* ``ssl.SSLError`` during the TLS handshake          -> :class:`~connector.errors.Pop3TlsError`
* any other ``OSError`` (DNS, refused, reset, EOF)   -> :class:`~connector.errors.Pop3ConnectError`

Reads are ``recv_into`` a reusable :data:`RECV_SIZE` buffer, never ``readline``: framing is the
sans-IO core's job (:mod:`connector.protocol.core`). Over plain TCP one ``recv`` returns up
to :data:`RECV_SIZE`; over TLS a read returns one TLS record (at most 16 KiB; Dovecot sends
~4 KiB ones), so ``recv`` adds the records already received, without waiting, up to
:data:`TLS_GATHER_BYTES`: the layers above then work per ~64 KiB instead of per record.

The timeout is per socket operation (an inactivity timeout), not per command: a 50 MB
RETR may take longer than ``timeout`` as long as bytes keep arriving. On top of it a caller
may set a *time limit* for everything the current thread does on POP3 connections
(:func:`time_limit`): a server that trickles a byte every few seconds never trips the
inactivity timeout, but it must not hold a shard's transaction open until the broker aborts
it for every mailbox in the round (connector/runtime/exactly_once.py).

Per-mailbox TLS policy that the handshake itself cannot express travels on the context
(:class:`TlsContext`, built by :func:`make_tls_context`): the name to verify (and send as
SNI) instead of the host connected to, and a SHA-256 pin of the server's leaf certificate,
checked after every handshake (implicit TLS and STLS alike).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import logging
import re
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Final, NoReturn

from connector.errors import ConfigError, Pop3ConnectError, Pop3TimeoutError, Pop3TlsError

__all__ = [
    "RECV_SIZE",
    "TLS_FIX_HINT",
    "TlsContext",
    "Transport",
    "format_fingerprint",
    "make_tls_context",
    "parse_fingerprint",
    "sni_name",
    "time_limit",
]

log = logging.getLogger("pop3kafka.tls")

#: Bytes asked for per recv(). 256 KiB keeps syscalls per 50 MB mail in the hundreds.
RECV_SIZE: Final = 256 * 1024
#: Over TLS, recv() gathers records that have arrived already up to this many bytes (see the
#: module docstring). Not more: a chunk holding many pipelined mails is copied once per mail
#: end (the leftover after each terminator).
TLS_GATHER_BYTES: Final = 64 * 1024
#: Linux's TCP_QUICKACK option number; None where the platform has none.
_TCP_QUICKACK: Final[int | None] = getattr(socket, "TCP_QUICKACK", None)
TLS_FIX_HINT: Final = "set tls_ca_file or check the server certificate"

_TLS_VERSIONS: Final = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
#: Only with ``legacy=True``: servers stuck on TLS 1.0/1.1.
_LEGACY_VERSIONS: Final = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
}
#: OpenSSL cipher string for ``legacy=True``: security level 0 admits SHA-1 signatures,
#: RSA keys under 2048 bits and the CBC suites TLS 1.0/1.1 servers speak.
LEGACY_CIPHERS: Final = "DEFAULT:@SECLEVEL=0"

_FINGERPRINT_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_FINGERPRINT_HINT: Final = (
    "if the certificate was renewed, check the new one out of band and update tls_fingerprint_sha256 "
    "(openssl x509 -noout -fingerprint -sha256 -in CERT.pem)"
)
# OpenSSL X509_V_ERR_HOSTNAME_MISMATCH / X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH_CODES: Final = frozenset({62, 64})

#: (time.monotonic() by which POP3 I/O of this thread must end, what set it); None: no limit.
#: A ContextVar, so each session thread (and each asyncio task, should one ever call us) has
#: its own.
_LIMIT: ContextVar[tuple[float, str] | None] = ContextVar("pop3_time_limit", default=None)


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Within the block, every connect/send/recv of this thread ends by ``seconds`` from now:
    the socket timeout is cut to what is left, and once nothing is left the operation raises
    :class:`~connector.errors.Pop3TimeoutError` naming ``what`` (e.g. "the fetch phase of a
    shard round (0.8 x delivery.transaction_timeout_seconds)"). ``None``: no limit."""
    token = _LIMIT.set(None if seconds is None else (time.monotonic() + seconds, what))
    try:
        yield
    finally:
        _LIMIT.reset(token)


def _left() -> tuple[float, str] | None:
    """(seconds left, what set the limit) of the current limit, or None."""
    limit = _LIMIT.get()
    if limit is None:
        return None
    return limit[0] - time.monotonic(), limit[1]


def parse_fingerprint(text: str) -> bytes:
    """The 32 bytes of a SHA-256 fingerprint written as hex, colons allowed, any case.

    ``"AB:CD:..."`` (openssl's format) and ``"abcd..."`` are both accepted. Raises
    ValueError when it is not 64 hex digits.
    """
    digits = text.strip().replace(":", "")
    if not _FINGERPRINT_RE.match(digits):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
    return bytes.fromhex(digits)


def format_fingerprint(digest: bytes) -> str:
    """``AB:CD:...`` as ``openssl x509 -fingerprint -sha256`` prints it."""
    return digest.hex(":").upper()


def sni_name(name: str) -> str:
    """The ``server_hostname`` to hand to ``wrap_socket`` for ``name`` (a host or IP literal).

    An IP literal (``127.0.0.1``, ``::1``, ``[::1]``, ``fe80::1%eth0``) is normalised to the
    bare address: CPython then verifies it against the certificate's IP SANs and sends no
    SNI at all (RFC 6066 §3 forbids literal addresses in SNI). A scope id or brackets would
    defeat OpenSSL's IP parsing and leak the literal into SNI, hence the normalisation.
    """
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        address = ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        return name
    return str(address)


class TlsContext(ssl.SSLContext):
    """An ``SSLContext`` that also carries the per-mailbox checks :class:`Transport` applies.

    * ``server_name``: verify the certificate against (and send as SNI) this name instead of
      the host connected to; None = the host.
    * ``fingerprint_sha256``: 32 bytes; after the handshake the SHA-256 of the server's leaf
      certificate (DER) must equal it, in addition to normal verification (or alone when
      verification is off). None = no pinning.
    """

    server_name: str | None = None
    fingerprint_sha256: bytes | None = None


def make_tls_context(
    ca_file: str | None,
    verify: bool = True,
    min_version: str = "TLSv1.2",
    *,
    server_name: str | None = None,
    fingerprint_sha256: str | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    client_key_password: str | None = None,
    legacy: bool = False,
    mailbox: str | None = None,
) -> TlsContext:
    """Build the client ``SSLContext`` for POP3S / STLS.

    * ``verify=True`` (default): the server certificate must chain to ``ca_file`` (PEM), or
      to the system trust store when ``ca_file`` is None, and match the host name
      (``check_hostname``; IP addresses are matched against IP SANs).
    * ``verify=False`` disables both checks: only for tests against throwaway servers (or
      together with ``fingerprint_sha256``, which then is the only check).
    * ``min_version``: ``"TLSv1.2"`` (default) or ``"TLSv1.3"``; ``"TLSv1"``/``"TLSv1.1"``
      only with ``legacy``.
    * ``server_name``: the name to verify and send as SNI instead of the host (see
      :func:`sni_name` for IP literals).
    * ``fingerprint_sha256``: pin of the server's leaf certificate (:func:`parse_fingerprint`).
    * ``client_cert``/``client_key``/``client_key_password``: a client certificate (PEM) for
      servers that require one; the key may be inside ``client_cert``.
    * ``legacy``: opt-in for old servers: TLS 1.0/1.1 allowed (unless ``min_version`` says
      otherwise) and :data:`LEGACY_CIPHERS`. Logs a WARNING naming ``mailbox`` at each build.

    Raises :class:`~connector.errors.ConfigError` naming the bad value (unknown version,
    unreadable or invalid CA file, client certificate or key, bad fingerprint).
    """
    versions = {**_TLS_VERSIONS, **_LEGACY_VERSIONS} if legacy else _TLS_VERSIONS
    if min_version not in versions:
        extra = " (TLSv1 and TLSv1.1 need tls_legacy: true)" if min_version in _LEGACY_VERSIONS else ""
        raise ConfigError(f"TLS minimum version {min_version!r} is not one of {sorted(versions)}{extra}")
    pin: bytes | None = None
    if fingerprint_sha256 is not None:
        try:
            pin = parse_fingerprint(fingerprint_sha256)
        except ValueError as exc:
            raise ConfigError(f"tls_fingerprint_sha256: {exc}") from None
    if client_key is not None and client_cert is None:
        raise ConfigError("tls_client_key is set without tls_client_cert")
    ctx = TlsContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname=True, CERT_REQUIRED
    ctx.server_name = server_name
    ctx.fingerprint_sha256 = pin
    if legacy:
        who = f"mailbox {mailbox!r}" if mailbox else "a mailbox"
        log.warning(
            "%s: tls_legacy is on: TLS down to %s and weak ciphers/keys (%s) are accepted; "
            "turn it off once the server is upgraded",
            who,
            min_version,
            LEGACY_CIPHERS,
            extra={"mailbox": mailbox},
        )
        ctx.set_ciphers(LEGACY_CIPHERS)
        with warnings.catch_warnings():  # CPython deprecates TLSv1/1.1: this is the explicit opt-in
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = versions[min_version]
    else:
        ctx.minimum_version = versions[min_version]
    if verify:
        try:
            if ca_file is None:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
            else:
                ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:  # FileNotFoundError, PermissionError, bad PEM
            raise ConfigError(f"tls_ca_file {ca_file!r} cannot be loaded: {exc}") from exc
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if client_cert is not None:
        _load_client_cert(ctx, client_cert, client_key, client_key_password)
    return ctx


class _KeyPasswordMissingError(Exception):
    """Raised from the password callback: never let OpenSSL prompt on a terminal."""


def _load_client_cert(ctx: ssl.SSLContext, cert: str, key: str | None, password: str | None) -> None:
    def give_password() -> str:
        if password is None:
            raise _KeyPasswordMissingError
        return password

    where = f"tls_client_cert {cert!r}" + (f" / tls_client_key {key!r}" if key is not None else "")
    try:
        ctx.load_cert_chain(cert, key, password=give_password)
    except _KeyPasswordMissingError:
        raise ConfigError(
            f"{'tls_client_key' if key is not None else 'tls_client_cert'}: the private key is encrypted; "
            "set tls_client_key_password"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{where}: the private key does not belong to the certificate") from None
        causes = "wrong tls_client_key_password, or not PEM" if password else "not a PEM certificate and private key"
        raise ConfigError(f"{where} cannot be loaded ({causes}): {exc}") from None
    except FileNotFoundError as exc:
        raise ConfigError(f"{where}: {exc.filename!r} does not exist") from None
    except OSError as exc:  # PermissionError, a directory...
        raise ConfigError(f"{where} cannot be read: {exc.strerror or exc}") from None


def _tls_error(
    host: str, port: int, exc: ssl.SSLError, server_name: str | None = None, what: str = "TLS handshake failed"
) -> Pop3TlsError:
    hint = TLS_FIX_HINT
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or str(exc)
        what = "certificate verification failed"
        if exc.verify_code in _NAME_MISMATCH_CODES:
            hint += "; or set tls_server_name to a name the certificate lists"
    else:
        reason = exc.reason or str(exc)
        if "CERTIFICATE_REQUIRED" in str(reason).upper():
            hint = "the server requires a client certificate: set tls_client_cert and tls_client_key"
    as_name = f" (verifying as {server_name!r})" if server_name is not None and server_name != host else ""
    return Pop3TlsError(f"{what} for {host}:{port}{as_name}: {reason}; {hint}")


class Transport:
    """One connected socket (plain or TLS). Blocking; not thread-safe.

    Build with :meth:`connect`; ``start_tls`` upgrades in place (RFC 2595 STLS). After
    :meth:`close` every call raises :class:`~connector.errors.Pop3ConnectError`.
    """

    __slots__ = ("_buf", "_sock", "_timeout", "_view", "host", "port")

    def __init__(self, sock: socket.socket, host: str, port: int) -> None:
        """Wrap an already connected socket (tests use ``socket.socketpair()``)."""
        self._sock: socket.socket | None = sock
        self.host = host
        self.port = port
        #: the inactivity timeout asked for (the socket's may be cut shorter by a time limit).
        self._timeout = sock.gettimeout()
        # One receive buffer for the connection's lifetime: recv(RECV_SIZE) would allocate
        # (and shrink) a 256 KiB object per call, which measured ~2x the client CPU of
        # recv_into + copy for 20 KB mails over TLS (bench/pop3_retr.py).
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)

    @classmethod
    def connect(cls, host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None = None) -> Transport:
        """Open TCP to ``host:port`` and, with ``ssl_context``, do implicit TLS (POP3S, RFC 8314).

        TCP_NODELAY is set: our commands are single writes, but without it Nagle plus the
        server's delayed ACK cost ~40 ms per exchange on some stacks (measured 44 ms with
        GNU pop3d). TCP_QUICKACK (Linux) is set too and re-armed before each command.
        """
        left = _left()
        if left is not None and left[0] <= 0:
            raise Pop3TimeoutError(f"not connecting to {host}:{port}: {left[1]} ran out")
        try:
            sock = socket.create_connection((host, port), timeout=timeout if left is None else min(timeout, left[0]))
        except TimeoutError as exc:
            raise Pop3TimeoutError(f"connecting to {host}:{port} timed out after {timeout:g}s") from exc
        except OSError as exc:
            raise Pop3ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        with contextlib.suppress(OSError):  # only fails on exotic socket types
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        transport = cls(sock, host, port)
        transport._quickack()
        if ssl_context is not None:
            transport.start_tls(ssl_context)
        return transport

    @property
    def is_tls(self) -> bool:
        """True once the socket is wrapped in TLS."""
        return isinstance(self._sock, ssl.SSLSocket)

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise Pop3ConnectError(f"connection to {self.host}:{self.port} is closed")
        return self._sock

    def _quickack(self) -> None:
        # TCP_QUICKACK is not sticky on Linux (the kernel may fall back to delayed ACKs),
        # hence re-armed per command and per read. Absent on non-Linux: silently skipped.
        sock = self._sock
        if _TCP_QUICKACK is not None and sock is not None:
            # try/except, not contextlib.suppress: this runs after every read.
            try:  # noqa: SIM105
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                pass  # not a TCP socket (tests use socketpair): nothing to re-arm

    def start_tls(self, ssl_context: ssl.SSLContext) -> None:
        """Wrap the socket in TLS and handshake now, verifying against ``self.host``.

        Used for implicit TLS right after connect and for STLS (RFC 2595 §4) right after
        the server's ``+OK``. Handshake and verification failures raise
        :class:`~connector.errors.Pop3TlsError` naming host:port, the reason and the fix.
        A :class:`TlsContext` may name another host to verify (``server_name``) and pin the
        leaf certificate (``fingerprint_sha256``, checked here after the handshake).
        """
        sock = self._require()
        if isinstance(sock, ssl.SSLSocket):
            raise Pop3TlsError(f"connection to {self.host}:{self.port} is already TLS")
        self._apply_limit(sock)
        server_name = ssl_context.server_name if isinstance(ssl_context, TlsContext) else None
        try:
            tls_sock = ssl_context.wrap_socket(sock, server_hostname=sni_name(server_name or self.host))
            self._sock = tls_sock
        except ssl.SSLError as exc:
            self.close()
            raise _tls_error(self.host, self.port, exc, server_name) from exc
        except TimeoutError as exc:
            self.close()
            raise Pop3TimeoutError(self._timed_out(f"TLS handshake with {self.host}:{self.port} timed out")) from exc
        except OSError as exc:  # reset / EOF during the handshake
            self.close()
            raise Pop3TlsError(f"TLS handshake with {self.host}:{self.port} failed: {exc}; {TLS_FIX_HINT}") from exc
        if isinstance(ssl_context, TlsContext) and ssl_context.fingerprint_sha256 is not None:
            self._check_pin(tls_sock, ssl_context.fingerprint_sha256)

    def peer_not_after(self) -> float | None:
        """Unix time at which the server's certificate expires (its notAfter), or None (no TLS,
        or no certificate). Read from the DER, so it works with verification off too."""
        sock = self._sock
        if not isinstance(sock, ssl.SSLSocket):
            return None
        try:
            # Verified (the default): the ssl module has parsed the certificate already, and
            # cryptography's x509 (~15 ms to import) is needed only when verification is off.
            parsed = sock.getpeercert()
            if parsed and isinstance(parsed.get("notAfter"), str):
                return float(ssl.cert_time_to_seconds(str(parsed["notAfter"])))
            der = sock.getpeercert(binary_form=True)
        except (ValueError, OSError):
            return None
        if not der:
            return None
        from cryptography import x509  # noqa: PLC0415 - only unverified TLS sessions need it

        try:
            return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
        except ValueError:
            return None

    def _check_pin(self, sock: ssl.SSLSocket, expected: bytes) -> None:
        der = sock.getpeercert(binary_form=True)
        got = hashlib.sha256(der).digest() if der else b""
        if not hmac.compare_digest(got, expected):
            self.close()
            shown = format_fingerprint(got) if got else "no certificate"
            raise Pop3TlsError(
                f"certificate fingerprint mismatch for {self.host}:{self.port}: tls_fingerprint_sha256 expects "
                f"{format_fingerprint(expected)}, the server presented {shown}; {_FINGERPRINT_HINT}"
            )

    def _apply_limit(self, sock: socket.socket) -> None:
        """Cut the socket timeout to the thread's time limit (see :func:`time_limit`); raise
        when it has run out. Without a limit, or with one further away than the inactivity
        timeout, the inactivity timeout applies.

        Called before every read and write, so the socket is only touched when its timeout
        must change: settimeout() is a system call, and a pipelined RETR of 20 KB mails over
        TLS reads ~8 times per mail (bench/results/compare.md, "Profile")."""
        limit = _LIMIT.get()
        if limit is not None:
            left = limit[0] - time.monotonic()
            if left <= 0:
                self.close()
                raise Pop3TimeoutError(f"{self.host}:{self.port}: {limit[1]} ran out; the session was dropped")
            if self._timeout is None or left < self._timeout:
                sock.settimeout(left)
                return
        if sock.gettimeout() != self._timeout:
            sock.settimeout(self._timeout)

    def _timed_out(self, inactivity: str) -> str:
        left = _left()
        if left is not None and left[0] <= 0.001:
            return f"{self.host}:{self.port}: {left[1]} ran out; the session was dropped"
        return inactivity

    def _io_failed(self, exc: OSError, timed_out: str, failed: str) -> NoReturn:
        """Translate a socket error of one send/recv; the framing is lost, so close first."""
        if isinstance(exc, TimeoutError):
            message = self._timed_out(timed_out)
            self.close()
            raise Pop3TimeoutError(message) from exc
        self.close()
        if isinstance(exc, ssl.SSLError):
            if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)):
                raise Pop3ConnectError(f"{failed}: {exc}") from exc
            # A TLS alert after the handshake: with TLS 1.3 the server checks the client
            # certificate only after the client's Finished, so its refusal lands here.
            raise _tls_error(self.host, self.port, exc, what="TLS error") from exc
        raise Pop3ConnectError(f"{failed}: {exc}") from exc

    def send(self, data: bytes) -> None:
        """Send all of ``data`` (one command: a single write, so Nagle never delays it)."""
        sock = self._require()
        self._apply_limit(sock)
        self._quickack()
        try:
            sock.sendall(data)
        except OSError as exc:  # TimeoutError and ssl.SSLError are OSErrors
            where = f"{self.host}:{self.port}"
            self._io_failed(exc, f"sending to {where} timed out", f"sending to {where} failed")

    def recv(self) -> bytes:
        """Return the next bytes received (1..RECV_SIZE of them); never ``b""``.

        End of stream raises Pop3ConnectError (a POP3 server never closes mid-response
        legitimately); timeouts raise Pop3TimeoutError. Either way the transport is closed,
        since the response framing is lost.
        """
        # The hot path of every retrieval: no context managers, no message formatting
        # unless something failed (both measured in bench/results/compare.md, "Profile").
        sock = self._sock
        if sock is None:
            sock = self._require()
        self._apply_limit(sock)
        try:
            n = sock.recv_into(self._buf)
        except OSError as exc:
            where = f"{self.host}:{self.port}"
            self._io_failed(exc, f"{where} did not answer in time", f"receiving from {where} failed")
        if not n:
            self.close()
            raise Pop3ConnectError(f"connection closed by {self.host}:{self.port}")
        if n < TLS_GATHER_BYTES and isinstance(sock, ssl.SSLSocket):
            n = self._gather(sock, n)
        # Linux leaves quick-ACK mode while data arrives; a server that writes a body and its
        # final "." separately (GNU pop3d) would then wait ~40 ms for our delayed ACK (Nagle
        # on its side) on every response. Re-arming after each read keeps ACKs immediate.
        self._quickack()
        return bytes(self._view[:n])

    def _gather(self, sock: ssl.SSLSocket, n: int) -> int:
        """After a TLS read of ``n`` bytes: add the records that have arrived already, never
        waiting for more, until :data:`TLS_GATHER_BYTES`. Measured on 2,000 x 24 KB mails
        over POP3S: 13,500 reads became ~800 (docs/decisions/0001, "Second round").

        A timeout of 0 makes a read that would wait raise SSLWantReadError instead; the socket
        is non-blocking underneath either way (Python implements timeouts with poll()), so
        only the bookkeeping changes. An error or the end of the stream stops the gathering
        and is met again by the next recv(), which reports it."""
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            while n < TLS_GATHER_BYTES:
                got = sock.recv_into(self._view[n:TLS_GATHER_BYTES])
                if not got:
                    break
                n += got
        except OSError:  # SSLWantReadError (nothing more yet) or a failure the next recv() meets
            pass
        finally:
            sock.settimeout(timeout)
        return n

    def settimeout(self, timeout: float | None) -> None:
        """Change the per-operation (inactivity) timeout."""
        self._timeout = timeout
        self._require().settimeout(timeout)

    def close(self) -> None:
        """Drop the connection without any protocol exchange; never raises, idempotent."""
        target, self._sock = self._sock, None
        if target is not None:
            with contextlib.suppress(OSError):
                target.close()
