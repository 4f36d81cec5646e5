"""The whole path against the real broker and the real Dovecot (no mocks).

Each test owns one Dovecot user (t1..t12) and one fresh topic, so tests never see each
other's mail.
"""

from __future__ import annotations

import os
import poplib
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.cli import run_cli
from support.configs import mailbox, write_config
from support.kafkautil import consume_all
from support.mailgen import SHAPES, make_mail, norm_text

from connector.config import load_config
from connector.errors import DeliveryError
from connector.runtime.cycle import CycleHooks
from connector.runtime.runner import Runner

pytestmark = pytest.mark.integration


def cli(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run_cli("--log-format", "json", *args, env=env, timeout=timeout)


def server_uidls(services, user: str) -> list[str]:  # type: ignore[no-untyped-def]
    """UIDLs still on the server, asked over POP3S like any client would."""
    ctx = ssl.create_default_context(cafile=services.cafile)
    pop = poplib.POP3_SSL("127.0.0.1", services.dovecot.pop3s_port, context=ctx, timeout=30)
    try:
        pop.user(user)
        pop.pass_(f"{user}-pw")
        return [line.split()[1].decode() for line in pop.uidl()[1]]
    finally:
        pop.quit()


def put_mails(services, user: str, n: int, seed: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    services.dovecot.clear(user)
    expected = {}
    for i in range(n):
        raw, exp = make_mail(i, seed=seed)
        services.dovecot.put(user, raw)
        expected[exp.message_id] = exp
    return expected


def test_hundred_mails_of_every_shape_arrive_exactly_once(services, topic: str, tmp_path: Path) -> None:
    expected = put_mails(services, "t1", 100, seed=1)
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("e2e", "t1", services.dovecot.pop3s_port, services.cafile)],
    )
    proc = cli("poll-once", "--config", str(cfg), env={"PW_E2E": "t1-pw"})
    assert proc.returncode == 0, proc.stderr
    assert "e2e: ok: 100 published, 100 deleted of 100 listed" in proc.stdout

    got = consume_all(services.bootstrap, topic, expect=100)
    ids = [c.record["record_id"] for c in got]
    assert len(got) == 100 and len(set(ids)) == 100, f"{len(got)} records, {len(set(ids))} distinct"
    by_mid = {c.record["message_id"]: c for c in got}
    assert set(by_mid) == set(expected)
    shapes_seen = set()
    for mid, exp in expected.items():
        c = by_mid[mid]
        r = c.record
        shapes_seen.add(exp.shape)
        assert c.key == b"e2e"
        assert c.headers["pop3kafka.record_id"] == r["record_id"].encode()
        assert r["record_id"] == f"e2e:{r['provenance']['uidl']}"
        assert r["provenance"]["mailbox_id"] == "e2e"
        assert r["provenance"]["server"] == f"127.0.0.1:{services.dovecot.pop3s_port}"
        assert r["provenance"]["raw_size"] > 0 and len(r["provenance"]["raw_sha256"]) == 64
        assert r["subject"] == exp.subject, exp.shape
        assert int(r["date"].timestamp() * 1000) == exp.date_millis
        assert [(a["name"], a["address"]) for a in r["from"]] == exp.from_
        assert [(a["name"], a["address"]) for a in r["to"]] == exp.to
        assert [(a["name"], a["address"]) for a in r["cc"]] == exp.cc
        assert norm_text(r["text_body"]) == norm_text(exp.text_body), exp.shape
        assert norm_text(r["html_body"]) == norm_text(exp.html_body), exp.shape
        got_atts = [(a["filename"], a["content_type"], a["size"], a["sha256"]) for a in r["attachments"]]
        assert got_atts == [(a.filename, a.content_type, a.size, a.sha256) for a in exp.attachments], exp.shape
    assert shapes_seen == set(SHAPES)
    assert server_uidls(services, "t1") == []


