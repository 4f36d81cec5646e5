"""The decoding issue end to end on the real broker and Dovecot: one mailbox holding good mail,
S/MIME mail encrypted to our key, S/MIME mail we cannot decrypt, mail whose decrypted content
breaks a limit, and plain broken mail. Exactly-once mode; afterwards the records and dead
letters are as expected, the mailbox is empty, and the secret marker of the mail that failed
after decryption appears nowhere: not in any topic (read back as consumers would), not in the
logs (debug level, JSON), not on stdout/stderr, not in the spool directory."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest
from support.cli import run_cli
from support.configs import mailbox, write_config
from support.kafkautil import all_values, consume_all
from support.leaks import assert_no_leak
from support.mailgen import make_mail
from support.smime import make_pki

from connector.records.dead_letter import decode_dead_letter

pytestmark = pytest.mark.integration

USER = "t16"
HEAD = "From: Sender <s@x.org>\r\nTo: t16@example.com\r\nSubject: {subject}\r\nMessage-ID: <{mid}@x.org>\r\n"


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def encrypted(pki, subject: str, mid: str, inner: bytes, recipient: str = "alice") -> bytes:  # type: ignore[no-untyped-def]
    entity = crlf(pki.encrypt(inner, recipient, outform="SMIME"))
    return HEAD.format(subject=subject, mid=mid).encode() + entity


def nested(depth: int, text: bytes) -> bytes:
    opening = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth))
    return opening + b"Content-Type: text/plain\r\n\r\n" + text + b"\r\n"


def test_good_encrypted_and_broken_mail(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    key_file = pki.pem_file("alice", key_first=True)
    secret = f"SECRET{uuid.uuid4().hex}"
    services.dovecot.clear(USER)
    put: dict[str, bytes] = {}

    def deliver(name: str, raw: bytes) -> None:
        services.dovecot.put(USER, raw)
        put[name] = crlf(raw)

    for i in range(3):
        deliver(f"good{i}", make_mail(i, seed=16)[0])
    inner = b"Content-Type: text/plain; charset=utf-8\r\n\r\nFor our eyes: decrypted fine.\r\n"
    deliver("enc-ok", encrypted(pki, "for us", "encok", inner))
    deliver("enc-not-ours", encrypted(pki, "for carol", "encnot", inner, recipient="carol"))
    deliver(
        "enc-3des",
        crlf(
            HEAD.format(subject="3des", mid="enc3").encode()
            + crlf(pki.encrypt(inner, "alice", cipher="-des3", outform="SMIME"))
        ),
    )
    deliver("enc-too-deep", encrypted(pki, "deep inside", "encdeep", nested(40, secret.encode())))
    deliver("broken", b"Subject: broken\r\nMessage-ID: <broken@x.org>\r\n" + nested(40, b"plain but too deep"))

    spool = tmp_path / "spool"
    spool.mkdir()
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox(
                "smime",
                USER,
                services.dovecot.pop3s_port,
                services.cafile,
                smime={"keys": [{"file": str(key_file), "label": "alice"}]},
            )
        ],
        runtime={"spool_threshold_bytes": 0, "spool_directory": str(spool)},
        delivery={"transactional_id_prefix": f"e2e-{topic}"},
        ledger={"topic": f"{topic}.ledger"},
    )
    proc = run_cli(
        "--log-level", "debug", "--log-format", "json", "poll-once", "--config", str(cfg),
        env={"PW_SMIME": f"{USER}-pw"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "smime: ok: 4 published, 4 dead-lettered, 8 deleted of 8 listed" in proc.stdout, proc.stdout

    records = {c.record["message_id"]: c.record for c in consume_all(services.bootstrap, topic, expect=4)}
    assert len(records) == 4
    ok = records["<encok@x.org>"]
    assert ok["text_body"] == "For our eyes: decrypted fine.\r\n"
    assert ok["smime"]["decrypted"] and ok["smime"]["key"] == "alice" and ok["smime"]["cipher"] == "aes256_cbc"

    dead = {
        c.record["provenance"]["raw_sha256"]: c.record
        for c in consume_all(services.bootstrap, f"{topic}.dlq", expect=4, decode=decode_dead_letter)
    }
    assert len(dead) == 4
    expected = {
        "enc-not-ours": "no_key",
        "enc-3des": "unsupported_cipher",
        "enc-too-deep": "max_depth",
        "broken": "max_depth",
    }
    for name, reason in expected.items():
        raw = put[name]
        d = dead[hashlib.sha256(raw).hexdigest()]
        assert d["reason"] == reason, name
        assert d["raw"] == raw, f"{name}: the dead letter holds the original bytes"
    assert services.dovecot.count(USER) == 0

    # The secret of the mail that failed after decryption: nowhere.
    haystacks = [proc.stdout.encode(), proc.stderr.encode()]
    for t in (topic, f"{topic}.dlq", f"{topic}.ledger"):
        haystacks += all_values(services.bootstrap, t)
    haystacks.append(json.dumps(list(records.values()), default=str).encode())
    haystacks += [p.read_bytes() for p in spool.rglob("*") if p.is_file()]
    assert list(spool.iterdir()) == []
    assert_no_leak(secret, *haystacks)
