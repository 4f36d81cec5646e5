"""record.framing: schema_registry without a server: the framer, subject naming, schema ids at
start, `schemas register` and doctor, with confluent-kafka's in-process mock registry
(``mock://``). The same against a real registry (Apicurio), Kafka and Dovecot:
tests/integration/test_schema_registry.py.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext
from support.badmail import nested_mail
from support.fakepop import Maildrop
from support.mailgen import make_mail

import connector.records.subjects as subjects_module
from connector.cli.main import main
from connector.config import parse_config
from connector.config.model import Config
from connector.consumer import decode_value
from connector.delivery.kafka import Delivery, Publisher
from connector.delivery.registry import check_registry, register_schemas, resolve_framer
from connector.errors import ConfigError, DeliveryError
from connector.records import encode_single_object, mail_schema
from connector.records.content import ChunkHeader, chunk_schema, encode_chunk
from connector.records.dead_letter import dead_letter_schema
from connector.records.framing import SINGLE_OBJECT, Framer, registry_framer, registry_header
from connector.records.subjects import schema_versions, subject_name, subject_plan
from connector.runtime.cycle import CycleContext, run_cycle

MOCK = {"test.mock.num.brokers": 1}
REPO = Path(__file__).resolve().parents[2]


def config(
    framing: str = "schema_registry",
    registry: dict[str, Any] | None = None,
    *,
    topics: dict[str, Any] | None = None,
    **mailbox: Any,
) -> Config:
    m: dict[str, Any] = {"id": "orders", "host": "pop.test", "username": "u", "password": {"env": "PW"}, **mailbox}
    doc: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "mock:9092", "delivery_timeout_seconds": 5},
        "topics": {"mail": "mail.in", **(topics or {})},
        "delivery": {"mode": "at_least_once"},
        "record": {"framing": framing},
        "mailboxes": [m],
    }
    if registry is not None:
        doc["schema_registry"] = registry
    return parse_config(doc, environ={"PW": "pw", "SR_AUTH": "user:secret", "SR_BAD": "nocolon"})


class Registry:
    """The library's mock client, plus the compatibility calls it leaves to HTTP."""

    def __init__(self) -> None:
        self.client = SchemaRegistryClient.new_client({"url": "mock://unit"})
        self.levels: dict[str | None, str] = {None: "NONE"}
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def lookup_schema(self, subject: str, schema: Any) -> Any:
        self.calls.append(f"lookup {subject}")
        return self.client.lookup_schema(subject, schema)

    def register_schema(self, subject: str, schema: Any) -> int:
        self.calls.append(f"register {subject} {json.loads(schema.schema_str).get('doc', '')[:30]}")
        return int(self.client.register_schema(subject, schema))

    def set_compatibility(self, subject_name: str | None = None, level: str | None = None) -> str:
        self.calls.append(f"compat {subject_name} {level}")
        assert level is not None
        self.levels[subject_name] = level
        return level

    def get_compatibility(self, subject_name: str | None = None) -> str:
        if subject_name not in self.levels:
            raise SchemaRegistryError(404, 40408, f"Subject '{subject_name}' does not have subject-level compatibility")
        return self.levels[subject_name]


REGISTRY = {"url": "mock://unit"}


# ------------------------------------------------------------------------------ config


def test_framing_defaults_to_single_object_and_needs_no_registry() -> None:
    cfg = config("single_object")
    assert cfg.record.framing == "single_object" and cfg.schema_registry is None
    assert resolve_framer(cfg) is SINGLE_OBJECT


def test_registry_framing_without_the_section_names_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"record\.framing: 'schema_registry' needs a schema_registry: section"):
        config("schema_registry")


def test_registry_section_defaults() -> None:
    cfg = config(registry={"url": "http://registry:8080/apis/ccompat/v7/"})
    sr = cfg.schema_registry
    assert sr is not None
    assert (sr.url, sr.subject_naming, sr.auto_register, sr.compatibility, sr.timeout_seconds) == (
        "http://registry:8080/apis/ccompat/v7",
        "topic",
        False,
        "FULL_TRANSITIVE",
        10.0,
    )


