"""Time limits on POP3 I/O: a server that trickles bytes never trips the inactivity timeout,
yet must not hold a shard round's transaction (and every other mailbox in it) past the
broker's transaction timeout, nor hold a session slot for ever.

Real sockets on loopback (tests/support/slowpop.py) and librdkafka's mock cluster; the same is
proven against the real broker and Dovecot in tests/integration/test_slow_servers.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support.fakepop import Maildrop
from support.mailgen import make_mail
from support.slowpop import SlowPop3
from test_shard_rounds import Harness

from connector.config import parse_config
from connector.config.model import Config
from connector.delivery.kafka import Publisher
from connector.errors import Pop3TimeoutError
from connector.protocol import transport
from connector.protocol.transport import Transport, time_limit
from connector.runtime import cycle, exactly_once
from connector.runtime.cycle import CycleContext, CycleHooks, run_cycle
from connector.runtime.sessions import open_session

MOCK = {"test.mock.num.brokers": 1}


def trickling_pair(interval: float = 0.05) -> tuple[Transport, threading.Event]:
    """A transport whose peer sends one byte every ``interval`` seconds until stopped."""
    a, b = socket.socketpair()
    a.settimeout(1.0)  # inactivity timeout: never reached by the trickle
    stop = threading.Event()

    def trickle() -> None:
        with b:
            while not stop.wait(interval):
                try:
                    b.sendall(b"x")
                except OSError:
                    return

    threading.Thread(target=trickle, daemon=True).start()
    return Transport(a, "pop.test", 110), stop


def test_time_limit_ends_a_trickle_the_inactivity_timeout_never_sees() -> None:
    t, stop = trickling_pair()
    try:
        # Without a limit the trickle keeps the reads going (bounded here by the test).
        got = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.6:
            got += len(t.recv())
        assert got >= 5
        t0 = time.monotonic()
        expected = r"pop\.test:110: the test's limit ran out; the session was dropped"
        with pytest.raises(Pop3TimeoutError, match=expected), time_limit(0.5, "the test's limit"):
            while True:
                t.recv()
        assert 0.45 <= time.monotonic() - t0 < 1.0
        assert t.closed  # framing lost: the transport is unusable afterwards
    finally:
        stop.set()


def test_the_limit_is_per_thread_and_the_inactivity_timeout_comes_back() -> None:
    t, stop = trickling_pair()
    try:
        with time_limit(30, "outer"):
            t.recv()
            assert t._sock is not None and t._sock.gettimeout() == pytest.approx(1.0)  # min(timeout, left)
            seen: list[object] = []
            other = threading.Thread(target=lambda: seen.append(transport._left()))
            other.start()
            other.join()
            assert seen == [None]  # another session's thread has no limit of ours
        t.recv()
        assert t._sock is not None and t._sock.gettimeout() == 1.0
        with time_limit(0.2, "short"):
            t.recv()
            assert t._sock is not None and t._sock.gettimeout() <= 0.2
        t.recv()  # the limit ended with its block
        assert t._sock is not None and t._sock.gettimeout() == 1.0
    finally:
        stop.set()


def test_an_exhausted_limit_refuses_to_connect() -> None:
    with SlowPop3("silent") as server:
        with time_limit(0.0, "the round's limit"), pytest.raises(Pop3TimeoutError, match="the round's limit ran out"):
            Transport.connect("127.0.0.1", server.port, 5.0)
        assert server.accepted == 0


def cfg(mailboxes: list[dict[str, Any]], **delivery: Any) -> Config:
    ms = [{"username": "u", "password": {"env": "PW"}, **m} for m in mailboxes]
    return parse_config(
        {
            "kafka": {"bootstrap_servers": "mock:9092", "delivery_timeout_seconds": 5},
            "topics": {"mail": "mail"},
            "ledger": {"topic": "ledger", "shards": 1},
            "delivery": delivery,
            "mailboxes": ms,
        },
        environ={"PW": "pw"},
    )


@pytest.fixture
def drop() -> Iterator[Maildrop]:
    yield Maildrop({f"U{i}": make_mail(i)[0] for i in range(4)})


def harness(config: Config, drop: Maildrop) -> Harness:
    h = Harness(config, {"a": drop})
    h.worker.session_factory = lambda m: drop.session() if m.id == "a" else open_session(m)
    return h


def test_a_trickling_server_does_not_hold_the_round_past_its_limit(
    drop: Maildrop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the limit the round would wait on the trickle until the broker aborted the
    transaction, taking mailbox a's work with it; with it, a commits and is deleted."""
    monkeypatch.setattr(exactly_once, "ROUND_FETCH_SHARE", 0.02)  # 0.02 x 120 s = 2.4 s
    with SlowPop3("trickle") as server:
        a = {"id": "a", "host": "pop.test", "timeout_seconds": 1}
        h = harness(cfg([a, server.mailbox("slow", timeout_seconds=1)]), drop)
        t0 = time.monotonic()
        ra, rs = h.round()
        took = time.monotonic() - t0
    assert ra.ok and (ra.published, ra.deleted) == (4, 4) and drop.mails == {}
    assert isinstance(rs.error, Pop3TimeoutError) and rs.error.step == "login"
    assert "the shard round's time limit" in str(rs.error) and "ran out" in str(rs.error)
    assert 2.3 <= took < 5.0


def test_a_silent_server_costs_the_round_its_own_timeout_only(drop: Maildrop) -> None:
    with SlowPop3("silent") as server:
        h = harness(cfg([{"id": "a", "host": "pop.test"}, server.mailbox("hung", timeout_seconds=1)]), drop)
        t0 = time.monotonic()
        ra, rh = h.round()
        took = time.monotonic() - t0
    assert ra.ok and ra.deleted == 4
    assert isinstance(rh.error, Pop3TimeoutError) and rh.error.step == "connect"
    assert "did not answer in time" in str(rh.error)
    assert 0.9 <= took < 3.0  # timeout_seconds: 1


def test_a_session_that_would_start_too_late_waits_for_the_next_round(
    drop: Maildrop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exactly_once, "ROUND_FETCH_SHARE", 0.001)  # 0.12 s left < timeout_seconds
    opened: list[str] = []
    h = Harness(cfg([{"id": "a", "host": "pop.test"}]), {"a": drop})
    h.worker.session_factory = lambda m: opened.append(m.id) or drop.session()  # type: ignore[func-returns-value]
    (r,) = h.round()
    assert r.ok and r.more_pending and r.listed == 0 and opened == []
    assert len(drop.mails) == 4


def test_at_least_once_cycles_have_a_limit_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cycle, "CYCLE_LIMIT_TIMEOUTS", 0)  # limit = max_seconds_per_cycle = 1 s
    with SlowPop3("trickle") as server:
        config = cfg([{**server.mailbox("slow", timeout_seconds=1), "max_seconds_per_cycle": 1}], mode="at_least_once")
        publisher = Publisher("mock:9092", MOCK, 5)
        ctx = CycleContext(config=config, publisher=publisher, stop=threading.Event(), hooks=CycleHooks())
        t0 = time.monotonic()
        r = run_cycle(ctx, config.mailbox("slow"))
        took = time.monotonic() - t0
        publisher.close()
    assert isinstance(r.error, Pop3TimeoutError) and "the cycle's time limit" in str(r.error)
    assert 0.9 <= took < 3.0
