"""Spooled retrieval and the line-length limit against the real Dovecot and Kafka.

t13: the whole path with every mail spooled (threshold 0), one mail dead-lettered for a long line;
t14: one 8 MB mail received into a spool file over POP3S, byte-exact and hashed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from support.cli import run_cli
from support.configs import mailbox, write_config
from support.kafkautil import consume_all
from support.mailgen import make_mail

from connector.protocol import Pop3Session, SpoolPolicy, make_tls_context
from connector.records.dead_letter import decode_dead_letter

pytestmark = pytest.mark.integration


def crlf(raw: bytes) -> bytes:
    """What a POP3 server sends for a maildir file: CRLF line endings (RFC 1939 §3)."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_spooled_mail_reaches_kafka_and_a_long_line_stays_on_the_server(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t13")
    sent: dict[str, bytes] = {}
    for i in range(20):
        raw, exp = make_mail(i, seed=13)
        services.dovecot.put("t13", raw)
        sent[exp.message_id] = crlf(raw)
    wide = b"Subject: wide\nMessage-ID: <wide@example.com>\n\n" + b"w" * 200_000 + b"\n"
    services.dovecot.put("t13", wide)
    spool = tmp_path / "spool"
    spool.mkdir()
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("spool", "t13", services.dovecot.pop3s_port, services.cafile, max_line_bytes=100_000)],
        runtime={"spool_threshold_bytes": 0, "spool_directory": str(spool)},
    )
    proc = run_cli("poll-once", "--config", str(cfg), env={"PW_SPOOL": "t13-pw"})
    assert proc.returncode == 0, proc.stderr
    # The wide mail is a dead letter (reason max_line_bytes) holding it as received.
    assert "spool: ok: 20 published, 1 dead-lettered, 21 deleted of 21 listed" in proc.stdout, proc.stdout
    assert "exceeds max_line_bytes (100000)" in proc.stderr
    got = consume_all(services.bootstrap, topic, expect=20)
    assert len(got) == 20
    for c in got:
        raw = sent[c.record["message_id"]]
        assert c.record["provenance"]["raw_size"] == len(raw)
        assert c.record["provenance"]["raw_sha256"] == hashlib.sha256(raw).hexdigest()
    [dead] = consume_all(services.bootstrap, f"{topic}.dlq", expect=1, decode=decode_dead_letter)
    assert dead.record["reason"] == "max_line_bytes" and dead.record["raw"] == crlf(wide)
    assert services.dovecot.count("t13") == 0
    assert list(spool.iterdir()) == []
    services.dovecot.clear("t13")


def test_an_8_mb_mail_is_spooled_byte_exact_over_pop3s(services, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t14")
    line = b"0123456789abcdefghijklmnopqrstuvwxyz.ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n"
    body = b"".join((b"." + line) if i % 7 == 0 else line for i in range(8_000_000 // len(line)))
    raw = b"Subject: big\nMessage-ID: <big@example.com>\n\n" + body
    services.dovecot.put("t14", raw)
    s = Pop3Session.connect(
        "127.0.0.1", services.dovecot.pop3s_port, tls="implicit", ssl_context=make_tls_context(services.cafile)
    )
    try:
        s.login_user_pass("t14", "t14-pw")
        [(n, mail)] = list(s.retr_many([1], spool=SpoolPolicy(1024 * 1024, str(tmp_path)), max_line=1000))
        with mail:
            assert n == 1 and mail.refused is None and mail.spooled
            assert mail.read() == crlf(raw)
            assert mail.sha256 == hashlib.sha256(crlf(raw)).hexdigest()
            assert list(tmp_path.iterdir()) == []  # anonymous file
        assert s.stat()[0] == 1
    finally:
        s.abort()
    services.dovecot.clear("t14")
