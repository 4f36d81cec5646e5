"""Per-mailbox TLS options: config validation, make_tls_context, and the wire behaviour
(pinning, client certificates, server name / SNI, minimum version, legacy) against scripted
TLS servers on 127.0.0.1 with a throwaway PKI made by the openssl CLI."""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_pop3_session import GREETING, ScriptedServer, Step, expect, send

from connector.config import parse_config
from connector.config.model import MailboxConfig
from connector.errors import ConfigError, Pop3TlsError
from connector.protocol import Pop3Session, make_tls_context
from connector.protocol.transport import (
    TLS_GATHER_BYTES,
    TlsContext,
    Transport,
    format_fingerprint,
    parse_fingerprint,
    sni_name,
)
from connector.runtime.sessions import open_session

ENV = {"PW": "s3cret-value", "KEY_PW": "key-passphrase"}
KEY_PASSWORD = "key-passphrase"

# ---------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    other_ca: Path

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def fingerprint(self, name: str) -> str:
        der = ssl.PEM_cert_to_DER_cert(self.cert(name).read_text())
        return format_fingerprint(hashlib.sha256(der).digest())

    def server_context(self, name: str = "server", **opts: Any) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if opts.get("legacy"):
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():  # TLSv1 on the server side is deliberate here
            warnings.simplefilter("ignore", DeprecationWarning)
            if "min_version" in opts:
                ctx.minimum_version = opts["min_version"]
            if "max_version" in opts:
                ctx.maximum_version = opts["max_version"]
        ctx.load_cert_chain(self.cert(name), self.key(name))
        if opts.get("require_client_cert"):
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(self.ca)
        return ctx


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _leaf(d: Path, name: str, *, cn: str, ext: str, bits: int = 2048) -> None:
    _openssl(
        "req", "-newkey", f"rsa:{bits}", "-nodes", "-sha256", "-subj", f"/CN={cn}",
        "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
    )  # fmt: skip
    (d / f"{name}.ext").write_text(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n{ext}\n")
    _openssl(
        "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CA + other CA; leaves: server (localhost, 127.0.0.1), named (pop.example.test only),
    weak (RSA 1024), client (clientAuth; also with an encrypted key and as one combined PEM)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl CLI not installed")
    d = tmp_path_factory.mktemp("tls-pki")
    for name in ("ca", "other"):
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2", "-subj", f"/CN=test {name}",
            "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem"),
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
        )  # fmt: skip
    san = "subjectAltName=DNS:localhost,IP:127.0.0.1"
    _leaf(d, "server", cn="localhost", ext=f"extendedKeyUsage=serverAuth\n{san}")
    _leaf(d, "named", cn="pop.example.test", ext="extendedKeyUsage=serverAuth\nsubjectAltName=DNS:pop.example.test")
    _leaf(d, "weak", cn="localhost", ext=f"extendedKeyUsage=serverAuth\n{san}", bits=1024)
    _leaf(d, "client", cn="pop3-kafka client", ext="extendedKeyUsage=clientAuth")
    _openssl(
        "pkey", "-in", str(d / "client.key"), "-aes256", "-passout", f"pass:{KEY_PASSWORD}",
        "-out", str(d / "client-enc.key"),
    )  # fmt: skip
    (d / "client-combined.pem").write_text((d / "client.pem").read_text() + (d / "client.key").read_text())
    return Pki(dir=d, ca=d / "ca.pem", other_ca=d / "other.pem")


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def serve() -> Iterator[list[ScriptedServer]]:
    servers: list[ScriptedServer] = []
    yield servers
    for server in servers:
        server.join()
        assert server.errors == [], server.errors


def tls_server(serve: list[ScriptedServer], ctx: ssl.SSLContext, script: list[Step] | None = None) -> ScriptedServer:
    """Implicit TLS; by default greets and expects QUIT (``[]``: handshake only)."""
    steps = [GREETING, expect("QUIT"), send("+OK")] if script is None else script
    server = ScriptedServer(steps, implicit_tls=ctx)
    serve.append(server)
    return server


