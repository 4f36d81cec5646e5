"""Pop3Session against scripted fake servers on 127.0.0.1 (plain, implicit TLS, STLS); no network."""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from connector.errors import (
    ConfigError,
    Pop3ArgumentError,
    Pop3AuthError,
    Pop3CommandError,
    Pop3ConnectError,
    Pop3LoginDelayError,
    Pop3LoginRefusedError,
    Pop3MailboxBusyError,
    Pop3PermError,
    Pop3ProtocolError,
    Pop3TempError,
    Pop3TimeoutError,
    Pop3TlsError,
    Pop3UnsupportedError,
)
from connector.protocol import (
    PLAINTEXT_REFUSED,
    TLS_FIX_HINT,
    Pop3Session,
    SessionState,
    dot_stuff,
    make_tls_context,
)

# ---------------------------------------------------------------------------- scripted server

# Script steps: ("send", bytes) raw reply; ("expect", bytes) one client line without CRLF;
# ("starttls",) server side of a TLS handshake; ("sleep", seconds); ("close",).
Step = tuple[str, ...] | tuple[str, bytes] | tuple[str, float]


def send(line: str | bytes) -> Step:
    data = line.encode() if isinstance(line, str) else line
    return ("send", data + b"\r\n")


def expect(line: str | bytes) -> Step:
    return ("expect", line.encode() if isinstance(line, str) else line)


GREETING = send("+OK POP3 ready <1896.697170952@dbc.mtview.ca.us>")
LOGIN = [expect("USER alice"), send("+OK"), expect("PASS alice-pw"), send("+OK logged in")]


@dataclass
class ScriptedServer:
    """Accepts one connection and plays ``script``; mismatches are collected in ``errors``."""

    script: list[Step]
    implicit_tls: ssl.SSLContext | None = None
    starttls_context: ssl.SSLContext | None = None
    chunk: int = 0  # >0: send replies in chunks of this size (exercises reassembly)
    received: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tls_errors: list[str] = field(default_factory=list)
    port: int = 0
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._listener.settimeout(10)
        try:
            conn, _ = self._listener.accept()
        except OSError as exc:
            self.errors.append(f"no connection: {exc}")
            return
        finally:
            self._listener.close()
        conn.settimeout(10)
        buf = b""
        try:
            if self.implicit_tls is not None:
                conn = self._handshake(conn, self.implicit_tls)
            for step in self.script:
                kind = step[0]
                if kind == "send":
                    data = step[1]
                    assert isinstance(data, bytes)
                    size = self.chunk or len(data) or 1
                    for i in range(0, len(data), size):
                        conn.sendall(data[i : i + size])
                elif kind == "expect":
                    while b"\r\n" not in buf:
                        more = conn.recv(65536)
                        if not more:
                            self.errors.append(f"client closed, expected {step[1]!r}")
                            return
                        buf += more
                    line, buf = buf.split(b"\r\n", 1)
                    self.received.append(line)
                    if line != step[1]:
                        self.errors.append(f"expected {step[1]!r}, got {line!r}")
                        return
                elif kind == "starttls":
                    if buf:
                        self.errors.append(f"client sent {buf!r} before the handshake")
                    assert self.starttls_context is not None
                    conn = self._handshake(conn, self.starttls_context)
                elif kind == "sleep":
                    time.sleep(float(step[1]))
                elif kind == "close":
                    return
            # Anything the client still sends is unexpected.
            conn.settimeout(2)
            rest = buf
            with contextlib.suppress(OSError):
                while more := conn.recv(65536):
                    rest += more
            if rest:
                self.errors.append(f"unexpected client data after the script: {rest!r}")
        except (OSError, AssertionError) as exc:
            if not self.tls_errors:
                self.errors.append(f"server failed: {exc!r}")
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _handshake(self, conn: socket.socket, ctx: ssl.SSLContext) -> socket.socket:
        try:
            return ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.tls_errors.append(repr(exc))
            raise

    def join(self) -> None:
        self._thread.join(15)
        assert not self._thread.is_alive(), "scripted server did not finish"


