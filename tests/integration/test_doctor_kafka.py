"""`pop3-kafka doctor`, Kafka half (connector.delivery.doctor.check_kafka), against a secured broker
(SASL_SSL/SCRAM + mTLS + StandardAuthorizer, as in test_kafka_security.py) and the plain session broker.

Each ACL-granting test uses a fresh mTLS principal (a new client certificate) and fresh resource
names, so no grant of one test helps another; the prefixed loader-group ACL would otherwise leak.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
from kafka_acls import grant_acls
from localstack import KafkaNode
from support.securekafka import Names, secure_kafka

from connector.config.model import Config, parse_config
from connector.delivery.admin import DEAD_LETTER_TOPIC_CONFIG, ensure_ledger_topic, ensure_topic
from connector.delivery.doctor import Finding, check_kafka

pytestmark = pytest.mark.integration

SCRAM_USER, SCRAM_NOACL = "pop3kafka", "pop3kafka-noacl"
TLS_NOACL = "pop3kafka-tls-noacl"
ALL_CHECKS = {
    "kafka.broker",
    "kafka.mail_topic",
    "kafka.mail_topic.write",
    "kafka.dead_letter_topic",
    "kafka.dead_letter_topic.write",
    "kafka.dead_letter_topic.retention",
    "kafka.ledger",
    "kafka.ledger.shards",
    "kafka.ledger.compacted",
    "kafka.ledger.write",
    "kafka.ledger.read",
    "kafka.ledger_loader_group",
    "kafka.transactional_id",
    "kafka.attachments_topic",
    "kafka.attachments_topic.write",
    "kafka.attachments_topic.max_message_bytes",
}


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaNode]:
    yield from secure_kafka(tmp_path_factory.mktemp("kafka-doctor"))


def make_config(
    bootstrap: str,
    names: Names,
    client: dict[str, Any] | None = None,
    secrets: dict[str, Any] | None = None,
    **sections: dict[str, Any],
) -> Config:
    doc: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap, "client": client or {}, "client_secrets": secrets or {}},
        "topics": {"mail": names.mail, "partitions": 1},
        "ledger": {"topic": names.ledger},
        "delivery": {"transactional_id_prefix": names.txn_prefix},
        "mailboxes": [{"id": "doc", "host": "127.0.0.1", "username": "u", "password": {"env": "PW_DOC"}}],
    }
    for key, value in sections.items():
        doc[key].update(value)
    return parse_config(doc, environ={"PW_DOC": "x"})


def mtls_principal(kafka: KafkaNode) -> tuple[str, dict[str, str]]:
    cn = f"doctor-{uuid.uuid4().hex[:8]}"
    kafka.issue_client_cert(cn)
    return f"User:{cn}", kafka.mtls_client(cn)


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    out = {f.check: f for f in findings}
    assert len(out) == len(findings), findings
    return out


def failed(findings: list[Finding]) -> set[str]:
    return {f.check for f in findings if not f.ok}


def end_offsets(bootstrap: str, topic: str) -> int:
    """Sum of the high watermarks: every record and transaction marker ever written."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "doctor-test"})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        deadline = time.monotonic() + 15
        while True:
            # a loaded broker can answer the first query before the commit marker is visible
            total = sum(max(0, c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]) for p in parts)
            if total or time.monotonic() > deadline:
                return total
            time.sleep(0.2)
    finally:
        c.close()


