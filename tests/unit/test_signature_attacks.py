"""Regression tests for the attacks a security review found against S/MIME signature checking
(connector/decoding/signature.py, and its wiring in connector/decoding/mime.py).

All mail is built here from the session PKI of tests/support/smimesign.py:

* differential forgeries of one genuine detached signature (A1-A7): the bytes verified must be
  the bytes the record shows, whatever the delimiters, line ends and boundary parameters say;
* a multipart/signed whose signature part is something else, or that has a third part;
* opaque signed-data whose eContentType is not id-data (a signed receipt);
* MD5 and SHA-1 named by the signature algorithm itself (md5WithRSA, sha1WithRSA);
* malformed pieces a library raises on lazily (certificates, signed attributes, a BMPString);
* bounds: signers, embedded certificates, path-building steps, the decode deadline between
  signers, and S/MIME layers (detached ones count);
* fastmime's part offsets (Node.span), on which a detached signature is checked.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from support.smimesign import (
    VERIFY_AT,
    SignPki,
    crlf,
    head,
    make_sign_pki,
    multipart_signed,
    signature_der,
    text_entity,
    with_signature,
)

from connector.decoding import decode_mail, signature
from connector.decoding.fastmime import PARSER, Node
from connector.decoding.model import DecodedMail
from connector.decoding.options import DecodeLimits, DecodeOptions
from connector.decoding.signature import MAX_CERTIFICATES, MAX_SIGNERS, load_trust_store
from connector.errors import DecodeError, MailTooLargeError, SignatureError, SmimeError

#: In every forged piece of mail; must never reach the record of a mail whose signature is valid.
EVIL = "EVIL-FORGED-7f3a9c"
#: id-smime-ct-receipt (RFC 2634 §2.7): signed, but not a MIME entity.
RECEIPT_OID = "1.2.840.113549.1.9.16.1.1"
SIGNATURE_TYPES = ("application/pkcs7-signature", "application/x-pkcs7-signature")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SignPki:
    return make_sign_pki(tmp_path_factory.mktemp("sigattack"))


def strict(pki: SignPki, **kw: Any) -> DecodeOptions:
    return DecodeOptions(trust=load_trust_store([pki.root]), verify_at=VERIFY_AT, require_valid_signature=True, **kw)


def lenient(pki: SignPki, **kw: Any) -> DecodeOptions:
    return DecodeOptions(trust=load_trust_store([pki.root]), verify_at=VERIFY_AT, **kw)


def verdicts(m: DecodedMail) -> list[tuple[str, str, str, str | None]]:
    return [] if m.smime is None else [(c.layer, c.type, c.verdict, c.reason) for c in m.smime.signatures]


def mail_of(entity: bytes, name: str = "attack") -> bytes:
    return head(name, f"{name}.{secrets.token_hex(4)}") + crlf(entity)


def assert_not_unexpected(err: DecodeError) -> None:
    """decode_mail turns a crash into DecodeError('unexpected ...', reason 'unknown')."""
    assert err.reason != "unknown" and not str(err).startswith("unexpected"), f"a crash, not a verdict: {err!r}"


# ------------------------------------------------------------------ a genuine signed mail, in pieces


@dataclass(frozen=True)
class Genuine:
    raw: bytes  # the whole mail, CRLF
    hdr: bytes  # the header section, without the line break of its last field and the empty line
    boundary: bytes
    signed: bytes  # the first part: exactly the bytes the signature covers
    sigpart: bytes  # the signature part (header and base64 body), without the delimiters' line breaks
    text: str  # text_body of the genuine mail

    @property
    def delim(self) -> bytes:
        return b"--" + self.boundary


@pytest.fixture(scope="module")
def genuine(pki: SignPki) -> Genuine:
    marker = f"GENUINE-{secrets.token_hex(6)}"
    raw = mail_of(pki.sign(text_entity(marker), "rsa"), "genuine")
    found = re.search(rb'boundary="([^"]+)"', raw)
    assert found is not None
    boundary = found.group(1)
    hdr, body = raw.split(b"\r\n\r\n", 1)
    pieces = body.split(b"--" + boundary)
    assert len(pieces) == 4 and pieces[3].startswith(b"--\r\n"), "unexpected openssl output"
    assert pieces[1].startswith(b"\r\n") and pieces[1].endswith(b"\r\n")
    assert pieces[2].startswith(b"\r\n") and pieces[2].endswith(b"\r\n")
    signed, sigpart = pieces[1][2:-2], pieces[2][2:-2]
    assert signed == text_entity(marker)
    m = decode_mail(raw, options=strict(pki))
    assert verdicts(m) == [("", "detached", "valid", None)]
    assert m.text_body is not None and marker in m.text_body
    return Genuine(raw, hdr, boundary, signed, sigpart, m.text_body)


def _sig_split(g: Genuine) -> tuple[bytes, bytes]:
    sp_h, sp_b = g.sigpart.split(b"\r\n\r\n", 1)
    return sp_h, sp_b.rstrip(b"\r\n")


def _forged_entity() -> bytes:
    return f"Content-Type: text/plain\n\r\nEntirely forged text {EVIL}. Pay Mallory.".encode()


def a1_append_after_close_lookalike(g: Genuine) -> bytes:
    """'--B--x' is no close delimiter: text after it, then a second signature part."""
    d = g.delim
    return (
        g.hdr + b"\r\n\r\n" + d + b"\r\n" + g.signed + b"\r\n" + d
        + f"--x\r\nPS: please wire 10000 EUR to IBAN XX00 {EVIL}.\r\n".encode()
        + d + b"\r\n" + g.sigpart + b"\r\n" + d + b"--\r\n"
    )  # fmt: skip


def a2_header_end_lf_cr_lf(g: Genuine) -> bytes:
    """The header section ends with LF CR LF; the genuinely signed part sits in the epilogue."""
    d = g.delim
    sp_h, sp_b = _sig_split(g)
    return (
        g.hdr + b"\n\r\n" + d + b"\r\n" + _forged_entity() + b"\r\n" + d + b"\r\n"
        + sp_h.replace(b"\r\n", b"\n") + b"\n\r\n" + sp_b + b"\r\n" + d + b"--\r\n\r\n"
        + d + b"\r\n" + g.signed + b"\r\n" + d + b"--\r\n"
    )  # fmt: skip


def a3_no_header_separator(g: Genuine) -> bytes:
    """No empty line after the top header section at all."""
    d = g.delim
    sp_h, sp_b = _sig_split(g)
    return (
        g.hdr + b"\r\n" + d + b"\r\n" + _forged_entity() + b"\r\n" + d + b"\r\n"
        + sp_h.replace(b"\r\n", b"\n") + b"\n\r\n" + sp_b + b"\r\n" + d + b"--\r\n\r\n"
        + d + b"\r\n" + g.signed + b"\r\n" + d + b"--\r\n"
    )  # fmt: skip


def a4_bare_cr_delimiters(g: Genuine) -> bytes:
    """Delimiters behind bare CRs (lines for the parser); CRLF ones in the epilogue."""
    d = g.delim
    sp_h, sp_b = _sig_split(g)
    sp_cr = sp_h.replace(b"\r\n", b"\r") + b"\r\r" + sp_b.replace(b"\r\n", b"\r")
    return (
        g.hdr + b"\r\n\r\n" + d + f"\rContent-Type: text/plain\r\rForged via bare CR {EVIL}.".encode()
        + b"\r" + d + b"\r" + sp_cr + b"\r" + d + b"--\r\n"
        + d + b"\r\n" + g.signed + b"\r\n" + d + b"--\r\n"
    )  # fmt: skip


def _replace_boundary(g: Genuine, params: bytes) -> bytes:
    old = b'boundary="' + g.boundary + b'"'
    assert g.hdr.count(old) == 1
    return g.hdr.replace(old, params)


def a5_boundary_and_boundary_star(g: Genuine) -> bytes:
    """Two boundary parameters: a plain one and an RFC 2231 one naming the genuine boundary."""
    hdr = _replace_boundary(g, b"boundary=\"P\"; boundary*=us-ascii''" + g.boundary)
    d, dp = g.delim, b"--P"
    return (
        hdr + b"\r\n\r\n" + dp + f"\r\nContent-Type: text/plain\r\n\r\nForged via boundary* {EVIL}.".encode()
        + b"\r\n" + dp + b"\r\n" + g.sigpart + b"\r\n" + dp + b"--\r\n"
        + d + b"\r\n" + g.signed + b"\r\n" + d + b"--\r\n"
    )  # fmt: skip


def a6_boundary_with_trailing_blank(g: Genuine) -> bytes:
    """A quoted boundary ending in a blank, which the parser strips (RFC 2046 §5.1.1)."""
    hdr = _replace_boundary(g, b'boundary="Q "')
    dq = b"--Q"
    return (
        hdr + b"\r\n\r\n" + dq + f"\r\nContent-Type: text/plain\r\n\r\nForged via trailing blank {EVIL}.".encode()
        + b"\r\n" + dq + b"\r\n" + g.sigpart + b"\r\n" + dq + b"--\r\n"
        + b"--Q \r\n" + g.signed + b"\r\n--Q --\r\n"
    )  # fmt: skip


def a7_non_ascii_rfc2231_boundary(g: Genuine) -> bytes:
    """boundary*=utf-8''%C3%A9 next to boundary="P"; the genuine parts are delimited by --P."""
    hdr = _replace_boundary(g, b"boundary=\"P\"; boundary*=utf-8''%C3%A9")
    dp = b"--P"
    return hdr + b"\r\n\r\n" + dp + b"\r\n" + g.signed + b"\r\n" + dp + b"\r\n" + g.sigpart + b"\r\n" + dp + b"--\r\n"


FORGERIES: dict[str, Callable[[Genuine], bytes]] = {
    "A1-append-after-close-lookalike": a1_append_after_close_lookalike,
    "A2-header-end-lf-cr-lf": a2_header_end_lf_cr_lf,
    "A3-no-header-separator": a3_no_header_separator,
    "A4-bare-cr-delimiters": a4_bare_cr_delimiters,
    "A5-boundary-and-boundary-star": a5_boundary_and_boundary_star,
    "A6-boundary-with-trailing-blank": a6_boundary_with_trailing_blank,
    "A7-non-ascii-rfc2231-boundary": a7_non_ascii_rfc2231_boundary,
}


def _signed_entity(g: Genuine) -> bytes:
    """The multipart/signed entity of the genuine mail, without the message's own fields."""
    return g.raw.split(b"MIME-Version: 1.0\r\n", 1)[1]