def stls_server(serve: list[ScriptedServer], ctx: ssl.SSLContext, after: list[Step]) -> ScriptedServer:
    steps: list[Step] = [GREETING, expect("CAPA"), ("send", b"+OK\r\nSTLS\r\n.\r\n"), expect("STLS"), send("+OK")]
    server = ScriptedServer([*steps, ("starttls",), *after], starttls_context=ctx)
    serve.append(server)
    return server


def sni_recorder(ctx: ssl.SSLContext) -> list[str | None]:
    seen: list[str | None] = []

    def callback(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name)

    ctx.sni_callback = callback
    return seen


def config(base: Path | None = None, **keys: Any) -> MailboxConfig:
    m: dict[str, Any] = {"id": "secure", "host": "127.0.0.1", "username": "alice", "password": {"env": "PW"}, **keys}
    data = {"kafka": {"bootstrap_servers": "k:9092"}, "topics": {"mail": "mail"}, "mailboxes": [m]}
    return parse_config(data, environ=ENV, base=base).mailboxes[0]


def config_error(**keys: Any) -> str:
    with pytest.raises(ConfigError) as e:
        config(**keys)
    return str(e.value)


def mailbox(server: ScriptedServer, pki: Pki, **keys: Any) -> MailboxConfig:
    return config(**{"port": server.port, "timeout_seconds": 5, "tls_ca_file": str(pki.ca), **keys})


def connect_and_quit(mb: MailboxConfig) -> None:
    session = open_session(mb)
    assert isinstance(session, Pop3Session) and session.is_tls
    session.quit()


# ---------------------------------------------------------------------------- config validation


def test_defaults_leave_behaviour_unchanged() -> None:
    m = config()
    assert (m.tls_min_version, m.tls_legacy, m.tls_verify) == ("TLSv1.2", False, True)
    assert m.tls_fingerprint_sha256 is m.tls_server_name is m.tls_client_cert is m.tls_client_key is None
    assert m.tls_client_key_password is None
    ctx = make_tls_context(None)
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert ctx.server_name is None and ctx.fingerprint_sha256 is None
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2 and ctx.check_hostname
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert [c["name"] for c in ctx.get_ciphers()] == [c["name"] for c in plain.get_ciphers()]


def test_min_version() -> None:
    assert config(tls_min_version="TLSv1.3").tls_min_version == "TLSv1.3"
    msg = config_error(tls_min_version="TLSv1.1")
    assert msg.startswith("mailboxes[0].tls_min_version: 'TLSv1.1' is not allowed; use one of: TLSv1.2, TLSv1.3")
    assert "did you mean" in config_error(tls_min_version="TLS1.3")


def test_legacy() -> None:
    assert config(tls_legacy=True).tls_min_version == "TLSv1"  # legacy opens TLS 1.0/1.1
    assert config(tls_legacy=True, tls_min_version="TLSv1.2").tls_min_version == "TLSv1.2"  # explicit wins
    msg = config_error(tls_legacy=True, tls_min_version="TLSv1.3")
    assert msg.startswith("mailboxes[0].tls_legacy: contradicts tls_min_version: TLSv1.3")
    assert config_error(tls_legacy="yes").startswith("mailboxes[0].tls_legacy: expected true or false")


@pytest.mark.parametrize(
    "given",
    [
        "ab" * 32,
        "AB" * 32,
        ":".join(["aB"] * 32),
        "  " + ":".join(["AB"] * 32) + "\n",
    ],
)
def test_fingerprint_forms_are_normalised(given: str) -> None:
    assert config(tls_fingerprint_sha256=given).tls_fingerprint_sha256 == ":".join(["AB"] * 32)


@pytest.mark.parametrize("bad", ["ab" * 31, "ab" * 33, "zz" * 32, "sha1:" + "ab" * 32, "ab" * 20])
def test_bad_fingerprint(bad: str) -> None:
    msg = config_error(tls_fingerprint_sha256=bad)
    assert msg.startswith("mailboxes[0].tls_fingerprint_sha256:") and "64 hex digits" in msg
    assert config_error(tls_fingerprint_sha256=123).startswith("mailboxes[0].tls_fingerprint_sha256: expected")


@pytest.mark.parametrize("name", ["pop.example.com", "pop.example.com.", "localhost", "10.0.0.1", "::1", "[::1]"])
def test_server_name_accepted(name: str) -> None:
    assert config(tls_server_name=name).tls_server_name == name


