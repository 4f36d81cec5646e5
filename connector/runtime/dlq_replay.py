"""`pop3-kafka dlq replay`: decode dead letters again and publish the ones that now succeed.

After a decoder fix or a new S/MIME key, the mail in the dead-letter topic can become records.
Replay is a consume-transform-produce loop with Kafka transactions (KIP-98/KIP-447):

    read a batch of dead letters (read_committed) -> decode each raw mail with the mailbox's
    current options -> in one transaction: produce the records that decode now, and commit the
    consumer group's offsets past the batch (send_offsets_to_transaction)

so the progress lives in Kafka, not in a local file, and a replay killed at any moment (kill -9
included) resumes where its last transaction ended: the aborted transaction's records are never
visible to read_committed consumers and its offsets were never committed. Each dead letter is
therefore published at most once per progress group, and exactly once when it decodes.

Dead letters that still fail stay in the dead-letter topic (they are not written again); the
summary counts them by reason. ``--since`` passes over dead letters written before a time
(counted as skipped; progress moves past them). ``--dry-run`` decodes and reports, and writes
nothing: no records, no progress.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from connector import faults
from connector.config.model import Config
from connector.decoding import decode_mail
from connector.decoding.options import DEFAULT_OPTIONS
from connector.delivery.kafka import client_config_error
from connector.errors import DecodeError, DeliveryError
from connector.records import (
    HEADER_MAILBOX,
    HEADER_RECORD_ID,
    Provenance,
    build_mail_record,
    decode_single_object,
    encode_single_object,
    mail_schema,
)
from connector.records.avro import Schema, load_schema
from connector.records.dead_letter import dead_letter_schema

log = logging.getLogger("pop3kafka.dlq")

#: header on a replayed record: where its dead letter was ("topic/partition/offset").
HEADER_REPLAYED_FROM = "pop3kafka.replayed_from"
BATCH = 200
POLL_S = 0.5


@dataclass
class ReplaySummary:
    read: int = 0
    replayed: int = 0
    still_failing: Counter[str] = field(default_factory=Counter)
    skipped_before_since: int = 0
    #: dead letters of mailboxes no longer configured: decoded with the default options.
    unknown_mailbox: int = 0
    not_dead_letters: int = 0
    #: records with the dead-letter fingerprint that do not decode (damaged): passed over.
    unreadable: int = 0
    #: dead letters whose raw mail is stored by reference (raw_ref: chunks or an offloaded
    #: object): not replayed by this version, passed over with a warning (nothing lost: the
    #: dead letter and its content stay where they are).
    by_reference: int = 0
    dry_run: bool = False

    def line(self) -> str:
        failing = sum(self.still_failing.values())
        by_reason = ", ".join(f"{r}: {n}" for r, n in sorted(self.still_failing.items()))
        verb = "would be replayed" if self.dry_run else "replayed"
        text = f"{self.read} dead letters read, {self.replayed} {verb}, {failing} still failing"
        if by_reason:
            text += f" ({by_reason})"
        if self.skipped_before_since:
            text += f", {self.skipped_before_since} before --since passed over"
        if self.unknown_mailbox:
            text += f", {self.unknown_mailbox} of mailboxes no longer configured (default decoding)"
        if self.not_dead_letters:
            text += f", {self.not_dead_letters} records that are not dead letters ignored"
        if self.unreadable:
            text += f", {self.unreadable} unreadable dead letters passed over"
        if self.by_reference:
            text += f", {self.by_reference} with the raw mail stored by reference passed over (not replayable yet)"
        return text


@functools.cache
def _dead_letter_schemas() -> dict[bytes, Schema]:
    """The current dead-letter schema and every earlier version (schemas/history/), by
    fingerprint: dead letters written by older connectors are replayed too."""
    out = {dead_letter_schema().fingerprint: dead_letter_schema()}
    v1 = load_schema("history/dead_letter.v1.avsc")
    out[v1.fingerprint] = v1
    return out


def progress_group(config: Config) -> str:
    return f"{config.delivery.transactional_id_prefix}-dlq-replay"


def _client(config: Config) -> dict[str, Any]:
    conf = config.kafka.client_conf()
    conf["bootstrap.servers"] = config.kafka.bootstrap_servers
    return conf


def replay(
    config: Config,
    *,
    since_millis: int | None = None,
    dry_run: bool = False,
    group: str | None = None,
    report: Callable[[ReplaySummary], None] | None = None,
    timeout_s: float = 300.0,
    batch_size: int = BATCH,
) -> ReplaySummary:
    """Replay the dead-letter topic from the group's progress to its end as of now."""
    topic = config.topics.dead_letter
    group = group or progress_group(config)
    summary = ReplaySummary(dry_run=dry_run)
    consumer_conf = {
        **_client(config),
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "logger": logging.getLogger("pop3kafka.rdkafka.dlq"),
    }
    try:
        consumer = Consumer(consumer_conf)
    except KafkaException as exc:
        raise client_config_error(exc) from exc
    producer: Producer | None = None
    try:
        meta = consumer.list_topics(topic, timeout=30)
        tmeta = meta.topics.get(topic)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            raise DeliveryError(f"dead-letter topic {topic!r} not found: nothing to replay (topics.dead_letter)")
        parts = [TopicPartition(topic, p) for p in sorted(tmeta.partitions)]
        if not dry_run:
            producer = Producer(
                {
                    **_client(config),
                    "transactional.id": f"{group}-{topic}",
                    "enable.idempotence": True,
                    "acks": "all",
                    "transaction.timeout.ms": int(config.delivery.transaction_timeout_seconds * 1000),
                    "logger": logging.getLogger("pop3kafka.rdkafka.dlq"),
                }
            )
            # First: fence an older replay with the same id and abort its open transaction. Its
            # offsets are pending in the group until then, and committed() below would wait for
            # them (KIP-447 require_stable) until the transaction timed out.
            producer.init_transactions(60)
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in parts}
        try:
            start = consumer.committed(parts, timeout=30)
        except KafkaException as exc:
            if exc.args[0].code() in (KafkaError._TIMED_OUT, KafkaError.UNSTABLE_OFFSET_COMMIT) and dry_run:
                raise DeliveryError(
                    f"dlq replay: group {group!r} has a replay transaction pending (a replay was killed); run "
                    "dlq replay without --dry-run (it aborts that transaction first) or wait "
                    f"delivery.transaction_timeout_seconds ({config.delivery.transaction_timeout_seconds:g} s)"
                ) from exc
            raise
        if since_millis is not None:
            by_time = consumer.offsets_for_times(
                [TopicPartition(topic, tp.partition, since_millis) for tp in parts], 30
            )
            since_at = {tp.partition: (tp.offset if tp.offset >= 0 else ends[tp.partition]) for tp in by_time}
        else:
            since_at = {}
        assign = [TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else -2) for tp in start]
        consumer.assign(assign)
        remaining = {tp.partition for tp in assign if _next(tp) < ends[tp.partition]}
        deadline = time.monotonic() + timeout_s
        by_id = {m.id: m for m in config.mailboxes}
        while remaining:
            if time.monotonic() > deadline:
                raise DeliveryError(f"dlq replay: not finished within {timeout_s:.0f} s; run it again to continue")
            batch = _read_batch(consumer, remaining, ends, batch_size)
            if not batch:
                continue
            outputs: list[tuple[bytes | None, bytes, list[tuple[str, str | bytes | None]]]] = []
            # Progress = one past the last dead letter this batch handled, per partition; never
            # position(), which is past messages fetched but left for the next run.
            commit_to: dict[int, int] = {}
            for msg in batch:
                summary.read += 1
                commit_to[_partition(msg)] = max(commit_to.get(_partition(msg), 0), (msg.offset() or 0) + 1)
                out = _transform(msg, since_at, by_id, config, summary)
                if out is not None:
                    outputs.append(out)
            if producer is None:
                summary.replayed += len(outputs)
            else:
                offsets = [TopicPartition(topic, p, o) for p, o in sorted(commit_to.items())]
                summary.replayed += _transact(
                    producer, consumer, mail_topic=config.topics.mail, outputs=outputs, offsets=offsets, summary=summary
                )
            if report is not None:
                report(summary)
        return summary
    except KafkaException as exc:
        err: KafkaError = exc.args[0]
        raise DeliveryError(f"dlq replay: {err.str()}") from exc
    finally:
        consumer.close()
        if producer is not None:
            producer.flush(10)