def _mixed(*parts: bytes) -> bytes:
    body = b"".join(b"--W\r\n" + part + b"\r\n" for part in parts)
    return (
        head("wrapped", f"wrapped.{secrets.token_hex(4)}")
        + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="W"\r\n\r\n'
        + body
        + b"--W--\r\n"
    )


_EVIL_PART = f"Content-Type: text/plain\r\n\r\nUnsigned text {EVIL}.".encode()

#: Unsigned text next to a genuine signed part, instead of inside it.
WRAPPINGS: dict[str, Callable[[Genuine], bytes]] = {
    "W1-mixed-signed-then-unsigned": lambda g: _mixed(_signed_entity(g), _EVIL_PART),
    "W2-mixed-unsigned-then-signed": lambda g: _mixed(_EVIL_PART, _signed_entity(g)),
    "W3-text-in-the-preamble": lambda g: g.raw.replace(b"This is an S/MIME signed message", EVIL.encode()),
    "W4-text-in-the-epilogue": lambda g: g.raw + f"\r\nContent-Type: text/plain\r\n\r\n{EVIL}\r\n".encode(),
}


def shown(m: DecodedMail) -> list[bytes]:
    """What the record shows of the mail's content: bodies, attachment bytes and names."""
    out = [(m.text_body or "").encode("utf-8", "replace"), (m.html_body or "").encode("utf-8", "replace")]
    for a in m.attachments:
        out += [a.content, b"".join(a.pieces()), (a.filename or "").encode("utf-8", "replace")]
    return out