@pytest.mark.parametrize("name", ["https://pop.example.com", "pop.example.com:995", "*.example.com", "a b", "-x.com"])
def test_server_name_refused(name: str) -> None:
    msg = config_error(tls_server_name=name)
    assert msg.startswith("mailboxes[0].tls_server_name:") and "neither a host name nor an IP address" in msg


def test_client_cert_files(pki: Pki, tmp_path: Path) -> None:
    m = config(tls_client_cert=str(pki.cert("client")), tls_client_key=str(pki.key("client")))
    assert (m.tls_client_cert, m.tls_client_key) == (str(pki.cert("client")), str(pki.key("client")))
    # relative to the config file's directory, like tls_ca_file
    (tmp_path / "c.pem").write_text(pki.cert("client").read_text())
    assert config(tmp_path, tls_client_cert="c.pem").tls_client_cert == str(tmp_path / "c.pem")
    missing = tmp_path / "nope.pem"
    msg = config_error(tls_client_cert=str(missing))
    assert msg == f"mailboxes[0].tls_client_cert: {str(missing)!r} does not exist or is not a file"
    msg = config_error(tls_client_cert=str(pki.cert("client")), tls_client_key=str(tmp_path))
    assert msg == f"mailboxes[0].tls_client_key: {str(tmp_path)!r} does not exist or is not a file"


def test_client_key_and_password_need_the_cert(pki: Pki) -> None:
    msg = config_error(tls_client_key=str(pki.key("client")))
    assert msg.startswith("mailboxes[0].tls_client_key: needs tls_client_cert")
    msg = config_error(tls_client_key_password={"env": "KEY_PW"})
    assert msg.startswith("mailboxes[0].tls_client_key_password: needs tls_client_cert")


def test_client_key_password_is_a_secret(pki: Pki, tmp_path: Path) -> None:
    cert = str(pki.cert("client"))
    m = config(tls_client_cert=cert, tls_client_key_password={"env": "KEY_PW"})
    assert m.tls_client_key_password is not None and m.tls_client_key_password.reveal() == KEY_PASSWORD
    assert KEY_PASSWORD not in repr(m)
    (tmp_path / "pw").write_text(KEY_PASSWORD + "\n")
    m = config(tls_client_cert=cert, tls_client_key_password={"file": str(tmp_path / "pw")})
    assert m.tls_client_key_password is not None and m.tls_client_key_password.reveal() == KEY_PASSWORD
    msg = config_error(tls_client_cert=cert, tls_client_key_password={"env": "MISSING"})
    assert msg.startswith("mailboxes[0].tls_client_key_password.env: environment variable 'MISSING' is not set")
    msg = config_error(tls_client_cert=cert, tls_client_key_password="inline-secret")
    assert msg.startswith("mailboxes[0].tls_client_key_password: expected a mapping") and "inline-secret" not in msg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tls_fingerprint_sha256", "ab" * 32),
        ("tls_server_name", "pop.example.com"),
        ("tls_min_version", "TLSv1.3"),
        ("tls_legacy", True),
    ],
)
def test_tls_keys_refused_without_tls(key: str, value: Any) -> None:
    msg = config_error(tls="none", allow_plaintext_auth=True, **{key: value})
    assert msg.startswith(f"mailboxes[0].{key}: has no effect with tls: none")


def test_typo_in_a_tls_key_is_named() -> None:
    assert "did you mean 'tls_fingerprint_sha256'?" in config_error(tls_fingerprint_sha265="ab" * 32)


# ---------------------------------------------------------------------------- make_tls_context


