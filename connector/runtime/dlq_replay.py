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

Large mail (docs/record.md, "Large content"): a dead letter whose raw mail is by reference
(``raw_ref``) is rebuilt first, from the chunk records that precede it in the same partition of
the dead-letter topic (connector.consumer.ChunkAssembler, in temporary files; chunks read in an
earlier run, or before ``--since``, are read again from the partition, searching back from the
dead letter) or from its offloaded object; the
replayed record's attachments are placed as the poll cycle places them (chunk records in the
same transaction, or the offload store).

Both framings are read (a dead-letter topic may hold single-object and registry-framed values
after a switch of ``record.framing``; the latter need ``schema_registry:``), and replayed records
are written in the configured framing.

Dead letters that still fail stay in the dead-letter topic (they are not written again); the
summary counts them by reason. ``--since`` passes over dead letters written before a time
(counted as skipped; progress moves past them). ``--dry-run`` decodes and reports, and writes
nothing: no records, no progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import mmap
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from connector import faults
from connector.config.model import STREAM_ABOVE, Config, MailboxConfig
from connector.consumer import ChunkAssembler, ConsumerError, DecodedRecord, NotOurRecord, decode_value, fetch_offloaded
from connector.decoding import decode_mail
from connector.decoding.fastmime import SpoolMap
from connector.decoding.options import DEFAULT_OPTIONS
from connector.delivery.kafka import Delivery, client_config_error
from connector.delivery.offload import ContentStore
from connector.delivery.registry import close_client, open_client, resolve_framer
from connector.errors import DecodeError, DeliveryError
from connector.records import (
    HEADER_MAILBOX,
    HEADER_RECORD_ID,
    Provenance,
    build_mail_record,
    decode_single_object,
    mail_schema,
    record_id,
)
from connector.records.avro import Schema, load_schema
from connector.records.content import chunk_schema
from connector.records.dead_letter import dead_letter_schema
from connector.records.framing import REGISTRY_MAGIC, SINGLE_OBJECT, Framer
from connector.runtime.cycle import content_store
from connector.runtime.placement import Placer

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
    #: dead letters whose raw mail is by reference (raw_ref) but could not be had: chunks not
    #: (all) read in this run, an offloaded object missing or unreachable. Passed over with a
    #: warning; the dead letter stays where it is (replay it again with a fresh --group).
    by_reference: int = 0
    #: chunk records (raw mail of large dead letters) read and reassembled.
    chunks: int = 0
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
            text += f", {self.by_reference} whose raw mail by reference was not available (passed over)"
        return text


@functools.cache
def _dead_letter_schemas() -> dict[bytes, Schema]:
    """The current dead-letter schema and every earlier version (schemas/history/), by
    fingerprint: dead letters written by older connectors are replayed too."""
    out = {dead_letter_schema().fingerprint: dead_letter_schema()}
    v1 = load_schema("history/dead_letter.v1.avsc")
    out[v1.fingerprint] = v1
    return out


def _collect_chunk(msg: Message, value: bytes, ctx: _Context) -> None:
    """A chunk of a large dead letter's raw mail: into the assembler (duplicates of a resent
    chunk set are ignored there)."""
    ctx.summary.chunks += 1
    try:
        ctx.assembler.add(decode_value(value))
    except ConsumerError as exc:
        log.warning("dlq replay: chunk %s[%s]@%s passed over: %s", msg.topic(), msg.partition(), msg.offset(), exc)


def _chunk_of(value: bytes | None, ctx: _Context) -> DecodedRecord | None:
    """``value`` decoded when it is a chunk record in either framing, else None."""
    if value is None:
        return None
    single = value[2:10] == chunk_schema().fingerprint
    if not single and value[:1] != REGISTRY_MAGIC:
        return None
    try:
        decoded = decode_value(value, registry=ctx.registry)
    except ConsumerError:
        return None
    return decoded if decoded.kind == "chunk" else None


def _registry_dead_letter(msg: Message, value: bytes, ctx: _Context) -> dict[str, Any] | None:
    """A value in the registry wire format: the dead letter it holds, or None (counted) for a
    chunk (collected), another record type or one that cannot be read."""
    where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
    try:
        decoded = decode_value(value, registry=ctx.registry)
    except NotOurRecord:
        ctx.summary.not_dead_letters += 1
        return None
    except ConsumerError as exc:
        ctx.summary.unreadable += 1
        hint = "" if ctx.registry is not None else " (configure schema_registry: to read registry-framed values)"
        log.warning("dlq replay: %s in the schema registry wire format passed over: %s%s", where, exc, hint)
        return None
    if decoded.kind == "chunk":
        ctx.summary.chunks += 1
        try:
            ctx.assembler.add(decoded)
        except ConsumerError as exc:
            log.warning("dlq replay: chunk %s passed over: %s", where, exc)
        return None
    if decoded.kind != "dead_letter":
        ctx.summary.not_dead_letters += 1
        return None
    return decoded.record


