"""Blocking socket transport for POP3: TCP connect, implicit TLS, STLS upgrade, bulk reads.

This is the only module that touches ``socket`` and ``ssl``. Every exception they raise
is translated here (``raise ... from exc``):

* ``TimeoutError`` (``socket.timeout``)             -> :class:`~connector.errors.Pop3TimeoutError`
* ``ssl.SSLError`` during the TLS handshake          -> :class:`~connector.errors.Pop3TlsError`
* any other ``OSError`` (DNS, refused, reset, EOF)   -> :class:`~connector.errors.Pop3ConnectError`

Reads are ``recv_into`` a reusable :data:`RECV_SIZE` buffer, never ``readline``: framing is the
sans-IO core's job (:mod:`connector.protocol.core`). Over TLS one ``recv`` returns at
most one TLS record (16 KiB); over plain TCP up to :data:`RECV_SIZE`.

The timeout is per socket operation (an inactivity timeout), not per command: a 50 MB
RETR may take longer than ``timeout`` as long as bytes keep arriving.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from typing import Final

from connector.errors import ConfigError, Pop3ConnectError, Pop3TimeoutError, Pop3TlsError

__all__ = ["RECV_SIZE", "TLS_FIX_HINT", "Transport", "make_tls_context"]

#: Bytes asked for per recv(). 256 KiB keeps syscalls per 50 MB mail in the hundreds.
RECV_SIZE: Final = 256 * 1024
TLS_FIX_HINT: Final = "set tls_ca_file or check the server certificate"

_TLS_VERSIONS: Final = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


def make_tls_context(ca_file: str | None, verify: bool = True, min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """Build the client ``SSLContext`` for POP3S / STLS.

    * ``verify=True`` (default): the server certificate must chain to ``ca_file`` (PEM), or
      to the system trust store when ``ca_file`` is None, and match the host name
      (``check_hostname``; IP addresses are matched against IP SANs).
    * ``verify=False`` disables both checks: only for tests against throwaway servers.
    * ``min_version``: ``"TLSv1.2"`` (default) or ``"TLSv1.3"``.

    Raises :class:`~connector.errors.ConfigError` naming the bad value (unknown version,
    unreadable or invalid CA file).
    """
    if min_version not in _TLS_VERSIONS:
        raise ConfigError(f"TLS minimum version {min_version!r} is not one of {sorted(_TLS_VERSIONS)}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname=True, CERT_REQUIRED
    ctx.minimum_version = _TLS_VERSIONS[min_version]
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
    return ctx


def _tls_error(host: str, port: int, exc: ssl.SSLError) -> Pop3TlsError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or str(exc)
        what = "certificate verification failed"
    else:
        reason = exc.reason or str(exc)
        what = "TLS handshake failed"
    return Pop3TlsError(f"{what} for {host}:{port}: {reason}; {TLS_FIX_HINT}")


class Transport:
    """One connected socket (plain or TLS). Blocking; not thread-safe.

    Build with :meth:`connect`; ``start_tls`` upgrades in place (RFC 2595 STLS). After
    :meth:`close` every call raises :class:`~connector.errors.Pop3ConnectError`.
    """

    __slots__ = ("_buf", "_sock", "_view", "host", "port")

    def __init__(self, sock: socket.socket, host: str, port: int) -> None:
        """Wrap an already connected socket (tests use ``socket.socketpair()``)."""
        self._sock: socket.socket | None = sock
        self.host = host
        self.port = port
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
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError as exc:
            raise Pop3TimeoutError(f"connecting to {host}:{port} timed out after {timeout:g}s") from exc
        except OSError as exc:
            raise Pop3ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        with contextlib.suppress(OSError):  # only fails on exotic socket types
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
        # hence re-armed per command. Absent on non-Linux: silently skipped.
        opt = getattr(socket, "TCP_QUICKACK", None)
        if opt is not None and self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, opt, 1)

    def start_tls(self, ssl_context: ssl.SSLContext) -> None:
        """Wrap the socket in TLS and handshake now, verifying against ``self.host``.

        Used for implicit TLS right after connect and for STLS (RFC 2595 §4) right after
        the server's ``+OK``. Handshake and verification failures raise
        :class:`~connector.errors.Pop3TlsError` naming host:port, the reason and the fix.
        """
        sock = self._require()
        if isinstance(sock, ssl.SSLSocket):
            raise Pop3TlsError(f"connection to {self.host}:{self.port} is already TLS")
        try:
            self._sock = ssl_context.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLError as exc:
            self.close()
            raise _tls_error(self.host, self.port, exc) from exc
        except TimeoutError as exc:
            self.close()
            raise Pop3TimeoutError(f"TLS handshake with {self.host}:{self.port} timed out") from exc
        except OSError as exc:  # reset / EOF during the handshake
            self.close()
            raise Pop3TlsError(f"TLS handshake with {self.host}:{self.port} failed: {exc}; {TLS_FIX_HINT}") from exc

    @contextlib.contextmanager
    def _io(self, timed_out: str, failed: str) -> Iterator[None]:
        """Translate socket errors of one send/recv; the framing is lost, so close first."""
        try:
            yield
        except TimeoutError as exc:
            self.close()
            raise Pop3TimeoutError(timed_out) from exc
        except OSError as exc:
            self.close()
            raise Pop3ConnectError(f"{failed}: {exc}") from exc

    def send(self, data: bytes) -> None:
        """Send all of ``data`` (one command: a single write, so Nagle never delays it)."""
        sock = self._require()
        self._quickack()
        with self._io(f"sending to {self.host}:{self.port} timed out", f"sending to {self.host}:{self.port} failed"):
            sock.sendall(data)

    def recv(self) -> bytes:
        """Return the next bytes received (1..RECV_SIZE of them); never ``b""``.

        End of stream raises Pop3ConnectError (a POP3 server never closes mid-response
        legitimately); timeouts raise Pop3TimeoutError. Either way the transport is closed,
        since the response framing is lost.
        """
        sock = self._require()
        with self._io(
            f"{self.host}:{self.port} did not answer in time", f"receiving from {self.host}:{self.port} failed"
        ):
            n = sock.recv_into(self._buf)
        if not n:
            self.close()
            raise Pop3ConnectError(f"connection closed by {self.host}:{self.port}")
        return bytes(self._view[:n])

    def settimeout(self, timeout: float | None) -> None:
        """Change the per-operation timeout."""
        self._require().settimeout(timeout)

    def close(self) -> None:
        """Drop the connection without any protocol exchange; never raises, idempotent."""
        target, self._sock = self._sock, None
        if target is not None:
            with contextlib.suppress(OSError):
                target.close()