def test_make_tls_context_options(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    fp = pki.fingerprint("server")
    ctx = make_tls_context(str(pki.ca), min_version="TLSv1.3", server_name="pop.example.test", fingerprint_sha256=fp)
    assert isinstance(ctx, TlsContext) and isinstance(ctx, ssl.SSLContext)
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
    assert ctx.server_name == "pop.example.test"
    assert ctx.fingerprint_sha256 == parse_fingerprint(fp) == bytes.fromhex(fp.replace(":", ""))
    with pytest.raises(ConfigError, match="tls_fingerprint_sha256"):
        make_tls_context(None, fingerprint_sha256="abc")
    with pytest.raises(ConfigError, match=r"TLSv1 and TLSv1.1 need tls_legacy"):
        make_tls_context(None, min_version="TLSv1")
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="pop3kafka.tls"):
        legacy = make_tls_context(None, min_version="TLSv1", legacy=True, mailbox="old-server")
    assert legacy.minimum_version is ssl.TLSVersion.TLSv1
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "'old-server'" in record.getMessage()
    assert "tls_legacy" in record.getMessage()


def test_make_tls_context_client_cert(pki: Pki, tmp_path: Path) -> None:
    cert, key, enc = str(pki.cert("client")), str(pki.key("client")), str(pki.key("client-enc"))
    make_tls_context(None, client_cert=cert, client_key=key)
    make_tls_context(None, client_cert=str(pki.cert("client-combined")))  # key inside the PEM
    make_tls_context(None, client_cert=cert, client_key=enc, client_key_password=KEY_PASSWORD)
    with pytest.raises(ConfigError, match="tls_client_key: the private key is encrypted; set tls_client_key_password"):
        make_tls_context(None, client_cert=cert, client_key=enc)  # never an interactive prompt
    with pytest.raises(ConfigError, match="wrong tls_client_key_password") as e:
        make_tls_context(None, client_cert=cert, client_key=enc, client_key_password="wrong")
    assert "wrong'" not in str(e.value)  # the password itself is never shown
    with pytest.raises(ConfigError, match="the private key does not belong to the certificate"):
        make_tls_context(None, client_cert=cert, client_key=str(pki.key("server")))
    with pytest.raises(ConfigError, match="does not exist"):
        make_tls_context(None, client_cert=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="tls_client_key is set without tls_client_cert"):
        make_tls_context(None, client_key=key)
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        make_tls_context(None, client_cert=str(pki.ca))  # a certificate without its key


def test_sni_name() -> None:
    assert sni_name("pop.example.com") == "pop.example.com"
    assert sni_name("127.0.0.1") == "127.0.0.1"
    assert sni_name("[::1]") == "::1"
    assert sni_name("0:0:0:0:0:0:0:1") == "::1"
    assert sni_name("fe80::1%eth0") == "fe80::1"  # a scope id would leak the literal into SNI


# ---------------------------------------------------------------------------- pinning


def test_pin_accepted_in_addition_to_verification(serve: list[ScriptedServer], pki: Pki) -> None:
    server = tls_server(serve, pki.server_context())
    connect_and_quit(mailbox(server, pki, tls_fingerprint_sha256=pki.fingerprint("server").lower()))


def test_pin_mismatch_names_both_fingerprints(serve: list[ScriptedServer], pki: Pki) -> None:
    server = tls_server(serve, pki.server_context(), [])
    wrong = ":".join(["00"] * 32)
    with pytest.raises(Pop3TlsError) as e:
        open_session(mailbox(server, pki, tls_fingerprint_sha256=wrong))
    msg = str(e.value)
    assert f"certificate fingerprint mismatch for 127.0.0.1:{server.port}" in msg
    assert f"expects {wrong}" in msg and f"presented {pki.fingerprint('server')}" in msg
    assert "update tls_fingerprint_sha256" in msg


def test_pin_does_not_replace_verification(serve: list[ScriptedServer], pki: Pki) -> None:
    server = tls_server(serve, pki.server_context(), [])
    mb = mailbox(server, pki, tls_ca_file=str(pki.other_ca), tls_fingerprint_sha256=pki.fingerprint("server"))
    with pytest.raises(Pop3TlsError, match="certificate verification failed"):
        open_session(mb)


def test_pin_alone_with_verification_off(serve: list[ScriptedServer], pki: Pki) -> None:
    # tls_verify: false + a pin: an unknown CA and a foreign name are fine, the pin decides
    server = tls_server(serve, pki.server_context("named"))
    connect_and_quit(
        mailbox(
            server,
            pki,
            tls_ca_file=str(pki.other_ca),
            tls_verify=False,
            tls_fingerprint_sha256=pki.fingerprint("named"),
        )
    )
    server = tls_server(serve, pki.server_context("named"), [])
    with pytest.raises(Pop3TlsError, match="fingerprint mismatch"):
        open_session(mailbox(server, pki, tls_verify=False, tls_fingerprint_sha256=pki.fingerprint("server")))