def evil_shown(m: DecodedMail) -> bool:
    return any(EVIL.encode() in piece for piece in shown(m))


def test_the_forgeries_carry_the_marker_and_the_genuine_signature(genuine: Genuine) -> None:
    for name, forge in (FORGERIES | WRAPPINGS).items():
        raw = forge(genuine)
        assert genuine.signed in raw and _sig_split(genuine)[1][:60] in raw, name
        assert (EVIL.encode() in raw) == (not name.startswith("A7")), name


@pytest.mark.parametrize("name", [*FORGERIES, *WRAPPINGS])
def test_forgery_is_refused_or_shows_only_the_signed_text(pki: SignPki, genuine: Genuine, name: str) -> None:
    """require_valid_signature: a dead letter, or every layer valid and the record holds the
    genuinely signed text only (no forged byte in a body or an attachment)."""
    raw = (FORGERIES | WRAPPINGS)[name](genuine)
    try:
        m = decode_mail(raw, options=strict(pki))
    except SignatureError:
        return
    except DecodeError as err:
        assert_not_unexpected(err)
        return
    assert m.smime is not None and m.smime.signatures, f"{name}: accepted as signed without a signature layer"
    assert all(v[2] == "valid" for v in verdicts(m)), verdicts(m)
    assert not evil_shown(m), f"{name}: VULNERABLE - forged text shown under a valid signature {verdicts(m)}"
    assert m.text_body == genuine.text, f"{name}: the body is not the signed text"
    assert m.html_body is None
    others = [a.content_type for a in m.attachments if a.content_type not in SIGNATURE_TYPES]
    assert others == [], f"{name}: unsigned parts shown next to a valid signature: {others}"


@pytest.mark.parametrize("name", [*FORGERIES, *WRAPPINGS])
def test_forgery_shown_is_never_valid(pki: SignPki, genuine: Genuine, name: str) -> None:
    """Without require_valid_signature the mail is decoded whatever the verdict; forged text in
    the record must then come with a verdict that is not valid (or with none: not signed)."""
    raw = (FORGERIES | WRAPPINGS)[name](genuine)
    try:
        m = decode_mail(raw, options=lenient(pki))
    except DecodeError as err:
        assert_not_unexpected(err)
        return
    if evil_shown(m):
        layers = verdicts(m)
        assert not layers or any(v[2] != "valid" for v in layers), f"{name}: VULNERABLE - forged text with {layers}"


def test_a7_non_ascii_boundary_default_options(pki: SignPki, genuine: Genuine) -> None:
    """A boundary* that decodes to non-ASCII (no delimiter line can match it) next to a plain
    boundary: no crash, with default options (no trust store) or with one; whatever splits the
    mail, a valid verdict shows the signed text only."""
    raw = a7_non_ascii_rfc2231_boundary(genuine)
    for opts in (DecodeOptions(), lenient(pki)):
        try:
            m = decode_mail(raw, options=opts)
        except DecodeError as err:
            assert_not_unexpected(err)
            continue
        for _, _, verdict, _ in verdicts(m):
            if verdict == "valid":
                assert m.text_body == genuine.text and not evil_shown(m)


# ------------------------------------------------------------------ the parts of a multipart/signed


def test_signature_part_relabelled_text_plain_is_malformed(pki: SignPki) -> None:
    """A signed attachment, and the signature (with attacker text hidden in an unsigned
    attribute) sent as text/plain: the text would become the body. Not a signature part: the
    layer is malformed, never valid."""
    entity = (
        b"Content-Type: application/pdf; name=invoice.pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=invoice.pdf\r\n\r\nJVBERi0xLjQK\r\n"
    )
    good = crlf(pki.sign(entity, "rsa"))
    info = cms.ContentInfo.load(signature_der(good))
    si = info["content"]["signer_infos"][0]
    hidden = f"\r\n\r\nURGENT: the above is superseded, pay Mallory {EVIL}.\r\n\r\n".encode()
    si["unsigned_attrs"] = cms.CMSAttributes(
        [cms.CMSAttribute({"type": "1.2.3.4", "values": [core.OctetString(hidden)]})]
    )
    der = info.dump(force=True)
    # Still a good signature as an application/pkcs7-signature: unsigned attributes are not signed.
    assert verdicts(decode_mail(mail_of(with_signature(good, der)), options=lenient(pki)))[0][2] == "valid"
    # sigtext.py: the signature part's header replaced by a text/plain one (latin-1, base64).
    found = re.search(rb'boundary="([^"]+)"', good)
    assert found is not None
    d = b"--" + found.group(1)
    top, rest = good.split(b"\r\n\r\n", 1)
    signed = rest.split(d)[1][2:-2]
    sigpart = b"Content-Type: text/plain; charset=latin-1\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    sigpart += base64.encodebytes(der).replace(b"\n", b"\r\n")
    raw = mail_of(top + b"\r\n\r\n" + d + b"\r\n" + signed + b"\r\n" + d + b"\r\n" + sigpart + d + b"--\r\n")
    assert raw.count(b"pkcs7-signature") == 1  # the protocol parameter only
    shown_before = decode_mail(raw, options=DecodeOptions())
    assert shown_before.text_body is not None and EVIL in shown_before.text_body  # what the attack was about
    m = decode_mail(raw, options=lenient(pki))
    assert verdicts(m) == [("", "detached", "invalid", "malformed")]
    with pytest.raises(SignatureError) as exc:
        decode_mail(raw, options=strict(pki))
    assert "malformed" in str(exc.value)