def test_documented_acls_all_ok_nothing_written_no_shard_fenced(kafka: KafkaNode) -> None:
    names = Names.fresh()
    names.create_topics(kafka.bootstrap)
    grant_acls(kafka.bootstrap, f"User:{SCRAM_USER}", names.acls())
    client, secrets = kafka.sasl_client(SCRAM_USER)
    config = make_config(kafka.sasl_bootstrap, names, client, secrets)

    # A "running connector": shard 0 holds an open transaction while the doctor runs.
    shard0 = Producer(
        {
            **config.kafka.client_conf(),
            "bootstrap.servers": kafka.sasl_bootstrap,
            "transactional.id": f"{names.txn_prefix}-shard-0",
        }
    )
    shard0.init_transactions(30)
    shard0.begin_transaction()
    shard0.produce(names.mail, key=b"k", value=b"v", partition=0)
    shard0.produce(names.ledger, key=b"doc", value=b"entry", partition=0)
    shard0.flush(10)

    findings = check_kafka(config, timeout=10)
    assert {f.check for f in findings} == ALL_CHECKS
    assert failed(findings) == set(), findings
    got = by_check(findings)
    assert "no records read" in got["kafka.ledger.read"].detail
    assert f"{names.txn_prefix}-shard-doctor" in got["kafka.transactional_id"].detail
    assert kafka.scram_password_file(SCRAM_USER).read_text() not in repr(findings)
    # DescribeConfigs on the dead-letter topic is optional: without it the retention check warns.
    retention = got["kafka.dead_letter_topic.retention"]
    assert retention.warning and "not checked" in retention.detail and "DescribeConfigs" in (retention.fix or "")

    shard0.commit_transaction(30)  # not fenced by the doctor
    # Only the shard's record + its commit marker: the doctor produced nothing, aborted or not.
    assert end_offsets(kafka.bootstrap, names.mail) == 2
    assert end_offsets(kafka.bootstrap, names.ledger) == 2


@pytest.mark.parametrize("auth", ["sasl_scram", "mtls"])
def test_principal_without_acls_gets_each_missing_acl(kafka: KafkaNode, auth: str) -> None:
    names = Names.fresh()
    names.create_topics(kafka.bootstrap)
    if auth == "sasl_scram":
        client, secrets = kafka.sasl_client(SCRAM_NOACL)
        config = make_config(kafka.sasl_bootstrap, names, client, secrets)
    else:
        config = make_config(kafka.ssl_bootstrap, names, kafka.mtls_client(TLS_NOACL))

    got = by_check(check_kafka(config, timeout=5))
    assert set(got) == ALL_CHECKS - {
        "kafka.ledger.shards",
        "kafka.dead_letter_topic.retention",
        "kafka.attachments_topic.max_message_bytes",
    }
    assert failed(list(got.values())) == set(got) - {"kafka.broker"}
    expected = {
        "kafka.mail_topic": f"Topic '{names.mail}' (literal) Write",
        "kafka.mail_topic.write": f"Topic '{names.mail}' (literal) Write",
        "kafka.dead_letter_topic": f"Topic '{names.dead_letter}' (literal) Write",
        "kafka.dead_letter_topic.write": f"Topic '{names.dead_letter}' (literal) Write",
        "kafka.ledger": f"Topic '{names.ledger}' (literal) Read",
        "kafka.ledger.write": f"Topic '{names.ledger}' (literal) Write",
        "kafka.ledger.read": f"Topic '{names.ledger}' (literal) Read",
        "kafka.ledger.compacted": f"Topic '{names.ledger}' (literal) DescribeConfigs",
        "kafka.ledger_loader_group": "Group 'pop3-kafka-ledger-loader-' (prefixed) Describe",
        "kafka.transactional_id": f"TransactionalId '{names.txn_prefix}-shard-' (prefixed) Write",
        "kafka.attachments_topic": f"Topic '{names.mail}.attachments' (literal) Write",
        "kafka.attachments_topic.write": f"Topic '{names.mail}.attachments' (literal) Write",
    }
    for check, acl in expected.items():
        assert "missing ACL: " in got[check].detail and acl in got[check].detail, got[check]
        assert "kafka-acls.sh" in (got[check].fix or ""), got[check]
    if auth == "sasl_scram":
        assert "--allow-principal User:pop3kafka-noacl" in (got["kafka.ledger.read"].fix or "")
        assert kafka.scram_password_file(SCRAM_NOACL).read_text() not in repr(list(got.values()))


# (withheld rule, checks that must fail). Without Write on the mail topic the principal may not
# even Describe it (Create does not imply Describe), so the topic check fails as well.
WITHHELD = [
    (("mail", "WRITE"), {"kafka.mail_topic", "kafka.mail_topic.write"}),
    (("dlq", "WRITE"), {"kafka.dead_letter_topic", "kafka.dead_letter_topic.write"}),
    (("ledger", "WRITE"), {"kafka.ledger.write"}),
    (("ledger", "READ"), {"kafka.ledger.read"}),
    (("ledger", "DESCRIBE_CONFIGS"), {"kafka.ledger.compacted"}),
    (("txn", "WRITE"), {"kafka.transactional_id"}),
    (("group", "DESCRIBE"), {"kafka.ledger_loader_group"}),
    (("attachments", "WRITE"), {"kafka.attachments_topic", "kafka.attachments_topic.write"}),
]


