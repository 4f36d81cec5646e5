"""Kafka transactions for one shard, and the rebuild of that shard's ledger.

One shard = one ledger partition = one transactional producer with
``transactional.id = <prefix>-shard-<n>`` (design.md section 3). The order on start is
fixed: :meth:`ShardProducer.init` (``init_transactions()`` fences any older producer with
the same id and aborts its open transaction) -> :func:`load_shard_ledger` (read_committed up
to the end of the partition) -> poll.

Errors are handled as librdkafka classifies them (confluent-kafka's eos example):
retriable -> retry the same call; ``txn_requires_abort`` -> abort the transaction and report
:class:`TransactionAbortedError` (nothing committed, nothing may be deleted, retry the cycle
later); fatal, fenced included -> :class:`ShardFencedError` / ``DeliveryFatalError`` (drop
the producer, stop polling the shard's mailboxes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from connector.delivery.kafka import Publisher, client_config_error
from connector.errors import DeliveryError, DeliveryFatalError
from connector.records.ledger import ShardLedger

log = logging.getLogger("pop3kafka.txn")
T = TypeVar("T")

_FENCED_CODES = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})


class TransactionAbortedError(DeliveryError):
    """The shard's transaction was aborted: nothing of it is visible, nothing is deleted (retry)."""


class ShardFencedError(DeliveryFatalError):
    """A newer producer with this shard's transactional.id exists: another process owns the shard."""


def transactional_id(prefix: str, shard: int) -> str:
    return f"{prefix}-shard-{shard}"


class ShardProducer(Publisher):
    """The transactional producer of one shard."""

    def __init__(
        self,
        bootstrap: str,
        client: Mapping[str, Any],
        delivery_timeout_s: float,
        *,
        prefix: str,
        shard: int,
        transaction_timeout_s: float,
    ) -> None:
        super().__init__(bootstrap, client, delivery_timeout_s, name=f"shard-{shard}")
        self.shard = shard
        self.transactional_id = transactional_id(prefix, shard)
        self._conf["transactional.id"] = self.transactional_id
        # The broker aborts a transaction left open longer than this (a hung or dead owner).
        self._conf["transaction.timeout.ms"] = int(transaction_timeout_s * 1000)
        self._call_timeout = max(30.0, delivery_timeout_s)
        self.in_transaction = False

    def _call(self, what: str, fn: Callable[[], T], *, abortable: bool) -> T:
        """Run one transactional API call with librdkafka's error classification."""
        deadline = time.monotonic() + self._call_timeout
        while True:
            try:
                return fn()
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.code() in _FENCED_CODES or (err.fatal() and "fenced" in err.str().lower()):
                    self._fatal = err
                    raise ShardFencedError(
                        f"shard {self.shard}: {what} failed, fenced by a newer owner of transactional.id "
                        f"{self.transactional_id!r}: {err.str()}; this process stops polling the shard"
                    ) from exc
                if err.fatal():
                    self._fatal = err
                    raise DeliveryFatalError(f"shard {self.shard}: {what} failed fatally: {err.str()}") from exc
                if abortable and err.txn_requires_abort():
                    self.abort()
                    raise TransactionAbortedError(
                        f"shard {self.shard}: {what} failed and the transaction was aborted: {err.str()}"
                    ) from exc
                if err.retriable() and time.monotonic() < deadline:
                    log.warning("shard %d: %s: retriable error, retrying: %s", self.shard, what, err.str())
                    time.sleep(0.2)
                    continue
                raise DeliveryError(f"shard {self.shard}: {what} failed: {err.str()}") from exc

    def fatal_error(self) -> DeliveryFatalError:
        """The error to report once librdkafka marked this producer fatal (fenced or other)."""
        err = self._fatal
        text = err.str() if err is not None else "unknown"
        if err is not None and (err.code() in _FENCED_CODES or "fenced" in text.lower()):
            return ShardFencedError(
                f"shard {self.shard}: fenced by a newer owner of transactional.id {self.transactional_id!r} "
                f"({text}); this process stops polling the shard"
            )
        return DeliveryFatalError(f"shard {self.shard}: the producer failed fatally ({text})")

    def init(self) -> None:
        """init_transactions(): fence older producers of this id, abort their open transaction."""
        # A metadata request first (start()): it brings up a broker connection. init_transactions()
        # on a producer with none yet finds no broker for its coordinator lookup and librdkafka
        # tries again only after a fixed 500 ms, which was a third of a small poll-once's
        # wall time (bench/results/compare.md, "Start-up"). Any error there is left to
        # init_transactions, which classifies it. The full metadata: a request for one topic
        # did not avoid the 500 ms in 2 of 4 tries (bench/results/timeline.md).
        self.start()
        producer = self._get()
        self._call("init_transactions", lambda: producer.init_transactions(self._call_timeout), abortable=False)

    def begin(self) -> None:
        producer = self._get()
        self._call("begin_transaction", producer.begin_transaction, abortable=False)
        self.in_transaction = True

    def send_in_transaction(self, topic: str, key: bytes, value: bytes | None, *, partition: int) -> None:
        """Queue a record of the open transaction with no report of its own (a ledger entry or
        tombstone): commit_transaction() flushes it first and fails, the transaction aborting,
        if it could not be delivered (librdkafka, rd_kafka_commit_transaction), so a report
        would say nothing the commit does not. One Python callback less per mail."""
        self._produce(topic, key, value, (), partition=partition, on_delivery=None)

    def commit(self) -> None:
        """Commit; flushes first. Raises TransactionAbortedError after aborting when it must."""
        producer = self._get()
        self._call("commit_transaction", lambda: producer.commit_transaction(self._call_timeout), abortable=True)
        self.in_transaction = False

    def abort(self) -> None:
        """Abort the open transaction; a failure here is logged (the broker times it out anyway)."""
        if not self.in_transaction or self._producer is None:
            return
        self.in_transaction = False
        try:
            # Bounded: with the broker gone this would block; the broker aborts it anyway
            # after transaction.timeout.ms, and the next init_transactions() fences it.
            self._producer.abort_transaction(10.0)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.fatal():
                self._fatal = err
            log.error("shard %d: abort_transaction failed: %s", self.shard, err.str())


