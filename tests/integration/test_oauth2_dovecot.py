"""OAuth2 token sources end to end: a local HTTPS token endpoint mints the HS256 JWTs that the
real Dovecot validates (deploy/local/localstack.py, DovecotServer.oauth_key_file), and the
connector fetches them with the client credentials grant (RFC 6749 §4.4) or the JWT bearer
grant (RFC 7523 §2.1), then logs in with OAUTHBEARER/XOAUTH2 over TLS.

Users: bob and alice for logins, carol for the full poll (no other test uses them).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from support.cli import run_cli
from support.configs import write_config
from support.jwt import make_jwt
from support.kafkautil import consume_all
from support.mailgen import make_mail
from support.oauth_endpoint import TokenEndpoint, make_service_account, token_endpoint, verify_rs256

from connector.auth.oauth2 import JWT_BEARER_GRANT
from connector.config import parse_config
from connector.config.model import MailboxConfig
from connector.errors import OAuthError, Pop3AuthError
from connector.protocol import Pop3Session
from connector.runtime.login import login
from connector.runtime.sessions import open_session

pytestmark = pytest.mark.integration

CLIENT_ID = "pop3-kafka-test-app"
CLIENT_SECRET = "cc-secret-Q7~value"
ENV = {"OA_SECRET": CLIENT_SECRET, "OA_WRONG": "not-the-client-secret"}


@dataclass
class Issuer:
    """What the endpoint does: who the minted token is for, and the service-account key to check."""

    key_file: Path
    token_user: str | None = None  # None: the JWT assertion's sub (jwt_bearer) or the mailbox user
    sa_key: rsa.RSAPrivateKey | None = None
    assertions: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, form: dict[str, str], headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        if form.get("grant_type") == "client_credentials":
            if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
                return 401, {"error": "invalid_client", "error_description": "unknown client or wrong secret"}, {}
            sub = self.token_user or "bob"
        elif form.get("grant_type") == JWT_BEARER_GRANT:
            assert self.sa_key is not None
            _, claims = verify_rs256(form["assertion"], self.sa_key.public_key())
            self.assertions.append(claims)
            sub = self.token_user or claims["sub"]
        else:
            return 400, {"error": "unsupported_grant_type"}, {}
        return 200, {"access_token": make_jwt(self.key_file, sub), "token_type": "Bearer", "expires_in": 600}, {}


@pytest.fixture
def issuer(services) -> Issuer:  # type: ignore[no-untyped-def]
    return Issuer(services.dovecot.oauth_key_file)


@pytest.fixture
def endpoint(tmp_path: Path, issuer: Issuer) -> Iterator[TokenEndpoint]:
    with token_endpoint(tmp_path / "token-pki", issuer) as ep:
        yield ep


def client_credentials(ep: TokenEndpoint, secret_env: str = "OA_SECRET") -> dict[str, Any]:  # noqa: S107 - a variable name
    return {
        "grant": "client_credentials",
        "token_url": ep.url,
        "client_id": CLIENT_ID,
        "client_secret": {"env": secret_env},
        "scope": "https://outlook.office365.com/.default",
        "ca_file": ep.ca_file,
    }


def mailbox_dict(
    services, mid: str, user: str, oauth2: dict[str, Any], tls: str = "implicit", **extra: Any
) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {
        "id": mid,
        "host": "127.0.0.1",
        "port": services.dovecot.pop3s_port if tls == "implicit" else services.dovecot.pop3_port,
        "tls": tls,
        "tls_ca_file": services.cafile,
        "username": user,
        "oauth2": oauth2,
        "poll_interval_seconds": 1,
        **extra,
    }


def mailbox(services, user: str, oauth2: dict[str, Any], **extra: Any) -> MailboxConfig:  # type: ignore[no-untyped-def]
    data = {"kafka": {"bootstrap_servers": "x:1"}, "topics": {"mail": "m"}}
    data["mailboxes"] = [mailbox_dict(services, "oa", user, oauth2, **extra)]  # type: ignore[list-item]
    return parse_config(data, environ=ENV).mailboxes[0]


def log_in(mb: MailboxConfig) -> str:
    session = open_session(mb)
    try:
        used = login(session, mb)
        assert isinstance(session, Pop3Session)
        session.stat()  # TRANSACTION state: Dovecot accepted the token
        return used
    finally:
        session.abort()


@pytest.mark.parametrize(
    ("tls", "mechs", "used"),
    [
        ("implicit", None, "OAUTHBEARER"),
        ("implicit", ["XOAUTH2-TWO-STEP"], "XOAUTH2-TWO-STEP"),  # the form Exchange Online needs
        ("starttls", ["XOAUTH2"], "XOAUTH2"),
    ],
)
def test_client_credentials_login_and_the_token_is_cached_across_sessions(  # type: ignore[no-untyped-def]
    services, endpoint: TokenEndpoint, tls: str, mechs: list[str] | None, used: str
) -> None:
    extra = {"auth_mechanisms": mechs} if mechs else {}
    mb = mailbox(services, "bob", client_credentials(endpoint), tls=tls, **extra)
    assert log_in(mb) == used
    assert log_in(mb) == used
    assert len(endpoint.requests) == 1
    assert endpoint.requests[0]["client_secret"] == CLIENT_SECRET


def test_jwt_bearer_login_acts_as_the_mailbox_user(  # type: ignore[no-untyped-def]
    services, endpoint: TokenEndpoint, issuer: Issuer, tmp_path: Path
) -> None:
    sa = tmp_path / "sa.json"
    issuer.sa_key = make_service_account(sa, endpoint.url)
    oauth2 = {
        "grant": "jwt_bearer",
        "service_account_file": str(sa),
        "scope": "https://mail.google.com/",
        "ca_file": endpoint.ca_file,
    }
    mb = mailbox(services, "bob", oauth2)
    assert log_in(mb) == "OAUTHBEARER"
    assert log_in(mb) == "OAUTHBEARER"
    assert len(issuer.assertions) == 1
    claims = issuer.assertions[0]
    assert claims["sub"] == "bob" and claims["aud"] == endpoint.url and claims["scope"] == "https://mail.google.com/"
    assert claims["exp"] - claims["iat"] == 3600


def test_a_token_for_another_user_is_refused_by_dovecot_and_not_reused(  # type: ignore[no-untyped-def]
    services, endpoint: TokenEndpoint, issuer: Issuer
) -> None:
    issuer.token_user = "alice"  # the endpoint hands out a token for the wrong mailbox
    mb = mailbox(services, "bob", client_credentials(endpoint))
    with pytest.raises(Pop3AuthError) as e:
        log_in(mb)
    assert not isinstance(e.value, OAuthError)  # the POP3 server refused, not the token endpoint
    assert "bob" in str(e.value) and "eyJ" not in str(e.value)
    issuer.token_user = None  # fixed at the identity provider: the next login fetches anew
    assert log_in(mb) == "OAUTHBEARER"
    assert len(endpoint.requests) == 2


def test_invalid_client_is_a_typed_auth_error_before_any_pop3_login(services, endpoint: TokenEndpoint) -> None:  # type: ignore[no-untyped-def]
    mb = mailbox(services, "bob", client_credentials(endpoint, secret_env="OA_WRONG"))
    with pytest.raises(OAuthError) as e:
        log_in(mb)
    assert isinstance(e.value, Pop3AuthError) and e.value.oauth_error == "invalid_client"
    assert str(e.value) == (
        f"OAuth2 token endpoint {endpoint.url}: invalid_client: unknown client or wrong secret (HTTP 401)"
    )


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=ENV, timeout=timeout)


def test_poll_once_with_client_credentials(  # type: ignore[no-untyped-def]
    services, endpoint: TokenEndpoint, issuer: Issuer, topic: str, tmp_path: Path
) -> None:
    services.dovecot.clear("carol")
    expected = []
    for i in range(3):
        raw, exp = make_mail(i, seed=13)
        services.dovecot.put("carol", raw)
        expected.append(exp.message_id)
    issuer.token_user = "carol"
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox_dict(services, "oa-poll", "carol", client_credentials(endpoint)),
            mailbox_dict(services, "oa-bad", "alice", client_credentials(endpoint, secret_env="OA_WRONG")),
        ],
    )
    proc = cli("poll-once", "--config", str(cfg))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # oa-bad fails, oa-poll succeeds
    assert "oa-poll: ok: 3 published, 3 deleted of 3 listed" in proc.stdout, proc.stdout + proc.stderr
    assert "oa-bad: FAILED" in proc.stderr and "OAuthTokenError" in proc.stderr and "step login" in proc.stderr
    assert "invalid_client" in proc.stderr
    for secret in (CLIENT_SECRET, ENV["OA_WRONG"]):
        assert secret not in proc.stdout + proc.stderr
    got = consume_all(services.bootstrap, topic, expect=3)
    assert sorted(c.record["message_id"] for c in got) == sorted(expected)
    assert services.dovecot.count("carol") == 0


def test_doctor_fetches_the_token_as_its_own_check(
    services, endpoint: TokenEndpoint, topic: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    cfg = write_config(
        tmp_path / "d.yaml",
        services.bootstrap,
        topic,
        [
            mailbox_dict(services, "oa-ok", "bob", client_credentials(endpoint)),
            mailbox_dict(services, "oa-bad", "bob", client_credentials(endpoint, secret_env="OA_WRONG")),
        ],
    )
    ok = cli("doctor", "--config", str(cfg), "--mailbox", "oa-ok")
    assert "ok   pop3[oa-ok].oauth2: client_credentials grant for client_id pop3-kafka-test-app" in ok.stdout, ok.stdout
    assert "ok   pop3[oa-ok].login: logged in with OAUTHBEARER" in ok.stdout, ok.stdout
    bad = cli("doctor", "--config", str(cfg), "--mailbox", "oa-bad")
    assert bad.returncode == 1
    assert f"FAIL pop3[oa-bad].oauth2: OAuth2 token endpoint {endpoint.url}: invalid_client" in bad.stdout, bad.stdout
    assert "fix: check oauth2.client_id and oauth2.client_secret" in bad.stdout, bad.stdout
    for secret in (CLIENT_SECRET, ENV["OA_WRONG"]):
        assert secret not in ok.stdout + ok.stderr + bad.stdout + bad.stderr
