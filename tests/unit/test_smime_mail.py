"""Whole S/MIME mails through decode_mail and the mailbox config: decryption with the keys
from the config, signed-then-encrypted, facts in the record, passthrough, and failures that
become dead letters without a trace of the decrypted content."""

from __future__ import annotations

import base64
import hashlib
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.leaks import assert_no_leak
from support.smime import Pki, make_pki

from connector.config import parse_config
from connector.decoding import decode_mail
from connector.decoding.options import DecodeOptions
from connector.errors import ConfigError, DecodeError, MailTooLargeError, SmimeError
from connector.records import Provenance, build_mail_record, decode_single_object, encode_single_object, mail_schema
from connector.records.dead_letter import DeadLetter

HEAD = b"From: Sender <s@x.org>\r\nTo: r@x.org\r\nSubject: quarterly\r\nMessage-ID: <m1@x.org>\r\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def mailbox_options(pki: Pki, *keys: dict[str, Any], mode: str = "decrypt", **extra: Any) -> DecodeOptions:
    smime: dict[str, Any] = {"mode": mode, "keys": list(keys)}
    cfg = parse_config(
        {
            "kafka": {"bootstrap_servers": "k:9092"},
            "topics": {"mail": "m"},
            "mailboxes": [
                {"id": "a", "host": "pop.test", "username": "u", "password": {"env": "PW"}, "smime": smime, **extra}
            ],
        },
        environ={"PW": "pw", "P12_PW": "p12-secret"},
        base=pki.root,
    )
    return cfg.mailboxes[0].decode


def inner_mail(marker: str) -> bytes:
    return (
        b"Content-Type: multipart/mixed; boundary=IN\r\n\r\n--IN\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + f"The figure is {marker}.\r\n".encode()
        + b"--IN\r\nContent-Type: application/pdf; name=report.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(b"%PDF-1.4 " + marker.encode())
        + b"\r\n--IN--\r\n"
    )


def smime_mail(entity: bytes) -> bytes:
    return HEAD + entity.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")


def test_encrypted_mail_decrypts_with_a_configured_pem_key(pki: Pki) -> None:
    marker = uuid.uuid4().hex
    raw = smime_mail(pki.encrypt(inner_mail(marker), "alice", outform="SMIME"))
    opts = mailbox_options(pki, {"file": str(pki.pem_file("alice", key_first=True)), "label": "alice-2026"})
    m = decode_mail(raw, options=opts)
    assert (
        m.subject == "quarterly" and m.text_body == f"The figure is {marker}."
    )  # RFC 2046 §5.1.1: the CRLF belongs to the boundary
    assert [a.filename for a in m.attachments] == ["report.pdf"]
    assert m.smime is not None and (m.smime.encrypted, m.smime.decrypted) == (True, True)
    assert (m.smime.key, m.smime.cipher, m.smime.signed) == ("alice-2026", "aes256_cbc", False)
    assert [(p.path, p.role, p.kind) for p in m.parts] == [
        ("", "smime", "smime-encrypted"),
        ("1", "container", None),
        ("1.1", "text_body", None),
        ("1.2", "attachment", None),
    ]
    back = decode_single_object(
        encode_single_object(mail_schema(), build_mail_record(m, Provenance("a", "u", "s", 1, 1, "0" * 64)))
    )
    assert back["smime"]["decrypted"] is True and back["smime"]["key"] == "alice-2026"


def test_two_keys_pkcs12_with_password_and_aes128(pki: Pki) -> None:
    raw = smime_mail(pki.encrypt(inner_mail("x"), "bob", cipher="-aes128", outform="SMIME"))
    opts = mailbox_options(
        pki,
        {"file": str(pki.pem_file("alice", key_first=False))},
        {"file": str(pki.p12_file("bob", password="p12-secret")), "password": {"env": "P12_PW"}, "label": "bob"},
    )
    m = decode_mail(raw, options=opts)
    assert m.smime is not None and (m.smime.key, m.smime.cipher) == ("bob", "aes128_cbc")


