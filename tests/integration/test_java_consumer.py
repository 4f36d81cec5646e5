"""A Java consumer reads what the connector wrote, and agrees with Python on every field.

tests/java/ is a Maven project using only Apache Avro and the Apache Kafka client (Maven
Central; Confluent's serializers are not there). It is built once per session into a temporary
directory (its JUnit tests run then) and started with ``java -cp``. Against the real broker and
Dovecot:

* the connector (``poll-once``, exactly-once) delivers known mails, one of them undecodable, in
  Avro single-object framing, then in the schema registry framing; the Java consumer
  (read_committed) prints one JSON line per record, compared field by field with
  ``connector.consumer.decode_value`` on the same records;
* a Python transactional producer aborts one record and commits another: the Java consumer sees
  the aborted one with read_uncommitted (and with the client's default isolation level), not
  with read_committed, as docs/record.md warns;
* values it cannot decode give an error line each, and it goes on.

Java and Maven missing is a failure, not a skip (``make deps`` installs them). Dovecot user t12
(also used by test_crash_matrix.py and test_metrics_e2e.py: cleared first, drained by poll-once).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import Producer
from localstack import free_port
from support.badmail import nested_mail
from support.cli import run_cli
from support.configs import mailbox, write_config
from support.kafkautil import Consumed, consume_all

from connector.consumer import decode_value, known_schemas
from connector.decoding.mime import decode_mail
from connector.delivery.admin import ensure_topic
from connector.records.avro import (
    HEADER_MAILBOX,
    HEADER_RECORD_ID,
    Provenance,
    build_mail_record,
    encode_single_object,
    mail_schema,
    record_id,
)

# The first test builds tests/java (cold ~/.m2: Maven downloads first), within BUILD_TIMEOUT.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
JAVA_PROJECT = REPO / "tests" / "java"
MAIN_CLASS = "io.github.pop3kafka.consumer.JavaConsumer"
USER = "t12"
BUILD_TIMEOUT = 540  # cold ~/.m2: Maven downloads Avro, kafka-clients, JUnit and its plugins


# ------------------------------------------------------------------------- the Java program


@dataclass(frozen=True)
class JavaRun:
    lines: list[dict[str, Any]]
    summary: dict[str, Any]
    returncode: int
    stderr: str


@dataclass(frozen=True)
class JavaConsumer:
    java: str
    classpath: str
    junit_tests: int

    def run(
        self,
        bootstrap: str,
        topics: list[str],
        *,
        isolation: str = "read_committed",
        registry: str | None = None,
        max_records: int | None = None,
        until_end: bool = True,
        idle_ms: int = 15_000,
        timeout_ms: int = 60_000,
    ) -> JavaRun:
        cmd = [self.java, "-XX:TieredStopAtLevel=1", "-cp", self.classpath, MAIN_CLASS, "--bootstrap", bootstrap]
        for t in topics:
            cmd += ["--topic", t]
        cmd += ["--schemas", str(REPO / "schemas"), "--isolation", isolation]
        cmd += ["--idle-ms", str(idle_ms), "--timeout-ms", str(timeout_ms)]
        if registry is not None:
            cmd += ["--registry", registry]
        if max_records is not None:
            cmd += ["--max-records", str(max_records)]
        if until_end:
            cmd.append("--until-end")
        proc = subprocess.run(
            cmd, capture_output=True, encoding="utf-8", timeout=timeout_ms / 1000 + 30, check=False, cwd=REPO
        )
        summaries = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith('{"summary"')]
        assert summaries, f"no summary line (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
        return JavaRun(lines, summaries[-1], proc.returncode, proc.stderr)

    def list_schemas(self) -> list[dict[str, Any]]:
        proc = subprocess.run(
            [self.java, "-cp", self.classpath, MAIN_CLASS, "--list-schemas", "--schemas", str(REPO / "schemas")],
            capture_output=True,
            encoding="utf-8",
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return [json.loads(x) for x in proc.stdout.splitlines()]


@pytest.fixture(scope="session")
def java_consumer(tmp_path_factory: pytest.TempPathFactory) -> JavaConsumer:
    """tests/java/ built once (``mvn package``: compile, JUnit tests, target/classpath.txt)."""
    java, mvn = shutil.which("java"), shutil.which("mvn")
    if java is None or mvn is None:
        pytest.fail("java and mvn are needed (make deps installs openjdk-17 and maven)")
    build = tmp_path_factory.mktemp("java-consumer-build")
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            mvn,
            "-B",
            "-ntp",
            "-Dstyle.color=never",
            "-f",
            str(JAVA_PROJECT / "pom.xml"),
            "package",
            f"-Dpop3k.build.dir={build}",
        ],
        capture_output=True,
        encoding="utf-8",
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"mvn package of tests/java failed (exit {proc.returncode}):\n{out[-6000:]}")
    runs = re.findall(r"Tests run: (\d+), Failures: (\d+), Errors: (\d+), Skipped: (\d+)\s*$", out, re.M)
    assert runs, out[-3000:]
    total, failures, errors, skipped = (int(x) for x in runs[-1])
    assert total > 0 and failures == errors == skipped == 0, runs[-1]
    print(f"tests/java built in {time.monotonic() - t0:.1f}s; {total} JUnit tests passed")
    deps = (build / "classpath.txt").read_text().strip()
    return JavaConsumer(java, os.pathsep.join([str(build / "classes"), deps]), total)


# ------------------------------------------------------------------------------ mails


def _crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def _head(mid: str, subject: str) -> str:
    return (
        "From: Ann Sender <ann@example.com>\nTo: rcpt@example.com\nDate: Thu, 01 Jan 2026 10:00:00 +0000\n"
        f"Message-ID: <{mid}@java.test>\nMIME-Version: 1.0\nSubject: {subject}\n"
    )


@dataclass(frozen=True)
class Expected:
    message_id: str
    subject: str
    attachments: list[str]


def plain_mail(tag: str) -> tuple[bytes, Expected]:
    subject = f"Plain text for the Java consumer {tag}"
    raw = _head(f"plain-{tag}", subject) + "Content-Type: text/plain; charset=us-ascii\n\nHello from pytest.\n"
    return _crlf(raw), Expected(f"<plain-{tag}@java.test>", subject, [])


def attachment_mail(tag: str) -> tuple[bytes, Expected]:
    """An RFC 2231 filename: continued (``*0*``, ``*1*``), percent-encoded UTF-8."""
    pdf = base64.b64encode(b"%PDF-1.4 not really\n" * 20).decode()
    raw = (
        _head(f"att-{tag}", f"Quarterly report {tag}")
        + 'Content-Type: multipart/mixed; boundary="b1"\n\n'
        + "--b1\nContent-Type: text/plain; charset=utf-8\n\nSee attached.\n"
        + "--b1\nContent-Type: application/pdf\nContent-Disposition: attachment;\n"
        + " filename*0*=UTF-8''Quartalsbericht%20%C3%BCber%20;\n"
        + " filename*1*=Gr%C3%B6%C3%9Fe%20%E2%82%AC.pdf\n"
        + f"Content-Transfer-Encoding: base64\n\n{pdf}\n"
        + '--b1\nContent-Type: text/csv; name="data.csv"\nContent-Disposition: attachment; filename="data.csv"\n\n'
        + "a,b\n1,2\n--b1--\n"
    )
    names = ["Quartalsbericht über Größe €.pdf", "data.csv"]
    return _crlf(raw), Expected(f"<att-{tag}@java.test>", f"Quarterly report {tag}", names)


def encoded_subject_mail(tag: str) -> tuple[bytes, Expected]:
    """An RFC 2047 subject: a UTF-8 B-word, then a Latin-1 Q-word (the space is inside it)."""
    b_word = base64.b64encode(f"Grüße aus Köln ✓ {tag}".encode()).decode()
    subject = f"=?UTF-8?B?{b_word}?=\n =?ISO-8859-1?Q?_Caf=E9_cr=E8me?="
    raw = _head(f"subj-{tag}", subject) + "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    raw += "Grüße.\n"
    return _crlf(raw), Expected(f"<subj-{tag}@java.test>", f"Grüße aus Köln ✓ {tag} Café crème", [])


def seed(services: Any, tag: str) -> dict[str, Expected]:
    """Three good mails and one undecodable one (40 nested multiparts -> a dead letter)."""
    services.dovecot.clear(USER)
    expected = {}
    for make in (plain_mail, attachment_mail, encoded_subject_mail):
        raw, exp = make(tag)
        services.dovecot.put(USER, raw)
        expected[exp.message_id] = exp
    services.dovecot.put(USER, nested_mail(9100))
    return expected


def password_env(mailbox_id: str) -> dict[str, str]:
    """The environment variable support/configs.py's mailbox() reads the password from."""
    return {f"PW_{mailbox_id.upper().replace('-', '_')}": f"{USER}-pw"}


