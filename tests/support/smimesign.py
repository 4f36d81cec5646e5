"""Signed S/MIME test mail: a PKI made by the openssl command line, signed mail made by
``openssl cms -sign`` (plus one hand-built RFC 8419 Ed25519 signature, which OpenSSL 3.0 cannot
make), and ``openssl cms -verify`` as the oracle the verifier is compared with.

The PKI (``make_sign_pki``): a trusted root, an intermediate under it (pathlen 0) that issues
the signers, and a second root nobody trusts ("stranger") with one signer of its own. All
certificates come from ``openssl ca`` so their validity can be set in the past or the future
(OpenSSL 3.0's ``x509 -req`` has no ``-not_before``). Signers:

=============  =================================================================================
``rsa``        RSA 2048, keyUsage digitalSignature+nonRepudiation, EKU emailProtection
``pss``        RSA 2048, signs with RSASSA-PSS (``-keyopt rsa_padding_mode:pss``)
``ecdsa``      EC P-256
``ed25519``    Ed25519 (the mail is built by :func:`ed25519_detached`; OpenSSL 3.0's ``cms -sign``
               and cryptography's PKCS7SignatureBuilder both refuse Ed25519 keys)
``weak``       RSA 1024 (below the verifier's 2048-bit floor; openssl accepts it)
``expired``    valid 2021-01-01 .. 2022-01-01
``future``     valid 2040-01-01 .. 2045-01-01
``server``     EKU serverAuth only (not for mail: reason key_usage)
``encipher``   keyUsage keyEncipherment only (not for signing: reason key_usage)
``stranger``   issued by the untrusted root (reason unknown_ca)
=============  =================================================================================

Every other certificate is valid 2020-01-01 .. 2050-01-01, so :data:`VERIFY_AT` (fixed, used
by the unit tests) and "now" (the connector's fetch time, in the end-to-end test) give the same
verdicts. :data:`VERIFY_AT` is also inside the PKITS validity (2010-01-01 .. 2030-12-31).

Every mail is returned as POP3 delivers it: CRLF at every line end (:func:`crlf`).

The catalogue (:func:`build_cases`) pairs each mail with the verdict of each signature layer,
outermost first, so the unit and end-to-end tests share one set of expectations.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cryptography_vectors
from asn1crypto import algos, cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from support.smime import Pki, make_pki, openssl

#: The validation moment of the unit tests (``DecodeOptions.verify_at``, ``openssl -attime``).
VERIFY_AT = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
ORACLE_TIMEOUT = 20  # seconds for one `openssl cms -verify`; it takes milliseconds

_LONG_AGO, _FAR_AHEAD = "20200101000000Z", "20500101000000Z"

# Extension sections for `openssl ca -extfile`; {email} is filled per signer.
_EXTENSIONS = """
[root]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash

[intermediate]
basicConstraints = critical,CA:true,pathlen:0
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[mail]
basicConstraints = CA:false
keyUsage = critical,digitalSignature,nonRepudiation
extendedKeyUsage = emailProtection
subjectAltName = email:{email}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[server]
basicConstraints = CA:false
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = email:{email}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[encipher]
basicConstraints = CA:false
keyUsage = critical,keyEncipherment
extendedKeyUsage = emailProtection
subjectAltName = email:{email}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""

_CA_CONFIG = """
[ca]
default_ca = this_ca

[this_ca]
database = {dir}/index.txt
new_certs_dir = {dir}/issued
serial = {dir}/serial
default_md = sha256
policy = anything
unique_subject = no
copy_extensions = none
email_in_dn = yes

[anything]
organizationName = optional
commonName = supplied
emailAddress = optional
"""


