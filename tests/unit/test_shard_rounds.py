"""Shard rounds: the exactly-once rules, with scripted maildrops and librdkafka's mock cluster.

Transactions run for real on the mock cluster; the ledger view is checked in memory. The
same rules are proven against the real broker and Dovecot in tests/integration (crash matrix,
fencing, UIDL reset, keep mode).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from support.fakepop import Maildrop
from support.mailgen import make_mail

from connector.config import parse_config
from connector.config.model import Config
from connector.delivery.transactional import ShardProducer
from connector.errors import DeliveryError, Pop3AuthError, Pop3ConnectError, UidlResetError
from connector.records.ledger import LedgerEntry, ShardLedger, shard_of
from connector.runtime.cycle import CycleHooks
from connector.runtime.exactly_once import ShardWorker
from connector.runtime.runner import Runner
from connector.runtime.sessions import CycleResult, Prepared, open_early

MOCK = {"test.mock.num.brokers": 1}
DAY = 86_400_000


def cfg(mailboxes: list[dict[str, Any]], **sections: Any) -> Config:
    ms = [{"host": "pop.test", "username": "u", "password": {"env": "PW"}, **m} for m in mailboxes]
    return parse_config(
        {
            "kafka": {"bootstrap_servers": "mock:9092", "delivery_timeout_seconds": 5},
            "topics": {"mail": "mail"},
            "ledger": {"topic": "ledger", "shards": 1},
            "mailboxes": ms,
            **sections,
        },
        environ={"PW": "pw"},
    )


class Harness:
    def __init__(self, config: Config, drops: dict[str, Maildrop], producer_cls: type[ShardProducer] = ShardProducer):
        self.config = config
        self.drops = drops
        self.now = [1_767_258_000_000]
        self.published: list[str] = []
        self.producer = producer_cls("mock:9092", MOCK, 5, prefix="t", shard=0, transaction_timeout_s=60)
        self.producer.init()
        self.ledger = ShardLedger(0)
        self.worker = ShardWorker(
            config,
            0,
            self.producer,
            self.ledger,
            stop=threading.Event(),
            session_factory=lambda m: drops[m.id].session(),
            hooks=CycleHooks(on_published=self.published.append),
            clock_ms=lambda: self.now[0],
        )
        self.pool = ThreadPoolExecutor(4)

    def round(self, *ids: str) -> list[Any]:
        ms = [self.config.mailbox(i) for i in (ids or [m.id for m in self.config.mailboxes])]
        return self.worker.round(ms, self.pool)


@pytest.fixture
def drop() -> Iterator[Maildrop]:
    yield Maildrop({f"U{i}": make_mail(i)[0] for i in range(4)})


def test_commit_then_dele_then_tombstones(drop: Maildrop) -> None:
    h = Harness(cfg([{"id": "a"}]), {"a": drop})
    (r,) = h.round()
    assert r.ok and (r.published, r.deleted) == (4, 4)
    assert drop.mails == {} and h.published == ["U0", "U1", "U2", "U3"]
    assert drop.log.index("DELE 1") > drop.log.index("RETR 4") and drop.log[-1] == "QUIT"
    assert h.ledger.known("a") == {}  # deleted by us -> forgotten; tombstones go out next round
    assert len(h.worker._tombstones) == 4
    (r,) = h.round()
    assert r.ok and r.published == 0 and h.worker._tombstones == []


def test_known_uidls_are_deleted_not_republished(drop: Maildrop) -> None:
    """A crash after the commit and before DELE leaves mail that the ledger knows."""
    h = Harness(cfg([{"id": "a"}]), {"a": drop})
    for i, u in enumerate(["U0", "U1"]):
        h.ledger.record(LedgerEntry("a", u, "delivered", 0, topic="mail", partition=0, offset=i))
    (r,) = h.round()
    assert r.ok and r.published == 2 and r.deleted == 4 and drop.mails == {}
    assert h.published == ["U2", "U3"]


def test_kafka_failure_aborts_the_round_and_deletes_nothing(drop: Maildrop) -> None:
    class FailingProducer(ShardProducer):
        def check(self, deliveries: Any) -> DeliveryError | None:
            return DeliveryError("injected: broker refused the records")

    h = Harness(cfg([{"id": "a"}]), {"a": drop}, FailingProducer)
    (r,) = h.round()
    assert isinstance(r.error, DeliveryError) and r.deleted == 0
    assert len(drop.mails) == 4 and "QUIT" not in drop.log and drop.log[-1] == "ABORT"
    assert h.ledger.known("a") == {}


def test_pop3_failure_in_one_mailbox_keeps_what_it_produced(drop: Maildrop) -> None:
    other = Maildrop({"X0": make_mail(10)[0]})

    def fail(cmd: str, n: int) -> None:
        if cmd == "RETR" and n == 3:
            raise Pop3ConnectError("connection reset by peer")

    drop.fail = fail
    h = Harness(cfg([{"id": "a"}, {"id": "b"}]), {"a": drop, "b": other})
    ra, rb = h.round()
    assert isinstance(ra.error, Pop3ConnectError) and ra.error.step == "retr"
    assert rb.ok and rb.deleted == 1 and other.mails == {}
    # U0, U1 were produced before the failure: committed with their ledger entries ...
    assert set(h.ledger.known("a")) == {"U0", "U1"} and len(drop.mails) == 4
    # ... so the next round only deletes them, and fetches the rest once.
    drop.fail = None
    (ra,) = h.round("a")
    assert ra.ok and ra.published == 2 and drop.mails == {}
    assert sorted(h.published) == ["U0", "U1", "U2", "U3", "X0"]


def test_keep_mode_three_cycles_each_mail_once(drop: Maildrop) -> None:
    h = Harness(cfg([{"id": "a", "delete": False}]), {"a": drop})
    h.round()
    drop.add("U10", make_mail(10)[0])
    h.round()
    drop.add("U11", make_mail(11)[0])
    (r,) = h.round()
    assert r.ok and r.deleted == 0 and len(drop.mails) == 6
    assert sorted(h.published) == ["U0", "U1", "U10", "U11", "U2", "U3"]
    assert "DELE" not in " ".join(drop.log)


def test_keep_mode_delete_after_days_with_an_injected_clock(drop: Maildrop) -> None:
    h = Harness(cfg([{"id": "a", "delete": False, "delete_after_days": 2}]), {"a": drop})
    h.round()
    h.now[0] += DAY
    drop.add("U10", make_mail(10)[0])
    (r,) = h.round()
    assert r.deleted == 0 and len(drop.mails) == 5
    h.now[0] += DAY + 1  # the first four are now 2 days old, U10 one day
    (r,) = h.round()
    assert r.deleted == 4 and list(drop.mails) == ["U10"]
    assert sorted(h.published) == ["U0", "U1", "U10", "U2", "U3"]


def test_start_from_now_records_existing_mail_without_publishing(drop: Maildrop) -> None:
    h = Harness(cfg([{"id": "a", "start_from": "now"}]), {"a": drop})
    (r,) = h.round()
    assert r.ok and h.published == [] and len(drop.mails) == 4
    assert {e.state for e in h.ledger.known("a").values()} == {"baseline"}
    drop.add("U10", make_mail(10)[0])
    (r,) = h.round()
    # the new mail is published and deleted; the baseline mail was never published, so delete
    # mode leaves it on the server (only delete_after_days would remove it)
    assert h.published == ["U10"] and sorted(drop.mails) == ["U0", "U1", "U2", "U3"]


def rekey(drop: Maildrop, prefix: str) -> None:
    drop.mails = {f"{prefix}{i}": raw for i, raw in enumerate(drop.mails.values())}


def test_uidl_reset_stops_without_republishing(drop: Maildrop) -> None:
    h = Harness(cfg([{"id": "a", "delete": False}]), {"a": drop})
    h.round()
    rekey(drop, "NEW")  # the server lost its uidlist: same mail, new UIDLs
    (r,) = h.round()
    assert isinstance(r.error, UidlResetError) and "reset its UIDLs" in str(r.error)
    assert h.published == ["U0", "U1", "U2", "U3"]


def test_uidl_reset_rebaseline_then_new_mail_once(drop: Maildrop) -> None:
    h = Harness(cfg([{"id": "a", "delete": False, "on_uidl_reset": "rebaseline"}]), {"a": drop})
    h.round()
    rekey(drop, "NEW")
    (r,) = h.round()
    assert r.ok and h.published == ["U0", "U1", "U2", "U3"]
    drop.add("LATER", make_mail(20)[0])
    h.round()
    assert h.published[-1] == "LATER" and len(h.published) == 5


def test_vanished_uidls_with_new_mail_are_not_a_reset(drop: Maildrop) -> None:
    """Another client deleted our mail and new mail came: no header matches, no alarm."""
    h = Harness(cfg([{"id": "a", "delete": False}]), {"a": drop})
    h.round()
    drop.mails = {f"N{i}": make_mail(100 + i)[0] for i in range(4)}
    (r,) = h.round()
    assert r.ok and len(h.published) == 8


def test_reused_uidl_with_other_mail_is_refused(drop: Maildrop) -> None:
    h = Harness(cfg([{"id": "a", "delete": False}]), {"a": drop})
    h.round()
    drop.mails["U1"] = b"Subject: something else entirely\r\n\r\n" + b"x" * 4000 + b"\r\n"
    (r,) = h.round()
    assert isinstance(r.error, UidlResetError) and "reused a UIDL" in str(r.error)
    assert "TOP 2" in drop.log


def test_absent_entries_are_tombstoned_only_after_the_grace_period(drop: Maildrop) -> None:
    h = Harness(cfg([{"id": "a", "delete": False, "absent_grace_days": 7}]), {"a": drop})
    h.round()
    del drop.mails["U0"]  # e.g. Gmail's per-session window, or a user deleted it
    h.now[0] += DAY
    h.round()
    assert "U0" in h.ledger.known("a")
    h.now[0] += 7 * DAY
    h.round()
    assert "U0" not in h.ledger.known("a") and set(h.ledger.known("a")) == {"U1", "U2", "U3"}


def test_shard_map_is_stable_and_spread() -> None:
    assert shard_of("orders", 8) == shard_of("orders", 8)
    counts = [0] * 8
    for i in range(800):
        counts[shard_of(f"mb{i}", 8)] += 1
    assert min(counts) > 60


def test_ledger_entry_round_trip() -> None:
    e = LedgerEntry("a", "U1", "delivered", 1767258000123, "mail", 2, 41, "ab" * 32, 1234, "cd" * 32, 1767258000000)
    assert LedgerEntry.decode(e.encode()) == e
    led = ShardLedger(0)
    led.apply(e.key, e.encode())
    assert led.known("a")["U1"] == e
    led.apply(e.key, None)
    assert led.known("a") == {}


def test_gmail_style_abort_disconnects_without_quit(drop: Maildrop) -> None:
    """abort_with: disconnect -> a failed round ends sessions with no RSET and no QUIT."""

    class FailingProducer(ShardProducer):
        def check(self, deliveries: Any) -> DeliveryError | None:
            return DeliveryError("injected")

    h = Harness(cfg([{"id": "a", "abort_with": "disconnect"}]), {"a": drop}, FailingProducer)
    (r,) = h.round()
    assert isinstance(r.error, DeliveryError)
    assert drop.log[-1] == "CLOSE" and "QUIT" not in drop.log and "ABORT" not in drop.log


def test_header_identity_fallback_for_servers_without_uidl() -> None:
    from connector.errors import Pop3UnsupportedError

    same = make_mail(1)[0]
    drop = Maildrop({"x1": make_mail(0)[0], "x2": same, "x3": same})  # two identical mails

    def no_uidl(cmd: str, n: int) -> None:
        if cmd == "UIDL":
            raise Pop3UnsupportedError("the server does not support UIDL")

    drop.fail = no_uidl
    h = Harness(cfg([{"id": "a", "delete": False}]), {"a": drop})
    (r,) = h.round()
    assert isinstance(r.error, Pop3UnsupportedError)
    h2 = Harness(cfg([{"id": "a", "delete": False, "identity": "headers"}]), {"a": drop})
    (r,) = h2.round()
    assert r.ok and len(h2.published) == 3 and len(set(h2.published)) == 3
    assert h2.published[2] == h2.published[1] + ".1"  # the repeat is told apart by position
    (r,) = h2.round()
    assert r.ok and len(h2.published) == 3, "nothing new on the second cycle"


def test_fencing_stops_the_shard_loudly_in_logs_and_metrics(drop: Maildrop, caplog: pytest.LogCaptureFixture) -> None:
    from confluent_kafka import KafkaError

    from connector.delivery.transactional import ShardFencedError
    from connector.observability import metrics

    class FencedProducer(ShardProducer):
        def begin(self) -> None:
            self._fatal = KafkaError(KafkaError._FENCED, "fenced by a newer instance", fatal=True)
            raise self.fatal_error()

    h = Harness(cfg([{"id": "a"}]), {"a": drop}, FencedProducer)
    shard = {"shard": "0"}
    before = metrics.value("pop3kafka_fencing_events_total", shard)
    assert metrics.value("pop3kafka_shard_owned", shard) == 1
    (r,) = h.round()
    assert isinstance(r.error, ShardFencedError) and "stops polling the shard" in str(r.error)
    assert h.worker.dead is not None and len(drop.mails) == 4 and "RETR 1" not in drop.log
    assert metrics.value("pop3kafka_fencing_events_total", shard) == before + 1
    assert metrics.value("pop3kafka_shard_owned", shard) == 0
    assert any(rec.levelname == "CRITICAL" and "fenced" in rec.getMessage() for rec in caplog.records)
    (r,) = h.round()  # a dead shard polls nothing
    assert isinstance(r.error, ShardFencedError) and drop.log.count("LOGIN") == 0


def test_transactions_are_counted_by_outcome(drop: Maildrop) -> None:
    from connector.observability import metrics

    labels = {"shard": "0", "outcome": "committed"}
    before = metrics.value("pop3kafka_transactions_total", labels)
    h = Harness(cfg([{"id": "a"}]), {"a": drop})
    h.round()
    assert metrics.value("pop3kafka_transactions_total", labels) == before + 1


def test_oversized_mail_in_exactly_once_delete_and_dead_letter(drop: Maildrop) -> None:
    big = b"Subject: big\r\nMessage-ID: <big@x>\r\n\r\n" + b"0123456789abcdef\r\n" * 40_000  # 720,000 bytes
    drop.mails["BIGDEL"] = big
    h = Harness(cfg([{"id": "a", "max_message_bytes": 100_000, "oversized": "delete"}]), {"a": drop})
    (r,) = h.round()
    assert r.ok and r.published == 4 and r.deleted_unread == 1 and r.deleted == 4 and drop.mails == {}
    assert "RETR 5" not in drop.log  # never read

    other = Maildrop({"U9": make_mail(9)[0], "BIGDL": big})
    h2 = Harness(cfg([{"id": "b", "max_message_bytes": 100_000, "oversized": "dead_letter"}]), {"b": other})
    (r,) = h2.round()
    assert r.ok and r.published == 1 and r.dead_lettered == 1 and other.mails == {}
    states = {e.uidl: e.state for e in h2.ledger.known("b").values()} or None
    # both were deleted after the commit, so the ledger forgot them; the tombstones are queued
    assert states is None and len(h2.worker._tombstones) == 2


# ---------------------------------------------------------------- sessions opened early
# poll-once opens, logs in and lists the first wave's sessions while the shards start
# (Runner.open_early); the round takes them over. Proven end to end in
# tests/integration/test_exactly_once_e2e.py.


def opened_early(h: Harness, mailbox_id: str, factory: Any) -> Prepared:
    m = h.config.mailbox(mailbox_id)
    p = Prepared(m, CycleResult(mailbox=m.id, cycle_id="early-cycle"), t0=0.0)
    p.early = h.pool.submit(open_early, p, factory, h.config)
    return p


def test_a_round_takes_over_a_session_opened_early(drop: Maildrop) -> None:
    other = Maildrop({"X0": make_mail(10)[0]})
    h = Harness(cfg([{"id": "a"}, {"id": "b"}]), {"a": drop, "b": other})
    opened: list[str] = []

    def factory(m: Any) -> Any:
        opened.append(m.id)
        return h.drops[m.id].session()

    p = opened_early(h, "a", factory)
    assert p.early is not None
    p.early.result()
    assert drop.log == ["LOGIN", "UIDL"]  # listed before the round began, nothing fetched yet
    ra, rb = h.worker.round([h.config.mailbox("a"), h.config.mailbox("b")], h.pool, {"a": p})
    assert opened == ["a"]  # the round opened no second session for "a" (h's factory did "b")
    assert ra.ok and (ra.published, ra.deleted) == (4, 4) and drop.mails == {}
    assert rb.ok and rb.deleted == 1 and other.mails == {}
    assert ra.cycle_id == rb.cycle_id == "early-cycle"  # one id names the round in the logs
    assert drop.log[:3] == ["LOGIN", "UIDL", "RETR 1"] and drop.log[-1] == "QUIT"


def test_an_early_login_failure_fails_that_mailbox_at_its_step(drop: Maildrop) -> None:
    def refuse(cmd: str, n: int) -> None:
        if cmd == "LOGIN":
            raise Pop3AuthError("authentication failed")

    drop.fail = refuse
    h = Harness(cfg([{"id": "a"}]), {"a": drop})
    p = opened_early(h, "a", lambda m: drop.session())
    (r,) = h.worker.round([h.config.mailbox("a")], h.pool, {"a": p})
    assert isinstance(r.error, Pop3AuthError) and (r.error.mailbox, r.error.step) == ("a", "login")
    assert r.published == 0 and len(drop.mails) == 4
    assert drop.log == ["LOGIN", "ABORT"]  # ended without deletes (RFC 1939 §6), never QUIT


def test_an_early_session_the_round_cannot_start_is_ended_without_deletes(drop: Maildrop) -> None:
    h = Harness(cfg([{"id": "a"}]), {"a": drop})
    p = opened_early(h, "a", lambda m: drop.session())
    p.fetch_until = 0.0  # the round's time limit is used up before this session's turn
    h.worker._fetch(p)
    assert p.session is None and p.result.more_pending and p.result.error is None
    assert drop.log == ["LOGIN", "UIDL", "ABORT"] and len(drop.mails) == 4


def test_early_sessions_of_a_round_that_fails_at_begin_are_ended(drop: Maildrop) -> None:
    class RefusingBegin(ShardProducer):
        def begin(self) -> None:
            raise DeliveryError("injected: begin_transaction failed")

    h = Harness(cfg([{"id": "a"}]), {"a": drop}, RefusingBegin)
    p = opened_early(h, "a", lambda m: drop.session())
    (r,) = h.worker.round([h.config.mailbox("a")], h.pool, {"a": p})
    assert isinstance(r.error, DeliveryError) and r.error.step == "produce"
    assert drop.log == ["LOGIN", "UIDL", "ABORT"] and len(drop.mails) == 4


def eos_runner(drops: dict[str, Maildrop], **runtime: Any) -> Runner:
    config = cfg([{"id": i} for i in drops], delivery={"mode": "exactly_once"}, runtime=runtime)
    return Runner(config, session_factory=lambda m: drops[m.id].session())


def test_runner_close_ends_early_sessions_no_round_took(drop: Maildrop) -> None:
    """prepare() failed (Kafka unreachable): the sessions opened beside it end, nothing deleted."""
    other = Maildrop({"X0": make_mail(10)[0]})
    runner = eos_runner({"a": drop, "b": other})
    runner.open_early(runner.config.mailboxes)
    runner.close()
    for d in (drop, other):
        assert d.log == ["LOGIN", "UIDL", "ABORT"]
    assert len(drop.mails) == 4 and len(other.mails) == 1


def test_runner_opens_nothing_early_when_the_first_wave_exceeds_the_session_limit(drop: Maildrop) -> None:
    drops = {i: Maildrop({"X0": make_mail(10)[0]}) for i in ("a", "b", "c")}
    runner = eos_runner(drops, max_concurrent_sessions=2)
    runner.open_early(runner.config.mailboxes)
    runner.close()
    assert all(d.log == [] for d in drops.values())


def test_large_mail_read_ahead_commits_in_order_and_a_failure_keeps_what_was_produced(
    drop: Maildrop, tmp_path: Any
) -> None:
    # Every mail over the spool threshold: the round's retrieval runs one mail ahead in a
    # thread of its own (connector/runtime/readahead.py).
    readers: set[str] = set()

    def fail(cmd: str, n: int) -> None:
        if cmd == "RETR":
            readers.add(threading.current_thread().name)
            if n == 3:
                raise Pop3ConnectError("connection reset by peer")

    drop.fail = fail
    spool = {"runtime": {"spool_threshold_bytes": 1, "spool_directory": str(tmp_path)}}
    h = Harness(cfg([{"id": "a"}], **spool), {"a": drop})
    (r,) = h.round()
    assert isinstance(r.error, Pop3ConnectError) and r.error.step == "retr"
    assert readers == {"read-ahead-a"}
    assert set(h.ledger.known("a")) == {"U0", "U1"} and len(drop.mails) == 4
    drop.fail = None
    (r,) = h.round()
    assert r.ok and r.published == 2 and drop.mails == {}
    assert h.published == ["U0", "U1", "U2", "U3"]
    assert list(tmp_path.iterdir()) == []
