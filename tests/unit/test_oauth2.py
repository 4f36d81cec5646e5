"""OAuth2 token sources (connector/auth/oauth2.py) against a real local HTTPS token endpoint:
the form each grant posts, the RS256 assertion, caching and refresh, the error mapping,
secrets kept out of messages and logs, the wiring into login and doctor, and the config rules."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from support.oauth_endpoint import Responder, TokenEndpoint, make_service_account, token_endpoint, verify_rs256

from connector.auth.oauth2 import (
    JWT_BEARER_GRANT,
    ClientCredentialsSource,
    HttpReply,
    JwtBearerSource,
    StaticTokenSource,
)
from connector.config import parse_config
from connector.config.model import MailboxConfig, Secret
from connector.errors import (
    ConfigError,
    OAuthError,
    OAuthTokenError,
    OAuthTokenUnavailableError,
    Pop3AuthError,
    Pop3TempError,
)
from connector.protocol.sasl import Mechanism, SaslExchange
from connector.runtime.doctor import _token_finding
from connector.runtime.login import login

CLIENT_ID = "0b1c2d3e-app"
CLIENT_SECRET = "Zx9~very.secret-value_42"
SCOPE = "https://outlook.office365.com/.default"
TOKEN = "eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiJ4In0.c2lnbmF0dXJl-access-token"


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Responses:
    """A mutable responder: tests swap ``reply`` (or set ``check``) while the endpoint runs."""

    def __init__(self) -> None:
        self.reply: tuple[int, Any, dict[str, str]] = (
            200,
            {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 3599},
            {},
        )
        self.delay = 0.0
        self.check: Responder | None = None

    def __call__(self, form: dict[str, str], headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        if self.delay:
            time.sleep(self.delay)
        if self.check is not None:
            return self.check(form, headers)
        return self.reply


@pytest.fixture
def responses() -> Responses:
    return Responses()


@pytest.fixture
def endpoint(tmp_path: Path, responses: Responses) -> Iterator[TokenEndpoint]:
    with token_endpoint(tmp_path / "pki", responses) as ep:
        yield ep


def client_source(ep: TokenEndpoint, clock: Clock | None = None, **kw: Any) -> ClientCredentialsSource:
    return ClientCredentialsSource(
        ep.url,
        CLIENT_ID,
        Secret(CLIENT_SECRET, "env:CLIENT_SECRET"),
        SCOPE,
        ca_file=ep.ca_file,
        clock=clock or Clock(),
        **kw,
    )


# ---------------------------------------------------------------------------- client credentials


def test_client_credentials_posts_the_rfc6749_form_over_verified_tls(endpoint: TokenEndpoint) -> None:
    src = client_source(endpoint)
    assert src.token() == TOKEN
    assert endpoint.requests == [
        {
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "scope": SCOPE,
        }
    ]
    assert src.lifetime == 3599.0


def test_scope_is_left_out_when_not_configured(endpoint: TokenEndpoint) -> None:
    src = ClientCredentialsSource(endpoint.url, CLIENT_ID, Secret(CLIENT_SECRET, "env:S"), ca_file=endpoint.ca_file)
    src.token()
    assert "scope" not in endpoint.requests[0]


def test_a_rotated_client_secret_file_is_used_at_the_next_request(endpoint: TokenEndpoint, tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text("first-secret\n")
    src = ClientCredentialsSource(
        endpoint.url, CLIENT_ID, Secret("first-secret", f"file:{f}", f), SCOPE, ca_file=endpoint.ca_file
    )
    src.token()
    time.sleep(0.01)
    f.write_text("second-secret\n")
    src.invalidate()
    src.token()
    assert [r["client_secret"] for r in endpoint.requests] == ["first-secret", "second-secret"]


# ---------------------------------------------------------------------------- caching


def test_cached_until_the_refresh_margin_then_refreshed(endpoint: TokenEndpoint, responses: Responses) -> None:
    clock = Clock()
    src = client_source(endpoint, clock)
    responses.reply = (200, {"access_token": "tok-1", "token_type": "Bearer", "expires_in": 1000}, {})
    assert src.token() == "tok-1"
    # margin = max(60 s, 10% of 1000 s) = 100 s: cached until 900 s after the request
    responses.reply = (200, {"access_token": "tok-2", "token_type": "bearer", "expires_in": 3600}, {})
    clock.t += 899
    assert src.token() == "tok-1" and len(endpoint.requests) == 1
    clock.t += 2
    assert src.token() == "tok-2" and len(endpoint.requests) == 2
    # 3600 s: margin 360 s
    clock.t += 3239
    assert src.token() == "tok-2" and len(endpoint.requests) == 2
    clock.t += 2
    src.token()
    assert len(endpoint.requests) == 3


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [(None, 3600.0), ("3599", 3599.0), ("soon", 3600.0), (-5, 0.0), (10**9, 86400.0)],
)
def test_expires_in_missing_or_odd(
    endpoint: TokenEndpoint, responses: Responses, expires_in: Any, lifetime: float
) -> None:
    body: dict[str, Any] = {"access_token": TOKEN, "token_type": "Bearer"}
    if expires_in is not None:
        body["expires_in"] = expires_in
    responses.reply = (200, body, {})
    src = client_source(endpoint)
    src.token()
    assert src.lifetime == lifetime


def test_a_short_lived_token_is_asked_for_at_every_login(endpoint: TokenEndpoint, responses: Responses) -> None:
    # lifetime 30 s < the 60 s minimum margin: never reused (documented)
    responses.reply = (200, {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 30}, {})
    src = client_source(endpoint)
    src.token()
    src.token()
    assert len(endpoint.requests) == 2


def test_invalidate_forces_a_new_request(endpoint: TokenEndpoint) -> None:
    src = client_source(endpoint)
    src.token()
    src.token()
    src.invalidate()
    src.token()
    assert len(endpoint.requests) == 2


def test_endpoint_down_at_refresh_uses_the_still_valid_token(
    endpoint: TokenEndpoint, responses: Responses, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    src = client_source(endpoint, clock)
    src.token()
    responses.reply = (503, "maintenance", {"Content-Type": "text/plain"})
    clock.t += 3500  # inside the refresh margin, 99 s before expiry
    with caplog.at_level(logging.WARNING, "pop3kafka.oauth2"):
        assert src.token() == TOKEN
    assert "using the cached token" in caplog.text and "HTTP 503" in caplog.text
    clock.t += 100  # expired now
    with pytest.raises(OAuthTokenUnavailableError, match="HTTP 503"):
        src.token()


def test_a_refusal_at_refresh_is_raised_even_with_a_valid_token(endpoint: TokenEndpoint, responses: Responses) -> None:
    clock = Clock()
    src = client_source(endpoint, clock)
    src.token()
    responses.reply = (401, {"error": "invalid_client", "error_description": "secret expired"}, {})
    clock.t += 3500
    with pytest.raises(OAuthTokenError, match="invalid_client: secret expired"):
        src.token()


def test_concurrent_logins_share_one_request(endpoint: TokenEndpoint, responses: Responses) -> None:
    responses.delay = 0.3
    src = client_source(endpoint)
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(src.token())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [TOKEN] * 8 and len(endpoint.requests) == 1


def test_concurrent_logins_share_one_failure(endpoint: TokenEndpoint, responses: Responses) -> None:
    responses.delay = 0.3
    responses.reply = (503, "down", {})
    src = client_source(endpoint)
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            src.token()
        except OAuthError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 6 and all(isinstance(e, OAuthTokenUnavailableError) for e in errors)
    assert len(endpoint.requests) == 1
    # a later call (not one that waited on the failed request) asks again
    responses.reply = (200, {"access_token": TOKEN}, {})
    responses.delay = 0
    assert src.token() == TOKEN and len(endpoint.requests) == 2


# ---------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "fragment"),
    [
        (
            400,
            {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."},
            {},
            OAuthTokenError,
            ": invalid_client: AADSTS7000215: Invalid client secret provided. (HTTP 400)",
        ),
        (
            400,
            {"error": "invalid_grant", "error_description": "Invalid email or User ID"},
            {},
            OAuthTokenError,
            "invalid_grant",
        ),
        (400, {"error": "invalid_scope"}, {}, OAuthTokenError, ": invalid_scope (HTTP 400)"),
        (
            503,
            "<html>Service Unavailable</html>",
            {"Content-Type": "text/html"},
            OAuthTokenUnavailableError,
            "HTTP 503",
        ),
        (
            429,
            {"error": "too_many_requests"},
            {"Retry-After": "7"},
            OAuthTokenUnavailableError,
            "HTTP 429: too_many_requests (Retry-After: 7)",
        ),
        (400, {"error": "temporarily_unavailable"}, {}, OAuthTokenUnavailableError, "temporarily_unavailable"),
        (
            200,
            "<html>sign in</html>",
            {"Content-Type": "text/html"},
            OAuthTokenError,
            "not a JSON object (Content-Type text/html)",
        ),
        (200, {"token_type": "Bearer", "expires_in": 3599}, {}, OAuthTokenError, "the answer has no access_token"),
        (200, {"access_token": "", "token_type": "Bearer"}, {}, OAuthTokenError, "access_token is empty"),
        (200, {"access_token": "a b\r\nc"}, {}, OAuthTokenError, "characters a bearer token cannot have"),
        (200, {"access_token": TOKEN, "token_type": "mac"}, {}, OAuthTokenError, "token_type 'mac' is not Bearer"),
        (
            302,
            "",
            {"Location": "https://u:pw@login.example.com/other?x=1"},
            OAuthTokenError,
            "redirect to https://login.example.com/other",
        ),
        (403, "forbidden", {}, OAuthTokenError, "HTTP 403 without an OAuth2 error code"),
    ],
)
def test_error_mapping(  # noqa: PLR0917 - parametrized
    endpoint: TokenEndpoint,
    responses: Responses,
    status: int,
    body: Any,
    headers: dict[str, str],
    kind: type[OAuthError],
    fragment: str,
) -> None:
    responses.reply = (status, body, headers)
    with pytest.raises(OAuthError) as e:
        client_source(endpoint).token()
    assert type(e.value) is kind
    msg = str(e.value)
    assert msg.startswith(f"OAuth2 token endpoint {endpoint.url}: "), msg
    assert fragment in msg, msg
    assert e.value.hint
    # the outcome the runtime derives from the hierarchy: refusals are auth failures, the rest retry
    if kind is OAuthTokenError:
        assert isinstance(e.value, Pop3AuthError) and not isinstance(e.value, Pop3TempError)
    else:
        assert isinstance(e.value, Pop3TempError) and not isinstance(e.value, Pop3AuthError)


def test_invalid_client_carries_code_and_hint(endpoint: TokenEndpoint, responses: Responses) -> None:
    responses.reply = (401, {"error": "invalid_client", "error_description": "bad secret"}, {})
    with pytest.raises(OAuthTokenError) as e:
        client_source(endpoint).token()
    assert e.value.oauth_error == "invalid_client" and "client_secret" in e.value.hint


def test_wrong_path_is_an_authentication_failure_naming_404(endpoint: TokenEndpoint) -> None:
    src = ClientCredentialsSource(
        endpoint.url.replace("/token", "/tokn"), CLIENT_ID, Secret(CLIENT_SECRET, "env:S"), ca_file=endpoint.ca_file
    )
    with pytest.raises(OAuthTokenError, match="HTTP 404 without an OAuth2 error code"):
        src.token()


def test_connection_refused_is_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    src = ClientCredentialsSource(f"https://127.0.0.1:{port}/token", CLIENT_ID, Secret(CLIENT_SECRET, "env:S"))
    with pytest.raises(OAuthTokenUnavailableError, match=rf"https://127.0.0.1:{port}/token: cannot connect: .*refused"):
        src.token()


def test_an_endpoint_that_never_answers_times_out_and_is_retryable() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def hold() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])  # accept, then say nothing
            except TimeoutError:
                continue

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    try:
        port = listener.getsockname()[1]
        src = ClientCredentialsSource(
            f"https://127.0.0.1:{port}/token", CLIENT_ID, Secret(CLIENT_SECRET, "env:S"), timeout=0.5
        )
        started = time.monotonic()
        with pytest.raises(OAuthTokenUnavailableError, match=r"no answer within 0\.5 s"):
            src.token()
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        t.join()
        for c in accepted:
            c.close()
        listener.close()


def test_untrusted_certificate_is_an_authentication_failure_with_the_ca_fix(endpoint: TokenEndpoint) -> None:
    src = ClientCredentialsSource(endpoint.url, CLIENT_ID, Secret(CLIENT_SECRET, "env:S"))  # system trust only
    with pytest.raises(OAuthTokenError, match="certificate not verified") as e:
        src.token()
    assert "ca_file" in e.value.hint
    assert endpoint.requests == []  # the secret never left


def test_plain_http_to_loopback_works_for_tests(responses: Responses) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            data = json.dumps({"access_token": TOKEN, "token_type": "Bearer"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/token"
        assert ClientCredentialsSource(url, CLIENT_ID, Secret(CLIENT_SECRET, "env:S")).token() == TOKEN
    finally:
        server.shutdown()
        server.server_close()
        t.join()


def test_an_injected_http_client_sees_url_body_and_timeout() -> None:
    seen: list[tuple[str, bytes, float]] = []

    def post(url: str, body: bytes, timeout: float) -> HttpReply:
        seen.append((url, body, timeout))
        return HttpReply(200, json.dumps({"access_token": TOKEN}).encode(), {"content-type": "application/json"})

    src = ClientCredentialsSource(
        "https://idp.example/token", CLIENT_ID, Secret(CLIENT_SECRET, "env:S"), "s", post=post, timeout=4
    )
    assert src.token() == TOKEN
    assert seen[0][0] == "https://idp.example/token" and seen[0][2] == 4
    assert b"grant_type=client_credentials" in seen[0][1]


# ---------------------------------------------------------------------------- secrets stay secret


def test_secrets_never_in_messages_or_logs(
    endpoint: TokenEndpoint, responses: Responses, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # A careless endpoint that echoes the whole request back in its error description.
    def echo(form: dict[str, str], headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        return 400, {"error": "invalid_client", "error_description": json.dumps(form)}, {}

    caplog.set_level(logging.DEBUG)
    responses.check = echo
    with pytest.raises(OAuthTokenError) as e:
        client_source(endpoint).token()
    assert CLIENT_SECRET not in str(e.value) and "***" in str(e.value)

    sa = tmp_path / "sa.json"
    key = make_service_account(sa, endpoint.url)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    jwt_src = JwtBearerSource(sa, "user@example.com", "https://mail.google.com/", ca_file=endpoint.ca_file)
    with pytest.raises(OAuthTokenError) as e2:
        jwt_src.token()
    assertion = endpoint.requests[-1]["assertion"]
    assert assertion not in str(e2.value) and "***" in str(e2.value)

    responses.check = None  # now succeed, and look at everything logged on the way
    client_source(endpoint).token()
    jwt_src.token()
    shown = caplog.text + repr(jwt_src) + repr(client_source(endpoint)) + jwt_src.describe()
    for secret in (CLIENT_SECRET, TOKEN, assertion, pem.splitlines()[1]):
        assert secret not in shown
    assert "OAuth2 token obtained" in caplog.text


def test_config_objects_do_not_print_secrets(endpoint: TokenEndpoint) -> None:
    mb = mailbox_of(client_credentials(endpoint))
    assert CLIENT_SECRET not in repr(mb) and CLIENT_ID in repr(mb)


# ---------------------------------------------------------------------------- JWT bearer


def test_jwt_bearer_posts_a_verifiable_rs256_assertion(
    endpoint: TokenEndpoint, responses: Responses, tmp_path: Path
) -> None:
    sa = tmp_path / "sa.json"
    key = make_service_account(sa, endpoint.url)
    clock = Clock(1_800_000_123.7)
    claims_seen: list[dict[str, Any]] = []

    def check(form: dict[str, str], headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        assert set(form) == {"grant_type", "assertion"}
        assert form["grant_type"] == JWT_BEARER_GRANT
        header, claims = verify_rs256(form["assertion"], key.public_key())
        assert header == {"alg": "RS256", "typ": "JWT", "kid": "kid-sa"}
        claims_seen.append(claims)
        token = "ya29." + base64.urlsafe_b64encode(claims["sub"].encode()).decode()
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": 3599}, {}

    responses.check = check
    src = JwtBearerSource(sa, "mary@example.com", "https://mail.google.com/", ca_file=endpoint.ca_file, clock=clock)
    mary = "ya29." + base64.urlsafe_b64encode(b"mary@example.com").decode()
    assert src.token() == mary
    assert claims_seen == [
        {
            "iss": "pop3-reader@proj.iam.gserviceaccount.com",
            "sub": "mary@example.com",
            "scope": "https://mail.google.com/",
            "aud": endpoint.url,  # the key file's token_uri, as token_url is not set
            "iat": 1_800_000_123,
            "exp": 1_800_000_123 + 3600,
        }
    ]
    assert src.token() == mary and len(endpoint.requests) == 1


def test_jwt_bearer_token_url_overrides_the_key_files(endpoint: TokenEndpoint, tmp_path: Path) -> None:
    sa = tmp_path / "sa.json"
    key = make_service_account(sa, "https://oauth2.googleapis.com/token")
    src = JwtBearerSource(sa, "u@example.com", "https://mail.google.com/", endpoint.url, ca_file=endpoint.ca_file)
    src.token()
    _, claims = verify_rs256(endpoint.requests[0]["assertion"], key.public_key())
    assert claims["aud"] == endpoint.url


def test_rotated_key_file_is_reread_and_drops_the_cache(
    endpoint: TokenEndpoint, responses: Responses, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sa = tmp_path / "sa.json"
    make_service_account(sa, endpoint.url)
    src = JwtBearerSource(sa, "u@example.com", "https://mail.google.com/", ca_file=endpoint.ca_file)
    src.token()
    time.sleep(0.01)
    new_key = make_service_account(sa, endpoint.url, client_email="rotated@proj.iam.gserviceaccount.com")
    src.token()
    assert len(endpoint.requests) == 2
    _, claims = verify_rs256(endpoint.requests[1]["assertion"], new_key.public_key())
    assert claims["iss"] == "rotated@proj.iam.gserviceaccount.com" and src.client_email == claims["iss"]
    # a half-written file during the next rotation: keep the last good key (and the cache)
    time.sleep(0.01)
    sa.write_text('{"type": "service_account", "private_key": "-----BEGIN')
    with caplog.at_level(logging.WARNING, "pop3kafka.oauth2"):
        src.token()
    assert "cannot be used" in caplog.text and "keeping the previous key" in caplog.text
    assert "BEGIN" not in caplog.text
    src.invalidate()
    src.token()
    verify_rs256(endpoint.requests[-1]["assertion"], new_key.public_key())


# ---------------------------------------------------------------------------- config


ENV = {"PW": "pw-value", "CLIENT_SECRET": CLIENT_SECRET}


def config(**mailbox: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"id": "exo", "host": "outlook.office365.com", "username": "shared@contoso.com"}
    m.update(mailbox)
    return {"kafka": {"bootstrap_servers": "k:9092"}, "topics": {"mail": "mail"}, "mailboxes": [m]}


def client_credentials(ep: TokenEndpoint | None = None, **over: Any) -> dict[str, Any]:
    o: dict[str, Any] = {
        "grant": "client_credentials",
        "token_url": ep.url if ep else "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token",
        "client_id": CLIENT_ID,
        "client_secret": {"env": "CLIENT_SECRET"},
        "scope": SCOPE,
    }
    if ep is not None:
        o["ca_file"] = ep.ca_file
    o.update(over)
    return {k: v for k, v in o.items() if v is not None}


def mailbox_of(oauth2: dict[str, Any], base: Path | None = None, **extra: Any) -> MailboxConfig:
    return parse_config(config(oauth2=oauth2, **extra), environ=ENV, base=base).mailboxes[0]


def config_error(data: dict[str, Any], base: Path | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, environ=ENV, base=base)
    return str(e.value)


def test_client_credentials_config_builds_a_source() -> None:
    mb = mailbox_of(client_credentials())
    assert isinstance(mb.oauth2, ClientCredentialsSource) and mb.token_source is mb.oauth2
    assert mb.oauth2.client_id == CLIENT_ID and mb.oauth2.scope == SCOPE
    assert mb.password.source == "none" and mb.oauth2_token is None


def test_mailboxes_of_one_app_registration_share_one_source() -> None:
    data = config(oauth2=client_credentials())
    data["mailboxes"].append({**data["mailboxes"][0], "id": "exo2", "username": "other@contoso.com"})
    data["mailboxes"].append(
        {**data["mailboxes"][0], "id": "exo3", "oauth2": client_credentials(scope="https://other/.default")}
    )
    a, b, c = parse_config(data, environ=ENV).mailboxes
    assert a.oauth2 is b.oauth2 and a.oauth2 is not c.oauth2


def test_jwt_bearer_config_subject_defaults_to_username(tmp_path: Path) -> None:
    make_service_account(tmp_path / "sa.json", "https://oauth2.googleapis.com/token")
    oauth2 = {"grant": "jwt_bearer", "service_account_file": "sa.json", "scope": "https://mail.google.com/"}
    mb = mailbox_of(oauth2, base=tmp_path, username="mary@example.com")
    assert isinstance(mb.oauth2, JwtBearerSource)
    assert mb.oauth2.subject == "mary@example.com" and mb.oauth2.token_url == "https://oauth2.googleapis.com/token"
    mb2 = mailbox_of({**oauth2, "subject": "boss@example.com"}, base=tmp_path, username="mary@example.com")
    assert isinstance(mb2.oauth2, JwtBearerSource) and mb2.oauth2.subject == "boss@example.com"


def test_oauth2_token_still_works_as_a_static_source(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.write_text("token-one\n")
    mb = parse_config(config(oauth2_token={"file": str(tok)}), environ=ENV).mailboxes[0]
    src = mb.token_source
    assert isinstance(src, StaticTokenSource) and mb.oauth2 is None
    assert src.token() == "token-one"
    time.sleep(0.01)
    tok.write_text("")
    with pytest.raises(OAuthTokenUnavailableError, match=r"oauth2_token \(file:.*\) is empty"):
        src.token()


@pytest.mark.parametrize(
    ("mailbox", "fragment"),
    [
        (
            {"oauth2": client_credentials(), "oauth2_token": {"env": "PW"}},
            "mailboxes[0].oauth2: give either oauth2 (the connector fetches tokens) or oauth2_token",
        ),
        (
            {},
            "mailboxes[0].password: required key is missing ({env: VAR} or {file: /path}; "
            "or give oauth2 or oauth2_token",
        ),
        (
            {"password": {"env": "PW"}, "auth_mechanisms": ["XOAUTH2"]},
            "mailboxes[0].auth_mechanisms: XOAUTH2 need an OAuth2 token; add oauth2",
        ),
        ({"oauth2": {"token_url": "https://x/t"}}, "mailboxes[0].oauth2.grant: required key is missing"),
        ({"oauth2": client_credentials(grant="client_credential")}, "did you mean 'client_credentials'?"),
        (
            {"oauth2": client_credentials(client_id=None)},
            "mailboxes[0].oauth2.client_id: required with grant: client_credentials",
        ),
        (
            {"oauth2": client_credentials(token_url=None)},
            "mailboxes[0].oauth2.token_url: required with grant: client_credentials",
        ),
        ({"oauth2": client_credentials(client_secret=None)}, "mailboxes[0].oauth2.client_secret: required with grant"),
        (
            {"oauth2": client_credentials(client_secret="inline!")},
            "mailboxes[0].oauth2.client_secret: expected a mapping",
        ),
        (
            {"oauth2": client_credentials(client_secret={"env": "NOPE"})},
            "mailboxes[0].oauth2.client_secret.env: environment variable 'NOPE' is not set",
        ),
        ({"oauth2": client_credentials(subject="x@y")}, "mailboxes[0].oauth2.subject: only for grant: jwt_bearer"),
        (
            {"oauth2": client_credentials(client_secert={"env": "X"})},
            "mailboxes[0].oauth2.client_secert: unknown key; did you mean 'client_secret'?",
        ),
        (
            {"oauth2": client_credentials(token_url="http://login.example.com/token")},
            "http:// would send the credentials unencrypted; use https://",
        ),
        ({"oauth2": client_credentials(token_url="ftp://127.0.0.1/token")}, "give an https:// URL with a host name"),
        ({"oauth2": client_credentials(token_url="https://login.example.com/t#frag")}, "remove the #fragment"),
        (
            {"oauth2": client_credentials(ca_file="/does/not/exist.pem")},
            "mailboxes[0].oauth2.ca_file: '/does/not/exist.pem' does not exist",
        ),
        (
            {"oauth2": client_credentials(timeout_seconds=0)},
            "mailboxes[0].oauth2.timeout_seconds: 0 is below the minimum 1",
        ),
        (
            {"oauth2": {"grant": "jwt_bearer", "scope": "s"}},
            "mailboxes[0].oauth2.service_account_file: required with grant: jwt_bearer",
        ),
        (
            {"oauth2": {"grant": "jwt_bearer", "service_account_file": "/x.json"}},
            "mailboxes[0].oauth2.scope: required with grant: jwt_bearer",
        ),
        (
            {
                "oauth2": {
                    "grant": "jwt_bearer",
                    "service_account_file": "/x.json",
                    "scope": "s",
                    "client_secret": {"env": "PW"},
                }
            },
            "mailboxes[0].oauth2.client_secret: only for grant: client_credentials",
        ),
        (
            {"oauth2": {"grant": "jwt_bearer", "service_account_file": "/does/not/exist.json", "scope": "s"}},
            "mailboxes[0].oauth2.service_account_file: cannot read '/does/not/exist.json': No such file or directory",
        ),
    ],
)
def test_config_errors_name_the_key(mailbox: dict[str, Any], fragment: str) -> None:
    msg = config_error(config(**mailbox))
    assert fragment in msg, msg
    assert CLIENT_SECRET not in msg and "inline!" not in msg


def test_userinfo_in_token_url_is_refused_without_echoing_it() -> None:
    msg = config_error(config(oauth2=client_credentials(token_url="https://app:hunter2@login.example.com/token")))
    assert "mailboxes[0].oauth2.token_url: (value hidden): remove the user:password@ part" in msg
    assert "hunter2" not in msg


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/token", "http://localhost/token", "http://[::1]:9/t"])
def test_plain_http_is_accepted_for_loopback_only(url: str) -> None:
    assert isinstance(mailbox_of(client_credentials(token_url=url)).oauth2, ClientCredentialsSource)


def _sa_error(tmp_path: Path, content: str | bytes, **oauth2: Any) -> str:
    f = tmp_path / "key.json"
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        f.write_text(content)
    o = {"grant": "jwt_bearer", "service_account_file": str(f), "scope": "https://mail.google.com/", **oauth2}
    return config_error(config(oauth2=o))


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _sa_json(**over: Any) -> str:
    d: dict[str, Any] = {
        "type": "service_account",
        "client_email": "sa@proj.iam.gserviceaccount.com",
        "private_key_id": "k1",
        "private_key": _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    d.update(over)
    return json.dumps({k: v for k, v in d.items() if v is not None})


def test_service_account_file_problems_are_named_without_content(tmp_path: Path) -> None:
    prefix = "mailboxes[0].oauth2.service_account_file: "
    msg = _sa_error(tmp_path, "{not json")
    assert msg.startswith(prefix) and "is not JSON (line 1, column 2" in msg
    assert "is not UTF-8 text" in _sa_error(tmp_path, b"\xff\xfe{}")
    assert "is not a JSON object" in _sa_error(tmp_path, "[1, 2]")
    assert "missing private_key" in _sa_error(tmp_path, _sa_json(private_key=None))
    assert "missing client_email, private_key_id" in _sa_error(tmp_path, _sa_json(client_email=None, private_key_id=""))
    garbage = "-----BEGIN PRIVATE KEY-----\nTOPSECRETMATERIAL\n-----END PRIVATE KEY-----\n"
    msg = _sa_error(tmp_path, _sa_json(private_key=garbage))
    assert "private_key is not an unencrypted PEM private key" in msg and "TOPSECRET" not in msg
    ec_key = _pem(ec.generate_private_key(ec.SECP256R1()))
    assert "private_key is not an RSA key" in _sa_error(tmp_path, _sa_json(private_key=ec_key))
    assert "holds a 'authorized_user' credential" in _sa_error(tmp_path, _sa_json(type="authorized_user"))
    assert "has no token_uri; set oauth2.token_url" in _sa_error(tmp_path, _sa_json(token_uri=None))
    msg = _sa_error(tmp_path, _sa_json(token_uri="http://tokens.example.com/token"))
    assert "token_uri of" in msg and "http:// would send the credentials unencrypted" in msg
    # an unreadable file (a directory here: works as root too)
    (tmp_path / "dir.json").mkdir()
    o = {"grant": "jwt_bearer", "service_account_file": str(tmp_path / "dir.json"), "scope": "s"}
    assert "cannot read" in config_error(config(oauth2=o))


# ---------------------------------------------------------------------------- login and doctor wiring


class FakeSession:
    """The login side of a POP3 session: records the SASL exchange's first line."""

    def __init__(self, offered: list[str], refuse: bool = False) -> None:
        self.offered = offered
        self.refuse = refuse
        self.sent: list[bytes] = []

    def capabilities(self, *, refresh: bool = False) -> dict[str, list[str]]:
        return {"SASL": self.offered}

    def login_user_pass(self, username: str, password: str) -> None:
        raise AssertionError("no USER/PASS expected")

    def login_apop(self, username: str, secret: str) -> None:
        raise AssertionError("no APOP expected")

    def login_sasl(self, mechanism: Mechanism, *, username: str) -> None:
        exchange = SaslExchange(mechanism, max_line=None)  # initial response always on the AUTH line
        self.sent.append(exchange.start())
        if self.refuse:
            raise Pop3AuthError(f"AUTH {mechanism.name} failed: login as {username!r}")