@pytest.mark.parametrize(
    ("registry", "message"),
    [
        ({"url": "registry:8081"}, r"schema_registry\.url: 'registry:8081' is not an http\(s\):// URL"),
        ({"url": "http://u:pw@registry:8081"}, r"schema_registry\.url: \(value hidden\).*basic_auth"),
        ({"url": "http://a:8081,http://b:8081"}, "one URL only"),
        ({"url": "http://r", "subject_naming": "topic_name"}, r"use one of: topic, record, topic_record"),
        ({"url": "http://r", "compatibility": "FULL_TRANSITIV"}, r"did you mean 'FULL_TRANSITIVE'"),
        ({"url": "http://r", "basic_auth": {"env": "SR_BAD"}}, r"basic_auth: the secret \(env:SR_BAD\) must be"),
        ({"url": "http://r", "ca_file": "/nonexistent/ca.pem"}, r"schema_registry\.ca_file: .* does not exist"),
        ({"url": "http://r", "auto_registr": True}, r"did you mean 'auto_register'"),
    ],
)
def test_registry_settings_are_checked(registry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        config(registry=registry)
    assert "nocolon" not in str(err.value) and "pw@" not in str(err.value)


def test_basic_auth_is_a_secret() -> None:
    cfg = config(registry={"url": "https://r", "basic_auth": {"env": "SR_AUTH"}})
    assert cfg.schema_registry is not None and cfg.schema_registry.basic_auth is not None
    assert "secret" not in repr(cfg.schema_registry)
    assert cfg.schema_registry.basic_auth.reveal() == "user:secret"


def test_the_section_alone_is_allowed_for_registering_ahead_of_a_switch() -> None:
    cfg = config("single_object", REGISTRY)
    assert cfg.schema_registry is not None and resolve_framer(cfg) is SINGLE_OBJECT


# ------------------------------------------------------------------------------ subjects


def test_subject_naming_strategies() -> None:
    assert subject_name("topic", "mail.in", "io.pop3kafka.MailRecord") == "mail.in-value"
    assert subject_name("record", "mail.in", "io.pop3kafka.MailRecord") == "io.pop3kafka.MailRecord"
    assert subject_name("topic_record", "mail.in", "io.pop3kafka.MailRecord") == "mail.in-io.pop3kafka.MailRecord"


@pytest.mark.parametrize(
    ("naming", "expected"),
    [
        ("topic", ["mail.in-value", "mail.in.dlq-value", "mail.in.attachments-value"]),
        ("record", ["io.pop3kafka.MailRecord", "io.pop3kafka.DeadLetter", "io.pop3kafka.AttachmentChunk"]),
        (
            "topic_record",
            [
                "mail.in-io.pop3kafka.MailRecord",
                "mail.in.dlq-io.pop3kafka.DeadLetter",
                "mail.in.attachments-io.pop3kafka.AttachmentChunk",
            ],
        ),
    ],
)
def test_three_subjects_per_config(naming: str, expected: list[str]) -> None:
    plans = subject_plan(config(registry={**REGISTRY, "subject_naming": naming}))
    assert [p.role for p in plans] == ["mail", "dead_letter", "chunk"]
    assert [p.subject for p in plans] == expected
    # history first, current last
    assert plans[0].versions[0].file == "history/mail_record.v1.avsc"
    assert plans[0].current.file == "mail_record.avsc"
    assert [v.version for v in plans[0].versions] == list(range(1, len(plans[0].versions) + 1))


def test_versions_are_whatever_history_holds_in_numeric_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = json.loads((REPO / "schemas" / "attachment_chunk.avsc").read_text())
    (tmp_path / "history").mkdir()
    for n in (1, 2, 10):
        doc = {**base, "doc": f"version {n}"}
        (tmp_path / "history" / f"attachment_chunk.v{n}.avsc").write_text(json.dumps(doc))
    (tmp_path / "history" / "attachment_chunk.v3.avsc.bak").write_text("{}")  # not a version file
    (tmp_path / "attachment_chunk.avsc").write_text(json.dumps({**base, "doc": "current"}, indent=2))
    monkeypatch.setattr(subjects_module, "_schema_dir", lambda: tmp_path)
    monkeypatch.setattr("connector.records.avro._schema_dir", lambda: tmp_path)
    schema_versions.cache_clear()
    try:
        got = schema_versions("attachment_chunk.avsc")
        assert [(v.version, v.file) for v in got] == [
            (1, "history/attachment_chunk.v1.avsc"),
            (2, "history/attachment_chunk.v2.avsc"),
            (10, "history/attachment_chunk.v10.avsc"),
            (11, "attachment_chunk.avsc"),
        ]
        # The current file copied into history while the next version is written: not twice.
        shutil.copy(tmp_path / "attachment_chunk.avsc", tmp_path / "history" / "attachment_chunk.v11.avsc")
        schema_versions.cache_clear()
        assert [v.version for v in schema_versions("attachment_chunk.avsc")] == [1, 2, 10, 11]
        assert schema_versions("attachment_chunk.avsc")[-1].file == "history/attachment_chunk.v11.avsc"
    finally:
        schema_versions.cache_clear()


# ------------------------------------------------------------------------------ the framer


def test_single_object_framer_is_encode_single_object() -> None:
    rec = chunk_record()
    assert SINGLE_OBJECT.encode(chunk_schema(), rec) == encode_single_object(chunk_schema(), rec)


def test_registry_frame_is_magic_id_and_the_same_body() -> None:
    rec = chunk_record()
    framer = registry_framer([(chunk_schema(), 0x01020304)])
    value = framer.encode(chunk_schema(), rec)
    single = encode_single_object(chunk_schema(), rec)
    assert value[:5] == b"\x00\x01\x02\x03\x04"
    assert value[5:] == single[10:]  # one encoding path: identical Avro bodies
    assert fastavro.schemaless_reader(io.BytesIO(value[5:]), chunk_schema().parsed, None)["data"] == b"abc"


def test_a_schema_without_an_id_is_a_programming_error() -> None:
    framer = registry_framer([(chunk_schema(), 5)])
    with pytest.raises(LookupError, match=r"no schema registry id for io\.pop3kafka\.MailRecord"):
        framer.header(mail_schema())


def test_schema_ids_must_fit_four_bytes() -> None:
    assert registry_header(2**31 - 1) == b"\x00\x7f\xff\xff\xff"
    with pytest.raises(ValueError, match="does not fit"):
        Framer("schema_registry", {b"x" * 8: 2**31})


def chunk_record() -> dict[str, Any]:
    return {
        "record_id": "orders:U1",
        "content_id": "orders:U1/2",
        "index": 0,
        "count": 1,
        "offset": 0,
        "total_size": 3,
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "data": b"abc",
    }


# ------------------------------------------------------------------------------ ids at start


def test_unregistered_subject_stops_the_start_naming_subject_and_command() -> None:
    cfg = config(registry=REGISTRY)
    with pytest.raises(ConfigError) as err:
        resolve_framer(cfg, Registry())
    text = str(err.value)
    assert "subject 'mail.in-value'" in text and "auto_register is false" in text
    assert "pop3-kafka schemas register --config" in text


def test_ids_are_looked_up_once_and_frames_decode_with_both_decoders() -> None:
    reg = Registry()
    cfg = config(registry=REGISTRY)
    register_schemas(cfg, client=reg)
    reg.calls.clear()
    framer = resolve_framer(cfg, reg)
    assert reg.calls == ["lookup mail.in-value", "lookup mail.in.dlq-value", "lookup mail.in.attachments-value"]
    ids = {
        p.role: reg.client.lookup_schema(p.subject, avro_schema(p.current.text)).schema_id for p in subject_plan(cfg)
    }
    assert framer.ids == {
        mail_schema().fingerprint: ids["mail"],
        dead_letter_schema().fingerprint: ids["dead_letter"],
        chunk_schema().fingerprint: ids["chunk"],
    }
    value, _ = encode_chunk(
        ChunkHeader("orders:U1", "orders", "orders:U1/2", 1, 3, chunk_record()["sha256"]), 0, 0, b"abc", framer
    )
    assert value[0] == 0 and struct.unpack(">I", value[1:5])[0] == ids["chunk"]
    ours = decode_value(value, registry=reg.client)
    theirs = AvroDeserializer(reg.client)(value, SerializationContext("mail.in.attachments", MessageField.VALUE))
    assert ours.kind == "chunk" and ours.schema_id == ids["chunk"]
    assert ours.record == theirs == chunk_record()


def avro_schema(text: str) -> Any:
    from confluent_kafka.schema_registry import Schema

    return Schema(text, "AVRO")


def test_auto_register_registers_the_current_schemas_only() -> None:
    reg = Registry()
    framer = resolve_framer(config(registry={**REGISTRY, "auto_register": True}), reg)
    assert framer.framing == "schema_registry" and len(framer.ids) == 3
    assert reg.client.get_subjects() == ["mail.in-value", "mail.in.dlq-value", "mail.in.attachments-value"]
    assert all(reg.client.get_versions(s) == [1] for s in reg.client.get_subjects())


def test_an_unreachable_registry_is_a_delivery_error() -> None:
    cfg = config(registry={"url": "http://127.0.0.1:9", "timeout_seconds": 1})
    with pytest.raises(DeliveryError, match=r"schema registry http://127\.0\.0\.1:9 not reachable"):
        resolve_framer(cfg, SchemaRegistryClient({"url": "http://127.0.0.1:9", "timeout": 1, "max.retries": 0}))


# ------------------------------------------------------------------------------ schemas register


def test_register_sets_compatibility_first_then_history_in_order_and_is_idempotent() -> None:
    reg = Registry()
    cfg = config(registry=REGISTRY)
    lines: list[str] = []
    done = register_schemas(cfg, client=reg, report=lines.append)
    mail_versions = schema_versions("mail_record.avsc")
    calls = [c for c in reg.calls if not c.startswith("lookup")]
    assert calls[0] == "compat mail.in-value FULL_TRANSITIVE"
    assert [c.split(" ", 2)[1] for c in calls[1 : 1 + len(mail_versions)]] == ["mail.in-value"] * len(mail_versions)
    assert all(c.startswith("register") for c in calls[1 : 1 + len(mail_versions)])
    assert calls[1 + len(mail_versions)] == "compat mail.in.dlq-value FULL_TRANSITIVE"
    mail = [r for r in done if r.subject == "mail.in-value"]
    assert [r.file for r in mail] == [v.file for v in mail_versions]
    assert [r.registry_version for r in mail] == list(range(1, len(mail_versions) + 1))
    assert all(r.outcome == "registered" and r.schema_id is not None for r in done)
    assert lines[0] == "mail.in-value: compatibility FULL_TRANSITIVE"
    assert lines[1].startswith("mail.in-value: history/mail_record.v1.avsc (v1): registered (version 1, id ")

    reg.calls.clear()
    again = register_schemas(cfg, client=reg)
    assert all(r.outcome == "already registered" for r in again)
    assert [(r.subject, r.schema_id, r.registry_version) for r in again] == [
        (r.subject, r.schema_id, r.registry_version) for r in done
    ]
    assert not [c for c in reg.calls if c.startswith("register")]


def test_register_dry_run_changes_nothing() -> None:
    reg = Registry()
    lines: list[str] = []
    done = register_schemas(config(registry=REGISTRY), client=reg, dry_run=True, report=lines.append)
    assert all(r.outcome == "would register" and r.schema_id is None for r in done)
    assert not [c for c in reg.calls if not c.startswith("lookup")]
    assert lines[0] == "mail.in-value: compatibility NONE (global default), would set FULL_TRANSITIVE"
    assert reg.client.get_subjects() == []


def test_register_uses_the_configured_level() -> None:
    reg = Registry()
    register_schemas(config(registry={**REGISTRY, "compatibility": "BACKWARD"}), client=reg)
    assert {reg.levels[s] for s in ("mail.in-value", "mail.in.dlq-value", "mail.in.attachments-value")} == {"BACKWARD"}


def test_a_refused_registration_names_subject_and_file() -> None:
    reg = Registry()

    def refuse(subject: str, schema: Any) -> int:
        raise SchemaRegistryError(409, 409, "Incompatible artifact: mail.in-value [AVRO]")

    reg.register_schema = refuse  # type: ignore[method-assign]
    with pytest.raises(
        ConfigError,
        match=r"refused history/mail_record\.v1\.avsc \(version 1\) under subject 'mail\.in-value': Incompatible",
    ):
        register_schemas(config(registry=REGISTRY), client=reg)


def test_schemas_register_needs_the_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "kafka: {bootstrap_servers: 'k:9092'}\ntopics: {mail: m}\n"
        "mailboxes: [{id: a, host: h, username: u, password: {file: pw}}]\n"
    )
    (tmp_path / "pw").write_text("x")
    assert main(["schemas", "register", "--config", str(f)]) == 2
    assert "schemas register` needs a schema_registry: section" in capsys.readouterr().err


