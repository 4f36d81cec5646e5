"""Unit tests for connector.decoding.smime: S/MIME decryption, opaque signed-data, key loading.

Mail is produced by the openssl binary (and, for a second opinion, cryptography's envelope
builder) from throw-away keys made once per module; see tests/support/smime.py.
"""

from __future__ import annotations

import base64
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.leaks import assert_no_leak
from support.smime import (
    P12_PASSWORD,
    PEM_PASSWORD,
    Pki,
    break_padding,
    envelope_with_cryptography,
    make_pki,
    mime_entity,
    pem_body,
    smime_parts,
)

from connector.decoding.smime import Decrypted, KeyRing, KeySpec, decrypt, load_keys, smime_type, unwrap_signed_data
from connector.errors import ConfigError, SmimeError

MARKER = "MARKER-0d6b1f-TOP-SECRET-PLAINTEXT"
# Strings that would show that a message names a person from the mail or a certificate.
PERSONAL = ("Alice", "alice@", "Bob", "bob@", "Carol", "carol.stranger", "Erin", "erin@", "example.test")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("smime"))


@pytest.fixture(scope="module")
def ring(pki: Pki) -> KeyRing:
    """alice (PEM, certificate first) and bob (PEM, key first, among CA certificates)."""
    return load_keys(
        [
            KeySpec(pki.pem_file("alice", key_first=False), None, "alice-key"),
            (pki.pem_file("bob", key_first=True, extra_certs=True), None, "bob-key"),
        ]
    )


@pytest.fixture
def mail() -> bytes:
    return mime_entity(MARKER)


def reason_of(data: bytes, ring: KeyRing) -> SmimeError:
    with pytest.raises(SmimeError) as info:
        decrypt(data, ring)
    assert info.value.stage == "decrypt"
    return info.value


# ---------------------------------------------------------------- decryption that works


@pytest.mark.parametrize(("flag", "cipher"), [("-aes128", "aes128_cbc"), ("-aes256", "aes256_cbc")])
def test_decrypts_aes_cbc_der(pki: Pki, ring: KeyRing, mail: bytes, flag: str, cipher: str) -> None:
    result = decrypt(pki.encrypt(mail, "alice", cipher=flag), ring)
    assert result == Decrypted(content=mail, key_label="alice-key", cipher=cipher)


@pytest.mark.parametrize("flag", ["-aes128", "-aes256"])
def test_decrypts_ber_indefinite_length_with_chunked_ciphertext(pki: Pki, ring: KeyRing, flag: str) -> None:
    big = mime_entity(MARKER, filler=20_000)  # several 4 KiB chunks of constructed OCTET STRING
    ber = pki.encrypt(big, "bob", cipher=flag, stream=True)
    assert ber[:2] == b"\x30\x80", "openssl did not write indefinite-length BER"
    result = decrypt(ber, ring)
    assert result.content == big
    assert result.key_label == "bob-key"


def test_decrypts_pem_and_smime_output_forms(pki: Pki, ring: KeyRing, mail: bytes) -> None:
    assert decrypt(pem_body(pki.encrypt(mail, "alice", outform="PEM")), ring).content == mail

    media, params, body = smime_parts(pki.encrypt(mail, "alice", outform="SMIME"))
    assert media in ("application/pkcs7-mime", "application/x-pkcs7-mime")
    assert smime_type(media, params) == "enveloped-data"
    assert decrypt(body, ring).content == mail


@pytest.mark.parametrize("aes256", [False, True])
def test_decrypts_cryptography_envelope_builder_output(pki: Pki, ring: KeyRing, mail: bytes, aes256: bool) -> None:
    result = decrypt(envelope_with_cryptography(mail, pki["bob"].cert, aes256=aes256), ring)
    assert (result.content, result.key_label, result.cipher) == (mail, "bob-key", f"aes{256 if aes256 else 128}_cbc")


def test_recipient_named_by_subject_key_identifier(pki: Pki, ring: KeyRing, mail: bytes) -> None:
    # RFC 5652 §6.2.1 rid [0] subjectKeyIdentifier; cryptography alone cannot parse this form.
    assert decrypt(pki.encrypt(mail, "carol", "alice", keyid=True), ring).key_label == "alice-key"


def test_several_recipients_including_key_agreement(pki: Pki, ring: KeyRing, mail: bytes) -> None:
    # An RSA recipient next to an EC (KeyAgreeRecipientInfo) one: ours is picked, the rest dropped.
    result = decrypt(pki.encrypt(mail, "erin", "carol", "bob"), ring)
    assert (result.content, result.key_label) == (mail, "bob-key")