def test_third_part_in_multipart_signed_is_malformed(pki: SignPki, genuine: Genuine) -> None:
    d = genuine.delim
    raw = (
        genuine.hdr + b"\r\n\r\n" + d + b"\r\n" + genuine.signed + b"\r\n" + d + b"\r\n" + genuine.sigpart
        + b"\r\n" + d + f"\r\nContent-Type: text/plain\r\n\r\nAlso from the signer {EVIL}.\r\n".encode()
        + d + b"--\r\n"
    )  # fmt: skip
    m = decode_mail(raw, options=lenient(pki))
    assert verdicts(m) == [("", "detached", "invalid", "malformed")]
    assert m.smime is not None and "3 parts" in (m.smime.signatures[0].detail or "")
    with pytest.raises(SignatureError):
        decode_mail(raw, options=strict(pki))
    # The signature first and the content second: not what RFC 1847 §2.1 says either.
    swapped = (
        genuine.hdr + b"\r\n\r\n" + d + b"\r\n" + genuine.sigpart + b"\r\n" + d + b"\r\n" + genuine.signed
        + b"\r\n" + d + b"--\r\n"
    )  # fmt: skip
    assert verdicts(decode_mail(swapped, options=lenient(pki)))[0][2:] == ("invalid", "malformed")


def test_missing_close_delimiter_is_malformed(pki: SignPki, genuine: Genuine) -> None:
    raw = genuine.raw[: genuine.raw.rindex(genuine.delim + b"--")]
    assert raw.endswith(b"\r\n")
    m = decode_mail(raw, options=lenient(pki))
    assert verdicts(m) == [("", "detached", "invalid", "malformed")]
    assert m.smime is not None and "delimiters" in (m.smime.signatures[0].detail or "")


# ------------------------------------------------------------------ eContentType


def _opaque_mail(der: bytes, smime_type: str | None = "signed-data") -> bytes:
    param = f"; smime-type={smime_type}" if smime_type else ""
    return (
        head("receipt", f"receipt.{secrets.token_hex(4)}")
        + (
            f"MIME-Version: 1.0\r\nContent-Type: application/pkcs7-mime{param}; name=smime.p7m\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        + base64.encodebytes(der).replace(b"\n", b"\r\n")
    )


def test_opaque_signed_data_that_is_not_id_data_is_malformed(pki: SignPki) -> None:
    """openssl cms -sign -nodetach -econtent_type id-smime-ct-receipt: a good signature over
    content that is not a MIME entity. Never parsed and shown as the mail's content."""
    content = f"Content-Type: text/plain\r\n\r\nI, the signer, agree to pay Mallory {EVIL}.\r\n".encode()
    der = pki.sign(content, "rsa", opaque=True, econtent_type=RECEIPT_OID, outform="DER")
    assert cms.ContentInfo.load(der)["content"]["encap_content_info"]["content_type"].dotted == RECEIPT_OID
    for smime_type in ("signed-data", None):
        raw = _opaque_mail(der, smime_type)
        for opts in (strict(pki), lenient(pki), DecodeOptions()):
            with pytest.raises(SmimeError) as exc:
                decode_mail(raw, options=opts)
            assert exc.value.reason == "malformed", exc.value
            assert not isinstance(exc.value, SignatureError)
    # Without the eContentType check the same structure as id-data verifies: the check decides.
    control = pki.sign(content, "rsa", opaque=True, outform="DER")
    m = decode_mail(_opaque_mail(control), options=strict(pki))
    assert verdicts(m) == [("", "opaque", "valid", None)] and m.text_body is not None and EVIL in m.text_body


def test_opaque_receipt_as_openssl_labels_it_is_malformed_too(pki: SignPki) -> None:
    """openssl's own S/MIME output labels it smime-type=signed-receipt: still opened as
    signed-data by what the CMS says, and refused the same way; never the body."""
    content = f"Content-Type: text/plain\r\n\r\nReceipt text {EVIL}.\r\n".encode()
    raw = mail_of(pki.sign(content, "rsa", opaque=True, econtent_type=RECEIPT_OID))
    assert b"smime-type=signed-receipt" in raw
    for opts in (strict(pki), lenient(pki)):
        with pytest.raises(SmimeError) as exc:
            decode_mail(raw, options=opts)
        assert exc.value.reason == "malformed" and "id-data" in str(exc.value)


def test_detached_signature_that_is_not_id_data_is_malformed(pki: SignPki) -> None:
    raw = mail_of(pki.sign(text_entity("receipt"), "rsa", econtent_type=RECEIPT_OID))
    m = decode_mail(raw, options=lenient(pki))
    assert verdicts(m) == [("", "detached", "invalid", "malformed")]
    assert m.smime is not None and "id-data" in (m.smime.signatures[0].detail or "")


# ------------------------------------------------------------------ the signature algorithm's own hash


def _resign(pki: SignPki, der: bytes, sig_alg: str, digest: hashes.HashAlgorithm) -> bytes:
    """The same SignerInfo (digestAlgorithm sha256, same signed attributes) signed again by the
    rsa signer under ``sig_alg`` with ``digest``."""
    key = serialization.load_pem_private_key(pki["rsa"].key_path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    info = cms.ContentInfo.load(der)
    si = info["content"]["signer_infos"][0]
    assert si["digest_algorithm"]["algorithm"].native == "sha256"
    signed = b"\x31" + si["signed_attrs"].dump()[1:]
    si["signature_algorithm"] = algos.SignedDigestAlgorithm({"algorithm": sig_alg})
    si["signature"] = key.sign(signed, padding.PKCS1v15(), digest)
    return info.dump(force=True)


def test_signature_algorithm_hash_md5_and_sha1(pki: SignPki) -> None:
    entity = crlf(pki.sign(text_entity("algorithms"), "rsa"))
    der = signature_der(entity)

    def check(sig_alg: str, digest: hashes.HashAlgorithm, *, allow_sha1: bool) -> tuple[str, str | None, str]:
        raw = mail_of(with_signature(entity, _resign(pki, der, sig_alg, digest)))
        opts = DecodeOptions(trust=load_trust_store([pki.root], allow_sha1=allow_sha1), verify_at=VERIFY_AT)
        m = decode_mail(raw, options=opts)
        assert m.smime is not None and len(m.smime.signatures) == 1
        c = m.smime.signatures[0]
        assert c.signers[0].digest_algorithm == "sha256"
        return c.verdict, c.reason, c.signers[0].signature_algorithm

    md5, sha1 = hashes.MD5(), hashes.SHA1()  # noqa: S303 - the weak hashes are the point
    unsupported = ("invalid", "unsupported_algorithm", "rsassa_pkcs1v15")
    # The control: re-signed with sha256WithRSA the signature holds, so a verdict below is the algorithm's.
    assert check("sha256_rsa", hashes.SHA256(), allow_sha1=False) == ("valid", None, "rsassa_pkcs1v15")
    assert check("md5_rsa", md5, allow_sha1=False) == unsupported
    assert check("sha1_rsa", sha1, allow_sha1=False) == unsupported
    # SHA-1 allowed by the trust store: sha1WithRSA (PKCS#1 binds SHA-1) is accepted; MD5 never.
    assert check("sha1_rsa", sha1, allow_sha1=True) == ("valid", None, "rsassa_pkcs1v15")
    assert check("md5_rsa", md5, allow_sha1=True) == unsupported


# ------------------------------------------------------------------ malformed pieces


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 128:
        length = bytes([n])
    else:
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(size)]) + size
    return bytes([tag]) + length + content


