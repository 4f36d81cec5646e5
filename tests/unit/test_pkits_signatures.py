"""The 224 signed mails of NIST PKITS (cryptography_vectors x509/PKITS_data/smime/), as POP3
delivers them (CRLF), verified by decode_mail with the PKITS trust anchor as the only root, and
compared with `openssl cms -verify` on the same bytes at the same moment.

The oracle's flags match what the verifier does (docs/decisions/0006, section 1):

* ``-policy_check -policy 2.5.29.32.0``: RFC 5280 §6.1 policy processing with the default
  user-initial-policy-set {anyPolicy} (§6.1.1 (c)), which pyhanko-certvalidator always does.
  ``-policy_check`` alone starts OpenSSL 3.0 from an empty set and fails 23 mails PKITS expects
  to be valid with "no explicit policy";
* no ``-crl_check``: revocation is off on both sides (no CRL is given or fetched), so the mails
  invalid only by a CRL verify on both;
* ``-purpose smimesign`` (openssl's default for cms) and ``-attime`` = VERIFY_AT, inside the
  PKITS validity (2010-01-01 .. 2030-12-31).

openssl's verdicts are computed here, once per session, never stored. Every disagreement must be
listed in tests/fixtures/pkits_differences.txt with the reason; an unlisted disagreement fails,
and so does a listed one that no longer disagrees.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.smime import openssl
from support.smimesign import (
    PKITS,
    PKITS_ANCHOR,
    PKITS_DIFFERENCES,
    PKITS_ORACLE_FLAGS,
    VERIFY_AT,
    Listed,
    openssl_verdict,
    pkits_differences,
    pkits_mails,
)

from connector.decoding import decode_mail
from connector.decoding.options import DecodeOptions
from connector.decoding.signature import SignatureCheck, TrustStore, load_trust_store

MAILS = sorted(p.name for p in (PKITS / "smime").glob("*.eml"))
DIFFERENCES = PKITS_DIFFERENCES
ANCHOR = PKITS_ANCHOR
ORACLE_FLAGS = PKITS_ORACLE_FLAGS


def test_the_corpus_is_all_there() -> None:
    assert len(MAILS) == 224
    assert VERIFY_AT.year in range(2011, 2030)  # inside the validity of the PKITS certificates


def summary(check: SignatureCheck) -> str:
    return check.verdict if check.reason is None else f"{check.verdict}/{check.reason}"


@pytest.fixture(scope="session")
def pkits_raw() -> dict[str, bytes]:
    return pkits_mails()


@pytest.fixture(scope="session")
def anchor_pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkits") / "anchor.pem"
    openssl("x509", "-inform", "DER", "-in", ANCHOR, "-out", out)
    return out


@pytest.fixture(scope="session")
def trust() -> TrustStore:
    return load_trust_store([ANCHOR])  # the DER file as shipped


@pytest.fixture(scope="session")
def openssl_says(pkits_raw: dict[str, bytes], anchor_pem: Path) -> dict[str, bool]:
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        results = pool.map(lambda raw: openssl_verdict(raw, anchor_pem, *ORACLE_FLAGS), pkits_raw.values())
        return dict(zip(pkits_raw, results, strict=True))


@pytest.fixture(scope="session")
def we_say(pkits_raw: dict[str, bytes], trust: TrustStore) -> dict[str, SignatureCheck]:
    opts = DecodeOptions(trust=trust, verify_at=VERIFY_AT)

    def one(raw: bytes) -> SignatureCheck:
        m = decode_mail(raw, options=opts)
        assert m.smime is not None and len(m.smime.signatures) == 1
        return m.smime.signatures[0]

    return {name: one(raw) for name, raw in pkits_raw.items()}


def test_the_oracle_counts(openssl_says: dict[str, bool]) -> None:
    """What openssl says with these flags (docs/decisions/0006: 125/99 with -policy_check
    alone; the initial policy set {anyPolicy} turns the 23 "no explicit policy" failures valid)."""
    assert sum(openssl_says.values()) == 148
    assert len(openssl_says) - sum(openssl_says.values()) == 76


@pytest.mark.parametrize("name", MAILS)
def test_pkits_mail_matches_openssl(
    name: str, we_say: dict[str, SignatureCheck], openssl_says: dict[str, bool], differences: dict[str, Listed]
) -> None:
    check = we_say[name]
    assert (check.layer, check.type) == ("", "detached")
    theirs = openssl_says[name]
    listed = differences.get(name)
    if listed is None:
        assert (check.verdict == "valid") == theirs, (
            f"{name}: ours {summary(check)} ({check.detail}), openssl {'valid' if theirs else 'invalid'}; "
            f"fix it or list it in {DIFFERENCES.name} with the reason"
        )
        return
    assert (check.verdict == "valid") != theirs, f"{name} is listed in {DIFFERENCES.name} but agrees now: remove it"
    assert (summary(check), "valid" if theirs else "invalid") == (listed.ours, listed.openssl), name


@pytest.fixture(scope="session")
def differences() -> dict[str, Listed]:
    return pkits_differences()


def test_every_listed_difference_is_a_pkits_mail(differences: dict[str, Listed]) -> None:
    assert set(differences) <= set(MAILS)
    assert all(len(d.why) > 20 for d in differences.values())


def test_every_verdict_has_a_reason_and_signer(we_say: dict[str, SignatureCheck]) -> None:
    for name, check in we_say.items():
        assert check.verdict in ("valid", "invalid"), name
        assert (check.reason is None) == (check.verdict == "valid"), name
        assert len(check.signers) == 1 and check.signers[0].sha256, name
        assert check.verified_at == VERIFY_AT


# ------------------------------------------------------------------ named cases


def ee_certificate(check: SignatureCheck) -> list[Path]:
    """The PKITS certificate files whose DER hashes to the signer's fingerprint."""
    want = check.signers[0].sha256
    return [p for p in (PKITS / "certs").glob("*.crt") if hashlib.sha256(p.read_bytes()).hexdigest() == want]


