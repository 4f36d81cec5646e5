"""Read back what the connector wrote, the way a downstream consumer would."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from connector.records import decode_single_object


@dataclass
class Consumed:
    key: bytes | None
    headers: dict[str, bytes]
    partition: int
    offset: int
    record: dict[str, Any]


def consume_all(
    bootstrap: str,
    topic: str,
    *,
    expect: int,
    timeout: float = 60.0,
    settle: float = 2.0,
    decode: Callable[[bytes], dict[str, Any]] = decode_single_object,
) -> list[Consumed]:
    """Every committed record of ``topic``; waits for ``expect`` records, then ``settle`` more
    seconds so that duplicates beyond the expected count are seen too. ``decode``: how a value
    becomes a record (mail records by default; connector.records.dead_letter.decode_dead_letter)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        deadline = time.monotonic() + timeout
        parts: list[int] = []
        while not parts and time.monotonic() < deadline:  # the connector may not have created it yet
            md = c.list_topics(topic, timeout=15)
            tmd = md.topics.get(topic)
            parts = sorted(tmd.partitions) if tmd is not None and tmd.error is None else []
            if not parts:
                time.sleep(0.1)
        if not parts:
            return []
        c.assign([TopicPartition(topic, p, -2) for p in parts])
        out: list[Consumed] = []
        settle_until: float | None = None
        while time.monotonic() < deadline:
            if len(out) >= expect and settle_until is None:
                settle_until = time.monotonic() + settle
            if settle_until is not None and time.monotonic() > settle_until:
                break
            m = c.poll(0.2)
            if m is None or m.error():
                continue
            out.append(Consumed(m.key(), dict(m.headers() or []), m.partition(), m.offset(), decode(m.value())))
        return out
    finally:
        c.close()


def all_values(bootstrap: str, topic: str) -> list[bytes]:
    """Every committed value and header value of a topic, raw (for the leak searches)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"leak-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        md = c.list_topics(topic, timeout=15).topics[topic]
        c.assign([TopicPartition(topic, p, -2) for p in md.partitions])
        out: list[bytes] = []
        open_parts = set(md.partitions)
        while open_parts:
            m = c.poll(2.0)
            if m is None:
                break
            if m.error():
                open_parts.discard(m.partition())
                continue
            out.append(m.value() or b"")
            out.extend(v or b"" for _, v in (m.headers() or []))
        return out
    finally:
        c.close()