def test_pin_checked_after_stls(serve: list[ScriptedServer], pki: Pki) -> None:
    server = stls_server(serve, pki.server_context(), [expect("QUIT"), send("+OK")])
    connect_and_quit(mailbox(server, pki, tls="starttls", tls_fingerprint_sha256=pki.fingerprint("server")))
    server = stls_server(serve, pki.server_context(), [])
    with pytest.raises(Pop3TlsError, match="fingerprint mismatch"):
        open_session(mailbox(server, pki, tls="starttls", tls_fingerprint_sha256="11" * 32))


# ---------------------------------------------------------------------------- client certificates


@pytest.mark.parametrize("max_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_certificate_presented(serve: list[ScriptedServer], pki: Pki, max_version: ssl.TLSVersion) -> None:
    server = tls_server(serve, pki.server_context(require_client_cert=True, max_version=max_version))
    connect_and_quit(
        mailbox(
            server,
            pki,
            tls_client_cert=str(pki.cert("client")),
            tls_client_key=str(pki.key("client-enc")),
            tls_client_key_password={"env": "KEY_PW"},
        )
    )


@pytest.mark.parametrize("max_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_missing_client_certificate(serve: list[ScriptedServer], pki: Pki, max_version: ssl.TLSVersion) -> None:
    # TLS 1.2: the handshake itself fails. TLS 1.3: the server refuses after the client's
    # Finished, so the alert arrives with the first read (the greeting): Pop3TlsError too.
    server = tls_server(serve, pki.server_context(require_client_cert=True, max_version=max_version), [])
    with pytest.raises(Pop3TlsError) as e:
        open_session(mailbox(server, pki))
    msg = str(e.value)
    assert f"127.0.0.1:{server.port}" in msg
    if max_version is ssl.TLSVersion.TLSv1_3:
        assert "CERTIFICATE_REQUIRED" in msg and "set tls_client_cert and tls_client_key" in msg
    server.join()
    assert server.tls_errors


# ---------------------------------------------------------------------------- server name and SNI


def test_ip_literal_is_verified_against_ip_san_and_sent_without_sni(serve: list[ScriptedServer], pki: Pki) -> None:
    ctx = pki.server_context()
    seen = sni_recorder(ctx)
    server = tls_server(serve, ctx)
    connect_and_quit(mailbox(server, pki))  # host 127.0.0.1: the cert's IP SAN
    server.join()
    assert seen == [None]  # RFC 6066 §3: no literal IP in SNI


def test_host_name_is_sent_as_sni(serve: list[ScriptedServer], pki: Pki) -> None:
    ctx = pki.server_context()
    seen = sni_recorder(ctx)
    server = tls_server(serve, ctx)
    connect_and_quit(mailbox(server, pki, tls_server_name="localhost"))
    server.join()
    assert seen == ["localhost"]


def test_server_name_override(serve: list[ScriptedServer], pki: Pki) -> None:
    # connect by IP to a server whose certificate names only pop.example.test
    ctx = pki.server_context("named")
    seen = sni_recorder(ctx)
    server = tls_server(serve, ctx)
    connect_and_quit(mailbox(server, pki, tls_server_name="pop.example.test"))
    server.join()
    assert seen == ["pop.example.test"]
    server = tls_server(serve, pki.server_context("named"), [])
    with pytest.raises(Pop3TlsError, match=r"IP address mismatch.*set tls_server_name"):
        open_session(mailbox(server, pki))


def test_server_name_mismatch(serve: list[ScriptedServer], pki: Pki) -> None:
    server = tls_server(serve, pki.server_context(), [])
    with pytest.raises(Pop3TlsError) as e:
        open_session(mailbox(server, pki, tls_server_name="wrong.example"))
    msg = str(e.value)
    assert f"certificate verification failed for 127.0.0.1:{server.port} (verifying as 'wrong.example')" in msg
    assert "Hostname mismatch" in msg and "tls_server_name" in msg


def test_server_name_on_stls(serve: list[ScriptedServer], pki: Pki) -> None:
    ctx = pki.server_context("named")
    seen = sni_recorder(ctx)
    server = stls_server(serve, ctx, [expect("QUIT"), send("+OK")])
    connect_and_quit(mailbox(server, pki, tls="starttls", tls_server_name="pop.example.test"))
    server.join()
    assert seen == ["pop.example.test"]


# ---------------------------------------------------------------------------- versions and legacy


def test_min_version_tls13(serve: list[ScriptedServer], pki: Pki) -> None:
    server = tls_server(serve, pki.server_context(max_version=ssl.TLSVersion.TLSv1_2), [])
    with pytest.raises(Pop3TlsError, match="TLS handshake failed"):
        open_session(mailbox(server, pki, tls_min_version="TLSv1.3"))
    server = tls_server(serve, pki.server_context())
    connect_and_quit(mailbox(server, pki, tls_min_version="TLSv1.3"))


def test_legacy_weak_key(serve: list[ScriptedServer], pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    server = tls_server(serve, pki.server_context("weak", legacy=True), [])
    with pytest.raises(Pop3TlsError, match="key too weak"):
        open_session(mailbox(server, pki))
    with caplog.at_level(logging.WARNING, logger="pop3kafka.tls"):
        for _ in range(2):
            server = tls_server(serve, pki.server_context("weak", legacy=True))
            connect_and_quit(mailbox(server, pki, tls_legacy=True))
    warned = [r for r in caplog.records if r.name == "pop3kafka.tls"]
    assert len(warned) == 1  # at each context built; the second session re-uses the first's
    assert all(r.levelno == logging.WARNING and "mailbox 'secure'" in r.getMessage() for r in warned)


def test_legacy_tls10_server(serve: list[ScriptedServer], pki: Pki) -> None:
    old: dict[str, Any] = {"legacy": True, "min_version": ssl.TLSVersion.TLSv1, "max_version": ssl.TLSVersion.TLSv1}
    server = tls_server(serve, pki.server_context(**old), [])
    with pytest.raises(Pop3TlsError, match="TLS handshake failed"):
        open_session(mailbox(server, pki))
    server = tls_server(serve, pki.server_context(**old), [])
    with pytest.raises(Pop3TlsError):  # legacy ciphers, but the explicit TLSv1.2 floor holds
        open_session(mailbox(server, pki, tls_legacy=True, tls_min_version="TLSv1.2"))
    server = tls_server(serve, pki.server_context(**old))
    connect_and_quit(mailbox(server, pki, tls_legacy=True))


# ---------------------------------------------------------------------------- context re-use


def test_a_mailbox_reuses_its_context_until_something_it_was_built_from_changes(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """~24 ms of CPU per build with the system trust store (bench/tls_context.py): built once per
    mailbox, rebuilt when the CA bundle, client certificate/key or key password changes."""
    import os

    from connector.runtime import sessions

    ca = tmp_path / "ca.pem"
    ca.write_text(pki.ca.read_text())
    pw = tmp_path / "key-pw"
    pw.write_text(KEY_PASSWORD)
    key = tmp_path / "client.key"
    key.write_bytes(pki.key("client-enc").read_bytes())
    m = config(
        tls_ca_file=str(ca),
        tls_client_cert=str(pki.cert("client")),
        tls_client_key=str(key),
        tls_client_key_password={"file": str(pw)},
    )
    first = sessions.tls_context(m)
    assert sessions.tls_context(m) is first
    subjects = {dict(x[0] for x in c["subject"])["commonName"] for c in first.get_ca_certs()}
    assert subjects == {"test ca"}
    # a rotated CA bundle (a Secret's symlink swap shows as a new inode/mtime/size)
    ca.write_text(pki.other_ca.read_text())
    second = sessions.tls_context(m)
    assert second is not first
    assert {dict(x[0] for x in c["subject"])["commonName"] for c in second.get_ca_certs()} == {"test other"}
    assert sessions.tls_context(m) is second
    # a rotated client key or key password
    os.utime(key, ns=(1, 1))
    third = sessions.tls_context(m)
    assert third is not second and sessions.tls_context(m) is third
    pw.write_text(KEY_PASSWORD + "\n")  # the same password re-written: the context stays valid
    assert sessions.tls_context(m) is third
    pw.write_text("another-passphrase")  # re-read at every session: a changed one rebuilds
    with pytest.raises(ConfigError, match="tls_client_key"):
        sessions.tls_context(m)
    pw.write_text(KEY_PASSWORD)
    # a setting changed by a reload
    assert sessions.tls_context(config(tls_ca_file=str(ca), tls_min_version="TLSv1.3")).minimum_version == (
        ssl.TLSVersion.TLSv1_3
    )
    # and at least hourly, for a system trust store updated in place
    monkeypatch.setattr(sessions, "TLS_CONTEXT_MAX_AGE_S", 0.0)
    again = config(tls_ca_file=str(ca))
    assert sessions.tls_context(again) is not sessions.tls_context(again)


def test_legacy_warning_at_each_build_not_each_session(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    from connector.runtime import sessions

    m = config(id="old-server", tls_ca_file=str(pki.ca), tls_legacy=True)
    with caplog.at_level(logging.WARNING, logger="pop3kafka.tls"):
        for _ in range(3):
            sessions.tls_context(m)
    assert sum("tls_legacy is on" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "verification-off"])
def test_certificate_expiry_read_with_and_without_verification(
    serve: list[ScriptedServer], pki: Pki, verify: bool
) -> None:
    """The expiry metric's source: from the ssl module's parsed certificate when verified,
    from the DER (cryptography) when verification is off; the same instant either way."""
    from cryptography import x509

    want = x509.load_pem_x509_certificate(pki.cert("server").read_bytes()).not_valid_after_utc.timestamp()
    server = tls_server(serve, pki.server_context())
    session = open_session(mailbox(server, pki, tls_verify=verify))
    assert isinstance(session, Pop3Session)
    try:
        assert session.certificate_not_after == want
    finally:
        session.quit()


def test_tls_recv_gathers_the_records_that_have_arrived_without_waiting(pki: Pki) -> None:
    """Dovecot sends ~4 KiB TLS records and one TLS read returns one record: recv() adds the
    records already received (up to TLS_GATHER_BYTES), and never waits for more."""
    a, b = socket.socketpair()
    a.settimeout(5.0)
    transport = Transport(a, "127.0.0.1", 995)
    sent, more = threading.Event(), threading.Event()

    def server() -> None:
        tls = pki.server_context().wrap_socket(b, server_side=True)
        for i in range(20):  # 20 writes: 20 TLS records of 1,000 bytes
            tls.sendall(bytes([65 + i]) * 1000)
        sent.set()
        more.wait(10)
        tls.sendall(b"z" * 100)
        sent.set()
        more.wait(10)
        tls.close()

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    try:
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        transport.start_tls(ctx)
        assert sent.wait(10)
        got = transport.recv()
        assert got == b"".join(bytes([65 + i]) * 1000 for i in range(20))  # one call, every record
        assert a.gettimeout() == 5.0  # the inactivity timeout is back after gathering
        sent.clear()
        more.set()
        assert sent.wait(10)
        started = time.monotonic()
        assert transport.recv() == b"z" * 100  # one record there, nothing more: no waiting
        assert time.monotonic() - started < 2.0
    finally:
        more.set()
        transport.close()
        thread.join(10)


def test_tls_gathering_stops_at_its_byte_bound(pki: Pki) -> None:
    a, b = socket.socketpair()
    a.settimeout(5.0)
    transport = Transport(a, "127.0.0.1", 995)
    total = 3 * TLS_GATHER_BYTES
    sent = threading.Event()

    def server() -> None:
        tls = pki.server_context().wrap_socket(b, server_side=True)
        tls.sendall(b"x" * total)
        sent.set()
        tls.recv(1)  # until the client closes

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    try:
        transport.start_tls(ssl.create_default_context(cafile=str(pki.ca)))
        assert sent.wait(10)
        sizes = []
        while sum(sizes) < total:
            sizes.append(len(transport.recv()))
        assert sum(sizes) == total and max(sizes) <= TLS_GATHER_BYTES and len(sizes) >= 3
    finally:
        transport.close()
        thread.join(10)