def test_schemas_list_prints_every_version_with_its_fingerprint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schemas", "list"]) == 0
    out = capsys.readouterr().out
    assert "io.pop3kafka.MailRecord  v1  fingerprint " in out
    assert mail_schema().fingerprint.hex() in out
    for v in schema_versions("mail_record.avsc"):
        assert v.file in out


# ------------------------------------------------------------------------------ doctor


def test_doctor_reports_registry_subjects_and_levels() -> None:
    reg = Registry()
    cfg = config(registry=REGISTRY)
    before = check_registry(cfg, reg)
    assert before[0].check == "schema_registry.reachable" and before[0].ok
    assert [f.ok for f in before[1:]] == [False, False, False]
    assert all(f.fix and "pop3-kafka schemas register --config" in f.fix for f in before[1:])
    register_schemas(cfg, client=reg)
    after = check_registry(cfg, reg)
    assert all(f.ok and not f.warning for f in after), after
    assert "compatibility FULL_TRANSITIVE" in after[1].detail
    reg.levels["mail.in-value"] = "BACKWARD"
    warned = check_registry(cfg, reg)[1]
    assert warned.ok and warned.warning and "configured FULL_TRANSITIVE" in warned.detail


def test_doctor_without_the_framing_only_warns_about_missing_subjects() -> None:
    findings = check_registry(config("single_object", REGISTRY), Registry())
    assert all(f.ok for f in findings) and all(f.warning for f in findings[1:])