def _rebuild(der: bytes, certs: list[bytes] | None = None, signer_infos: list[bytes] | None = None) -> bytes:
    """The SignedData of ``der`` with these raw certificate and SignerInfo encodings (bytes
    asn1crypto would refuse to build, or parse only lazily)."""
    sd = cms.ContentInfo.load(der)["content"]
    certs = [c.dump() for c in sd["certificates"]] if certs is None else certs
    infos = [s.dump() for s in sd["signer_infos"]] if signer_infos is None else signer_infos
    body = (
        sd["version"].dump() + sd["digest_algorithms"].dump() + sd["encap_content_info"].dump()
        + _tlv(0xA0, b"".join(certs)) + _tlv(0x31, b"".join(infos))
    )  # fmt: skip
    return _tlv(0x30, cms.ContentType("signed_data").dump() + _tlv(0xA0, _tlv(0x30, body)))


def _signer_info_with_attrs(der: bytes, attrs: bytes) -> bytes:
    si = cms.ContentInfo.load(der)["content"]["signer_infos"][0]
    return _tlv(
        0x30,
        si["version"].dump() + si["sid"].dump() + si["digest_algorithm"].dump() + _tlv(0xA0, attrs)
        + si["signature_algorithm"].dump() + si["signature"].dump(),
    )  # fmt: skip


_TBS_INTEGER_ONLY = b"\x30\x0b\x30\x03\x02\x01\x05\x30\x00\x03\x02\x00\x00"
_CERT_JUNK_ISSUER = _tlv(
    0x30,
    _tlv(0x30, b"\xa0\x03\x02\x01\x02\x02\x01\x05" + _tlv(0x30, b"\x06\x03\x2a\x03\x04") + b"\x30\x03\x01\x01\xff")
    + _tlv(0x30, b"\x06\x03\x2a\x03\x04")
    + b"\x03\x01\x00",
)
MALFORMED: dict[str, Callable[[bytes, list[bytes]], bytes]] = {
    "unparseable-certificate-first": lambda der, certs: _rebuild(der, [_TBS_INTEGER_ONLY, *certs]),
    "certificate-with-junk-issuer": lambda der, certs: _rebuild(der, [_CERT_JUNK_ISSUER, *certs]),
    "signed-attrs-junk": lambda der, _: _rebuild(der, None, [_signer_info_with_attrs(der, b"\x30\x03\x02\x01\x01")]),
    "signed-attr-empty-values": lambda der, _: _rebuild(
        der, None, [_signer_info_with_attrs(der, b"\x30\x05\x06\x01\x2a\x31\x00")]
    ),
    "signed-attrs-not-a-sequence": lambda der, _: _rebuild(der, None, [_signer_info_with_attrs(der, b"\x04\x00")]),
}


def test_rebuild_keeps_a_good_signature(pki: SignPki, genuine: Genuine) -> None:
    der = signature_der(genuine.raw)
    certs = [c.dump() for c in cms.ContentInfo.load(der)["content"]["certificates"]]
    m = decode_mail(with_signature(genuine.raw, _rebuild(der, certs)), options=lenient(pki))
    assert verdicts(m) == [("", "detached", "valid", None)]


@pytest.mark.parametrize("name", MALFORMED)
@pytest.mark.parametrize("trusted", [True, False], ids=["trust", "no-trust"])
def test_malformed_pieces_are_a_verdict(pki: SignPki, genuine: Genuine, name: str, trusted: bool) -> None:
    der = signature_der(genuine.raw)
    certs = [c.dump() for c in cms.ContentInfo.load(der)["content"]["certificates"]]
    raw = with_signature(genuine.raw, MALFORMED[name](der, certs))
    opts = lenient(pki) if trusted else DecodeOptions(verify_at=VERIFY_AT)
    try:
        m = decode_mail(raw, options=opts)
    except DecodeError as err:
        pytest.fail(f"{name}: an error instead of a verdict: {err!r}")
    assert verdicts(m) == [("", "detached", "invalid", "malformed")]
    assert m.text_body == genuine.text  # the content is still decoded
    with pytest.raises(SignatureError):
        decode_mail(raw, options=strict(pki))


