"""`pop3-kafka ledger show`: where did this mail go? The on-call answer from the UIDL ledger.

The ledger (docs/delivery.md) keeps one compacted entry per mail, keyed ``<mailbox>:<uidl>``, in
the partition of the mailbox's shard: the record's topic, partition and offset once the
transaction committed, then a tombstone once the mail was deleted from the server. This reads
that partition from its start, read_committed, and returns every committed event of the key
still there: compaction keeps the last value of a key (and a tombstone for
``delete.retention.ms``, one day by default), so older history may be gone, which the output
says.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import Message

from connector.config.model import Config
from connector.delivery.admin import partitions_of
from connector.delivery.transactional import read_ledger_partition
from connector.errors import ConfigError, DeliveryError
from connector.records import record_id
from connector.records.ledger import LedgerEntry, shard_of


@dataclass(frozen=True)
class LedgerEvent:
    """One committed ledger record of the key: an entry, or a tombstone (``entry`` None)."""

    offset: int
    timestamp_ms: int
    entry: LedgerEntry | None


@dataclass(frozen=True)
class LedgerHistory:
    key: str
    topic: str
    partition: int
    events: list[LedgerEvent]

    @property
    def deleted(self) -> bool:
        return bool(self.events) and self.events[-1].entry is None


def ledger_history(config: Config, mailbox_id: str, uidl: str, *, timeout: float = 60.0) -> LedgerHistory:
    """Every committed ledger event of ``mailbox_id:uidl`` still in the ledger topic."""
    if config.delivery.mode != "exactly_once":
        raise ConfigError("ledger show: delivery.mode is at_least_once, which keeps no ledger")
    config.mailbox(mailbox_id)  # a ConfigError naming the ids when it is not configured
    topic = config.ledger.topic
    shards = config.ledger.shards or partitions_of(
        config.kafka.bootstrap_servers, config.kafka.client_conf(), topic, timeout=min(timeout, 15.0)
    )
    if not shards:
        raise DeliveryError(f"ledger topic {topic!r} not found (ledger.topic); nothing was ever delivered with it")
    partition = shard_of(mailbox_id, shards)
    key = record_id(mailbox_id, uidl)
    events: list[LedgerEvent] = []
    wanted = key.encode()

    def collect(msg: Message) -> None:
        if msg.key() != wanted:
            return
        value = msg.value()
        _, ts = msg.timestamp()
        events.append(LedgerEvent(msg.offset() or 0, ts, LedgerEntry.decode(value) if value is not None else None))

    read_ledger_partition(
        config.kafka.bootstrap_servers,
        config.kafka.client_conf(),
        topic,
        partition,
        collect,
        group_id=f"pop3-kafka-ledger-loader-show-{partition}",  # assign() only, nothing committed
        timeout=timeout,
    )
    return LedgerHistory(key, topic, partition, events)


def _when(ms: int | None) -> str:
    if ms is None or ms <= 0:
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def describe(h: LedgerHistory) -> list[str]:
    """Human-readable lines (no mail content: ids, positions and digests only)."""
    head = f"{h.key} (ledger {h.topic}[{h.partition}])"
    if not h.events:
        return [
            head,
            "  no ledger entry: never published by this ledger, or deleted from the server and its tombstone "
            "compacted away (delete.retention.ms)",
        ]
    lines = [head]
    for e in h.events:
        if e.entry is None:
            lines.append(f"  {_when(e.timestamp_ms)}  deleted from the server (tombstone at offset {e.offset})")
            continue
        x = e.entry
        where = f"-> {x.topic}[{x.partition}]@{x.offset}" if x.topic is not None else "(not published)"
        lines.append(
            f"  {_when(x.recorded_at)}  {x.state:<13} {where}  raw_sha256={(x.raw_sha256 or '?')[:16]}  "
            f"first seen {_when(x.first_seen_at)}"
        )
    last = h.events[-1]
    if last.entry is not None:
        state = last.entry.state
        lines.append(
            "  still on the server (the ledger has not recorded its deletion yet)"
            if state in ("delivered", "dead_lettered")
            else f"  state {state}: seen, never published (start_from: now or an import)"
        )
    return lines
