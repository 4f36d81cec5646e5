"""Exactly-once against the real broker and the real Dovecot: fencing, shard count, UIDL reset,
keep mode, start_from now, at-least-once's duplicate window, and faults in the middle of a cycle.
(The crash matrix is in test_crash_matrix.py.)
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.configs import mailbox, write_config
from support.kafkautil import consume_all
from support.mailgen import make_mail
from support.tcpproxy import TcpProxy
from test_dead_letters_e2e import ledger_entries
from test_end_to_end import cli, put_mails, server_uidls

from connector.config import load_config
from connector.delivery.admin import ensure_topic
from connector.runtime.cycle import CycleHooks
from connector.runtime.runner import Runner
from connector.runtime.sessions import open_session

pytestmark = pytest.mark.integration


def crlf(raw: bytes) -> bytes:
    """What RETR returns for a stored mail: CRLF line ends (RFC 1939 §3)."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def ids(got: list) -> list[str]:  # type: ignore[type-arg]
    return sorted(c.record["message_id"] for c in got)


def test_a_second_process_fences_the_first(services, topic: str, tmp_path: Path) -> None:
    # 'nolock' has no POP3 maildrop lock: only Kafka's fencing keeps the two apart.
    services.dovecot.clear("nolock")
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("fence", "nolock", services.dovecot.pop3s_port, services.cafile, poll_interval_seconds=1)],
        ledger={"topic": f"{topic}.ledger", "shards": 1},
    )
    env = {**os.environ, "PW_FENCE": "nolock-pw"}
    cmd = [sys.executable, "-m", "connector.cli.main", "--log-format", "json", "run", "--config", str(cfg)]
    expected: set[str] = set()

    def deliver(seed: int, n: int) -> None:
        for i in range(n):
            raw, exp = make_mail(i, seed=seed)
            services.dovecot.put("nolock", raw)
            expected.add(exp.message_id)

    a = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = None
    try:
        deliver(31, 5)
        assert len(consume_all(services.bootstrap, topic, expect=5, timeout=60, settle=0)) >= 5
        b = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # A learns it was fenced at its next transaction; with every shard gone it exits 1.
        deliver(32, 5)
        _, a_err = a.communicate(timeout=90)
        assert a.returncode == 1, a_err[-2000:]
        assert "fenced" in a_err and "stops polling the shard" in a_err
        deliver(33, 5)
        got = consume_all(services.bootstrap, topic, expect=15, timeout=90)
        assert ids(got) == sorted(expected), "every mail once, none twice"
        deadline = time.monotonic() + 30
        while server_uidls(services, "nolock") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert server_uidls(services, "nolock") == []
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=60)
    assert b is not None and b.returncode == 0


def test_a_changed_shard_count_is_refused(services, topic: str, tmp_path: Path) -> None:
    put_mails(services, "t9", 1, seed=9)
    ledger = f"{topic}.ledger"
    c1 = write_config(
        tmp_path / "a.yaml",
        services.bootstrap,
        topic,
        [mailbox("shards", "t9", services.dovecot.pop3s_port, services.cafile)],
        ledger={"topic": ledger, "shards": 4},
    )
    assert cli("poll-once", "--config", str(c1), env={"PW_SHARDS": "t9-pw"}).returncode == 0
    c2 = write_config(
        tmp_path / "b.yaml",
        services.bootstrap,
        topic,
        [mailbox("shards", "t9", services.dovecot.pop3s_port, services.cafile)],
        ledger={"topic": ledger, "shards": 6},
    )
    proc = cli("poll-once", "--config", str(c2), env={"PW_SHARDS": "t9-pw"})
    assert proc.returncode == 2
    assert "ledger.shards: configured 6, but ledger topic" in proc.stderr and "has 4 partitions" in proc.stderr