def crlf(data: bytes) -> bytes:
    """Every line end CRLF, as POP3 delivers mail (RFC 1939 §3)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# ------------------------------------------------------------------ the PKI


@dataclass(frozen=True)
class Signer:
    name: str
    cert_path: Path  # PEM
    key_path: Path  # PEM, PKCS#8
    cert: x509.Certificate
    #: certificates to send along with the signature (-certfile): the issuing intermediate.
    chain: tuple[Path, ...]
    email: str


@dataclass
class SignPki:
    """Certificate and key files under ``dir``; ``recipients`` holds the decryption keys of
    support.smime (``alice`` opens the signed-then-encrypted mail)."""

    dir: Path
    root: Path
    intermediate: Path
    stranger_root: Path
    signers: dict[str, Signer]
    recipients: Pki
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def __getitem__(self, name: str) -> Signer:
        return self.signers[name]

    def path(self, suffix: str) -> Path:
        return self.dir / "work" / f"m{next(self._seq)}{suffix}"

    # ------------------------------------------------------------ signing

    def sign(
        self,
        content: bytes,
        *signers: str,
        opaque: bool = False,
        stream: bool = False,
        md: str | None = None,
        noattr: bool = False,
        certs: bool = True,
        chain: bool = True,
        outform: str = "SMIME",
        econtent_type: str | None = None,
    ) -> bytes:
        """``openssl cms -sign`` in text mode (the content is a CRLF MIME entity already, so
        canonicalisation changes nothing). SMIME output: ``multipart/signed`` (detached) or
        ``application/pkcs7-mime; smime-type=signed-data`` (``opaque``); LF headers as openssl
        writes them (use :func:`crlf`). ``econtent_type``: a dotted OID for eContentType
        (``-econtent_type``) instead of id-data, as hostile mail may carry."""
        src = self.path(".in")
        src.write_bytes(content)
        out = self.path(".out")
        args: list[str | Path] = ["cms", "-sign", "-in", src, "-out", out, "-outform", outform]
        for name in signers or ("rsa",):
            s = self.signers[name]
            args += ["-signer", s.cert_path, "-inkey", s.key_path]
            if name == "pss":
                args += ["-keyopt", "rsa_padding_mode:pss"]
        if opaque:
            args.append("-nodetach")
        if stream:
            args.append("-stream")
        if md:
            args += ["-md", md]
        if noattr:
            args.append("-noattr")
        if econtent_type is not None:
            args += ["-econtent_type", econtent_type]
        if not certs:
            args.append("-nocerts")
        elif chain:
            extra = sorted({p for name in signers or ("rsa",) for p in self.signers[name].chain})
            if extra:
                bundle = self.path(".pem")
                bundle.write_bytes(b"".join(p.read_bytes() for p in extra))
                args += ["-certfile", bundle]
        openssl(*args)
        return out.read_bytes()

    def ed25519_detached(self, content: bytes) -> bytes:
        """A ``multipart/signed`` entity whose signature is an RFC 8419 Ed25519 SignerInfo:
        digestAlgorithm SHA-512, signatureAlgorithm id-Ed25519 without parameters, the
        signature over the DER of the signed attributes (SET OF). Built here because OpenSSL
        3.0 (``cms -sign``: "invalid digest") and cryptography's PKCS7SignatureBuilder ("Only
        RSA & EC keys") cannot; the structure follows RFC 5652 §5 as openssl writes it."""
        s = self.signers["ed25519"]
        key = serialization.load_pem_private_key(s.key_path.read_bytes(), None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        leaf = asn1_x509.Certificate.load(s.cert.public_bytes(serialization.Encoding.DER))
        chain = [asn1_x509.Certificate.load(_der_of(p)) for p in s.chain]
        signed_attrs = cms.CMSAttributes(
            [
                cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
                cms.CMSAttribute(
                    {"type": "signing_time", "values": [cms.Time({"utc_time": VERIFY_AT - dt.timedelta(hours=1)})]}
                ),
                cms.CMSAttribute({"type": "message_digest", "values": [hashlib.sha512(content).digest()]}),
            ]
        )
        signer_info = cms.SignerInfo(
            {
                "version": "v1",
                "sid": cms.SignerIdentifier(
                    {
                        "issuer_and_serial_number": cms.IssuerAndSerialNumber(
                            {"issuer": leaf.issuer, "serial_number": leaf.serial_number}
                        )
                    }
                ),
                "digest_algorithm": algos.DigestAlgorithm({"algorithm": "sha512"}),
                "signed_attrs": signed_attrs,
                "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": "ed25519"}),
                "signature": key.sign(signed_attrs.dump(force=True)),
            }
        )
        signed_data = cms.SignedData(
            {
                "version": "v1",
                "digest_algorithms": [algos.DigestAlgorithm({"algorithm": "sha512"})],
                "encap_content_info": {"content_type": "data"},
                "certificates": [leaf, *chain],
                "signer_infos": [signer_info],
            }
        )
        der = cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump()
        return multipart_signed(content, der, micalg="sha-512")

    def encrypt(self, entity: bytes, recipient: str = "alice") -> bytes:
        """``openssl cms -encrypt`` (AES-256, -binary: the entity as is) to a support.smime
        recipient; an ``application/pkcs7-mime; smime-type=enveloped-data`` entity, CRLF."""
        return crlf(self.recipients.encrypt(entity, recipient, outform="SMIME"))

    def key_file(self, recipient: str = "alice") -> Path:
        """PEM key and certificate of ``recipient``, for the decryption key ring."""
        return self.recipients.pem_file(recipient, key_first=True)

    # ------------------------------------------------------------ facts from openssl

    def facts(self, name: str) -> CertFacts:
        return cert_facts(self.signers[name].cert_path)


