#!/usr/bin/env python3
"""The Kafka ACLs the connector needs, as one list shared by the docs, the tests and operators.

docs/kafka-security.md explains each entry; tests/integration/test_kafka_security.py proves the
connector works with exactly these against a broker with the StandardAuthorizer (and that it is
refused without them).

    # create them (the admin connection must be allowed to alter ACLs, e.g. a super user)
    python deploy/local/kafka_acls.py grant --bootstrap HOST:PORT --principal User:pop3kafka \\
        --mail-topic mail [--admin-config admin.properties]
    # print the equivalent kafka-acls.sh commands
    python deploy/local/kafka_acls.py print --principal User:pop3kafka --mail-topic mail

The connector's names: transactional ids ``<delivery.transactional_id_prefix>-shard-<n>``
(default prefix ``pop3-kafka``), ledger-loader consumer groups ``pop3-kafka-ledger-loader-<n>``
and the ``pop3-kafka tail`` group ``pop3-kafka-tail`` (both group ids are fixed in the code);
with ``runtime.ownership: group`` the replicas' owners group ``<prefix>-owners``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_LEDGER_TOPIC = "pop3-kafka.ledger"
DEFAULT_TXN_PREFIX = "pop3-kafka"
DEFAULT_GROUP_PREFIX = "pop3-kafka-ledger-loader-"
TAIL_GROUP = "pop3-kafka-tail"


@dataclass(frozen=True)
class Acl:
    """One ALLOW rule for the connector's principal, from any host."""

    resource: str  # TOPIC, GROUP, TRANSACTIONAL_ID or CLUSTER (confluent_kafka ResourceType names)
    name: str
    pattern: str  # LITERAL or PREFIXED
    operation: str  # confluent_kafka AclOperation name: WRITE, READ, CREATE, DESCRIBE_CONFIGS, ...
    why: str

    def __str__(self) -> str:
        return f"{self.resource}:{self.name}{'*' if self.pattern == 'PREFIXED' else ''} {self.operation}"