def test_uidl_reset_is_reported_not_republished(services, topic: str, tmp_path: Path) -> None:
    put_mails(services, "t9", 6, seed=19)
    base = [mailbox("reset", "t9", services.dovecot.pop3s_port, services.cafile, delete=False)]
    # its own ledger: a broker re-used across runs (a local stack kept) holds the last run's entries
    ledger = {"topic": f"{topic}.ledger"}
    cfg = write_config(tmp_path / "c.yaml", services.bootstrap, topic, base, ledger=ledger)
    env = {"PW_RESET": "t9-pw"}
    assert cli("poll-once", "--config", str(cfg), env=env).returncode == 0
    before = server_uidls(services, "t9")
    # Lose Dovecot's uidlist (and its index): it hands out a new UIDVALIDITY, i.e. new UIDLs.
    md = services.dovecot.maildir("t9")
    for f in md.iterdir():
        if f.name.startswith("dovecot"):
            f.unlink()
    after = server_uidls(services, "t9")
    assert len(after) == 6 and not set(before) & set(after)
    proc = cli("poll-once", "--config", str(cfg), env=env)
    assert proc.returncode == 1 and "UidlResetError" in proc.stderr and "Nothing was published" in proc.stderr
    assert len(consume_all(services.bootstrap, topic, expect=6)) == 6
    base[0]["on_uidl_reset"] = "rebaseline"
    cfg = write_config(tmp_path / "c.yaml", services.bootstrap, topic, base, ledger=ledger)
    assert cli("poll-once", "--config", str(cfg), env=env).returncode == 0
    raw, exp = make_mail(99, seed=19)
    services.dovecot.put("t9", raw)
    assert cli("poll-once", "--config", str(cfg), env=env).returncode == 0
    got = consume_all(services.bootstrap, topic, expect=7)
    assert len(got) == 7 and exp.message_id in ids(got)


def test_keep_mode_and_start_from_now_over_three_cycles(services, topic: str, tmp_path: Path) -> None:
    old = put_mails(services, "t10", 3, seed=10)  # already there before the cut-over
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("keep", "t10", services.dovecot.pop3s_port, services.cafile, delete=False, start_from="now")],
        ledger={"topic": f"{topic}.ledger"},  # its own ledger: a broker re-used across runs keeps old entries
    )
    env = {"PW_KEEP": "t10-pw"}
    new: set[str] = set()
    for cycle in range(3):
        if cycle:
            for i in range(2):
                raw, exp = make_mail(100 + 10 * cycle + i, seed=10)
                services.dovecot.put("t10", raw)
                new.add(exp.message_id)
        proc = cli("poll-once", "--config", str(cfg), env=env)
        assert proc.returncode == 0, proc.stderr
    got = consume_all(services.bootstrap, topic, expect=4)
    assert ids(got) == sorted(new), "new mail once each; the mail present at cut-over never"
    assert not set(old) & set(ids(got))
    assert len(server_uidls(services, "t10")) == 7  # keep mode deletes nothing