@pytest.fixture
def serve() -> Iterator[list[ScriptedServer]]:
    """Start scripted servers with ``server = ScriptedServer(...)``; checked at teardown."""
    servers: list[ScriptedServer] = []
    yield servers
    for server in servers:
        server.join()
        assert server.errors == [], server.errors


def start(serve: list[ScriptedServer], script: list[Step], **kw: object) -> ScriptedServer:
    server = ScriptedServer(script, **kw)  # type: ignore[arg-type]
    serve.append(server)
    return server


def plain(server: ScriptedServer, **kw: object) -> Pop3Session:
    opts: dict[str, object] = {"tls": "none", "timeout": 5.0, "allow_plaintext_auth": True, **kw}
    return Pop3Session.connect("127.0.0.1", server.port, **opts)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- TLS material


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and a server certificate for localhost/127.0.0.1 (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    for name in ("ca", "other"):
        run(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-days",
            "2",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.pem"),
            "-subj",
            f"/CN=test {name}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-sha256",
        "-keyout",
        str(d / "server.key"),
        "-out",
        str(d / "server.csr"),
        "-subj",
        "/CN=localhost",
    )
    (d / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    run(
        "x509",
        "-req",
        "-in",
        str(d / "server.csr"),
        "-CA",
        str(d / "ca.pem"),
        "-CAkey",
        str(d / "ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-sha256",
        "-extfile",
        str(d / "server.ext"),
        "-out",
        str(d / "server.pem"),
    )
    return Pki(ca=d / "ca.pem", other_ca=d / "other.pem", cert=d / "server.pem", key=d / "server.key")


# ---------------------------------------------------------------------------- login


def test_login_ok_and_transcript_masks_password(serve: list[ScriptedServer]) -> None:
    server = start(serve, [GREETING, *LOGIN, expect("STAT"), send("+OK 2 320"), expect("QUIT"), send("+OK bye")])
    log: list[tuple[str, str]] = []
    with plain(server, transcript=lambda d, line: log.append((d, line))) as s:
        assert s.greeting is not None and s.greeting.text.startswith("POP3 ready")
        assert s.state is SessionState.AUTHORIZATION
        s.login_user_pass("alice", "alice-pw")
        assert s.state is SessionState.TRANSACTION
        assert s.stat() == (2, 320)
    assert s.state is SessionState.CLOSED
    assert ("C", "PASS ***") in log and ("C", "USER alice") in log
    assert not any("alice-pw" in line for _, line in log)
    assert log[-1] == ("S", "+OK bye")


def test_login_password_with_spaces_and_unicode(serve: list[ScriptedServer]) -> None:
    pw = "p@ss wörd ünïcode"
    server = start(
        serve,
        [
            GREETING,
            expect("USER dave"),
            send("+OK"),
            expect(("PASS " + pw).encode()),
            send("+OK"),
            expect("QUIT"),
            send("+OK"),
        ],
    )
    with plain(server) as s:
        s.login_user_pass("dave", pw)


def test_wrong_password_auth_code(serve: list[ScriptedServer]) -> None:
    server = start(
        serve,
        [
            GREETING,
            expect("USER alice"),
            send("+OK"),
            expect("PASS wrong"),
            send("-ERR [AUTH] Authentication failed."),
            expect("QUIT"),
            send("+OK"),
        ],
    )
    with plain(server) as s:
        with pytest.raises(Pop3AuthError) as info:
            s.login_user_pass("alice", "wrong")
        assert "alice" in str(info.value) and "wrong" not in str(info.value)
        assert "[AUTH] Authentication failed." in str(info.value)
        assert s.state is SessionState.AUTHORIZATION


def test_addresses_in_login_errors_are_shortened_and_whole_only_at_debug(
    serve: list[ScriptedServer], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 8: a refused login is logged at ERROR; the mailbox's address (and the one the
    server quotes back) appear there as j***@example.com, in full only at DEBUG."""
    server = start(
        serve,
        [
            GREETING,
            expect("USER jane.doe@example.com"),
            send("+OK"),
            expect("PASS wrong"),
            send("-ERR [AUTH] Authentication failed for jane.doe@example.com"),
            expect("QUIT"),
            send("+OK"),
        ],
    )
    with caplog.at_level(logging.DEBUG, logger="pop3kafka.pop3"), plain(server) as s:
        with pytest.raises(Pop3AuthError) as info:
            s.login_user_pass("jane.doe@example.com", "wrong")
        text = str(info.value)
        assert "jane.doe" not in text and text.count("j***@example.com") == 2
        assert "[AUTH] Authentication failed for" in text
    full = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("jane.doe@example.com" in m for m in full)
    assert all("jane.doe" not in r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG)


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        # RFC 3206 §4: no code and no AUTH-RESP-CODE in CAPA: busy or bad credentials?
        ("-ERR bad", Pop3LoginRefusedError),
        ("-ERR [AUTH] bad", Pop3AuthError),
        ("-ERR [SYS/PERM] account disabled", Pop3PermError),
        ("-ERR [IN-USE] Mailbox is locked by another POP3 session", Pop3MailboxBusyError),
        ("-ERR [LOGIN-DELAY] wait 900 seconds", Pop3LoginDelayError),
        ("-ERR [SYS/TEMP] backend down", Pop3TempError),
        ("-ERR [SYS/TEMP/DB] backend down", Pop3TempError),
    ],
)
def test_pass_error_codes(serve: list[ScriptedServer], reply: str, error: type[Exception]) -> None:
    server = start(serve, [GREETING, expect("USER alice"), send("+OK"), expect("PASS pw"), send(reply)])
    s = plain(server)
    with pytest.raises(error) as info:
        s.login_user_pass("alice", "pw")
    assert type(info.value) is error
    s.close()


def test_bare_err_is_a_credentials_failure_when_the_server_has_auth_resp_code(serve: list[ScriptedServer]) -> None:
    server = start(
        serve,
        [
            GREETING,
            expect("CAPA"),
            send("+OK"),
            send("USER"),
            send("AUTH-RESP-CODE"),
            send("."),
            expect("USER alice"),
            send("+OK"),
            expect("PASS pw"),
            send("-ERR bad"),
        ],
    )
    s = plain(server)
    assert "AUTH-RESP-CODE" in s.capabilities()
    with pytest.raises(Pop3AuthError) as info:
        s.login_user_pass("alice", "pw")
    assert type(info.value) is Pop3AuthError
    s.close()


def test_user_rejected(serve: list[ScriptedServer]) -> None:
    server = start(serve, [GREETING, expect("USER nobody"), send("-ERR unknown user")])
    s = plain(server)
    with pytest.raises(Pop3AuthError, match="nobody"):
        s.login_user_pass("nobody", "pw")
    s.close()


def test_plaintext_login_refused_without_tls(serve: list[ScriptedServer]) -> None:
    server = start(serve, [GREETING])
    s = plain(server, allow_plaintext_auth=False)
    with pytest.raises(Pop3TlsError) as info:
        s.login_user_pass("alice", "alice-pw")
    assert str(info.value) == PLAINTEXT_REFUSED
    s.close()
    server.join()
    assert server.received == []  # nothing at all was sent


def test_bad_credentials_rejected_before_sending(serve: list[ScriptedServer]) -> None:
    server = start(serve, [GREETING])
    s = plain(server)
    with pytest.raises(Pop3ArgumentError):
        s.login_user_pass("alice", "pw\r\nDELE 1")
    s.close()


def test_greeting_error(serve: list[ScriptedServer]) -> None:
    server = start(serve, [send("-ERR [SYS/TEMP] too many connections")])
    with pytest.raises(Pop3TempError):
        plain(server)


def test_garbage_greeting(serve: list[ScriptedServer]) -> None:
    server = start(serve, [send("* OK IMAP4rev1 ready")])
    with pytest.raises(Pop3ProtocolError):
        plain(server)


# ---------------------------------------------------------------------------- capabilities


def test_capabilities_and_cache(serve: list[ScriptedServer]) -> None:
    caps = b"+OK\r\nCAPA\r\nUIDL\r\nUSER\r\nSASL PLAIN\r\n.\r\n"
    server = start(
        serve,
        [
            GREETING,
            expect("CAPA"),
            ("send", caps),
            *LOGIN,
            expect("CAPA"),
            ("send", b"+OK\r\nUIDL\r\n.\r\n"),
            expect("QUIT"),
            send("+OK"),
        ],
    )
    with plain(server) as s:
        assert s.capabilities() == {"CAPA": [], "UIDL": [], "USER": [], "SASL": ["PLAIN"]}
        assert "SASL" in s.capabilities()  # cached: no second CAPA
        s.login_user_pass("alice", "alice-pw")
        assert s.capabilities() == {"UIDL": []}  # re-read after login (RFC 2449 §5)


def test_server_without_capa(serve: list[ScriptedServer]) -> None:
    server = start(serve, [GREETING, expect("CAPA"), send("-ERR unknown command"), expect("QUIT"), send("+OK")])
    with plain(server) as s:
        assert s.capabilities() == {}


# ---------------------------------------------------------------------------- transaction


def test_uidl_list_retr_with_dot_stuffing_chunked(serve: list[ScriptedServer]) -> None:
    mail = b"From: a@example.com\r\nSubject: dots\r\n\r\n.\r\n..\r\n.x\r\n\r\n" + b"y" * 5000 + b"\r\nend\r\n"
    server = start(
        serve,
        [
            GREETING,
            *LOGIN,
            expect("UIDL"),
            ("send", b"+OK\r\n1 AAA\r\n2 BBB\r\n.\r\n"),
            expect("LIST"),
            ("send", b"+OK 2 messages\r\n1 100\r\n2 200\r\n.\r\n"),
            expect("RETR 1"),
            ("send", b"+OK 100 octets\r\n" + dot_stuff(mail)),
            expect("RETR 2"),
            ("send", b"+OK\r\n.\r\n"),
            expect("NOOP"),
            send("+OK"),
            expect("QUIT"),
            send("+OK"),
        ],
        chunk=7,
    )
    with plain(server) as s:
        s.login_user_pass("alice", "alice-pw")
        assert s.uidl() == [(1, "AAA"), (2, "BBB")]
        assert s.list() == [(1, 100), (2, 200)]
        assert s.retr(1) == mail
        pieces: list[bytes] = []
        assert s.retr_into(2, pieces.append) == 0 and b"".join(pieces) == b""
        s.noop()


def test_retr_into_streams_and_counts(serve: list[ScriptedServer]) -> None:
    mail = (b"." + b"z" * 99 + b"\r\n") * 3000
    server = start(
        serve,
        [
            GREETING,
            *LOGIN,
            expect("RETR 1"),
            ("send", b"+OK\r\n" + dot_stuff(mail)),
            expect("QUIT"),
            send("+OK"),
        ],
    )
    with plain(server) as s:
        s.login_user_pass("alice", "alice-pw")
        pieces: list[bytes] = []
        assert s.retr_into(1, pieces.append) == len(mail)
        assert b"".join(pieces) == mail and len(pieces) > 1


def test_no_uidl_support(serve: list[ScriptedServer]) -> None:
    server = start(
        serve,
        [
            GREETING,
            *LOGIN,
            expect("UIDL"),
            send("-ERR unknown command"),
            expect("RSET"),
            send("+OK"),
            expect("QUIT"),
            send("+OK"),
        ],
    )
    with plain(server) as s:
        s.login_user_pass("alice", "alice-pw")
        with pytest.raises(Pop3UnsupportedError, match="does not support UIDL"):
            s.uidl()
        s.abort()


def test_uidl_temp_error_is_not_unsupported(serve: list[ScriptedServer]) -> None:
    server = start(
        serve,
        [GREETING, *LOGIN, expect("UIDL"), send("-ERR [SYS/TEMP] index busy"), expect("QUIT"), send("+OK")],
    )
    with plain(server) as s:
        s.login_user_pass("alice", "alice-pw")
        with pytest.raises(Pop3TempError):
            s.uidl()


def test_invalid_uidl_listing(serve: list[ScriptedServer]) -> None:
    server = start(
        serve,
        [
            GREETING,
            *LOGIN,
            expect("UIDL"),
            ("send", b"+OK\r\n1 has\x01ctl\r\n.\r\n"),
            expect("QUIT"),
            send("+OK"),
        ],
    )
    with plain(server) as s:
        s.login_user_pass("alice", "alice-pw")
        with pytest.raises(Pop3ProtocolError, match="invalid UIDL"):
            s.uidl()
        assert s.state is SessionState.TRANSACTION  # body fully read: still in sync


def test_retr_error_keeps_session(serve: list[ScriptedServer]) -> None:
    server = start(
        serve, [GREETING, *LOGIN, expect("RETR 9"), send("-ERR no such message"), expect("QUIT"), send("+OK")]
    )
    with plain(server) as s:
        s.login_user_pass("alice", "alice-pw")
        with pytest.raises(Pop3CommandError) as info:
            s.retr(9)
        assert info.value.command == "RETR 9" and info.value.response == "no such message"
        with pytest.raises(Pop3ArgumentError):
            s.retr(0)


def test_dele_then_quit_commits(serve: list[ScriptedServer]) -> None:
    server = start(
        serve,
        [
            GREETING,
            *LOGIN,
            expect("DELE 1"),
            send("+OK message 1 deleted"),
            expect("DELE 2"),
            send("+OK"),
            expect("QUIT"),
            send("+OK 2 messages deleted"),
        ],
    )
    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    s.dele(1)
    s.dele(2)
    s.quit()
    assert s.state is SessionState.CLOSED
    server.join()
    assert server.received[-3:] == [b"DELE 1", b"DELE 2", b"QUIT"]


def test_quit_error_in_update_state(serve: list[ScriptedServer]) -> None:
    server = start(
        serve,
        [
            GREETING,
            *LOGIN,
            expect("DELE 1"),
            send("+OK"),
            expect("QUIT"),
            send("-ERR some deleted messages not removed"),
        ],
    )
    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    s.dele(1)
    with pytest.raises(Pop3CommandError, match="QUIT"):
        s.quit()
    assert s.state is SessionState.CLOSED


def test_abort_sends_rset_then_quit(serve: list[ScriptedServer]) -> None:
    server = start(
        serve,
        [
            GREETING,
            *LOGIN,
            expect("DELE 1"),
            send("+OK"),
            expect("RSET"),
            send("+OK"),
            expect("QUIT"),
            send("+OK"),
        ],
    )
    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    s.dele(1)
    s.abort()
    assert s.state is SessionState.CLOSED
    s.abort()  # idempotent


def test_abort_without_rset_ack_does_not_quit(serve: list[ScriptedServer]) -> None:
    server = start(serve, [GREETING, *LOGIN, expect("DELE 1"), send("+OK"), expect("RSET"), send("-ERR no")])
    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    s.dele(1)
    s.abort()  # must not send QUIT: the server checks nothing follows RSET
    assert s.state is SessionState.CLOSED


def test_abort_never_raises_on_dead_connection(serve: list[ScriptedServer]) -> None:
    server = start(serve, [GREETING, *LOGIN, ("close",)])
    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    server.join()
    s.abort()
    assert s.state is SessionState.CLOSED


def test_context_manager_aborts_on_exception(serve: list[ScriptedServer]) -> None:
    server = start(
        serve,
        [
            GREETING,
            *LOGIN,
            expect("DELE 1"),
            send("+OK"),
            expect("RSET"),
            send("+OK"),
            expect("QUIT"),
            send("+OK"),
        ],
    )
    with pytest.raises(RuntimeError, match="boom"), plain(server) as s:
        s.login_user_pass("alice", "alice-pw")
        s.dele(1)
        raise RuntimeError("boom")
    assert s.state is SessionState.CLOSED


def test_wrong_state_calls(serve: list[ScriptedServer]) -> None:
    server = start(serve, [GREETING, *LOGIN, expect("QUIT"), send("+OK")])
    s = plain(server)
    with pytest.raises(Pop3ProtocolError, match="not allowed in state authorization"):
        s.retr(1)
    with pytest.raises(Pop3ProtocolError):
        s.uidl()
    s.login_user_pass("alice", "alice-pw")
    with pytest.raises(Pop3ProtocolError, match="not allowed in state transaction"):
        s.login_user_pass("alice", "alice-pw")
    s.quit()
    for call in (s.stat, s.noop, s.quit, s.capabilities):
        with pytest.raises(Pop3ProtocolError, match="closed"):
            call()


def test_sink_exception_closes_session(serve: list[ScriptedServer]) -> None:
    server = start(serve, [GREETING, *LOGIN, expect("RETR 1"), ("send", b"+OK\r\n" + dot_stuff(b"x" * 100000))])

    def sink(_: bytes) -> None:
        raise OSError("disk full")

    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    with pytest.raises(OSError, match="disk full"):
        s.retr_into(1, sink)
    assert s.state is SessionState.CLOSED


# ---------------------------------------------------------------------------- failures


def test_timeout(serve: list[ScriptedServer]) -> None:
    server = start(serve, [GREETING, *LOGIN, expect("UIDL"), ("sleep", 1.0)])
    s = plain(server, timeout=0.2)
    s.login_user_pass("alice", "alice-pw")
    with pytest.raises(Pop3TimeoutError):
        s.uidl()
    assert s.state is SessionState.CLOSED


def test_connection_closed_mid_body(serve: list[ScriptedServer]) -> None:
    server = start(serve, [GREETING, *LOGIN, expect("RETR 1"), ("send", b"+OK\r\nFrom: x\r\n"), ("close",)])
    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    with pytest.raises(Pop3ConnectError, match="closed"):
        s.retr(1)
    assert s.state is SessionState.CLOSED


def test_oversized_status_line(serve: list[ScriptedServer]) -> None:
    server = start(serve, [("send", b"+OK " + b"x" * 20000 + b"\r\n")])
    with pytest.raises(Pop3ProtocolError, match="longer than"):
        plain(server)


def test_connect_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(Pop3ConnectError, match=f"127.0.0.1:{port}"):
        Pop3Session.connect("127.0.0.1", port, tls="none", timeout=2)


def test_invalid_tls_mode() -> None:
    with pytest.raises(ConfigError):
        Pop3Session.connect("127.0.0.1", 1, tls="ssl", timeout=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- TLS


def test_make_tls_context(pki: Pki, tmp_path: Path) -> None:
    ctx = make_tls_context(str(pki.ca))
    assert ctx.check_hostname and ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert make_tls_context(None, min_version="TLSv1.3").minimum_version is ssl.TLSVersion.TLSv1_3
    assert make_tls_context(None, verify=False).verify_mode is ssl.CERT_NONE
    with pytest.raises(ConfigError, match="tls_ca_file"):
        make_tls_context(str(tmp_path / "missing.pem"))
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="tls_ca_file"):
        make_tls_context(str(tmp_path / "bad.pem"))
    with pytest.raises(ConfigError, match="TLS minimum version"):
        make_tls_context(None, min_version="SSLv3")


def test_starttls_session(serve: list[ScriptedServer], pki: Pki) -> None:
    server = start(
        serve,
        [
            GREETING,
            expect("CAPA"),
            ("send", b"+OK\r\nUSER\r\nSTLS\r\n.\r\n"),
            expect("STLS"),
            send("+OK Begin TLS negotiation now."),
            ("starttls",),
            expect("CAPA"),
            ("send", b"+OK\r\nUSER\r\nUIDL\r\n.\r\n"),
            *LOGIN,
            expect("UIDL"),
            ("send", b"+OK\r\n1 u1\r\n.\r\n"),
            expect("RETR 1"),
            ("send", b"+OK\r\n" + dot_stuff(b".hidden\r\n")),
            expect("QUIT"),
            send("+OK"),
        ],
        starttls_context=pki.server_context(),
    )
    with Pop3Session.connect(
        "127.0.0.1", server.port, tls="starttls", timeout=5, ssl_context=make_tls_context(str(pki.ca))
    ) as s:
        assert s.is_tls
        assert s.capabilities() == {"USER": [], "UIDL": []}  # re-read after STLS (RFC 2595 §4)
        s.login_user_pass("alice", "alice-pw")  # allowed: encrypted
        assert s.uidl() == [(1, "u1")]
        assert s.retr(1) == b".hidden\r\n"


def test_starttls_not_offered(serve: list[ScriptedServer], pki: Pki) -> None:
    server = start(serve, [GREETING, expect("CAPA"), ("send", b"+OK\r\nUSER\r\n.\r\n")])
    with pytest.raises(Pop3TlsError, match="does not offer STLS"):
        Pop3Session.connect(
            "127.0.0.1", server.port, tls="starttls", timeout=5, ssl_context=make_tls_context(str(pki.ca))
        )


def test_starttls_injection_refused(serve: list[ScriptedServer], pki: Pki) -> None:
    server = start(
        serve,
        [
            GREETING,
            expect("CAPA"),
            ("send", b"+OK\r\nSTLS\r\n.\r\n"),
            expect("STLS"),
            ("send", b"+OK\r\n+OK injected\r\n"),
        ],
    )
    with pytest.raises(Pop3TlsError, match="before the TLS handshake"):
        Pop3Session.connect(
            "127.0.0.1", server.port, tls="starttls", timeout=5, ssl_context=make_tls_context(str(pki.ca))
        )


def test_implicit_tls_session(serve: list[ScriptedServer], pki: Pki) -> None:
    server = start(
        serve,
        [GREETING, *LOGIN, expect("STAT"), send("+OK 0 0"), expect("QUIT"), send("+OK")],
        implicit_tls=pki.server_context(),
    )
    with Pop3Session.connect(
        "127.0.0.1", server.port, tls="implicit", timeout=5, ssl_context=make_tls_context(str(pki.ca))
    ) as s:
        assert s.is_tls
        s.login_user_pass("alice", "alice-pw")
        assert s.stat() == (0, 0)


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_certificate_verification_failure(serve: list[ScriptedServer], pki: Pki, mode: str) -> None:
    script: list[Step] = (
        []
        if mode == "implicit"
        else [
            GREETING,
            expect("CAPA"),
            ("send", b"+OK\r\nSTLS\r\n.\r\n"),
            expect("STLS"),
            send("+OK"),
            ("starttls",),
        ]
    )
    if mode == "implicit":
        server = start(serve, script, implicit_tls=pki.server_context())
    else:
        server = start(serve, script, starttls_context=pki.server_context())
    with pytest.raises(Pop3TlsError) as info:
        Pop3Session.connect(
            "127.0.0.1",
            server.port,
            tls=mode,
            timeout=5,  # type: ignore[arg-type]
            ssl_context=make_tls_context(str(pki.other_ca)),
        )
    message = str(info.value)
    assert f"127.0.0.1:{server.port}" in message
    assert "certificate" in message and TLS_FIX_HINT in message
    server.join()
    assert server.tls_errors  # the server saw the client abort the handshake


def test_hostname_mismatch(serve: list[ScriptedServer], pki: Pki) -> None:
    # The certificate names localhost and 127.0.0.1; 127.0.0.2 is loopback too on Linux.
    try:
        server = start(serve, [], implicit_tls=pki.server_context(), host="127.0.0.2")
    except OSError:
        pytest.skip("cannot bind 127.0.0.2 here")
    with pytest.raises(Pop3TlsError, match="mismatch"):
        Pop3Session.connect(
            "127.0.0.2", server.port, tls="implicit", timeout=5, ssl_context=make_tls_context(str(pki.ca))
        )


# ---------------------------------------------------------------------------- server policy (RFC 2449 §6.7, §6.8)


def test_server_policy_per_user_values_are_re_read_after_login(serve: list[ScriptedServer]) -> None:
    # RFC 2449 §6.7/§6.8: "USER" after the value in AUTHORIZATION state marks a per-user
    # placeholder; the user's value comes with the CAPA in TRANSACTION state (§5).
    server = start(
        serve,
        [
            GREETING,
            expect("CAPA"),
            ("send", b"+OK\r\nUSER\r\nEXPIRE 30 USER\r\nLOGIN-DELAY 900 USER\r\n.\r\n"),
            *LOGIN,
            expect("CAPA"),
            ("send", b"+OK\r\nEXPIRE 5\r\nLOGIN-DELAY 60\r\n.\r\n"),
            expect("QUIT"),
            send("+OK"),
        ],
    )
    with plain(server) as s:
        before = s.server_policy()
        assert (before.expire_days, before.login_delay_seconds) == (30, 900)
        assert before.expire_per_user and before.login_delay_per_user and before.per_user
        s.login_user_pass("alice", "alice-pw")
        after = s.server_policy()
        assert (after.expire_days, after.login_delay_seconds, after.per_user) == (5, 60, False)
        assert s.server_policy() == after  # the CAPA after login is cached: no third CAPA


def test_server_policy_without_user_suffix_needs_no_second_capa(serve: list[ScriptedServer]) -> None:
    server = start(
        serve,
        [
            GREETING,
            expect("CAPA"),
            ("send", b"+OK\r\nUSER\r\nEXPIRE NEVER\r\nLOGIN-DELAY 300\r\n.\r\n"),
            *LOGIN,
            expect("QUIT"),  # a CAPA here would break the script
            send("+OK"),
        ],
    )
    with plain(server) as s:
        assert "USER" in s.capabilities()
        s.login_user_pass("alice", "alice-pw")
        policy = s.server_policy()
        assert policy.expire_never and policy.expire_days is None and policy.login_delay_seconds == 300
        assert policy.describe() == "EXPIRE=NEVER LOGIN-DELAY=300s"


def test_server_policy_after_login_without_an_earlier_capa(serve: list[ScriptedServer]) -> None:
    server = start(
        serve,
        [GREETING, *LOGIN, expect("CAPA"), ("send", b"+OK\r\nEXPIRE 0\r\n.\r\n"), expect("QUIT"), send("+OK")],
    )
    with plain(server) as s:
        s.login_user_pass("alice", "alice-pw")
        policy = s.server_policy()
        assert policy.expire_days == 0 and policy.expire_advertised and policy.login_delay_seconds is None


def test_server_policy_of_a_server_without_capa(serve: list[ScriptedServer]) -> None:
    server = start(
        serve,
        [GREETING, expect("CAPA"), send("-ERR unknown command"), *LOGIN, expect("QUIT"), send("+OK")],
    )
    with plain(server) as s:
        assert s.capabilities() == {}
        s.login_user_pass("alice", "alice-pw")
        policy = s.server_policy()
        assert not policy.expire_advertised and policy.login_delay_seconds is None and policy.describe() == ""


def test_server_policy_learnt_before_stls_is_not_trusted(serve: list[ScriptedServer], pki: Pki) -> None:
    # RFC 2595 §4: what CAPA said before STLS is discarded, the policy included.
    server = start(
        serve,
        [
            GREETING,
            expect("CAPA"),
            ("send", b"+OK\r\nUSER\r\nSTLS\r\nEXPIRE 0\r\n.\r\n"),
            expect("STLS"),
            send("+OK Begin TLS negotiation now."),
            ("starttls",),
            *LOGIN,
            expect("CAPA"),
            ("send", b"+OK\r\nUSER\r\nEXPIRE 30\r\n.\r\n"),
            expect("QUIT"),
            send("+OK"),
        ],
        starttls_context=pki.server_context(),
    )
    with Pop3Session.connect(
        "127.0.0.1", server.port, tls="starttls", timeout=5, ssl_context=make_tls_context(str(pki.ca))
    ) as s:
        s.login_user_pass("alice", "alice-pw")
        assert s.server_policy().expire_days == 30


def test_plaintext_refusal_by_the_server_names_the_fix(serve: list[ScriptedServer]) -> None:
    # Dovecot with disable_plaintext_auth refuses USER itself, so PASS is never sent.
    refusal = "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
    server = start(serve, [GREETING, expect("USER alice"), send(refusal), expect("QUIT"), send("+OK")])
    with plain(server) as s:
        with pytest.raises(Pop3AuthError) as info:
            s.login_user_pass("alice", "alice-pw")
        message = str(info.value)
        assert "Plaintext authentication disallowed" in message
        assert "refuses logins over an unencrypted connection" in message
        assert "set tls: starttls" in message and "tls: implicit" in message
    assert server.received == [b"USER alice", b"QUIT"]  # no PASS on the wire


def test_auth_refusal_on_a_plain_connection_mentions_tls_as_a_possible_cause(serve: list[ScriptedServer]) -> None:
    server = start(
        serve,
        [GREETING, expect("USER alice"), send("+OK"), expect("PASS pw"), send("-ERR [AUTH] Authentication failed.")],
    )
    s = plain(server)
    with pytest.raises(Pop3AuthError) as info:
        s.login_user_pass("alice", "pw")
    assert "many servers refuse logins without TLS: if so, set tls: starttls" in str(info.value)
    s.close()
