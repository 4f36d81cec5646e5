"""Cycle results -> Prometheus metrics (connector/observability/metrics.py).

The runner calls :func:`cycle_done` for every finished cycle (scheduled, on demand, poll-once);
shard workers record their transactions themselves. Labels stay bounded: the mailbox's
configured id, the server's configured host:port, outcome and reason codes from fixed lists.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from connector.config.model import MailboxConfig
from connector.delivery import kafka
from connector.errors import (
    DeliveryError,
    Pop3AuthError,
    Pop3ConnectError,
    Pop3Error,
    Pop3LoginDelayError,
    Pop3MailboxBusyError,
    Pop3TimeoutError,
    Pop3TlsError,
)
from connector.observability import metrics
from connector.runtime.sessions import CycleResult

#: per mailbox: UIDL -> Unix time this process first listed it while it was waiting (see
#: CycleResult.waiting); replaced by each cycle's listing, so bounded by what the servers hold.
_first_listed: dict[str, dict[str, float]] = {}
_lock = threading.Lock()


def outcome(error: BaseException | None) -> str:
    """A cycle's outcome for the ``outcome``/``reason`` labels (metrics.CYCLE_OUTCOMES)."""
    if error is None:
        return "ok"
    # Most specific first: the TLS error is a connect error, OAuth token errors are auth errors.
    for kind, label in (
        (Pop3MailboxBusyError, "in_use"),
        (Pop3LoginDelayError, "login_delay"),
        (Pop3AuthError, "auth"),
        (Pop3TlsError, "tls"),
        (Pop3TimeoutError, "timeout"),
        (Pop3ConnectError, "connect"),
        (Pop3Error, "protocol"),
        (DeliveryError, "kafka"),
    ):
        if isinstance(error, kind):
            return label
    return "other"


def cycle_done(mailbox: MailboxConfig, r: CycleResult, now: float | None = None) -> None:
    """Record one finished cycle of ``mailbox``."""
    now = time.time() if now is None else now
    mid = mailbox.id
    kind = outcome(r.error)
    metrics.CYCLES.labels(mid, kind).inc()
    metrics.CYCLE_DURATION.labels(mid).observe(r.duration_s)
    if r.fetched:
        metrics.MAILS_FETCHED.labels(mid).inc(r.fetched)
    if r.fetched_bytes:
        metrics.BYTES_FETCHED.labels(mid).inc(r.fetched_bytes)
    if r.published:
        metrics.MAILS_PUBLISHED.labels(mid).inc(r.published)
    deleted = r.deleted + r.deleted_unread
    if deleted:
        metrics.MAILS_DELETED.labels(mid).inc(deleted)
    for reason, n in r.dead_letter_reasons.items():
        metrics.MAILS_DEAD_LETTERED.labels(mid, reason).inc(n)
    for reason, n in (
        ("undecodable", r.undecodable),
        ("oversized", r.oversized),
        ("long_lines", r.long_lines),
        ("too_large", r.too_large),
    ):
        if n:
            metrics.MAILS_LEFT.labels(mid, reason).inc(n)
    if r.error is not None and not r.logged_in and kind != "kafka":
        metrics.LOGIN_FAILURES.labels(mid, kind if kind in metrics.LOGIN_FAILURE_REASONS else "other").inc()
    if kind == "in_use":
        metrics.IN_USE.labels(mid).inc()
    if r.ok:
        metrics.LAST_SUCCESS.labels(mid).set(now)
    if r.tls_not_after is not None:
        metrics.TLS_EXPIRY.labels(mailbox.server).set(r.tls_not_after)
    if r.logged_in:
        # The listing happened: the backlog gauges follow it (a failed login says nothing).
        metrics.BACKLOG_MESSAGES.labels(mid).set(r.listed)
        metrics.BACKLOG_BYTES.labels(mid).set(r.listed_bytes)
        metrics.OLDEST_UNDELETED.labels(mid).set(_oldest_age(mid, r.waiting, now))
    source = mailbox.oauth2
    if source is not None:
        expires = getattr(source, "expires_at", lambda: None)()
        if expires is not None:
            metrics.OAUTH_EXPIRY.labels(mid).set(expires - now)


def _oldest_age(mailbox_id: str, waiting: Iterable[str], now: float) -> float:
    with _lock:
        before = _first_listed.get(mailbox_id, {})
        seen = {u: before.get(u, now) for u in waiting}
        _first_listed[mailbox_id] = seen
    return max(0.0, now - min(seen.values())) if seen else 0.0


def forget(mailbox_ids: Iterable[str]) -> None:
    """Mailboxes removed by a reload: their series and backlog memory go."""
    ids = list(mailbox_ids)
    with _lock:
        for mid in ids:
            _first_listed.pop(mid, None)
    metrics.forget_mailboxes(ids)


def mailboxes_polled(mailboxes: Iterable[MailboxConfig]) -> None:
    """Mailboxes this process polls (at start, after a reload, when shards arrive): their
    counters exist from 0; the certificate series of servers none of them uses go."""
    polled = list(mailboxes)
    metrics.known_mailboxes(m.id for m in polled)
    metrics.keep_servers(m.server for m in polled if m.tls != "none")


def readiness(ready: Callable[[], bool]) -> None:
    """pop3kafka_ready follows ``ready`` (read at each scrape)."""
    metrics.READY.set_function(lambda: 1.0 if ready() else 0.0)


def paused(mailbox_id: str, on: bool) -> None:
    metrics.PAUSED.labels(mailbox_id).set(1 if on else 0)


def shards_owned(owned: Iterable[int], known: Iterable[int]) -> None:
    """The shards this process owns now (1) among those it ever had (0)."""
    mine = set(owned)
    for shard in set(known) | mine:
        metrics.SHARD_OWNED.labels(str(shard)).set(1 if shard in mine else 0)
    metrics.SHARDS_OWNED.set(len(mine))


class KafkaObserver:
    """Delivery latency and librdkafka statistics of our producers (connector.delivery.kafka)."""

    def delivered(self, latency_s: float) -> None:
        metrics.DELIVERY_LATENCY.observe(latency_s)

    def statistics(self, client: str, stats: Mapping[str, Any]) -> None:
        metrics.PRODUCER_QUEUE_MESSAGES.labels(client).set(float(stats.get("msg_cnt", 0)))
        metrics.PRODUCER_QUEUE_BYTES.labels(client).set(float(stats.get("msg_size", 0)))
        brokers = stats.get("brokers") or {}
        for b in brokers.values():
            if int(b.get("nodeid", -1)) < 0:
                continue  # the bootstrap placeholders, before the cluster's own names are known
            name = str(b.get("nodename") or b.get("name"))
            metrics.BROKER_UP.labels(client, name).set(1 if b.get("state") == "UP" else 0)
            rtt = (b.get("rtt") or {}).get("avg")
            if rtt:
                metrics.BROKER_RTT.labels(client, name).set(float(rtt) / 1e6)  # librdkafka: microseconds

    def closed(self, client: str) -> None:
        metrics.forget_client(client)


def install() -> None:
    """Start observing our Kafka producers (call once, before they are created)."""
    kafka.OBSERVER = KafkaObserver()