def test_doctor_says_when_the_registry_does_not_answer() -> None:
    cfg = config(registry={"url": "http://127.0.0.1:9", "timeout_seconds": 1})
    client = SchemaRegistryClient({"url": "http://127.0.0.1:9", "timeout": 1, "max.retries": 0})
    [finding] = check_registry(cfg, client)
    assert not finding.ok and "not reachable" in finding.detail and "ccompat" in (finding.fix or "")


# ------------------------------------------------------------------------------ the cycle


class RecordingPublisher(Publisher):
    def __init__(self) -> None:
        super().__init__("mock:9092", MOCK, 5)
        self.sent: list[tuple[str, bytes | None]] = []

    def send(self, topic: str, key: bytes, value: bytes | None, headers: Any, partition: int | None = None) -> Delivery:
        self.sent.append((topic, value))
        return super().send(topic, key, value, headers, partition)


def test_a_cycle_frames_mail_dead_letters_and_chunks_with_the_registry() -> None:
    reg = Registry()
    cfg = config(registry=REGISTRY, attachments={"placement": "chunked", "inline_max_bytes": 1024}, raw_mail="include")
    register_schemas(cfg, client=reg)
    framer = resolve_framer(cfg, reg)
    drop = Maildrop({"ATT": make_mail(3, "attachments")[0], "BAD": nested_mail(1)})
    pub = RecordingPublisher()
    try:
        res = run_cycle(CycleContext(cfg, pub, session_factory=drop.session, framer=framer), cfg.mailboxes[0])
    finally:
        pub.close()
    assert res.ok and res.published == 1 and res.dead_lettered == 1
    kinds: dict[str, set[str]] = {}
    for topic, value in pub.sent:
        assert value is not None and value[:1] == b"\x00", topic
        d = decode_value(value, registry=reg.client)
        kinds.setdefault(topic, set()).add(d.kind)
        assert (
            d.schema_id
            == framer.ids[
                {"mail": mail_schema, "dead_letter": dead_letter_schema, "chunk": chunk_schema}[d.kind]().fingerprint
            ]
        )
    # Chunks of the dead letter's raw mail go to the dead-letter topic, with the chunk schema's id.
    assert kinds == {"mail.in": {"mail"}, "mail.in.attachments": {"chunk"}, "mail.in.dlq": {"dead_letter", "chunk"}}


def test_an_unusable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    cfg = config(registry={"url": "https://registry:8081", "ca_file": str(bad)})
    with pytest.raises(ConfigError, match=r"schema_registry\.ca_file: .* is not a usable PEM bundle"):
        resolve_framer(cfg)