def _read_back(msg: Message, ref: dict[str, Any], ctx: _Context) -> None:
    """The chunks of ``ref`` were not all read in this run (an earlier run or ``--since``
    passed them): read the partition again in growing windows back from the dead letter,
    which they precede, feeding the assembler until the content is complete or the start of
    the partition is reached. Bounded: at most the partition up to the dead letter."""
    partition, before = _partition(msg), msg.offset() or 0
    topic = ctx.config.topics.dead_letter
    c = Consumer(
        {
            **_client(ctx.config),
            "group.id": progress_group(ctx.config),  # assign() only: nothing is committed
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "logger": logging.getLogger("pop3kafka.rdkafka.dlq"),
        }
    )
    try:
        low = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)[0]
        window = max(64, 4 * int(ref.get("chunks") or 1))
        lo = before
        while lo > low and ctx.assembler.completed(ref["id"]) is None:
            lo = max(low, before - window)
            c.assign([TopicPartition(topic, partition, lo)])
            done = False
            while not done:
                batch = c.consume(500, POLL_S)
                if not batch:
                    break
                for m in batch:
                    err = m.error()
                    if err is not None:
                        done = err.code() == KafkaError._PARTITION_EOF
                        continue
                    if (m.offset() or 0) >= before:
                        done = True
                        break
                    chunk = _chunk_of(m.value(), ctx)
                    if chunk is not None and chunk.record["content_id"] == ref["id"]:
                        try:
                            ctx.assembler.add(chunk)
                        except ConsumerError:
                            continue
            window *= 4
    finally:
        c.close()


def _raw_by_reference(msg: Message, ref: dict[str, Any], ctx: _Context) -> Path | None:
    """The file holding a dead letter's raw mail (reassembled chunks or the downloaded
    object, SHA-256 checked), or None (warned) when it cannot be had now."""
    where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
    if ref["placement"] == "chunked":
        done = ctx.assembler.completed(ref["id"])
        if done is None:
            _read_back(msg, ref, ctx)
            done = ctx.assembler.completed(ref["id"])
        if done is None:
            log.warning(
                "dlq replay: %s: the chunks of its raw mail were not all read in this run (missing %d); passed over",
                where,
                len(ctx.assembler.missing(ref["id"])) or ref.get("chunks") or 0,
            )
            return None
        if done.sha256 != ref["sha256"]:
            log.warning("dlq replay: %s: reassembled raw mail does not match its SHA-256; passed over", where)
            return None
        return done.path
    dest = Path(ctx.work) / f"raw-{ref['sha256']}"
    try:
        fetch_offloaded(ref, dest, ctx.config.offload)
    except ConsumerError as exc:
        log.warning("dlq replay: %s: its offloaded raw mail could not be fetched: %s; passed over", where, exc)
        return None
    return dest


#: prefix of a replay's working directory under runtime.spool_directory.
WORK_PREFIX = "pop3k-replay-"
#: a dead letter of a mailbox no longer configured: default decoding, large parts not held.
_UNKNOWN_MAILBOX_OPTIONS = dataclasses.replace(DEFAULT_OPTIONS, stream_above=STREAM_ABOVE)


def _forget(ref: dict[str, Any], ctx: _Context) -> None:
    """The raw mail of a handled dead letter is not needed again in this run: remove its file."""
    done = ctx.assembler.completed(ref["id"])
    paths = [done.path] if done is not None and done.path is not None else []
    paths.append(Path(ctx.work) / f"raw-{ref['sha256']}")
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()
    # Forgotten by the assembler too: a later copy of this dead letter (at-least-once resends)
    # reassembles it again instead of pointing at the removed file.
    ctx.assembler.discard(ref["id"])