@pytest.mark.parametrize(
    ("name", "verdict", "reason"),
    [
        ("SignedValidSignaturesTest1.eml", "valid", None),
        ("SignedInvalidEEnotAfterDateTest6.eml", "invalid", "expired"),
        ("SignedInvalidCAnotAfterDateTest5.eml", "invalid", "expired"),
        ("SignedInvalidEEnotBeforeDateTest2.eml", "invalid", "not_yet_valid"),
        ("SignedInvalidCAnotBeforeDateTest1.eml", "invalid", "not_yet_valid"),
        ("SignedInvalidNameChainingEETest1.eml", "invalid", "unknown_ca"),
        ("SignedInvalidCASignatureTest2.eml", "invalid", "invalid_chain"),
        ("SignedInvalidEESignatureTest3.eml", "invalid", "invalid_chain"),
        ("SignedInvalidMissingbasicConstraintsTest1.eml", "invalid", "invalid_chain"),
        ("SignedInvalidpathLenConstraintTest6.eml", "invalid", "invalid_chain"),
        ("SignedInvalidDNnameConstraintsTest2.eml", "invalid", "invalid_chain"),
        ("SignedInvalidRequireExplicitPolicyTest3.eml", "invalid", "invalid_chain"),
        ("SignedInvalidinhibitAnyPolicyTest1.eml", "invalid", "invalid_chain"),
        ("SignedInvalidUnknownCriticalCertificateExtensionTest2.eml", "invalid", "invalid_chain"),
        # invalid only by a CRL: revocation is off (no CRL given), as for openssl without -crl_check
        ("SignedInvalidRevokedEETest3.eml", "valid", None),
        # SHA-1 SignerInfo digest (and dsa-with-SHA1 certificates): refused by default
        ("SignedValidDSAParameterInheritanceTest5.eml", "invalid", "unsupported_algorithm"),
        ("SignedValidDSASignaturesTest4.eml", "invalid", "unsupported_algorithm"),
    ],
)
def test_named_pkits_cases(name: str, verdict: str, reason: str | None, we_say: dict[str, SignatureCheck]) -> None:
    check = we_say[name]
    assert (check.verdict, check.reason) == (verdict, reason), check.detail
    if verdict == "valid":
        (cert,) = ee_certificate(check)  # the signer is one of the PKITS end-entity certificates
        assert cert.name.endswith("EE.crt")