@dataclass(frozen=True)
class CertFacts:
    """What ``openssl x509`` says about a certificate (independent of the code under test)."""

    subject: str  # RFC 2253 / 4514
    issuer: str
    serial: str  # decimal
    sha256: str  # hex, lower case, of the DER
    emails: frozenset[str]
    not_before: dt.datetime
    not_after: dt.datetime


def cert_facts(path: Path) -> CertFacts:
    fmt = ["-inform", "DER"] if not path.read_bytes().startswith(b"-----") else []
    text = openssl(
        "x509", *fmt, "-in", path, "-noout", "-nameopt", "RFC2253", "-subject", "-issuer", "-serial",
        "-fingerprint", "-sha256", "-email", "-startdate", "-enddate",
    ).decode()  # fmt: skip
    fields: dict[str, str] = {}
    emails: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("subject", "issuer", "serial", "notBefore", "notAfter", "sha256 Fingerprint"):
            fields[key] = value.strip()
        elif line.strip():
            emails.add(line.strip())

    def when(value: str) -> dt.datetime:
        return dt.datetime.strptime(value, "%b %d %H:%M:%S %Y GMT").replace(tzinfo=dt.UTC)

    return CertFacts(
        subject=fields["subject"],
        issuer=fields["issuer"],
        serial=str(int(fields["serial"], 16)),
        sha256=fields["sha256 Fingerprint"].replace(":", "").lower(),
        emails=frozenset(emails),
        not_before=when(fields["notBefore"]),
        not_after=when(fields["notAfter"]),
    )


def _der_of(pem_path: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem_path.read_bytes()).public_bytes(serialization.Encoding.DER)


class _OpensslCa:
    """One CA directory for ``openssl ca`` (database, serial, issued certificates)."""

    def __init__(self, base: Path, name: str) -> None:
        self.dir = base / name
        (self.dir / "issued").mkdir(parents=True)
        (self.dir / "index.txt").write_text("")
        # A random positive start serial, so two CAs never issue the same issuer-less serial.
        (self.dir / "serial").write_text(f"{secrets.randbelow(1 << 60) + (1 << 60):x}\n")
        self.config = self.dir / "ca.cnf"
        self.config.write_text(_CA_CONFIG.format(dir=self.dir))
        self.cert = self.dir / f"{name}.pem"
        self.key = self.dir / f"{name}.key"

    def issue(
        self,
        csr: Path,
        out: Path,
        section: str,
        *,
        email: str = "",
        start: str = _LONG_AGO,
        end: str = _FAR_AHEAD,
        selfsign: bool = False,
    ) -> None:
        ext = self.dir / f"ext-{out.stem}.cnf"
        ext.write_text(_EXTENSIONS.format(email=email or "nobody@example.test"))
        args: list[str | Path] = ["ca", "-batch", "-notext", "-preserveDN", "-config", self.config]
        args += ["-in", csr, "-out", out, "-startdate", start, "-enddate", end, "-extfile", ext, "-extensions", section]
        args += ["-keyfile", self.key] + (["-selfsign"] if selfsign else ["-cert", self.cert])
        openssl(*args)
        out.write_bytes(_pem_only(out.read_bytes()))


