#!/usr/bin/env python3
"""Spike: prove the local stack does what the connector needs, end to end, in one script.

1. a transactional produce (init_transactions / begin / produce / commit) and an aborted one;
2. a read_committed consume that sees the committed records and not the aborted ones;
3. a POP3S login to Dovecot with CA verification, UIDL/RETR/DELE of a dropped mail.

    eval "$(python deploy/local/localstack.py up)"; python deploy/local/spike.py
"""

from __future__ import annotations

import os
import poplib
import ssl
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localstack import DovecotServer


def kafka_spike(bootstrap: str) -> None:
    topic = f"spike-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
    t0 = time.monotonic()
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"spike-{uuid.uuid4().hex[:6]}",
            "enable.idempotence": True,
            "acks": "all",
        }
    )
    p.init_transactions(60)
    t1 = time.monotonic()
    p.begin_transaction()
    for i in range(10):
        p.produce(topic, key=b"k", value=f"committed-{i}".encode())
    p.commit_transaction(30)
    p.begin_transaction()
    p.produce(topic, key=b"k", value=b"aborted")
    p.flush(10)
    p.abort_transaction(30)
    t2 = time.monotonic()
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"spike-{uuid.uuid4().hex[:6]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    c.assign([TopicPartition(topic, 0, 0)])
    seen: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(seen) < 10 and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            raise KafkaException(m.error())
        seen.append(m.value())
    c.close()
    assert seen == [f"committed-{i}".encode() for i in range(10)], seen
    print(
        f"kafka: init_transactions {t1 - t0:.2f}s, commit+abort {t2 - t1:.2f}s, "
        f"read_committed saw {len(seen)} committed, 0 aborted"
    )


def pop3_spike(dovecot: DovecotServer) -> None:
    dovecot.put("alice", b"From: a@example.com\r\nSubject: spike\r\n\r\nhello\r\n")
    ctx = ssl.create_default_context(cafile=str(dovecot.cafile))
    t0 = time.monotonic()
    pop = poplib.POP3_SSL("127.0.0.1", dovecot.pop3s_port, context=ctx, timeout=10)
    pop.user("alice")
    pop.pass_("alice-pw")
    uidls = pop.uidl()[1]
    n = len(uidls)
    _, lines, _ = pop.retr(1)
    assert b"Subject: spike" in lines
    pop.dele(1)
    pop.quit()
    print(f"pop3s: login+UIDL({n})+RETR+DELE+QUIT in {time.monotonic() - t0:.3f}s, cert verified against the test CA")


if __name__ == "__main__":
    kafka_spike(os.environ["KAFKA_BOOTSTRAP"])
    pop3_spike(
        DovecotServer(
            Path(os.environ["DOVECOT_TEST_DIR"]),
            pop3_port=int(os.environ["POP3_PORT"]),
            pop3s_port=int(os.environ["POP3S_PORT"]),
        )
    )