def test_valid_signer_facts_are_the_certificate_files(we_say: dict[str, SignatureCheck]) -> None:
    """SignedValidSignaturesTest1 is signed by ValidCertificatePathTest1EE.crt (PKITS 4.1.1)."""
    facts = we_say["SignedValidSignaturesTest1.eml"].signers[0]
    der = (PKITS / "certs" / "ValidCertificatePathTest1EE.crt").read_bytes()
    assert facts.sha256 == hashlib.sha256(der).hexdigest()
    text = openssl("x509", "-inform", "DER", "-in", PKITS / "certs" / "ValidCertificatePathTest1EE.crt",
                   "-noout", "-nameopt", "RFC2253", "-subject", "-issuer", "-serial").decode()  # fmt: skip
    fields = dict(line.split("=", 1) for line in text.splitlines())
    assert (facts.subject, facts.issuer) == (fields["subject"], fields["issuer"])
    assert facts.serial == str(int(fields["serial"], 16))
    assert facts.not_before == dt.datetime(2010, 1, 1, 8, 30, tzinfo=dt.UTC)
    assert facts.digest_algorithm == "sha256" and facts.signature_algorithm == "rsassa_pkcs1v15"


def test_a_changed_byte_of_a_pkits_mail_is_tampered(
    pkits_raw: dict[str, bytes], trust: TrustStore, anchor_pem: Path
) -> None:
    raw = pkits_raw["SignedValidSignaturesTest1.eml"]
    start = raw.index(b"\r\n\r\n", raw.index(b"boundary=")) + 4  # inside the first part
    at = raw.index(b"\r\n\r\n", raw.index(b"Content-Type", start)) + 10  # a byte of its body
    changed = raw[:at] + bytes([raw[at] ^ 0x20]) + raw[at + 1 :]
    check = decode_mail(changed, options=DecodeOptions(trust=trust, verify_at=VERIFY_AT)).smime.signatures[0]  # type: ignore[union-attr]
    assert (check.verdict, check.reason) == ("invalid", "tampered")
    assert not openssl_verdict(changed, anchor_pem, *ORACLE_FLAGS)
    assert openssl_verdict(raw, anchor_pem, *ORACLE_FLAGS)


@pytest.mark.parametrize(
    ("name", "verdict", "reason", "theirs"),
    [
        ("SignedValidDSASignaturesTest4.eml", "invalid", "unsupported_algorithm", True),
        ("SignedInvalidDSASignatureTest6.eml", "invalid", "unsupported_algorithm", False),
        ("SignedValidDSAParameterInheritanceTest5.eml", "invalid", "unsupported_algorithm", False),
    ],
)
def test_dsa_mails_with_sha1_allowed(
    name: str, *, verdict: str, reason: str, theirs: bool, pkits_raw: dict[str, bytes], anchor_pem: Path
) -> None:
    """With SHA-1 allowed the DSA mails get past the digest: 1024-bit DSA certificates are
    below pyhanko-certvalidator's key-size policy (openssl accepts Test4), and a DSA key that
    inherits its parameters from the issuer cannot be used (OpenSSL and cryptography refuse it
    too) - unsupported_algorithm, never "tampered"."""
    trust = load_trust_store([ANCHOR], allow_sha1=True)
    m = decode_mail(pkits_raw[name], options=DecodeOptions(trust=trust, verify_at=VERIFY_AT))
    assert m.smime is not None
    check = m.smime.signatures[0]
    assert (check.verdict, check.reason) == (verdict, reason), check.detail
    assert check.signers[0].signature_algorithm == "dsa"
    assert openssl_verdict(pkits_raw[name], anchor_pem, *ORACLE_FLAGS) is theirs


def test_verification_moment_is_used_for_pkits(
    pkits_raw: dict[str, bytes], trust: TrustStore, anchor_pem: Path
) -> None:
    """Before the EE of SignedInvalidEEnotAfterDateTest6 expired (2010-06-01) it is valid, for
    both."""
    raw = pkits_raw["SignedInvalidEEnotAfterDateTest6.eml"]
    then = dt.datetime(2010, 6, 1, tzinfo=dt.UTC)
    m = decode_mail(raw, options=DecodeOptions(trust=trust, verify_at=then))
    assert m.smime is not None and m.smime.signatures[0].verdict == "valid"
    assert openssl_verdict(raw, anchor_pem, *ORACLE_FLAGS, at=then)