@pytest.mark.parametrize(("rule", "failing"), WITHHELD, ids=[f"{r}-{o}" for (r, o), _ in WITHHELD])
def test_withholding_one_acl_fails_exactly_its_check(
    kafka: KafkaNode, rule: tuple[str, str], failing: set[str]
) -> None:
    names = Names.fresh()
    names.create_topics(kafka.bootstrap)
    resource, operation = rule
    target = {
        "mail": names.mail,
        "dlq": names.dead_letter,
        "ledger": names.ledger,
        "txn": f"{names.txn_prefix}-shard-",
        "group": "pop3-kafka-ledger-loader-",
        "attachments": f"{names.mail}.attachments",
    }[resource]
    full = names.acls(create_topics=False)
    acls = [a for a in full if not (a.name == target and a.operation == operation)]
    assert len(acls) == len(full) - 1
    principal, client = mtls_principal(kafka)
    grant_acls(kafka.bootstrap, principal, acls)

    findings = check_kafka(make_config(kafka.ssl_bootstrap, names, client), timeout=5)
    # A topic the principal may not Describe has no retention to check.
    unseen = {
        "dlq": {"kafka.dead_letter_topic.retention"},
        "attachments": {"kafka.attachments_topic.max_message_bytes"},
    }.get(resource, set())
    assert {f.check for f in findings} == ALL_CHECKS - unseen
    assert failed(findings) == failing, findings
    op = {"DESCRIBE_CONFIGS": "DescribeConfigs"}.get(operation, operation.capitalize())
    for f in findings:
        if not f.ok:
            assert f"'{target}'" in f.detail and op in f.detail, f
            # mTLS: the principal depends on the broker's ssl.principal.mapping.rules, so a placeholder
            assert f.fix is not None and "--allow-principal 'User:<connector principal>'" in f.fix


def test_missing_topics_with_create_rights_are_ok_and_not_created(kafka: KafkaNode) -> None:
    names = Names.fresh()
    principal, client = mtls_principal(kafka)
    grant_acls(kafka.bootstrap, principal, names.acls())
    findings = check_kafka(make_config(kafka.ssl_bootstrap, names, client), timeout=5)
    got = by_check(findings)
    assert failed(findings) == set(), findings
    assert "does not exist yet" in got["kafka.mail_topic"].detail
    assert "does not exist yet" in got["kafka.ledger"].detail
    assert "does not exist yet" in got["kafka.dead_letter_topic"].detail
    assert "retention.ms=-1" in got["kafka.dead_letter_topic"].detail
    assert "kafka.mail_topic.write" not in got  # cannot be checked before the topic exists (said in detail)
    topics = AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10).topics
    assert names.mail not in topics and names.ledger not in topics and names.dead_letter not in topics

    # Without Create (and create: false), a missing topic is a failure naming the fix.
    cfg = make_config(kafka.ssl_bootstrap, names, client, topics={"create": False}, ledger={"create": False})
    got = by_check(check_kafka(cfg, timeout=5))
    assert not got["kafka.mail_topic"].ok and "topics.create" in (got["kafka.mail_topic"].fix or "")
    assert not got["kafka.ledger"].ok and "ledger.create" in (got["kafka.ledger"].fix or "")


def test_wrong_scram_password_names_the_authentication_error(kafka: KafkaNode, tmp_path: Path) -> None:
    names = Names.fresh()
    wrong = f"wrong-{uuid.uuid4().hex}"
    pw = tmp_path / "pw"
    pw.write_text(wrong)
    client, _ = kafka.sasl_client(SCRAM_USER)
    config = make_config(kafka.sasl_bootstrap, names, client, {"sasl.password": {"file": str(pw)}})
    findings = check_kafka(config, timeout=3)
    assert [f.check for f in findings] == ["kafka.broker"]
    assert not findings[0].ok
    assert "authentication" in findings[0].detail.lower(), findings[0]
    assert wrong not in repr(findings)