def read_ledger_partition(
    bootstrap: str,
    client: Mapping[str, Any],
    topic: str,
    shard: int,
    on_message: Callable[[Message], None],
    *,
    group_id: str,
    timeout: float = 60.0,
) -> tuple[int, int]:
    """Read one ledger partition from its start to its end, read_committed, handing every
    keyed record to ``on_message``; returns (records handed over, end offset). The consumer is
    assigned, never subscribed: ``group_id`` commits nothing."""
    conf = dict(client)
    conf.update(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            # An EOF event tells us we reached the end (past control records, which have
            # offsets but are never delivered).
            "enable.partition.eof": True,
            # At the end the broker would hold each fetch for up to 500 ms waiting for data
            # that is not coming: the EOF arrives that much later.
            "fetch.wait.max.ms": 10,
            "logger": logging.getLogger("pop3kafka.rdkafka.ledger"),
        }
    )
    try:
        consumer = Consumer(conf)
    except KafkaException as exc:
        raise client_config_error(exc) from exc
    try:
        # Where the partition starts and ends, first: an empty one (a new deployment, a shard
        # whose mail is all deleted and compacted) needs no fetch at all. And the start as an
        # absolute offset: a logical one (OFFSET_BEGINNING) costs librdkafka an offset lookup
        # that took 0.5 s here, at every start and shard assignment. When the offsets cannot be
        # had at once (a topic created a moment ago answers "not leader" for a while), the
        # logical start is used and the poll loop below rides out the transient errors.
        start = -2  # OFFSET_BEGINNING
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, shard), timeout=min(timeout, 10.0))
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED):
                raise DeliveryError(
                    f"ledger {topic}[{shard}]: {err.str()}; the connector's principal needs Read on topic "
                    f"{topic!r} (docs/kafka-security.md)"
                ) from exc
        else:
            if high <= low:
                return 0, high
            start = low
        consumer.assign([TopicPartition(topic, shard, start)])
        deadline = time.monotonic() + timeout
        n = 0
        while True:
            if time.monotonic() > deadline:
                raise DeliveryError(
                    f"ledger {topic}[{shard}]: not read to the end within {timeout:.0f}s ({n} entries so far)"
                )
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return n, msg.offset() or 0
                if err.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED):
                    # Not transient: say which ACL is missing instead of waiting out the deadline.
                    raise DeliveryError(
                        f"ledger {topic}[{shard}]: {err.str()}; the connector's principal needs Read on topic "
                        f"{topic!r} (docs/kafka-security.md)"
                    )
                if err.retriable() or not err.fatal():
                    log.warning("ledger %s[%d]: %s", topic, shard, err.str())
                    continue
                raise DeliveryError(f"ledger {topic}[{shard}]: {err.str()}")
            if msg.key() is None:
                continue
            on_message(msg)
            n += 1
    finally:
        consumer.close()


def load_shard_ledger(
    bootstrap: str, client: Mapping[str, Any], topic: str, shard: int, *, timeout: float = 60.0
) -> ShardLedger:
    """Read the shard's ledger partition from the start to its end, read_committed.

    Call after :meth:`ShardProducer.init`: the zombie's open transaction is then aborted, so
    the last stable offset is the end of the partition and nothing committed is missed.
    """
    ledger = ShardLedger(shard)

    def apply(msg: Message) -> None:
        ledger.apply(msg.key(), msg.value())  # type: ignore[arg-type]  # keyed: checked by the reader

    n, ledger.end_offset = read_ledger_partition(
        bootstrap, client, topic, shard, apply, group_id=f"pop3-kafka-ledger-loader-{shard}", timeout=timeout
    )
    log.info("ledger %s[%d] loaded: %d messages, %d mailboxes", topic, shard, n, len(ledger.mailboxes))
    return ledger