def poll_once(cfg: Path, mailbox_id: str) -> None:
    env = password_env(mailbox_id)
    proc = run_cli("--log-format", "json", "poll-once", "--config", str(cfg), env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{mailbox_id}: ok: 3 published, 1 dead-lettered, 4 deleted of 4 listed" in proc.stdout, proc.stdout


# -------------------------------------------------------------------------- Python's view


class HttpRegistry:
    """What decode_value needs of a registry (``get_schema(id).schema_str``), over plain HTTP:
    the same Confluent-compatible endpoint the Java consumer asks."""

    @dataclass(frozen=True)
    class Registered:
        schema_str: str
        schema_type: str

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def get_schema(self, schema_id: int) -> HttpRegistry.Registered:
        with urllib.request.urlopen(f"{self.url}/schemas/ids/{schema_id}", timeout=10) as resp:  # noqa: S310
            doc = json.load(resp)
        return self.Registered(doc["schema"], doc.get("schemaType") or "AVRO")


def python_lines(bootstrap: str, topics: dict[str, int], registry: HttpRegistry | None = None) -> list[dict[str, Any]]:
    """Each committed record of ``topics`` (name -> how many to wait for), decoded by
    connector.consumer.decode_value, in the shape of the Java consumer's lines."""
    files = {k.schema.fingerprint.hex(): k.file for k in known_schemas()}
    out = []
    for topic, expect in topics.items():
        for c in consume_all(bootstrap, topic, expect=expect, settle=1.0, decode=lambda v: v):
            out.append(python_line(topic, c, files, registry))
    return out


def python_line(topic: str, c: Consumed, files: dict[str, str], registry: HttpRegistry | None) -> dict[str, Any]:
    value: bytes = c.record  # type: ignore[assignment]  # decode=identity: the raw value
    d = decode_value(value, registry=registry)
    r = d.record
    framing = {"single_object": "single_object", "registry": "schema_registry"}[d.framing]
    fp = value[2:10].hex() if framing == "single_object" else None
    line: dict[str, Any] = {
        "topic": topic,
        "partition": c.partition,
        "offset": c.offset,
        "header_record_id": c.headers.get(HEADER_RECORD_ID, b"").decode() or None,
        "header_mailbox_id": c.headers.get(HEADER_MAILBOX, b"").decode() or None,
        "framing": framing,
        "schema_id": d.schema_id,
        "fingerprint": fp,
        "schema": d.schema_name,
        "kind": d.kind,
        "record_id": r["record_id"],
        "mailbox_id": (r.get("provenance") or {}).get("mailbox_id"),
    }
    if fp is not None:
        line["schema_file"] = files[fp]
    if d.kind == "mail":
        line["message_id"] = r["message_id"]
        line["subject"] = r["subject"]
        line["attachments"] = [a["filename"] for a in r["attachments"]]
    elif d.kind == "dead_letter":
        line["stage"], line["reason"] = r["stage"], r["reason"]
    return line


def compare(java: list[dict[str, Any]], python: list[dict[str, Any]]) -> None:
    """Same records (topic, partition, offset), and every field Python has equal in Java's line."""

    def key(line: dict[str, Any]) -> tuple[str, int, int]:
        return (line["topic"], line["partition"], line["offset"])

    assert sorted(map(key, java)) == sorted(map(key, python))
    by_key = {key(j): j for j in java}
    for p in python:
        j = by_key[key(p)]
        diff = {k: (p[k], j.get(k, "<missing>")) for k in p if j.get(k, "<missing>") != p[k]}
        assert not diff, f"{key(p)}: (python, java) differ: {diff}"


def check_delivery(
    java: JavaRun, python: list[dict[str, Any]], expected: dict[str, Expected], mailbox_id: str, framing: str
) -> None:
    assert java.returncode == 0, java.stderr[-3000:]
    assert java.summary["isolation_level"] == "read_committed"
    assert java.summary["errors"] == 0 and java.summary["records"] == 4, java.summary
    assert java.summary["stopped"] == "end", java.summary
    compare(java.lines, python)
    mails = [j for j in java.lines if j["kind"] == "mail"]
    dead = [j for j in java.lines if j["kind"] == "dead_letter"]
    assert len(mails) == 3 and len(dead) == 1
    for j in java.lines:
        assert j["framing"] == framing
        assert j["record_id"] == j["header_record_id"] and j["record_id"].startswith(f"{mailbox_id}:")
        assert j["mailbox_id"] == j["header_mailbox_id"] == mailbox_id
    assert {j["message_id"]: (j["subject"], j["attachments"]) for j in mails} == {
        mid: (e.subject, e.attachments) for mid, e in expected.items()
    }
    assert (dead[0]["stage"], dead[0]["reason"]) == ("limits", "max_depth")


# ---------------------------------------------------------------------------------- tests


def test_java_and_python_know_the_same_schemas(java_consumer: JavaConsumer) -> None:
    """Java's CRC-64-AVRO of each schema file (SchemaNormalization.parsingFingerprint64) is the
    fingerprint Python writes into single-object frames, history included."""
    java = {e["file"]: e["fingerprint"] for e in java_consumer.list_schemas()}
    python = {k.file: k.schema.fingerprint.hex() for k in known_schemas()}
    assert java == python
    assert any(f.startswith("history/") for f in java)
    assert java_consumer.junit_tests > 0


def test_java_reads_single_object_frames_like_python(
    java_consumer: JavaConsumer, services: Any, topic: str, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    expected = seed(services, tag)
    mb = "java-so"
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox(mb, USER, services.dovecot.pop3s_port, services.cafile)],
        delivery={"mode": "exactly_once"},
        record={"framing": "single_object"},
    )
    poll_once(cfg, mb)
    topics = [topic, f"{topic}.dlq"]
    java = java_consumer.run(services.bootstrap, topics)
    python = python_lines(services.bootstrap, {topic: 3, f"{topic}.dlq": 1})
    check_delivery(java, python, expected, mb, "single_object")
    current = {"io.pop3kafka.MailRecord": "mail_record.avsc", "io.pop3kafka.DeadLetter": "dead_letter.avsc"}
    assert all(j["schema_file"] == current[j["schema"]] for j in java.lines)
    assert services.dovecot.count(USER) == 0


