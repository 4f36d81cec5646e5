"""Kafka delivery: an idempotent producer whose every record is confirmed before we act on it.

Contract: :meth:`Publisher.send` queues one record and returns a :class:`Delivery`;
:meth:`Publisher.wait` blocks until each given delivery has a report from the broker, or the
deadline passes. Only a record whose report says "written" (acks=all, idempotent) may lead to
a DELE on the POP3 server. The producer is shared by all mailbox threads (librdkafka is
thread-safe); each cycle waits only for its own deliveries.

Exactly-once with transactions and a UIDL ledger is a later step (docs/decisions); this
producer gives at-least-once: a crash between the broker's ack and the DELE re-publishes the
mail next cycle with the same record id (Kafka header ``pop3kafka.record_id``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from connector.errors import (
    ConfigError,
    ConnectorError,
    DeliveryError,
    DeliveryFatalError,
    DeliveryTimeoutError,
    RecordTooLargeError,
)

log = logging.getLogger("pop3kafka.rdkafka")


#: default local producer queue bound (queue.buffering.max.kbytes); kafka.client may override it.
QUEUE_KBYTES = 16 * 1024
#: librdkafka statistics every this often when an observer is installed (kafka.client's
#: statistics.interval.ms wins).
STATISTICS_INTERVAL_MS = 15_000


class DeliveryObserver(Protocol):
    """What the operations layer learns from our producers (connector/observability/metrics.py
    installs one; this layer does not know about Prometheus)."""

    def delivered(self, latency_s: float) -> None:
        """A record was confirmed ``latency_s`` after it was produced."""

    def statistics(self, client: str, stats: Mapping[str, Any]) -> None:
        """librdkafka's statistics of the producer named ``client`` (e.g. "shard-3")."""

    def closed(self, client: str) -> None:
        """The producer named ``client`` was closed: what was observed of it is stale."""


#: set once at start by the runtime; None: nothing is observed, no statistics are asked for.
OBSERVER: DeliveryObserver | None = None


@dataclass(slots=True)
class Delivery:
    """The fate of one produced record, filled in by librdkafka's delivery callback.

    ``done`` is a plain flag, not a threading.Event: the report is served by poll() or flush()
    in whichever thread calls them, and a waiter calls those itself (:meth:`Publisher.wait`),
    so nothing ever blocks on it. Creating and setting an Event took 2.7 us per record, the
    flag 0.14 us."""

    topic: str
    done: bool = False
    partition: int | None = None
    offset: int | None = None
    error: KafkaError | None = None

    @property
    def ok(self) -> bool:
        return self.done and self.error is None


def client_config_error(exc: KafkaException) -> ConnectorError:
    """librdkafka refused the client settings: a configuration error naming kafka.client."""
    err = exc.args[0]
    text = err.str() if isinstance(err, KafkaError) else str(err)
    return ConfigError(f"kafka.client: librdkafka refused the settings: {text}")


def producer_config(bootstrap: str, client: Mapping[str, Any], delivery_timeout_s: float) -> dict[str, Any]:
    """librdkafka settings: the operator's pass-through keys, then the ones our guarantee needs."""
    conf: dict[str, Any] = {
        # 25 ms, not librdkafka's 5: a poll-once of 2,000 x 24 KB mails then sends ~1 MB batches
        # instead of ~250 KB ones, and the connector and the broker together used 0.2-0.37 CPU s
        # less (wall 1.37 -> 1.26 s on 2 CPUs; docs/decisions/0001, "Second round"). Records
        # become visible at the commit (exactly-once) or are waited for with flush()
        # (Publisher.wait), so the linger delays a mail at most once per mailbox and cycle.
        "linger.ms": 25,
        "compression.type": "zstd",
        "client.id": "pop3-kafka",
        # librdkafka's default local queue is 1 GiB: a 200 MB attachment produced as chunk
        # records would sit there whole. 16 MiB holds about 30 chunks of 512 KiB; a full queue
        # makes send() wait for delivery reports (backpressure), it does not grow.
        "queue.buffering.max.kbytes": QUEUE_KBYTES,
    }
    conf.update(client)
    conf.update(
        {
            "bootstrap.servers": bootstrap,
            # Idempotence gives acks=all, in-order, no duplicates from librdkafka's own retries.
            "enable.idempotence": True,
            "acks": "all",
            # A record not confirmed in this time gets an error report instead of waiting forever,
            # so a cycle against a dead broker ends and deletes nothing.
            "message.timeout.ms": int(delivery_timeout_s * 1000),
        }
    )
    return conf


