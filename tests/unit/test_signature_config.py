"""mailboxes[].smime.verify and smime.require_valid_signature: parsing, file checks, the
combinations that cannot work; the signature-checks metric."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from support.smimesign import crlf, head, make_sign_pki, text_entity

from connector.config import parse_config
from connector.decoding.options import DecodeOptions
from connector.decoding.signature import TrustStore, load_trust_store
from connector.errors import ConfigError
from connector.observability import metrics
from connector.records import mail_schema
from connector.runtime.cycle import encode_mail


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-subj", "/CN=Config Test Root", "-days", "2"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return d / "ca.pem"


def options(base: Path, smime: dict[str, Any], **extra: Any) -> DecodeOptions:
    cfg = parse_config(
        {
            "kafka": {"bootstrap_servers": "k:9092"},
            "topics": {"mail": "m"},
            "mailboxes": [
                {"id": "a", "host": "pop.test", "username": "u", "password": {"env": "PW"}, "smime": smime, **extra}
            ],
        },
        environ={"PW": "pw"},
        base=base,
    )
    return cfg.mailboxes[0].decode


def test_verify_loads_the_trust_store_relative_to_the_config(ca: Path) -> None:
    opts = options(ca.parent, {"verify": {"trust_store": ["ca.pem"]}, "require_valid_signature": True})
    assert isinstance(opts.trust, TrustStore)
    assert len(opts.trust.roots) == 1 and opts.trust.intermediates == () and opts.trust.allow_sha1 is False
    assert opts.trust.roots[0].subject.native["common_name"] == "Config Test Root"
    assert opts.require_valid_signature is True


def test_without_verify_there_is_no_trust_store_and_nothing_is_required(ca: Path) -> None:
    opts = options(ca.parent, {"mode": "decrypt"})
    assert opts.trust is None and opts.require_valid_signature is False


def test_a_missing_trust_store_file_names_the_key(ca: Path) -> None:
    with pytest.raises(ConfigError, match=r"mailboxes\[0\]\.smime\.verify\.trust_store\[0\]: .*nope\.pem"):
        options(ca.parent, {"verify": {"trust_store": ["nope.pem"]}})


def test_an_empty_trust_store_is_refused(ca: Path) -> None:
    with pytest.raises(ConfigError, match=r"smime\.verify\.trust_store: empty"):
        options(ca.parent, {"verify": {"trust_store": []}})


def test_a_file_without_certificates_is_refused(ca: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=r"smime\.verify: .*junk\.pem.*cannot be parsed"):
        options(tmp_path, {"verify": {"trust_store": ["junk.pem"]}})
    (tmp_path / "empty.pem").write_bytes(b"no pem here, and not DER either")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_trust_store([tmp_path / "empty.pem"])


def test_a_der_root_and_a_pem_bundle_both_load(ca: Path, tmp_path: Path) -> None:
    der = subprocess.run(
        ["openssl", "x509", "-in", str(ca), "-outform", "DER"], check=True, capture_output=True, timeout=30
    ).stdout
    (tmp_path / "ca.der").write_bytes(der)
    (tmp_path / "bundle.pem").write_bytes(ca.read_bytes() * 2)
    store = load_trust_store([tmp_path / "ca.der"], [tmp_path / "bundle.pem"], allow_sha1=True)
    assert len(store.roots) == 1 and len(store.intermediates) == 2 and store.allow_sha1
    assert repr(store) == "TrustStore(roots=1, intermediates=2)"


def test_require_valid_signature_without_a_trust_store_is_refused(ca: Path) -> None:
    with pytest.raises(ConfigError, match=r"require_valid_signature: needs smime\.verify\.trust_store"):
        options(ca.parent, {"require_valid_signature": True})


@pytest.mark.parametrize(
    ("smime", "extra", "message"),
    [
        ({"mode": "passthrough", "verify": {"trust_store": ["ca.pem"]}}, {}, r"smime\.verify: passthrough"),
        ({"mode": "passthrough", "require_valid_signature": True}, {}, r"require_valid_signature: needs the mail"),
        (
            {"require_valid_signature": True, "verify": {"trust_store": ["ca.pem"]}},
            {"mime_decoding": False},
            r"require_valid_signature: needs the mail",
        ),
    ],
)
def test_combinations_that_cannot_check_signatures_are_refused(
    ca: Path, smime: dict[str, Any], extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        options(ca.parent, smime, **extra)


# ---------------------------------------------------------------- the signature-checks metric


def test_encode_mail_counts_each_signature_layer_by_verdict(tmp_path_factory: pytest.TempPathFactory) -> None:
    pki = make_sign_pki(tmp_path_factory.mktemp("sigmetric"))
    cfg = parse_config(
        {
            "kafka": {"bootstrap_servers": "k:9092"},
            "topics": {"mail": "m"},
            "mailboxes": [
                {"id": "sigm", "host": "pop.test", "username": "u", "password": {"env": "PW"},
                 "smime": {"verify": {"trust_store": [str(pki.root)], "intermediates": [str(pki.intermediate)]}}},
            ],
        },
        environ={"PW": "pw"},
        base=pki.dir,
    )  # fmt: skip
    mailbox = cfg.mailboxes[0]
    good = head("ok", "m1") + crlf(pki.sign(text_entity("one"), "rsa"))
    tampered = good.replace(b"Signed text one.", b"Signed text 0ne.")
    assert tampered != good

    def count(verdict: str, reason: str) -> float:
        return metrics.value(
            "pop3kafka_signature_checks_total", {"mailbox": "sigm", "verdict": verdict, "reason": reason}
        )

    before_ok, before_bad = count("valid", "none"), count("invalid", "tampered")
    encode_mail(mailbox, "u1", good, 0, mail_schema())
    encode_mail(mailbox, "u2", tampered, 0, mail_schema())
    encode_mail(mailbox, "u3", head("plain", "m3") + text_entity("x"), 0, mail_schema())  # unsigned: no count
    assert (count("valid", "none") - before_ok, count("invalid", "tampered") - before_bad) == (1.0, 1.0)
    metrics.forget_mailboxes(["sigm"])
    assert count("valid", "none") == 0.0
