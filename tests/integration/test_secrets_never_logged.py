"""Issue 8: secrets never show. The real CLI (`--log-format json --log-level debug`) runs against
the real Dovecot and Kafka, on success and on failure paths, and no secret appears in its stdout
or stderr in any form (tests/support/leaks.py: plain, UTF-16, base64 at every alignment; plus
here the forms a log line could carry it in: JSON and Python escapes, URL encoding):

* POP3 passwords, as sent with USER/PASS and SASL PLAIN (and PLAIN's whole base64 initial
  response), on a login that succeeds and one that the server refuses;
* an OAuth2 client secret and the access tokens the token endpoint minted, and the base64
  XOAUTH2 / OAUTHBEARER strings that carry them, with a token Dovecot accepts, one it refuses,
  and a client secret the endpoint refuses;
* key passphrases: a TLS client key and two S/MIME keys (PKCS#12 and PEM), right and wrong;
* `doctor` for the same configurations, including failing ones;
* librdkafka debug logging (kafka.client debug: all) with Kafka secrets in kafka.client_secrets;
* tracebacks: an internal error (injected through sitecustomize) raised while a credential line
  is being sent, logged with its traceback by both delivery modes, and uncaught in `doctor`.

Dovecot users: dave (whose password has spaces and non-ASCII letters; his mailbox is emptied
here) for logins that succeed, and empty for refused ones (nothing of it is ever touched).
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from support.cli import run_cli
from support.configs import mailbox, write_config
from support.jwt import make_jwt
from support.kafkautil import consume_all
from support.leaks import assert_no_leak
from support.mailgen import make_mail
from support.oauth_endpoint import TokenEndpoint, token_endpoint
from support.smime import make_pki

pytestmark = pytest.mark.integration

USER = "dave"  # logins that succeed
REFUSED = "empty"  # logins that fail (wrong password or token): the mailbox is never opened
TIMEOUT = 60  # seconds per CLI call

# Distinctive markers, each used once, so a hit names its source.
WRONG_PASSWORD = "Wr0ng-Pässwörd for-the-leak-test/QX7"
CLIENT_ID = "snl-leak-test-app"
CLIENT_SECRET = "Cl1ent/Secret+of-the-leak-test~ZK4"
WRONG_CLIENT_SECRET = "N0t-the/Client+Secret~of-the-leak-test-JM2"
TLS_KEY_PASSPHRASE = "TLS-k3y pässphrase/of-the-leak-test+RV5"
WRONG_TLS_KEY_PASSPHRASE = "Wr0ng TLS-key-passphrase/leak-test+HB9"
P12_PASSPHRASE = "P12-k3y pässphrase/of-the-leak-test+WN3"
PEM_PASSPHRASE = "PEM-k3y-passphrase/of-the-leak-test+TC8"
WRONG_SMIME_PASSPHRASE = "Wr0ng S/MIME-passphrase/leak-test+YD6"
SASL_PASSWORD = "Kafka-SASL-p4ssword/of-the-leak-test+FS1"
SSL_KEY_PASSWORD = "Kafka-ssl-key-p4ss/of-the-leak-test+LE2"

# ------------------------------------------------------------------------------- helpers


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return run_cli("--log-format", "json", "--log-level", "debug", *args, env=env, timeout=timeout)


def log_docs(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    docs = []
    for line in proc.stderr.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            docs.append(doc)
    return docs


def texts_of(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """stdout and stderr as written, plus every field of every JSON log line decoded (a
    secret JSON-escaped in a line is plain again here)."""
    return [proc.stdout, proc.stderr, *(str(v) for doc in log_docs(proc) for v in doc.values())]


def extra_forms(marker: str) -> set[str]:
    """Forms beyond support/leaks.py's: JSON escapes, str and bytes repr, URL encoding."""
    return {
        json.dumps(marker)[1:-1],
        repr(marker)[1:-1],
        repr(marker.encode())[2:-1],
        urllib.parse.quote(marker, safe=""),
        urllib.parse.quote_plus(marker),
    }


