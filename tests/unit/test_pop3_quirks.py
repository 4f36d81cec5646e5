"""Real-world server behaviour that the real servers here will not produce, scripted byte by byte:
Exchange Online's two-step XOAUTH2, an OAuth error challenge, Gmail's popped-on-QUIT (abort by
disconnecting), a 100 KB line, garbage instead of a status line, an -ERR in the middle of a
pipelined RETR batch, and a connection cut in the middle of a mail."""

from __future__ import annotations

import base64
import json

import pytest
from test_pop3_session import GREETING, LOGIN, ScriptedServer, expect, send, serve  # noqa: F401

from connector.config import parse_config
from connector.errors import Pop3AuthError, Pop3CommandError, Pop3ConnectError, Pop3ProtocolError
from connector.protocol import Pop3Session
from connector.protocol.sasl import create
from connector.runtime.sessions import end_without_deletes

TOKEN = "ya29.a0AfH6SMB-token_value.123"  # RFC 6750 bearer-token characters only


def start(serve: list[ScriptedServer], script: list) -> ScriptedServer:  # type: ignore[type-arg]  # noqa: F811
    server = ScriptedServer(script)
    serve.append(server)
    return server


def plain(server: ScriptedServer) -> Pop3Session:
    return Pop3Session.connect("127.0.0.1", server.port, tls="none", timeout=5, allow_plaintext_auth=True)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_exchange_online_two_step_xoauth2(serve: list[ScriptedServer]) -> None:  # noqa: F811
    answer = b64(f"user=orders@contoso.com\x01auth=Bearer {TOKEN}\x01\x01".encode())
    server = start(
        serve,
        [GREETING, expect("AUTH XOAUTH2"), send("+ "), expect(answer), send("+OK User successfully authenticated.")],
    )
    s = plain(server)
    s.login_sasl(create("XOAUTH2-TWO-STEP", username="orders@contoso.com", token=TOKEN), username="orders@contoso.com")
    s.close()


def test_oauth_error_challenge_is_answered_and_surfaced(serve: list[ScriptedServer]) -> None:  # noqa: F811
    initial = b64(f"user=alice\x01auth=Bearer {TOKEN}\x01\x01".encode())
    err = b64(json.dumps({"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}).encode())
    server = start(
        serve,
        [
            GREETING,
            expect(f"AUTH XOAUTH2 {initial}"),
            send(f"+ {err}"),
            expect(""),
            send("-ERR [AUTH] Invalid credentials"),
        ],
    )
    s = plain(server)
    with pytest.raises(Pop3AuthError) as e:
        s.login_sasl(create("XOAUTH2", username="alice", token=TOKEN), username="alice")
    assert "401" in str(e.value) and TOKEN not in str(e.value)
    s.close()


def test_gmail_abort_disconnects_without_rset_or_quit(serve: list[ScriptedServer]) -> None:  # noqa: F811
    # Gmail marks RETRieved mail as popped at a clean QUIT, even without DELE: ending a failed
    # cycle must therefore send nothing more (the scripted server fails on any extra line).
    server = start(serve, [GREETING, *LOGIN, expect("STAT"), send("+OK 1 120")])
    cfg = parse_config(
        {
            "kafka": {"bootstrap_servers": "x:1"},
            "topics": {"mail": "m"},
            "mailboxes": [
                {
                    "id": "gmail",
                    "host": "127.0.0.1",
                    "port": server.port,
                    "tls": "none",
                    "allow_plaintext_auth": True,
                    "username": "alice",
                    "password": {"env": "PW"},
                    "abort_with": "disconnect",
                }
            ],
        },
        environ={"PW": "alice-pw"},
    )
    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    assert s.stat() == (1, 120)
    end_without_deletes(s, cfg.mailboxes[0])


def test_a_100_kb_line_in_a_mail(serve: list[ScriptedServer]) -> None:  # noqa: F811
    line = b"x" * 100_000
    body = b"Subject: long\r\n\r\n" + line + b"\r\n"
    server = start(serve, [GREETING, *LOGIN, expect("RETR 1"), send(b"+OK\r\n" + body + b".")])
    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    assert s.retr(1) == body
    s.close()


def test_garbage_instead_of_a_status_line(serve: list[ScriptedServer]) -> None:  # noqa: F811
    server = start(serve, [GREETING, *LOGIN, expect("STAT"), send("HTTP/1.1 400 Bad Request")])
    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    with pytest.raises(Pop3ProtocolError, match="expected \\+OK or -ERR"):
        s.stat()
    s.close()


def test_err_in_the_middle_of_a_pipelined_batch_keeps_the_session_in_step(serve: list[ScriptedServer]) -> None:  # noqa: F811
    server = start(
        serve,
        [
            GREETING,
            *LOGIN,
            expect("CAPA"),
            send("+OK\r\nPIPELINING\r\nUIDL\r\n."),
            expect("RETR 1"),
            expect("RETR 2"),
            expect("RETR 3"),
            send("+OK\r\nSubject: one\r\n\r\nbody one\r\n."),
            send("-ERR Message 2 expunged"),
            send("+OK\r\nSubject: three\r\n\r\nbody three\r\n."),
            expect("NOOP"),
            send("+OK"),
        ],
    )
    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    it = s.retr_many([1, 2, 3])
    n, mail = next(it)
    assert n == 1 and mail.refused is None and b"body one" in mail.read()
    with pytest.raises(Pop3CommandError, match="RETR 2"):
        next(it)
    s.noop()  # RETR 3's answer was drained: the next command gets its own reply
    s.close()


def test_connection_cut_in_the_middle_of_a_mail(serve: list[ScriptedServer]) -> None:  # noqa: F811
    server = start(
        serve, [GREETING, *LOGIN, expect("RETR 1"), send("+OK\r\nSubject: cut\r\n\r\nhalf a bo"), ("close",)]
    )
    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    with pytest.raises(Pop3ConnectError, match="connection closed"):
        s.retr(1)
