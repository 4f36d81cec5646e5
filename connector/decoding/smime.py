"""S/MIME (RFC 8551) decryption and opaque-signed unwrapping: CMS (RFC 5652) in, MIME entity out.

The heavy lifting is split between two libraries:

* asn1crypto parses the CMS structure. It reads BER (indefinite lengths, constructed OCTET
  STRINGs, as Outlook and ``openssl cms -stream`` write them) and re-encodes to DER, which is all
  that cryptography's parser accepts.
* cryptography's ``pkcs7_decrypt_der`` does the RSA and AES work. It supports exactly RSA
  PKCS#1 v1.5 key transport with AES-128-CBC or AES-256-CBC content encryption, recipients named
  by issuer and serial number only, and only KeyTransRecipientInfo entries; by design every
  failure inside it looks alike (a padding oracle must not tell a bad RSA block from a bad AES
  block, RFC 3218).

So :func:`decrypt` first classifies the parsed structure itself, giving the dead letter a
precise ``reason`` for everything cryptography cannot do (3DES, AES-GCM, RSA-OAEP, key
agreement...), and then hands cryptography a rebuilt, DER-encoded EnvelopedData holding only
the one recipient entry it selected, named by issuer and serial number. That rebuild is what
lets mail encrypted to several recipients of mixed kinds (an RSA and an EC certificate), or to a
subjectKeyIdentifier, be decrypted at all.

Nothing decrypted leaks: this module does not log, exception messages carry counts, algorithm
names and file names only, and exceptions are raised outside the ``except`` block that caught a
library error, so no traceback frame holding input or plaintext stays reachable from them.

No I/O except :func:`load_keys` reading key files. Everything is immutable after loading, so a
:class:`KeyRing` may be shared between threads.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple, NoReturn

from asn1crypto import cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    pkcs7,
    pkcs12,
)

from connector.errors import ConfigError, SmimeError

__all__ = [
    "Decrypted",
    "KeyRing",
    "KeySpec",
    "decrypt",
    "load_keys",
    "smime_type",
    "unwrap_signed_data",
]

# asn1crypto raises these for input it cannot parse (lazily, on first access of a field).
_PARSE_ERRORS: Final = (ValueError, TypeError, KeyError, IndexError, OverflowError)

# Content-encryption algorithms cryptography's pkcs7_decrypt_der can do (asn1crypto names).
_SUPPORTED_CIPHERS: Final = frozenset({"aes128_cbc", "aes256_cbc"})
# RSAES-PKCS1-v1_5 (rsaEncryption, RFC 8017 §7.2), the only key transport cryptography does.
_SUPPORTED_KEY_TRANSPORT: Final = "rsaes_pkcs1v15"
# Names for OIDs asn1crypto does not know, so dead letters say more than a dotted number.
_CIPHER_NAMES: Final = {
    "1.2.840.113549.1.9.16.3.18": "chacha20_poly1305",  # RFC 8103
    "1.2.840.113549.3.7": "3des_cbc",  # des-ede3-cbc, RFC 3370 §5.1
}
_KEY_TRANSPORT_NAMES: Final = {
    "rsaes_oaep": "RSAES-OAEP (RFC 8017 §7.1, RFC 3560)",
}
_RECIPIENT_KINDS: Final = {
    "ktri": "key-transport",
    "kari": "key-agreement",
    "kekri": "KEK",
    "pwri": "password",
    "ori": "other",
}

# RFC 8551 §3.2.2 smime-type values, keyed by their lower-case form.
_SMIME_TYPES: Final = {
    "enveloped-data": "enveloped-data",
    "signed-data": "signed-data",
    "certs-only": "certs-only",
    "compressed-data": "compressed-data",
    "authenveloped-data": "authEnveloped-data",
}
# RFC 8551 §3.2, plus the "x-" spelling from before the type was registered, still sent by older agents.
_PKCS7_MIME: Final = frozenset({"application/pkcs7-mime", "application/x-pkcs7-mime"})
# RFC 8551 §3.2.1 file name extensions; some agents label the part application/octet-stream.
_PKCS7_FILE_SUFFIXES: Final = (".p7m", ".p7c", ".p7z")

# One PEM block (RFC 7468 §2); the label says what it holds.
_PEM_BLOCK: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)


# ---------------------------------------------------------------- keys


class KeySpec(NamedTuple):
    """One configured decryption key: a PEM or PKCS#12 file, its password, and a label that
    names it in records and messages (the label, never the password, is ever shown)."""

    path: str | os.PathLike[str]
    password: str | None
    label: str


@dataclass(frozen=True, slots=True, repr=False)
class _Identity:
    """One certificate of a held key: how CMS recipient entries may name it (RFC 5652 §6.2.1)."""

    label: str
    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    #: asn1crypto Name and serial of the certificate; asn1crypto's Name equality applies the
    #: RFC 5280 §7.1 comparison rules, so a differently-spelled but equal issuer still matches.
    issuer: Any
    serial: int
    #: the certificate's subjectKeyIdentifier extension and the RFC 5280 §4.2.1.2 method (1)
    #: value (SHA-1 of the public key), which senders compute when the extension is absent.
    key_ids: frozenset[bytes]


class KeyRing:
    """The private keys that may decrypt mail, each with the certificate(s) issued for it.

    Built by :func:`load_keys`. Several certificates for one key are kept (a renewed certificate
    for the same key): mail encrypted to any of them decrypts. Keys are tried in the order they
    were configured. ``repr`` shows labels only.
    """

    __slots__ = ("_identities", "_labels")

    def __init__(self) -> None:
        self._identities: tuple[_Identity, ...] = ()
        self._labels: tuple[str, ...] = ()

    @classmethod
    def _of(cls, entries: Iterable[tuple[str, rsa.RSAPrivateKey, tuple[x509.Certificate, ...]]]) -> KeyRing:
        ring = cls()
        identities: list[_Identity] = []
        labels: list[str] = []
        for label, key, certs in entries:
            labels.append(label)
            identities.extend(_identity(label, key, cert) for cert in certs)
        ring._identities = tuple(identities)
        ring._labels = tuple(labels)
        return ring

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def __repr__(self) -> str:
        return f"KeyRing(labels={list(self._labels)!r})"


def _identity(label: str, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> _Identity:
    parsed = asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))
    key_ids = {x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest}
    with contextlib.suppress(x509.ExtensionNotFound):
        key_ids.add(cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest)
    return _Identity(
        label=label,
        key=key,
        cert=cert,
        issuer=parsed.issuer,
        serial=int(parsed.serial_number),
        key_ids=frozenset(key_ids),
    )


def load_keys(specs: Iterable[tuple[str | os.PathLike[str], str | None, str]]) -> KeyRing:
    """Load S/MIME decryption keys: each spec is ``(path, password, label)`` (see :class:`KeySpec`).

    A file is PEM (a private key and its certificate, in either order, possibly with further
    certificates such as the CA chain; the certificate(s) whose public key matches the private
    key are kept) or PKCS#12 (.p12/.pfx, RFC 7292), told apart by content. Only RSA keys are
    accepted: cryptography decrypts RSA key transport only. Certificates are not checked for
    expiry or trust: old mail encrypted to an expired certificate must still open.

    Raises :class:`ConfigError` naming the label, the file and the fix (never the password).
    """
    entries: list[tuple[str, rsa.RSAPrivateKey, tuple[x509.Certificate, ...]]] = []
    seen: set[str] = set()
    for raw_path, password, label in specs:
        path = Path(raw_path)
        where = f"S/MIME key {label!r} ({path})"
        if not label or not label.strip():
            raise ConfigError(f"S/MIME key for {path}: the label is empty; give every key a unique label")
        if label in seen:
            raise ConfigError(f"{where}: the label is used twice; give every key a unique label")
        seen.add(label)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot read the file ({exc.strerror or type(exc).__name__}); "
                "check the path and that the connector's user may read it"
            ) from None
        pw = password.encode("utf-8") if password is not None else None
        if b"-----BEGIN " in data:
            key, certs = _load_pem(data, pw, where)
        else:
            key, certs = _load_pkcs12(data, pw, where)
        entries.append((label, _rsa_only(key, where), _matching(key, certs, where)))
    return KeyRing._of(entries)


def _load_pem(data: bytes, password: bytes | None, where: str) -> tuple[object, list[x509.Certificate]]:
    blocks = [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_BLOCK.finditer(data)]
    keys = [block for name, block in blocks if name.endswith("PRIVATE KEY")]
    if not keys:
        raise ConfigError(f"{where}: the PEM file holds no private key; put the key and its certificate in one file")
    if len(keys) > 1:
        raise ConfigError(f"{where}: the PEM file holds {len(keys)} private keys; use one file per key")
    encrypted = b"ENCRYPTED" in keys[0]  # PKCS#8 "ENCRYPTED PRIVATE KEY" or RFC 1421 "Proc-Type: 4,ENCRYPTED"
    problem = ""
    key: object = None
    try:
        key = load_pem_private_key(keys[0], password)
    except TypeError:
        # cryptography's way of saying the password is missing, or given for a plain key.
        problem = (
            "the private key is encrypted; configure its password"
            if password is None
            else "the private key is not encrypted, but a password is configured; remove the password"
        )
    except ValueError:
        problem = (
            "wrong password for the private key"
            if encrypted and password is not None
            else "the private key cannot be parsed; expected a PEM RSA private key (PKCS#1 or PKCS#8)"
        )
    except UnsupportedAlgorithm:
        problem = "the private key uses an unsupported format or encryption; re-export it as PKCS#8 with AES"
    if problem:
        raise ConfigError(f"{where}: {problem}")
    certs: list[x509.Certificate] = []
    for i, block in enumerate((b for name, b in blocks if name in ("CERTIFICATE", "X509 CERTIFICATE")), 1):
        cert = _pem_certificate(block)
        if cert is None:
            raise ConfigError(f"{where}: certificate #{i} in the PEM file cannot be parsed")
        certs.append(cert)
    return key, certs


def _pem_certificate(block: bytes) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(block.replace(b"X509 CERTIFICATE", b"CERTIFICATE"))
    except ValueError:
        return None


def _load_pkcs12(data: bytes, password: bytes | None, where: str) -> tuple[object, list[x509.Certificate]]:
    loaded: tuple[Any, x509.Certificate | None, list[x509.Certificate]] | None = None
    with contextlib.suppress(ValueError, TypeError, UnsupportedAlgorithm):
        loaded = pkcs12.load_key_and_certificates(data, password)
    if loaded is None:
        # cryptography does not tell a wrong password from a file that is not PKCS#12.
        none = " (none is configured)" if password is None else ""
        raise ConfigError(
            f"{where}: cannot open the file as PKCS#12: wrong password{none}, or neither PKCS#12 nor PEM; "
            "check the password, or convert the key and certificate to PEM"
        )
    key, cert, extra = loaded
    if key is None:
        raise ConfigError(f"{where}: the PKCS#12 file holds no private key; export it with the private key")
    return key, [c for c in (cert, *extra) if c is not None]


def _rsa_only(key: object, where: str) -> rsa.RSAPrivateKey:
    if isinstance(key, rsa.RSAPrivateKey):
        return key
    kinds: tuple[tuple[type, str], ...] = (
        (ec.EllipticCurvePrivateKey, "an EC key (ECDH key agreement is not supported)"),
        (ed25519.Ed25519PrivateKey, "an Ed25519 key (signing only)"),
        (ed448.Ed448PrivateKey, "an Ed448 key (signing only)"),
        (x25519.X25519PrivateKey, "an X25519 key (key agreement is not supported)"),
        (x448.X448PrivateKey, "an X448 key (key agreement is not supported)"),
        (dsa.DSAPrivateKey, "a DSA key (signing only)"),
    )
    kind = next((text for cls, text in kinds if isinstance(key, cls)), "a key of an unknown type")
    raise ConfigError(f"{where}: the file holds {kind}; S/MIME decryption supports RSA keys only")


def _matching(key: object, certs: list[x509.Certificate], where: str) -> tuple[x509.Certificate, ...]:
    assert isinstance(key, rsa.RSAPrivateKey)  # checked by _rsa_only first
    if not certs:
        raise ConfigError(f"{where}: the file holds no certificate; add the certificate issued for this key")
    wanted = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    found = tuple(c for c in certs if _spki(c) == wanted)
    if not found:
        raise ConfigError(
            f"{where}: none of the {len(certs)} certificate(s) in the file belongs to its private key; "
            "add the certificate issued for this key"
        )
    return found


def _spki(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, UnsupportedAlgorithm):
        return None  # a CA certificate with a key type cryptography cannot load is simply not ours


# ---------------------------------------------------------------- decryption


@dataclass(frozen=True, slots=True)
class Decrypted:
    """A decrypted S/MIME entity: the inner MIME entity (RFC 8551 §3.3), the label of the key
    that opened it, and the content-encryption algorithm (``"aes128_cbc"``, ``"aes256_cbc"``)."""

    content: bytes = field(repr=False)
    key_label: str
    cipher: str


@dataclass(frozen=True, slots=True)
class _Recipient:
    """One RecipientInfo, reduced to what selection needs (RFC 5652 §6.2)."""

    kind: str  # asn1crypto's choice name: ktri, kari, kekri, pwri, ori
    info: Any = None  # the KeyTransRecipientInfo, for ktri only
    issuer: Any = None
    serial: int | None = None
    key_id: bytes | None = None
    key_transport: str = ""


def decrypt(data: bytes, ring: KeyRing) -> Decrypted:
    """Decrypt an application/pkcs7-mime enveloped-data entity (RFC 8551 §3.3).

    ``data`` is the CMS ContentInfo after transfer decoding, DER or BER. Raises
    :class:`SmimeError` with reason "malformed" (not CMS), "not_enveloped" (CMS, but not
    EnvelopedData or AuthEnvelopedData), "no_key", "unsupported_key_transport",
    "unsupported_cipher" or "decrypt_failed"; messages carry counts and algorithm names only.
    """
    info = _load(data)
    if info is None:
        raise SmimeError("not a CMS ContentInfo (truncated or not DER/BER)", reason="malformed")
    envelope = _envelope(info)
    if envelope is None:
        raise SmimeError("the enveloped-data structure cannot be parsed", reason="malformed")
    content_type, recipients, eci, cipher = envelope
    if content_type not in ("enveloped_data", "authenticated_enveloped_data"):
        raise SmimeError(f"CMS content is {_cms_type_name(content_type)}, not enveloped-data", reason="not_enveloped")

    matches = [(ident, r) for ident in ring._identities for r in recipients if r.kind == "ktri" and _names(r, ident)]
    if not matches:
        _raise_unmatched(recipients, len(ring))
    # Several matches (mail to two of our keys, or to two certificates of one key): the first
    # whose algorithms we support, in configured key order; otherwise explain the first.
    usable = [(i, r) for i, r in matches if r.key_transport == _SUPPORTED_KEY_TRANSPORT]
    if not usable:
        name = _KEY_TRANSPORT_NAMES.get(matches[0][1].key_transport, matches[0][1].key_transport)
        raise SmimeError(
            f"encrypted to key {matches[0][0].label!r} with key transport {name}; "
            "only RSA PKCS#1 v1.5 key transport is supported",
            reason="unsupported_key_transport",
        )
    if content_type == "authenticated_enveloped_data":
        # RFC 5083 AuthEnvelopedData (AES-GCM, ChaCha20-Poly1305): cryptography only opens
        # EnvelopedData.
        raise SmimeError(
            f"AuthEnvelopedData (RFC 5083) with {cipher}; only EnvelopedData with AES-CBC is supported",
            reason="unsupported_cipher",
        )
    if cipher not in _SUPPORTED_CIPHERS:
        raise SmimeError(
            f"content encrypted with {cipher}; only AES-128-CBC and AES-256-CBC are supported",
            reason="unsupported_cipher",
        )
    ident, recipient = usable[0]
    der = _single_recipient(recipient, ident, eci)
    if der is None:
        raise SmimeError("the encrypted content is absent or cannot be re-encoded", reason="malformed")
    plaintext: bytes | None = None
    failure = ""
    try:
        plaintext = pkcs7.pkcs7_decrypt_der(der, ident.cert, ident.key, [])
    except (ValueError, UnsupportedAlgorithm) as exc:
        # Only the type: cryptography's text could tell a bad RSA block from bad AES padding,
        # which dead letters must not publish (a padding oracle, RFC 3218).
        failure = type(exc).__name__
    if plaintext is None:
        raise SmimeError(
            f"decryption with key {ident.label!r} failed ({failure}): wrong key, or corrupted mail",
            reason="decrypt_failed",
        )
    return Decrypted(content=plaintext, key_label=ident.label, cipher=cipher)


def _load(data: bytes) -> Any:
    """The parsed ContentInfo, or None. Bytes after the ContentInfo (padding some agents add
    before base64 encoding) are ignored."""
    if not data:
        return None
    try:
        info = cms.ContentInfo.load(bytes(data), strict=False)
        # asn1crypto parses lazily: touch the content type and the content's header now.
        _ = info["content_type"].dotted, info["content"]
    except _PARSE_ERRORS:
        return None
    return info


def _envelope(info: Any) -> tuple[str, list[_Recipient], Any, str] | None:
    """(content type name, recipients, EncryptedContentInfo, cipher name), or None when
    malformed. For content types other than the two enveloped ones, only the type is filled."""
    try:
        content_type = str(info["content_type"].native)
        if content_type not in ("enveloped_data", "authenticated_enveloped_data"):
            return content_type, [], None, ""
        env = info["content"]
        # RFC 5083 §2.1 renames the field in AuthEnvelopedData.
        eci = env["encrypted_content_info" if content_type == "enveloped_data" else "auth_encrypted_content_info"]
        algorithm = eci["content_encryption_algorithm"]["algorithm"]
        cipher = _CIPHER_NAMES.get(algorithm.dotted) or str(algorithm.native)
        recipients = [_recipient(ri) for ri in env["recipient_infos"]]
    except _PARSE_ERRORS:
        return None
    return content_type, recipients, eci, cipher


def _recipient(ri: Any) -> _Recipient:
    kind = str(ri.name)
    if kind != "ktri":
        return _Recipient(kind=kind)
    ktri = ri.chosen
    rid = ktri["rid"]
    transport = ktri["key_encryption_algorithm"]["algorithm"]
    common: dict[str, Any] = {"kind": kind, "info": ktri, "key_transport": str(transport.native)}
    if rid.name == "issuer_and_serial_number":
        return _Recipient(issuer=rid.chosen["issuer"], serial=int(rid.chosen["serial_number"].native), **common)
    return _Recipient(key_id=bytes(rid.chosen.native), **common)


def _names(recipient: _Recipient, ident: _Identity) -> bool:
    if recipient.key_id is not None:
        return recipient.key_id in ident.key_ids
    if recipient.serial != ident.serial:
        return False
    try:
        return bool(recipient.issuer == ident.issuer)
    except _PARSE_ERRORS:
        return False  # an issuer name asn1crypto cannot compare is not one of ours


def _raise_unmatched(recipients: list[_Recipient], held: int) -> NoReturn:
    """No key-transport entry names a key we hold: "no_key", unless entries of kinds we cannot
    use at all are present (they might be for us: a key we could not have loaded)."""
    counts: dict[str, int] = {}
    for r in recipients:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    listing = ", ".join(f"{n} {_RECIPIENT_KINDS.get(k, 'other')}" for k, n in counts.items()) or "none"
    if any(kind != "ktri" for kind in counts):
        raise SmimeError(
            f"no key-transport recipient names one of the {held} key(s) held (recipients: {listing}); "
            "only RSA key transport (KeyTransRecipientInfo) is supported",
            reason="unsupported_key_transport",
        )
    raise SmimeError(
        f"not encrypted to any of the {held} key(s) held (recipients: {listing})",
        reason="no_key",
    )


def _single_recipient(recipient: _Recipient, ident: _Identity, eci: Any) -> bytes | None:
    """A DER EnvelopedData with just the selected KeyTransRecipientInfo, named by issuer and
    serial number, for cryptography (which parses only that form and only DER).

    Dropping the other entries, originatorInfo and unprotectedAttrs changes nothing that the
    decryption depends on: EnvelopedData authenticates nothing (RFC 5652 §6), and the encrypted
    key is bound to the RSA key, not to how the entry names it. With one version-0 entry and
    neither optional field, the EnvelopedData version is 0 (RFC 5652 §6.1).
    """
    try:
        if isinstance(eci["encrypted_content"], core.Void):
            return None  # detached ciphertext (RFC 5652 §6.1 allows it; S/MIME never uses it)
        ktri = cms.KeyTransRecipientInfo(
            {
                "version": "v0",
                "rid": cms.RecipientIdentifier(
                    name="issuer_and_serial_number",
                    value=cms.IssuerAndSerialNumber(
                        {
                            "issuer": asn1_x509.Name.load(ident.issuer.dump()),
                            "serial_number": ident.serial,
                        }
                    ),
                ),
                "key_encryption_algorithm": recipient.info["key_encryption_algorithm"],
                "encrypted_key": recipient.info["encrypted_key"],
            }
        )
        envelope = cms.EnvelopedData(
            {
                "version": "v0",
                "recipient_infos": [cms.RecipientInfo(name="ktri", value=ktri)],
                "encrypted_content_info": eci,
            }
        )
        # force=True re-encodes every nested value, turning BER into DER.
        return bytes(cms.ContentInfo({"content_type": "enveloped_data", "content": envelope}).dump(force=True))
    except _PARSE_ERRORS:
        return None


def _cms_type_name(content_type: str) -> str:
    return {
        "signed_data": "signed-data",
        "enveloped_data": "enveloped-data",
        "authenticated_enveloped_data": "authEnveloped-data",
        "data": "data",
        "compressed_data": "compressed-data",
        "signed_and_enveloped_data": "PKCS#7 signedAndEnvelopedData",
        "digested_data": "digested-data",
        "encrypted_data": "encrypted-data (password based)",
        "authenticated_data": "authenticated-data",
    }.get(content_type, "an unknown content type")


# ---------------------------------------------------------------- signed-data, content types


def unwrap_signed_data(data: bytes) -> bytes:
    """The encapsulated MIME entity (eContent) of opaque signed mail (RFC 8551 §3.5.2),
    WITHOUT verifying the signature. ``data`` is the CMS ContentInfo, DER or BER.

    Raises :class:`SmimeError` (reason "malformed") when ``data`` is not SignedData, the
    signature is detached (no eContent: the content is the first part of a multipart/signed),
    or eContentType is not id-data.
    """
    info = _load(data)
    problem = "not a CMS ContentInfo (truncated or not DER/BER)"
    content: bytes | None = None
    if info is not None:
        problem, content = _econtent(info)
    if content is None:
        raise SmimeError(problem, reason="malformed")
    return content


def _econtent(info: Any) -> tuple[str, bytes | None]:
    try:
        content_type = str(info["content_type"].native)
        if content_type != "signed_data":
            return f"CMS content is {_cms_type_name(content_type)}, not signed-data", None
        encap = info["content"]["encap_content_info"]
        econtent = encap["content"]
        if isinstance(econtent, core.Void):
            return "signed-data without encapsulated content (a detached signature, or certs-only)", None
        if encap["content_type"].native != "data":
            return "signed-data whose encapsulated content is not id-data", None
        # .native joins the chunks of a BER constructed OCTET STRING.
        value = econtent.native
        if not isinstance(value, bytes):
            return "signed-data whose encapsulated content cannot be read", None
    except _PARSE_ERRORS:
        return "the signed-data structure cannot be parsed", None
    return "", value


def smime_type(content_type: str, params: Mapping[str, str], body: bytes | None = None) -> str | None:
    """What an S/MIME part holds (RFC 8551 §3.2.2): "enveloped-data", "signed-data",
    "authEnveloped-data", "certs-only", "compressed-data", or None for anything else.

    ``content_type`` is the media type, ``params`` its parameters (any case). The smime-type
    parameter decides for application/pkcs7-mime and the legacy application/x-pkcs7-mime.
    When it is missing or unknown, and for application/octet-stream named ``*.p7m`` (some
    agents label it so), the CMS contentType of ``body`` (the transfer-decoded part, when the
    caller passes it) decides. multipart/signed is None: clear-signed mail is plain MIME.
    """
    media = content_type.strip().lower()
    lowered = {k.lower(): v for k, v in params.items()}
    if media in _PKCS7_MIME:
        declared = _SMIME_TYPES.get(lowered.get("smime-type", "").strip().strip('"').lower())
        if declared is not None:
            return declared
    elif not (media == "application/octet-stream" and lowered.get("name", "").lower().endswith(_PKCS7_FILE_SUFFIXES)):
        return None
    return _sniff(body) if body is not None else None


def _sniff(body: bytes) -> str | None:
    info = _load(body)
    if info is None:
        return None
    try:
        content_type = str(info["content_type"].native)
        if content_type == "signed_data":
            signed = info["content"]
            # RFC 8551 §3.2.2 makes certs-only a SignedData; it has no signers and no content
            # (RFC 8551, "Creating a Certificate Management Message").
            if len(signed["signer_infos"]) == 0 and isinstance(signed["encap_content_info"]["content"], core.Void):
                return "certs-only"
            return "signed-data"
    except _PARSE_ERRORS:
        return None
    return {
        "enveloped_data": "enveloped-data",
        "authenticated_enveloped_data": "authEnveloped-data",
        "compressed_data": "compressed-data",
    }.get(content_type)
