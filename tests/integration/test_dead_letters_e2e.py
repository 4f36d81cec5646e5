"""Dead letters against the real broker and the real Dovecot, in both delivery modes.

Mail that today's decoder refuses (40 nested multiparts: over decode_mail's max_depth of 32)
goes to the dead-letter topic with its original bytes and is then deleted from the server; a
mailbox with ``on_undecodable: leave`` keeps it. Dovecot users t15..t18 belong to this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
from support.badmail import nested_mail
from support.configs import mailbox, write_config
from support.kafkautil import Consumed, consume_all
from support.mailgen import make_mail
from test_end_to_end import cli, server_uidls

from connector.records.dead_letter import decode_dead_letter
from connector.records.ledger import LedgerEntry

pytestmark = pytest.mark.integration

MARKER = "BODY-MARKER-DO-NOT-LOG"


def fill(services: Any, user: str, good: int, bad: int, seed: int) -> tuple[set[str], dict[str, bytes]]:
    """``good`` decodable mails and ``bad`` undecodable ones, interleaved; returns the good
    Message-IDs and the bad mails by Message-ID."""
    services.dovecot.clear(user)
    ids: set[str] = set()
    bads: dict[str, bytes] = {}
    for i in range(max(good, bad)):
        if i < good:
            raw, exp = make_mail(i, seed=seed)
            services.dovecot.put(user, raw)
            ids.add(exp.message_id)
        if i < bad:
            raw = nested_mail(seed * 100 + i)
            services.dovecot.put(user, raw)
            bads[f"<nested-{seed * 100 + i}@test>"] = raw
    return ids, bads


def message_id(raw: bytes) -> str:
    for line in raw.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError("no Message-ID")


def check_dead_letters(got: list[Consumed], bads: dict[str, bytes], mailbox_id: str) -> None:
    """Each bad mail once, byte for byte as it was put on the server (CRLF), with its headers."""
    assert len(got) == len(bads), [c.record["record_id"] for c in got]
    by_mid = {message_id(c.record["raw"]): c for c in got}
    assert set(by_mid) == set(bads)
    for mid, raw in bads.items():
        c = by_mid[mid]
        r = c.record
        assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
        assert r["raw"] == raw
        assert r["provenance"]["raw_size"] == len(raw)
        assert r["provenance"]["raw_sha256"] == hashlib.sha256(raw).hexdigest()
        assert r["record_id"] == f"{mailbox_id}:{r['provenance']['uidl']}"
        assert (r["stage"], r["reason"]) == ("limits", "max_depth")
        assert r["error_class"] == "connector.errors.MailTooLargeError"
        assert c.key == mailbox_id.encode()
        assert c.headers["pop3kafka.record_id"] == r["record_id"].encode()
        assert c.headers["pop3kafka.mailbox_id"] == mailbox_id.encode()
        assert c.headers["pop3kafka.errors.stage"] == b"limits"
        assert c.headers["pop3kafka.errors.reason"] == b"max_depth"
        assert c.headers["pop3kafka.errors.exception.class.name"] == b"connector.errors.MailTooLargeError"
        assert c.headers["pop3kafka.errors.exception.message"] == r["error_message"].encode()


def dead_letter_logs(stderr: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in stderr.splitlines() if x.startswith("{")]
    return [x for x in lines if x["level"] == "error" and "could not be decoded" in x["msg"]]


def ledger_entries(bootstrap: str, topic: str, expect: int) -> list[dict[str, Any]]:
    def decode(value: bytes | None) -> dict[str, Any]:
        return {} if value is None else dataclasses.asdict(LedgerEntry.decode(value))

    return [c.record for c in consume_all(bootstrap, topic, expect=expect, decode=decode) if c.record]


def retention_ms(bootstrap: str, topic: str) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    res = ConfigResource(ResourceType.TOPIC, topic)
    return str(admin.describe_configs([res])[res].result(timeout=15)["retention.ms"].value)


def test_exactly_once_dead_letters_commit_and_delete_and_leave_keeps(services, topic: str, tmp_path: Path) -> None:
    good_ids, bads = fill(services, "t15", good=3, bad=2, seed=15)
    leave_ids, leave_bads = fill(services, "t16", good=1, bad=1, seed=16)
    ledger = f"{topic}.ledger"
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox("dlq-eos", "t15", services.dovecot.pop3s_port, services.cafile),
            mailbox("dlq-leave", "t16", services.dovecot.pop3s_port, services.cafile, on_undecodable="leave"),
        ],
        ledger={"topic": ledger, "shards": 1},
    )
    env = {"PW_DLQ_EOS": "t15-pw", "PW_DLQ_LEAVE": "t16-pw"}
    proc = cli("poll-once", "--config", str(cfg), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "dlq-eos: ok: 3 published, 2 dead-lettered, 5 deleted of 5 listed" in proc.stdout
    assert "dlq-leave: ok: 1 published, 1 deleted of 2 listed, 1 undecodable left on server" in proc.stdout

    dlq = f"{topic}.dlq"
    check_dead_letters(consume_all(services.bootstrap, dlq, expect=2, decode=decode_dead_letter), bads, "dlq-eos")
    mail = consume_all(services.bootstrap, topic, expect=4)
    assert sorted(c.record["message_id"] for c in mail) == sorted(good_ids | leave_ids)
    assert server_uidls(services, "t15") == []
    (left,) = server_uidls(services, "t16")
    assert retention_ms(services.bootstrap, dlq) == "-1"  # created by the connector to keep dead letters

    # The ledger: one entry per dead letter, in the same transactions, naming the dead-letter topic.
    entries = [e for e in ledger_entries(services.bootstrap, ledger, expect=6) if e["state"] == "dead_lettered"]
    assert len(entries) == 2 and {e["mailbox_id"] for e in entries} == {"dlq-eos"}
    assert {e["topic"] for e in entries} == {dlq}
    assert {e["raw_sha256"] for e in entries} == {hashlib.sha256(r).hexdigest() for r in bads.values()}

    # One ERROR line per undecodable mail (2 dead letters + 1 left), with UIDL and codes, no body.
    logs = dead_letter_logs(proc.stderr)
    assert len(logs) == 3, logs
    assert all(x.get("uidl") and "stage=limits reason=max_depth error=MailTooLargeError" in x["msg"] for x in logs)
    assert [x["mailbox"] for x in logs].count("dlq-eos") == 2
    assert MARKER not in proc.stdout + proc.stderr

    # Next cycle: nothing is dead-lettered twice; the left mail is tried (and left) again.
    again = cli("poll-once", "--config", str(cfg), env=env)
    assert again.returncode == 0, again.stderr
    assert "dlq-eos: ok: 0 published, 0 deleted of 0 listed" in again.stdout
    assert "dlq-leave: ok: 0 published, 0 deleted of 1 listed, 1 undecodable left on server" in again.stdout
    assert len(consume_all(services.bootstrap, dlq, expect=2, decode=decode_dead_letter)) == 2
    assert server_uidls(services, "t16") == [left]
    assert len(leave_bads) == 1  # the mail left there is the undecodable one (its good one is in Kafka)


def test_at_least_once_dead_letters_then_deletes_and_leave_keeps(services, topic: str, tmp_path: Path) -> None:
    good_ids, bads = fill(services, "t17", good=2, bad=1, seed=17)
    fill(services, "t18", good=0, bad=1, seed=18)
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox("dlq-alo", "t17", services.dovecot.pop3s_port, services.cafile),
            mailbox("dlq-alo-leave", "t18", services.dovecot.pop3s_port, services.cafile, on_undecodable="leave"),
        ],
        delivery={"mode": "at_least_once"},
        topics={"dead_letter": f"{topic}.undecodable"},
    )
    proc = cli("poll-once", "--config", str(cfg), env={"PW_DLQ_ALO": "t17-pw", "PW_DLQ_ALO_LEAVE": "t18-pw"})
    assert proc.returncode == 0, proc.stderr
    assert "dlq-alo: ok: 2 published, 1 dead-lettered, 3 deleted of 3 listed" in proc.stdout
    assert "dlq-alo-leave: ok: 0 published, 0 deleted of 1 listed, 1 undecodable left on server" in proc.stdout
    got = consume_all(services.bootstrap, f"{topic}.undecodable", expect=1, decode=decode_dead_letter)
    check_dead_letters(got, bads, "dlq-alo")
    assert sorted(c.record["message_id"] for c in consume_all(services.bootstrap, topic, expect=2)) == sorted(good_ids)
    assert server_uidls(services, "t17") == []
    assert len(server_uidls(services, "t18")) == 1
    assert MARKER not in proc.stdout + proc.stderr