def assert_never_shown(procs: list[subprocess.CompletedProcess[str]], *markers: str) -> None:
    assert procs and markers
    for proc in procs:
        texts = texts_of(proc)
        for marker in markers:
            assert len(marker) >= 12, f"marker too short to be distinctive: {marker!r}"
            assert_no_leak(marker, *texts)
            for form in extra_forms(marker):
                for text in texts:
                    assert form not in text, f"secret leaked as {form!r} in: {proc.args}"


def b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


def plain_markers(user: str, password: str) -> list[str]:
    """The password, PLAIN's initial response (RFC 4616: NUL user NUL password) and its base64."""
    response = f"\0{user}\0{password}"
    return [password, response, b64(response)]


def token_markers(token: str, user: str, port: int) -> list[str]:
    """The token, its signature, and the XOAUTH2 and OAUTHBEARER messages in base64."""
    xoauth2 = f"user={user}\x01auth=Bearer {token}\x01\x01"
    bearer = f"n,a={user},\x01host=127.0.0.1\x01port={port}\x01auth=Bearer {token}\x01\x01"
    return [token, token.rsplit(".", 1)[1], b64(xoauth2), b64(bearer)]


def error_lines(proc: subprocess.CompletedProcess[str], mailbox_id: str) -> list[dict[str, Any]]:
    return [d for d in log_docs(proc) if d.get("level") == "error" and d.get("mailbox") == mailbox_id]


def box(mid: str, user: str, services: Any, **extra: Any) -> dict[str, Any]:
    return mailbox(mid, user, services.dovecot.pop3s_port, services.cafile, **extra)


def config(
    path: Path, services: Any, topic: str, boxes: list[dict[str, Any]], mode: str = "at_least_once", **sections: Any
) -> Path:
    return write_config(
        path,
        services.bootstrap,
        topic,
        boxes,
        delivery={"mode": mode, "transactional_id_prefix": f"snl-{topic}"},
        ledger={"topic": f"{topic}.ledger"},
        **sections,
    )


def put_one(services: Any, seed: int) -> str:
    raw, exp = make_mail(0, seed=seed)
    services.dovecot.put(USER, raw)
    return exp.message_id


def secret_file(path: Path, value: str) -> dict[str, str]:
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(0o600)
    return {"file": str(path)}


# ------------------------------------------------------------------------------- 1. passwords


