"""Replicas sharing mailboxes through the consumer group on the ledger topic (issue 7,
docs/decisions/0005), two real `pop3-kafka run` processes against Kafka and Dovecot:

* the shards split between them, each mailbox is polled by its owner only;
* kill -9 of one replica: its shards move to the other within the group session timeout plus a
  few seconds (fenced by the transactional id per shard), and every mail arrives exactly once.

CI runs two replicas and six mailboxes; ``make scale-out`` runs the full proof (SCALE_OUT_REPLICAS=3,
SCALE_OUT_MAILBOXES=60, with its own Dovecot of 60 users), and after the takeover restarts the
killed replica, which rejoins (static membership) without any duplicate. Dovecot runs with
``pop3_lock_session = yes``: a second session on a maildrop would be refused with [IN-USE], so
"no [IN-USE] anywhere" is the server's word that no mailbox was polled by two replicas at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from localstack import DovecotServer, free_port
from support.cli import run_cli
from support.configs import mailbox, write_config
from support.kafkautil import consume_all
from support.mailgen import make_mail

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPLICAS = int(os.environ.get("SCALE_OUT_REPLICAS", "2"))
MAILBOXES = int(os.environ.get("SCALE_OUT_MAILBOXES", "6"))


def status(cfg: Path, env: dict[str, str]) -> list[dict[str, object]] | None:
    got = run_cli("admin", "list", "--config", str(cfg), env=env, timeout=30)
    return json.loads(got.stdout)["mailboxes"] if got.returncode == 0 else None


def wait_until(cond, what: str, timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


@pytest.fixture
def dovecot(services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DovecotServer, list[str]]]:  # type: ignore[no-untyped-def]
    """The session's Dovecot for up to 20 mailboxes (t1..t20); a Dovecot of our own with
    MAILBOXES users beyond that (make scale-out)."""
    if MAILBOXES <= 20:
        users = [f"t{i}" for i in range(1, MAILBOXES + 1)]
        for u in users:
            services.dovecot.clear(u)
        yield services.dovecot, users
        return
    state = Path(tempfile.mkdtemp(prefix="pop3k-scaleout-"))
    state.chmod(0o755)
    users = [f"so{i}" for i in range(MAILBOXES)]
    own = DovecotServer(state / "dovecot", users={u: f"{u}-pw" for u in users})
    own.configure()
    own.start()
    try:
        yield own, users
    finally:
        own.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_replicas_share_shards_take_over_after_kill_9_and_rejoin(services, dovecot, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dove, users = dovecot
    boxes = []
    for u in users:
        b = mailbox(f"so-{u}", u, dove.pop3s_port, str(dove.cafile), poll_interval_seconds=2)
        b["schedule"] = {"jitter_seconds": 0}
        b["password"] = {"env": f"PW_{u.upper()}"}
        boxes.append(b)
    env = {f"PW_{u.upper()}": f"{u}-pw" for u in users}
    names = [chr(ord("a") + i) for i in range(REPLICAS)]
    cfgs: dict[str, Path] = {}
    for name in names:
        cfgs[name] = write_config(
            tmp_path / f"{name}.yaml",
            services.bootstrap,
            topic,
            boxes,
            ledger={"topic": f"{topic}.ledger", "shards": 2 * REPLICAS},
            delivery={"transactional_id_prefix": f"so-{topic}"},
            runtime={
                "ownership": "group",
                "instance_id": f"replica-{name}",
                "group_session_timeout_seconds": 8,
                "max_concurrent_sessions": 16,
                "max_sessions_per_server": 16,
            },
            admin={"bind": f"127.0.0.1:{free_port()}"},
        )
    procs: dict[str, subprocess.Popen[str]] = {}
    logs: list[Path] = []

    def start(name: str) -> None:
        log = tmp_path / f"{name}-{len(logs)}.log"
        logs.append(log)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "connector.cli.main", "run", "--config", str(cfgs[name])],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            text=True,
        )

    def owned(name: str) -> set[str] | None:
        st = status(cfgs[name], env)
        return None if st is None else {str(m["id"]) for m in st if m["owned"]}

    def split(alive: list[str]) -> bool:
        sets = [owned(n) for n in alive]
        if any(x is None or not x for x in sets):
            return False
        every = [i for x in sets for i in x]  # type: ignore[union-attr]
        return len(every) == len(set(every)) == len(boxes)  # each mailbox owned exactly once

    sent: list[str] = []
    stop_feeding = threading.Event()

    def feed() -> None:
        # About 20 s of mail, 4 per mailbox, spread over the kill and the takeover.
        total = 4 * MAILBOXES
        i = 0
        while not stop_feeding.is_set() and i < total:
            raw, exp = make_mail(i, seed=515)
            dove.put(users[i % len(users)], raw)
            sent.append(exp.message_id)
            i += 1
            time.sleep(20.0 / total)

    feeder = threading.Thread(target=feed)
    try:
        for name in names:
            start(name)
        wait_until(lambda: split(names), "the shards split between the replicas, each mailbox owned once", 120)
        feeder.start()
        time.sleep(5)
        victim = names[0]
        procs[victim].send_signal(signal.SIGKILL)  # mid-stream: it may hold an open transaction
        procs[victim].wait(10)
        killed_at = time.monotonic()
        survivors = names[1:]
        wait_until(lambda: split(survivors), "the survivors took over every shard", 120)
        took = time.monotonic() - killed_at
        if REPLICAS > 2:
            start(victim)  # static membership: it rejoins under the same instance id
            wait_until(lambda: split(names), "the restarted replica rejoined", 120)
        feeder.join()
        wait_until(lambda: all(dove.count(u) == 0 for u in users), "every mailbox emptied", 180)
    finally:
        stop_feeding.set()
        if feeder.is_alive():
            feeder.join()
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    assert took < 8 + 30, f"takeover took {took:.1f} s"
    got = consume_all(services.bootstrap, topic, expect=len(sent), timeout=120)
    ids = [c.record["message_id"] for c in got]
    assert len(ids) == len(set(ids)), "a mail was published twice"
    assert set(ids) == set(sent), "a mail was lost"
    for log in logs:
        text = log.read_text()
        # Dovecot refuses a second session on a maildrop ([IN-USE], pop3_lock_session = yes):
        # never seen means no mailbox was polled by two replicas at once.
        assert "IN-USE" not in text, log.name
    for name in names[1:]:
        assert procs[name].returncode == 0, (tmp_path / f"{name}-0.log").read_text()[-3000:]