def _ec_cert(
    key: ec.EllipticCurvePrivateKey, subject: x509.Name, issuer: x509.Name, serial: int, *, ca: bool = False
) -> bytes:
    b = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        .serial_number(serial).not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2050, 1, 1))
    )  # fmt: skip
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _ec_signed_data(content: bytes, key: ec.EllipticCurvePrivateKey, leaf_der: bytes, extra: list[bytes]) -> bytes:
    """A detached SignedData by an EC signer (sha256, contentType and messageDigest), its
    certificate and ``extra`` ones embedded, built by hand (like ed25519_detached)."""
    leaf = asn1_x509.Certificate.load(leaf_der)
    attrs = cms.CMSAttributes(
        [
            cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
            cms.CMSAttribute({"type": "message_digest", "values": [hashlib.sha256(content).digest()]}),
        ]
    )
    si = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": cms.IssuerAndSerialNumber(
                        {"issuer": leaf.issuer, "serial_number": leaf.serial_number}
                    )
                }
            ),
            "digest_algorithm": algos.DigestAlgorithm({"algorithm": "sha256"}),
            "signed_attrs": attrs,
            "signature_algorithm": algos.SignedDigestAlgorithm({"algorithm": "sha256_ecdsa"}),
            "signature": key.sign(attrs.dump(force=True), ec.ECDSA(hashes.SHA256())),
        }
    )
    certs = [leaf_der, *extra]
    sd = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [algos.DigestAlgorithm({"algorithm": "sha256"})],
            "encap_content_info": {"content_type": "data"},
            "certificates": [asn1_x509.Certificate.load(c) for c in certs],
            "signer_infos": [si],
        }
    )
    return cms.ContentInfo({"content_type": "signed_data", "content": sd}).dump()


def test_malformed_bmpstring_signer_name_is_a_verdict(pki: SignPki) -> None:
    """The signer's CN is a BMPString holding a lone surrogate (U+D800): cryptography refuses
    the certificate, asn1crypto decodes it to a string no record may carry."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AB", _type=_ASN1Type.BMPString)])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iss")])
    der = _ec_cert(key, name, issuer, 7)
    assert der.count(b"\x1e\x04\x00\x41\x00\x42") == 1
    der = der.replace(b"\x1e\x04\x00\x41\x00\x42", b"\x1e\x04\xd8\x00\x00\x42")
    content = text_entity("bmp")
    raw = mail_of(multipart_signed(content, _ec_signed_data(content, key, der, []), micalg="sha-256"))
    m = decode_mail(raw, options=DecodeOptions(verify_at=VERIFY_AT))
    assert verdicts(m) == [("", "detached", "unchecked", "no_trust_store")]
    assert m.smime is not None
    facts = m.smime.signatures[0].signers[0]
    assert facts.subject == "(unreadable name)" and facts.issuer == "(unreadable name)"
    facts.subject.encode("utf-8")  # a record field: no lone surrogate
    m = decode_mail(raw, options=lenient(pki))
    assert verdicts(m) == [("", "detached", "invalid", "malformed")]
    for s in m.smime.signatures[0].signers:  # type: ignore[union-attr]
        (s.subject + s.issuer + "".join(s.emails)).encode("utf-8")


# ------------------------------------------------------------------ bounds


def _with_signers(der: bytes, n: int) -> bytes:
    info = cms.ContentInfo.load(der)
    si = info["content"]["signer_infos"][0].dump()
    info["content"]["signer_infos"] = cms.SignerInfos([cms.SignerInfo.load(si) for _ in range(n)])
    return info.dump(force=True)


def test_at_most_max_signers(pki: SignPki, genuine: Genuine) -> None:
    der = signature_der(genuine.raw)
    assert MAX_SIGNERS == 16
    at_cap = decode_mail(with_signature(genuine.raw, _with_signers(der, MAX_SIGNERS)), options=lenient(pki))
    assert verdicts(at_cap) == [("", "detached", "valid", None)]
    assert at_cap.smime is not None and len(at_cap.smime.signatures[0].signers) == MAX_SIGNERS
    for n in (MAX_SIGNERS + 1, 400):
        started = time.perf_counter()
        m = decode_mail(with_signature(genuine.raw, _with_signers(der, n)), options=lenient(pki))
        elapsed = time.perf_counter() - started
        assert verdicts(m) == [("", "detached", "invalid", "malformed")]
        assert m.smime is not None and m.smime.signatures[0].signers == ()  # none was checked
        assert elapsed < 2.0, f"{n} signers took {elapsed:.2f} s"


def test_at_most_max_signers_opaque(pki: SignPki) -> None:
    entity = crlf(pki.sign(text_entity("opaque signers"), "rsa", opaque=True))
    header, body = entity.split(b"\r\n\r\n", 1)
    der = base64.b64decode(b"".join(body.split()))
    raw = mail_of(header + b"\r\n\r\n" + base64.encodebytes(_with_signers(der, MAX_SIGNERS + 1)))
    m = decode_mail(raw, options=lenient(pki))
    assert verdicts(m) == [("", "opaque", "invalid", "malformed")]


def _with_certificates(der: bytes, n: int) -> bytes:
    """``n`` embedded certificates: the signer's and n-1 copies of the intermediate."""
    info = cms.ContentInfo.load(der)
    certs = list(info["content"]["certificates"])
    leaf = next(c for c in certs if not c.chosen.ca)
    inter = next(c for c in certs if c.chosen.ca)
    info["content"]["certificates"] = cms.CertificateSet(
        [cms.CertificateChoices.load(inter.dump()) for _ in range(n - 1)] + [cms.CertificateChoices.load(leaf.dump())]
    )
    return info.dump(force=True)