def test_at_least_once_kill_after_delivery_duplicates_with_the_same_record_id(services, topic, tmp_path) -> None:  # type: ignore[no-untyped-def]
    put_mails(services, "t4", 3, seed=44)
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("alo", "t4", services.dovecot.pop3s_port, services.cafile)],
        delivery={"mode": "at_least_once"},
    )
    env = {"PW_ALO": "t4-pw"}
    killed = subprocess.run(
        [sys.executable, "-m", "connector.cli.main", "poll-once", "--config", str(cfg)],
        env={**os.environ, **env, "POP3K_FAULT": "after_commit"},
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    assert cli("poll-once", "--config", str(cfg), env=env).returncode == 0
    got = consume_all(services.bootstrap, topic, expect=6)
    rids = sorted(c.headers["pop3kafka.record_id"] for c in got)
    assert len(got) == 6 and len(set(rids)) == 3 and rids[0] == rids[1], "each mail twice, same record id"
    assert server_uidls(services, "t4") == []


def big_mail(n: int, mb: int) -> bytes:
    line = b"0123456789abcdef" * 4 + b"\r\n"
    body = line * (mb * 1024 * 1024 // len(line))
    return f"Subject: big {n}\r\nMessage-ID: <big-{n}@test>\r\n\r\n".encode() + body


def test_tcp_connection_cut_during_retr(services, topic: str, tmp_path: Path) -> None:
    services.dovecot.clear("t6")
    services.dovecot.put("t6", big_mail(1, 4))
    for i in range(3):
        services.dovecot.put("t6", make_mail(i, seed=66)[0])
    proxy = TcpProxy(services.dovecot.pop3s_port)
    try:
        cut_once = threading.Event()

        def cut_mid_retr(n: int) -> None:
            if n > 1_000_000 and not cut_once.is_set():
                cut_once.set()
                proxy.cut()

        proxy.on_bytes = cut_mid_retr
        cfg = write_config(
            tmp_path / "c.yaml",
            services.bootstrap,
            topic,
            [mailbox("cut", "t6", proxy.port, services.cafile, timeout_seconds=10)],
            kafka={"client": {"message.max.bytes": 16_000_000}},
        )
        proc = cli("poll-once", "--config", str(cfg), env={"PW_CUT": "t6-pw"})
        assert proc.returncode == 1 and "step retr" in proc.stderr and "Pop3ConnectError" in proc.stderr, proc.stderr
        assert len(server_uidls(services, "t6")) == 4
        proc = cli("poll-once", "--config", str(cfg), env={"PW_CUT": "t6-pw"})
        assert proc.returncode == 0, proc.stderr
    finally:
        proxy.close()
    got = consume_all(services.bootstrap, topic, expect=4)
    assert len(got) == 4 and len({c.record["message_id"] for c in got}) == 4
    assert server_uidls(services, "t6") == []


def server_uidls_when_up(services, user: str) -> list[str]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 30
    while True:
        try:
            return server_uidls(services, user)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_dovecot_restarted_during_retr(services, topic: str, tmp_path: Path) -> None:
    services.dovecot.clear("t7")
    services.dovecot.put("t7", big_mail(2, 12))
    services.dovecot.put("t7", make_mail(1, seed=77)[0])
    proxy = TcpProxy(services.dovecot.pop3s_port)
    proxy.delay = 0.02  # a slow link: the 12 MB RETR takes seconds, so the restart lands inside it
    restarted = threading.Event()

    def restart_mid_retr(n: int) -> None:
        if n > 1_000_000 and not restarted.is_set():
            restarted.set()
            threading.Thread(target=lambda: (services.dovecot.stop(hard=True), services.dovecot.start())).start()

    proxy.on_bytes = restart_mid_retr
    try:
        cfg = write_config(
            tmp_path / "c.yaml",
            services.bootstrap,
            topic,
            [mailbox("restart", "t7", proxy.port, services.cafile, timeout_seconds=10)],
            kafka={"client": {"message.max.bytes": 16_000_000}},
        )
        proc = cli("poll-once", "--config", str(cfg), env={"PW_RESTART": "t7-pw"})
        assert proc.returncode == 1 and "step retr" in proc.stderr, proc.stderr
        assert len(server_uidls_when_up(services, "t7")) == 2
        proxy.delay = 0
        proc = cli("poll-once", "--config", str(cfg), env={"PW_RESTART": "t7-pw"})
        assert proc.returncode == 0, proc.stderr
    finally:
        proxy.close()
    got = consume_all(services.bootstrap, topic, expect=2)
    assert len(got) == 2 and server_uidls(services, "t7") == []


def test_broker_down_for_30_seconds_mid_cycle(services, own_kafka, topic: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    put_mails(services, "t5", 12, seed=55)
    monkeypatch.setenv("PW_DOWN", "t5-pw")
    cfg = load_config(
        write_config(
            tmp_path / "c.yaml",
            own_kafka.bootstrap,
            topic,
            [mailbox("down", "t5", services.dovecot.pop3s_port, services.cafile, max_seconds_per_cycle=50)],
            kafka={"delivery_timeout_seconds": 90},
            delivery={"transaction_timeout_seconds": 180},
        )
    )
    ensure_topic(own_kafka.bootstrap, {}, topic, create=True, partitions=1, replication_factor=1)
    outage = threading.Event()

    def on_retrieved(uidl: str, size: int) -> None:
        if not outage.is_set():
            outage.set()
            own_kafka.stop()
            threading.Timer(30, own_kafka.start).start()

    runner = Runner(cfg, hooks=CycleHooks(on_retrieved=on_retrieved))
    try:
        runner.prepare()
        t0 = time.monotonic()
        (res,) = runner.poll_once()
    finally:
        runner.close()
    assert outage.is_set() and time.monotonic() - t0 >= 25
    if not res.ok:  # an abort is allowed (nothing deleted); then the next cycle delivers
        assert server_uidls(services, "t5"), "nothing may be deleted by a failed round"
        runner = Runner(cfg)
        try:
            (res,) = runner.poll_once()
        finally:
            runner.close()
    assert res.ok, res.error
    got = consume_all(own_kafka.bootstrap, topic, expect=12)
    assert len(got) == 12 and len({c.record["message_id"] for c in got}) == 12
    assert server_uidls(services, "t5") == []


def test_poll_once_lists_the_mailbox_while_the_shard_starts(services, topic: str, tmp_path: Path) -> None:
    """poll-once opens and lists its sessions beside init_transactions and the ledger load
    (Runner.open_early); the round then fetches over that same session."""
    expected = put_mails(services, "t10", 3, seed=101)
    cfg = load_config(
        write_config(
            tmp_path / "c.yaml",
            services.bootstrap,
            topic,
            [mailbox("early", "t10", services.dovecot.pop3s_port, services.cafile)],
            delivery={"mode": "exactly_once", "transactional_id_prefix": f"early-{topic}"},
            ledger={"topic": f"{topic}.ledger", "shards": 1},
        ),
        environ={"PW_EARLY": "t10-pw"},
    )
    ensure_topic(services.bootstrap, {}, topic, create=True, partitions=1, replication_factor=1)
    opened: list[str] = []

    def factory(m):  # type: ignore[no-untyped-def]
        opened.append(m.id)
        return open_session(m)

    runner = Runner(cfg, session_factory=factory)
    try:
        runner.open_early(cfg.mailboxes)
        early = runner._early["early"]
        assert early.early is not None
        early.early.result(timeout=60)
        # listed over POP3S while no shard has started yet
        assert early.listing is not None and len(early.listing[0]) == 3 and runner.workers == {}
        runner.prepare()
        (res,) = runner.poll_once()
    finally:
        runner.close()
    assert res.ok, res.error
    assert (res.published, res.deleted, opened) == (3, 3, ["early"])  # one session, the early one
    got = consume_all(services.bootstrap, topic, expect=3)
    assert sorted(c.record["message_id"] for c in got) == sorted(expected)
    assert server_uidls(services, "t10") == []


def test_raw_passthrough_publishes_the_mail_as_retrieved_with_its_ledger_entries(
    services, topic: str, tmp_path: Path
) -> None:
    """mime_decoding: false, exactly-once: the record and the ledger entries are written directly
    in Avro (connector/records/avro.py, "hand-made bodies"); a consumer reads them back with the
    schemas, the raw mail byte for byte as RETR gave it (dot-stuffing undone, CRLF)."""
    services.dovecot.clear("t10")
    stored = [make_mail(i, seed=202)[0] for i in range(4)]
    stored.append(b"Subject: dots\r\n\r\n.a line starting with a dot\r\n..two\r\n.\r\nend\r\n")
    for raw in stored:
        services.dovecot.put("t10", raw)
    expected = {hashlib.sha256(crlf(raw)).hexdigest(): crlf(raw) for raw in stored}
    ledger = f"{topic}.ledger"
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("rawpt", "t10", services.dovecot.pop3s_port, services.cafile, mime_decoding=False)],
        delivery={"mode": "exactly_once", "transactional_id_prefix": f"rawpt-{topic}"},
        ledger={"topic": ledger, "shards": 1},
    )
    proc = cli("poll-once", "--config", str(cfg), env={"PW_RAWPT": "t10-pw"})
    assert proc.returncode == 0, proc.stderr
    got = consume_all(services.bootstrap, topic, expect=5)
    assert len(got) == 5
    for c in got:
        r = c.record
        prov = r["provenance"]
        assert r["mime_decoded"] is False and r["raw_ref"] is None and r["subject"] is None and r["parts"] == []
        assert r["raw"] == expected[prov["raw_sha256"]] and prov["raw_size"] == len(r["raw"])
        assert r["record_id"] == f"rawpt:{prov['uidl']}" and prov["mailbox_id"] == "rawpt"
    entries = {e["uidl"]: e for e in ledger_entries(services.bootstrap, ledger, expect=5)}
    assert {u: (e["state"], e["offset"]) for u, e in entries.items()} == {
        c.record["provenance"]["uidl"]: ("delivered", c.offset) for c in got
    }
    assert {e["raw_sha256"] for e in entries.values()} == set(expected)
    assert server_uidls(services, "t10") == []


def test_poll_once_with_kafka_unreachable_leaves_the_mail_and_the_maildrop_free(
    services, topic: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The session opened beside the shard's start is ended without deletes when the shard
    cannot start; the maildrop lock goes with it (the next login succeeds at once)."""
    put_mails(services, "t10", 2, seed=102)
    before = server_uidls(services, "t10")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    cfg = write_config(
        tmp_path / "c.yaml",
        dead,
        topic,
        [mailbox("early", "t10", services.dovecot.pop3s_port, services.cafile)],
        kafka={"delivery_timeout_seconds": 5},
        delivery={"mode": "exactly_once"},
        ledger={"topic": f"{topic}.ledger", "shards": 1},
    )
    proc = cli("poll-once", "--config", str(cfg), env={**os.environ, "PW_EARLY": "t10-pw"}, timeout=120)
    assert proc.returncode != 0 and dead in proc.stderr, proc.stderr[-2000:]
    assert "t10-pw" not in proc.stderr + proc.stdout
    assert len(before) == 2 and server_uidls(services, "t10") == before


def test_ledger_import_from_fetchmail_and_getmail(services, topic: str, tmp_path: Path) -> None:
    mails = put_mails(services, "t8", 6, seed=88)
    uidls = server_uidls(services, "t8")
    (tmp_path / ".fetchids").write_text(f"t8@127.0.0.1 {uidls[0]}\nt8@127.0.0.1 {uidls[1]}\nt8@127.0.0.1 GONE1\n")
    (tmp_path / "oldmail").write_text(f"{uidls[2]}\x001767258000\n{uidls[3]}\x001767258001\n")
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("cutover", "t8", services.dovecot.pop3s_port, services.cafile)],
    )
    env = {"PW_CUTOVER": "t8-pw"}
    a = cli("ledger", "import", "-c", str(cfg), "-m", "cutover", "--fetchids", str(tmp_path / ".fetchids"), env=env)
    assert a.returncode == 0, a.stderr
    assert "cutover: 2 recorded as seen (not published), 0 already in the ledger, 1 from the file" in a.stdout
    g = cli(
        "ledger", "import", "-c", str(cfg), "-m", "cutover", "--getmail-oldmail", str(tmp_path / "oldmail"), env=env
    )
    assert g.returncode == 0 and "2 recorded as seen" in g.stdout, g.stderr
    assert cli("poll-once", "--config", str(cfg), env=env).returncode == 0
    got = consume_all(services.bootstrap, topic, expect=2)
    published = {c.record["provenance"]["uidl"] for c in got}
    assert published == set(uidls[4:]) and len(got) == 2
    assert len(mails) == 6
    assert sorted(server_uidls(services, "t8")) == sorted(uidls[:4])  # imported mail is left alone