def test_java_reads_schema_registry_frames_like_python(
    java_consumer: JavaConsumer, services: Any, topic: str, tmp_path: Path, schema_registry: Any
) -> None:
    """The Confluent wire format, decoded by hand in Java (schema by id from the registry's
    Confluent-compatible API), after `pop3-kafka schemas register`."""
    tag = uuid.uuid4().hex[:6]
    expected = seed(services, tag)
    mb = "java-sr"
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox(mb, USER, services.dovecot.pop3s_port, services.cafile)],
        delivery={"mode": "exactly_once"},
        record={"framing": "schema_registry"},
        schema_registry={"url": schema_registry.url},
    )
    reg = run_cli("schemas", "register", "--config", str(cfg), env=password_env(mb), timeout=120)
    assert reg.returncode == 0, reg.stdout[-2000:] + reg.stderr[-3000:]
    poll_once(cfg, mb)
    topics = [topic, f"{topic}.dlq"]
    java = java_consumer.run(services.bootstrap, topics, registry=schema_registry.url)
    python = python_lines(services.bootstrap, {topic: 3, f"{topic}.dlq": 1}, HttpRegistry(schema_registry.url))
    check_delivery(java, python, expected, mb, "schema_registry")
    assert all(isinstance(j["schema_id"], int) and j["fingerprint"] is None for j in java.lines)
    assert len({j["schema_id"] for j in java.lines}) == 2  # one id for mail records, one for dead letters
    current = {"io.pop3kafka.MailRecord": "mail_record.avsc", "io.pop3kafka.DeadLetter": "dead_letter.avsc"}
    assert all(j["schema_file"] == current[j["schema"]] for j in java.lines), "registered = current schema"
    assert services.dovecot.count(USER) == 0