def connector_acls(
    *,
    mail_topic: str,
    ledger_topic: str = DEFAULT_LEDGER_TOPIC,
    txn_prefix: str = DEFAULT_TXN_PREFIX,
    group_prefix: str = DEFAULT_GROUP_PREFIX,
    create_topics: bool = True,
    tail: bool = False,
    exactly_once: bool = True,
    dead_letter_topic: str | None = None,
    attachments_topic: str | None = None,
    chunked: bool = True,
    group_ownership: bool = False,
) -> list[Acl]:
    """The minimal ACLs for ``poll-once``/``run`` (see docs/kafka-security.md).

    ``create_topics=False``: the topics are created by an administrator beforehand (then set
    ``topics.create: false`` and ``ledger.create: false``). ``tail=True`` adds what
    ``pop3-kafka tail`` needs on top. ``exactly_once=False`` (delivery.mode: at_least_once):
    no ledger, no transactions, so only the mail and dead-letter topics.
    ``dead_letter_topic``: topics.dead_letter (default ``<mail_topic>.dlq``).
    ``attachments_topic``: topics.attachments (default ``<mail_topic>.attachments``), needed
    when a mailbox uses ``attachments.placement: chunked`` (the default; ``chunked=False`` if none).
    ``group_ownership=True`` (runtime.ownership: group, exactly_once only): the replicas join the
    consumer group ``<txn_prefix>-owners`` on the ledger topic to share the shards.
    """
    dlq = dead_letter_topic or f"{mail_topic}.dlq"
    att = attachments_topic or f"{mail_topic}.attachments"
    chunk_acls = (
        [
            Acl("TOPIC", att, "LITERAL", "WRITE", "produce attachment chunk records (with their mail record)"),
        ]
        + ([Acl("TOPIC", att, "LITERAL", "CREATE", "topics.create: true (default)")] if create_topics else [])
        if chunked
        else []
    )
    tail_acls = _tail_acls(mail_topic) + (
        [Acl("TOPIC", att, "LITERAL", "READ", "pop3-kafka tail --attachments only")] if chunked else []
    )
    if not exactly_once:
        acls = [
            Acl("TOPIC", mail_topic, "LITERAL", "WRITE", "produce mail records (idempotent); implies DESCRIBE"),
            Acl("TOPIC", dlq, "LITERAL", "WRITE", "produce dead letters (mail that cannot be decoded)"),
        ]
        if create_topics:
            acls.append(Acl("TOPIC", mail_topic, "LITERAL", "CREATE", "topics.create: true (default)"))
            acls.append(Acl("TOPIC", dlq, "LITERAL", "CREATE", "topics.create: true (default), retention.ms=-1"))
        acls += chunk_acls
        return acls + tail_acls if tail else acls
    acls = [
        Acl("TOPIC", mail_topic, "LITERAL", "WRITE", "produce mail records (transactional); implies DESCRIBE"),
        Acl("TOPIC", dlq, "LITERAL", "WRITE", "produce dead letters in the shard transaction"),
        Acl("TOPIC", ledger_topic, "LITERAL", "WRITE", "produce ledger entries in the same transaction"),
        Acl("TOPIC", ledger_topic, "LITERAL", "READ", "rebuild a shard's ledger at start (read_committed)"),
        Acl("TOPIC", ledger_topic, "LITERAL", "DESCRIBE_CONFIGS", "check that the ledger is compacted"),
        Acl(
            "TRANSACTIONAL_ID",
            f"{txn_prefix}-shard-",
            "PREFIXED",
            "WRITE",
            "init/commit/abort the per-shard transactions; implies DESCRIBE",
        ),
        Acl(
            "GROUP",
            group_prefix,
            "PREFIXED",
            "DESCRIBE",
            "the ledger loader's group.id: FindCoordinator (it assigns partitions, commits nothing)",
        ),
    ]
    if create_topics:
        acls += [
            Acl("TOPIC", mail_topic, "LITERAL", "CREATE", "topics.create: true (default)"),
            Acl("TOPIC", dlq, "LITERAL", "CREATE", "topics.create: true (default), retention.ms=-1"),
            Acl("TOPIC", ledger_topic, "LITERAL", "CREATE", "ledger.create: true (default), compacted"),
        ]
    acls += chunk_acls
    if group_ownership:
        acls.append(
            Acl(
                "GROUP",
                f"{txn_prefix}-owners",
                "LITERAL",
                "READ",
                "runtime.ownership: group: join/sync/heartbeat/leave the owners group; implies DESCRIBE",
            )
        )
    return acls + tail_acls if tail else acls


def _tail_acls(mail_topic: str) -> list[Acl]:
    return [
        Acl("TOPIC", mail_topic, "LITERAL", "READ", "pop3-kafka tail only"),
        Acl("GROUP", TAIL_GROUP, "LITERAL", "DESCRIBE", "pop3-kafka tail only: FindCoordinator (commits nothing)"),
    ]


def acl_bindings(principal: str, acls: Iterable[Acl]) -> list[Any]:
    """confluent_kafka AclBinding objects (ALLOW, any host) for ``principal`` (e.g. "User:pop3kafka")."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    return [
        AclBinding(
            ResourceType[a.resource],
            a.name,
            ResourcePatternType[a.pattern],
            principal,
            "*",
            AclOperation[a.operation],
            AclPermissionType.ALLOW,
        )
        for a in acls
    ]


def grant_acls(
    bootstrap: str, principal: str, acls: Iterable[Acl], *, admin_conf: Mapping[str, Any] | None = None
) -> list[Any]:
    """Create the ACLs with the AdminClient (the admin connection must be allowed to ALTER the cluster)."""
    from confluent_kafka.admin import AdminClient

    bindings = acl_bindings(principal, acls)
    if not bindings:
        return []
    admin = AdminClient({**(admin_conf or {}), "bootstrap.servers": bootstrap})
    for binding, fut in admin.create_acls(bindings, request_timeout=15).items():
        try:
            fut.result(timeout=20)
        except Exception as exc:
            raise RuntimeError(f"cannot create ACL {binding}: {exc}") from exc
    return bindings


def grant_connector_acls(
    bootstrap: str,
    principal: str,
    *,
    mail_topic: str,
    ledger_topic: str = DEFAULT_LEDGER_TOPIC,
    txn_prefix: str = DEFAULT_TXN_PREFIX,
    group_prefix: str = DEFAULT_GROUP_PREFIX,
    create_topics: bool = True,
    tail: bool = False,
    exactly_once: bool = True,
    dead_letter_topic: str | None = None,
    group_ownership: bool = False,
    admin_conf: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Grant ``principal`` exactly :func:`connector_acls`; returns the created AclBindings."""
    acls = connector_acls(
        mail_topic=mail_topic,
        ledger_topic=ledger_topic,
        txn_prefix=txn_prefix,
        group_prefix=group_prefix,
        create_topics=create_topics,
        tail=tail,
        exactly_once=exactly_once,
        dead_letter_topic=dead_letter_topic,
        group_ownership=group_ownership,
    )
    return grant_acls(bootstrap, principal, acls, admin_conf=admin_conf)


