"""`pop3-kafka ledger show` against the real broker and Dovecot: the on-call answer to "where did
this mail go" (issue 7): topic, partition, offset, when, and whether it was deleted."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import run_cli
from support.configs import mailbox, write_config
from support.kafkautil import consume_all
from support.mailgen import make_mail

pytestmark = pytest.mark.integration


def test_ledger_show_follows_a_mail_to_its_offset_and_deletion(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t20")
    raw, _ = make_mail(1, seed=77)
    services.dovecot.put("t20", raw)
    ledger = {"topic": f"{topic}.ledger", "shards": 2}
    box = mailbox("show", "t20", services.dovecot.pop3s_port, services.cafile)
    cfg = write_config(tmp_path / "c.yaml", services.bootstrap, topic, [box], ledger=ledger)
    env = {"PW_SHOW": "t20-pw"}
    proc = run_cli("poll-once", "--config", str(cfg), env=env)
    assert proc.returncode == 0 and "show: ok: 1 published" in proc.stdout, proc.stderr[-2000:]
    [mail] = consume_all(services.bootstrap, topic, expect=1)
    uidl = mail.record["provenance"]["uidl"]

    shown = run_cli("ledger", "show", "--config", str(cfg), "--mailbox", "show", "--uidl", uidl, env=env)
    assert shown.returncode == 0, shown.stderr[-2000:]
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"show:{uidl} (ledger {topic}.ledger[")
    assert f"delivered     -> {topic}[{mail.partition}]@{mail.offset}" in shown.stdout
    # poll-once wrote the tombstone at shutdown: the mail is gone from the server
    assert "deleted from the server (tombstone" in lines[-1], shown.stdout

    missing = run_cli("ledger", "show", "--config", str(cfg), "--mailbox", "show", "--uidl", "no-such", env=env)
    assert missing.returncode == 1 and "no ledger entry" in missing.stdout
    unknown = run_cli("ledger", "show", "--config", str(cfg), "--mailbox", "nope", "--uidl", uidl, env=env)
    assert unknown.returncode != 0 and "nope" in unknown.stderr


def test_ledger_show_in_keep_mode_says_the_mail_is_still_there(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t20")
    raw, _ = make_mail(2, seed=78)
    services.dovecot.put("t20", raw)
    box = mailbox("keep", "t20", services.dovecot.pop3s_port, services.cafile, delete=False)
    cfg = write_config(tmp_path / "c.yaml", services.bootstrap, topic, [box], ledger={"topic": f"{topic}.ledger"})
    env = {"PW_KEEP": "t20-pw"}
    assert run_cli("poll-once", "--config", str(cfg), env=env).returncode == 0
    [mail] = consume_all(services.bootstrap, topic, expect=1)
    uidl = mail.record["provenance"]["uidl"]
    shown = run_cli("ledger", "show", "--config", str(cfg), "--mailbox", "keep", "--uidl", uidl, env=env)
    assert shown.returncode == 0 and "still on the server" in shown.stdout, shown.stdout
    assert services.dovecot.count("t20") == 1
    services.dovecot.clear("t20")
