"""A real OAuth2 token endpoint for tests: http.server on 127.0.0.1 behind TLS, with a
throw-away CA made with `cryptography`, plus Google-style service-account keys and an RS256
verifier for the JWT bearer assertions the connector sends."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

#: respond(form, headers) -> (status, body, extra headers); body: dict (sent as JSON), bytes or str.
Responder = Callable[[dict[str, str], dict[str, str]], tuple[int, Any, dict[str, str]]]


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_pki(directory: Path) -> Pki:
    """A CA and a server certificate for 127.0.0.1 / localhost, valid for a day."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pop3-kafka test token CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return pki


@dataclass
class TokenEndpoint:
    """The running endpoint. ``requests`` holds every form received, in order."""

    url: str
    pki: Pki
    requests: list[dict[str, str]] = field(default_factory=list)
    respond: Responder | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ca_file(self) -> str:
        return str(self.pki.ca_file)

    @property
    def port(self) -> int:
        return int(urllib.parse.urlsplit(self.url).port or 0)


@contextmanager
def token_endpoint(
    directory: Path, respond: Responder, path: str = "/tenant/oauth2/v2.0/token"
) -> Iterator[TokenEndpoint]:
    """Serve ``respond`` over HTTPS at https://127.0.0.1:<port><path> until the block ends."""
    pki = make_pki(directory)
    endpoint = TokenEndpoint("", pki, respond=respond)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length).decode("ascii")
            if self.path != path:
                self._send(404, b"not here", {"Content-Type": "text/plain"})
                return
            form = dict(urllib.parse.parse_qsl(raw, keep_blank_values=True, strict_parsing=True))
            with endpoint.lock:
                endpoint.requests.append(form)
            assert endpoint.respond is not None
            status, body, headers = endpoint.respond(form, {k.lower(): v for k, v in self.headers.items()})
            if isinstance(body, dict):
                data = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **headers}
            else:
                data = body.encode() if isinstance(body, str) else body
            self._send(status, data, headers)

        def _send(self, status: int, data: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")  # RFC 6749 §5.1
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.cert_file, pki.key_file)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    endpoint.url = f"https://127.0.0.1:{server.server_address[1]}{path}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="token-endpoint", daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ---------------------------------------------------------------------------- JWT bearer helpers


def make_service_account(
    path: Path, token_uri: str, client_email: str = "pop3-reader@proj.iam.gserviceaccount.com"
) -> rsa.RSAPrivateKey:
    """Write a Google-style service-account JSON key; returns its private key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "proj",
                "private_key_id": "kid-" + path.stem,
                "private_key": pem,
                "client_email": client_email,
                "client_id": "1234567890",
                "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                "token_uri": token_uri,
            }
        )
    )
    return key


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_rs256(assertion: str, public_key: rsa.RSAPublicKey) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of an RS256 JWT whose signature verifies; raises InvalidSignature otherwise."""
    head, body, sig = assertion.split(".")
    public_key.verify(_unb64(sig), f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return json.loads(_unb64(head)), json.loads(_unb64(body))
