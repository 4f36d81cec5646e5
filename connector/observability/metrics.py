"""Prometheus metrics (prometheus-client), served at ``GET /metrics`` of the admin endpoint.

Naming follows Prometheus conventions: base units (seconds, bytes), ``_total`` for counters
(prometheus-client appends it), ``pop3kafka_`` prefix. Labels are bounded: ``mailbox`` is the
configured short id (never an address), ``server`` the configured host:port, ``shard`` a
number, ``outcome``/``reason`` come from fixed vocabularies (``CYCLE_OUTCOMES``,
``LOGIN_FAILURE_REASONS``, the dead-letter reasons of connector/errors.py), ``client`` names
one of our producers. Only the runtime records them (docs/operations.md lists each metric and
what to alert on); domain layers never import this module.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from connector import __version__

REGISTRY = CollectorRegistry(auto_describe=True)
# process_* (CPU, memory, open files, start time: restarts) and python_info, as every Python
# exporter has them.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

#: a cycle's outcome: ok, or the kind of its failure.
CYCLE_OUTCOMES = ("ok", "auth", "in_use", "login_delay", "connect", "timeout", "tls", "protocol", "kafka", "other")
#: why a login failed (a subset of the cycle outcomes: those that happen before or at login).
LOGIN_FAILURE_REASONS = ("auth", "in_use", "login_delay", "connect", "timeout", "tls", "protocol", "other")

# ---------------------------------------------------------------------------------- cycles

CYCLES = Counter(
    "pop3kafka_cycles",
    "Poll cycles by mailbox and outcome (ok, or the kind of failure).",
    ["mailbox", "outcome"],
    registry=REGISTRY,
)
CYCLE_DURATION = Histogram(
    "pop3kafka_cycle_duration_seconds",
    "Duration of poll cycles, from connect to QUIT.",
    ["mailbox"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
MAILS_FETCHED = Counter(
    "pop3kafka_mails_fetched", "Mails retrieved (RETR) from the server.", ["mailbox"], registry=REGISTRY
)
BYTES_FETCHED = Counter(
    "pop3kafka_fetched_bytes", "Bytes of mail retrieved (RETR) from the server.", ["mailbox"], registry=REGISTRY
)
MAILS_PUBLISHED = Counter(
    "pop3kafka_mails_published",
    "Mail records Kafka confirmed (committed, in exactly_once mode).",
    ["mailbox"],
    registry=REGISTRY,
)
MAILS_DELETED = Counter(
    "pop3kafka_mails_deleted",
    "Mails deleted from the server after Kafka had them (DELE applied at QUIT).",
    ["mailbox"],
    registry=REGISTRY,
)
MAILS_DEAD_LETTERED = Counter(
    "pop3kafka_mails_dead_lettered",
    "Mails that could not be decoded, confirmed on the dead-letter topic, by reason.",
    ["mailbox", "reason"],
    registry=REGISTRY,
)
SIGNATURE_CHECKS = Counter(
    "pop3kafka_signature_checks",
    "S/MIME signature layers checked while decoding, by verdict (valid, invalid, unchecked) and reason.",
    ["mailbox", "verdict", "reason"],
    registry=REGISTRY,
)
MAILS_LEFT = Counter(
    "pop3kafka_mails_left",
    "Mails left on the server by a cycle, by why (undecodable, oversized, long_lines, too_large).",
    ["mailbox", "reason"],
    registry=REGISTRY,
)
LOGIN_FAILURES = Counter(
    "pop3kafka_login_failures",
    "Cycles that ended before or at the login, by reason (auth, in_use, login_delay, connect, ...).",
    ["mailbox", "reason"],
    registry=REGISTRY,
)
IN_USE = Counter(
    "pop3kafka_in_use",
    "Logins refused with [IN-USE] (RFC 2449: another session holds the maildrop); retried later.",
    ["mailbox"],
    registry=REGISTRY,
)
BACKLOG_MESSAGES = Gauge(
    "pop3kafka_mailbox_messages",
    "Messages on the server at the last cycle's listing (UIDL/LIST).",
    ["mailbox"],
    registry=REGISTRY,
)
BACKLOG_BYTES = Gauge(
    "pop3kafka_mailbox_bytes",
    "Octets on the server at the last cycle's listing (LIST sizes).",
    ["mailbox"],
    registry=REGISTRY,
)
OLDEST_UNDELETED = Gauge(
    "pop3kafka_mailbox_oldest_undeleted_age_seconds",
    "Age of the oldest mail waiting on the server at the last listing, counted from when this process "
    "first listed it (keep mode: only mail not yet published); 0 when none waits.",
    ["mailbox"],
    registry=REGISTRY,
)
PAUSED = Gauge(
    "pop3kafka_mailbox_paused",
    "1 while an operator has paused the mailbox (admin endpoint), else 0.",
    ["mailbox"],
    registry=REGISTRY,
)
LAST_SUCCESS = Gauge(
    "pop3kafka_last_success_timestamp_seconds",
    "Unix time of the mailbox's last successful cycle.",
    ["mailbox"],
    registry=REGISTRY,
)
OAUTH_EXPIRY = Gauge(
    "pop3kafka_oauth_token_expiry_seconds",
    "Seconds until the mailbox's cached OAuth2 access token expires (negative: expired).",
    ["mailbox"],
    registry=REGISTRY,
)
TLS_EXPIRY = Gauge(
    "pop3kafka_tls_certificate_expiry_timestamp_seconds",
    "Unix time at which the POP3 server's certificate (notAfter) expires, as last seen.",
    ["server"],
    registry=REGISTRY,
)

# ---------------------------------------------------------------------------------- Kafka

TRANSACTIONS = Counter(
    "pop3kafka_transactions",
    "Shard transactions by outcome (committed, aborted).",
    ["shard", "outcome"],
    registry=REGISTRY,
)
TRANSACTION_DURATION = Histogram(
    "pop3kafka_transaction_duration_seconds",
    "From begin_transaction to the end of the commit or abort of a shard round.",
    ["shard"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
DELIVERY_LATENCY = Histogram(
    "pop3kafka_kafka_delivery_latency_seconds",
    "From produce() to the broker's delivery report, per mail, chunk or dead-letter record (ledger entries "
    "and tombstones have none: their transaction's commit confirms them).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
FENCING_EVENTS = Counter(
    "pop3kafka_fencing_events",
    "Times a shard's producer was fenced by a newer owner (another process took the shard).",
    ["shard"],
    registry=REGISTRY,
)
PRODUCER_FATAL = Counter(
    "pop3kafka_producer_fatal_errors",
    "Fatal producer errors other than fencing; the shard stops.",
    ["shard"],
    registry=REGISTRY,
)
SHARD_OWNED = Gauge(
    "pop3kafka_shard_owned",
    "1 while this process owns and polls the shard, 0 after it was fenced, failed or moved.",
    ["shard"],
    registry=REGISTRY,
)
SHARDS_OWNED = Gauge("pop3kafka_shards_owned", "Shards this process owns, fenced in and loaded.", registry=REGISTRY)
LEDGER_ENTRIES = Gauge(
    "pop3kafka_ledger_entries", "UIDL ledger entries held for the shard.", ["shard"], registry=REGISTRY
)
PRODUCER_QUEUE_MESSAGES = Gauge(
    "pop3kafka_producer_queue_messages",
    "Records in the producer's queue, not yet delivered (librdkafka statistics msg_cnt).",
    ["client"],
    registry=REGISTRY,
)
PRODUCER_QUEUE_BYTES = Gauge(
    "pop3kafka_producer_queue_bytes",
    "Bytes in the producer's queue (librdkafka statistics msg_size).",
    ["client"],
    registry=REGISTRY,
)
BROKER_UP = Gauge(
    "pop3kafka_kafka_broker_up",
    "1 when the producer's connection to the broker is UP (librdkafka statistics).",
    ["client", "broker"],
    registry=REGISTRY,
)
BROKER_RTT = Gauge(
    "pop3kafka_kafka_broker_rtt_seconds",
    "Average round-trip time to the broker over the last statistics window.",
    ["client", "broker"],
    registry=REGISTRY,
)

# ---------------------------------------------------------------------------------- process

READY = Gauge(
    "pop3kafka_ready",
    "1 when every shard this process owns is fenced in and loaded (what /readyz answers 200 for).",
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "pop3kafka_build_info",
    "Always 1; the labels name the version of pop3-kafka and of Python.",
    ["version", "python"],
    registry=REGISTRY,
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)


def exposition() -> bytes:
    """The registry in the Prometheus text format (what GET /metrics answers)."""
    return generate_latest(REGISTRY)


def value(name: str, labels: dict[str, str] | None = None) -> float:
    """Current value of a sample (tests and diagnostics); 0 when it does not exist yet."""
    got = REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if got is None else got


def known_mailboxes(ids: Iterable[str]) -> None:
    """Create the main counters of ``ids`` at 0, so that the first event after a start is an
    increase Prometheus sees (``increase()`` cannot see a series born at 1)."""
    for mid in ids:
        CYCLES.labels(mid, "ok")
        PAUSED.labels(mid)
        for counter in (MAILS_FETCHED, BYTES_FETCHED, MAILS_PUBLISHED, MAILS_DELETED, IN_USE):
            counter.labels(mid)


def signatures_checked(mailbox_id: str, checks: Iterable[Any]) -> None:
    """One count per S/MIME signature layer of a decoded mail (connector.decoding.signature
    SignatureCheck). A mail decoded again after a failed cycle counts again: checks, not mails."""
    for check in checks:
        SIGNATURE_CHECKS.labels(mailbox_id, check.verdict, check.reason or "none").inc()


def forget_mailboxes(ids: Iterable[str]) -> None:
    """Drop the series of mailboxes a reload removed, so that cardinality follows the config."""
    for metric in (
        MAILS_FETCHED,
        BYTES_FETCHED,
        MAILS_PUBLISHED,
        MAILS_DELETED,
        IN_USE,
        PAUSED,
        BACKLOG_MESSAGES,
        BACKLOG_BYTES,
        OLDEST_UNDELETED,
        LAST_SUCCESS,
        OAUTH_EXPIRY,
        CYCLE_DURATION,
    ):
        for mid in ids:
            _remove(metric, mid)
    for labelled in (CYCLES, LOGIN_FAILURES, MAILS_DEAD_LETTERED, MAILS_LEFT, SIGNATURE_CHECKS):
        for mid in ids:
            for key in list(_label_sets(labelled)):
                if key[0] == mid:
                    _remove(labelled, *key)


def forget_client(client: str) -> None:
    """A producer closed (its shard moved, the process stops): its queue and broker series go,
    so no frozen "broker up" value outlives it."""
    for metric in (PRODUCER_QUEUE_MESSAGES, PRODUCER_QUEUE_BYTES):
        _remove(metric, client)
    for metric in (BROKER_UP, BROKER_RTT):
        for key in list(_label_sets(metric)):
            if key[0] == client:
                _remove(metric, *key)


def keep_servers(servers: Iterable[str]) -> None:
    """Only the POP3 servers still polled keep their certificate-expiry series."""
    keep = set(servers)
    for key in list(_label_sets(TLS_EXPIRY)):
        if key[0] not in keep:
            _remove(TLS_EXPIRY, *key)


def _label_sets(metric: Any) -> list[tuple[str, ...]]:
    # prometheus-client keeps children in ``_metrics`` keyed by label values; no public lister.
    with metric._lock:
        return list(metric._metrics)


def _remove(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never recorded for this mailbox
        metric.remove(*labels)
