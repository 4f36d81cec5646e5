"""S/MIME signature verification (RFC 8551 §3.5, RFC 5652 §5): signer, integrity, chain.

cryptography has no public API to verify CMS signatures (its maintainers keep the test-only
helper private: docs/decisions/0006-signatures-and-registry.md), and the libraries that wrap one
pull in a PDF or an unmaintained stack. So the SignerInfo check is ours, on asn1crypto's CMS
structures, and the parts that are easy to get subtly wrong are delegated:

* the signature primitive (RSA PKCS#1 v1.5 and PSS with their parameters, ECDSA, EdDSA, DSA) is
  pyhanko-certvalidator's ``DefaultSignatureValidator`` on cryptography;
* the certificate path (RFC 5280 §6: building, name chaining, validity at a given moment,
  basicConstraints, policies, name constraints, unknown critical extensions) is
  pyhanko-certvalidator's ``CertificateValidator``, with explicit trust roots and no network:
  fetching is off and revocation is not checked (no CRL or OCSP is fetched).

What we check ourselves, per SignerInfo (RFC 5652 §5.4-§5.6):

1. the signer certificate named by ``sid`` (issuer and serial, or subjectKeyIdentifier) is in
   the SignedData's certificates, the configured intermediates or the trust roots;
2. the content digest with the SignerInfo's digest algorithm (MD5 never; SHA-1 only when the
   mailbox allows it) over the eContent octets, or for a detached signature over the exact
   bytes of the first body part as received (:func:`first_part`);
3. with signed attributes: exactly one messageDigest equal to that digest and exactly one
   contentType equal to eContentType (§11.1, §11.2); the signature is over the attributes
   encoded as a ``SET OF`` (tag 0x31), not the ``[0]`` under which they travel (§5.4);
   without them, over the content itself;
4. key usage for signing (RFC 8550 §4.4.2, §4.4.4): keyUsage, when present, has
   digitalSignature or nonRepudiation; extendedKeyUsage, when present, has emailProtection or
   anyExtendedKeyUsage.

A verdict is a fact for the record, never an exception: :func:`verify_detached` and
:func:`verify_opaque` return a :class:`SignatureCheck`. Messages carry algorithm names, reasons
and certificate names only; no content. Everything here is immutable after loading, so a
:class:`TrustStore` may be shared between decode threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.utils import CryptographyDeprecationWarning
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator import errors as cv_errors
from pyhanko_certvalidator.policy_decl import DisallowWeakAlgorithmsPolicy
from pyhanko_certvalidator.registry import CertificateRegistry
from pyhanko_certvalidator.sig_validate import DefaultSignatureValidator, SignatureValidationContext

from connector.decoding.mime import clean_str
from connector.errors import ConfigError, MailTooLargeError

__all__ = [
    "MAX_CERTIFICATES",
    "MAX_SIGNERS",
    "REASONS",
    "SignatureCheck",
    "SignerFacts",
    "TrustStore",
    "load_trust_store",
    "verify_detached",
    "verify_opaque",
]

Verdict = Literal["valid", "invalid", "unchecked"]

#: Every reason a signature may be not valid; documented in docs/smime.md.
REASONS: Final = (
    "tampered",  # the content or the signed attributes changed after signing, or a wrong signature
    "unknown_ca",  # no path from the signer to a configured trust root
    "expired",  # a certificate of the path had expired at the validation time
    "not_yet_valid",  # ... or was not yet valid
    "unsupported_algorithm",  # a digest or signature algorithm we do not (or may not) use
    "invalid_chain",  # a path exists but breaks RFC 5280 (constraints, policies, CA flags...)
    "key_usage",  # the signer certificate is not for signing mail
    "signer_certificate_missing",  # sid names a certificate the mail does not carry
    "malformed",  # not SignedData, no signer, unparseable
    "no_trust_store",  # integrity holds; the mailbox has no trust store, so no chain verdict
)

# Digest algorithms by asn1crypto name -> hashlib name. MD5 is absent on purpose: collisions
# are practical (RFC 6151), and RFC 8551 §2.1 drops it for signatures.
_DIGESTS: Final = {
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "sha3_224": "sha3_224",
    "sha3_256": "sha3_256",
    "sha3_384": "sha3_384",
    "sha3_512": "sha3_512",
}
# id-ecPublicKey (RFC 5480) written as the signature algorithm: some agents do, OpenSSL accepts it.
_EC_PUBLIC_KEY: Final = "1.2.840.10045.2.1"
_PARSE_ERRORS: Final = (ValueError, TypeError, KeyError, IndexError, OverflowError)
_PEM_CERT: Final = re.compile(rb"-----BEGIN (?:X509 |TRUSTED )?CERTIFICATE-----(.*?)-----END", re.DOTALL)
_HASH_CHUNK: Final = 1 << 20
#: smallest keys accepted, for signers and (through the validation policy) CAs: NIST SP
#: 800-131A (RSA and DSA under 2048 bits are disallowed for signing).
_MIN_KEY_BITS: Final = {"rsa": 2048, "rsassa_pss": 2048, "dsa": 2048}
#: id-data (RFC 5652 §4): what an S/MIME signature covers.
_ID_DATA: Final = "1.2.840.113549.1.7.1"
#: SignerInfos checked per layer, certificates read per SignedData, and path-building steps per
#: signer: far above real mail (one or two signers, a handful of certificates), low enough that
#: hostile mail costs milliseconds.
MAX_SIGNERS: Final = 16
MAX_CERTIFICATES: Final = 64
MAX_PATH_STEPS: Final = 256
_SIG_VALIDATOR: Final = DefaultSignatureValidator()


# ---------------------------------------------------------------- trust store


@dataclass(frozen=True, slots=True)
class TrustStore:
    """Trusted roots and extra intermediates for signature chains, plus the digest policy."""

    roots: tuple[asn1_x509.Certificate, ...]
    intermediates: tuple[asn1_x509.Certificate, ...] = ()
    #: SHA-1 in the SignerInfo digest and in certificate signatures (legacy senders).
    allow_sha1: bool = False

    def __repr__(self) -> str:
        return f"TrustStore(roots={len(self.roots)}, intermediates={len(self.intermediates)})"


def _certificates(path: Path, what: str) -> list[asn1_x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{what} {str(path)!r}: cannot read the file ({exc.strerror or type(exc).__name__}); "
            "check the path and that the connector's user may read it"
        ) from None
    blobs = [_b64(m.group(1)) for m in _PEM_CERT.finditer(data)] if b"-----BEGIN" in data else [data]
    certs: list[asn1_x509.Certificate] = []
    for blob in blobs:
        cert = _parse_certificate(blob)
        if cert is None:
            raise ConfigError(
                f"{what} {str(path)!r}: a certificate cannot be parsed; expected PEM (BEGIN CERTIFICATE) or DER"
            )
        certs.append(cert)
    if not certs:
        raise ConfigError(f"{what} {str(path)!r}: the file holds no certificate (BEGIN CERTIFICATE)")
    return certs


def _b64(text: bytes) -> bytes:
    import base64  # noqa: PLC0415 - only when loading PEM

    return base64.b64decode(b"".join(text.split()), validate=False)


def _parse_certificate(blob: bytes) -> asn1_x509.Certificate | None:
    try:
        cert = asn1_x509.Certificate.load(blob)
        _ = cert.subject, cert.serial_number, cert.public_key  # asn1crypto parses lazily
    except _PARSE_ERRORS:
        return None
    return cert


def load_trust_store(
    roots: Iterable[str | Path], intermediates: Iterable[str | Path] = (), *, allow_sha1: bool = False
) -> TrustStore:
    """Read trusted root certificates and optional intermediates (PEM files with one or more
    certificates, or DER files). Raises :class:`ConfigError` naming the file and the fix."""
    root_certs = [c for p in roots for c in _certificates(Path(p), "S/MIME trust store file")]
    if not root_certs:
        raise ConfigError("S/MIME trust store: no file given; list the PEM files of the CAs you trust")
    extra = [c for p in intermediates for c in _certificates(Path(p), "S/MIME intermediates file")]
    return TrustStore(roots=tuple(root_certs), intermediates=tuple(extra), allow_sha1=allow_sha1)


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class SignerFacts:
    """One SignerInfo: who (as the certificate says) and the verdict for this signer."""

    subject: str
    issuer: str
    serial: str
    #: SHA-256 of the certificate's DER, hex; empty when the certificate is missing.
    sha256: str
    emails: tuple[str, ...]
    not_before: datetime | None
    not_after: datetime | None
    #: the signingTime attribute: the signer's claim, recorded, never used for validation.
    signing_time: datetime | None
    digest_algorithm: str
    signature_algorithm: str
    verdict: Verdict
    reason: str | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class SignatureCheck:
    """One signature layer of a mail (RFC 8551 §3.7 allows several)."""

    #: part path of the signed entity ("" the message, "1" its first part...).
    layer: str
    type: Literal["detached", "opaque"]
    #: valid only when every signer is valid.
    verdict: Verdict
    reason: str | None
    detail: str | None
    signers: tuple[SignerFacts, ...]
    #: the moment the chain was validated at.
    verified_at: datetime


def _now() -> datetime:
    """The validation moment when the caller gives none (a seam for tests comparing decodes)."""
    return datetime.now(UTC)


class _Invalid(Exception):  # noqa: N818 - an outcome, raised inside this module only
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------- verification


def verify_detached(
    signature: bytes,
    content: bytes | memoryview,
    *,
    layer: str,
    trust: TrustStore | None,
    at: datetime | None = None,
    deadline: float | None = None,
) -> SignatureCheck:
    """Verify an application/pkcs7-signature (``signature``, the transfer-decoded CMS
    ContentInfo) over ``content``, the exact bytes of the first part of the multipart/signed as
    the splitter parsed it. ``deadline`` (time.monotonic): past it, MailTooLargeError."""
    return _verify(signature, content, "detached", layer, trust, at, deadline)[0]


def verify_opaque(
    data: bytes, *, layer: str, trust: TrustStore | None, at: datetime | None = None, deadline: float | None = None
) -> tuple[SignatureCheck, bytes | None]:
    """Verify opaque signed-data (RFC 8551 §3.5.2) and return the verdict and the eContent
    (None when there is none to read, or it is not MIME: the verdict then says malformed)."""
    return _verify(data, None, "opaque", layer, trust, at, deadline)


def _verify(  # noqa: PLR0917 - internal, two call sites
    data: bytes,
    external: bytes | memoryview | None,
    kind: Literal["detached", "opaque"],
    layer: str,
    trust: TrustStore | None,
    at: datetime | None,
    deadline: float | None,
) -> tuple[SignatureCheck, bytes | None]:
    # Milliseconds: the record's timestamp-millis field, so the verdict survives a round trip.
    moment = at or _now()
    moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)

    def failed(reason: str, detail: str, signers: tuple[SignerFacts, ...] = ()) -> SignatureCheck:
        return SignatureCheck(layer, kind, "invalid", reason, detail, signers, moment)

    signed, econtent_type, econtent, problem = _signed_data(data)
    if signed is None:
        return failed("malformed", problem), None
    if econtent_type != _ID_DATA:
        # RFC 8551 §3.5: S/MIME signs MIME entities (id-data). Anything else (a signed receipt,
        # another protocol's signed object) must not be parsed and shown as this mail's content.
        return failed("malformed", f"the signed content type is {econtent_type}, not id-data (MIME)"), None
    if external is None and econtent is None:
        return failed("malformed", "signed-data without encapsulated content"), None
    content: bytes | memoryview = external if external is not None else econtent  # type: ignore[assignment]
    try:
        embedded = (
            [c.chosen for c in signed["certificates"] if c.name == "certificate"] if signed["certificates"] else []
        )
        infos = list(signed["signer_infos"])
    except _PARSE_ERRORS:
        return failed("malformed", "the certificates or signer infos cannot be parsed"), econtent
    if not infos:
        return failed("malformed", "signed-data without a signer"), econtent
    # Bounds against hostile mail: each signer costs a signature check (and a path), and many
    # look-alike certificates make path building explode (every simple path is explored).
    if len(infos) > MAX_SIGNERS:
        return failed("malformed", f"{len(infos)} signers; at most {MAX_SIGNERS} are checked"), econtent
    if len(embedded) > MAX_CERTIFICATES:
        return failed("malformed", f"{len(embedded)} certificates; at most {MAX_CERTIFICATES} are read"), econtent
    digests: dict[str, bytes] = {}  # one pass over the content per digest algorithm
    checked: list[SignerFacts] = []
    for si in infos:
        if deadline is not None and time.monotonic() > deadline:
            raise MailTooLargeError(
                "signature verification took longer than the decode limit", reason="max_decode_seconds"
            )
        checked.append(_guarded_signer(si, content, econtent_type, embedded, trust, moment, digests))
    signers = tuple(checked)
    bad = next((s for s in signers if s.verdict == "invalid"), None)
    if bad is not None:
        return SignatureCheck(layer, kind, "invalid", bad.reason, bad.detail, signers, moment), econtent
    if trust is None:
        detail = "integrity holds; no trust store configured (smime.verify.trust_store), so no chain verdict"
        return SignatureCheck(layer, kind, "unchecked", "no_trust_store", detail, signers, moment), econtent
    return SignatureCheck(layer, kind, "valid", None, None, signers, moment), econtent


def _signed_data(data: bytes) -> tuple[Any, str, bytes | None, str]:
    """(SignedData, eContentType dotted OID, eContent octets or None, problem)."""
    try:
        info = cms.ContentInfo.load(bytes(data), strict=False)
        content_type = info["content_type"].native
        if content_type != "signed_data":
            return None, "", None, f"CMS content is {content_type}, not signed-data"
        signed = info["content"]
        encap = signed["encap_content_info"]
        econtent_type = encap["content_type"].dotted
        value = encap["content"]
        # .native joins the chunks of a BER constructed OCTET STRING (Outlook, openssl -stream).
        econtent = None if isinstance(value, core.Void) else value.native
        if econtent is not None and not isinstance(econtent, bytes):
            return None, "", None, "the encapsulated content cannot be read"
    except _PARSE_ERRORS:
        return None, "", None, "not a CMS signed-data structure (truncated or not DER/BER)"
    return signed, econtent_type, econtent, ""


def _find_signer(sid: Any, pools: Sequence[Iterable[asn1_x509.Certificate]]) -> asn1_x509.Certificate | None:
    if sid.name == "issuer_and_serial_number":
        issuer, serial = sid.chosen["issuer"], sid.chosen["serial_number"].native
        for pool in pools:
            for cert in pool:
                # Same bytes first: asn1crypto's RFC 5280 §7.1 name comparison is slow.
                if cert.serial_number == serial and (cert.issuer.dump() == issuer.dump() or cert.issuer == issuer):
                    return cert
        return None
    key_id = sid.chosen.native
    for pool in pools:
        for cert in pool:
            if cert.key_identifier == key_id or hashlib.sha1(cert.public_key["public_key"].contents).digest() == key_id:  # noqa: S324 - RFC 5280 §4.2.1.2 method 1
                return cert
    return None


def _digest(name: str, content: bytes | memoryview, cache: dict[str, bytes]) -> bytes:
    if name not in cache:
        h = hashlib.new(name)
        with memoryview(content) as view:  # released here: a spool mapping must close afterwards
            for a in range(0, len(view), _HASH_CHUNK):  # hashed in place, never copied
                h.update(view[a : a + _HASH_CHUNK])
        cache[name] = h.digest()
    return cache[name]


def _guarded_signer(  # noqa: PLR0917
    si: Any,
    content: bytes | memoryview,
    econtent_type: str,
    embedded: list[asn1_x509.Certificate],
    trust: TrustStore | None,
    moment: datetime,
    digests: dict[str, bytes],
) -> SignerFacts:
    """:func:`_check_signer`, where anything a hostile structure makes a library raise (lazy
    parsing in asn1crypto, a certificate cryptography refuses) is a ``malformed`` signer, never
    an error that would turn the whole mail into an unexpected failure."""
    try:
        return _check_signer(si, content, econtent_type, embedded, trust, moment, digests)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring; the type is all we report
        detail = f"the signer info cannot be processed ({type(exc).__name__})"
        return SignerFacts("", "", "", "", (), None, None, None, "", "", "invalid", "malformed", detail)


def _check_signer(  # noqa: PLR0917
    si: Any,
    content: bytes | memoryview,
    econtent_type: str,
    embedded: list[asn1_x509.Certificate],
    trust: TrustStore | None,
    moment: datetime,
    digests: dict[str, bytes],
) -> SignerFacts:
    try:
        digest_name = str(si["digest_algorithm"]["algorithm"].native)
        sig_alg = si["signature_algorithm"]
        sig_name = _mechanism(sig_alg)
        sid = si["sid"]
        _ = sid.chosen.native
    except _PARSE_ERRORS:
        return _facts(None, "", "", None, "invalid", "malformed", "the SignerInfo cannot be parsed")
    pools: list[Iterable[asn1_x509.Certificate]] = [embedded]
    if trust is not None:
        pools += [trust.intermediates, trust.roots]
    cert = _find_signer(sid, pools)
    signed_attrs = si["signed_attrs"]
    attributes = not isinstance(signed_attrs, core.Void) and len(signed_attrs) > 0
    # Recorded whatever the verdict: when a signature fails, the claimed time still helps.
    signing_time = _signing_time(signed_attrs) if attributes else None
    try:
        if cert is None:
            raise _Invalid(
                "signer_certificate_missing",
                "the signer's certificate is neither in the mail nor among the configured certificates",
            )
        hash_name = _allowed_digest(digest_name, trust)
        # A signature algorithm naming its own hash (md5WithRSAEncryption, sha1WithRSA...) is
        # held to the same policy: PKCS#1 binds that hash, whatever digestAlgorithm says.
        with contextlib.suppress(ValueError):
            _allowed_digest(str(sig_alg.hash_algo), trust)
        digest = _digest(hash_name, content, digests)
        if not attributes:
            candidates: Iterable[bytes] = [bytes(content)]
        else:
            _check_attributes(signed_attrs, digest, econtent_type)
            candidates = _attribute_encodings(signed_attrs)
        _check_signature(si, cert, sig_alg, digest_name, candidates)
        if trust is not None:
            _check_path(cert, embedded, trust, moment)
    except _Invalid as bad:
        if cert is None:
            return _missing(sid, digest_name, sig_name, signing_time, bad)
        return _facts(cert, digest_name, sig_name, signing_time, "invalid", bad.reason, bad.detail)
    except _PARSE_ERRORS:
        return _facts(
            cert, digest_name, sig_name, signing_time, "invalid", "malformed", "the signer info cannot be parsed"
        )
    if trust is None:
        return _facts(cert, digest_name, sig_name, signing_time, "unchecked", "no_trust_store", None)
    return _facts(cert, digest_name, sig_name, signing_time, "valid", None, None)


def _allowed_digest(name: str, trust: TrustStore | None) -> str:
    """The hashlib name of an allowed digest algorithm, else unsupported_algorithm."""
    hash_name = _DIGESTS.get(name)
    if hash_name is None or (hash_name == "sha1" and not (trust is not None and trust.allow_sha1)):
        why = "not allowed: set smime.verify.allow_sha1 for legacy senders" if hash_name == "sha1" else "not supported"
        raise _Invalid("unsupported_algorithm", f"digest algorithm {name} {why}")
    return hash_name


def _mechanism(sig_alg: Any) -> str:
    """The signature mechanism without its hash (rsassa_pkcs1v15, rsassa_pss, ecdsa, dsa,
    ed25519...): the hash is the digest algorithm, reported beside it."""
    if sig_alg["algorithm"].dotted == _EC_PUBLIC_KEY:
        return "ecdsa"
    try:
        return str(sig_alg.signature_algo)
    except ValueError:
        return str(sig_alg["algorithm"].native)


def _signing_time(attrs: Any) -> datetime | None:
    """The signingTime attribute (RFC 5652 §11.3), when there is exactly one value."""
    try:
        for attr in attrs:
            if attr["type"].dotted == "1.2.840.113549.1.9.5" and len(attr["values"]) == 1:
                value = attr["values"][0].native
                return value if isinstance(value, datetime) else None
    except _PARSE_ERRORS:
        return None
    return None


def _missing(sid: Any, digest_name: str, sig_name: str, signing_time: datetime | None, bad: _Invalid) -> SignerFacts:
    """Facts of a signer whose certificate is missing: what the SignerInfo's sid names."""
    issuer = serial = ""
    try:
        if sid.name == "issuer_and_serial_number":
            issuer = clean_str(sid.chosen["issuer"].human_friendly)
            serial = str(sid.chosen["serial_number"].native)
    except _PARSE_ERRORS:
        pass
    return SignerFacts(
        "", issuer, serial, "", (), None, None, signing_time, digest_name, sig_name, "invalid", bad.reason, bad.detail
    )