class Publisher:
    """Thin owner of one confluent_kafka Producer; created lazily, no network in __init__."""

    def __init__(
        self,
        bootstrap: str,
        client: Mapping[str, Any],
        delivery_timeout_s: float,
        logger: logging.Logger | None = None,
        *,
        name: str = "publisher",
    ) -> None:
        #: names this producer in metrics (``client`` label): "publisher" or "shard-<n>".
        self.name = name
        self._conf = producer_config(bootstrap, client, delivery_timeout_s)
        self._timeout = delivery_timeout_s
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        self._bootstrap = bootstrap
        self._fatal: KafkaError | None = None
        self._log = logger or log

    def _get(self) -> Producer:
        with self._lock:
            if self._producer is None:
                conf = dict(self._conf)
                conf["error_cb"] = self._on_error
                conf["logger"] = self._log
                if OBSERVER is not None:
                    conf.setdefault("statistics.interval.ms", STATISTICS_INTERVAL_MS)
                    conf["stats_cb"] = self._on_statistics
                try:
                    self._producer = Producer(conf)
                except KafkaException as exc:
                    raise client_config_error(exc) from exc
            return self._producer

    def start(self) -> None:
        """Create the producer and bring up its first broker connection now, with a metadata
        request. Without a connection, an idempotent producer asks for its producer id again
        only after librdkafka's fixed 500 ms, and no record leaves before it has one: the first
        delivery took 0.5-1.0 s from a cold start and 0.06 s after this (measured against the
        local broker). Errors are left to the deliveries and calls that follow, which report
        them; this waits at most 2 s (or the delivery timeout, if shorter)."""
        producer = self._get()
        with contextlib.suppress(KafkaException):
            producer.list_topics(timeout=min(2.0, self._timeout))

    def _on_statistics(self, raw: str) -> None:
        observer = OBSERVER
        if observer is None:
            return
        try:
            observer.statistics(self.name, json.loads(raw))
        except Exception:  # noqa: BLE001 - metrics must never break delivery
            self._log.debug("kafka statistics not recorded", exc_info=True)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
            self._log.error("kafka fatal error: %s", err.str())
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._log.warning("kafka: all brokers down (%s); records wait until the delivery timeout", self._bootstrap)
        else:
            self._log.debug("kafka client error: %s", err.str())

    def send(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        partition: int | None = None,
    ) -> Delivery:
        """Queue one record (``value`` None = a tombstone; ``partition`` None = by key hash).

        Never blocks longer than a full local queue takes to drain a little.
        """
        d = Delivery(topic)
        sent = time.monotonic()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            d.error = err
            if err is None:
                d.partition = msg.partition()
                d.offset = msg.offset()
                observer = OBSERVER
                if observer is not None:
                    observer.delivered(time.monotonic() - sent)
            d.done = True

        self._produce(topic, key, value, headers, partition=partition, on_delivery=on_delivery)
        return d

    def _produce(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        *,
        partition: int | None,
        on_delivery: Callable[[KafkaError | None, Message], None] | None,
    ) -> None:
        """produce(), waiting (within the delivery timeout) while the local queue is full."""
        if self._fatal is not None:
            raise DeliveryFatalError(f"producer is in a fatal state: {self._fatal.str()}")
        producer = self._get()
        kwargs: dict[str, Any] = {"value": value, "key": key}
        if headers:
            kwargs["headers"] = list(headers)
        if partition is not None:
            kwargs["partition"] = partition
        if on_delivery is not None:
            kwargs["on_delivery"] = on_delivery
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                # Local queue full: serve delivery reports to make room, bounded by the timeout.
                if time.monotonic() > deadline:
                    raise DeliveryTimeoutError(
                        f"local producer queue stayed full for {self._timeout:.0f}s "
                        f"(is the broker at {self._bootstrap} reachable?)"
                    ) from None
                producer.poll(0.1)
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    size = len(value) if value is not None else 0
                    raise RecordTooLargeError(f"record of {size} bytes exceeds message.max.bytes") from exc
                raise DeliveryError(f"produce to {topic!r} failed: {err.str()}") from exc
        producer.poll(0)

    @property
    def fatal(self) -> str | None:
        """librdkafka's fatal error, if one happened: the producer is then unusable."""
        return self._fatal.str() if self._fatal is not None else None

    def wait(
        self,
        deliveries: Sequence[Delivery],
        timeout: float | None = None,
        stop: threading.Event | None = None,
        stop_grace: float = 10.0,
    ) -> None:
        """Block until every delivery has a report or the deadline passes.

        Never raises for a failed record: callers look at each :class:`Delivery` and delete
        only what is ``ok``. The deadline is the delivery timeout plus a margin, because
        librdkafka itself times records out at message.timeout.ms. Once ``stop`` is set
        (shutdown), the wait ends at most ``stop_grace`` seconds later, so a dead broker
        cannot hold a SIGTERM beyond the grace period; unconfirmed records are then treated
        as failed and nothing of theirs is deleted.
        """
        if not deliveries:
            return
        producer = self._get()
        deadline = time.monotonic() + (timeout if timeout is not None else self._timeout + 5.0)
        stop_seen = False
        for d in deliveries:
            while not d.done:
                if stop is not None and not stop_seen and stop.is_set():
                    stop_seen = True
                    deadline = min(deadline, time.monotonic() + stop_grace)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                # flush(), not poll(): both serve the delivery reports, but flush() also sends
                # the batches still lingering (linger.ms) at once: waited for, they are due now.
                producer.flush(min(0.1, remaining))

    def check(self, deliveries: Sequence[Delivery]) -> DeliveryError | None:
        """Summarise the failures among ``deliveries`` as one error (or None when all are ok)."""
        failed = [d for d in deliveries if not d.ok]
        if not failed:
            return None
        pending = sum(1 for d in failed if not d.done)
        errors = sorted({d.error.str() for d in failed if d.error is not None})
        codes = {d.error.code() for d in failed if d.error is not None}
        detail = "; ".join(errors) if errors else "no report"
        msg = (
            f"Kafka did not confirm {len(failed)} of {len(deliveries)} records (bootstrap {self._bootstrap}): {detail}"
        )
        if pending:
            msg += f" ({pending} still without a report)"
        if KafkaError.MSG_SIZE_TOO_LARGE in codes:
            return RecordTooLargeError(msg)
        if KafkaError._MSG_TIMED_OUT in codes or pending:
            return DeliveryTimeoutError(msg + "; is the broker reachable?")
        if any(d.error is not None and d.error.fatal() for d in failed):
            return DeliveryFatalError(msg)
        return DeliveryError(msg)

    def close(self, timeout: float = 10.0) -> int:
        """Flush what is queued; returns how many records remained unconfirmed."""
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is None:
            return 0
        observer = OBSERVER
        if observer is not None:
            observer.closed(self.name)
        if self._fatal is not None:
            return 0  # a fatal producer cannot flush; its transaction is aborted by the broker
        try:
            remaining: int = producer.flush(timeout)
        except KafkaException as exc:  # e.g. fenced while flushing
            self._log.warning("flush at close failed: %s", exc.args[0])
            return 0
        return remaining
