"""The connector against a production-like secured broker: SASL_SSL/SCRAM-SHA-512 and mTLS,
the StandardAuthorizer, and only the ACLs of deploy/local/kafka_acls.py (docs/kafka-security.md).

The secured broker is this module's own (KafkaNode(secure=True)); Dovecot is the session's, and
the Dovecot user t11 belongs to this module. Records are read back over the broker's PLAINTEXT
listener, whose principal (User:ANONYMOUS) is the broker's only super user; the connector's
principals are not super users and get exactly connector_acls().
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from cryptography.hazmat.primitives import serialization
from kafka_acls import Acl, connector_acls, grant_acls
from localstack import KafkaNode, free_port
from support.cli import run_cli
from support.configs import mailbox, write_config
from support.kafkautil import consume_all
from support.leaks import assert_no_leak
from support.mailgen import make_mail
from support.securekafka import Names, secure_kafka

pytestmark = pytest.mark.integration

USER = "t11"
SCRAM_USER, SCRAM_NOACL = "pop3kafka", "pop3kafka-noacl"
TLS_CN, TLS_NOACL = "pop3kafka-tls", "pop3kafka-tls-noacl"


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaNode]:
    yield from secure_kafka(tmp_path_factory.mktemp("kafka-secure"))


def put_mails(services: Any, n: int, seed: int, start: int = 0) -> set[str]:
    ids = set()
    for i in range(start, start + n):
        raw, exp = make_mail(i, seed=seed)
        services.dovecot.put(USER, raw)
        ids.add(exp.message_id)
    return ids


def config(
    path: Path,
    services: Any,
    bootstrap: str,
    names: Names,
    client: dict[str, Any],
    *,
    secrets: dict[str, Any] | None = None,
    mode: str = "exactly_once",
    delivery_timeout: float = 5,
    runtime: dict[str, Any] | None = None,
    admin: dict[str, Any] | None = None,
) -> Path:
    """A connector config whose Kafka settings come from ``kafka.client`` (+ secrets from files)."""
    return write_config(
        path,
        bootstrap,
        names.mail,
        [mailbox("sec", USER, services.dovecot.pop3s_port, services.cafile)],
        kafka={"client": client, "client_secrets": secrets or {}, "delivery_timeout_seconds": delivery_timeout},
        ledger={"topic": names.ledger},
        delivery={"transactional_id_prefix": names.txn_prefix, "mode": mode},
        runtime=runtime or {},
        admin=admin or {},
    )


def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return run_cli("--log-format", "json", *args, env={"PW_SEC": f"{USER}-pw"}, timeout=timeout)


def topics_on(kafka: KafkaNode) -> set[str]:
    return set(AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10).topics)


def test_sasl_scram_exactly_once_with_only_the_documented_acls(kafka: KafkaNode, services, tmp_path: Path) -> None:
    names = Names.fresh()
    grant_acls(kafka.bootstrap, f"User:{SCRAM_USER}", names.acls())
    client, secrets = kafka.sasl_client(SCRAM_USER)
    password = kafka.scram_password_file(SCRAM_USER).read_text()
    assert secrets == {"sasl.password": {"file": str(kafka.scram_password_file(SCRAM_USER))}}
    cfg = config(tmp_path / "c.yaml", services, kafka.sasl_bootstrap, names, client, secrets=secrets)
    assert password not in cfg.read_text()

    services.dovecot.clear(USER)
    expected = put_mails(services, 4, seed=111)
    first = cli("--log-level", "debug", "poll-once", "--config", str(cfg))
    assert first.returncode == 0, first.stderr
    assert "sec: ok: 4 published, 4 deleted of 4 listed" in first.stdout
    # Second run: the ledger now exists (DescribeConfigs path) and has entries to read back.
    expected |= put_mails(services, 2, seed=111, start=4)
    second = cli("--log-level", "debug", "poll-once", "--config", str(cfg))
    assert second.returncode == 0, second.stderr
    assert "sec: ok: 2 published, 2 deleted of 2 listed" in second.stdout
    assert re.search(r"loaded: [1-9][0-9]* messages", second.stderr), second.stderr  # READ on the ledger

    got = consume_all(kafka.bootstrap, names.mail, expect=6)
    ids = [c.record["record_id"] for c in got]
    assert len(ids) == 6 and len(set(ids)) == 6, ids
    assert {c.record["message_id"] for c in got} == expected
    assert services.dovecot.count(USER) == 0
    for proc in (first, second):
        # (d) the password never shows, not even at debug level
        assert password not in proc.stdout + proc.stderr
        # nothing was refused along the way (e.g. the loader's FindCoordinator needs GROUP DESCRIBE)
        assert "authorization failed" not in proc.stderr.lower(), proc.stderr


def test_mtls_exactly_once_and_tail_with_only_the_documented_acls(kafka: KafkaNode, services, tmp_path: Path) -> None:
    names = Names.fresh()
    grant_acls(kafka.bootstrap, f"User:{TLS_CN}", names.acls(tail=True))
    cfg = config(tmp_path / "c.yaml", services, kafka.ssl_bootstrap, names, kafka.mtls_client(TLS_CN))

    services.dovecot.clear(USER)
    expected = put_mails(services, 3, seed=112)
    proc = cli("poll-once", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "sec: ok: 3 published, 3 deleted of 3 listed" in proc.stdout

    tail = cli("tail", "--config", str(cfg), "--from-beginning", "--max", "3", "--idle-timeout", "10")
    assert tail.returncode == 0, tail.stderr
    assert "consume error" not in tail.stderr, tail.stderr
    assert len(tail.stdout.splitlines()) == 3

    got = consume_all(kafka.bootstrap, names.mail, expect=3)
    assert sorted(c.record["message_id"] for c in got) == sorted(expected)
    assert services.dovecot.count(USER) == 0


@pytest.mark.parametrize("auth", ["sasl_scram", "mtls"])
def test_principal_without_acls_is_refused_and_mail_stays(
    kafka: KafkaNode, services, tmp_path: Path, auth: str
) -> None:
    names = Names.fresh()
    if auth == "sasl_scram":
        client, secrets = kafka.sasl_client(SCRAM_NOACL)
        bootstrap = kafka.sasl_bootstrap
    else:
        client, secrets = kafka.mtls_client(TLS_NOACL), {}
        bootstrap = kafka.ssl_bootstrap
    cfg = config(tmp_path / "c.yaml", services, bootstrap, names, client, secrets=secrets)
    services.dovecot.clear(USER)
    put_mails(services, 3, seed=113)

    proc = cli("poll-once", "--config", str(cfg))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"cannot create topic {names.mail!r}: Authorization failed" in proc.stderr
    assert services.dovecot.count(USER) == 3
    assert names.mail not in topics_on(kafka) and names.ledger not in topics_on(kafka)
    if auth == "sasl_scram":
        assert kafka.scram_password_file(SCRAM_NOACL).read_text() not in proc.stdout + proc.stderr


# Each required ACL, withheld alone, makes the cycle fail with an authorization error and deletes
# nothing. Not here: READ on the ledger (the ledger loader then retries for its 60 s timeout
# before failing; see docs/kafka-security.md) and DESCRIBE on the loader group (optional).
REQUIRED = [
    ("mail", "WRITE", "Topic authorization failed"),
    ("mail", "CREATE", "Authorization failed"),
    ("ledger", "WRITE", "Topic authorization failed"),
    ("ledger", "CREATE", "Authorization failed"),
    ("ledger", "DESCRIBE_CONFIGS", "Topic authorization failed"),
    ("txn", "WRITE", "Transactional Id authorization failed"),
]


@pytest.mark.parametrize("case", REQUIRED, ids=[f"{r}-{o}" for r, o, _ in REQUIRED])
def test_each_documented_acl_is_required(
    kafka: KafkaNode, services, tmp_path: Path, case: tuple[str, str, str]
) -> None:
    resource, operation, error = case
    names = Names.fresh()
    target = {"mail": names.mail, "ledger": names.ledger, "txn": f"{names.txn_prefix}-shard-"}[resource]
    acls = [a for a in names.acls() if not (a.name == target and a.operation == operation)]
    assert len(acls) == len(names.acls()) - 1
    grant_acls(kafka.bootstrap, f"User:{SCRAM_USER}", acls)
    if operation == "DESCRIBE_CONFIGS":  # only checked on an existing ledger: create it first
        admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
        admin.create_topics([NewTopic(names.ledger, 1, 1, config={"cleanup.policy": "compact"})])[names.ledger].result(
            timeout=15
        )
    client, secrets = kafka.sasl_client(SCRAM_USER)
    cfg = config(tmp_path / "c.yaml", services, kafka.sasl_bootstrap, names, client, secrets=secrets)
    services.dovecot.clear(USER)
    put_mails(services, 2, seed=114)

    proc = cli("poll-once", "--config", str(cfg))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert error in proc.stderr, proc.stderr[-2000:]
    assert services.dovecot.count(USER) == 2
    if names.mail in topics_on(kafka):
        assert consume_all(kafka.bootstrap, names.mail, expect=0, timeout=5, settle=0.5) == []


def test_at_least_once_needs_only_the_mail_topic(kafka: KafkaNode, services, tmp_path: Path) -> None:
    """No ledger, no transactional id, and no cluster IdempotentWrite for the idempotent producer."""
    names = Names.fresh()
    acls = names.acls(exactly_once=False)
    assert {(a.resource, a.operation) for a in acls} == {("TOPIC", "WRITE"), ("TOPIC", "CREATE")}
    grant_acls(kafka.bootstrap, f"User:{TLS_CN}", acls)
    client = kafka.mtls_client(TLS_CN)
    cfg = config(tmp_path / "c.yaml", services, kafka.ssl_bootstrap, names, client, mode="at_least_once")
    services.dovecot.clear(USER)
    put_mails(services, 2, seed=115)

    proc = cli("poll-once", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "sec: ok: 2 published, 2 deleted of 2 listed" in proc.stdout
    assert len(consume_all(kafka.bootstrap, names.mail, expect=2)) == 2


def test_wrong_scram_password_fails_without_echoing_it(kafka: KafkaNode, services, tmp_path: Path) -> None:
    names = Names.fresh()
    grant_acls(kafka.bootstrap, f"User:{SCRAM_USER}", names.acls())
    wrong = f"wrong-{uuid.uuid4().hex}"
    pw_file = tmp_path / "wrong.password"
    pw_file.write_text(wrong + "\n")
    pw_file.chmod(0o600)
    client, _ = kafka.sasl_client(SCRAM_USER)
    cfg = config(
        tmp_path / "c.yaml",
        services,
        kafka.sasl_bootstrap,
        names,
        client,
        secrets={"sasl.password": {"file": str(pw_file)}},
        delivery_timeout=2,
    )
    services.dovecot.clear(USER)
    put_mails(services, 1, seed=116)

    proc = cli("poll-once", "--config", str(cfg))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cannot reach Kafka" in proc.stderr
    assert wrong not in proc.stdout + proc.stderr
    assert services.dovecot.count(USER) == 1


@pytest.mark.parametrize("auth", ["sasl_scram", "mtls_encrypted_key"])
def test_librdkafka_debug_all_never_shows_the_password(kafka: KafkaNode, services, tmp_path: Path, auth: str) -> None:
    """kafka.client debug: all (librdkafka's configuration dump and SASL/SSL contexts included,
    routed into our log) on a SCRAM login, and on mTLS with a passphrase-protected client key:
    neither the SCRAM password nor the key's passphrase shows in poll-once or doctor (issue 8;
    tests/integration/test_secrets_never_logged.py covers the other secrets)."""
    names = Names.fresh()
    if auth == "sasl_scram":
        grant_acls(kafka.bootstrap, f"User:{SCRAM_USER}", names.acls())
        client, secrets = kafka.sasl_client(SCRAM_USER)
        secret = kafka.scram_password_file(SCRAM_USER).read_text()
        bootstrap, dumped = kafka.sasl_bootstrap, "sasl.password = "
    else:
        grant_acls(kafka.bootstrap, f"User:{TLS_CN}", names.acls())
        secret = f"key-passphrase-{uuid.uuid4().hex}"
        key = serialization.load_pem_private_key(kafka.client_key_file(TLS_CN).read_bytes(), None)
        encrypted = tmp_path / "client.key"
        encrypted.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(secret.encode()),
            )
        )
        pw_file = tmp_path / "key.password"
        pw_file.write_text(secret + "\n")
        pw_file.chmod(0o600)
        client = {**kafka.mtls_client(TLS_CN), "ssl.key.location": str(encrypted)}
        secrets = {"ssl.key.password": {"file": str(pw_file)}}
        bootstrap, dumped = kafka.ssl_bootstrap, "ssl.key.password = "
    assert len(secret) >= 16
    cfg = config(tmp_path / "c.yaml", services, bootstrap, names, {**client, "debug": "all"}, secrets=secrets)
    services.dovecot.clear(USER)
    put_mails(services, 2, seed=119)

    poll = cli("--log-level", "debug", "poll-once", "--config", str(cfg))
    assert poll.returncode == 0, poll.stdout + poll.stderr[-3000:]
    assert "sec: ok: 2 published, 2 deleted of 2 listed" in poll.stdout
    doctor = cli("--log-level", "debug", "doctor", "--config", str(cfg))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr[-3000:]
    assert "ok   kafka.transactional_id:" in doctor.stdout, doctor.stdout
    for proc in (poll, doctor):
        rdkafka = []
        for line in proc.stderr.splitlines():
            doc = json.loads(line)  # librdkafka's lines too: nothing bypasses the JSON log
            if doc["logger"].startswith("pop3kafka.rdkafka"):
                rdkafka.append(doc["msg"])
        assert len(rdkafka) > 100, "librdkafka debug logging did not reach the log"
        assert any(dumped in m for m in rdkafka), "librdkafka did not dump the configuration with the secret"
        if auth == "sasl_scram":
            assert any("SCRAM-SHA-512" in m and "SASL" in m for m in rdkafka)
        assert_no_leak(secret, proc.stdout, proc.stderr, *rdkafka)


# ------------------------------------------------------------------ runtime.ownership: group


def owners_acl(names: Names) -> Acl:
    return Acl("GROUP", f"{names.txn_prefix}-owners", "LITERAL", "READ", "")


def test_owners_group_acl_only_with_group_ownership() -> None:
    """No broker: the owners group's Read is listed with group_ownership=True, and only then."""
    plain = connector_acls(mail_topic="mail")
    grouped = connector_acls(mail_topic="mail", group_ownership=True)
    owners = [a for a in grouped if a.resource == "GROUP" and a.name == "pop3-kafka-owners"]
    assert [(a.pattern, a.operation) for a in owners] == [("LITERAL", "READ")]
    assert [a for a in grouped if a not in owners] == plain
    assert not [a for a in plain if a.name.endswith("-owners")]
    custom = connector_acls(mail_topic="mail", txn_prefix="acme", group_ownership=True)
    assert [a.name for a in custom if a.resource == "GROUP" and a.operation == "READ"] == ["acme-owners"]