def test_at_most_max_certificates(pki: SignPki, genuine: Genuine) -> None:
    der = signature_der(genuine.raw)
    assert MAX_CERTIFICATES == 64
    at_cap = decode_mail(with_signature(genuine.raw, _with_certificates(der, MAX_CERTIFICATES)), options=lenient(pki))
    assert verdicts(at_cap) == [("", "detached", "valid", None)]
    started = time.perf_counter()
    over = decode_mail(with_signature(genuine.raw, _with_certificates(der, MAX_CERTIFICATES + 1)), options=lenient(pki))
    assert verdicts(over) == [("", "detached", "invalid", "malformed")]
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize("pool", [8, 10])
def test_path_bomb_is_cut_short(pki: SignPki, pool: int) -> None:
    """Same-subject CA certificates under one key (every one may issue every other): path
    building would explore every simple path, factorially many. A verdict, quickly."""
    key = ec.generate_private_key(ec.SECP256R1())
    x = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "X")])
    leaf = _ec_cert(key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]), x, 1)
    cas = [_ec_cert(key, x, x, 100 + i, ca=True) for i in range(pool)]
    content = text_entity("bomb")
    raw = mail_of(multipart_signed(content, _ec_signed_data(content, key, leaf, cas), micalg="sha-256"))
    opts = lenient(pki, limits=DecodeLimits(max_decode_seconds=5.0))
    started = time.perf_counter()
    m = decode_mail(raw, options=opts)
    elapsed = time.perf_counter() - started
    assert len(verdicts(m)) == 1
    assert verdicts(m)[0][2:] in (("invalid", "invalid_chain"), ("invalid", "unknown_ca")), verdicts(m)
    assert elapsed < 2.0, f"path bomb of {pool}: {elapsed:.2f} s"
    # Integrity alone (no trust store) does not build paths: the signature itself is fine.
    assert verdicts(decode_mail(raw, options=DecodeOptions(verify_at=VERIFY_AT)))[0][2:] == (
        "unchecked",
        "no_trust_store",
    )


