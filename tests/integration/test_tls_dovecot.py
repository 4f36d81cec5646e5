"""Per-mailbox TLS options against the real Dovecot (POP3S and STLS).

Dovecot's certificate (deploy/local/localstack.py) names DNS:localhost, IP:127.0.0.1 and
IP:::1. What the client sends as SNI is observed on the wire: a small TCP forwarder in
front of Dovecot's POP3S port parses each ClientHello before passing it on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.config import parse_config
from connector.config.model import MailboxConfig
from connector.errors import Pop3TlsError
from connector.protocol import Pop3Session
from connector.protocol.transport import format_fingerprint
from connector.runtime.login import login
from connector.runtime.sessions import open_session

pytestmark = pytest.mark.integration

USER = "t3"


# ---------------------------------------------------------------------------- helpers


def mailbox(services, tls: str = "implicit", **extra: Any) -> MailboxConfig:  # type: ignore[no-untyped-def]
    port = services.dovecot.pop3s_port if tls == "implicit" else services.dovecot.pop3_port
    m = {
        "id": "tls",
        "host": "127.0.0.1",
        "port": port,
        "tls": tls,
        "tls_ca_file": services.cafile,
        "username": USER,
        "password": {"env": "PW_TLS"},
        "timeout_seconds": 10,
        **extra,
    }
    cfg = parse_config(
        {"kafka": {"bootstrap_servers": "x:1"}, "topics": {"mail": "m"}, "mailboxes": [m]},
        environ={"PW_TLS": f"{USER}-pw", **os.environ},
    )
    return cfg.mailboxes[0]


def tls_socket(session: Pop3Session) -> ssl.SSLSocket:
    """The client's TLS socket (a peek inside the transport, for assertions only)."""
    sock = session._transport._sock
    assert isinstance(sock, ssl.SSLSocket)
    return sock


def log_in_and_out(mb: MailboxConfig) -> tuple[str | None, str | None]:
    """Connect, log in, STAT, QUIT; returns the client socket's TLS version and server_hostname."""
    session = open_session(mb)
    assert isinstance(session, Pop3Session)
    try:
        sock = tls_socket(session)
        seen = (sock.version(), sock.server_hostname)
        login(session, mb)
        session.stat()  # TRANSACTION state: the session really works
        session.quit()
    finally:
        session.abort()
    return seen


def dovecot_fingerprint(services) -> str:  # type: ignore[no-untyped-def]
    pem = (Path(services.dovecot.dir) / "tls" / "server.pem").read_text()
    return format_fingerprint(hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).digest())


def client_hello_sni(record: bytes) -> str | None:
    """The host_name of the server_name extension (RFC 6066 §3) in a ClientHello record, or None."""
    assert record[0] == 0x16, "not a TLS handshake record"
    body = record[5:]
    assert body[0] == 0x01, "not a ClientHello"
    i = 4 + 2 + 32  # handshake header, legacy_version, random
    i += 1 + body[i]  # legacy_session_id
    i += 2 + int.from_bytes(body[i : i + 2], "big")  # cipher_suites
    i += 1 + body[i]  # legacy_compression_methods
    end = i + 2 + int.from_bytes(body[i : i + 2], "big")
    i += 2
    while i < end:
        ext_type = int.from_bytes(body[i : i + 2], "big")
        ext_len = int.from_bytes(body[i + 2 : i + 4], "big")
        data = body[i + 4 : i + 4 + ext_len]
        i += 4 + ext_len
        if ext_type == 0:  # server_name: list length(2), name_type(1) = host_name, length(2), name
            assert data[2] == 0
            return data[5 : 5 + int.from_bytes(data[3:5], "big")].decode("ascii")
    return None