def wait_until(cond, what: str, proc: subprocess.Popen[str], log: Path, timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"run exited {proc.returncode} while waiting for: {what}\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} (not within {timeout:.0f} s)\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def group_config(path: Path, services: Any, kafka: KafkaNode, names: Names) -> Path:
    client, secrets = kafka.sasl_client(SCRAM_USER)
    return config(
        path,
        services,
        kafka.sasl_bootstrap,
        names,
        client,
        secrets=secrets,
        runtime={"ownership": "group", "group_session_timeout_seconds": 6},
        admin={"bind": f"127.0.0.1:{free_port()}"},
    )


def start_run(cfg: Path, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "connector.cli.main", "--log-format", "json", "run", "--config", str(cfg)],
        env={**os.environ, "PW_SEC": f"{USER}-pw"},
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        text=True,
    )


def stop_run(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


def owned(cfg: Path) -> bool | None:
    """Whether the running replica owns the mailbox (admin endpoint); None if it does not answer."""
    got = run_cli("admin", "list", "--config", str(cfg), env={"PW_SEC": f"{USER}-pw"}, timeout=30)
    return bool(json.loads(got.stdout)["mailboxes"][0]["owned"]) if got.returncode == 0 else None


def test_group_ownership_exactly_once_with_only_the_documented_acls(kafka: KafkaNode, services, tmp_path: Path) -> None:
    """`run` with runtime.ownership: group joins <prefix>-owners with only connector_acls(group_ownership=True)."""
    names = Names.fresh()
    acls = names.acls(group_ownership=True)
    assert owners_acl(names) in [Acl(a.resource, a.name, a.pattern, a.operation, "") for a in acls]
    grant_acls(kafka.bootstrap, f"User:{SCRAM_USER}", acls)
    cfg = group_config(tmp_path / "c.yaml", services, kafka, names)
    services.dovecot.clear(USER)
    expected = put_mails(services, 3, seed=117)
    log = tmp_path / "run.log"
    proc = start_run(cfg, log)
    try:
        wait_until(lambda: services.dovecot.count(USER) == 0, "the owner polled the mailbox", proc, log)
        assert owned(cfg) is True
        # Still a member, still polling: more mail after the first rounds.
        expected |= put_mails(services, 2, seed=117, start=3)
        wait_until(lambda: services.dovecot.count(USER) == 0, "the second batch was polled", proc, log, 60)
    finally:
        rc = stop_run(proc)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "shards assigned" in text, text[-3000:]
    assert "authorization failed" not in text.lower(), text[-3000:]
    assert kafka.scram_password_file(SCRAM_USER).read_text() not in text
    got = consume_all(kafka.bootstrap, names.mail, expect=5)
    ids = [c.record["record_id"] for c in got]
    assert len(ids) == 5 and len(set(ids)) == 5, ids
    assert {c.record["message_id"] for c in got} == expected


def test_group_ownership_without_the_owners_group_acl_polls_nothing(kafka: KafkaNode, services, tmp_path: Path) -> None:
    """Without Read on <prefix>-owners the replica never joins: it owns no shard, the mail stays,
    and the log names the group and the ACL to grant."""
    names = Names.fresh()
    full = names.acls(group_ownership=True)
    acls = [a for a in full if not (a.resource == "GROUP" and a.name == f"{names.txn_prefix}-owners")]
    assert len(acls) == len(full) - 1
    grant_acls(kafka.bootstrap, f"User:{SCRAM_USER}", acls)
    cfg = group_config(tmp_path / "c.yaml", services, kafka, names)
    services.dovecot.clear(USER)
    put_mails(services, 2, seed=118)
    log = tmp_path / "run.log"
    proc = start_run(cfg, log)
    hint = f"grant Read on group '{names.txn_prefix}-owners'"
    try:
        wait_until(lambda: hint in log.read_text(), "the missing group ACL was named", proc, log, 60)
        # Well past the first poll it would have made (poll interval 1 s, session timeout 6 s).
        time.sleep(8)
        assert proc.poll() is None
        assert owned(cfg) is False
        assert services.dovecot.count(USER) == 2
    finally:
        rc = stop_run(proc)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "shards assigned" not in text
    error = json.loads(next(line for line in text.splitlines() if hint in line))
    assert error["level"] == "error" and error["logger"] == "pop3kafka.membership", error
    assert "Group authorization failed" in error["msg"], error
    assert kafka.scram_password_file(SCRAM_USER).read_text() not in text
    if names.mail in topics_on(kafka):
        assert consume_all(kafka.bootstrap, names.mail, expect=0, timeout=5, settle=0.5) == []