def _pem_only(data: bytes) -> bytes:
    start = data.index(b"-----BEGIN CERTIFICATE-----")
    return data[start:]


def _new_key(path: Path, kind: str) -> None:
    algo = {
        "rsa": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        "rsa1024": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
        "ec": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "ed25519": ["-algorithm", "ED25519"],
    }[kind]
    openssl("genpkey", *algo, "-out", path)


def _csr(key: Path, subject: str, out: Path) -> Path:
    openssl("req", "-new", "-key", key, "-subj", subject, "-out", out)
    return out


# (name, key kind, extension section, validity, issuer, display name)
_SIGNERS: tuple[tuple[str, str, str, tuple[str, str], str, str], ...] = (
    ("rsa", "rsa", "mail", (_LONG_AGO, _FAR_AHEAD), "intermediate", "Rita Rsa"),
    ("pss", "rsa", "mail", (_LONG_AGO, _FAR_AHEAD), "intermediate", "Paul Pss"),
    ("ecdsa", "ec", "mail", (_LONG_AGO, _FAR_AHEAD), "intermediate", "Erik Ecdsa"),
    ("ed25519", "ed25519", "mail", (_LONG_AGO, _FAR_AHEAD), "intermediate", "Edda Edwards"),
    ("weak", "rsa1024", "mail", (_LONG_AGO, _FAR_AHEAD), "intermediate", "Willy Weak"),
    ("expired", "rsa", "mail", ("20210101000000Z", "20220101000000Z"), "intermediate", "Olga Old"),
    ("future", "rsa", "mail", ("20400101000000Z", "20450101000000Z"), "intermediate", "Fred Future"),
    ("server", "rsa", "server", (_LONG_AGO, _FAR_AHEAD), "intermediate", "Sven Server"),
    ("encipher", "rsa", "encipher", (_LONG_AGO, _FAR_AHEAD), "intermediate", "Enno Encipher"),
    ("stranger", "rsa", "mail", (_LONG_AGO, _FAR_AHEAD), "stranger", "Stan Stranger"),
)


def make_sign_pki(base: Path) -> SignPki:
    """Roots, intermediate and signers (see the module docstring); a few seconds (RSA keys)."""
    (base / "work").mkdir(parents=True)
    root = _OpensslCa(base, "root")
    inter = _OpensslCa(base, "intermediate")
    stranger = _OpensslCa(base, "stranger")
    for ca, subject in (
        (root, "/O=pop3-kafka tests/CN=Signature Test Root"),
        (stranger, "/O=elsewhere/CN=Stranger Root"),
    ):
        _new_key(ca.key, "rsa")
        ca.issue(_csr(ca.key, subject, ca.dir / "req.csr"), ca.cert, "root", selfsign=True)
    _new_key(inter.key, "rsa")
    root.issue(_csr(inter.key, "/O=pop3-kafka tests/CN=Signature Test Intermediate", inter.dir / "req.csr"),
               inter.cert, "intermediate")  # fmt: skip
    issuers = {"intermediate": (inter, (inter.cert,)), "stranger": (stranger, ())}
    signers: dict[str, Signer] = {}
    people = base / "signers"
    people.mkdir()
    for name, kind, section, (start, end), issuer, display in _SIGNERS:
        ca, chain = issuers[issuer]
        email = f"{name}@signers.example.test"
        key = people / f"{name}.key"
        cert = people / f"{name}.pem"
        _new_key(key, kind)
        # The first two carry the address in the subject too (legacy emailAddress, RFC 8550 §3).
        subject = f"/O=pop3-kafka tests/CN={display}" + (f"/emailAddress={email}" if name in ("rsa", "ecdsa") else "")
        ca.issue(_csr(key, subject, people / f"{name}.csr"), cert, section, email=email, start=start, end=end)
        signers[name] = Signer(name, cert, key, x509.load_pem_x509_certificate(cert.read_bytes()), chain, email)
    (base / "recipients").mkdir()
    return SignPki(
        dir=base,
        root=root.cert,
        intermediate=inter.cert,
        stranger_root=stranger.cert,
        signers=signers,
        recipients=make_pki(base / "recipients"),
    )


