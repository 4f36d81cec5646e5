"""Group ownership in the runner without a broker: assigned shards are fenced in and loaded off
the loop thread, a failure is retried after a pause, a revocation during the load hands the
shard back, and the mailboxes of a shard that became ours start on a fresh plan."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from connector.config import parse_config
from connector.errors import DeliveryError
from connector.observability import metrics
from connector.records.ledger import shard_of
from connector.runtime import runner as runner_mod
from connector.runtime.runner import Runner


class FakeMembership:
    def __init__(self) -> None:
        self.settled = threading.Event()
        self.settled.set()
        self.failed = False


class FakeWorker:
    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.producer = self
        self.aborted = self.closed = False
        self.dead = None
        self.stop = threading.Event()

    def abort(self) -> None:
        self.aborted = True

    def flush_tombstones(self) -> None:
        pass

    def close(self, timeout: float = 0) -> int:
        self.closed = True
        return 0


def runner(clock: list[float]) -> Runner:
    # The metrics registry is process-wide: ids of this runner only. The tests need mailboxes
    # in shard 0 and in others; a random tag leaves shard 0 empty 3 % of the time ((3/4)^12).
    while True:
        tag = uuid.uuid4().hex[:6]
        ids = [f"m{i}-{tag}" for i in range(12)]
        if 0 < sum(shard_of(i, 4) == 0 for i in ids) < len(ids):
            break
    common = {"host": "pop.test", "username": "u", "password": {"env": "PW"}, "poll_interval_seconds": 600}
    boxes = [{"id": i, **common} for i in ids]
    cfg = parse_config(
        {
            "kafka": {"bootstrap_servers": "mock:9092"},
            "topics": {"mail": "mail"},
            "ledger": {"topic": "l", "shards": 4},
            "runtime": {"ownership": "group"},
            "mailboxes": boxes,
        },
        environ={"PW": "x"},
    )
    r = Runner(cfg, clock=lambda: clock[0])
    r.shards = 4
    r.membership = FakeMembership()  # type: ignore[assignment]
    return r


def wait_until(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_assigned_shards_load_in_the_background_and_failures_are_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    r = runner(clock)
    gate = threading.Event()
    attempts: dict[int, int] = {}

    def fake_prepare(shard: int) -> None:
        attempts[shard] = attempts.get(shard, 0) + 1
        if shard == 1 and attempts[shard] == 1:
            raise DeliveryError("injected: broker away")
        if shard == 2:
            assert gate.wait(10)
        with r._control:
            r.workers[shard] = FakeWorker(shard)  # type: ignore[assignment]

    r._prepare_shard = fake_prepare  # type: ignore[method-assign]
    monkeypatch.setattr(runner_mod, "PREPARE_RETRY_SECONDS", 0.3)
    try:
        r._on_assign([0, 1, 2])
        t0 = time.monotonic()
        r._take_assignments()
        assert time.monotonic() - t0 < 0.5, "the loop thread does not wait for the loads"
        wait_until(lambda: 0 in r.workers)
        assert not r.ready and r.readiness()[1]["preparing_shards"] == [1, 2]
        # shard 1 failed once: not retried before its pause, then fenced in
        r._take_assignments()
        assert attempts[1] == 1
        time.sleep(0.35)
        r._take_assignments()
        wait_until(lambda: 1 in r.workers)
        assert attempts[1] == 2
        assert not r.ready  # shard 2 still loading
        gate.set()
        wait_until(lambda: r.ready)
        assert sorted(r.workers) == [0, 1, 2]
    finally:
        gate.set()
        r.close()


def test_a_shard_revoked_while_it_loads_is_handed_back_not_run() -> None:
    clock = [1000.0]
    r = runner(clock)
    gate = threading.Event()
    made: list[FakeWorker] = []

    def fake_prepare(shard: int) -> None:
        assert gate.wait(10)
        w = FakeWorker(shard)
        made.append(w)
        with r._control:
            r.workers[shard] = w  # type: ignore[assignment]

    r._prepare_shard = fake_prepare  # type: ignore[method-assign]
    try:
        r._on_assign([3])
        r._take_assignments()
        revoked = threading.Thread(target=r._on_revoke, args=([3],))
        revoked.start()  # waits for the load in flight
        time.sleep(0.2)
        assert revoked.is_alive()
        gate.set()
        revoked.join(10)
        assert not revoked.is_alive()
        assert 3 not in r.workers and made[0].aborted and made[0].closed
        assert r.ready and r.readiness()[1]["owned_shards"] == []
        assert metrics.value("pop3kafka_shard_owned", {"shard": "3"}) == 0
    finally:
        gate.set()
        r.close()


def test_mailboxes_of_a_new_shard_start_on_a_fresh_plan() -> None:
    clock = [1000.0]
    r = runner(clock)
    r._prepare_shard = lambda shard: r.workers.__setitem__(shard, FakeWorker(shard))  # type: ignore[method-assign, assignment, func-returns-value]
    try:
        mine = [m.id for m in r.config.mailboxes if shard_of(m.id, 4) == 0]
        other = [m.id for m in r.config.mailboxes if shard_of(m.id, 4) != 0]
        assert mine and other
        r.scheduler.states[mine[0]].paused = True
        r.scheduler.states[mine[0]].failures = 2
        before = {i: r.scheduler.states[i].due for i in other}
        clock[0] = 5000.0  # long after the first plan: every due time has passed
        r._on_assign([0])
        r._take_assignments()
        wait_until(lambda: r.ready)
        for i in mine:
            st = r.scheduler.states[i]
            assert 5000.0 <= st.due <= 5010.0  # spread over the start-up window from now
        assert r.scheduler.states[mine[0]].paused and r.scheduler.states[mine[0]].failures == 2
        assert {i: r.scheduler.states[i].due for i in other} == before  # not ours: untouched
        # the mailboxes polled here have their counters (at 0); the others have no series
        text = metrics.exposition().decode()
        assert all(f'pop3kafka_mails_published_total{{mailbox="{i}"}} 0.0' in text for i in mine)
        assert not any(f'mailbox="{i}"' in text for i in other)
        assert metrics.value("pop3kafka_shards_owned") == 1
        r._on_revoke([0])  # handed over: its mailboxes' series go (no stale values on this replica)
        assert not any(f'mailbox="{i}"' in metrics.exposition().decode() for i in mine)
    finally:
        r.close()