def _sasl_payload(line: bytes) -> str:
    return base64.b64decode(line.split()[-1]).decode()


def test_two_logins_make_one_token_request(endpoint: TokenEndpoint) -> None:
    mb = mailbox_of(client_credentials(endpoint))
    sessions = [FakeSession(["PLAIN", "XOAUTH2"]), FakeSession(["OAUTHBEARER", "XOAUTH2"])]
    assert [login(s, mb) for s in sessions] == ["XOAUTH2", "OAUTHBEARER"]
    assert len(endpoint.requests) == 1
    assert f"auth=Bearer {TOKEN}" in _sasl_payload(sessions[0].sent[0])
    assert f"auth=Bearer {TOKEN}" in _sasl_payload(sessions[1].sent[0])


def test_a_token_the_server_refuses_is_not_reused(endpoint: TokenEndpoint) -> None:
    mb = mailbox_of(client_credentials(endpoint))
    with pytest.raises(Pop3AuthError):
        login(FakeSession(["XOAUTH2"], refuse=True), mb)
    login(FakeSession(["XOAUTH2"]), mb)
    assert len(endpoint.requests) == 2


def test_a_password_login_never_asks_the_token_endpoint(endpoint: TokenEndpoint, responses: Responses) -> None:
    responses.reply = (503, "down", {})

    class PasswordOnly(FakeSession):
        def login_user_pass(self, username: str, password: str) -> None:
            self.sent.append(b"USER/PASS")

    mb = mailbox_of(client_credentials(endpoint), password={"env": "PW"}, auth_mechanisms=["XOAUTH2", "USER"])
    s = PasswordOnly(["PLAIN"])  # no token mechanism offered
    assert login(s, mb) == "USER" and endpoint.requests == []