class HelloTap:
    """TCP forwarder to 127.0.0.1:``target`` recording the SNI of every ClientHello through it."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sni: list[str | None] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._listener.accept()
                t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
                self._threads.append(t)
                t.start()

    @staticmethod
    def _read_exactly(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = sock.recv(n - len(data))
            if not more:
                raise ConnectionError("client closed before a full ClientHello")
            data += more
        return data

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn, socket.create_connection(("127.0.0.1", self.target), timeout=10) as upstream:
            header = self._read_exactly(conn, 5)
            record = header + self._read_exactly(conn, int.from_bytes(header[3:5], "big"))
            self.sni.append(client_hello_sni(record))
            upstream.sendall(record)
            back = threading.Thread(target=self._pump, args=(upstream, conn), daemon=True)
            back.start()
            self._pump(conn, upstream)
            back.join(10)

    def close(self) -> None:
        self._listener.close()
        for t in self._threads:
            t.join(10)


@pytest.fixture
def tap(services) -> Iterator[HelloTap]:  # type: ignore[no-untyped-def]
    t = HelloTap(services.dovecot.pop3s_port)
    try:
        yield t
    finally:
        t.close()


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CA that did not sign Dovecot's certificate."""
    d = tmp_path_factory.mktemp("foreign-ca")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
         "-subj", "/CN=foreign CA", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(d / "ca.pem")


# ---------------------------------------------------------------------------- server name and SNI


def test_connect_by_ip_verifies_ip_san_and_sends_no_sni(services, tap: HelloTap) -> None:  # type: ignore[no-untyped-def]
    _, verified_as = log_in_and_out(mailbox(services, port=tap.port))
    assert tap.sni == [None]  # RFC 6066 §3: no IP literal in SNI, none at all
    assert verified_as == "127.0.0.1"  # the certificate was checked against its IP SAN


def test_server_name_is_verified_and_sent_as_sni(services, tap: HelloTap) -> None:  # type: ignore[no-untyped-def]
    _, verified_as = log_in_and_out(mailbox(services, port=tap.port, tls_server_name="localhost"))
    assert tap.sni == ["localhost"]
    assert verified_as == "localhost"


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_wrong_server_name(services, tls: str) -> None:  # type: ignore[no-untyped-def]
    mb = mailbox(services, tls, tls_server_name="wrong.example")
    with pytest.raises(Pop3TlsError) as e:
        open_session(mb)
    msg = str(e.value)
    assert f"certificate verification failed for 127.0.0.1:{mb.port} (verifying as 'wrong.example')" in msg
    assert "Hostname mismatch, certificate is not valid for 'wrong.example'" in msg
    assert "tls_server_name" in msg


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_unknown_ca(services, foreign_ca: str, tls: str) -> None:  # type: ignore[no-untyped-def]
    mb = mailbox(services, tls, tls_ca_file=foreign_ca)
    with pytest.raises(Pop3TlsError) as e:
        open_session(mb)
    msg = str(e.value)
    assert f"certificate verification failed for 127.0.0.1:{mb.port}" in msg
    assert "unable to get local issuer certificate" in msg and "tls_ca_file" in msg


# ---------------------------------------------------------------------------- pinning


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_pin_of_the_real_leaf_is_accepted(services, tls: str) -> None:  # type: ignore[no-untyped-def]
    log_in_and_out(mailbox(services, tls, tls_fingerprint_sha256=dovecot_fingerprint(services)))


def test_pin_alone_with_verification_off(services, foreign_ca: str) -> None:  # type: ignore[no-untyped-def]
    fp = dovecot_fingerprint(services).replace(":", "").lower()
    log_in_and_out(mailbox(services, tls_ca_file=foreign_ca, tls_verify=False, tls_fingerprint_sha256=fp))


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_wrong_pin_is_rejected(services, tls: str) -> None:  # type: ignore[no-untyped-def]
    wrong = ":".join(["5A"] * 32)
    mb = mailbox(services, tls, tls_fingerprint_sha256=wrong)
    with pytest.raises(Pop3TlsError) as e:
        open_session(mb)
    msg = str(e.value)
    assert f"certificate fingerprint mismatch for 127.0.0.1:{mb.port}" in msg
    assert f"expects {wrong}, the server presented {dovecot_fingerprint(services)}" in msg


# ---------------------------------------------------------------------------- versions


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_min_version_tls13(services, tls: str) -> None:  # type: ignore[no-untyped-def]
    version, _ = log_in_and_out(mailbox(services, tls, tls_min_version="TLSv1.3"))
    assert version == "TLSv1.3"
