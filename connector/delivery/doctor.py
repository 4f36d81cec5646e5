"""``pop3-kafka doctor``, Kafka half: check the cluster, the topics and the ACLs before a run.

Nothing here writes a record, creates a topic or touches a real shard's transactional id:

* topics: ``DescribeTopics`` with ``include_authorized_operations`` (KIP-430). The broker
  answers, per topic, which operations *this* principal is authorized for, so Write, Read and
  DescribeConfigs are checked without producing or consuming anything. A missing topic is
  checked with a validate-only ``CreateTopics`` (authorization and config checked, nothing
  created) when the connector would create it.
* TransactionalId Write: ``init_transactions()`` of a producer with transactional.id
  ``<prefix>-shard-doctor``. It matches the documented prefixed ACL ``<prefix>-shard-`` but is
  never a real shard's id (those end in a number), so no running connector is fenced. It leaves
  only that id's entry in ``__transaction_state`` (expires after the broker's
  ``transactional.id.expiration.ms``, 7 days by default).
* ledger Read: a read_committed fetch from the end of every ledger partition (zero records), with
  the group id ``pop3-kafka-ledger-loader-doctor`` (matches the loader's prefixed Group ACL,
  commits nothing), and a ``DescribeGroups`` of that id for the Group Describe ACL.

Every failing finding names the missing ACL as docs/kafka-security.md lists it and gives the
``kafka-acls.sh`` command that grants it. Secrets (``kafka.client_secrets``) never appear.
"""

from __future__ import annotations

import concurrent.futures
import logging
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclOperation,
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from connector.config.model import CHUNK_RECORD_OVERHEAD, Config
from connector.delivery.admin import DEAD_LETTER_TOPIC_CONFIG, DEFAULT_SHARDS

log = logging.getLogger("pop3kafka.doctor")

#: the ledger loader's group ids are "pop3-kafka-ledger-loader-<shard>" (transactional.py).
LOADER_GROUP_PREFIX = "pop3-kafka-ledger-loader-"
DOCTOR_GROUP = f"{LOADER_GROUP_PREFIX}doctor"

_RETRY_CODES = frozenset(
    {
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError._TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
    }
)
_CLI_RESOURCE = {"Topic": "--topic", "Group": "--group", "TransactionalId": "--transactional-id"}


@dataclass(frozen=True)
class Finding:
    """One check's outcome; ``fix`` says what to change when ``ok`` is false."""

    check: str
    ok: bool
    detail: str
    fix: str | None = None
    #: ok, but the operator should look at it (printed as WARN with the fix; doctor still passes).
    warning: bool = False


@dataclass(frozen=True)
class _Acl:
    resource: str  # Topic, Group, TransactionalId (as docs/kafka-security.md writes them)
    name: str
    operation: str  # Write, Read, Create, Describe, DescribeConfigs
    prefixed: bool = False

    def __str__(self) -> str:
        return f"{self.resource} {self.name!r} ({'prefixed' if self.prefixed else 'literal'}) {self.operation}"


@dataclass(frozen=True)
class _ConfigFailure:
    """Why a topic's configuration could not be read: a missing ACL (``acl``), no answer in
    time (``timed_out``), or another broker error (``text``)."""

    text: str
    acl: _Acl | None = None
    timed_out: bool = False