def _check_attributes(attrs: Any, digest: bytes, econtent_type: str) -> None:
    """RFC 5652 §5.3: messageDigest and contentType are required when signed attributes are
    present, each exactly once with one value (§11.1, §11.2)."""
    found: dict[str, list[Any]] = {}
    for attr in attrs:
        name = attr["type"].dotted
        found.setdefault(name, []).append(attr["values"])
    md = found.get("1.2.840.113549.1.9.4", [])
    ct = found.get("1.2.840.113549.1.9.3", [])
    if len(md) != 1 or len(md[0]) != 1:
        raise _Invalid("malformed", "signed attributes without exactly one messageDigest")
    if len(ct) != 1 or len(ct[0]) != 1:
        raise _Invalid("malformed", "signed attributes without exactly one contentType")
    if md[0][0].native != digest:
        raise _Invalid("tampered", "the content does not match the signed message digest")
    if ct[0][0].dotted != econtent_type:
        raise _Invalid("tampered", "the signed contentType differs from the encapsulated content type")


def _attribute_encodings(attrs: Any) -> Iterator[bytes]:
    """What the signer signed: the attributes as a SET OF (tag 0x31), RFC 5652 §5.4.

    First the encoding as received with the [0] tag replaced (what the signer most likely
    hashed), then the DER re-encoding (sorted, definite lengths), which is what OpenSSL
    verifies against, for agents that sent BER or an unsorted set.
    """
    received = attrs.dump()
    as_set = b"\x31" + received[1:]
    yield as_set
    # Only reached when the first did not verify: re-encoding costs more than the signature check.
    der = cms.CMSAttributes(list(attrs)).dump(force=True)
    if der != as_set:
        yield der