# --------------------------------------------------------------- aborted transactions


def encoded_mail(mailbox_id: str, uidl: str, subject: str) -> tuple[str, bytes]:
    """A mail record of ours, built and framed by connector.records.avro."""
    raw, _ = plain_mail(uidl)
    raw = raw.replace(f"Plain text for the Java consumer {uidl}".encode(), subject.encode())
    return record_id(mailbox_id, uidl), encode_single_object(mail_schema(), mail_record(mailbox_id, uidl, raw))


def mail_record(mailbox_id: str, uidl: str, raw: bytes) -> dict[str, Any]:
    mail = decode_mail(raw)
    prov = Provenance(
        mailbox_id=mailbox_id,
        uidl=uidl,
        server="127.0.0.1:110",
        fetched_at_millis=int(time.time() * 1000),
        raw_size=len(raw),
        raw_sha256=hashlib.sha256(raw).hexdigest(),
    )
    return build_mail_record(mail, prov)


@pytest.fixture
def transactional_topic(services: Any, topic: str) -> Iterator[tuple[str, str, str]]:
    """``topic`` holding, in this order: a record of an ABORTED transaction, then one of a
    committed transaction. Yields (topic, aborted record id, committed record id)."""
    ensure_topic(services.bootstrap, {}, topic, create=True, partitions=1, replication_factor=1)
    producer = Producer(
        {
            "bootstrap.servers": services.bootstrap,
            "transactional.id": f"java-consumer-test-{uuid.uuid4().hex[:8]}",
            "enable.idempotence": True,
        }
    )
    producer.init_transactions(30)
    ids = []
    for uidl, commit in (("aborted-1", False), ("committed-1", True)):
        rid, value = encoded_mail("java-tx", uidl, f"{uidl} transaction")
        producer.begin_transaction()
        producer.produce(
            topic, value=value, key=b"java-tx", headers=[(HEADER_RECORD_ID, rid.encode()), (HEADER_MAILBOX, b"java-tx")]
        )
        assert producer.flush(30) == 0
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)
        ids.append(rid)
    yield topic, ids[0], ids[1]