def test_signed_then_encrypted_gives_the_inner_mail_and_the_signed_fact(pki: Pki) -> None:
    signed = pki.sign_opaque(inner_mail("sig"), outform="SMIME")
    raw = smime_mail(pki.encrypt(signed.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n"), "alice", outform="SMIME"))
    m = decode_mail(raw, options=mailbox_options(pki, {"file": str(pki.pem_file("alice", key_first=True))}))
    assert m.text_body == "The figure is sig."
    assert m.smime is not None and m.smime.decrypted and m.smime.signed and m.smime.signature_type == "opaque"
    assert [p.kind for p in m.parts[:2]] == ["smime-encrypted", "smime-signed"]


def test_passthrough_never_decrypts(pki: Pki) -> None:
    raw = smime_mail(pki.encrypt(inner_mail("pt"), "alice", outform="SMIME"))
    m = decode_mail(raw, options=mailbox_options(pki, mode="passthrough"))
    assert m.raw == raw and not m.mime_decoded and m.smime is not None and m.smime.passthrough
    assert m.text_body is None and m.parts == ()


def test_keys_with_passthrough_is_a_config_error(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="passthrough never decrypts"):
        mailbox_options(pki, {"file": str(pki.pem_file("alice", key_first=True))}, mode="passthrough")


def test_missing_key_file_is_a_config_error(pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"smime.keys\[0\].file: .* does not exist"):
        mailbox_options(pki, {"file": "nope.pem"})


@pytest.mark.parametrize(
    ("how", "reason"),
    [("not-ours", "no_key"), ("3des", "unsupported_cipher"), ("oaep", "unsupported_key_transport")],
)
def test_undecryptable_mail_is_a_dead_letter_with_its_reason(pki: Pki, how: str, reason: str) -> None:
    kw: dict[str, Any] = {"outform": "SMIME"}
    recipient = "carol" if how == "not-ours" else "alice"
    if how == "3des":
        kw["cipher"] = "-des3"
    if how == "oaep":
        kw["oaep"] = True
    raw = smime_mail(pki.encrypt(inner_mail("r"), recipient, **kw))
    with pytest.raises(SmimeError) as exc:
        decode_mail(raw, options=mailbox_options(pki, {"file": str(pki.pem_file("alice", key_first=True))}))
    assert (exc.value.stage, exc.value.reason) == ("decrypt", reason)


# ------------------------------------------------------------------ nothing decrypted leaks


@pytest.mark.parametrize("failure", ["limits", "depth", "body_part"])
def test_failure_after_decryption_leaks_nothing(pki: Pki, failure: str, caplog: pytest.LogCaptureFixture) -> None:
    marker = f"MARK{uuid.uuid4().hex}"
    if failure == "limits":
        # A header field of the decrypted entity over the limit, its name and value the marker.
        inner = f"X-{marker}: {marker * 40}\r\nContent-Type: text/plain\r\n\r\n{marker}\r\n".encode()
        extra: dict[str, Any] = {"decode_limits": {"max_header_bytes": 1000}}
    elif failure == "depth":
        inner = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(6))
        inner += marker.encode() + b"\r\n"
        extra = {"decode_limits": {"max_depth": 3}}
    else:
        inner = inner_mail(marker)
        extra = {"body_part": {"content_type": "image/png"}}
    raw = smime_mail(pki.encrypt(inner, "alice", outform="SMIME"))
    assert_no_leak(marker, raw)  # the test mail itself is encrypted
    opts = mailbox_options(pki, {"file": str(pki.pem_file("alice", key_first=True))}, **extra)
    with pytest.raises(DecodeError) as exc:
        decode_mail(raw, options=opts)
    if failure != "body_part":
        assert isinstance(exc.value, MailTooLargeError)
    err = exc.value
    dead = DeadLetter.of(err, Provenance("a", "u", "s", 1, len(raw), hashlib.sha256(raw).hexdigest()), raw, 2)
    assert dead.raw == raw  # the original, still encrypted bytes
    assert_no_leak(
        marker,
        str(err),
        repr(err),
        "".join(traceback.format_exception(err)),
        dead.encode(),
        b"".join(v for _, v in dead.headers()),
        caplog.text,
    )


def test_config_key_paths_are_relative_to_the_config(pki: Pki) -> None:
    pem = pki.pem_file("alice", key_first=True)
    opts = mailbox_options(pki, {"file": pem.name})
    assert opts.keys is not None and len(opts.keys) == 1


def test_no_key_message_names_no_recipient(pki: Pki) -> None:
    raw = smime_mail(pki.encrypt(inner_mail("n"), "carol", outform="SMIME"))
    with pytest.raises(SmimeError) as exc:
        decode_mail(raw, options=mailbox_options(pki, {"file": str(pki.pem_file("alice", key_first=True))}))
    text = str(exc.value)
    assert "carol" not in text.lower() and "stranger" not in text.lower() and "elsewhere" not in text


def test_key_ring_repr_shows_labels_only(pki: Pki) -> None:
    opts = mailbox_options(pki, {"file": str(pki.pem_file("alice", key_first=True)), "label": "k1"})
    assert "k1" in repr(opts.keys) and "PRIVATE" not in repr(opts.keys)
    assert Path(pki.root).exists()


# ------------------------------------------------------------------ .p7m attachments are not layers


def with_attachment(
    entity_b64: bytes, filename: str, *, first: bool = False, smime_type: str = "enveloped-data"
) -> bytes:
    att = (
        (
            f'--B\r\nContent-Type: application/pkcs7-mime; smime-type={smime_type}; name="{filename}"\r\n'
            f'Content-Disposition: attachment; filename="{filename}"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        ).encode()
        + entity_b64
        + b"\r\n"
    )
    text = b"--B\r\nContent-Type: text/plain\r\n\r\nPlease find the contract attached.\r\n"
    body = (att + text) if first else (text + att)
    return HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n" + body + b"--B--\r\n"


def test_an_encrypted_p7m_attachment_is_kept_not_decrypted(pki: Pki) -> None:
    der = pki.encrypt(inner_mail("att"), "carol")  # not even for us: still no dead letter
    raw = with_attachment(base64.encodebytes(der).replace(b"\n", b"\r\n"), "contract.p7m")
    m = decode_mail(raw)  # default options: decrypt, no keys
    assert m.text_body == "Please find the contract attached."
    assert [(a.filename, a.kind, a.size) for a in m.attachments] == [("contract.p7m", "smime-encrypted", len(der))]
    assert m.smime is None  # the mail itself has no S/MIME layer
    passthrough = decode_mail(raw, options=DecodeOptions(smime="passthrough"))
    assert passthrough.mime_decoded and passthrough.text_body == m.text_body


def test_a_signed_xml_p7m_invoice_first_is_not_unwrapped_and_does_not_become_the_body(pki: Pki) -> None:
    signed = pki.sign_opaque(b"<FatturaElettronica/>", outform="DER")
    raw = with_attachment(
        base64.encodebytes(signed).replace(b"\n", b"\r\n"),
        "IT01234_00001.xml.p7m",
        first=True,
        smime_type="signed-data",
    )
    m = decode_mail(raw)
    assert m.text_body == "Please find the contract attached."
    assert [(a.filename, a.kind) for a in m.attachments] == [("IT01234_00001.xml.p7m", "smime-signed")]
    assert m.smime is None


def test_more_than_three_smime_layers_is_a_limit(pki: Pki) -> None:
    entity = inner_mail("deep")
    for _ in range(4):
        entity = crlf_entity(pki.sign_opaque(entity, outform="SMIME"))
    with pytest.raises(MailTooLargeError) as exc:
        decode_mail(HEAD + entity)
    assert exc.value.reason == "max_smime_layers"
    three = inner_mail("three")
    for _ in range(3):
        three = crlf_entity(pki.sign_opaque(three, outform="SMIME"))
    assert decode_mail(HEAD + three).text_body == "The figure is three."


def crlf_entity(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
