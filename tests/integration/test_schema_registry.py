"""record.framing: schema_registry and `pop3-kafka schemas register` against a real schema
registry (Apicurio Registry, its Confluent-compatible API; tests/support/registry_fixture.py),
the real broker and the real Dovecot.

Each test has its own topic, hence its own subjects (``<topic>-value`` ...): the registry lives
for the session. Dovecot users registry1 and registry2 belong to this module.
"""

from __future__ import annotations

import hashlib
import json
import struct
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext
from support.badmail import nested_mail
from support.configs import mailbox, write_config
from support.kafkautil import Consumed, consume_all
from support.mailgen import make_mail
from test_end_to_end import cli, server_uidls

from connector.consumer import decode_value
from connector.records.subjects import schema_versions

pytestmark = pytest.mark.integration

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
FILES = {"mail": "mail_record.avsc", "dead_letter": "dead_letter.avsc", "chunk": "attachment_chunk.avsc"}


def subjects(topic: str) -> dict[str, str]:
    return {"mail": f"{topic}-value", "dead_letter": f"{topic}.dlq-value", "chunk": f"{topic}.attachments-value"}


def rest(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    """The registry's REST API directly, as an operator's curl would."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - the test registry's http URL
    req.add_header("Content-Type", "application/vnd.schemaregistry.v1+json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def registry_config(path: Path, services: Any, topic: str, url: str, user: str, **registry: Any) -> Path:
    framing = registry.pop("framing", "schema_registry")
    extra = registry.pop("mailbox", {})
    return write_config(
        path,
        services.bootstrap,
        topic,
        [mailbox("sr", user, services.dovecot.pop3s_port, services.cafile, **extra)],
        record={"framing": framing},
        schema_registry={"url": url, **registry},
    )


def raw_values(bootstrap: str, topic: str, expect: int) -> list[Consumed]:
    return consume_all(bootstrap, topic, expect=expect, decode=lambda v: {"value": v})


# ------------------------------------------------------------------------------ schemas register


def test_register_puts_history_in_order_sets_full_transitive_and_is_idempotent(
    services: Any, schema_registry: Any, topic: str, tmp_path: Path
) -> None:
    cfg = registry_config(
        tmp_path / "c.yaml", services, topic, schema_registry.url, "registry1", framing="single_object"
    )
    dry = cli("schemas", "register", "--config", str(cfg), "--dry-run", env={"PW_SR": "registry1-pw"})
    assert dry.returncode == 0, dry.stderr
    assert "would register" in dry.stdout
    assert rest(f"{schema_registry.url}/subjects/{topic}-value/versions")[0] == 404  # the dry run wrote nothing

    first = cli("schemas", "register", "--config", str(cfg), env={"PW_SR": "registry1-pw"})
    assert first.returncode == 0, first.stderr
    ids: dict[str, list[int]] = {}
    for role, subject in subjects(topic).items():
        status, level = rest(f"{schema_registry.url}/config/{subject}")
        assert (status, level["compatibilityLevel"]) == (200, "FULL_TRANSITIVE")
        versions = schema_versions(FILES[role])
        status, numbers = rest(f"{schema_registry.url}/subjects/{subject}/versions")
        assert (status, numbers) == (200, list(range(1, len(versions) + 1)))
        ids[subject] = []
        for n, v in zip(numbers, versions, strict=True):
            status, got = rest(f"{schema_registry.url}/subjects/{subject}/versions/{n}")
            # In version order: registry version n holds our version n, history first.
            assert json.loads(got["schema"]) == json.loads((SCHEMAS / v.file).read_text()), (subject, n, v.file)
            assert f"{subject}: {v.file} (v{v.version}): registered (version {n}, id {got['id']})" in first.stdout
            ids[subject].append(got["id"])
        assert "compatibility FULL_TRANSITIVE" in first.stdout
    # The compatibility level was set before the first registration of each subject.
    lines = first.stdout.splitlines()
    for subject in subjects(topic).values():
        mine = [x for x in lines if x.startswith(f"{subject}: ")]
        assert mine[0] == f"{subject}: compatibility FULL_TRANSITIVE", mine

    again = cli("schemas", "register", "--config", str(cfg), env={"PW_SR": "registry1-pw"})
    assert again.returncode == 0, again.stderr
    assert ": registered (" not in again.stdout and "0 registered" in again.stdout
    for subject, known in ids.items():
        assert rest(f"{schema_registry.url}/subjects/{subject}/versions")[1] == list(range(1, len(known) + 1))
        for n, sid in enumerate(known, start=1):
            assert f"already registered (version {n}, id {sid})" in again.stdout


def test_the_registry_refuses_an_incompatible_schema(
    services: Any, schema_registry: Any, topic: str, tmp_path: Path
) -> None:
    cfg = registry_config(tmp_path / "c.yaml", services, topic, schema_registry.url, "registry1")
    assert cli("schemas", "register", "--config", str(cfg), env={"PW_SR": "registry1-pw"}).returncode == 0
    client = SchemaRegistryClient({"url": schema_registry.url})
    subject = f"{topic}-value"
    current = (SCHEMAS / "mail_record.avsc").read_text()
    # The current schema passes the server's FULL_TRANSITIVE check against every version.
    assert client.test_compatibility_all_versions(subject, Schema(current, "AVRO")) is True
    broken = json.loads(current)
    broken["fields"].append({"name": "tenant", "type": "string", "doc": "required, no default"})
    bad = Schema(json.dumps(broken), "AVRO")
    assert client.test_compatibility(subject, bad) is False
    with pytest.raises(SchemaRegistryError) as err:
        client.register_schema(subject, bad)
    assert err.value.http_status_code == 409
    assert len(rest(f"{schema_registry.url}/subjects/{subject}/versions")[1]) == len(schema_versions(FILES["mail"]))


# ------------------------------------------------------------------------------ the framing end to end


def test_poll_once_publishes_registry_framed_records_that_both_decoders_read(
    services: Any, schema_registry: Any, topic: str, tmp_path: Path
) -> None:
    services.dovecot.clear("registry2")
    att_raw, att = make_mail(1, "attachments", seed=91)
    plain_raw, plain = make_mail(2, "plain", seed=91)
    bad = nested_mail(9191)
    for raw in (att_raw, plain_raw, bad):
        services.dovecot.put("registry2", raw)
    env = {"PW_SR": "registry2-pw"}
    chunked = {"attachments": {"placement": "chunked", "inline_max_bytes": 1024}}
    cfg = registry_config(tmp_path / "c.yaml", services, topic, schema_registry.url, "registry2", mailbox=chunked)
    assert cli("schemas", "register", "--config", str(cfg), env=env).returncode == 0
    client = SchemaRegistryClient({"url": schema_registry.url})
    # Looked up with the text `schemas register` sent (compact JSON): Apicurio 2.x matches texts,
    # not parsed schemas.
    ids = {
        role: client.lookup_schema(subject, Schema(schema_versions(FILES[role])[-1].text, "AVRO")).schema_id
        for role, subject in subjects(topic).items()
    }

    proc = cli("poll-once", "--config", str(cfg), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "sr: ok: 2 published, 1 dead-lettered, 3 deleted of 3 listed" in proc.stdout
    assert server_uidls(services, "registry2") == []

    deserializer = AvroDeserializer(client)

    def check(consumed: list[Consumed], topic_name: str, *kinds: str) -> dict[str, list[dict[str, Any]]]:
        """Every value: 00 + the id registered for its record type, read alike by our decoder
        and Confluent's AvroDeserializer. The records by kind."""
        out: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        for c in consumed:
            value = c.record["value"]
            assert value[0] == 0, f"{topic_name}: not the registry wire format: {value[:10].hex()}"
            sid = struct.unpack(">I", value[1:5])[0]
            ours = decode_value(value, registry=client)
            theirs = deserializer(value, SerializationContext(topic_name, MessageField.VALUE))
            assert (ours.framing, ours.schema_id) == ("registry", sid) and ours.kind in kinds
            assert sid == ids[ours.kind]
            assert ours.record == theirs
            out[ours.kind].append(ours.record)
        return out

    mails = check(raw_values(services.bootstrap, topic, 2), topic, "mail")["mail"]
    assert {r["message_id"] for r in mails} == {att.message_id, plain.message_id}
    refs = [a["ref"] for r in mails for a in r["attachments"] if a["ref"] is not None]
    assert refs and all(ref["placement"] == "chunked" for ref in refs)
    n_chunks = sum(ref["chunks"] for ref in refs)
    got_chunks = check(
        raw_values(services.bootstrap, f"{topic}.attachments", n_chunks), f"{topic}.attachments", "chunk"
    )
    assert len(got_chunks["chunk"]) == n_chunks
    # The undecodable mail (~4 KB, over inline_max_bytes) is a dead letter with its raw bytes as
    # chunk records on the dead-letter topic: those carry the chunk subject's id.
    dlq = check(raw_values(services.bootstrap, f"{topic}.dlq", 2), f"{topic}.dlq", "dead_letter", "chunk")
    [dead] = dlq["dead_letter"]
    assert (dead["stage"], dead["reason"]) == ("limits", "max_depth")
    assert dead["raw_ref"] is not None and dead["raw_ref"]["sha256"] == hashlib.sha256(bad).hexdigest()
    assert b"".join(c["data"] for c in sorted(dlq["chunk"], key=lambda c: c["index"])) == bad
    # `tail` reads the registry framing through schema_registry: of the same config.
    tail = cli("tail", "--config", str(cfg), "--from-beginning", "--max", "2", "--idle-timeout", "20", env=env)
    assert tail.returncode == 0, tail.stderr
    shown = [json.loads(line) for line in tail.stdout.splitlines()]
    assert {s["record"]["message_id"] for s in shown} == {att.message_id, plain.message_id}
    # The ledger is the connector's state, not a consumer's record: still single-object.
    ledger = raw_values(services.bootstrap, "pop3-kafka.ledger", 1)
    assert ledger and all(c.record["value"] is None or c.record["value"][:2] == b"\xc3\x01" for c in ledger)

    # dlq replay reads the registry-framed dead letter and writes a registry-framed mail record.
    deeper = {**chunked, "decode_limits": {"max_depth": 64}}
    cfg2 = registry_config(tmp_path / "c2.yaml", services, topic, schema_registry.url, "registry2", mailbox=deeper)
    replay = cli("dlq", "replay", "--config", str(cfg2), "--group", f"replay-{topic}", env=env)
    assert replay.returncode == 0, replay.stderr
    assert ", 1 replayed, 0 still failing" in replay.stdout, replay.stdout
    after = check(raw_values(services.bootstrap, topic, 3), topic, "mail")["mail"]
    assert sum(1 for r in after if r["record_id"] == dead["record_id"]) == 1


def test_start_stops_on_an_unregistered_subject_and_auto_register_fixes_it(
    services: Any, schema_registry: Any, topic: str, tmp_path: Path
) -> None:
    services.dovecot.clear("registry1")
    raw, exp = make_mail(3, "plain", seed=92)
    services.dovecot.put("registry1", raw)
    env = {"PW_SR": "registry1-pw"}
    cfg = registry_config(
        tmp_path / "c.yaml", services, topic, schema_registry.url, "registry1", subject_naming="topic_record"
    )
    before = server_uidls(services, "registry1")
    proc = cli("poll-once", "--config", str(cfg), env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"subject '{topic}-io.pop3kafka.MailRecord'" in proc.stderr
    assert f"pop3-kafka schemas register --config {cfg}" in proc.stderr
    assert server_uidls(services, "registry1") == before  # nothing fetched, nothing deleted

    doctor = cli("doctor", "--config", str(cfg), "--kafka-only", env=env)
    assert doctor.returncode == 1
    assert "FAIL schema_registry.subject[mail]" in doctor.stdout and "pop3-kafka schemas register" in doctor.stdout

    auto = registry_config(
        tmp_path / "auto.yaml",
        services,
        topic,
        schema_registry.url,
        "registry1",
        subject_naming="topic_record",
        auto_register=True,
    )
    proc = cli("poll-once", "--config", str(auto), env=env)
    assert proc.returncode == 0, proc.stderr
    # Only the current schemas, and no compatibility level: that is `schemas register`'s job.
    subject = f"{topic}-io.pop3kafka.MailRecord"
    assert rest(f"{schema_registry.url}/subjects/{subject}/versions")[1] == [1]
    [got] = raw_values(services.bootstrap, topic, 1)
    decoded = decode_value(got.record["value"], registry=SchemaRegistryClient({"url": schema_registry.url}))
    assert decoded.record["message_id"] == exp.message_id and decoded.framing == "registry"

    doctor = cli("doctor", "--config", str(auto), "--kafka-only", env=env)
    assert "ok   schema_registry.reachable" in doctor.stdout
    assert "WARN schema_registry.subject[mail]" in doctor.stdout  # the level is the registry's default