def _check_signature(
    si: Any, cert: asn1_x509.Certificate, sig_alg: Any, digest_name: str, candidates: Iterable[bytes]
) -> None:
    algorithm = sig_alg
    if sig_alg["algorithm"].dotted == _EC_PUBLIC_KEY:
        algorithm = algos.SignedDigestAlgorithm({"algorithm": "ecdsa"})
    try:
        _ = algorithm.signature_algo
    except ValueError:
        raise _Invalid(
            "unsupported_algorithm", f"signature algorithm {sig_alg['algorithm'].native} not supported"
        ) from None
    key_algorithm = cert.public_key["algorithm"]
    if key_algorithm["algorithm"].native == "dsa" and key_algorithm["parameters"].native is None:
        # RFC 3279 §2.3.2: DSA parameters inherited from the issuer's key. OpenSSL and
        # cryptography refuse them too; saying "tampered" would blame the sender wrongly.
        raise _Invalid("unsupported_algorithm", "DSA key whose parameters are inherited from the issuer")
    minimum = _MIN_KEY_BITS.get(key_algorithm["algorithm"].native)
    # (bit_size only for the key types with a floor: asn1crypto cannot size EdDSA keys)
    bits = cert.public_key.bit_size if minimum is not None else 0
    if minimum is not None and bits < minimum:
        # The same floor the chain validation applies to CA keys (pyhanko-certvalidator's
        # default policy), so a signer cannot be weaker than its issuer is allowed to be.
        raise _Invalid(
            "unsupported_algorithm",
            f"{key_algorithm['algorithm'].native.upper()} key of {bits} bits; at least {minimum} required",
        )
    signature = si["signature"].native
    context = SignatureValidationContext(contextual_md_algorithm=digest_name)
    last: str | None = None
    for data in candidates:
        # certvalidator's own errors subclass InvalidSignature: they are caught first.
        try:
            _SIG_VALIDATOR.validate_signature(signature, data, cert.public_key, algorithm, context)
        except (cv_errors.AlgorithmNotSupported, cv_errors.DSAParametersUnavailable, UnsupportedAlgorithm) as exc:
            name = algorithm.signature_algo
            raise _Invalid("unsupported_algorithm", f"{name}: {type(exc).__name__}") from None
        except (cv_errors.PSSParameterMismatch, ValueError, TypeError, AssertionError) as exc:
            raise _Invalid("malformed", f"the signature cannot be checked: {type(exc).__name__}") from None
        except InvalidSignature:
            last = "tampered"
            continue
        return
    raise _Invalid(last or "tampered", "the signature does not verify with the signer's public key")


