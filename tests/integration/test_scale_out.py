"""Replicas sharing mailboxes through the consumer group on the ledger topic (issue 7,
docs/decisions/0005), two real `pop3-kafka run` processes against Kafka and Dovecot:

* the shards split between them, each mailbox is polled by its owner only;
* kill -9 of one replica: its shards move to the other within the group session timeout plus a
  few seconds (fenced by the transactional id per shard), and every mail arrives exactly once.

The full proof (three replicas, 60 mailboxes, restart) is for a later stop; see the issue note.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from localstack import free_port
from support.cli import run_cli
from support.configs import mailbox, write_config
from support.kafkautil import consume_all
from support.mailgen import make_mail

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

USERS = [f"t{i}" for i in range(1, 7)]


def status(cfg: Path, env: dict[str, str]) -> list[dict[str, object]] | None:
    got = run_cli("admin", "list", "--config", str(cfg), env=env, timeout=30)
    return json.loads(got.stdout)["mailboxes"] if got.returncode == 0 else None


def wait_until(cond, what: str, timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_two_replicas_share_shards_and_take_over_after_kill_9(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for u in USERS:
        services.dovecot.clear(u)
    boxes = []
    for u in USERS:
        b = mailbox(f"so-{u}", u, services.dovecot.pop3s_port, services.cafile, poll_interval_seconds=2)
        b["schedule"] = {"jitter_seconds": 0}
        b["password"] = {"env": f"PW_{u.upper()}"}
        boxes.append(b)
    env = {f"PW_{u.upper()}": f"{u}-pw" for u in USERS}
    cfgs = []
    for name in ("a", "b"):
        cfgs.append(
            write_config(
                tmp_path / f"{name}.yaml",
                services.bootstrap,
                topic,
                boxes,
                ledger={"topic": f"{topic}.ledger", "shards": 4},
                delivery={"transactional_id_prefix": f"so-{topic}"},
                runtime={"ownership": "group", "instance_id": f"replica-{name}", "group_session_timeout_seconds": 8},
                admin={"bind": f"127.0.0.1:{free_port()}"},
            )
        )
    procs: dict[str, subprocess.Popen[str]] = {}

    def start(name: str, cfg: Path) -> None:
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "connector.cli.main", "run", "--config", str(cfg)],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / f"{name}.log", "w"),  # noqa: SIM115 - closed with the process
            text=True,
        )

    sent: list[str] = []
    try:
        start("a", cfgs[0])
        wait_until(lambda: (s := status(cfgs[0], env)) is not None and all(m["owned"] for m in s), "a owns all")
        start("b", cfgs[1])

        def split() -> bool:
            sa, sb = status(cfgs[0], env), status(cfgs[1], env)
            if not sa or not sb:
                return False
            owned_a = {m["id"] for m in sa if m["owned"]}
            owned_b = {m["id"] for m in sb if m["owned"]}
            return bool(owned_a) and bool(owned_b) and not owned_a & owned_b

        wait_until(split, "the shards split between a and b (and no mailbox owned twice)")

        stop_feeding = threading.Event()

        def feed() -> None:
            i = 0
            while not stop_feeding.is_set() and i < 60:
                raw, exp = make_mail(i, seed=515)
                services.dovecot.put(USERS[i % len(USERS)], raw)
                sent.append(exp.message_id)
                i += 1
                time.sleep(0.25)

        feeder = threading.Thread(target=feed)
        feeder.start()
        time.sleep(5)
        procs["a"].send_signal(signal.SIGKILL)  # mid-stream: a may hold an open transaction
        procs["a"].wait(10)
        killed_at = time.monotonic()
        wait_until(
            lambda: (s := status(cfgs[1], env)) is not None and all(m["owned"] for m in s),
            "b took over every shard",
        )
        took = time.monotonic() - killed_at
        feeder.join()
        wait_until(lambda: all(services.dovecot.count(u) == 0 for u in USERS), "every mailbox emptied")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    assert took < 8 + 20, f"takeover took {took:.1f} s"
    got = consume_all(services.bootstrap, topic, expect=len(sent), timeout=60)
    ids = [c.record["message_id"] for c in got]
    assert len(ids) == len(set(ids)), "a mail was published twice"
    assert set(ids) == set(sent), "a mail was lost"
    assert procs["b"].returncode == 0, (tmp_path / "b.log").read_text()[-3000:]