@pytest.mark.parametrize("order", ["alice-first", "bob-first"])
def test_two_keys_the_right_one_is_picked(pki: Pki, mail: bytes, order: str) -> None:
    specs = [
        (pki.pem_file("alice", key_first=True), None, "alice-key"),
        (pki.p12_file("bob"), P12_PASSWORD, "bob-key"),
    ]
    ring = load_keys(specs if order == "alice-first" else specs[::-1])
    assert decrypt(pki.encrypt(mail, "bob"), ring).key_label == "bob-key"
    assert decrypt(pki.encrypt(mail, "alice"), ring).key_label == "alice-key"
    assert decrypt(pki.encrypt(mail, "carol", "alice"), ring).key_label == "alice-key"
    # Encrypted to both: the first configured key wins.
    assert decrypt(pki.encrypt(mail, "alice", "bob"), ring).key_label == ring.labels[0]


# ---------------------------------------------------------------- signed-data


def test_signed_then_encrypted_opaque(pki: Pki, ring: KeyRing, mail: bytes) -> None:
    signed = pki.sign_opaque(mail)  # a MIME entity: application/pkcs7-mime; smime-type=signed-data
    result = decrypt(pki.encrypt(signed, "alice"), ring)
    assert result.content == signed
    media, params, body = smime_parts(result.content)
    assert smime_type(media, params) == "signed-data"
    assert unwrap_signed_data(body) == mail


def test_unwrap_ber_signed_data(pki: Pki) -> None:
    big = mime_entity(MARKER, filler=10_000)
    ber = pki.sign_opaque(big, outform="DER", stream=True)
    assert ber[:2] == b"\x30\x80"
    assert unwrap_signed_data(ber) == big


@pytest.mark.parametrize("what", ["detached", "certs-only", "enveloped", "garbage", "empty"])
def test_unwrap_refuses_what_has_no_content(pki: Pki, mail: bytes, what: str) -> None:
    data = {
        "detached": lambda: pki.sign_detached(mail),
        "certs-only": pki.certs_only,
        "enveloped": lambda: pki.encrypt(mail, "alice"),
        "garbage": lambda: b"\x30\x03\x02\x01",
        "empty": lambda: b"",
    }[what]()
    with pytest.raises(SmimeError) as info:
        unwrap_signed_data(data)
    assert info.value.reason == "malformed"


# ---------------------------------------------------------------- classified failures


def test_not_encrypted_to_us_is_no_key_with_counts_only(pki: Pki, ring: KeyRing, mail: bytes) -> None:
    err = reason_of(pki.encrypt(mail, "carol"), ring)
    assert err.reason == "no_key"
    assert "1 key-transport" in str(err)
    assert "2 key(s)" in str(err)
    for word in PERSONAL:
        assert word not in str(err)


def test_empty_ring_is_no_key(pki: Pki, mail: bytes) -> None:
    assert reason_of(pki.encrypt(mail, "alice"), KeyRing()).reason == "no_key"


@pytest.mark.parametrize(("flag", "name"), [("-des3", "3des"), ("-aes192", "aes192_cbc")])
def test_unsupported_cbc_cipher(pki: Pki, ring: KeyRing, mail: bytes, flag: str, name: str) -> None:
    err = reason_of(pki.encrypt(mail, "alice", cipher=flag), ring)
    assert err.reason == "unsupported_cipher"
    assert name in str(err)


def test_aes_gcm_auth_enveloped_data(pki: Pki, ring: KeyRing, mail: bytes) -> None:
    data = pki.encrypt(mail, "alice", cipher="-aes-256-gcm")
    assert smime_type("application/pkcs7-mime", {}, body=data) == "authEnveloped-data"
    err = reason_of(data, ring)
    assert err.reason == "unsupported_cipher"
    assert "AuthEnvelopedData" in str(err)


def test_rsa_oaep_key_transport(pki: Pki, ring: KeyRing, mail: bytes) -> None:
    err = reason_of(pki.encrypt(mail, "alice", oaep=True), ring)
    assert err.reason == "unsupported_key_transport"
    assert "OAEP" in str(err)


def test_ec_key_agreement(pki: Pki, ring: KeyRing, mail: bytes) -> None:
    err = reason_of(pki.encrypt(mail, "erin"), ring)
    assert err.reason == "unsupported_key_transport"
    assert "1 key-agreement" in str(err)
    for word in PERSONAL:
        assert word not in str(err)


