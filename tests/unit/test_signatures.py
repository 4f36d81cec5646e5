"""S/MIME signature verification through decode_mail, on mail signed by `openssl cms -sign`
(tests/support/smimesign.py): for every fixture the verdict and reason of each signature layer,
the signer facts against what `openssl x509` says about the certificate, and agreement with
`openssl cms -verify` on the same bytes at the same moment (three deliberate differences, which
openssl accepts: MD5 and SHA-1 digests, an RSA 1024 signer). Ed25519 has no oracle: OpenSSL 3.0
cannot verify it. Then: no trust store (integrity only),
intermediates from the configuration, the validation moment, require_valid_signature and its
dead letters, which never show decrypted content."""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import logging
import mmap
import traceback
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from support.leaks import assert_no_leak
from support.smimesign import (
    VERIFY_AT,
    Case,
    SignPki,
    build_cases,
    crlf,
    head,
    make_sign_pki,
    openssl_verdict,
    plain_mail,
    text_entity,
)

from connector.config import parse_config
from connector.decoding import decode_mail
from connector.decoding.fastmime import SpoolMap
from connector.decoding.model import DecodedMail
from connector.decoding.options import DecodeOptions
from connector.decoding.signature import TrustStore, load_trust_store
from connector.decoding.smime import load_keys
from connector.errors import ConfigError, DecodeError, SmimeError
from connector.records import Provenance
from connector.records.dead_letter import DeadLetter

CASES = (
    "rsa_detached", "rsa_opaque", "rsa_detached_stream", "rsa_opaque_stream", "pss_detached", "ecdsa_detached",
    "ecdsa_opaque", "sha384_detached", "noattr_detached", "noattr_opaque", "two_signers", "ed25519_detached",
    "expired_signer", "not_yet_valid_signer", "unknown_ca", "server_auth_only", "key_encipherment_only",
    "no_certificates", "one_of_two_expired", "md5_digest", "sha1_digest", "rsa1024_signer", "tampered_body",
    "refolded_header", "signature_value_changed", "signature_of_other_mail", "signature_truncated", "tampered_opaque",
    "signed_then_encrypted", "opaque_signed_then_encrypted", "tampered_then_encrypted", "encrypted_then_signed",
    "triple_wrapped", "triple_wrapped_inner_expired",
)  # fmt: skip

# The signature algorithm each signer's SignerInfo uses, by the names of the record.
SIG_ALGORITHM = {"pss": "rsassa_pss", "ecdsa": "ecdsa", "ed25519": "ed25519"}
BROKEN_PEM = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
# Reasons that need no trust store: the signature itself cannot be checked.
INTEGRITY_REASONS = {"tampered", "malformed", "unsupported_algorithm", "signer_certificate_missing"}


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SignPki:
    return make_sign_pki(tmp_path_factory.mktemp("sigpki"))


@pytest.fixture(scope="session")
def cases(pki: SignPki) -> dict[str, Case]:
    return build_cases(pki)


@pytest.fixture(scope="session")
def keys(pki: SignPki) -> Any:
    return load_keys([(pki.key_file("alice"), None, "alice")])


def options(pki: SignPki, keys: Any, *, trust: bool = True, **kw: Any) -> DecodeOptions:
    store = load_trust_store([pki.root]) if trust else None
    return DecodeOptions(keys=keys, trust=store, verify_at=kw.pop("verify_at", VERIFY_AT), **kw)


def verdicts(m: DecodedMail) -> list[tuple[str, str, str, str | None]]:
    assert m.smime is not None
    return [(c.layer, c.type, c.verdict, c.reason) for c in m.smime.signatures]


def test_the_catalogue_is_what_the_tests_name(cases: dict[str, Case]) -> None:
    assert sorted(cases) == sorted(CASES)
    for case in cases.values():
        assert b"\n" not in case.raw.replace(b"\r\n", b""), f"{case.name}: a bare LF; POP3 delivers CRLF"


# ------------------------------------------------------------------ every fixture