def test_starttls_mailbox_with_lmtp_delivery(services, topic: str, tmp_path: Path) -> None:
    services.dovecot.clear("t6")
    expected = {}
    for i in range(5):
        raw, exp = make_mail(i, seed=6)
        services.dovecot.deliver_lmtp("t6", raw)  # through Dovecot's LMTP: real trace headers
        expected[exp.message_id] = exp
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("stls", "t6", services.dovecot.pop3_port, services.cafile, tls="starttls")],
    )
    proc = cli("poll-once", "--config", str(cfg), env={"PW_STLS": "t6-pw"})
    assert proc.returncode == 0, proc.stderr
    got = consume_all(services.bootstrap, topic, expect=5)
    assert sorted(c.record["message_id"] for c in got) == sorted(expected)
    for c in got:
        names = [h["name"] for h in c.record["headers"]]
        assert names[0] == "Return-Path" and "Delivered-To" in names and "Received" in names
        assert c.record["subject"] == expected[c.record["message_id"]].subject
    assert server_uidls(services, "t6") == []


def test_broker_stopped_during_cycle_deletes_nothing_undelivered(
    services, own_kafka, topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_mails(services, "t2", 30, seed=2)
    before = set(server_uidls(services, "t2"))
    cfg_path = write_config(
        tmp_path / "c.yaml",
        own_kafka.bootstrap,
        topic,
        [mailbox("stop", "t2", services.dovecot.pop3s_port, services.cafile)],
        kafka={"delivery_timeout_seconds": 5},
    )
    monkeypatch.setenv("PW_STOP", "t2-pw")
    cfg = load_config(cfg_path)
    from connector.delivery.admin import ensure_topic

    ensure_topic(own_kafka.bootstrap, {}, topic, create=True, partitions=1, replication_factor=1)

    retrieved: list[str] = []

    def on_retrieved(uidl: str, size: int) -> None:
        retrieved.append(uidl)
        if len(retrieved) == 3:
            own_kafka.stop()  # the broker goes away in the middle of the cycle

    runner = Runner(cfg, hooks=CycleHooks(on_retrieved=on_retrieved))
    try:
        (res,) = runner.poll_once()
    finally:
        runner.close()
    assert isinstance(res.error, DeliveryError), res.error
    assert res.error.mailbox == "stop" and res.error.step == "produce"
    assert "did not confirm" in str(res.error)
    left = set(server_uidls(services, "t2"))
    assert len(left) == 30 - res.deleted and len(left) > 0
    deleted = before - left

    own_kafka.start()
    runner = Runner(cfg)
    try:
        (res2,) = runner.poll_once()
    finally:
        runner.close()
    assert res2.ok, res2.error
    got = consume_all(own_kafka.bootstrap, topic, expect=30)
    uidls = [c.record["provenance"]["uidl"] for c in got]
    assert sorted(uidls) == sorted(before), "every mail exactly once after the restart"
    assert deleted <= set(uidls)
    assert server_uidls(services, "t2") == []


def test_wrong_password_fails_that_mailbox_only(services, topic: str, tmp_path: Path) -> None:
    put_mails(services, "t3", 3, seed=3)
    good = put_mails(services, "t4", 4, seed=4)
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox("badpw", "t3", services.dovecot.pop3s_port, services.cafile),
            mailbox("goodpw", "t4", services.dovecot.pop3s_port, services.cafile),
        ],
    )
    proc = cli("poll-once", "--config", str(cfg), env={"PW_BADPW": "not-the-password", "PW_GOODPW": "t4-pw"})
    assert proc.returncode == 1
    assert "badpw: FAILED" in proc.stderr and "Pop3AuthError" in proc.stderr and "step login" in proc.stderr
    assert "not-the-password" not in proc.stderr + proc.stdout
    assert "goodpw: ok: 4 published, 4 deleted" in proc.stdout
    got = consume_all(services.bootstrap, topic, expect=4)
    assert sorted(c.record["message_id"] for c in got) == sorted(good)
    assert len(server_uidls(services, "t3")) == 3