# ------------------------------------------------------------------ mail pieces


def head(subject: str, mid: str) -> bytes:
    return (
        f"From: Signed Sender <sender@signers.example.test>\r\nTo: r@example.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{mid}@sig.test>\r\nDate: Mon, 01 Jun 2026 11:00:00 +0000\r\n"
    ).encode()


def text_entity(marker: str) -> bytes:
    """The signed content: a MIME entity (header block, blank line, body), CRLF."""
    return (
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        f"Signed text {marker}.\r\nSecond line.\r\n"
    ).encode()


def plain_mail(subject: str, mid: str, marker: str) -> bytes:
    return head(subject, mid) + b"MIME-Version: 1.0\r\n" + text_entity(marker)


def multipart_signed(content: bytes, signature_der: bytes, *, micalg: str, boundary: str = "----sigB0undary") -> bytes:
    """RFC 8551 §3.5.3 ``multipart/signed``: ``content`` exactly, then the CRLF that belongs to
    the delimiter, then the signature part (base64, 64-column lines)."""
    b64 = base64.encodebytes(signature_der).replace(b"\n", b"\r\n")
    return (
        (
            f'MIME-Version: 1.0\r\nContent-Type: multipart/signed; protocol="application/pkcs7-signature"; '
            f'micalg="{micalg}"; boundary="{boundary}"\r\n\r\nThis is an S/MIME signed message\r\n\r\n'
            f"--{boundary}\r\n"
        ).encode()
        + content
        + (
            f'\r\n--{boundary}\r\nContent-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
            'Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename="smime.p7s"\r\n\r\n'
        ).encode()
        + b64
        + f"\r\n--{boundary}--\r\n".encode()
    )


def split_signature(entity: bytes) -> tuple[bytes, bytes, bytes]:
    """A CRLF ``multipart/signed`` entity as (everything up to the signature's base64, the
    base64 text, the rest)."""
    marker = b"Content-Type: application/pkcs7-signature"
    at = entity.index(marker)
    body = entity.index(b"\r\n\r\n", at) + 4
    end = entity.index(b"\r\n--", body)
    return entity[:body], entity[body:end], entity[end:]


def with_signature(entity: bytes, der: bytes) -> bytes:
    before, _, after = split_signature(entity)
    return before + base64.encodebytes(der).replace(b"\n", b"\r\n").rstrip(b"\r\n") + after


def signature_der(entity: bytes) -> bytes:
    return base64.b64decode(b"".join(split_signature(entity)[1].split()))