def _sweep_work_dirs(directory: str | None, *, older_than_s: float) -> None:
    """Remove working directories of replays that were killed (they hold raw mail). Only old
    ones: a replay of another progress group may be running now."""
    where = Path(directory or tempfile.gettempdir())
    cutoff = time.time() - older_than_s
    try:
        entries = list(where.iterdir())
    except OSError:
        return
    for d in entries:
        try:
            if d.name.startswith(WORK_PREFIX) and d.is_dir() and not d.is_symlink() and d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
                log.info("dlq replay: removed %s, left by a replay that was stopped", d)
        except OSError:
            continue


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
    # Read registry-framed dead letters whenever a registry is configured; write replayed records
    # in the configured framing (a dry run writes nothing, so it registers nothing either).
    # Resolved before any Kafka client exists: an unregistered schema stops the run right here.
    registry = open_client(config.schema_registry) if config.schema_registry is not None else None
    try:
        framer = SINGLE_OBJECT if dry_run else resolve_framer(config, registry)
        consumer = Consumer(consumer_conf)
    except KafkaException as exc:
        if registry is not None:
            close_client(registry)
        raise client_config_error(exc) from exc
    except BaseException:
        if registry is not None:
            close_client(registry)
        raise
    producer: Producer | None = None
    ctx: _Context | None = None
    # Reassembled and downloaded raw mail of large dead letters: temporary files (0600, in a
    # 0700 directory under runtime.spool_directory), each removed once its dead letter is
    # handled, the directory when the run ends; a killed run's directory is swept next time.
    _sweep_work_dirs(config.runtime.spool_directory, older_than_s=2 * config.delivery.transaction_timeout_seconds)
    work = tempfile.TemporaryDirectory(prefix=WORK_PREFIX, dir=config.runtime.spool_directory)
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
        ctx = _Context(
            config, since_at, {m.id: m for m in config.mailboxes}, summary, producer, work.name, framer, registry
        )
        while remaining:
            if time.monotonic() > deadline:
                raise DeliveryError(f"dlq replay: not finished within {timeout_s:.0f} s; run it again to continue")
            batch = _read_batch(consumer, remaining, ends, batch_size)
            if not batch:
                continue
            # Progress = one past the last dead letter this batch handled, per partition; never
            # position(), which is past messages fetched but left for the next run.
            commit_to: dict[int, int] = {}
            if producer is None:
                for msg in batch:
                    summary.read += 1
                    if _transform(msg, ctx) is not None:
                        summary.replayed += 1
            else:
                summary.replayed += _transact(producer, consumer, batch, ctx, commit_to)
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
        if ctx is not None:
            ctx.assembler.close()
        if registry is not None:
            close_client(registry)
        work.cleanup()


@dataclass
class _Context:
    """What the transformation of one run needs besides the message."""

    config: Config
    since_at: dict[int, int]
    by_id: dict[str, MailboxConfig]
    summary: ReplaySummary
    #: None in a dry run: nothing is produced or stored.
    producer: Producer | None
    work: str
    #: record.framing of the replayed records (and their chunk records).
    framer: Framer = SINGLE_OBJECT
    #: SchemaRegistryClient for registry-framed values, when schema_registry: is configured.
    registry: Any = None
    assembler: ChunkAssembler = field(init=False)
    store: ContentStore | None = field(init=False)

    def __post_init__(self) -> None:
        self.assembler = ChunkAssembler(Path(self.work) / "chunks")
        self.store = content_store(self.config.offload) if self.config.offload is not None else None

    def send(self, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> Delivery:
        """Placement's produce: chunk records of replayed mail go into the open transaction."""
        assert self.producer is not None
        d = Delivery(topic)

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            d.error = err
            d.done = True

        if not _produce(self.producer, topic, key, value, list(headers), on_delivery=on_delivery):
            raise DeliveryError(f"a chunk record for {topic!r} is larger than the producer's message.max.bytes")
        return d


def _transact(
    producer: Producer,
    consumer: Consumer,
    batch: list[Message],
    ctx: _Context,
    commit_to: dict[int, int],
) -> int:
    """One batch in one transaction: its records (and their chunk records) and the group's
    progress past it. Any failure aborts the transaction (so read_committed consumers of the
    mail topic are not held up until it times out) and ends the run; the next run repeats the
    batch."""
    sent = 0
    summary, topic = ctx.summary, ctx.config.topics.dead_letter
    try:
        producer.begin_transaction()
        for msg in batch:
            summary.read += 1
            commit_to[_partition(msg)] = max(commit_to.get(_partition(msg), 0), (msg.offset() or 0) + 1)
            out = _transform(msg, ctx)
            if out is None:
                continue
            key, value, headers = out
            if _produce(producer, ctx.config.topics.mail, key, value, headers):
                sent += 1
            else:
                summary.still_failing["too_large"] += 1
        offsets = [TopicPartition(topic, p, o) for p, o in sorted(commit_to.items())]
        producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 60)
        faults.point("dlq_before_commit")
        with faults.during("dlq_during_commit"):
            producer.commit_transaction(60)
    except KafkaException as exc:
        err: KafkaError = exc.args[0]
        if not err.fatal():
            _abort(producer)
        raise DeliveryError(f"dlq replay: the batch failed and was rolled back ({err.str()}); run again") from exc
    except BaseException:
        # Anything else (a chunk refused, the offload store down, a bug): the open transaction
        # must not wait for its timeout while read_committed consumers of the mail and
        # attachments partitions are held up behind it.
        _abort(producer)
        raise
    return sent