class _Doctor:
    def __init__(self, config: Config, timeout: float) -> None:
        self.config = config
        self.timeout = timeout
        self.bootstrap = config.kafka.bootstrap_servers
        self.errors: list[str] = []  # client-level errors (authentication failures arrive only here)
        client = config.kafka.client
        user = client.get("sasl.username")
        proto = str(client.get("security.protocol", "PLAINTEXT")).upper()
        self.principal = f"User:{user}" if user and proto.startswith("SASL") else "User:<connector principal>"

    # ---- clients

    def _conf(self, logger: str) -> dict[str, Any]:
        conf = self.config.kafka.client_conf()
        conf["bootstrap.servers"] = self.bootstrap
        conf["error_cb"] = self._on_error
        conf["logger"] = logging.getLogger(f"pop3kafka.rdkafka.{logger}")
        return conf

    def _on_error(self, err: KafkaError) -> None:
        self.errors.append(err.str())

    def _last_error(self) -> str:
        return f" (last client error: {self.errors[-1]})" if self.errors else ""

    # ---- ACL wording

    def missing(self, *acls: _Acl) -> str:
        return "missing ACL: " + "; ".join(str(a) for a in acls)

    def grant(self, *acls: _Acl) -> str:
        """The kafka-acls.sh command(s) granting ``acls`` (one per resource), as in the docs."""
        cmds: dict[tuple[str, str, bool], list[str]] = {}
        for a in acls:
            cmds.setdefault((a.resource, a.name, a.prefixed), []).append(a.operation)
        out = []
        for (resource, name, prefixed), ops in cmds.items():
            cmd = ["kafka-acls.sh", "--bootstrap-server", self.bootstrap, "--command-config", "admin.properties"]
            cmd += ["--add", "--allow-principal", self.principal]
            for op in ops:
                cmd += ["--operation", op]
            cmd += [_CLI_RESOURCE[resource], name]
            if prefixed:
                cmd += ["--resource-pattern-type", "prefixed"]
            out.append(shlex.join(cmd))
        return "grant it (docs/kafka-security.md): " + " && ".join(out)

    # ---- checks

    def run(self) -> list[Finding]:
        try:
            admin = AdminClient(self._conf("doctor"))
        except KafkaException as exc:
            err = exc.args[0]
            text = err.str() if isinstance(err, KafkaError) else str(err)
            return [
                Finding("kafka.broker", False, f"librdkafka refused the client settings: {text}", "fix kafka.client")
            ]
        reach = self.check_broker(admin)
        if not reach.ok:
            return [reach]
        out = [reach]
        eos = self.config.delivery.mode == "exactly_once"
        dlq = self.config.topics.dead_letter
        chunked = any(m.attachments.placement == "chunked" for m in self.config.mailboxes)
        att = self.config.topics.attachments
        topics = (
            [self.config.topics.mail, dlq] + ([self.config.ledger.topic] if eos else []) + ([att] if chunked else [])
        )
        described = self._describe_topics(admin, topics)
        out += self.check_mail(admin, described[self.config.topics.mail])
        out += self.check_dead_letter(admin, described[dlq])
        if chunked:
            out += self.check_attachments(admin, described[att], described[self.config.topics.mail])
        if eos:
            out += self.check_ledger(admin, described[self.config.ledger.topic])
            out.append(self.check_group(admin))
            out.append(self.check_transactional_id())
        return out

    def check_broker(self, admin: AdminClient) -> Finding:
        try:
            md = admin.list_topics(timeout=self.timeout)
        except KafkaException as exc:
            err = exc.args[0]
            text = err.str() if isinstance(err, KafkaError) else str(err)
            # error_cb is served by poll(): an authentication failure is queued there, not raised.
            deadline = time.monotonic() + 2.0
            while not self.errors and time.monotonic() < deadline:
                admin.poll(0.2)
            return Finding(
                "kafka.broker",
                False,
                f"cannot reach Kafka at {self.bootstrap} within {self.timeout:.0f}s: {text}{self._last_error()}",
                "check kafka.bootstrap_servers, the network, and the security settings and credentials in "
                "kafka.client / kafka.client_secrets",
            )
        return Finding(
            "kafka.broker", True, f"{self.bootstrap}: {len(md.brokers)} broker(s), cluster id {md.cluster_id}"
        )

    def _describe_topics(self, admin: AdminClient, topics: list[str]) -> dict[str, Any]:
        """topic -> TopicDescription, or the KafkaError the broker answered (None: no answer)."""
        futures = admin.describe_topics(
            TopicCollection(topics), include_authorized_operations=True, request_timeout=self.timeout
        )
        out: dict[str, Any] = {}
        for topic, fut in futures.items():
            try:
                out[topic] = fut.result(timeout=self.timeout + 5)
            except KafkaException as exc:
                out[topic] = exc.args[0]
            except concurrent.futures.TimeoutError:
                out[topic] = None
        return out

    def _topic_missing(
        self, admin: AdminClient, check: str, topic: str, *, create: bool, new: NewTopic, setting: str
    ) -> Finding:
        later = "Write/Read rights on it can only be checked once it exists: run doctor again after the first start"
        if not create:
            return Finding(
                check,
                False,
                f"topic {topic!r} does not exist ({setting}: false)",
                f"create it as an administrator, or set {setting}: true (needs {_Acl('Topic', topic, 'Create')})",
            )
        try:
            admin.create_topics([new], validate_only=True, request_timeout=self.timeout)[topic].result(
                timeout=self.timeout + 5
            )
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:  # created meanwhile
                return Finding(check, True, f"topic {topic!r} exists (created just now by someone else)")
            if err.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED):
                acl = _Acl("Topic", topic, "Create")
                return Finding(
                    check,
                    False,
                    f"topic {topic!r} does not exist and the connector may not create it ({setting}: true): "
                    f"{self.missing(acl)}",
                    f"{self.grant(acl)}; or create it as an administrator and set {setting}: false",
                )
            return Finding(
                check, False, f"topic {topic!r} does not exist and creating it would fail: {err.str()}", None
            )
        except concurrent.futures.TimeoutError:
            return Finding(check, False, f"topic {topic!r} does not exist; the create check got no answer", None)
        return Finding(
            check,
            True,
            f"topic {topic!r} does not exist yet; the connector creates it at start ({setting}: true) and may "
            f"(validate-only CreateTopics, nothing created). {later}",
        )

    def _not_visible(self, check: str, topic: str, answer: Any, acls: list[_Acl], *, create: str | None) -> Finding:
        if isinstance(answer, KafkaError) and answer.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            also = f"; if it does not exist yet, {create} also needs {_Acl('Topic', topic, 'Create')}" if create else ""
            return Finding(
                check,
                False,
                f"this principal may not Describe topic {topic!r} (the broker does not say whether it exists): "
                f"{self.missing(*acls)} (Write and Read imply Describe){also}",
                self.grant(*acls),
            )
        text = answer.str() if isinstance(answer, KafkaError) else "no answer"
        return Finding(check, False, f"cannot describe topic {topic!r}: {text}{self._last_error()}", None)

    def _op(self, check: str, topic: str, desc: Any, op: str, what: str) -> Finding:
        ops = desc.authorized_operations
        acl = _Acl("Topic", topic, op)
        if ops is None:
            return Finding(
                check, False, f"the broker did not report authorized operations for topic {topic!r}; {op} unchecked"
            )
        if AclOperation[{"DescribeConfigs": "DESCRIBE_CONFIGS"}.get(op, op.upper())] in ops:
            return Finding(check, True, f"{op} on topic {topic!r} allowed ({what}; nothing written or read)")
        return Finding(
            check, False, f"this principal may not {op} topic {topic!r} ({what}): {self.missing(acl)}", self.grant(acl)
        )

    def check_mail(self, admin: AdminClient, answer: Any) -> list[Finding]:
        t = self.config.topics
        write = _Acl("Topic", t.mail, "Write")
        if isinstance(answer, KafkaError) and answer.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            new = NewTopic(t.mail, num_partitions=t.partitions, replication_factor=t.replication_factor)
            return [
                self._topic_missing(
                    admin, "kafka.mail_topic", t.mail, create=t.create, new=new, setting="topics.create"
                )
            ]
        if answer is None or isinstance(answer, KafkaError):
            f = self._not_visible(
                "kafka.mail_topic", t.mail, answer, [write], create="topics.create: true" if t.create else None
            )
            return [f, Finding("kafka.mail_topic.write", False, f"{self.missing(write)} (see kafka.mail_topic)", f.fix)]
        return [
            Finding("kafka.mail_topic", True, f"topic {t.mail!r} exists ({len(answer.partitions)} partitions)"),
            self._op("kafka.mail_topic.write", t.mail, answer, "Write", "produce mail records"),
        ]

    def check_dead_letter(self, admin: AdminClient, answer: Any) -> list[Finding]:
        """The dead-letter topic: exists (or will be created), Write, and retention (WARN)."""
        t = self.config.topics
        topic, check = t.dead_letter, "kafka.dead_letter_topic"
        write = _Acl("Topic", topic, "Write")
        if isinstance(answer, KafkaError) and answer.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            new = NewTopic(
                topic,
                num_partitions=t.partitions,
                replication_factor=t.replication_factor,
                config=dict(DEAD_LETTER_TOPIC_CONFIG),
            )
            f = self._topic_missing(admin, check, topic, create=t.create, new=new, setting="topics.create")
            if f.ok and "does not exist yet" in f.detail:
                f = Finding(check, True, f"{f.detail} It is created with retention.ms=-1 (dead letters are kept).")
            return [f]
        if answer is None or isinstance(answer, KafkaError):
            f = self._not_visible(check, topic, answer, [write], create="topics.create: true" if t.create else None)
            return [f, Finding(f"{check}.write", False, f"{self.missing(write)} (see {check})", f.fix)]
        return [
            Finding(check, True, f"topic {topic!r} exists ({len(answer.partitions)} partitions)"),
            self._op(f"{check}.write", topic, answer, "Write", "produce dead letters"),
            self.check_dead_letter_retention(admin),
        ]

    def check_attachments(self, admin: AdminClient, answer: Any, mail: Any) -> list[Finding]:
        """The chunk-record topic: exists (or will be created), Write, the mail topic's
        partition count (WARN otherwise), and a max.message.bytes that takes a chunk record."""
        t = self.config.topics
        topic, check = t.attachments, "kafka.attachments_topic"
        write = _Acl("Topic", topic, "Write")
        if isinstance(answer, KafkaError) and answer.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            new = NewTopic(topic, num_partitions=t.partitions, replication_factor=t.replication_factor)
            return [self._topic_missing(admin, check, topic, create=t.create, new=new, setting="topics.create")]
        if answer is None or isinstance(answer, KafkaError):
            f = self._not_visible(check, topic, answer, [write], create="topics.create: true" if t.create else None)
            return [f, Finding(f"{check}.write", False, f"{self.missing(write)} (see {check})", f.fix)]
        n = len(answer.partitions)
        out = [
            Finding(check, True, f"topic {topic!r} exists ({n} partitions)"),
            self._op(f"{check}.write", topic, answer, "Write", "produce attachment chunks"),
        ]
        m = len(mail.partitions) if mail is not None and not isinstance(mail, KafkaError) else None
        if m is not None and m != n:
            out.append(
                Finding(
                    f"{check}.partitions",
                    True,
                    f"topic {topic!r} has {n} partitions, {t.mail!r} {m}: chunk records keep their mail's key but "
                    "land in a partition with another number (consumers that read partition by partition must "
                    "read both topics whole)",
                    f"give both topics the same partition count (kafka-topics.sh --alter --partitions {max(n, m)})",
                    warning=True,
                )
            )
        out.append(self.check_chunk_size(admin))
        return out

    def check_chunk_size(self, admin: AdminClient) -> Finding:
        """A chunk record (topics.chunk_bytes plus its framing) must fit the topic's max.message.bytes."""
        t = self.config.topics
        check = "kafka.attachments_topic.max_message_bytes"
        need = t.chunk_bytes + CHUNK_RECORD_OVERHEAD
        entries, failure = self.topic_config(admin, t.attachments)
        if failure is not None:
            text = "no DescribeConfigs answer" if failure.timed_out else failure.text
            return Finding(
                check,
                True,
                f"max.message.bytes of {t.attachments!r} not checked: {text}",
                self.grant(failure.acl) if failure.acl is not None else None,
                warning=True,
            )
        entry = entries.get("max.message.bytes")
        limit = int(entry.value) if entry is not None and entry.value is not None else 1048588
        if limit >= need:
            return Finding(
                check,
                True,
                f"max.message.bytes={limit} takes chunk records of up to {need} bytes (chunk_bytes {t.chunk_bytes})",
            )
        return Finding(
            check,
            False,
            f"topic {t.attachments!r} has max.message.bytes={limit}, but a chunk record is up to {need} bytes "
            f"(topics.chunk_bytes {t.chunk_bytes} + framing): the broker would refuse it, and every cycle with a "
            "chunked mail would fail (nothing deleted, retried for ever)",
            f"lower topics.chunk_bytes below {limit - CHUNK_RECORD_OVERHEAD}, or kafka-configs.sh --bootstrap-server "
            f"{self.bootstrap} --alter --entity-type topics --entity-name {t.attachments} --add-config "
            f"max.message.bytes={need}",
        )

    def check_dead_letter_retention(self, admin: AdminClient) -> Finding:
        """WARN unless dead letters are kept for good: once one is in Kafka its mail is deleted
        from the server, so the dead letter may be the only copy of that mail."""
        topic, check = self.config.topics.dead_letter, "kafka.dead_letter_topic.retention"
        entries, failure = self.topic_config(admin, topic)
        if failure is not None:
            if failure.acl is not None:
                return Finding(
                    check,
                    True,
                    f"retention of {topic!r} not checked: {failure.text} (optional; only this check needs it)",
                    self.grant(failure.acl),
                    warning=True,
                )
            text = "no DescribeConfigs answer" if failure.timed_out else failure.text
            return Finding(check, True, f"retention of {topic!r} not checked: {text}", warning=True)

        def value(name: str, default: str) -> str:
            entry = entries.get(name)
            return str(entry.value) if entry is not None and entry.value is not None else default

        settings = {
            "retention.ms": value("retention.ms", "604800000"),
            "retention.bytes": value("retention.bytes", "-1"),
            "cleanup.policy": value("cleanup.policy", "delete"),
        }
        wanted = {**DEAD_LETTER_TOPIC_CONFIG, "cleanup.policy": "delete"}
        wrong = {k: v for k, v in settings.items() if v != wanted[k]}
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        if not wrong:
            return Finding(check, True, f"{shown}: dead letters are kept until an operator removes them")
        why = []
        if "retention.ms" in wrong or "retention.bytes" in wrong:
            why.append("retention deletes dead letters")
        if "cleanup.policy" in wrong:
            why.append("compaction keeps only the last dead letter per key")
        alter = ",".join(f"{k}={v}" for k, v in wanted.items() if k in wrong)
        return Finding(
            check,
            True,
            f"topic {topic!r} has {shown}: {' and '.join(why)}, and a dead-lettered mail is already deleted from "
            "the server, so the dead letter may be its only copy",
            f"kafka-configs.sh --bootstrap-server {self.bootstrap} --alter --entity-type topics --entity-name {topic} "
            f"--add-config {alter}",
            warning=True,
        )

    def check_ledger(self, admin: AdminClient, answer: Any) -> list[Finding]:
        lc = self.config.ledger
        topic = lc.topic
        if isinstance(answer, KafkaError) and answer.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            new = NewTopic(
                topic,
                num_partitions=lc.shards or DEFAULT_SHARDS,
                replication_factor=self.config.topics.replication_factor,
                config={"cleanup.policy": "compact"},
            )
            return [
                self._topic_missing(admin, "kafka.ledger", topic, create=lc.create, new=new, setting="ledger.create")
            ]
        out: list[Finding] = []
        if answer is None or isinstance(answer, KafkaError):
            acls = [_Acl("Topic", topic, "Write"), _Acl("Topic", topic, "Read")]
            f = self._not_visible(
                "kafka.ledger", topic, answer, acls, create="ledger.create: true" if lc.create else None
            )
            out += [
                f,
                Finding(
                    "kafka.ledger.write", False, f"{self.missing(acls[0])} (see kafka.ledger)", self.grant(acls[0])
                ),
                Finding("kafka.ledger.read", False, f"{self.missing(acls[1])} (see kafka.ledger)", self.grant(acls[1])),
            ]
            out.append(self.check_compacted(admin))
            return out
        n = len(answer.partitions)
        out.append(Finding("kafka.ledger", True, f"ledger topic {topic!r} exists ({n} partitions = shards)"))
        if lc.shards is not None and lc.shards != n:
            out.append(
                Finding(
                    "kafka.ledger.shards",
                    False,
                    f"ledger.shards is {lc.shards} but ledger topic {topic!r} has {n} partitions; the connector "
                    "refuses to start (a changed shard count would give a mailbox two owners)",
                    f"remove ledger.shards or set it to {n}",
                )
            )
        else:
            how = "matches ledger.shards" if lc.shards is not None else "ledger.shards not set: taken from the topic"
            out.append(Finding("kafka.ledger.shards", True, f"{n} shards ({how})"))
        out.append(self.check_compacted(admin))
        out.append(self._op("kafka.ledger.write", topic, answer, "Write", "ledger entries in the shard transactions"))
        read = self._op("kafka.ledger.read", topic, answer, "Read", "rebuild the ledger at start")
        out.append(self.check_read(sorted(p.id for p in answer.partitions)) if read.ok else read)
        return out

    def topic_config(self, admin: AdminClient, topic: str) -> tuple[dict[str, Any], _ConfigFailure | None]:
        """The topic's configuration entries (DescribeConfigs), or why they could not be read."""
        acl = _Acl("Topic", topic, "DescribeConfigs")
        res = ConfigResource(ResourceType.TOPIC, topic)
        try:
            entries = admin.describe_configs([res], request_timeout=self.timeout)[res].result(timeout=self.timeout + 5)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                return {}, _ConfigFailure(self.missing(acl), acl=acl)
            return {}, _ConfigFailure(err.str())
        except concurrent.futures.TimeoutError:
            return {}, _ConfigFailure("", timed_out=True)
        return dict(entries), None

    def check_compacted(self, admin: AdminClient) -> Finding:
        topic = self.config.ledger.topic
        entries, failure = self.topic_config(admin, topic)
        if failure is not None:
            if failure.acl is not None:
                return Finding(
                    "kafka.ledger.compacted",
                    False,
                    f"cannot read the configuration of ledger topic {topic!r}: {failure.text}",
                    self.grant(failure.acl),
                )
            if failure.timed_out:
                return Finding("kafka.ledger.compacted", False, f"no answer to DescribeConfigs of {topic!r}")
            return Finding(
                "kafka.ledger.compacted", False, f"cannot read the configuration of {topic!r}: {failure.text}"
            )
        policy = entries["cleanup.policy"].value if "cleanup.policy" in entries else "delete"
        if "compact" not in (policy or ""):
            return Finding(
                "kafka.ledger.compacted",
                False,
                f"ledger topic {topic!r} has cleanup.policy={policy}: retention would delete ledger entries and "
                "mail would be published again; the connector refuses to start",
                f"kafka-configs.sh --bootstrap-server {self.bootstrap} --alter --entity-type topics "
                f"--entity-name {topic} --add-config cleanup.policy=compact",
            )
        return Finding("kafka.ledger.compacted", True, f"cleanup.policy={policy}")

    def check_read(self, partitions: list[int]) -> Finding:
        """Fetch from the end of each ledger partition, read_committed, as the loader would (0 records)."""
        topic = self.config.ledger.topic
        conf = self._conf("doctor.ledger")
        conf.update(
            {
                "group.id": DOCTOR_GROUP,
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                "allow.auto.create.topics": False,
            }
        )
        consumer = Consumer(conf)
        errors: list[str] = []
        try:
            consumer.assign([TopicPartition(topic, p, -1) for p in partitions])  # OFFSET_END: no records
            pending = set(partitions)
            deadline = time.monotonic() + self.timeout
            while pending and time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                err = msg.error()
                if err is None:
                    continue
                if err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(msg.partition() or 0)
                elif err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                    acl = _Acl("Topic", topic, "Read")
                    return Finding("kafka.ledger.read", False, f"fetch refused: {self.missing(acl)}", self.grant(acl))
                elif err.code() != KafkaError.GROUP_AUTHORIZATION_FAILED:  # reported by kafka.ledger_loader_group
                    errors.append(err.str())
        finally:
            consumer.close()
        if pending:
            last = f" (last error: {errors[-1]})" if errors else self._last_error()
            return Finding(
                "kafka.ledger.read",
                False,
                f"Read on {topic!r} allowed, but partitions {sorted(pending)} could not be fetched within "
                f"{self.timeout:.0f}s{last}",
                "check that the partition leaders' advertised listeners are reachable from here",
            )
        return Finding(
            "kafka.ledger.read",
            True,
            f"Read on topic {topic!r} allowed; fetched the end of all {len(partitions)} partitions read_committed "
            "(no records read)",
        )

    def check_group(self, admin: AdminClient) -> Finding:
        acl = _Acl("Group", LOADER_GROUP_PREFIX, "Describe", prefixed=True)

        def call() -> Any:
            fut = admin.describe_consumer_groups(
                [DOCTOR_GROUP], include_authorized_operations=True, request_timeout=self.timeout
            )[DOCTOR_GROUP]
            return fut.result(timeout=self.timeout + 5)

        try:
            _retry(call, self.timeout)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
                return Finding(
                    "kafka.ledger_loader_group",
                    False,
                    f"the ledger loader's group ids ({LOADER_GROUP_PREFIX}<shard>) may not be described: "
                    f"{self.missing(acl)}; the connector works without it but logs 'FindCoordinator response error: "
                    "Group authorization failed' at every ledger load",
                    self.grant(acl),
                )
            return Finding("kafka.ledger_loader_group", False, f"DescribeGroups {DOCTOR_GROUP!r}: {err.str()}")
        except concurrent.futures.TimeoutError:
            return Finding("kafka.ledger_loader_group", False, f"no answer to DescribeGroups {DOCTOR_GROUP!r}")
        return Finding(
            "kafka.ledger_loader_group", True, f"Describe on group {DOCTOR_GROUP!r} allowed ({acl} matches it)"
        )

    def check_transactional_id(self) -> Finding:
        prefix = self.config.delivery.transactional_id_prefix
        txn_id = f"{prefix}-shard-doctor"
        acl = _Acl("TransactionalId", f"{prefix}-shard-", "Write", prefixed=True)
        conf = self._conf("doctor.txn")
        conf.update(
            {
                "transactional.id": txn_id,
                "transaction.timeout.ms": 60_000,
                "enable.idempotence": True,
                "acks": "all",
                "allow.auto.create.topics": False,
            }
        )
        try:
            producer = Producer(conf)
            producer.init_transactions(self.timeout)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
                return Finding(
                    "kafka.transactional_id",
                    False,
                    f"init_transactions of {txn_id!r} refused: {self.missing(acl)}",
                    self.grant(acl),
                )
            return Finding(
                "kafka.transactional_id",
                False,
                f"init_transactions of {txn_id!r} failed: {err.str()}{self._last_error()}",
            )
        producer.flush(0)
        return Finding(
            "kafka.transactional_id",
            True,
            f"Write on transactional ids {prefix}-shard-* allowed (init_transactions of {txn_id!r}; no real "
            "shard's id touched, nothing produced)",
        )