def test_read_uncommitted_shows_aborted_records_read_committed_does_not(
    java_consumer: JavaConsumer, services: Any, transactional_topic: tuple[str, str, str]
) -> None:
    topic, aborted, committed = transactional_topic
    runs = {
        level: java_consumer.run(services.bootstrap, [topic], isolation=level)
        for level in ("read_uncommitted", "default", "read_committed")
    }
    for level, run in runs.items():
        assert run.returncode == 0 and run.summary["stopped"] == "end", (level, run.summary, run.stderr[-2000:])
        for j in run.lines:
            assert j["record_id"] == j["header_record_id"] and j["framing"] == "single_object"
            assert j["subject"] == j["record_id"].partition(":")[2] + " transaction"
    seen = {level: [j["record_id"] for j in run.lines] for level, run in runs.items()}
    assert seen["read_uncommitted"] == [aborted, committed], "the aborted copy is visible"
    assert seen["default"] == [aborted, committed], "the Java client's default is read_uncommitted"
    assert seen["read_committed"] == [committed]
    # Python's view (read_committed, support/kafkautil.py) agrees with Java's read_committed one.
    python = python_lines(services.bootstrap, {topic: 1})
    compare(runs["read_committed"].lines, python)


# ------------------------------------------------------------------- old schema versions