def _transact(
    producer: Producer,
    consumer: Consumer,
    *,
    mail_topic: str,
    outputs: list[tuple[bytes | None, bytes, list[tuple[str, str | bytes | None]]]],
    offsets: list[TopicPartition],
    summary: ReplaySummary,
) -> int:
    """One batch in one transaction: its records and the group's progress past it. Any failure
    aborts the transaction (so read_committed consumers of the mail topic are not held up
    until it times out) and ends the run; the next run repeats the batch."""
    sent = 0
    try:
        producer.begin_transaction()
        for key, value, headers in outputs:
            if _produce(producer, mail_topic, key, value, headers):
                sent += 1
            else:
                summary.still_failing["too_large"] += 1
        producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 60)
        faults.point("dlq_before_commit")
        with faults.during("dlq_during_commit"):
            producer.commit_transaction(60)
    except KafkaException as exc:
        err: KafkaError = exc.args[0]
        if not err.fatal():
            try:
                producer.abort_transaction(30)
            except KafkaException:
                log.warning("dlq replay: abort_transaction failed; the broker aborts it after the timeout")
        raise DeliveryError(f"dlq replay: the batch failed and was rolled back ({err.str()}); run again") from exc
    return sent


def _produce(
    producer: Producer, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, str | bytes | None]]
) -> bool:
    """Queue one record, waiting while librdkafka's queue is full; False when the record is
    larger than the producer's message.max.bytes (counted, left in the dead-letter topic)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=headers)
            return True
        except BufferError:
            if time.monotonic() > deadline:
                raise KafkaException(KafkaError(KafkaError._QUEUE_FULL)) from None
            producer.poll(0.5)
        except KafkaException as exc:
            if exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                return False
            raise


def _partition(msg: Message) -> int:
    p = msg.partition()
    assert p is not None  # consumed messages always have one
    return p


def _next(tp: TopicPartition) -> int:
    return 0 if tp.offset < 0 else tp.offset


def _read_batch(consumer: Consumer, remaining: set[int], ends: dict[int, int], size: int) -> list[Message]:
    batch: list[Message] = []
    for msg in consumer.consume(size, POLL_S):
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                remaining.discard(_partition(msg))
                continue
            if err.retriable():
                log.warning("dlq replay: %s", err.str())
                continue
            raise KafkaException(err)  # e.g. TOPIC/GROUP_AUTHORIZATION_FAILED: say so now
        offset, partition = msg.offset() or 0, _partition(msg)
        if offset >= ends[partition]:
            remaining.discard(partition)  # written after the replay started: next run
            continue
        batch.append(msg)
        if offset + 1 >= ends[partition]:
            remaining.discard(partition)
    return batch


def _transform(
    msg: Message,
    since_at: dict[int, int],
    by_id: dict[str, Any],
    config: Config,
    summary: ReplaySummary,
) -> tuple[bytes | None, bytes, list[tuple[str, str | bytes | None]]] | None:
    """The mail record for one dead letter, or None (counted) when it does not decode now."""
    if (msg.offset() or 0) < since_at.get(_partition(msg), 0):
        summary.skipped_before_since += 1
        return None
    value = msg.value()
    known = _dead_letter_schemas()
    if value is None or value[2:10] not in known:
        summary.not_dead_letters += 1
        return None
    try:
        dl = decode_single_object(value, known)
    except Exception:  # noqa: BLE001 - one damaged record must not block every later one
        summary.unreadable += 1
        log.warning(
            "dlq replay: %s[%s]@%s is not a readable dead letter; passed over",
            msg.topic(),
            msg.partition(),
            msg.offset(),
        )
        return None
    if dl.get("raw_ref") is not None:
        # Its bytes are chunk records or an offloaded object, not in ``raw`` (which is empty):
        # decoding ``raw`` would publish an empty mail. Left for an operator (connector.consumer
        # rebuilds the raw mail from the reference).
        summary.by_reference += 1
        log.warning(
            "dlq replay: %s[%s]@%s holds its raw mail by reference (%s); not replayable yet, passed over",
            msg.topic(),
            msg.partition(),
            msg.offset(),
            dl["raw_ref"].get("placement"),
        )
        return None
    p = dl["provenance"]
    mailbox = by_id.get(p["mailbox_id"])
    if mailbox is None:
        summary.unknown_mailbox += 1
    options = mailbox.decode if mailbox is not None else DEFAULT_OPTIONS
    prov = Provenance(
        mailbox_id=p["mailbox_id"],
        uidl=p["uidl"],
        server=p["server"],
        fetched_at_millis=_millis(p["fetched_at"]),
        raw_size=p["raw_size"],
        raw_sha256=p["raw_sha256"],
    )
    try:
        record = build_mail_record(decode_mail(dl["raw"], options=options), prov)
        out = encode_single_object(mail_schema(), record)
    except DecodeError as exc:
        summary.still_failing[exc.reason] += 1
        return None
    headers: list[tuple[str, str | bytes | None]] = [
        (HEADER_RECORD_ID, dl["record_id"].encode()),
        (HEADER_MAILBOX, p["mailbox_id"].encode()),
        (HEADER_REPLAYED_FROM, f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()),
    ]
    # The key the mail record would have had (docs/record.md): same partition as its mailbox.
    key = msg.key() if msg.key() is not None else p["mailbox_id"].encode()
    return key, out, headers


def _millis(value: Any) -> int:
    """fastavro returns timestamp-millis as an aware datetime."""
    if isinstance(value, int):
        return value
    return int(value.timestamp() * 1000)