def flip_signature_value(der: bytes) -> bytes:
    """The same CMS with one bit of the (last) SignerInfo's signature value flipped: still
    well-formed, no longer a valid signature."""
    info = cms.ContentInfo.load(der)
    si = info["content"]["signer_infos"][0]
    value = bytearray(si["signature"].native)
    value[len(value) // 2] ^= 0x01
    si["signature"] = bytes(value)
    return bytes(info.dump(force=True))


def opaque_body(entity: bytes) -> bytes:
    """The DER of an ``application/pkcs7-mime`` entity (base64 body)."""
    return base64.b64decode(b"".join(entity.split(b"\r\n\r\n", 1)[1].split()))


def with_opaque_body(entity: bytes, der: bytes) -> bytes:
    header = entity.split(b"\r\n\r\n", 1)[0]
    return header + b"\r\n\r\n" + base64.encodebytes(der).replace(b"\n", b"\r\n")


# ------------------------------------------------------------------ the oracle


def openssl_verdict(mail: bytes, ca_file: Path, *flags: str, at: dt.datetime | None = VERIFY_AT) -> bool:
    """``openssl cms -verify`` of ``mail`` (read from stdin, S/MIME format, **text mode**:
    never ``-binary``, whose MIME splitter keeps a stray CR of the line before the boundary on
    CRLF mail), against ``ca_file`` as the only trust anchor, at ``at`` (``-attime``).

    ``-purpose smimesign`` is OpenSSL's default for ``cms -verify`` (CMS_verify sets it); it is
    spelled out so the oracle does not depend on that default. True when openssl says the
    signature verifies. The output (the content) is discarded.

    OpenSSL 3.0's ``cms`` has no ``-untrusted`` (and ignores ``-certfile`` when verifying): to
    supply an intermediate, put it in ``ca_file`` next to the root (the chain still has to end
    at the self-signed root: no ``-partial_chain``)."""
    args = ["openssl", "cms", "-verify", "-CAfile", str(ca_file), "-purpose", "smimesign", "-out", "/dev/null"]
    if at is not None:
        args += ["-attime", str(int(at.timestamp()))]
    args += list(flags)
    done = subprocess.run(args, input=mail, capture_output=True, timeout=ORACLE_TIMEOUT, check=False)
    return done.returncode == 0


# ------------------------------------------------------------------ NIST PKITS

PKITS = Path(cryptography_vectors.__file__).parent / "x509" / "PKITS_data"
PKITS_ANCHOR = PKITS / "certs" / "TrustAnchorRootCertificate.crt"  # DER
#: RFC 5280 policy processing from the initial policy set {anyPolicy}, as pyhanko-certvalidator
#: does; see tests/fixtures/pkits_differences.txt for the flags that were tried.
PKITS_ORACLE_FLAGS = ("-policy_check", "-policy", "2.5.29.32.0")
PKITS_DIFFERENCES = Path(__file__).resolve().parent.parent / "fixtures" / "pkits_differences.txt"


def pkits_mails() -> dict[str, bytes]:
    """The 224 signed PKITS mails by file name, CRLF (the files have LF headers)."""
    return {p.name: crlf(p.read_bytes()) for p in sorted((PKITS / "smime").glob("*.eml"))}


@dataclass(frozen=True)
class Listed:
    """One line of tests/fixtures/pkits_differences.txt."""

    ours: str  # "verdict/reason" ("valid" alone when valid)
    openssl: str  # "valid" or "invalid"
    why: str


def pkits_differences() -> dict[str, Listed]:
    """``file | ours | openssl | why`` lines; ``#`` comments and blank lines skipped."""
    out: dict[str, Listed] = {}
    name = PKITS_DIFFERENCES.name
    for n, line in enumerate(PKITS_DIFFERENCES.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("|")]
        assert len(fields) == 4 and all(fields), f"{name}:{n}: want 'file | ours | openssl | why'"
        mail, ours, theirs, why = fields
        assert mail not in out, f"{name}:{n}: {mail} listed twice"
        assert theirs in ("valid", "invalid"), f"{name}:{n}: openssl is valid or invalid"
        out[mail] = Listed(ours, theirs, why)
    return out


# ------------------------------------------------------------------ the catalogue


@dataclass(frozen=True)
class Layer:
    """Expected verdict of one signature layer."""

    path: str
    type: str  # detached | opaque
    verdict: str  # valid | invalid
    reason: str | None
    #: signer names in SignerInfo order, with their own reason (None: valid).
    signers: tuple[tuple[str, str | None], ...]
    #: the bytes ``openssl cms -verify`` judges for this layer (the whole mail, or the entity a
    #: decryption yields); None when openssl cannot judge (Ed25519 on OpenSSL 3.0).
    oracle: bytes | None
    #: a deliberate difference from openssl (documented in ``why``): openssl accepts MD5/SHA-1.
    differs: bool = False
    why: str = ""

    @property
    def openssl_expected(self) -> bool:
        return (self.verdict == "valid") != self.differs


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes  # CRLF, as POP3 delivers it
    layers: tuple[Layer, ...]
    marker: str  # text inside the innermost content
    encrypted: bool = False


def _layer(
    path: str,
    kind: str,
    signers: Sequence[str | tuple[str, str | None]],
    oracle: bytes | None,
    *,
    reason: str | None = None,
    differs: str = "",
) -> Layer:
    pairs = tuple((s, reason) if isinstance(s, str) else s for s in signers)
    return Layer(
        path=path,
        type=kind,
        verdict="valid" if reason is None else "invalid",
        reason=reason,
        signers=pairs,
        oracle=oracle,
        differs=bool(differs),
        why=differs,
    )


def build_cases(pki: SignPki) -> dict[str, Case]:
    """Every signed test mail with its expected layers (see the tests for what each shows)."""
    cases: dict[str, Case] = {}

    def mail(name: str, entity: bytes) -> bytes:
        return head(name.replace("_", " "), f"{name}.{secrets.token_hex(4)}") + crlf(entity)

    def add(name: str, raw: bytes, marker: str, *layers: Layer, encrypted: bool = False) -> None:
        cases[name] = Case(name, raw, layers, marker, encrypted)

    def simple(name: str, *signers: str, reason: str | None = None, differs: str = "", **sign: object) -> None:
        marker = f"M{secrets.token_hex(8)}"
        raw = mail(name, pki.sign(text_entity(marker), *signers, **sign))  # type: ignore[arg-type]
        kind = "opaque" if sign.get("opaque") else "detached"
        add(name, raw, marker, _layer("", kind, signers or ("rsa",), raw, reason=reason, differs=differs))

    # -- valid, by algorithm and encoding
    simple("rsa_detached", "rsa")
    simple("rsa_opaque", "rsa", opaque=True)
    simple("rsa_detached_stream", "rsa", stream=True)
    simple("rsa_opaque_stream", "rsa", opaque=True, stream=True)  # BER: indefinite lengths, chunked eContent
    simple("pss_detached", "pss")
    simple("ecdsa_detached", "ecdsa")
    simple("ecdsa_opaque", "ecdsa", opaque=True)
    simple("sha384_detached", "rsa", md="sha384")
    simple("noattr_detached", "rsa", noattr=True)  # signature over the content itself
    simple("noattr_opaque", "rsa", opaque=True, noattr=True)
    simple("two_signers", "rsa", "ecdsa")
    marker = f"M{secrets.token_hex(8)}"
    raw = mail("ed25519_detached", pki.ed25519_detached(text_entity(marker)))
    add("ed25519_detached", raw, marker, _layer("", "detached", ["ed25519"], None))

    # -- not valid: the certificate
    simple("expired_signer", "expired", reason="expired")
    simple("not_yet_valid_signer", "future", reason="not_yet_valid")
    simple("unknown_ca", "stranger", reason="unknown_ca")
    simple("server_auth_only", "server", reason="key_usage")
    simple("key_encipherment_only", "encipher", reason="key_usage")
    simple("no_certificates", "rsa", certs=False, reason="signer_certificate_missing")
    marker = f"M{secrets.token_hex(8)}"
    raw = mail("one_of_two_expired", pki.sign(text_entity(marker), "rsa", "expired"))
    add("one_of_two_expired", raw, marker,
        _layer("", "detached", [("rsa", None), ("expired", "expired")], raw, reason="expired"))  # fmt: skip

    # -- not valid: algorithms openssl still accepts (deliberate differences)
    simple("md5_digest", "rsa", md="md5", reason="unsupported_algorithm",
           differs="MD5 is refused by policy (RFC 6151, RFC 8551 §2.1); openssl accepts it")  # fmt: skip
    simple("sha1_digest", "rsa", md="sha1", reason="unsupported_algorithm",
           differs="SHA-1 is refused unless the trust store allows it (allow_sha1); openssl accepts it")  # fmt: skip
    simple("rsa1024_signer", "weak", reason="unsupported_algorithm",
           differs="signer keys under 2048 bits are refused; openssl (security level 1) accepts RSA 1024")  # fmt: skip

    # -- not valid: the mail changed after signing
    good_marker = f"M{secrets.token_hex(8)}"
    good = crlf(pki.sign(text_entity(good_marker), "rsa"))
    body_changed = good.replace(b"Signed text", b"Signed texT", 1)
    assert body_changed != good
    raw = mail("tampered_body", body_changed)
    add("tampered_body", raw, good_marker, _layer("", "detached", ["rsa"], raw, reason="tampered"))
    refolded = good.replace(b"Content-Type: text/plain; charset=utf-8", b"Content-Type: text/plain;\r\n charset=utf-8")
    assert refolded != good
    raw = mail("refolded_header", refolded)
    add("refolded_header", raw, good_marker, _layer("", "detached", ["rsa"], raw, reason="tampered"))
    raw = mail("signature_value_changed", with_signature(good, flip_signature_value(signature_der(good))))
    add("signature_value_changed", raw, good_marker, _layer("", "detached", ["rsa"], raw, reason="tampered"))
    other = crlf(pki.sign(text_entity(f"M{secrets.token_hex(8)}"), "rsa"))
    raw = mail("signature_of_other_mail", with_signature(good, signature_der(other)))
    add("signature_of_other_mail", raw, good_marker, _layer("", "detached", ["rsa"], raw, reason="tampered"))
    before, b64, after = split_signature(good)
    raw = mail("signature_truncated", before + b64[: len(b64) // 2].rstrip(b"\r\n") + after)
    add("signature_truncated", raw, good_marker, _layer("", "detached", [], raw, reason="malformed"))
    marker = f"M{secrets.token_hex(8)}"
    opaque = crlf(pki.sign(text_entity(marker), "rsa", opaque=True))
    der = opaque_body(opaque)
    changed = der.replace(b"Signed text", b"Signed texT", 1)
    assert changed != der and len(changed) == len(der)
    raw = mail("tampered_opaque", with_opaque_body(opaque, changed))
    add("tampered_opaque", raw, marker, _layer("", "opaque", ["rsa"], raw, reason="tampered"))

    # -- nesting (RFC 8551 §3.7): the inner layer is judged by openssl on the decrypted entity
    marker = f"M{secrets.token_hex(8)}"
    inner = crlf(pki.sign(text_entity(marker), "rsa"))
    raw = mail("signed_then_encrypted", pki.encrypt(inner))
    add("signed_then_encrypted", raw, marker, _layer("1", "detached", ["rsa"], inner), encrypted=True)
    marker = f"M{secrets.token_hex(8)}"
    inner = crlf(pki.sign(text_entity(marker), "ecdsa", opaque=True))
    raw = mail("opaque_signed_then_encrypted", pki.encrypt(inner))
    add("opaque_signed_then_encrypted", raw, marker, _layer("1", "opaque", ["ecdsa"], inner), encrypted=True)
    marker = f"M{secrets.token_hex(8)}"
    inner = crlf(pki.sign(text_entity(marker), "rsa")).replace(b"Signed text", b"Signed texT", 1)
    raw = mail("tampered_then_encrypted", pki.encrypt(inner))
    add("tampered_then_encrypted", raw, marker,
        _layer("1", "detached", ["rsa"], inner, reason="tampered"), encrypted=True)  # fmt: skip
    marker = f"M{secrets.token_hex(8)}"
    envelope = pki.encrypt(text_entity(marker))
    raw = mail("encrypted_then_signed", pki.sign(envelope, "rsa"))
    add("encrypted_then_signed", raw, marker, _layer("", "detached", ["rsa"], raw), encrypted=True)
    marker = f"M{secrets.token_hex(8)}"
    inner = crlf(pki.sign(text_entity(marker), "ecdsa", opaque=True))
    raw = mail("triple_wrapped", pki.sign(pki.encrypt(inner), "rsa"))
    add("triple_wrapped", raw, marker,
        _layer("", "detached", ["rsa"], raw), _layer("1.1", "opaque", ["ecdsa"], inner), encrypted=True)  # fmt: skip
    marker = f"M{secrets.token_hex(8)}"
    inner = crlf(pki.sign(text_entity(marker), "expired"))
    raw = mail("triple_wrapped_inner_expired", pki.sign(pki.encrypt(inner), "rsa", opaque=True))
    add("triple_wrapped_inner_expired", raw, marker,
        _layer("", "opaque", ["rsa"], raw),
        _layer("1.1", "detached", ["expired"], inner, reason="expired"), encrypted=True)  # fmt: skip
    return cases
