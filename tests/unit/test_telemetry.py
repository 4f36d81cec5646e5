"""Metrics from cycle results, transactions and librdkafka statistics (issue 8); the series a
real Prometheus scrapes are checked end to end in tests/integration/test_metrics_e2e.py."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.fakepop import Maildrop
from support.mailgen import make_mail
from test_shard_rounds import Harness, cfg

from connector.config import parse_config
from connector.config.model import MailboxConfig
from connector.delivery import kafka
from connector.errors import (
    DeliveryTimeoutError,
    OAuthTokenError,
    Pop3AuthError,
    Pop3ConnectError,
    Pop3LoginDelayError,
    Pop3MailboxBusyError,
    Pop3ProtocolError,
    Pop3TimeoutError,
    Pop3TlsError,
)
from connector.observability import metrics
from connector.observability.metrics import value
from connector.runtime import telemetry
from connector.runtime.sessions import CycleResult


def mailbox(mid: str) -> MailboxConfig:
    data = {
        "kafka": {"bootstrap_servers": "k:9092"},
        "topics": {"mail": "mail"},
        "mailboxes": [{"id": mid, "host": "pop.example.test", "username": "u", "password": {"env": "PW"}}],
    }
    return parse_config(data, environ={"PW": "x"}).mailboxes[0]


def fresh() -> MailboxConfig:
    """A mailbox id no other test used: the registry is process-wide."""
    return mailbox(f"m-{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (None, "ok"),
        (Pop3MailboxBusyError("[IN-USE]"), "in_use"),
        (Pop3LoginDelayError("[LOGIN-DELAY]"), "login_delay"),
        (Pop3AuthError("bad password"), "auth"),
        (OAuthTokenError("refused"), "auth"),
        (Pop3TlsError("bad cert"), "tls"),
        (Pop3TimeoutError("slow"), "timeout"),
        (Pop3ConnectError("refused"), "connect"),
        (Pop3ProtocolError("garbled"), "protocol"),
        (DeliveryTimeoutError("broker away"), "kafka"),
        (RuntimeError("a bug"), "other"),
    ],
)
def test_outcomes_come_from_a_fixed_list(error: BaseException | None, kind: str) -> None:
    assert telemetry.outcome(error) == kind
    assert kind in metrics.CYCLE_OUTCOMES


def test_a_cycle_counts_what_happened() -> None:
    m = fresh()
    r = CycleResult(
        mailbox=m.id,
        cycle_id="c1",
        listed=5,
        listed_bytes=5000,
        fetched=4,
        fetched_bytes=4200,
        published=3,
        deleted=3,
        deleted_unread=1,
        dead_lettered=1,
        dead_letter_reasons={"max_depth": 1},
        undecodable=1,
        logged_in=True,
        duration_s=0.7,
        waiting=["u1", "u2"],
        tls_not_after=1_900_000_000.0,
    )
    telemetry.cycle_done(m, r, now=1_800_000_000.0)
    lab = {"mailbox": m.id}
    assert value("pop3kafka_cycles_total", {**lab, "outcome": "ok"}) == 1
    assert value("pop3kafka_mails_fetched_total", lab) == 4
    assert value("pop3kafka_fetched_bytes_total", lab) == 4200
    assert value("pop3kafka_mails_published_total", lab) == 3
    assert value("pop3kafka_mails_deleted_total", lab) == 4  # deleted unread (oversized: delete) too
    assert value("pop3kafka_mails_dead_lettered_total", {**lab, "reason": "max_depth"}) == 1
    assert value("pop3kafka_mails_left_total", {**lab, "reason": "undecodable"}) == 1
    assert value("pop3kafka_mailbox_messages", lab) == 5 and value("pop3kafka_mailbox_bytes", lab) == 5000
    assert value("pop3kafka_last_success_timestamp_seconds", lab) == 1_800_000_000.0
    assert value("pop3kafka_cycle_duration_seconds_count", lab) == 1
    assert value("pop3kafka_cycle_duration_seconds_sum", lab) == pytest.approx(0.7)
    assert value("pop3kafka_tls_certificate_expiry_timestamp_seconds", {"server": "pop.example.test:995"}) == (
        1_900_000_000.0
    )
    assert value("pop3kafka_login_failures_total", {**lab, "reason": "auth"}) == 0


def test_login_failures_and_in_use_are_counted_by_reason() -> None:
    m = fresh()
    lab = {"mailbox": m.id}
    for err in (Pop3MailboxBusyError("[IN-USE] locked"), Pop3AuthError("no"), Pop3AuthError("no")):
        telemetry.cycle_done(m, CycleResult(mailbox=m.id, cycle_id="c", error=err))
    assert value("pop3kafka_in_use_total", lab) == 1
    assert value("pop3kafka_login_failures_total", {**lab, "reason": "in_use"}) == 1
    assert value("pop3kafka_login_failures_total", {**lab, "reason": "auth"}) == 2
    assert value("pop3kafka_cycles_total", {**lab, "outcome": "auth"}) == 2
    # nothing listed after a failed login: no backlog gauge is made up
    assert f'pop3kafka_mailbox_messages{{mailbox="{m.id}"}}' not in metrics.exposition().decode()
    # a failure after the login is a failed cycle, not a login failure
    late = CycleResult(mailbox=m.id, cycle_id="c", error=Pop3ConnectError("reset"), logged_in=True)
    telemetry.cycle_done(m, late)
    assert value("pop3kafka_login_failures_total", {**lab, "reason": "connect"}) == 0
    assert value("pop3kafka_cycles_total", {**lab, "outcome": "connect"}) == 1


def test_oldest_undeleted_age_follows_the_listings() -> None:
    m = fresh()
    lab = {"mailbox": m.id}

    def listed(now: float, *uidls: str) -> float:
        telemetry.cycle_done(m, CycleResult(mailbox=m.id, cycle_id="c", logged_in=True, waiting=list(uidls)), now=now)
        return value("pop3kafka_mailbox_oldest_undeleted_age_seconds", lab)

    assert listed(1000.0, "a", "b") == 0.0
    assert listed(1060.0, "b", "c") == 60.0  # b has waited since 1000
    assert listed(1100.0, "c") == 40.0  # b went (deleted); c waits since 1060
    assert listed(1200.0) == 0.0  # empty
    assert listed(1300.0, "c") == 0.0  # c came back: counted afresh (it was gone in between)


def test_removed_mailboxes_lose_their_series() -> None:
    m = fresh()
    telemetry.cycle_done(m, CycleResult(mailbox=m.id, cycle_id="c", logged_in=True, listed=2, published=1))
    telemetry.cycle_done(m, CycleResult(mailbox=m.id, cycle_id="c", error=Pop3AuthError("no")))
    assert f'mailbox="{m.id}"' in metrics.exposition().decode()
    telemetry.forget([m.id])
    assert f'mailbox="{m.id}"' not in metrics.exposition().decode()


def test_oauth_token_expiry_is_exported() -> None:
    m = fresh()

    class Source:
        def expires_at(self) -> float:
            return 2000.0

    object.__setattr__(m, "oauth2", Source())
    telemetry.cycle_done(m, CycleResult(mailbox=m.id, cycle_id="c"), now=1400.0)
    assert value("pop3kafka_oauth_token_expiry_seconds", {"mailbox": m.id}) == 600.0


def test_librdkafka_statistics_become_queue_and_broker_gauges() -> None:
    stats: dict[str, Any] = {
        "msg_cnt": 7,
        "msg_size": 7000,
        "brokers": {
            "127.0.0.1:9092/bootstrap": {"nodeid": -1, "name": "127.0.0.1:9092/bootstrap", "state": "INIT"},
            "127.0.0.1:9092/1": {"nodeid": 1, "nodename": "127.0.0.1:9092", "state": "UP", "rtt": {"avg": 2500}},
            "127.0.0.1:9093/2": {"nodeid": 2, "nodename": "127.0.0.1:9093", "state": "DOWN", "rtt": {"avg": 0}},
        },
    }
    telemetry.KafkaObserver().statistics("shard-99", stats)
    assert value("pop3kafka_producer_queue_messages", {"client": "shard-99"}) == 7
    assert value("pop3kafka_producer_queue_bytes", {"client": "shard-99"}) == 7000
    assert value("pop3kafka_kafka_broker_up", {"client": "shard-99", "broker": "127.0.0.1:9092"}) == 1
    assert value("pop3kafka_kafka_broker_up", {"client": "shard-99", "broker": "127.0.0.1:9093"}) == 0
    assert value("pop3kafka_kafka_broker_rtt_seconds", {"client": "shard-99", "broker": "127.0.0.1:9092"}) == 0.0025
    assert "bootstrap" not in metrics.exposition().decode()


def test_shard_rounds_record_transactions_ledger_and_delivery_latency() -> None:
    telemetry.install()
    assert isinstance(kafka.OBSERVER, telemetry.KafkaObserver)
    before = value("pop3kafka_kafka_delivery_latency_seconds_count")
    drop = Maildrop({f"U{i}": make_mail(i)[0] for i in range(3)})
    h = Harness(cfg([{"id": f"tx-{uuid.uuid4().hex[:6]}"}]), {})
    mid = h.config.mailboxes[0].id
    h.drops[mid] = drop
    shard = {"shard": "0"}
    committed = value("pop3kafka_transactions_total", {**shard, "outcome": "committed"})
    (r,) = h.round()
    assert r.ok and r.published == 3
    assert value("pop3kafka_transactions_total", {**shard, "outcome": "committed"}) == committed + 1
    assert value("pop3kafka_transaction_duration_seconds_count", shard) >= 1
    # The 3 mail records; ledger entries have no report of their own (the commit confirms them)
    assert value("pop3kafka_kafka_delivery_latency_seconds_count") >= before + 3
    assert value("pop3kafka_ledger_entries", shard) == len(h.ledger) == 0  # deleted -> forgotten


def test_the_exposition_follows_prometheus_naming() -> None:
    telemetry.cycle_done(fresh(), CycleResult(mailbox="x", cycle_id="c"))
    families = list(text_string_to_metric_families(metrics.exposition().decode()))
    names = {f.name for f in families if f.name.startswith("pop3kafka_")}
    assert {"pop3kafka_cycles", "pop3kafka_build_info", "pop3kafka_transactions"} <= names
    for f in families:
        if not f.name.startswith("pop3kafka_"):
            continue
        assert re.fullmatch(r"pop3kafka_[a-z0-9_]+", f.name)
        assert f.documentation, f.name
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), f.name
        # base units only
        assert not re.search(r"_(milliseconds|ms|kilobytes|kb|minutes|days)(_|$)", f.name), f.name
    build = [s for f in families if f.name == "pop3kafka_build_info" for s in f.samples]
    assert build and build[0].value == 1 and set(build[0].labels) == {"version", "python"}


def test_admin_endpoint_serves_metrics_without_the_token() -> None:
    import urllib.request

    from connector.config.model import Secret
    from connector.runtime.admin_server import AdminServer
    from connector.runtime.runner import Runner

    runner = Runner(cfg([{"id": "a"}]))
    admin = AdminServer(runner, "127.0.0.1", 0, Secret("s3cret-admin-token-0123456789", "test"))
    admin.start()
    try:
        host, port = admin.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
            ctype = resp.headers["Content-Type"]
        assert ctype.startswith("text/plain; version=0.0.4")
        assert "# TYPE pop3kafka_cycles_total counter" in body and "pop3kafka_build_info{" in body
    finally:
        admin.close()
        runner.close()


def test_counters_of_polled_mailboxes_start_at_zero_and_process_metrics_exist() -> None:
    """A series born at 1 is invisible to increase(): the first dead letter after a restart
    would never alert. Mailboxes this process polls get their counters at 0 up front."""
    m = fresh()
    telemetry.mailboxes_polled([m])
    text = metrics.exposition().decode()
    for name in ("mails_published", "mails_deleted", "mails_fetched", "fetched_bytes", "in_use"):
        assert f'pop3kafka_{name}_total{{mailbox="{m.id}"}} 0.0' in text, name
    assert f'pop3kafka_cycles_total{{mailbox="{m.id}",outcome="ok"}} 0.0' in text
    assert "process_resident_memory_bytes" in text and "process_start_time_seconds" in text
    assert "python_info{" in text
    assert f'pop3kafka_mailbox_paused{{mailbox="{m.id}"}} 0.0' in text
    telemetry.paused(m.id, True)
    assert value("pop3kafka_mailbox_paused", {"mailbox": m.id}) == 1


def test_series_of_closed_producers_and_unpolled_servers_go() -> None:
    obs = telemetry.KafkaObserver()
    up = {"nodeid": 1, "nodename": "b1:9092", "state": "UP", "rtt": {"avg": 1000}}
    obs.statistics("shard-77", {"msg_cnt": 1, "msg_size": 10, "brokers": {"b1:9092/1": up}})
    assert value("pop3kafka_kafka_broker_up", {"client": "shard-77", "broker": "b1:9092"}) == 1
    obs.closed("shard-77")  # the shard moved to another replica: no frozen "up" stays behind
    assert 'client="shard-77"' not in metrics.exposition().decode()

    a, b = mailbox(f"tls-{uuid.uuid4().hex[:6]}"), fresh()
    object.__setattr__(a, "port", 9951)
    for mb in (a, b):
        telemetry.cycle_done(mb, CycleResult(mailbox=mb.id, cycle_id="c", tls_not_after=2e9))
    telemetry.mailboxes_polled([b])  # a is no longer polled here: its server's expiry goes
    text = metrics.exposition().decode()
    assert 'server="pop.example.test:9951"' not in text and 'server="pop.example.test:995"' in text


def test_ready_gauge_follows_the_runner() -> None:
    from connector.runtime.runner import Runner

    runner = Runner(cfg([{"id": f"r-{uuid.uuid4().hex[:6]}"}]))
    try:
        assert value("pop3kafka_ready") == 0
        runner._ready.set()
        assert value("pop3kafka_ready") == 1
        runner.stop.set()
        assert value("pop3kafka_ready") == 0
    finally:
        runner.close()