def test_pop3_passwords_never_shown(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    password = services.dovecot.users[USER]
    assert password == "p@ss wörd ünïcode"  # spaces and non-ASCII: every encoding differs
    env = {"PW_DAVE": password, "PW_WRONG": WRONG_PASSWORD}
    ok_plain = box("dave-plain", USER, services, password={"env": "PW_DAVE"}, auth_mechanisms=["PLAIN"])
    ok_user = box("dave-user", USER, services, password={"env": "PW_DAVE"}, auth_mechanisms=["USER"])
    bad_user = box("refused-user", REFUSED, services, password={"env": "PW_WRONG"}, auth_mechanisms=["USER"])
    bad_plain = box("refused-plain", REFUSED, services, password={"env": "PW_WRONG"}, auth_mechanisms=["PLAIN"])
    services.dovecot.clear(USER)

    runs = []
    for n, (ok, bad, mode) in enumerate([(ok_plain, bad_user, "exactly_once"), (ok_user, bad_plain, "at_least_once")]):
        put_one(services, seed=800 + n)
        cfg = config(tmp_path / f"c{n}.yaml", services, topic, [ok, bad], mode=mode)
        proc = cli("poll-once", "--config", str(cfg), env=env)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        assert f"{ok['id']}: ok: 1 published, 1 deleted of 1 listed" in proc.stdout, out
        assert f"{bad['id']}: FAILED: [mailbox '{bad['id']}', step login] Pop3AuthError: login as 'empty'" in out
        assert "Authentication failed" in out
        assert error_lines(proc, bad["id"]), out  # the refusal was logged at ERROR, naming the mailbox
        runs.append(proc)
    assert len(consume_all(services.bootstrap, topic, expect=2)) == 2

    cfg = config(tmp_path / "doctor.yaml", services, topic, [ok_plain, ok_user, bad_user, bad_plain])
    doctor = cli("doctor", "--config", str(cfg), env=env)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    for mid, mech in (("dave-plain", "PLAIN"), ("dave-user", "USER")):
        assert f"ok   pop3[{mid}].login: logged in with {mech}" in doctor.stdout, doctor.stdout
    for mid in ("refused-user", "refused-plain"):
        assert f"FAIL pop3[{mid}].login: login as 'empty' refused" in doctor.stdout, doctor.stdout
    runs.append(doctor)

    assert_never_shown(runs, *plain_markers(USER, password), *plain_markers(REFUSED, WRONG_PASSWORD))


# ------------------------------------------------------------------------------- 2. OAuth2


@dataclass
class MintingIssuer:
    """client_credentials for CLIENT_ID/CLIENT_SECRET; mints an HS256 JWT Dovecot accepts for
    dave (a unique one each time) and records it."""

    key_file: Path
    issued: list[str] = field(default_factory=list)

    def __call__(self, form: dict[str, str], headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}, {}
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return 401, {"error": "invalid_client", "error_description": "unknown client or wrong secret"}, {}
        token = make_jwt(self.key_file, USER, jti=f"snl-{uuid.uuid4().hex}")
        self.issued.append(token)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": 600}, {}


@pytest.fixture
def issuer(services) -> MintingIssuer:  # type: ignore[no-untyped-def]
    return MintingIssuer(services.dovecot.oauth_key_file)


@pytest.fixture
def endpoint(tmp_path: Path, issuer: MintingIssuer) -> Iterator[TokenEndpoint]:
    with token_endpoint(tmp_path / "token-pki", issuer) as ep:
        yield ep


def oauth_box(services: Any, mid: str, user: str, mech: str, *, ep: TokenEndpoint, secret_env: str) -> dict[str, Any]:
    m = box(mid, user, services, auth_mechanisms=[mech])
    del m["password"]
    m["oauth2"] = {
        "grant": "client_credentials",
        "token_url": ep.url,
        "client_id": CLIENT_ID,
        "client_secret": {"env": secret_env},
        "scope": "https://outlook.office365.com/.default",
        "ca_file": ep.ca_file,
    }
    return m


def test_oauth2_secret_and_tokens_never_shown(  # type: ignore[no-untyped-def]
    services, endpoint: TokenEndpoint, issuer: MintingIssuer, topic: str, tmp_path: Path
) -> None:
    env = {"OA_SECRET": CLIENT_SECRET, "OA_WRONG": WRONG_CLIENT_SECRET}
    xoauth2 = oauth_box(services, "oa-xoauth2", USER, "XOAUTH2", ep=endpoint, secret_env="OA_SECRET")
    bearer = oauth_box(services, "oa-bearer", USER, "OAUTHBEARER", ep=endpoint, secret_env="OA_SECRET")
    # the same client, so the same token (minted for dave): Dovecot refuses it for another user
    refused_x = oauth_box(services, "oa-refused-x", REFUSED, "XOAUTH2", ep=endpoint, secret_env="OA_SECRET")
    refused_b = oauth_box(services, "oa-refused-b", REFUSED, "OAUTHBEARER", ep=endpoint, secret_env="OA_SECRET")
    bad_secret = oauth_box(services, "oa-badsecret", REFUSED, "XOAUTH2", ep=endpoint, secret_env="OA_WRONG")
    # a static token from a file that Dovecot refuses (expired): the server's error JSON path
    static = make_jwt(services.dovecot.oauth_key_file, REFUSED, lifetime=-60, jti=f"snl-static-{uuid.uuid4().hex}")
    expired = box("oa-expired", REFUSED, services, auth_mechanisms=["XOAUTH2"])
    del expired["password"]
    expired["oauth2_token"] = secret_file(tmp_path / "static.token", static)
    services.dovecot.clear(USER)

    runs = []
    for n, boxes in enumerate([[xoauth2, refused_x, bad_secret], [bearer, refused_b, expired]]):
        put_one(services, seed=810 + n)
        cfg = config(tmp_path / f"c{n}.yaml", services, topic, boxes, mode="exactly_once" if n else "at_least_once")
        proc = cli("poll-once", "--config", str(cfg), env=env)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        assert f"{boxes[0]['id']}: ok: 1 published, 1 deleted of 1 listed" in proc.stdout, out
        for failed in boxes[1:]:
            assert f"{failed['id']}: FAILED: [mailbox '{failed['id']}', step login]" in out, out
            assert error_lines(proc, failed["id"]), out
        runs.append(proc)
    out = runs[0].stdout + runs[0].stderr
    assert "oa-refused-x: FAILED" in out and "Pop3AuthError: login as 'empty'" in out
    assert "oa-badsecret: FAILED" in out and "OAuthTokenError" in out and "invalid_client" in out
    assert "the server said" in runs[1].stderr  # Dovecot's RFC 7628 error JSON for the refused tokens
    assert len(consume_all(services.bootstrap, topic, expect=2)) == 2

    cfg = config(tmp_path / "doctor.yaml", services, topic, [xoauth2, bearer, refused_x, bad_secret, expired])
    doctor = cli("doctor", "--config", str(cfg), env=env)
    out = doctor.stdout + doctor.stderr
    assert doctor.returncode == 1, out
    assert "ok   pop3[oa-xoauth2].login: logged in with XOAUTH2" in doctor.stdout, out
    assert "ok   pop3[oa-bearer].login: logged in with OAUTHBEARER" in doctor.stdout, out
    assert "FAIL pop3[oa-refused-x].login: login as 'empty' refused" in doctor.stdout, out
    assert f"FAIL pop3[oa-badsecret].oauth2: OAuth2 token endpoint {endpoint.url}: invalid_client" in doctor.stdout
    assert "FAIL pop3[oa-expired].login:" in doctor.stdout, out
    runs.append(doctor)

    # the secrets were really used: the endpoint saw both client secrets and minted tokens
    assert {r["client_secret"] for r in endpoint.requests} == {CLIENT_SECRET, WRONG_CLIENT_SECRET}
    assert len(issuer.issued) >= 3, issuer.issued  # each of the three processes fetched its own
    port = services.dovecot.pop3s_port
    tokens = [m for t in issuer.issued for u in (USER, REFUSED) for m in token_markers(t, u, port)]
    assert_never_shown(runs, CLIENT_SECRET, WRONG_CLIENT_SECRET, *tokens, *token_markers(static, REFUSED, port))


# ------------------------------------------------------------------------------- 3. key passphrases


def test_key_passphrases_never_shown(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    # TLS client certificate: bob's certificate, its key encrypted with the passphrase
    tls_key = tmp_path / "tls-client.key"
    tls_key.write_bytes(
        pki["bob"].key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(TLS_KEY_PASSPHRASE.encode()),
        )
    )
    tls = {"tls_client_cert": str(pki["bob"].cert_path), "tls_client_key": str(tls_key)}
    # S/MIME keys: alice's as PKCS#12, bob's as encrypted PEM, each with its passphrase
    p12 = pki.p12_file("alice", password=P12_PASSPHRASE)
    pem = pki.pem_file("bob", key_first=True, password=PEM_PASSPHRASE)

    def smime(p12_pass: dict[str, str], pem_pass: dict[str, str]) -> dict[str, Any]:
        return {
            "keys": [
                {"file": str(p12), "password": p12_pass, "label": "alice-p12"},
                {"file": str(pem), "password": pem_pass, "label": "bob-pem"},
            ]
        }

    env = {
        "PW_DAVE": services.dovecot.users[USER],
        "PW_EMPTY": services.dovecot.users[REFUSED],
        "TLS_PASS": TLS_KEY_PASSPHRASE,
        "TLS_WRONG": WRONG_TLS_KEY_PASSPHRASE,
        "P12_PASS": P12_PASSPHRASE,
        "SMIME_WRONG": WRONG_SMIME_PASSPHRASE,
    }
    pem_pass = secret_file(tmp_path / "pem.pass", PEM_PASSPHRASE)
    good = box(
        "keys-ok",
        USER,
        services,
        password={"env": "PW_DAVE"},
        tls_client_key_password=secret_file(tmp_path / "tls.pass", TLS_KEY_PASSPHRASE),
        smime=smime({"env": "P12_PASS"}, pem_pass),
        **tls,
    )
    wrong_tls = box(
        "tls-wrongpass", REFUSED, services, password={"env": "PW_EMPTY"}, tls_client_key_password={"env": "TLS_WRONG"}
    )
    wrong_tls.update(tls)

    # mail encrypted to alice: decrypting it needs the PKCS#12 passphrase
    services.dovecot.clear(USER)
    inner = b"Content-Type: text/plain; charset=utf-8\r\n\r\nDecrypted for the secrets test.\r\n"
    entity = pki.encrypt(inner, "alice", outform="SMIME").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head = "From: S <s@x.org>\r\nTo: dave@example.com\r\nSubject: sealed\r\nMessage-ID: <snl-sealed@x.org>\r\n"
    services.dovecot.put(USER, head.encode() + entity)

    runs = []
    cfg = config(tmp_path / "c.yaml", services, topic, [good, wrong_tls], mode="exactly_once")
    proc = cli("poll-once", "--config", str(cfg), env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "keys-ok: ok: 1 published, 1 deleted of 1 listed" in proc.stdout, out
    assert "tls-wrongpass: FAILED: [mailbox 'tls-wrongpass'" in out, out
    assert "wrong tls_client_key_password" in out, out  # names the problem without the passphrase
    assert error_lines(proc, "tls-wrongpass"), out
    runs.append(proc)
    (got,) = consume_all(services.bootstrap, topic, expect=1)
    assert "Decrypted for the secrets test." in got.record["text_body"], got.record  # the P12 key was opened

    doctor = cli("doctor", "--config", str(cfg), env=env)
    out = doctor.stdout + doctor.stderr
    assert doctor.returncode == 1, out
    assert "ok   pop3[keys-ok].login: logged in with" in doctor.stdout, out
    assert "FAIL pop3[tls-wrongpass].connect:" in doctor.stdout and "wrong tls_client_key_password" in doctor.stdout
    runs.append(doctor)

    # a wrong S/MIME passphrase stops the configuration from loading, naming the key
    for n, (p12_pass, pem_pass_, label) in enumerate(
        [({"env": "SMIME_WRONG"}, pem_pass, "alice-p12"), ({"env": "P12_PASS"}, {"env": "SMIME_WRONG"}, "bob-pem")]
    ):
        bad = box("smime-wrong", USER, services, password={"env": "PW_DAVE"}, smime=smime(p12_pass, pem_pass_))
        bad_cfg = config(tmp_path / f"bad{n}.yaml", services, topic, [bad])
        for args in (("poll-once", "--config"), ("doctor", "--config"), ("config", "validate")):
            proc = cli(*args, str(bad_cfg), env=env)
            out = proc.stdout + proc.stderr
            assert proc.returncode == 2, out
            assert f"configuration error: S/MIME key '{label}'" in out, out
            assert "wrong password" in out, out
            runs.append(proc)
    assert services.dovecot.count(USER) == 0

    assert_never_shown(
        runs,
        TLS_KEY_PASSPHRASE,
        WRONG_TLS_KEY_PASSPHRASE,
        P12_PASSPHRASE,
        PEM_PASSPHRASE,
        WRONG_SMIME_PASSPHRASE,
        *plain_markers(USER, services.dovecot.users[USER]),
    )


# ------------------------------------------------------------------------------- 4. librdkafka debug


def test_librdkafka_debug_all_never_shows_kafka_secrets(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """debug: all on every librdkafka client the connector makes, with SASL and SSL key
    passwords configured (the plain test broker ignores them; librdkafka still holds them and
    dumps its configuration). The SCRAM login itself: tests/integration/test_kafka_security.py."""
    env = {"PW_DAVE": services.dovecot.users[USER], "SSL_KEY_PW": SSL_KEY_PASSWORD}
    kafka = {
        "client": {"debug": "all"},
        "client_secrets": {
            "sasl.password": secret_file(tmp_path / "sasl.pass", SASL_PASSWORD),
            "ssl.key.password": {"env": "SSL_KEY_PW"},
        },
    }
    services.dovecot.clear(USER)
    put_one(services, seed=820)
    dave = box("rdk-debug", USER, services, password={"env": "PW_DAVE"}, auth_mechanisms=["PLAIN"])
    cfg = config(tmp_path / "c.yaml", services, topic, [dave], mode="exactly_once", kafka=kafka)
    runs = [cli("poll-once", "--config", str(cfg), env=env), cli("doctor", "--config", str(cfg), env=env)]
    poll, doctor = runs
    assert poll.returncode == 0, poll.stdout + poll.stderr[-3000:]
    assert "rdk-debug: ok: 1 published, 1 deleted of 1 listed" in poll.stdout
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr[-3000:]
    assert "ok   kafka.transactional_id:" in doctor.stdout, doctor.stdout
    for proc in runs:
        rdkafka = [d["msg"] for d in log_docs(proc) if str(d.get("logger", "")).startswith("pop3kafka.rdkafka")]
        assert len(rdkafka) > 100, "librdkafka debug logging did not reach the log"
        # librdkafka dumped its configuration, the secrets included (as it shows them)
        assert any("Client configuration:" in m for m in rdkafka)
        assert any("sasl.password = " in m for m in rdkafka) and any("ssl.key.password = " in m for m in rdkafka)
    assert_never_shown(runs, SASL_PASSWORD, SSL_KEY_PASSWORD, *plain_markers(USER, services.dovecot.users[USER]))


# ------------------------------------------------------------------------------- 5. tracebacks

# Loaded by the CLI child's interpreter (PYTHONPATH): a "bug" that raises while a line carrying a
# credential is being sent (PASS, AUTH with an initial response, or the response after AUTH),
# so the credential is in scope in every frame of the traceback.
SITECUSTOMIZE = """
import connector.protocol.transport as _transport

_send = _transport.Transport.send
_after_auth = set()


def send(self, data):
    key = id(self)
    if data.startswith(b"PASS ") or (data.startswith(b"AUTH ") and data.count(b" ") >= 2) or key in _after_auth:
        _after_auth.discard(key)
        raise RuntimeError("injected internal error: a bug while sending a credential line")
    if data.startswith(b"AUTH "):
        _after_auth.add(key)
    return _send(self, data)


_transport.Transport.send = send
"""


def test_internal_error_tracebacks_never_show_secrets(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    password = services.dovecot.users[USER]
    # a valid token of several KB: sent after the server's empty challenge, past the AUTH line
    token = make_jwt(services.dovecot.oauth_key_file, USER, jti=f"snl-tb-{uuid.uuid4().hex}", pad="x" * 600)
    env = {"PW_DAVE": password, "PYTHONPATH": str(inject)}
    token_box = box("tb-xoauth2", USER, services, auth_mechanisms=["XOAUTH2"])
    del token_box["password"]
    token_box["oauth2_token"] = secret_file(tmp_path / "token", token)
    boxes = [
        box("tb-plain", USER, services, password={"env": "PW_DAVE"}, auth_mechanisms=["PLAIN"]),
        box("tb-user", USER, services, password={"env": "PW_DAVE"}, auth_mechanisms=["USER"]),
        token_box,
    ]
    services.dovecot.clear(USER)
    put_one(services, seed=830)

    runs = []
    for mode in ("exactly_once", "at_least_once"):
        cfg = config(tmp_path / f"{mode}.yaml", services, topic, boxes, mode=mode)
        proc = cli("poll-once", "--config", str(cfg), env=env)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        for m in boxes:
            assert f"{m['id']}: FAILED: internal error: RuntimeError('injected internal error" in out, out
            (line,) = [d for d in error_lines(proc, m["id"]) if d["msg"] == "internal error in step login"]
            assert line["exc"].startswith("Traceback (most recent call last)"), line
            assert "RuntimeError: injected internal error" in line["exc"], line
        runs.append(proc)
    assert services.dovecot.count(USER) == 1  # nothing was read

    # doctor does not catch it: the interpreter prints the traceback
    doctor = cli("doctor", "--config", str(cfg), env=env)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert "Traceback (most recent call last)" in doctor.stderr, doctor.stderr
    assert "RuntimeError: injected internal error" in doctor.stderr, doctor.stderr
    assert "login(session, mb)" in doctor.stderr  # raised inside the login, secrets in scope
    runs.append(doctor)

    port = services.dovecot.pop3s_port
    assert_never_shown(runs, *plain_markers(USER, password), *token_markers(token, USER, port))