def test_deadline_is_checked_between_signers(pki: SignPki, genuine: Genuine, monkeypatch: pytest.MonkeyPatch) -> None:
    der = signature_der(genuine.raw)
    # Past the deadline before the first signer: no signer is checked.
    with pytest.raises(MailTooLargeError) as exc:
        signature.verify_detached(
            der,
            genuine.signed,
            layer="",
            trust=load_trust_store([pki.root]),
            at=VERIFY_AT,
            deadline=time.monotonic() - 1,
        )
    assert exc.value.reason == "max_decode_seconds"
    # Through decode_mail: each signer made slow, the deadline passes after a few of the 16.
    real = signature._guarded_signer
    calls = []

    def slow(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        time.sleep(0.05)
        return real(*args, **kw)

    monkeypatch.setattr(signature, "_guarded_signer", slow)
    raw = with_signature(genuine.raw, _with_signers(der, MAX_SIGNERS))
    started = time.perf_counter()
    with pytest.raises(MailTooLargeError) as exc:
        decode_mail(raw, options=lenient(pki, limits=DecodeLimits(max_decode_seconds=0.2)))
    assert exc.value.reason == "max_decode_seconds"
    assert 1 <= len(calls) < MAX_SIGNERS, len(calls)
    assert time.perf_counter() - started < 1.5


def test_deadline_is_checked_between_signers_of_opaque_signed_data(
    pki: SignPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same deadline for opaque signed-data (RFC 8551 §3.5.2) as for a detached signature."""
    entity = crlf(pki.sign(text_entity("opaque deadline"), "rsa", opaque=True))
    header, body = entity.split(b"\r\n\r\n", 1)
    der = base64.b64decode(b"".join(body.split()))
    raw = mail_of(header + b"\r\n\r\n" + base64.encodebytes(_with_signers(der, MAX_SIGNERS)))
    real = signature._guarded_signer
    calls = []

    def slow(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        time.sleep(0.05)
        return real(*args, **kw)

    monkeypatch.setattr(signature, "_guarded_signer", slow)
    with pytest.raises(MailTooLargeError) as exc:
        decode_mail(raw, options=lenient(pki, limits=DecodeLimits(max_decode_seconds=0.2)))
    assert exc.value.reason == "max_decode_seconds"
    assert 1 <= len(calls) < MAX_SIGNERS, (
        f"STILL OPEN: opaque signed-data ignores the decode deadline between signers (mime._verify_opaque passes "
        f"no deadline to signature.verify_opaque): all {len(calls)} signers were checked, the limit only hit after"
    )


@pytest.mark.parametrize("signers", [MAX_SIGNERS, 200])
def test_many_signers_with_a_tiny_deadline(pki: SignPki, genuine: Genuine, signers: int) -> None:
    raw = with_signature(genuine.raw, _with_signers(signature_der(genuine.raw), signers))
    started = time.perf_counter()
    try:
        m = decode_mail(raw, options=lenient(pki, limits=DecodeLimits(max_decode_seconds=0.001)))
    except MailTooLargeError as exc:
        assert exc.reason == "max_decode_seconds"
    else:  # finished within the deadline: only possible at the cap
        assert verdicts(m) == [("", "detached", "invalid", "malformed")] and signers > MAX_SIGNERS
    assert time.perf_counter() - started < 2.0


def _nested(pki: SignPki, depth: int, marker: str) -> bytes:
    entity = text_entity(marker)
    for _ in range(depth):
        entity = crlf(pki.sign(entity, "rsa"))
    return mail_of(entity, f"nested{depth}")


def test_three_nested_detached_layers_are_each_verified(pki: SignPki) -> None:
    marker = f"NEST-{secrets.token_hex(4)}"
    raw = _nested(pki, 3, marker)
    m = decode_mail(raw, options=strict(pki))
    assert verdicts(m) == [
        ("", "detached", "valid", None),
        ("1", "detached", "valid", None),
        ("1.1", "detached", "valid", None),
    ]
    assert m.text_body is not None and marker in m.text_body
    # A change in the innermost content breaks every layer (each covers it).
    tampered = raw.replace(b"Signed text", b"Signed texT", 1)
    assert [v[2:] for v in verdicts(decode_mail(tampered, options=lenient(pki)))] == [("invalid", "tampered")] * 3


def test_four_nested_detached_layers_are_too_many(pki: SignPki) -> None:
    raw = _nested(pki, 4, "four")
    for opts in (strict(pki), lenient(pki), DecodeOptions()):
        with pytest.raises(MailTooLargeError) as exc:
            decode_mail(raw, options=opts)
        assert exc.value.reason == "max_smime_layers"


def _fake_nest(depth: int, inner_size: int = 0) -> bytes:
    """nest.py: multipart/signed in multipart/signed, each with a bogus signature."""
    inner = b"Content-Type: text/plain\r\n\r\n" + b"a" * inner_size + b"\r\n"
    for i in range(depth):
        b = f"b{i}".encode()
        inner = (
            b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary="' + b + b'"\r\n\r\n--'
            + b + b"\r\n" + inner + b"\r\n--" + b + b"\r\nContent-Type: application/pkcs7-signature\r\n\r\nAAAA\r\n--"
            + b + b"--\r\n"
        )  # fmt: skip
    return b"From: a@b\r\nMIME-Version: 1.0\r\n" + inner


def test_nested_bogus_signatures_count_as_layers() -> None:
    m = decode_mail(_fake_nest(3, 1 << 16))
    assert [v[2:] for v in verdicts(m)] == [("invalid", "malformed")] * 3
    started = time.perf_counter()
    with pytest.raises(MailTooLargeError) as exc:
        decode_mail(_fake_nest(4, 1 << 20))
    assert exc.value.reason == "max_smime_layers"
    assert time.perf_counter() - started < 2.0


def test_opaque_and_detached_layers_count_together(pki: SignPki) -> None:
    inner = crlf(pki.sign(crlf(pki.sign(text_entity("mixed"), "rsa")), "rsa"))  # two detached layers
    two_opaque = crlf(pki.sign(crlf(pki.sign(inner, "rsa", opaque=True)), "rsa", opaque=True))
    with pytest.raises(MailTooLargeError) as exc:
        decode_mail(mail_of(two_opaque), options=lenient(pki))
    assert exc.value.reason == "max_smime_layers"
    one_opaque = mail_of(crlf(pki.sign(inner, "rsa", opaque=True)))
    m = decode_mail(one_opaque, options=strict(pki))
    assert verdicts(m) == [
        ("", "opaque", "valid", None),
        ("1", "detached", "valid", None),
        ("1.1", "detached", "valid", None),
    ]


# ------------------------------------------------------------------ fastmime part offsets


def _children(node: Node) -> list[Node]:
    payload = node.get_payload()
    assert isinstance(payload, list), "not split into parts"
    return payload


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"], ids=["crlf", "lf", "cr"])
def test_node_span_is_the_bytes_between_the_delimiters(eol: bytes) -> None:
    """Node.span of each part: from after the delimiter line's line break up to the line break
    before the next delimiter (RFC 2046 §5.1.1: that break belongs to the delimiter)."""

    def lines(*items: bytes) -> bytes:
        return eol.join(items)

    parts = [
        lines(b"Content-Type: text/plain", b"", b"first line", b"--Bx is not a delimiter", b"last line"),
        lines(b"Content-Type: text/plain", b"", b"ends with an empty line", b""),  # its own line break stays
        lines(b"", b"no header section at all"),
        b"",  # an empty part: a header section ending at once
        lines(b"Content-Type: application/octet-stream", b"", b"--B-- x", b" --B", b"tail"),
    ]
    data = lines(b"From: a@b", b"MIME-Version: 1.0", b'Content-Type: multipart/mixed; boundary="B"', b"", b"preamble")
    data += eol + b"--B" + eol + (eol + b"--B  " + eol).join(parts) + eol + b"--B--" + eol + b"epilogue" + eol
    root = PARSER.parse(data)
    children = _children(root)
    assert len(children) == len(parts)
    for i, (child, part) in enumerate(zip(children, parts, strict=True), 1):
        assert child.span is not None, i
        start, stop = child.span
        assert data[start:stop] == part, f"part {i}: {data[start:stop]!r} != {part!r}"
    assert root.span is None


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"], ids=["crlf", "lf", "cr"])
def test_node_span_of_nested_parts_and_signed_mail(eol: bytes, genuine: Genuine) -> None:
    """Offsets of nested parts point into the same buffer; a multipart/signed's first part
    spans exactly the signed entity, in any line-end convention."""
    signed = genuine.signed.replace(b"\r\n", eol)
    inner_parts = [b"Content-Type: text/plain" + eol + eol + b"inner one", signed]
    inner = (
        b'Content-Type: multipart/alternative; boundary="in"' + eol + eol + b"--in" + eol
        + (eol + b"--in" + eol).join(inner_parts) + eol + b"--in--"
    )  # fmt: skip
    outer = [inner, b"Content-Type: text/plain" + eol + eol + b"outer two"]
    data = (
        b'Content-Type: multipart/mixed; boundary="out"' + eol + eol + b"--out" + eol
        + (eol + b"--out" + eol).join(outer) + eol + b"--out--" + eol
    )  # fmt: skip
    root = PARSER.parse(data)
    kids = _children(root)
    assert [data[k.span[0] : k.span[1]] for k in kids if k.span] == outer
    grandkids = _children(kids[0])
    assert [data[k.span[0] : k.span[1]] for k in grandkids if k.span] == inner_parts

    mail = genuine.raw.replace(b"\r\n", eol)
    first = _children(PARSER.parse(mail))[0]
    assert first.span is not None
    assert mail[first.span[0] : first.span[1]] == signed
