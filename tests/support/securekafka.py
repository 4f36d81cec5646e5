"""A secured single-node Kafka (SASL_SSL SCRAM, mTLS, StandardAuthorizer) for the security and
doctor tests, and fresh resource names per test so ACLs granted by one test never help another."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient, NewTopic
from kafka_acls import Acl, connector_acls
from localstack import KafkaNode


def secure_kafka(directory: Path) -> Iterator[KafkaNode]:
    """Start a secured broker in ``directory``; stop it when the generator is closed."""
    node = KafkaNode(directory, secure=True)
    node.start()
    try:
        yield node
    finally:
        node.stop()


@dataclass
class Names:
    mail: str
    ledger: str
    txn_prefix: str

    @property
    def dead_letter(self) -> str:
        """topics.dead_letter's default."""
        return f"{self.mail}.dlq"

    @classmethod
    def fresh(cls) -> Names:
        tag = uuid.uuid4().hex[:8]
        return cls(f"mail-{tag}", f"ledger-{tag}", f"pop3k-{tag}")

    def acls(self, **kw: Any) -> list[Acl]:
        return connector_acls(mail_topic=self.mail, ledger_topic=self.ledger, txn_prefix=self.txn_prefix, **kw)

    def create_topics(self, bootstrap: str, *, ledger_partitions: int = 2, policy: str = "compact") -> None:
        admin = AdminClient({"bootstrap.servers": bootstrap})
        futs = admin.create_topics(
            [
                NewTopic(self.mail, 2, 1),
                NewTopic(self.dead_letter, 2, 1, config={"retention.ms": "-1"}),
                NewTopic(f"{self.mail}.attachments", 2, 1),
                NewTopic(self.ledger, ledger_partitions, 1, config={"cleanup.policy": policy}),
            ]
        )
        for f in futs.values():
            f.result(timeout=15)
