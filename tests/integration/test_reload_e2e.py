"""Live reload of a running `pop3-kafka run` on the real broker and Dovecot (issue 7): SIGHUP
while a mailbox's cycle is in flight adds one mailbox and removes another; the cycle in flight
carries on untouched and delivers every mail once, the added mailbox is polled, the removed one
is not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.configs import mailbox, write_config
from support.kafkautil import consume_all
from support.tcpproxy import TcpProxy
from test_end_to_end import put_mails, server_uidls

pytestmark = pytest.mark.integration

#: a schedule that does not come round during the test: the mailbox is only polled on demand
#: (here: never), so whether it was polled is down to the reload alone.
NEVER = {"cron": "0 0 1 1 *", "jitter_seconds": 0}


def test_sighup_adds_and_removes_mailboxes_while_a_cycle_is_in_flight(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    n = 300
    busy = put_mails(services, "t19", n, seed=61)
    gone = put_mails(services, "t16", 2, seed=62)
    added = put_mails(services, "t14", 3, seed=63)
    port = services.dovecot.pop3s_port
    # busy reaches Dovecot over a slow link, so that its cycle is certainly still running when
    # the reload is applied (the loop takes it up within a second).
    slow = TcpProxy(port)
    slow.delay = 0.2
    keep = mailbox("busy", "t19", slow.port, services.cafile, max_messages_per_cycle=n, poll_interval_seconds=3600)
    before = [keep, mailbox("gone", "t16", port, services.cafile, schedule=NEVER)]
    after = [keep, mailbox("added", "t14", port, services.cafile, poll_interval_seconds=3600)]
    sections = {"ledger": {"topic": f"{topic}.ledger"}}
    cfg = write_config(tmp_path / "c.yaml", services.bootstrap, topic, before, **sections)
    env = {**os.environ, "PW_BUSY": "t19-pw", "PW_GONE": "t16-pw", "PW_ADDED": "t14-pw"}
    cmd = [sys.executable, "-m", "connector.cli.main", "--log-format", "json", "--log-level", "debug"]
    proc = subprocess.Popen(
        [*cmd, "run", "--config", str(cfg)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[dict[str, object]] = []
    try:
        assert proc.stderr is not None
        retrieved = 0
        for raw in proc.stderr:
            rec = json.loads(raw)
            lines.append(rec)
            if rec.get("mailbox") == "busy" and str(rec["msg"]).startswith("retrieved"):
                retrieved += 1
                if retrieved == 20:
                    break
        assert retrieved == 20, lines[-20:]
        # In the middle of busy's cycle: a new file (as a ConfigMap update writes it) and SIGHUP.
        write_config(tmp_path / "c.yaml", services.bootstrap, topic, after, **sections)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 90
        done = {"reloaded": -1, "busy": -1, "added": -1}
        for raw in proc.stderr:
            rec = json.loads(raw)
            lines.append(rec)
            msg = str(rec["msg"])
            if msg.startswith("configuration reloaded"):
                assert msg == "configuration reloaded: 1 mailbox(es) added, 1 removed, 0 changed", msg
                done["reloaded"] = len(lines)
            if msg.startswith("cycle done") and rec.get("mailbox") in ("busy", "added"):
                done[str(rec["mailbox"])] = len(lines)
            if min(done.values()) >= 0 or time.monotonic() > deadline:
                break
        assert min(done.values()) >= 0, (done, lines[-30:])
        # The reload landed while busy's cycle was still running, and did not disturb it.
        assert done["reloaded"] < done["busy"]
        busy_done = lines[done["busy"] - 1]
        assert f"published={n} " in str(busy_done["msg"]) and f"deleted={n} " in str(busy_done["msg"]), busy_done
        got = consume_all(services.bootstrap, topic, expect=n + 3, timeout=60)
        ids = sorted(c.record["message_id"] for c in got)
        assert ids == sorted([*busy, *added]), "every mail of busy and added once; nothing of gone"
        assert server_uidls(services, "t19") == [] and server_uidls(services, "t14") == []
        assert len(server_uidls(services, "t16")) == len(gone), "the removed mailbox was not polled"
        assert not any(r.get("mailbox") == "gone" and str(r["msg"]).startswith("cycle") for r in lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        slow.close()
    assert proc.returncode == 0
