"""S/MIME test material, made at test time in a temporary directory.

A throw-away CA and recipient certificates come from `cryptography`; the encrypted and signed
mail comes from the `openssl cms` command line (an independent producer: the code under test
uses asn1crypto and cryptography, never the openssl binary), and for a second opinion from
cryptography's PKCS7EnvelopeBuilder.

Recipients:

* ``alice``, ``bob``: RSA 2048, the keys the tests load;
* ``carol``: RSA 2048, never loaded (mail "not for us");
* ``erin``: EC P-256, for ECDH key agreement (KeyAgreeRecipientInfo);
* ``sender``: RSA 2048, signs opaque signed-data.

Each certificate carries a display name and e-mail address, so tests can check that error
messages never name them.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.parser
import email.policy
import itertools
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.oid import NameOID

OPENSSL_TIMEOUT = 30  # seconds; one openssl cms call on a few KiB takes milliseconds
P12_PASSWORD = "p12-Pass-phrase"
PEM_PASSWORD = "pem-Pass-phrase"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def openssl(*args: str | Path) -> bytes:
    """Run the openssl binary; stdout, or CalledProcessError with its stderr."""
    done = subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=OPENSSL_TIMEOUT)
    return done.stdout


def mime_entity(marker: str, *, filler: int = 0) -> bytes:
    """A small MIME entity with ``marker`` in its body (and ``filler`` extra bytes, to make
    streamed BER output split the ciphertext into several chunks)."""
    lines = [
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"The secret is {marker}.",
    ]
    lines.extend("x" * 70 for _ in range(filler // 72))
    return ("\r\n".join(lines) + "\r\n").encode()


@dataclass
class Identity:
    name: str
    key: PrivateKey
    cert: x509.Certificate
    cert_path: Path
    key_path: Path


@dataclass
class Pki:
    """The CA, the identities and their files under ``root``."""

    root: Path
    ca_key: rsa.RSAPrivateKey
    ca_cert: x509.Certificate
    ids: dict[str, Identity] = field(default_factory=dict)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def __getitem__(self, name: str) -> Identity:
        return self.ids[name]

    def path(self, suffix: str) -> Path:
        return self.root / f"f{next(self._seq)}{suffix}"

    def write(self, data: bytes, suffix: str = ".bin") -> Path:
        out = self.path(suffix)
        out.write_bytes(data)
        return out

    # ------------------------------------------------------------ key files

    def pem_file(self, name: str, *, key_first: bool, extra_certs: bool = False, password: str | None = None) -> Path:
        """PEM holding the private key and certificate, in the given order; with the CA
        certificate around them when ``extra_certs`` (so the loader must pick)."""
        ident = self.ids[name]
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password.encode())
            if password is not None
            else serialization.NoEncryption()
        )
        key = ident.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
        cert = ident.cert.public_bytes(serialization.Encoding.PEM)
        ca = self.ca_cert.public_bytes(serialization.Encoding.PEM)
        parts = [key, cert] if key_first else [cert, key]
        if extra_certs:
            parts = [ca, *parts, ca]
        return self.write(b"".join(parts), ".pem")

    def p12_file(self, name: str, password: str | None = P12_PASSWORD) -> Path:
        ident = self.ids[name]
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password.encode())
            if password is not None
            else serialization.NoEncryption()
        )
        assert isinstance(ident.key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        data = pkcs12.serialize_key_and_certificates(name.encode(), ident.key, ident.cert, [self.ca_cert], enc)
        return self.write(data, ".p12")

    def mismatched_pem(self, key_of: str, cert_of: str) -> Path:
        key = self.ids[key_of].key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return self.write(key + self.ids[cert_of].cert.public_bytes(serialization.Encoding.PEM), ".pem")

    # ------------------------------------------------------------ mail

    def encrypt(
        self,
        content: bytes,
        *recipients: str,
        cipher: str = "-aes256",
        outform: str = "DER",
        stream: bool = False,
        oaep: bool = False,
        keyid: bool = False,
    ) -> bytes:
        """``openssl cms -encrypt`` of ``content`` (taken as is: -binary) to the recipients."""
        src = self.write(content, ".in")
        out = self.path(".out")
        args: list[str | Path] = ["cms", "-encrypt", "-binary", "-in", src, "-out", out, "-outform", outform, cipher]
        if stream:
            args += ["-stream", "-indef"]
        if keyid:
            args.append("-keyid")
        for name in recipients:
            if oaep:
                args += ["-recip", self.ids[name].cert_path, "-keyopt", "rsa_padding_mode:oaep"]
            else:
                args.append(self.ids[name].cert_path)
        openssl(*args)
        return out.read_bytes()

    def sign_opaque(self, content: bytes, *, outform: str = "SMIME", stream: bool = False) -> bytes:
        """``openssl cms -sign -nodetach``: opaque signed-data (RFC 8551 §3.5.2) by ``sender``."""
        src = self.write(content, ".in")
        out = self.path(".out")
        sender = self.ids["sender"]
        args: list[str | Path] = ["cms", "-sign", "-nodetach", "-binary", "-in", src, "-out", out, "-outform", outform]
        args += ["-signer", sender.cert_path, "-inkey", sender.key_path]
        if stream:
            args += ["-stream", "-indef"]
        openssl(*args)
        return out.read_bytes()

    def sign_detached(self, content: bytes) -> bytes:
        src = self.write(content, ".in")
        out = self.path(".out")
        sender = self.ids["sender"]
        openssl("cms", "-sign", "-binary", "-in", src, "-out", out, "-outform", "DER",
                "-signer", sender.cert_path, "-inkey", sender.key_path)  # fmt: skip
        return out.read_bytes()

    def certs_only(self) -> bytes:
        out = self.path(".der")
        openssl("crl2pkcs7", "-nocrl", "-certfile", self.ids["alice"].cert_path, "-outform", "DER", "-out", out)
        return out.read_bytes()


def envelope_with_cryptography(content: bytes, cert: x509.Certificate, *, aes256: bool) -> bytes:
    """A second producer: cryptography's PKCS7EnvelopeBuilder (RSA PKCS#1 v1.5, AES-CBC), DER."""
    builder = pkcs7.PKCS7EnvelopeBuilder().set_data(content).add_recipient(cert)
    builder = builder.set_content_encryption_algorithm(algorithms.AES256 if aes256 else algorithms.AES128)
    return builder.encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])


