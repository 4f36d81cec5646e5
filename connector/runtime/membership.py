"""Which shards this replica owns: a consumer group on the ledger topic (docs/decisions/0005).

The group coordinator assigns ledger partitions (= shards) to the members; this module only
turns assignments into calls of the runner and keeps the membership alive:

* one thread polls the group consumer every second, whatever POP3 sessions do, so a slow
  mailbox never gets the replica evicted (``max.poll.interval.ms`` is about this thread);
* the partitions are paused at once: the consumer is for membership, it fetches nothing and
  commits nothing (the ledger is read by its own assigned consumer when a shard is loaded);
* ``cooperative-sticky``: a rebalance only revokes the shards that move; ``on_revoke`` blocks
  the rebalance until the runner has stopped the shard (its round committed or aborted), so
  two replicas never run a shard at the same time, and the transactional id per shard fences a
  replica that missed its revocation;
* static membership (``group.instance.id``) when the replica has a stable identity (a
  StatefulSet pod name): a restart within the session timeout keeps its shards.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from connector.config.model import Config
from connector.delivery.kafka import client_config_error

log = logging.getLogger("pop3kafka.membership")

#: how often a lasting group authorization failure is logged again (it recurs at every retry).
AUTH_ERROR_EVERY_S = 60.0


def owners_group(config: Config) -> str:
    return f"{config.delivery.transactional_id_prefix}-owners"


class Membership:
    """Runs the group consumer in a thread; ``on_assign``/``on_revoke`` get shard numbers."""

    def __init__(
        self,
        config: Config,
        on_assign: Callable[[list[int]], None],
        on_revoke: Callable[[list[int]], None],
        *,
        instance_id: str | None = None,
        session_timeout_ms: int = 45_000,
        max_poll_interval_ms: int = 300_000,
    ) -> None:
        conf = {
            **config.kafka.client_conf(),
            "bootstrap.servers": config.kafka.bootstrap_servers,
            "group.id": owners_group(config),
            "partition.assignment.strategy": "cooperative-sticky",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "session.timeout.ms": session_timeout_ms,
            # A revocation waits for the shard's round (up to the shutdown grace) inside the
            # rebalance callback, which runs in poll(): the member must not count as stuck then.
            "max.poll.interval.ms": max_poll_interval_ms,
            "logger": logging.getLogger("pop3kafka.rdkafka.membership"),
        }
        if instance_id:
            conf["group.instance.id"] = instance_id
        try:
            self.consumer = Consumer(conf)
        except KafkaException as exc:
            raise client_config_error(exc) from exc
        self.topic = config.ledger.topic
        self.group = owners_group(config)
        self._auth_logged_at: float | None = None
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self.stop = threading.Event()
        self.owned: set[int] = set()
        #: set after the first assignment (possibly empty) arrived: the replica knows its shards.
        self.settled = threading.Event()
        #: a rebalance callback failed: ownership is uncertain, readiness is withdrawn.
        self.failed = False
        self.thread = threading.Thread(target=self._loop, name="membership", daemon=True)

    def start(self) -> None:
        self.consumer.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._revoked)
        self.thread.start()

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Cooperative: ``partitions`` are the new ones only. Paused: nothing is fetched.
        if partitions:
            consumer.incremental_assign(partitions)
            consumer.pause(partitions)
        shards = sorted(tp.partition for tp in partitions)
        self.owned.update(shards)
        log.info("shards assigned: %s (owning %s)", shards, sorted(self.owned))
        if shards:
            self._on_assign(shards)
        self.settled.set()

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        shards = sorted(tp.partition for tp in partitions)
        log.info("shards revoked: %s", shards)
        if shards:
            self._on_revoke(shards)  # returns once the runner no longer runs them
        self.owned.difference_update(shards)
        if partitions:
            consumer.incremental_unassign(partitions)

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                msg = self.consumer.poll(1.0)
            except KafkaException as exc:
                if not self._group_denied(exc.args[0]):
                    log.warning("membership: %s", exc.args[0])
                continue
            except Exception:  # a callback's bug must not silently end the membership
                log.exception("membership: error in a rebalance callback; the replica is no longer ready")
                self.failed = True
                continue
            err = msg.error() if msg is not None else None
            if err is not None and err.code() != KafkaError._PARTITION_EOF and not self._group_denied(err):
                log.warning("membership: %s", err.str())

    def _group_denied(self, err: KafkaError) -> bool:
        """A GROUP_AUTHORIZATION_FAILED: the replica cannot join, so it owns no shard and polls
        nothing. Logged as an ERROR naming the missing ACL (again every AUTH_ERROR_EVERY_S)."""
        if err.code() != KafkaError.GROUP_AUTHORIZATION_FAILED:
            return False
        now = time.monotonic()
        if self._auth_logged_at is None or now - self._auth_logged_at >= AUTH_ERROR_EVERY_S:
            self._auth_logged_at = now
            log.error(
                "membership: not authorized to join consumer group %r (%s): this replica owns no shard "
                "and polls no mailbox; grant Read on group %r to the connector's principal "
                "(deploy/local/kafka_acls.py --group-ownership, docs/kafka-security.md)",
                self.group,
                err.str(),
                self.group,
            )
        return True

    def close(self, timeout: float = 60.0) -> None:
        """Leave the group (revoking our shards through on_revoke) and stop the thread."""
        self.stop.set()
        self.thread.join(timeout)  # a revocation in progress ends first: poll() is not shared
        if self.thread.is_alive():
            log.warning("membership: still in a rebalance after %.0f s; leaving without a clean close", timeout)
            return
        try:
            self.consumer.close()  # leaves the group: the shards move at once (dynamic members)
        except KafkaException as exc:
            log.warning("membership: leaving the group failed: %s", exc.args[0])