def test_sigterm_during_run_exits_zero_and_loses_nothing(services, topic: str, tmp_path: Path) -> None:
    n = 600
    put_mails(services, "t5", n, seed=5)
    before = set(server_uidls(services, "t5"))
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox(
                "sig",
                "t5",
                services.dovecot.pop3s_port,
                services.cafile,
                max_messages_per_cycle=n,
                poll_interval_seconds=3600,
            )
        ],
    )
    env = {**os.environ, "PW_SIG": "t5-pw"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "connector.cli.main",
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "run",
            "--config",
            str(cfg),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # SIGTERM once the cycle has retrieved 20 of its 600 mails: it is then mid-way.
        seen, head = 0, []
        assert proc.stderr is not None
        for line in proc.stderr:
            head.append(line)
            if '"msg": "retrieved' in line:
                seen += 1
                if seen == 20:
                    break
        assert seen == 20, "".join(head[-20:])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped cleanly" in err
    left = set(server_uidls(services, "t5"))
    assert left, "the cycle finished before SIGTERM; the test did not interrupt it"
    got = consume_all(services.bootstrap, topic, expect=n - len(left), timeout=30)
    in_kafka = [c.record["provenance"]["uidl"] for c in got]
    assert len(in_kafka) == len(set(in_kafka)), "no duplicates"
    assert before - left == set(in_kafka), "deleted exactly the mails Kafka confirmed"

    # The rest arrives with the next poll, once.
    done = cli("poll-once", "--config", str(cfg), env={"PW_SIG": "t5-pw"})
    assert done.returncode == 0, done.stderr
    got = consume_all(services.bootstrap, topic, expect=n, timeout=60)
    uidls = [c.record["provenance"]["uidl"] for c in got]
    assert sorted(uidls) == sorted(before)
    assert server_uidls(services, "t5") == []


def test_tail_prints_decoded_records(services, topic: str, tmp_path: Path) -> None:
    put_mails(services, "t7", 3, seed=7)
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("tail", "t7", services.dovecot.pop3s_port, services.cafile)],
    )
    assert cli("poll-once", "--config", str(cfg), env={"PW_TAIL": "t7-pw"}).returncode == 0
    start = time.monotonic()
    proc = cli(
        "tail", "--config", str(cfg), "--from-beginning", "--max", "3", "--idle-timeout", "20", env={"PW_TAIL": "t7-pw"}
    )
    assert proc.returncode == 0, proc.stderr
    import json

    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(lines) == 3 and time.monotonic() - start < 60
    subjects = sorted(x["record"]["subject"] for x in lines)
    assert subjects == sorted(make_mail(i, seed=7)[1].subject for i in range(3))
    assert all(x["record"]["record_id"].startswith("tail:") for x in lines)
    assert all(x["record"]["text_body"].startswith("<") for x in lines)  # bodies elided by default

    summary = cli(
        "tail",
        "--config",
        str(cfg),
        "--from-beginning",
        "--max",
        "3",
        "--idle-timeout",
        "20",
        "--format",
        "summary",
        env={"PW_TAIL": "t7-pw"},
    )
    rows = summary.stdout.splitlines()
    assert summary.returncode == 0 and len(rows) == 3
    assert all(" tail:" in r and "from sender" in r for r in rows)


def test_unreachable_pop3_server_names_mailbox_and_step(services, topic: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    good = put_mails(services, "t8", 2, seed=8)
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox("gone", "t8", port, services.cafile, timeout_seconds=2),
            mailbox("here", "t8", services.dovecot.pop3s_port, services.cafile),
        ],
    )
    proc = cli("poll-once", "--config", str(cfg), env={"PW_GONE": "x", "PW_HERE": "t8-pw"})
    assert proc.returncode == 1
    assert "gone: FAILED: [mailbox 'gone', step connect] Pop3ConnectError" in proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr
    assert "here: ok: 2 published, 2 deleted" in proc.stdout
    got = consume_all(services.bootstrap, topic, expect=2)
    assert sorted(c.record["message_id"] for c in got) == sorted(good)