def test_plaintext_session_broker(services: Any) -> None:
    names = Names.fresh()
    config = make_config(services.bootstrap, names)
    before = check_kafka(config, timeout=10)  # nothing exists yet; create: true
    assert failed(before) == set(), before

    ensure_topic(services.bootstrap, {}, names.mail, create=True, partitions=1, replication_factor=-1)
    ensure_topic(
        services.bootstrap,
        {},
        names.dead_letter,
        create=True,
        partitions=1,
        replication_factor=-1,
        config=DEAD_LETTER_TOPIC_CONFIG,
    )
    ensure_ledger_topic(services.bootstrap, {}, names.ledger, shards=3, create=True, replication_factor=-1)
    ensure_topic(
        services.bootstrap,
        {},
        f"{names.mail}.attachments",
        create=True,
        partitions=1,
        replication_factor=-1,
        config={"max.message.bytes": "200000"},
    )
    findings = check_kafka(config, timeout=10)
    # A chunk record (512 KiB + framing) does not fit 200,000 bytes: the fix says both ways out.
    small = by_check(findings)["kafka.attachments_topic.max_message_bytes"]
    assert not small.ok and "max.message.bytes=200000" in small.detail
    assert "lower topics.chunk_bytes" in (small.fix or "") and "--add-config max.message.bytes=528384" in (
        small.fix or ""
    )
    admin = AdminClient({"bootstrap.servers": services.bootstrap})
    res = ConfigResource(ResourceType.TOPIC, f"{names.mail}.attachments")
    entry = ConfigEntry("max.message.bytes", "1048588", incremental_operation=AlterConfigOpType.SET)
    bigger = ConfigResource(ResourceType.TOPIC, res.name, incremental_configs=[entry])
    next(iter(admin.incremental_alter_configs([bigger]).values())).result(timeout=15)
    findings = check_kafka(config, timeout=10)
    assert {f.check for f in findings} == ALL_CHECKS
    assert failed(findings) == set(), findings
    assert not any(f.warning for f in findings), findings
    assert "3 shards" in by_check(findings)["kafka.ledger.shards"].detail
    assert "retention.ms=-1" in by_check(findings)["kafka.dead_letter_topic.retention"].detail

    wrong = check_kafka(make_config(services.bootstrap, names, ledger={"shards": 5}), timeout=10)
    assert failed(wrong) == {"kafka.ledger.shards"}, wrong
    shards = by_check(wrong)["kafka.ledger.shards"]
    assert "5" in shards.detail and "3 partitions" in shards.detail and "set it to 3" in (shards.fix or "")


def test_dead_letter_topic_with_time_retention_warns_with_the_fix(services: Any) -> None:
    names = Names.fresh()
    ensure_topic(services.bootstrap, {}, names.mail, create=True, partitions=1, replication_factor=-1)
    # created by someone else, with the broker's default retention (7 days)
    ensure_topic(services.bootstrap, {}, names.dead_letter, create=True, partitions=1, replication_factor=-1)
    findings = check_kafka(make_config(services.bootstrap, names), timeout=10)
    assert failed(findings) == set(), findings  # a warning, not a failure
    retention = by_check(findings)["kafka.dead_letter_topic.retention"]
    assert retention.ok and retention.warning
    assert "retention.ms=604800000" in retention.detail and "only copy" in retention.detail
    assert retention.fix is not None and f"--entity-name {names.dead_letter}" in retention.fix
    assert "--alter" in retention.fix and retention.fix.endswith("--add-config retention.ms=-1")


def test_ledger_not_compacted_fails(services: Any) -> None:
    names = Names.fresh()
    names.create_topics(services.bootstrap, policy="delete")
    got = by_check(check_kafka(make_config(services.bootstrap, names), timeout=10))
    assert failed(list(got.values())) == {"kafka.ledger.compacted"}
    assert "cleanup.policy=delete" in got["kafka.ledger.compacted"].detail


def test_doctor_cli_prints_findings_and_exit_code(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    from support.configs import mailbox, write_config

    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("doc", "t9", services.dovecot.pop3s_port, services.cafile)],
        topics={"create": False},
    )
    proc = subprocess.run(
        [sys.executable, "-m", "connector.cli.main", "doctor", "--config", str(cfg), "--kafka-only"],
        env={**os.environ, "PW_DOC": "t9-pw"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "ok   kafka.broker" in proc.stdout and "FAIL kafka.mail_topic" in proc.stdout
    assert "fix: " in proc.stdout and "topics.create" in proc.stdout
