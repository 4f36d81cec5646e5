"""Every login method against the real Dovecot, over POP3S and STLS.

Bearer tokens are HS256 JWTs that Dovecot validates locally (deploy/local/localstack.py,
tests/support/jwt.py): no identity provider involved.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from support.jwt import make_jwt

from connector.config import parse_config
from connector.config.model import MailboxConfig
from connector.errors import Pop3AuthError
from connector.protocol import Pop3Session
from connector.runtime.login import login
from connector.runtime.sessions import open_session

pytestmark = pytest.mark.integration

USER = "t3"


def mailbox(services, tls: str = "implicit", **extra: Any) -> MailboxConfig:  # type: ignore[no-untyped-def]
    port = services.dovecot.pop3s_port if tls == "implicit" else services.dovecot.pop3_port
    m = {
        "id": "login",
        "host": "127.0.0.1",
        "port": port,
        "tls": tls,
        "tls_ca_file": services.cafile,
        "username": USER,
        **extra,
    }
    if "password" not in m and "oauth2_token" not in m:
        m["password"] = {"env": "PW_LOGIN"}
    cfg = parse_config(
        {"kafka": {"bootstrap_servers": "x:1"}, "topics": {"mail": "m"}, "mailboxes": [m]},
        environ={"PW_LOGIN": f"{USER}-pw", **os.environ},
    )
    return cfg.mailboxes[0]


def log_in(mb: MailboxConfig) -> str:
    session = open_session(mb)
    try:
        used = login(session, mb)
        assert isinstance(session, Pop3Session)
        session.stat()  # TRANSACTION state: the login really happened
        return used
    finally:
        session.abort()


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
@pytest.mark.parametrize("mech", ["USER", "APOP", "PLAIN", "LOGIN", "CRAM-MD5"])
def test_password_logins(services, tls: str, mech: str) -> None:  # type: ignore[no-untyped-def]
    assert log_in(mailbox(services, tls, auth_mechanisms=[mech])) == mech


def test_default_choice_is_the_strongest_offered(services) -> None:  # type: ignore[no-untyped-def]
    # Dovecot offers PLAIN LOGIN CRAM-MD5 XOAUTH2 OAUTHBEARER NTLM; NTLM is opt-in (needs a domain)
    assert log_in(mailbox(services)) == "CRAM-MD5"


@pytest.mark.parametrize("mech", ["XOAUTH2", "XOAUTH2-TWO-STEP", "OAUTHBEARER"])
@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_bearer_token_logins(services, tmp_path: Path, mech: str, tls: str) -> None:  # type: ignore[no-untyped-def]
    tok = tmp_path / "token"
    # a token of several KB, as Exchange Online issues: the AUTH line would exceed 255 octets,
    # so the token goes after the server's empty challenge
    tok.write_text(make_jwt(services.dovecot.oauth_key_file, USER, pad="x" * 3000))
    assert log_in(mailbox(services, tls, auth_mechanisms=[mech], oauth2_token={"file": str(tok)})) == mech


def test_token_default_choice_and_file_reread(services, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tok = tmp_path / "token"
    tok.write_text(make_jwt(services.dovecot.oauth_key_file, USER))
    mb = mailbox(services, oauth2_token={"file": str(tok)})
    assert log_in(mb) == "OAUTHBEARER"
    time.sleep(0.01)
    tok.write_text(make_jwt(services.dovecot.oauth_key_file, "someone-else"))  # the sidecar rotated it
    with pytest.raises(Pop3AuthError):
        log_in(mb)


@pytest.mark.parametrize("mech", ["XOAUTH2", "OAUTHBEARER"])
def test_expired_token_surfaces_the_servers_json(services, tmp_path: Path, mech: str) -> None:  # type: ignore[no-untyped-def]
    tok = tmp_path / "token"
    tok.write_text(make_jwt(services.dovecot.oauth_key_file, USER, lifetime=-60))
    with pytest.raises(Pop3AuthError, match="the server said") as e:
        log_in(mailbox(services, auth_mechanisms=[mech], oauth2_token={"file": str(tok)}))
    assert "eyJ" not in str(e.value)  # never the token


@pytest.mark.parametrize("mech", ["USER", "PLAIN", "CRAM-MD5", "APOP"])
def test_wrong_password(services, tmp_path: Path, mech: str) -> None:  # type: ignore[no-untyped-def]
    pw = tmp_path / "pw"
    pw.write_text("not-the-password")
    with pytest.raises(Pop3AuthError) as e:
        log_in(mailbox(services, auth_mechanisms=[mech], password={"file": str(pw)}))
    assert "not-the-password" not in str(e.value)


def test_no_common_mechanism_is_a_clear_error(services, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Pop3AuthError, match=r"server offers .*allowed"):
        log_in(mailbox(services, auth_mechanisms=["SCRAM-SHA-256"]))
