"""Topic checks and creation with the AdminClient."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from connector.delivery.kafka import client_config_error
from connector.errors import DeliveryError


def admin_client(bootstrap: str, client: Mapping[str, Any]) -> AdminClient:
    conf = dict(client)
    conf["bootstrap.servers"] = bootstrap
    # librdkafka logs through Python logging (structured, filtered) instead of raw stderr.
    conf["logger"] = logging.getLogger("pop3kafka.rdkafka.admin")
    try:
        return AdminClient(conf)
    except KafkaException as exc:
        raise client_config_error(exc) from exc


def ensure_topic(
    bootstrap: str,
    client: Mapping[str, Any],
    topic: str,
    *,
    create: bool,
    partitions: int,
    replication_factor: int,
    timeout: float = 15.0,
) -> bool:
    """Make sure ``topic`` exists; returns True when it was created now.

    Raises DeliveryError naming the topic and the fix when it is missing and ``create`` is off,
    or when the cluster cannot be reached.
    """
    admin = admin_client(bootstrap, client)
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise DeliveryError(
            f"cannot reach Kafka at {bootstrap} within {timeout:.0f}s: {exc.args[0].str()}; "
            "check kafka.bootstrap_servers and the client security settings"
        ) from exc
    if topic in md.topics and md.topics[topic].error is None:
        return False
    if not create:
        raise DeliveryError(
            f"topic {topic!r} does not exist on {bootstrap}; create it, or set "
            "topics.create: true to let the connector create it"
        )
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor)])
    try:
        futures[topic].result(timeout=timeout)
    except concurrent.futures.TimeoutError as exc:
        raise DeliveryError(
            f"creating topic {topic!r} on {bootstrap} did not finish within {timeout:.0f}s; "
            "create it yourself and set topics.create: false"
        ) from exc
    except KafkaException as exc:
        err = exc.args[0]
        if err.name() == "TOPIC_ALREADY_EXISTS":  # another replica won the race
            return False
        raise DeliveryError(f"cannot create topic {topic!r}: {err.str()}") from exc
    return True