def test_java_reads_every_mail_record_version_python_writes(
    java_consumer: JavaConsumer, services: Any, topic: str
) -> None:
    """One single-object frame per version of schemas/ and schemas/history/, written by fastavro
    with that version's fingerprint: Java resolves each into the current schema, as Python does."""
    ensure_topic(services.bootstrap, {}, topic, create=True, partitions=1, replication_factor=1)
    raw, exp = attachment_mail("versions")
    versions = sorted((k for k in known_schemas() if k.name == "io.pop3kafka.MailRecord"), key=lambda k: k.version)
    assert len(versions) >= 3
    producer = Producer({"bootstrap.servers": services.bootstrap})
    for k in versions:
        rec = mail_record("java-v", f"v{k.version}", raw)
        buf = io.BytesIO(k.schema.header)
        buf.seek(0, io.SEEK_END)
        fastavro.schemaless_writer(buf, k.schema.parsed, rec)  # fields the version lacks are left out
        producer.produce(topic, value=buf.getvalue(), headers=[(HEADER_RECORD_ID, rec["record_id"].encode())])
    assert producer.flush(30) == 0
    java = java_consumer.run(services.bootstrap, [topic])
    assert java.returncode == 0 and java.summary["records"] == len(versions), (java.summary, java.stderr[-2000:])
    compare(java.lines, python_lines(services.bootstrap, {topic: len(versions)}))
    assert [j["schema_file"] for j in java.lines] == [k.file for k in versions]
    for j in java.lines:
        assert (j["subject"], j["attachments"]) == (exp.subject, exp.attachments)
        assert j["record_id"] == j["header_record_id"]


# ----------------------------------------------------------------- undecodable values


def test_undecodable_values_give_error_lines_and_the_consumer_goes_on(
    java_consumer: JavaConsumer, services: Any, topic: str
) -> None:
    ensure_topic(services.bootstrap, {}, topic, create=True, partitions=1, replication_factor=1)
    rid, good = encoded_mail("java-bad", "good-1", "after the bad ones")
    unknown_fp = b"\xc3\x01" + bytes(range(1, 9)) + good[10:]
    producer = Producer({"bootstrap.servers": services.bootstrap})
    for value in (unknown_fp, b'{"not": "avro"}', b"\x00\x00\x00\x00\x07" + good[10:], good):
        producer.produce(topic, value=value, headers=[(HEADER_RECORD_ID, rid.encode())])
    assert producer.flush(30) == 0
    run = java_consumer.run(services.bootstrap, [topic], max_records=4, until_end=False)
    assert run.returncode == 1, run.stderr[-2000:]  # some records did not decode
    assert run.summary["records"] == 4 and run.summary["errors"] == 3 and run.summary["stopped"] == "max_records"
    errors = [(j.get("error"), j["offset"]) for j in run.lines]
    assert errors == [("unknown_schema", 0), ("not_ours", 1), ("unknown_schema", 2), (None, 3)]
    assert "0102030405060708" in run.lines[0]["message"]
    assert "no registry was given" in run.lines[2]["message"]
    assert run.lines[3]["record_id"] == rid and run.lines[3]["subject"] == "after the bad ones"


def test_registry_lookup_failures_are_error_lines(java_consumer: JavaConsumer, services: Any, topic: str) -> None:
    """A registry that does not answer, or has no such id: an error line per record, no crash,
    a bounded run (java.net.http timeouts)."""
    ensure_topic(services.bootstrap, {}, topic, create=True, partitions=1, replication_factor=1)
    _, good = encoded_mail("java-reg", "r-1", "registry down")
    producer = Producer({"bootstrap.servers": services.bootstrap})
    for _ in range(3):
        producer.produce(topic, value=b"\x00\x00\x00\x00\x2a" + good[10:])
    assert producer.flush(30) == 0
    closed = f"http://127.0.0.1:{free_port()}/apis/ccompat/v7"  # nothing listens there
    run = java_consumer.run(services.bootstrap, [topic], registry=closed)
    assert run.returncode == 1 and run.summary["errors"] == 3, run.summary
    assert {j["error"] for j in run.lines} == {"registry_unavailable"}
    assert all("schema id 42" in j["message"] for j in run.lines)
