"""SASL NTLM (connector/protocol/sasl.py) against the real Dovecot, over POP3S and STLS.

Dovecot 2.3.19 implements NTLM only through a winbind helper (mech-winbind). The test server
runs deploy/local/ntlm_helper.py in place of Samba's ntlm_auth: pyspnego's acceptor checks
our client's NTLMv2 response against the accounts deploy/local/localstack.py writes (every
test user, in the domain NTLM_DOMAIN), and Dovecot then logs in the account it names.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from localstack import NTLM_DOMAIN

from connector.config import parse_config
from connector.config.model import MailboxConfig
from connector.errors import Pop3AuthError
from connector.protocol import Pop3Session
from connector.runtime.login import login
from connector.runtime.sessions import open_session

pytestmark = pytest.mark.integration

USER = "ntlmuser"


def mailbox(services, tls: str, username: str, password: str) -> MailboxConfig:  # type: ignore[no-untyped-def]
    m: dict[str, Any] = {
        "id": "ntlm",
        "host": "127.0.0.1",
        "port": services.dovecot.pop3s_port if tls == "implicit" else services.dovecot.pop3_port,
        "tls": tls,
        "tls_ca_file": services.cafile,
        "username": username,
        "password": {"env": "PW_NTLM"},
        "auth_mechanisms": ["NTLM"],
        "timeout_seconds": 10,
    }
    cfg = parse_config(
        {"kafka": {"bootstrap_servers": "x:1"}, "topics": {"mail": "m"}, "mailboxes": [m]},
        environ={**os.environ, "PW_NTLM": password},
    )
    return cfg.mailboxes[0]


def open_(mb: MailboxConfig) -> Pop3Session:
    session = open_session(mb)
    assert isinstance(session, Pop3Session)
    return session


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_capa_offers_ntlm(services, tls: str) -> None:  # type: ignore[no-untyped-def]
    session = open_(mailbox(services, tls, f"{NTLM_DOMAIN}\\{USER}", f"{USER}-pw"))
    try:
        assert "NTLM" in session.capabilities()["SASL"]  # after STLS: the CAPA of the TLS session
    finally:
        session.abort()


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_ntlm_login_lands_in_the_accounts_mailbox(services, tls: str) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear(USER)
    marker = uuid.uuid4().hex
    services.dovecot.put(USER, f"Subject: ntlm {marker}\r\nMessage-ID: <{marker}@test>\r\n\r\nbody\r\n".encode())
    # The domain part is matched case-insensitively, as Windows does; the helper reports the
    # account as spelled in its file, so Dovecot opens ntlmuser's maildir.
    mb = mailbox(services, tls, f"{NTLM_DOMAIN.lower()}\\{USER}", f"{USER}-pw")
    session = open_(mb)
    try:
        assert login(session, mb) == "NTLM"
        assert session.stat()[0] == 1
        assert [n for n, _ in session.uidl()] == [1]
        assert marker.encode() in session.top(1, 0)
        session.quit()
    finally:
        session.abort()


def test_ntlm_non_ascii_password(services) -> None:  # type: ignore[no-untyped-def]
    # NTLM hashes the UTF-16LE password ([MS-NLMP] §3.3.2 NTOWFv2); dave's has non-ASCII letters.
    mb = mailbox(services, "implicit", f"{NTLM_DOMAIN}\\dave", services.dovecot.users["dave"])
    session = open_(mb)
    try:
        assert login(session, mb) == "NTLM"
        session.stat()
    finally:
        session.abort()


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_ntlm_wrong_password_is_refused(services, tls: str) -> None:  # type: ignore[no-untyped-def]
    mb = mailbox(services, tls, f"{NTLM_DOMAIN}\\{USER}", "not-the-password")
    session = open_(mb)
    try:
        with pytest.raises(Pop3AuthError) as e:
            login(session, mb)
        assert "not-the-password" not in str(e.value)
    finally:
        session.abort()


@pytest.mark.parametrize("username", [f"OTHERDOM\\{USER}", USER], ids=["other-domain", "no-domain"])
def test_ntlm_account_outside_the_domain_is_refused(services, username: str) -> None:  # type: ignore[no-untyped-def]
    # Right password, but the NTLM account is (domain, user): only NTLM_DOMAIN has one.
    mb = mailbox(services, "implicit", username, f"{USER}-pw")
    session = open_(mb)
    try:
        with pytest.raises(Pop3AuthError):
            login(session, mb)
    finally:
        session.abort()
