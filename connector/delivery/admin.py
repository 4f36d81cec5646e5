"""Topic checks and creation with the AdminClient."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from connector.delivery.kafka import client_config_error
from connector.errors import ConfigError, DeliveryError

#: the last client-level error librdkafka reported per bootstrap (authentication failures
#: reach only error_cb; the AdminClient call itself just times out).
_last_error: dict[str, str] = {}


def _hint(bootstrap: str) -> str:
    last = _last_error.get(bootstrap)
    return f" (last client error: {last})" if last else ""


def admin_client(bootstrap: str, client: Mapping[str, Any]) -> AdminClient:
    conf = dict(client)
    conf["bootstrap.servers"] = bootstrap
    conf["error_cb"] = lambda err: _last_error.__setitem__(bootstrap, err.str())
    # librdkafka logs through Python logging (structured, filtered) instead of raw stderr.
    conf["logger"] = logging.getLogger("pop3kafka.rdkafka.admin")
    try:
        return AdminClient(conf)
    except KafkaException as exc:
        raise client_config_error(exc) from exc


#: Topic settings of a dead-letter topic the connector creates: once a dead letter is in
#: Kafka the mail is deleted from the server, so the dead letter may be its only copy, and
#: neither time (retention.ms) nor size (retention.bytes; -1 is also the broker default)
#: may remove it. Doctor warns about an existing one with other settings.
DEAD_LETTER_TOPIC_CONFIG = {"retention.ms": "-1", "retention.bytes": "-1"}


class TopicSpec(NamedTuple):
    """A topic the connector needs: its name, and the partitions and settings it gets when the
    connector creates it. ``partitions_like``: take the partition count of that topic instead
    (the attachments topic follows the mail topic, whoever created it)."""

    name: str
    partitions: int
    config: Mapping[str, str] | None = None
    partitions_like: str | None = None


def ensure_topics(
    bootstrap: str,
    client: Mapping[str, Any],
    wanted: Sequence[TopicSpec],
    *,
    create: bool,
    replication_factor: int,
    timeout: float = 15.0,
) -> list[str]:
    """Make sure every topic of ``wanted`` exists; returns those created now (with their
    ``config`` as topic settings; an existing topic is left as it is).

    One metadata request answers for all of them and one CreateTopics request creates the
    missing ones: at start-up each AdminClient round trip is time before the first mail.

    Raises DeliveryError naming the topic and the fix when one is missing and ``create`` is
    off, or when the cluster cannot be reached.
    """
    admin = admin_client(bootstrap, client)
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise DeliveryError(
            f"cannot reach Kafka at {bootstrap} within {timeout:.0f}s: {exc.args[0].str()}{_hint(bootstrap)}; "
            "check kafka.bootstrap_servers and the client security settings"
        ) from exc
    present = {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}
    missing = [w for w in wanted if w.name not in present]
    if not missing:
        return []
    if not create:
        raise DeliveryError(
            f"topic {missing[0].name!r} does not exist on {bootstrap} (or this principal lacks Describe on it); "
            "create it, or set topics.create: true to let the connector create it"
        )
    new = []
    for w in missing:
        partitions = present.get(w.partitions_like, w.partitions) if w.partitions_like else w.partitions
        config = dict(w.config or {})
        new.append(NewTopic(w.name, num_partitions=partitions, replication_factor=replication_factor, config=config))
    futures = admin.create_topics(new)
    created: list[str] = []
    for w in missing:
        try:
            futures[w.name].result(timeout=timeout)
        except concurrent.futures.TimeoutError as exc:
            raise DeliveryError(
                f"creating topic {w.name!r} on {bootstrap} did not finish within {timeout:.0f}s; "
                "create it yourself and set topics.create: false"
            ) from exc
        except KafkaException as exc:
            err = exc.args[0]
            if err.name() == "TOPIC_ALREADY_EXISTS":  # another replica won the race
                continue
            raise DeliveryError(f"cannot create topic {w.name!r}: {err.str()}") from exc
        created.append(w.name)
    return created


def ensure_topic(
    bootstrap: str,
    client: Mapping[str, Any],
    topic: str,
    *,
    create: bool,
    partitions: int,
    replication_factor: int,
    timeout: float = 15.0,
    config: Mapping[str, str] | None = None,
) -> bool:
    """Make sure ``topic`` exists; True when it was created now (see ensure_topics)."""
    created = ensure_topics(
        bootstrap,
        client,
        [TopicSpec(topic, partitions, config)],
        create=create,
        replication_factor=replication_factor,
        timeout=timeout,
    )
    return bool(created)


def partitions_of(bootstrap: str, client: Mapping[str, Any], topic: str, *, timeout: float = 15.0) -> int | None:
    """How many partitions ``topic`` has; None when it does not exist or cannot be described."""
    admin = admin_client(bootstrap, client)
    try:
        md = admin.list_topics(topic, timeout=timeout)
    except KafkaException:
        return None
    t = md.topics.get(topic)
    return len(t.partitions) if t is not None and t.error is None else None


DEFAULT_SHARDS = 8


def ensure_ledger_topic(
    bootstrap: str,
    client: Mapping[str, Any],
    topic: str,
    *,
    shards: int | None,
    create: bool,
    replication_factor: int,
    timeout: float = 15.0,
) -> int:
    """Check (or create) the compacted ledger topic; return its partition count = shard count.

    The shard count comes from the topic. A configured count that disagrees is refused: a
    rolling change of it would map a mailbox to two shards, i.e. two owners.
    """
    admin = admin_client(bootstrap, client)
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise DeliveryError(
            f"cannot reach Kafka at {bootstrap} within {timeout:.0f}s: {exc.args[0].str()}{_hint(bootstrap)}"
        ) from exc
    tmd = md.topics.get(topic)
    if tmd is None or tmd.error is not None:
        if not create:
            raise DeliveryError(
                f"ledger topic {topic!r} does not exist; create it compacted (cleanup.policy=compact) with one "
                "partition per shard, or set ledger.create: true"
            )
        n = shards or DEFAULT_SHARDS
        new = NewTopic(
            topic, num_partitions=n, replication_factor=replication_factor, config={"cleanup.policy": "compact"}
        )
        try:
            admin.create_topics([new])[topic].result(timeout=timeout)
        except concurrent.futures.TimeoutError as exc:
            raise DeliveryError(f"creating ledger topic {topic!r} did not finish within {timeout:.0f}s") from exc
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise DeliveryError(f"cannot create ledger topic {topic!r}: {exc.args[0].str()}") from exc
            return ensure_ledger_topic(
                bootstrap, client, topic, shards=shards, create=False, replication_factor=replication_factor
            )
        return n
    partitions = len(tmd.partitions)
    if shards is not None and shards != partitions:
        raise ConfigError(
            f"ledger.shards: configured {shards}, but ledger topic {topic!r} has {partitions} partitions. The shard "
            "count is fixed by the topic; changing it would give a mailbox two owners. Remove ledger.shards or "
            f"set it to {partitions}"
        )
    try:
        res = ConfigResource(ResourceType.TOPIC, topic)
        entries = admin.describe_configs([res])[res].result(timeout=timeout)
    except (KafkaException, concurrent.futures.TimeoutError) as exc:
        raise DeliveryError(f"cannot read the configuration of ledger topic {topic!r}: {exc}") from exc
    policy = entries["cleanup.policy"].value if "cleanup.policy" in entries else "delete"
    if "compact" not in (policy or ""):
        raise DeliveryError(
            f"ledger topic {topic!r} has cleanup.policy={policy}; it must be compacted (cleanup.policy=compact), or "
            "old entries are deleted by retention and mail is published again. Fix: kafka-configs --alter "
            f"--entity-type topics --entity-name {topic} --add-config cleanup.policy=compact"
        )
    return partitions
