"""Plaintext logins refused by a real Dovecot, reached as a remote client (PROXY protocol).

Dovecot counts loopback clients as secure and allows them plaintext logins whatever
disable_plaintext_auth says, so a test on 127.0.0.1 cannot see the refusal. The stack's
Dovecot (deploy/local/localstack.py) has a second POP3 listener that takes a PROXY protocol
header from 127.0.0.0/8 and disallows plaintext logins for clients in 192.0.2.0/24. A test
proxy (tests/support/tcpproxy.py) sends that header, claiming 192.0.2.7: Dovecot then treats
the connection as remote and refuses USER/PASS and SASL PLAIN/LOGIN until STLS (RFC 2595 §2.2).
The connector itself never sends a PROXY header; only the proxy does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import pytest
from support.tcpproxy import TcpProxy

from connector.config import parse_config
from connector.config.model import MailboxConfig
from connector.delivery.kafka import Publisher
from connector.errors import ConfigError, Pop3AuthError, Pop3TlsError
from connector.protocol import PLAINTEXT_REFUSED, Pop3Session, make_tls_context
from connector.protocol.sasl import create
from connector.runtime.cycle import CycleContext, run_cycle
from connector.runtime.login import login
from connector.runtime.sessions import open_session

pytestmark = pytest.mark.integration

USER = "t3"
REMOTE = ("192.0.2.7", 40000)  # TEST-NET-1: Dovecot's `remote 192.0.2.0/24` block applies
ELSEWHERE = ("203.0.113.7", 40000)  # TEST-NET-3: remote too, but no such block (control)
DOVECOT_REFUSAL = "Plaintext authentication disallowed on non-secure (SSL/TLS) connections."


@pytest.fixture
def remote(services) -> Iterator[TcpProxy]:  # type: ignore[no-untyped-def]
    """A PROXY-protocol front end that makes Dovecot see the client at 192.0.2.7."""
    assert services.dovecot.proxied_port, "POP3_PROXIED_PORT is not set: restart the stack (localstack.py up)"
    proxy = TcpProxy(services.dovecot.proxied_port, proxy_v1_source=REMOTE)
    try:
        yield proxy
    finally:
        proxy.close()


def mailbox(services, proxy: TcpProxy, tls: str, **extra: Any) -> MailboxConfig:  # type: ignore[no-untyped-def]
    m = {
        "id": "plain",
        "host": "127.0.0.1",
        "port": proxy.port,
        "tls": tls,
        "tls_ca_file": services.cafile,
        "username": USER,
        "password": {"env": "PW_PLAIN"},
        "timeout_seconds": 10,
        **extra,
    }
    cfg = parse_config(
        {"kafka": {"bootstrap_servers": "x:1"}, "topics": {"mail": "m"}, "mailboxes": [m]},
        environ={"PW_PLAIN": f"{USER}-pw", **os.environ},
    )
    return cfg.mailboxes[0]


def connect(services, proxy: TcpProxy, tls: str, lines: list[str], **kw: Any) -> Pop3Session:  # type: ignore[no-untyped-def]
    """A session through the proxy whose transcript (PASS and SASL lines masked) goes to ``lines``."""
    return Pop3Session.connect(
        "127.0.0.1",
        proxy.port,
        tls=tls,  # type: ignore[arg-type]
        ssl_context=make_tls_context(services.cafile) if tls != "none" else None,
        timeout=10,
        transcript=lambda direction, line: lines.append(f"{direction} {line}"),
        **kw,
    )


def test_dovecot_refuses_user_pass_without_tls_as_a_typed_error(services, remote: TcpProxy) -> None:  # type: ignore[no-untyped-def]
    mb = mailbox(services, remote, "none", allow_plaintext_auth=True, auth_mechanisms=["USER"])
    lines: list[str] = []
    session = connect(services, remote, "none", lines, allow_plaintext_auth=True)
    try:
        caps = session.capabilities()
        # Dovecot hides plaintext methods from a remote client before TLS (RFC 2595 §2.2)
        assert "USER" not in caps and not {"PLAIN", "LOGIN"} & set(caps.get("SASL", [])), caps
        assert "STLS" in caps, caps
        with pytest.raises(Pop3AuthError) as info:
            login(session, mb)
    finally:
        session.abort()
    message = str(info.value)
    assert type(info.value) is Pop3AuthError  # [AUTH] (RFC 3206): the class a wrong password gets
    assert f"[AUTH] {DOVECOT_REFUSAL}" in message
    assert "refuses logins over an unencrypted connection" in message
    assert "set tls: starttls" in message and "tls: implicit" in message
    # Dovecot refuses USER itself: the password was never sent
    assert "C USER t3" in lines and not any(line.startswith("C PASS") for line in lines), lines


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_dovecot_refuses_sasl_plaintext_mechanisms_without_tls(services, remote: TcpProxy, mech: str) -> None:  # type: ignore[no-untyped-def]
    lines: list[str] = []
    session = connect(services, remote, "none", lines, allow_plaintext_auth=True)
    try:
        with pytest.raises(Pop3AuthError, match=r"\[AUTH\] Plaintext authentication disabled") as info:
            session.login_sasl(create(mech, username=USER, password=f"{USER}-pw"), username=USER)
    finally:
        session.abort()
    assert "set tls: starttls" in str(info.value)
    assert f"{USER}-pw" not in str(info.value)


def test_the_refusal_follows_the_address_in_the_proxy_header(services) -> None:  # type: ignore[no-untyped-def]
    # Control: the same listener and path, another claimed source outside 192.0.2.0/24, is
    # allowed plaintext by this Dovecot's configuration. So the refusal above is the server's
    # policy for the address the PROXY header gave, not something of the proxy or the port.
    proxy = TcpProxy(services.dovecot.proxied_port, proxy_v1_source=ELSEWHERE)
    try:
        mb = mailbox(services, proxy, "none", allow_plaintext_auth=True, auth_mechanisms=["USER"])
        session = open_session(mb)
        try:
            assert login(session, mb) == "USER"
            assert isinstance(session, Pop3Session)
            session.stat()
        finally:
            session.abort()
    finally:
        proxy.close()


def test_connector_refuses_before_sending_the_password(services, remote: TcpProxy) -> None:  # type: ignore[no-untyped-def]
    # allow_plaintext_auth: false (the default) with tls: none is refused when the
    # configuration is loaded, naming the key and the fix: no connection is ever made.
    with pytest.raises(ConfigError) as info:
        mailbox(services, remote, "none", auth_mechanisms=["USER"])
    assert "mailboxes[0].tls" in str(info.value) and "'implicit' or 'starttls'" in str(info.value)

    # The session refuses as well (defence in depth), before USER or AUTH is sent.
    mb = mailbox(services, remote, "none", allow_plaintext_auth=True, auth_mechanisms=["USER"])
    lines: list[str] = []
    session = connect(services, remote, "none", lines)  # allow_plaintext_auth=False
    try:
        with pytest.raises(Pop3TlsError) as refused:
            login(session, mb)
        assert str(refused.value) == PLAINTEXT_REFUSED
        with pytest.raises(Pop3TlsError):  # SASL PLAIN too
            session.login_sasl(create("PLAIN", username=USER, password=f"{USER}-pw"), username=USER)
    finally:
        session.abort()
    assert not [line for line in lines if line.startswith(("C USER", "C PASS", "C AUTH"))], lines

    # In a cycle the error names the mailbox, the step and the fix. (A loaded configuration
    # cannot get here, as shown above; the mailbox is altered after loading to reach it.)
    cfg = parse_config(
        {
            "kafka": {"bootstrap_servers": "mock:9092"},
            "topics": {"mail": "m"},
            "delivery": {"mode": "at_least_once"},
            "mailboxes": [
                {
                    "id": "plain",
                    "host": "127.0.0.1",
                    "port": remote.port,
                    "tls": "none",
                    "allow_plaintext_auth": True,
                    "username": USER,
                    "password": {"env": "PW_PLAIN"},
                    "auth_mechanisms": ["USER"],
                }
            ],
        },
        environ={"PW_PLAIN": f"{USER}-pw"},
    )
    strict = dataclasses.replace(cfg.mailboxes[0], allow_plaintext_auth=False)
    publisher = Publisher("mock:9092", {"test.mock.num.brokers": 1}, 5)
    try:
        res = run_cycle(CycleContext(config=cfg, publisher=publisher), strict)
    finally:
        publisher.close(timeout=5)
    assert isinstance(res.error, Pop3TlsError) and not res.logged_in
    described = res.error.describe()
    assert "mailbox 'plain'" in described and "step login" in described
    assert "tls: implicit|starttls" in described and "allow_plaintext_auth: true" in described


@pytest.mark.parametrize("mech", ["USER", "PLAIN", "LOGIN"])
def test_starttls_through_the_same_path_logs_in(services, remote: TcpProxy, mech: str) -> None:  # type: ignore[no-untyped-def]
    mb = mailbox(services, remote, "starttls", auth_mechanisms=[mech])
    session = open_session(mb)
    assert isinstance(session, Pop3Session)
    try:
        assert session.is_tls
        caps = session.capabilities()  # re-read after STLS: now the plaintext methods are offered
        assert "USER" in caps and {"PLAIN", "LOGIN"} <= set(caps["SASL"]), caps
        assert login(session, mb) == mech
        session.stat()  # TRANSACTION state: the login really happened
        session.quit()
    finally:
        session.abort()