def _check_path(
    cert: asn1_x509.Certificate, embedded: list[asn1_x509.Certificate], trust: TrustStore, moment: datetime
) -> None:
    weak = {"md2", "md5"} if trust.allow_sha1 else {"md2", "md5", "sha1"}
    context = ValidationContext(
        trust_roots=list(trust.roots),
        moment=moment,
        allow_fetching=False,
        # No revocation data is fetched or given: soft-fail means "not checked", not "revoked".
        revocation_mode="soft-fail",
        algorithm_usage_policy=DisallowWeakAlgorithmsPolicy(  # type: ignore[no-untyped-call]
            frozenset(weak), rsa_key_size_threshold=_MIN_KEY_BITS["rsa"], dsa_key_size_threshold=_MIN_KEY_BITS["dsa"]
        ),
        certificate_registry=_BudgetRegistry.build([*embedded, *trust.intermediates]),
    )
    validator = CertificateValidator(cert, validation_context=context)
    problem: tuple[str, str] | None = None
    try:
        asyncio.run(validator.async_validate_path())
    except _PathBudgetExceeded:
        problem = ("invalid_chain", f"no path found within {MAX_PATH_STEPS} path-building steps")
    except cv_errors.PathBuildingError:
        problem = ("unknown_ca", "no chain from the signer's certificate to a trusted root")
    except cv_errors.ExpiredError as exc:
        problem = ("expired", _message(exc))
    except cv_errors.NotYetValidError as exc:
        problem = ("not_yet_valid", _message(exc))
    except cv_errors.DisallowedAlgorithmError as exc:
        problem = ("unsupported_algorithm", _message(exc))
    except (cv_errors.PathValidationError, cv_errors.InvalidCertificateError) as exc:
        problem = ("invalid_chain", _message(exc))
    except _PARSE_ERRORS as exc:
        problem = ("invalid_chain", f"a certificate of the path cannot be processed: {type(exc).__name__}")
    if problem is not None:
        raise _Invalid(*problem)
    _check_usage(cert)