def smime_parts(entity: bytes) -> tuple[str, dict[str, str], bytes]:
    """(media type, parameters, transfer-decoded body) of a single-part MIME entity, as the
    MIME layer would hand them over."""
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(entity)
    params = {k.lower(): v for k, v in (msg.get_params() or [])[1:]}
    body = msg.get_payload(decode=True)
    assert isinstance(body, bytes)
    return msg.get_content_type(), params, body


def pem_body(pem: bytes) -> bytes:
    """The DER inside ``-----BEGIN CMS-----`` / ``-----BEGIN PKCS7-----`` armour."""
    lines = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
    return base64.b64decode(b"".join(lines))


def break_padding(der: bytes, plaintext_len: int) -> bytes:
    """The same EnvelopedData with the CBC padding of its last block made invalid.

    In CBC the last plaintext block is D(C_n) XOR C_(n-1), so XOR-ing the padding length
    (RFC 5652 §6.3: k - (l mod k) bytes of that value) into the last byte of C_(n-1) (or the IV
    for a single block) turns the final padding byte into 0, which is never valid padding.
    """
    info = cms.ContentInfo.load(der)
    eci = info["content"]["encrypted_content_info"]
    pad = 16 - plaintext_len % 16
    ciphertext = bytearray(eci["encrypted_content"].native)
    if len(ciphertext) >= 32:
        ciphertext[-17] ^= pad
        eci["encrypted_content"] = bytes(ciphertext)
    else:
        params = eci["content_encryption_algorithm"]
        iv = bytearray(params["parameters"].native)
        iv[-1] ^= pad
        params["parameters"] = bytes(iv)
    return bytes(info.dump(force=True))


def _name(common: str, mail: str | None) -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pop3-kafka tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common),
    ]
    if mail:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, mail))
    return x509.Name(attrs)


def make_pki(root: Path) -> Pki:
    """CA, recipients and signer; certificate and key files for the openssl command line."""
    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = _name("Throw-away S/MIME Test CA", None)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(root=root, ca_key=ca_key, ca_cert=ca_cert)
    people = {
        "alice": "Alice Example <alice@example.test>",
        "bob": "Bob Example <bob@example.test>",
        "carol": "Carol Stranger <carol.stranger@elsewhere.test>",
        "erin": "Erin Elliptic <erin@example.test>",
        "sender": "Sam Sender <sam@example.test>",
    }
    for name, who in people.items():
        display, _, rest = who.partition(" <")
        address = rest.rstrip(">")
        key: PrivateKey = (
            ec.generate_private_key(ec.SECP256R1())
            if name == "erin"
            else rsa.generate_private_key(public_exponent=65537, key_size=2048)
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(display, address))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(address)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path = root / f"{name}.crt"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = root / f"{name}.key"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        pki.ids[name] = Identity(name, key, cert, cert_path, key_path)
    return pki