def _abort(producer: Producer) -> None:
    try:
        producer.abort_transaction(30)
    except KafkaException:
        log.warning("dlq replay: abort_transaction failed; the broker aborts it after the timeout")


def _produce(
    producer: Producer,
    topic: str,
    key: bytes | None,
    value: bytes,
    headers: Sequence[tuple[str, str | bytes | None]],
    *,
    on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
) -> bool:
    """Queue one record, waiting while librdkafka's queue is full; False when the record is
    larger than the producer's message.max.bytes (counted, left in the dead-letter topic)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if on_delivery is None:
                producer.produce(topic, value=value, key=key, headers=list(headers))
            else:
                producer.produce(topic, value=value, key=key, headers=list(headers), on_delivery=on_delivery)
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


def _transform(msg: Message, ctx: _Context) -> tuple[bytes | None, bytes, list[tuple[str, str | bytes | None]]] | None:
    """The mail record for one dead letter, or None (counted) when it does not decode now.
    Chunk records (raw mail of large dead letters) are collected on the way."""
    summary = ctx.summary
    if (msg.offset() or 0) < ctx.since_at.get(_partition(msg), 0):
        summary.skipped_before_since += 1
        return None
    value = msg.value()
    if value is not None and value[2:10] == chunk_schema().fingerprint:
        _collect_chunk(msg, value, ctx)
        return None
    if value is not None and value[:1] == REGISTRY_MAGIC:
        registry_dl = _registry_dead_letter(msg, value, ctx)
        if registry_dl is None:
            return None
        dl = registry_dl
    else:
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
    p = dl["provenance"]
    mailbox = ctx.by_id.get(p["mailbox_id"])
    if mailbox is None:
        summary.unknown_mailbox += 1
    options = mailbox.decode if mailbox is not None else _UNKNOWN_MAILBOX_OPTIONS
    prov = Provenance(
        mailbox_id=p["mailbox_id"],
        uidl=p["uidl"],
        server=p["server"],
        fetched_at_millis=_millis(p["fetched_at"]),
        raw_size=p["raw_size"],
        raw_sha256=p["raw_sha256"],
    )
    with contextlib.ExitStack() as stack:
        raw: bytes | SpoolMap = dl["raw"]
        ref = dl.get("raw_ref")
        if ref is not None:
            path = _raw_by_reference(msg, ref, ctx)
            if path is None:
                summary.by_reference += 1
                return None
            fh = stack.enter_context(open(path, "rb"))
            raw = stack.enter_context(SpoolMap(fh.fileno(), 0, access=mmap.ACCESS_READ))
        try:
            mail = decode_mail(raw, options=options)
            placed = raw_placed = None
            if ctx.producer is not None and mailbox is not None:
                # As the poll cycle would: attachments (and raw mail) inline, chunked or offloaded.
                rid = record_id(mailbox.id, p["uidl"])
                chunk_key = (mailbox.id if ctx.config.record.key == "mailbox" else rid).encode()
                placer = Placer(ctx.config, mailbox, rid, chunk_key, ctx.send, ctx.store, ctx.framer)
                placed = placer.attachments(mail.attachments)
                if mailbox.raw_mail == "include" or mail.raw is not None:
                    raw_placed = placer.raw(raw, p["raw_sha256"])
            record = build_mail_record(mail, prov, placed, raw_placed)
            out = ctx.framer.encode(mail_schema(), record)
        except DecodeError as exc:
            summary.still_failing[exc.reason] += 1
            return None
        finally:
            if ref is not None:
                stack.close()  # unmap before the file goes
                _forget(ref, ctx)
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