_CLI_RESOURCE = {"TOPIC": "--topic", "GROUP": "--group", "TRANSACTIONAL_ID": "--transactional-id"}
_CLI_OPERATION = {"DESCRIBE_CONFIGS": "DescribeConfigs", "IDEMPOTENT_WRITE": "IdempotentWrite"}


def kafka_acls_commands(
    principal: str,
    acls: Iterable[Acl],
    *,
    bootstrap: str = "BROKER:9093",
    command_config: str | None = "admin.properties",
) -> list[str]:
    """The ``kafka-acls.sh --add`` commands equivalent to :func:`grant_acls` (one per resource)."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for a in acls:
        grouped.setdefault((a.resource, a.name, a.pattern), []).append(a.operation)
    out = []
    for (resource, name, pattern), ops in grouped.items():
        cmd = ["kafka-acls.sh", "--bootstrap-server", bootstrap]
        if command_config:
            cmd += ["--command-config", command_config]
        cmd += ["--add", "--allow-principal", principal]
        for op in ops:
            cmd += ["--operation", _CLI_OPERATION.get(op, op.capitalize())]
        if resource == "CLUSTER":
            cmd.append("--cluster")
        else:
            cmd += [_CLI_RESOURCE[resource], name]
        if pattern == "PREFIXED":
            cmd += ["--resource-pattern-type", "prefixed"]
        out.append(shlex.join(cmd))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["grant", "print"])
    ap.add_argument("--principal", required=True, help="e.g. User:pop3kafka")
    ap.add_argument("--mail-topic", required=True)
    ap.add_argument("--ledger-topic", default=DEFAULT_LEDGER_TOPIC)
    ap.add_argument("--dead-letter-topic", help="topics.dead_letter; default: <mail-topic>.dlq")
    ap.add_argument("--txn-prefix", default=DEFAULT_TXN_PREFIX, help="delivery.transactional_id_prefix")
    ap.add_argument("--group-prefix", default=DEFAULT_GROUP_PREFIX)
    ap.add_argument("--no-create", action="store_true", help="topics are pre-created by an administrator")
    ap.add_argument("--tail", action="store_true", help="also allow `pop3-kafka tail`")
    ap.add_argument("--at-least-once", action="store_true", help="delivery.mode: at_least_once (no ledger)")
    ap.add_argument(
        "--group-ownership", action="store_true", help="runtime.ownership: group (replicas share the shards)"
    )
    ap.add_argument("--bootstrap", default="BROKER:9093")
    ap.add_argument("--admin-config", help="grant: librdkafka properties file (key=value) for the admin connection")
    args = ap.parse_args(argv)
    acls = connector_acls(
        mail_topic=args.mail_topic,
        ledger_topic=args.ledger_topic,
        txn_prefix=args.txn_prefix,
        group_prefix=args.group_prefix,
        create_topics=not args.no_create,
        tail=args.tail,
        exactly_once=not args.at_least_once,
        dead_letter_topic=args.dead_letter_topic,
        group_ownership=args.group_ownership,
    )
    if args.action == "print":
        for line in kafka_acls_commands(
            args.principal, acls, bootstrap=args.bootstrap, command_config=args.admin_config or "admin.properties"
        ):
            print(line)
        return 0
    conf: dict[str, str] = {}
    if args.admin_config:
        with open(args.admin_config, encoding="utf-8") as f:
            for raw in f:
                line = raw.strip()
                if line and not line.startswith("#") and "=" in line:
                    k, v = line.split("=", 1)
                    conf[k.strip()] = v.strip()
    for b in grant_acls(args.bootstrap, args.principal, acls, admin_conf=conf):
        print(f"granted {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