def _retry(call: Callable[[], Any], timeout: float) -> Any:
    """``call()``, retried while the broker says the coordinator is not ready yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except KafkaException as exc:
            if exc.args[0].code() not in _RETRY_CODES or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def check_kafka(config: Config, *, timeout: float = 10.0) -> list[Finding]:
    """Check Kafka for ``config``: broker, topics, ledger and the connector's ACLs.

    Returns one Finding per check, in a fixed order; stops after ``kafka.broker`` when the
    cluster cannot be reached. Writes nothing visible to consumers and fences nobody (see the
    module docstring). ``timeout`` bounds each broker request.
    """
    return _Doctor(config, timeout).run()


def check_offload(config: Config) -> list[Finding]:
    """The offload store (``offload:``), when a mailbox uses ``placement: offload``: reachable,
    writable (a temporary object, removed at once), server-side encryption accepted. Nothing
    when no mailbox offloads."""
    if config.offload is None or not any(m.attachments.placement == "offload" for m in config.mailboxes):
        return []
    from connector.delivery.offload import OffloadConfigError, open_store  # noqa: PLC0415 - boto3 only here

    s = config.offload
    where = f"directory {s.directory!r}" if s.kind == "filesystem" else f"bucket {s.bucket!r}"
    try:
        problems = open_store(s).check()
    except OffloadConfigError as exc:
        problems = [str(exc)]
    if not problems:
        return [Finding("offload.store", True, f"{where} is usable (a test write was removed at once)")]
    return [Finding("offload.store", False, "; ".join(problems), "see docs/configuration.md, offload")]


__all__ = ["Finding", "check_kafka", "check_offload"]