class _PathBudgetExceeded(Exception):  # noqa: N818 - an outcome
    """Path building took more steps than MAX_PATH_STEPS."""


class _BudgetRegistry(CertificateRegistry):
    """certvalidator's registry with a step budget: its path walker explores every simple path,
    which grows factorially with certificates sharing a subject name (hostile mail can carry
    dozens). Real chains need a few steps."""

    def __init__(self, *, cert_fetcher: Any = None) -> None:
        super().__init__(cert_fetcher=cert_fetcher)
        self.steps = 0

    def find_potential_issuers(self, cert: asn1_x509.Certificate, trust_manager: Any) -> Iterator[Any]:
        self.steps += 1
        if self.steps > MAX_PATH_STEPS:
            raise _PathBudgetExceeded
        return super().find_potential_issuers(cert, trust_manager)


def _message(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def _check_usage(cert: asn1_x509.Certificate) -> None:
    """RFC 8550 §4.4.2 (keyUsage) and §4.4.4 (extendedKeyUsage) for a mail signer."""
    ku = cert.key_usage_value
    if ku is not None and not ({"digital_signature", "non_repudiation"} & set(ku.native)):
        raise _Invalid("key_usage", "the signer's keyUsage has neither digitalSignature nor nonRepudiation")
    eku = cert.extended_key_usage_value
    if eku is not None and not ({"email_protection", "any_extended_key_usage"} & set(eku.native)):
        raise _Invalid("key_usage", "the signer's extendedKeyUsage does not include emailProtection")


# ---------------------------------------------------------------- signer facts


def _facts(  # noqa: PLR0917
    cert: asn1_x509.Certificate | None,
    digest_name: str,
    sig_name: str,
    signing_time: datetime | None,
    verdict: Verdict,
    reason: str | None,
    detail: str | None,
) -> SignerFacts:
    if cert is None:
        return SignerFacts("", "", "", "", (), None, None, signing_time, digest_name, sig_name, verdict, reason, detail)
    der = cert.dump()
    subject, issuer, emails = _names(der)
    try:
        validity = cert["tbs_certificate"]["validity"]
        not_before, not_after = validity["not_before"].native, validity["not_after"].native
    except _PARSE_ERRORS:
        not_before = not_after = None
    return SignerFacts(
        subject=subject,
        issuer=issuer,
        serial=str(cert.serial_number),
        sha256=hashlib.sha256(der).hexdigest(),
        emails=emails,
        not_before=not_before,
        not_after=not_after,
        signing_time=signing_time,
        digest_algorithm=digest_name,
        signature_algorithm=sig_name,
        verdict=verdict,
        reason=reason,
        detail=detail,
    )


@functools.lru_cache(maxsize=256)  # the same few signers write most mail of a mailbox
def _names(der: bytes) -> tuple[str, str, tuple[str, ...]]:
    """RFC 4514 subject and issuer, and the signer's mail addresses (SAN rfc822Name, RFC 5280
    §4.2.1.6, then the legacy emailAddress attribute of the subject, RFC 8550 §3)."""
    emails: list[str] = []
    cert = asn1_x509.Certificate.load(der)
    try:
        with warnings.catch_warnings():
            # a non-positive serial (PKITS has them) warns; the facts are still worth reading
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            parsed = x509.load_der_x509_certificate(der)
        # emailAddress by name, not as a dotted OID (RFC 4514 §3 allows either).
        names = {x509.NameOID.EMAIL_ADDRESS: "emailAddress"}
        subject, issuer = parsed.subject.rfc4514_string(names), parsed.issuer.rfc4514_string(names)
    except (ValueError, UnsupportedAlgorithm):
        # cryptography refuses some certificates asn1crypto reads (negative serials...).
        try:
            subject, issuer = cert.subject.human_friendly, cert.issuer.human_friendly
        except (*_PARSE_ERRORS, UnicodeError):
            subject, issuer = "(unreadable name)", "(unreadable name)"
    try:
        san = cert.subject_alt_name_value
        if san is not None:
            emails += [str(n.native) for n in san if n.name == "rfc822_name"]
        for rdn in cert.subject.chosen:
            emails += [str(a["value"].native) for a in rdn if a["type"].native == "email_address"]
    except _PARSE_ERRORS:
        pass
    # Certificate strings reach an Avro record: no lone surrogates (a malformed BMPString).
    return clean_str(subject), clean_str(issuer), tuple(dict.fromkeys(clean_str(e) for e in emails))