def test_token_endpoint_failure_surfaces_from_login_typed(endpoint: TokenEndpoint, responses: Responses) -> None:
    responses.reply = (400, {"error": "unauthorized_client", "error_description": "no DWD"}, {})
    with pytest.raises(OAuthTokenError, match="unauthorized_client: no DWD"):
        login(FakeSession(["XOAUTH2"]), mailbox_of(client_credentials(endpoint)))


def _jwt(claims: dict[str, Any]) -> str:
    def part(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


def test_doctor_token_check_verdicts(endpoint: TokenEndpoint, responses: Responses) -> None:
    mb = mailbox_of(client_credentials(endpoint))
    assert mb.oauth2 is not None
    good = _jwt({"aud": "https://outlook.office365.com", "roles": ["POP.AccessAsApp"]})
    responses.reply = (200, {"access_token": good, "token_type": "Bearer", "expires_in": 3599}, {})
    f = _token_finding(mb, mb.oauth2)
    assert f.ok and f.check == "pop3[exo].oauth2", f
    assert "aud https://outlook.office365.com; roles POP.AccessAsApp; valid for 3599 s" in f.detail
    assert good not in f.detail

    mb.oauth2.invalidate()
    responses.reply = (
        200,
        {"access_token": _jwt({"aud": "https://outlook.office365.com"}), "token_type": "Bearer"},
        {},
    )
    f = _token_finding(mb, mb.oauth2)
    assert not f.ok and "without the role POP.AccessAsApp" in f.detail and f.fix and "admin consent" in f.fix

    mb.oauth2.invalidate()
    responses.reply = (401, {"error": "invalid_client", "error_description": "AADSTS7000215"}, {})
    f = _token_finding(mb, mb.oauth2)
    assert not f.ok and "invalid_client: AADSTS7000215" in f.detail and f.fix and "client_secret" in f.fix