@pytest.mark.parametrize("name", CASES)
def test_verdict_reason_and_signer_facts(pki: SignPki, keys: Any, cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    m = decode_mail(case.raw, options=options(pki, keys))
    assert m.smime is not None and m.smime.signed
    assert m.smime.signature_type == case.layers[0].type
    assert m.smime.decrypted == case.encrypted
    assert verdicts(m) == [(x.path, x.type, x.verdict, x.reason) for x in case.layers]
    # The content is decoded whatever the verdict: a bad signature is a fact of the record.
    assert m.text_body is not None and case.marker in m.text_body
    for check, layer in zip(m.smime.signatures, case.layers, strict=True):
        assert check.verified_at == VERIFY_AT
        assert (check.detail is None) == (check.verdict == "valid"), check.detail
        assert len(check.signers) == len(layer.signers)
        # SignerInfos are a SET OF, sorted by their DER encoding: match them by certificate.
        by_cert = {pki[signer].cert.fingerprint(hashes.SHA256()).hex(): (signer, r) for signer, r in layer.signers}
        for facts in check.signers:
            signer, reason = by_cert.get(facts.sha256) or layer.signers[0]
            assert (facts.verdict, facts.reason) == ("valid" if reason is None else "invalid", reason)
            assert_signer_facts(pki, name, facts, signer, integrity_failed=check.reason in INTEGRITY_REASONS)


def assert_signer_facts(pki: SignPki, case: str, facts: Any, signer: str, *, integrity_failed: bool) -> None:
    if case == "no_certificates":  # nothing to describe: the mail does not carry the certificate
        assert (facts.subject, facts.sha256, facts.emails) == ("", "", ())
        return
    want = pki.facts(signer)
    assert (facts.subject, facts.issuer, facts.serial) == (want.subject, want.issuer, want.serial)
    assert facts.sha256 == want.sha256 == hashlib.sha256(pki[signer].cert.public_bytes(Encoding.DER)).hexdigest()
    assert set(facts.emails) == want.emails and len(facts.emails) == len(want.emails)
    assert (facts.not_before, facts.not_after) == (want.not_before, want.not_after)
    assert facts.not_before.tzinfo is not None
    digest = {"sha384_detached": "sha384", "md5_digest": "md5", "sha1_digest": "sha1"}.get(case, "sha256")
    assert facts.digest_algorithm == ("sha512" if signer == "ed25519" else digest)
    assert facts.signature_algorithm == SIG_ALGORITHM.get(signer, "rsassa_pkcs1v15")
    if case.startswith("noattr"):
        assert facts.signing_time is None
    elif integrity_failed:  # the attributes were not trusted: signingTime is not required then
        assert facts.signing_time is None or facts.signing_time.tzinfo is not None
    elif signer == "ed25519":
        assert facts.signing_time == VERIFY_AT - dt.timedelta(hours=1)
    else:  # openssl wrote the moment it signed (this test session)
        assert facts.signing_time is not None
        assert abs(facts.signing_time - dt.datetime.now(dt.UTC)) < dt.timedelta(hours=2)


@pytest.mark.parametrize("name", CASES)
def test_openssl_agrees(pki: SignPki, keys: Any, cases: dict[str, Case], name: str) -> None:
    """Our verdict against `openssl cms -verify -CAfile root -purpose smimesign -attime
    VERIFY_AT` on the bytes of each layer (the decrypted entity for an inner one)."""
    case = cases[name]
    m = decode_mail(case.raw, options=options(pki, keys))
    assert m.smime is not None
    judged = 0
    for check, layer in zip(m.smime.signatures, case.layers, strict=True):
        if layer.oracle is None:  # Ed25519: OpenSSL 3.0 cannot verify it ("invalid digest")
            assert not openssl_verdict(case.raw, pki.root), "openssl judges Ed25519 now: give the case an oracle"
            continue
        judged += 1
        ours = check.verdict == "valid"
        theirs = openssl_verdict(layer.oracle, pki.root)
        if layer.differs:
            assert (ours, theirs) == (False, True), f"{name} {layer.path!r}: deliberate difference gone ({layer.why})"
        else:
            assert ours == theirs, f"{name} layer {layer.path!r}: ours {check.verdict}/{check.reason}, openssl {theirs}"
    assert judged or name == "ed25519_detached"


# ------------------------------------------------------------------ without a trust store


@pytest.mark.parametrize("name", CASES)
def test_without_trust_store_integrity_is_still_checked(
    pki: SignPki, keys: Any, cases: dict[str, Case], name: str
) -> None:
    case = cases[name]
    m = decode_mail(case.raw, options=options(pki, keys, trust=False))
    want = []
    for x in case.layers:
        if x.reason in INTEGRITY_REASONS:
            want.append((x.path, x.type, "invalid", x.reason))
        else:  # valid, or invalid only by its certificate: nothing to judge that by
            want.append((x.path, x.type, "unchecked", "no_trust_store"))
    assert verdicts(m) == want
    assert m.smime is not None
    for check in m.smime.signatures:
        if check.verdict == "unchecked":
            assert {s.verdict for s in check.signers} == {"unchecked"}


def test_default_options_check_integrity_too(cases: dict[str, Case]) -> None:
    """No options at all (no trust store, no keys): the signed mail is still checked."""
    good = decode_mail(cases["rsa_detached"].raw)
    bad = decode_mail(cases["tampered_body"].raw)
    assert verdicts(good) == [("", "detached", "unchecked", "no_trust_store")]
    assert verdicts(bad) == [("", "detached", "invalid", "tampered")]


# ------------------------------------------------------------------ trust store, intermediates, time


def test_intermediates_from_the_configuration(pki: SignPki, keys: Any, tmp_path: Path) -> None:
    """The mail carries the signer's certificate only: the intermediate must come from the
    configuration (openssl: -untrusted)."""
    raw = head("ee only", "ee-only") + crlf(pki.sign(text_entity("ee only"), "rsa", chain=False))
    alone = decode_mail(raw, options=options(pki, keys))
    assert verdicts(alone) == [("", "detached", "invalid", "unknown_ca")]
    assert not openssl_verdict(raw, pki.root)
    store = load_trust_store([pki.root], [pki.intermediate])
    helped = decode_mail(raw, options=DecodeOptions(trust=store, verify_at=VERIFY_AT))
    assert verdicts(helped) == [("", "detached", "valid", None)]
    bundle = tmp_path / "root-and-intermediate.pem"
    bundle.write_bytes(pki.root.read_bytes() + pki.intermediate.read_bytes())
    assert openssl_verdict(raw, bundle)


def test_trust_store_files_pem_bundle_and_der(pki: SignPki, cases: dict[str, Case], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"  # several certificates in one PEM file, the root among them
    bundle.write_bytes(pki.stranger_root.read_bytes() + b"\n" + pki.root.read_bytes())
    der = tmp_path / "root.der"
    der.write_bytes(x509.load_pem_x509_certificate(pki.root.read_bytes()).public_bytes(Encoding.DER))
    raw = cases["rsa_detached"].raw
    for store in (load_trust_store([bundle]), load_trust_store([der])):
        assert verdicts(decode_mail(raw, options=DecodeOptions(trust=store, verify_at=VERIFY_AT)))[0][2] == "valid"
    stranger = decode_mail(cases["unknown_ca"].raw, options=DecodeOptions(trust=load_trust_store([bundle])))
    assert verdicts(stranger)[0][2:] == ("valid", None)  # its root is in the bundle now
    only_stranger = load_trust_store([pki.stranger_root])
    assert verdicts(decode_mail(raw, options=DecodeOptions(trust=only_stranger)))[0][2:] == ("invalid", "unknown_ca")


@pytest.mark.parametrize("content", [None, b"not a certificate\n", BROKEN_PEM], ids=["missing", "garbage", "bad-pem"])
def test_unusable_trust_store_file_is_a_config_error_naming_it(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "roots-file.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"roots-file\.pem"):
        load_trust_store([path])


def test_validation_moment_decides_expiry(pki: SignPki, keys: Any, cases: dict[str, Case]) -> None:
    """verify_at, not the signingTime the signer wrote, is the moment of validation; openssl
    agrees at the same -attime."""
    raw = cases["expired_signer"].raw
    then = dt.datetime(2021, 6, 1, tzinfo=dt.UTC)  # inside the expired signer's validity
    assert verdicts(decode_mail(raw, options=options(pki, keys, verify_at=then))) == [("", "detached", "valid", None)]
    assert openssl_verdict(raw, pki.root, at=then)
    future = cases["not_yet_valid_signer"].raw
    later = dt.datetime(2041, 1, 1, tzinfo=dt.UTC)
    assert verdicts(decode_mail(future, options=options(pki, keys, verify_at=later)))[0][2] == "valid"
    assert openssl_verdict(future, pki.root, at=later)
    now = decode_mail(cases["rsa_detached"].raw, options=DecodeOptions(trust=load_trust_store([pki.root])))
    assert now.smime is not None
    assert abs(now.smime.signatures[0].verified_at - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)


def test_sha1_is_accepted_when_the_trust_store_allows_it(pki: SignPki, cases: dict[str, Case]) -> None:
    store = load_trust_store([pki.root], allow_sha1=True)
    m = decode_mail(cases["sha1_digest"].raw, options=DecodeOptions(trust=store, verify_at=VERIFY_AT))
    assert verdicts(m) == [("", "detached", "valid", None)]
    md5 = decode_mail(cases["md5_digest"].raw, options=DecodeOptions(trust=store, verify_at=VERIFY_AT))
    assert verdicts(md5) == [("", "detached", "invalid", "unsupported_algorithm")]  # never MD5


# ------------------------------------------------------------------ require_valid_signature


def layer_name(path: str) -> str:
    return f"part {path}" if path else "message"


@pytest.mark.parametrize("name", CASES)
def test_require_valid_signature(pki: SignPki, keys: Any, cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    opts = options(pki, keys, require_valid_signature=True)
    first_bad = next((x for x in case.layers if x.verdict != "valid"), None)
    if first_bad is None:
        m = decode_mail(case.raw, options=opts)
        assert m.text_body is not None and case.marker in m.text_body
        return
    with pytest.raises(SmimeError) as exc:
        decode_mail(case.raw, options=opts)
    err = exc.value
    assert isinstance(err, DecodeError) and (err.stage, err.reason) == ("verify", "signature_invalid")
    text = str(err)
    assert layer_name(first_bad.path) in text and str(first_bad.reason) in text, text
    assert_no_leak(case.marker, text, repr(err))


@pytest.mark.parametrize("encrypted", [False, True])
def test_require_valid_signature_refuses_unsigned_mail(pki: SignPki, keys: Any, encrypted: bool) -> None:
    marker = "unsigned-marker"
    raw = plain_mail("unsigned", "unsigned", marker)
    if encrypted:
        raw = head("unsigned", "unsigned-enc") + pki.encrypt(text_entity(marker))
    m = decode_mail(raw, options=options(pki, keys))
    assert m.text_body is not None and marker in m.text_body
    assert (m.smime is not None) == encrypted and (m.smime is None or m.smime.signatures == ())
    with pytest.raises(SmimeError) as exc:
        decode_mail(raw, options=options(pki, keys, require_valid_signature=True))
    assert exc.value.reason == "not_signed"
    assert_no_leak(marker, str(exc.value))


def test_require_valid_signature_without_trust_store_refuses_unchecked(
    pki: SignPki, keys: Any, cases: dict[str, Case]
) -> None:
    with pytest.raises(SmimeError) as exc:
        decode_mail(cases["rsa_detached"].raw, options=options(pki, keys, trust=False, require_valid_signature=True))
    assert exc.value.reason == "signature_invalid" and "no_trust_store" in str(exc.value)


@pytest.mark.parametrize("name", ["tampered_then_encrypted", "triple_wrapped_inner_expired"])
def test_bad_inner_signature_dead_letter_leaks_nothing(
    pki: SignPki, keys: Any, cases: dict[str, Case], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The inner signature is judged on decrypted bytes; the dead letter keeps the original,
    still encrypted mail, and neither it nor the error nor the log shows the decrypted text
    or who signed inside."""
    caplog.set_level(logging.DEBUG)
    case = cases[name]
    assert_no_leak(case.marker, case.raw)  # the test mail itself is encrypted
    with pytest.raises(SmimeError) as exc:
        decode_mail(case.raw, options=options(pki, keys, require_valid_signature=True))
    err = exc.value
    assert err.reason == "signature_invalid"
    raw = case.raw
    dead = DeadLetter.of(err, Provenance("a", "u", "s", 1, len(raw), hashlib.sha256(raw).hexdigest()), raw, 2)
    assert dead.raw == raw
    haystacks = [str(err), repr(err), "".join(traceback.format_exception(err)), dead.encode(),
                 b"".join(v for _, v in dead.headers()), caplog.text]  # fmt: skip
    signer = cases[name].layers[-1].signers[0][0]
    for secret in (case.marker, "Signed text", "Second line", pki[signer].email, pki.facts(signer).sha256):
        assert_no_leak(secret, *haystacks)


# ------------------------------------------------------------------ from a spool mapping


@pytest.mark.parametrize("name", CASES)
def test_decoding_from_a_spool_mapping_gives_the_same_verdicts_and_lets_go_of_it(
    pki: SignPki, keys: Any, cases: dict[str, Case], name: str, tmp_path: Path
) -> None:
    """Large mail is decoded from a read-only mapping of its spool file, which the cycle
    closes right after (connector/runtime/cycle.py ``mapped``): the verdicts are the same, and
    verification must not leave a view of the mapping behind. The cyclic garbage collector is
    held off, so a view kept alive only by a reference cycle (an exception's traceback, an
    event loop's task) fails here every time, as it would in the connector whenever no
    collection happens to run in between."""
    case = cases[name]
    spool = tmp_path / "mail.spool"
    spool.write_bytes(case.raw)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with spool.open("rb") as f:
            view = SpoolMap(f.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                m = decode_mail(view, options=options(pki, keys))
                assert verdicts(m) == [(x.path, x.type, x.verdict, x.reason) for x in case.layers]
                del m
            finally:
                view.close()  # BufferError when a memoryview of the mapping is still exported
    finally:
        if was_enabled:
            gc.enable()


# ------------------------------------------------------------------ the mailbox configuration


def mailbox_options(pki: SignPki, smime: dict[str, Any], **extra: Any) -> DecodeOptions:
    doc = {
        "kafka": {"bootstrap_servers": "k:9092"},
        "topics": {"mail": "m"},
        "mailboxes": [
            {"id": "a", "host": "pop.test", "username": "u", "password": {"env": "PW"}, "smime": smime, **extra}
        ],
    }
    return parse_config(doc, environ={"PW": "pw"}, base=pki.dir).mailboxes[0].decode


def test_config_verify_and_require_valid_signature(pki: SignPki, cases: dict[str, Case]) -> None:
    """Paths relative to the configuration file; the intermediate comes from the config; the
    connector validates at the fetch time (verify_at None), which the certificates cover."""
    opts = mailbox_options(
        pki,
        {
            "keys": [{"file": str(pki.key_file("alice")), "label": "alice"}],
            "verify": {
                "trust_store": [str(pki.root.relative_to(pki.dir))],
                "intermediates": [str(pki.intermediate.relative_to(pki.dir))],
            },
            "require_valid_signature": True,
        },
    )
    assert isinstance(opts.trust, TrustStore) and opts.require_valid_signature and opts.verify_at is None
    assert (len(opts.trust.roots), len(opts.trust.intermediates), opts.trust.allow_sha1) == (1, 1, False)
    raw = head("ee only", "ee-only-cfg") + crlf(pki.sign(text_entity("ee only"), "rsa", chain=False))
    assert verdicts(decode_mail(raw, options=opts)) == [("", "detached", "valid", None)]
    m = decode_mail(cases["triple_wrapped"].raw, options=opts)
    assert [v[2] for v in verdicts(m)] == ["valid", "valid"]
    with pytest.raises(SmimeError) as exc:
        decode_mail(cases["tampered_then_encrypted"].raw, options=opts)
    assert exc.value.reason == "signature_invalid"


def test_config_without_verify_checks_integrity_only(pki: SignPki, cases: dict[str, Case]) -> None:
    opts = mailbox_options(pki, {"keys": [{"file": str(pki.key_file("alice"))}]})
    assert opts.trust is None and not opts.require_valid_signature
    assert verdicts(decode_mail(cases["signed_then_encrypted"].raw, options=opts)) == [
        ("1", "detached", "unchecked", "no_trust_store")
    ]


def test_config_allow_sha1(pki: SignPki, cases: dict[str, Case]) -> None:
    opts = mailbox_options(pki, {"verify": {"trust_store": [str(pki.root)], "allow_sha1": True}})
    assert verdicts(decode_mail(cases["sha1_digest"].raw, options=opts)) == [("", "detached", "valid", None)]


@pytest.mark.parametrize(
    ("smime", "extra", "match"),
    [
        ({"verify": {"trust_store": ["missing-root.pem"]}}, {}, r"trust_store\[0\]"),
        ({"verify": {"trust_store": ["ROOT"], "intermediates": ["nope.pem"]}}, {}, r"intermediates\[0\]"),
        ({"verify": {"trust_store": []}}, {}, r"trust_store"),
        ({"mode": "passthrough", "verify": {"trust_store": ["ROOT"]}}, {}, r"passthrough"),
        ({"mode": "passthrough", "require_valid_signature": True}, {}, r"require_valid_signature"),
        ({"require_valid_signature": True}, {"mime_decoding": False}, r"require_valid_signature"),
    ],
    ids=["missing-root", "missing-intermediate", "empty-trust-store", "verify-passthrough", "require-passthrough",
         "require-undecoded"],
)  # fmt: skip
def test_config_errors(pki: SignPki, smime: dict[str, Any], extra: dict[str, Any], match: str) -> None:
    verify = smime.get("verify")
    if verify is not None:
        verify["trust_store"] = [str(pki.root) if f == "ROOT" else f for f in verify["trust_store"]]
    with pytest.raises(ConfigError, match=match):
        mailbox_options(pki, smime, **extra)