def test_signed_data_handed_to_decrypt(pki: Pki, ring: KeyRing, mail: bytes) -> None:
    assert reason_of(pki.sign_opaque(mail, outform="DER"), ring).reason == "not_enveloped"


def test_broken_padding_is_decrypt_failed(pki: Pki, ring: KeyRing, mail: bytes) -> None:
    err = reason_of(break_padding(pki.encrypt(mail, "alice"), len(mail)), ring)
    assert err.reason == "decrypt_failed"
    assert "alice-key" in str(err)


def truncations(der: bytes) -> Iterator[bytes]:
    for cut in (1, 2, 10, len(der) // 3, len(der) // 2, len(der) - 40, len(der) - 1):
        yield der[:cut]


def test_garbage_and_truncated_input_is_malformed(pki: Pki, ring: KeyRing, mail: bytes) -> None:
    der = pki.encrypt(mail, "alice")
    ber = pki.encrypt(mail, "alice", stream=True)
    inputs = [b"", b"\x00", b"\xff" * 64, b"not CMS at all", base64.b64encode(der), mail, *truncations(der)]
    inputs += list(truncations(ber))
    for data in inputs:
        err = reason_of(data, ring)
        assert err.reason == "malformed", (len(data), err.reason, str(err))


# ---------------------------------------------------------------- nothing leaks


def _texts(err: BaseException) -> list[str]:
    out = ["".join(traceback.format_exception(err))]
    seen: BaseException | None = err
    while seen is not None:
        out += [str(seen), repr(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return out


def test_no_content_in_messages_logs_or_reprs(
    pki: Pki, ring: KeyRing, mail: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    der = pki.encrypt(mail, "alice")
    signed_ber = pki.sign_opaque(mail, outform="DER", stream=True)
    decrypted = decrypt(der, ring)
    attempts = [
        lambda: decrypt(break_padding(der, len(mail)), ring),
        lambda: decrypt(mail, ring),
        lambda: decrypt(base64.b64encode(mail), ring),
        lambda: decrypt(pki.encrypt(mail, "alice", outform="SMIME"), ring),
        lambda: decrypt(der[: len(der) - 20], ring),
        lambda: decrypt(pki.encrypt(mail, "carol"), ring),
        lambda: decrypt(pki.encrypt(mail, "alice", cipher="-des3"), ring),
        lambda: decrypt(signed_ber, ring),
        lambda: unwrap_signed_data(decrypted.content),
        lambda: unwrap_signed_data(signed_ber[: len(signed_ber) // 2]),
        lambda: unwrap_signed_data(mail),
    ]
    for attempt in attempts:
        with pytest.raises(SmimeError) as info:
            attempt()
        err = info.value
        # Raised outside the handler: no chained library exception keeps input or plaintext alive.
        assert err.__cause__ is None
        assert err.__context__ is None
        assert_no_leak(MARKER, *_texts(err))
    assert MARKER in decrypted.content.decode()
    assert_no_leak(MARKER, repr(decrypted), caplog.text)


# ---------------------------------------------------------------- smime_type


@pytest.mark.parametrize(
    ("content_type", "params", "expected"),
    [
        ("application/pkcs7-mime", {"smime-type": "enveloped-data"}, "enveloped-data"),
        ("application/x-pkcs7-mime", {"smime-type": "enveloped-data"}, "enveloped-data"),
        ("Application/PKCS7-MIME", {"SMIME-Type": "Signed-Data"}, "signed-data"),
        ("application/pkcs7-mime", {"smime-type": "authEnveloped-data"}, "authEnveloped-data"),
        ("application/pkcs7-mime", {"smime-type": "certs-only"}, "certs-only"),
        ("application/pkcs7-mime", {"smime-type": "compressed-data"}, "compressed-data"),
        ("application/pkcs7-mime", {"name": "smime.p7m"}, None),  # nothing to sniff
        ("application/pkcs7-mime", {"smime-type": "no-such-type"}, None),
        ("multipart/signed", {"protocol": "application/pkcs7-signature"}, None),
        ("application/pkcs7-signature", {}, None),
        ("text/plain", {"smime-type": "enveloped-data"}, None),
    ],
)
def test_smime_type_from_parameters(content_type: str, params: dict[str, str], expected: str | None) -> None:
    assert smime_type(content_type, params) == expected


def test_smime_type_sniffs_the_cms_content_type(pki: Pki, mail: bytes) -> None:
    enveloped = pki.encrypt(mail, "alice")
    signed = pki.sign_opaque(mail, outform="DER")
    assert smime_type("application/pkcs7-mime", {}, body=enveloped) == "enveloped-data"
    ber = pki.encrypt(mail, "bob", stream=True)
    assert smime_type("application/x-pkcs7-mime", {"name": "smime.p7m"}, body=ber) == "enveloped-data"
    assert smime_type("application/pkcs7-mime", {}, body=signed) == "signed-data"
    assert smime_type("application/pkcs7-mime", {}, body=pki.certs_only()) == "certs-only"
    assert smime_type("application/octet-stream", {"name": "SMIME.P7M"}, body=enveloped) == "enveloped-data"
    assert smime_type("application/octet-stream", {"name": "report.pdf"}, body=enveloped) is None
    assert smime_type("application/pkcs7-mime", {}, body=b"garbage") is None
    # The parameter, when known, wins over the content.
    assert smime_type("application/pkcs7-mime", {"smime-type": "signed-data"}, body=enveloped) == "signed-data"


# ---------------------------------------------------------------- key loading


def test_pem_and_pkcs12_with_passwords(pki: Pki, mail: bytes) -> None:
    ring = load_keys(
        [
            (pki.pem_file("alice", key_first=True, password=PEM_PASSWORD, extra_certs=True), PEM_PASSWORD, "pem"),
            (pki.p12_file("bob"), P12_PASSWORD, "p12"),
        ]
    )
    assert ring.labels == ("pem", "p12")
    assert len(ring) == 2
    assert repr(ring) == "KeyRing(labels=['pem', 'p12'])"
    assert decrypt(pki.encrypt(mail, "alice"), ring).key_label == "pem"
    assert decrypt(pki.encrypt(mail, "bob"), ring).key_label == "p12"


def test_pkcs12_without_password(pki: Pki, mail: bytes) -> None:
    ring = load_keys([(pki.p12_file("alice", password=None), None, "plain")])
    assert decrypt(pki.encrypt(mail, "alice"), ring).key_label == "plain"


def config_error(spec: tuple[Path, str | None, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_keys([spec])
    text = str(info.value)
    assert str(spec[0]) in text, "the message must name the file"
    if spec[1]:
        assert spec[1] not in text, "the message must not contain the password"
    assert info.value.__cause__ is None
    return text


def test_pkcs12_wrong_or_missing_password(pki: Pki) -> None:
    p12 = pki.p12_file("alice")
    assert "wrong password" in config_error((p12, "Wrong-Pass-phrase", "k"))
    assert "none is configured" in config_error((p12, None, "k"))


def test_pem_wrong_or_missing_password(pki: Pki) -> None:
    pem = pki.pem_file("alice", key_first=True, password=PEM_PASSWORD)
    assert "wrong password" in config_error((pem, "Wrong-Pass-phrase", "k"))
    assert "configure its password" in config_error((pem, None, "k"))
    plain = pki.pem_file("alice", key_first=True)
    assert "remove the password" in config_error((plain, "Needless-Pass-phrase", "k"))


def test_key_file_errors(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    assert "cannot read" in config_error((missing, None, "k"))
    assert "no certificate" in config_error((pki["alice"].key_path, None, "k"))
    assert "no private key" in config_error((pki["alice"].cert_path, None, "k"))
    assert "belongs to its private key" in config_error((pki.mismatched_pem("alice", "bob"), None, "k"))
    assert "RSA keys only" in config_error((pki.pem_file("erin", key_first=True), None, "k"))
    assert "RSA keys only" in config_error((pki.p12_file("erin"), P12_PASSWORD, "k"))
    garbage = tmp_path / "garbage.p12"
    garbage.write_bytes(b"\x30\x82\x00\x10 not pkcs12")
    assert "PKCS#12" in config_error((garbage, "Some-Pass-phrase", "k"))
    two_keys = tmp_path / "two.pem"
    two_keys.write_bytes(pki["alice"].key_path.read_bytes() + pki["bob"].key_path.read_bytes())
    assert "2 private keys" in config_error((two_keys, None, "k"))


def test_labels_must_be_unique_and_non_empty(pki: Pki) -> None:
    pem = pki.pem_file("alice", key_first=True)
    with pytest.raises(ConfigError, match="used twice"):
        load_keys([(pem, None, "same"), (pki.pem_file("bob", key_first=True), None, "same")])
    with pytest.raises(ConfigError, match="label is empty"):
        load_keys([(pem, None, " ")])
