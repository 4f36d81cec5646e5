"""`pop3-kafka tail --attachments DIR` against a real broker.

The records are produced here with a transactional producer, the way the connector writes them
(mail record and chunks with the same key, in one transaction), into fresh topics: a committed
transaction with inline, chunked (chunks on both sides of the mail record, out of order) and
offloaded attachments, an aborted transaction whose chunks contradict the committed ones (only
read_committed keeps them out), and a version 1 record (metadata only).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from localstack import KafkaNode
from support.cli import run_cli
from support.configs import mailbox, write_config

from connector.delivery.offload import FilesystemStore
from connector.records.avro import encode_single_object, load_schema, mail_schema
from connector.records.content import ChunkHeader, chunk_count, encode_chunk

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaNode]:
    node = KafkaNode(tmp_path_factory.mktemp("kafka-tail"))
    node.start()
    try:
        yield node
    finally:
        node.stop()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def create_topics(bootstrap: str, *names: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(n, num_partitions=2, replication_factor=1) for n in names]).values():
        fut.result(30)


def attachment(data: bytes, filename: str, part: str, *, inline: bool = False, ref: Any = None) -> dict[str, Any]:
    return {
        "filename": filename,
        "content_type": "application/octet-stream",
        "disposition": "attachment",
        "content_id": None,
        "size": len(data),
        "sha256": sha(data),
        "part": part,
        "kind": None,
        "message": None,
        "data": data if inline else None,
        "ref": ref,
    }


def mail_record(record_id: str, attachments: list[dict[str, Any]]) -> dict[str, Any]:
    mailbox_id, _, uidl = record_id.partition(":")
    return {
        "record_id": record_id,
        "provenance": {
            "mailbox_id": mailbox_id,
            "uidl": uidl,
            "server": "pop.example.net:995",
            "fetched_at": 1_700_000_000_000,
            "raw_size": 10,
            "raw_sha256": sha(b"0123456789"),
            "connector_version": "test",
        },
        "message_id": f"<{uidl}@example.net>",
        "subject": f"mail {uidl}",
        "date": None,
        "date_raw": None,
        "from": [{"name": "", "address": "sender@example.net"}],
        "to": [],
        "cc": [],
        "headers": [],
        "text_body": "see attachments",
        "html_body": None,
        "attachments": attachments,
        "decode_warnings": [],
    }


def chunks(record_id: str, part: str, data: bytes) -> list[bytes]:
    cid = f"{record_id}/{part}"
    n = chunk_count(len(data), CHUNK)
    h = ChunkHeader(record_id, "mb", cid, n, len(data), sha(data))
    return [encode_chunk(h, i, i * CHUNK, data[i * CHUNK : (i + 1) * CHUNK])[0] for i in range(n)]


def test_tail_writes_inline_chunked_and_offloaded_attachments(kafka: KafkaNode, tmp_path: Path) -> None:
    topic = f"mail-{uuid.uuid4().hex[:10]}"
    att_topic = f"{topic}.chunks"
    create_topics(kafka.bootstrap, topic, att_topic)
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    store = FilesystemStore(store_dir)

    inline = b"inline bytes"
    chunked = bytes(range(256)) * 1000  # 256000 bytes: 4 chunks of 64 KiB
    offloaded = b"offloaded " * 20_000
    stored = store.put(sha(offloaded), len(offloaded), [offloaded])
    rid = "mb:u1"
    chunk_values = chunks(rid, "3", chunked)
    assert len(chunk_values) == 4
    v3 = mail_record(
        rid,
        [
            attachment(inline, "../../inline.txt", "2", inline=True),
            attachment(
                chunked,
                "scan.bin",
                "3",
                ref={
                    "id": f"{rid}/3",
                    "placement": "chunked",
                    "size": len(chunked),
                    "sha256": sha(chunked),
                    "topic": att_topic,
                    "chunks": 4,
                    "chunk_bytes": CHUNK,
                    "uri": None,
                },
            ),
            attachment(
                offloaded,
                "big.pdf",
                "4",
                ref={
                    "id": f"{rid}/4",
                    "placement": "offload",
                    "size": len(offloaded),
                    "sha256": sha(offloaded),
                    "topic": None,
                    "chunks": None,
                    "chunk_bytes": None,
                    "uri": stored.uri,
                },
            ),
        ],
    )
    v3.update(
        {
            "in_reply_to": None,
            "references": [],
            "sender": None,
            "reply_to": [],
            "bcc": [],
            "address_groups": [],
            "parts": [],
            "smime": None,
            "body": None,
            "mime_decoded": True,
            "raw": None,
            "raw_ref": None,
        }
    )
    mail_value = encode_single_object(mail_schema(), v3)
    # A version 1 record: metadata only (written with the history schema).
    v1 = mail_record("mb:u2", [])
    v1_fields = ("filename", "content_type", "disposition", "content_id", "size", "sha256")
    v1["attachments"] = [{k: v for k, v in attachment(b"old", "old.txt", "2").items() if k in v1_fields}]
    old = load_schema("history/mail_record.v1.avsc")
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, old.parsed, v1)
    v1_value = old.header + buf.getvalue()

    producer = Producer({"bootstrap.servers": kafka.bootstrap, "transactional.id": f"tail-test-{uuid.uuid4().hex[:6]}"})
    producer.init_transactions(30)
    # Aborted: chunks of the same content with other bytes; read_uncommitted would reassemble garbage.
    producer.begin_transaction()
    for value in chunks(rid, "3", b"\xff" * len(chunked))[:3]:
        producer.produce(att_topic, value=value, key=b"mb")
    producer.flush(30)
    producer.abort_transaction(30)
    # Committed: chunks before and after the mail record, out of order.
    producer.begin_transaction()
    producer.produce(att_topic, value=chunk_values[2], key=b"mb")
    producer.produce(topic, value=mail_value, key=b"mb")
    for i in (0, 3, 2, 1):  # chunk 2 twice (an at-least-once resend)
        producer.produce(att_topic, value=chunk_values[i], key=b"mb")
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, value=v1_value, key=b"mb")
    producer.commit_transaction(30)

    ca = tmp_path / "ca.pem"  # the config wants one; tail never talks POP3
    ca.write_text("")
    cfg = write_config(
        tmp_path / "c.yaml",
        kafka.bootstrap,
        topic,
        [mailbox("mb", "u", 995, str(ca))],
        topics={"attachments": att_topic},
        offload={"kind": "filesystem", "directory": str(store_dir)},
    )
    out_dir = tmp_path / "out"
    env = {"PW_MB": "x"}
    args = ["tail", "--config", str(cfg), "--from-beginning", "--max", "2", "--idle-timeout", "20"]
    proc = run_cli(*args, "--attachments", str(out_dir), env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    records = [x for x in lines if "record" in x]
    saved = [x for x in lines if "attachments_written" in x]
    assert [(r["kind"], r["schema_version"], r["record"]["record_id"]) for r in records] == [
        ("mail", 4, "mb:u1"),
        ("mail", 1, "mb:u2"),
    ]
    assert [a["placement"] for a in records[0]["attachment_summary"]] == ["inline", "chunked", "offload"]
    assert records[0]["attachment_summary"][1]["sha256"] == sha(chunked)[:12]
    assert records[0]["record"]["attachments"][0]["data"] == f"<{len(inline)} bytes>"
    assert records[1]["attachment_summary"] == [
        {
            "filename": "old.txt",
            "content_type": "application/octet-stream",
            "size": 3,
            "sha256": sha(b"old")[:12],
            "placement": "none",
        }
    ]
    by_id = {s["record_id"]: s for s in saved}
    assert sorted(Path(p).name for p in by_id["mb:u1"]["attachments_written"]) == ["big.pdf", "inline.txt", "scan.bin"]
    assert by_id["mb:u1"]["attachments_unavailable"] == []
    assert (out_dir / "inline.txt").read_bytes() == inline
    assert (out_dir / "scan.bin").read_bytes() == chunked
    assert (out_dir / "big.pdf").read_bytes() == offloaded
    assert not (tmp_path / "inline.txt").exists()
    assert by_id["mb:u2"]["attachments_written"] == []
    assert "metadata only" in by_id["mb:u2"]["attachments_unavailable"][0]["reason"]
    assert "IntegrityError" not in proc.stderr, proc.stderr

    summary = run_cli(*args, "--format", "summary", env=env)
    assert summary.returncode == 0, summary.stderr
    rows = summary.stdout.splitlines()
    assert len(rows) == 2
    assert f"scan.bin [application/octet-stream, {len(chunked)} B, sha256 {sha(chunked)[:12]}, chunked]" in rows[0]
    assert "inline.txt" in rows[0] and ", inline]" in rows[0] and ", offload]" in rows[0]
    assert "old.txt" in rows[1] and ", none]" in rows[1]


def test_tail_waits_for_chunks_that_come_after_the_mail(kafka: KafkaNode, tmp_path: Path) -> None:
    """The mail record is shown first; its chunks arrive later: tail holds the record until the
    content is complete, then writes it (and stops, --max reached, nothing left waiting)."""
    topic = f"mail-{uuid.uuid4().hex[:10]}"
    att_topic = f"{topic}.attachments"  # the default name
    create_topics(kafka.bootstrap, topic, att_topic)
    data = bytes(reversed(range(256))) * 700
    rid = "mb:late"
    values = chunks(rid, "2", data)
    ref = {
        "id": f"{rid}/2",
        "placement": "chunked",
        "size": len(data),
        "sha256": sha(data),
        "topic": att_topic,
        "chunks": len(values),
        "chunk_bytes": CHUNK,
        "uri": None,
    }
    rec = mail_record(rid, [attachment(data, "late.bin", "2", ref=ref)])
    rec.update(
        {
            "in_reply_to": None,
            "references": [],
            "sender": None,
            "reply_to": [],
            "bcc": [],
            "address_groups": [],
            "parts": [],
            "smime": None,
            "body": None,
            "mime_decoded": True,
            "raw": None,
            "raw_ref": None,
        }
    )
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "transactional.id": f"tail-late-{uuid.uuid4().hex[:6]}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, value=encode_single_object(mail_schema(), rec), key=b"mb")
    producer.commit_transaction(30)

    ca = tmp_path / "ca.pem"
    ca.write_text("")
    cfg = write_config(tmp_path / "c.yaml", kafka.bootstrap, topic, [mailbox("mb", "u", 995, str(ca))])
    out_dir = tmp_path / "out"
    argv = [sys.executable, "-m", "connector.cli.main", "tail", "--config", str(cfg), "--from-beginning"]
    argv += ["--max", "1", "--idle-timeout", "60", "--attachments", str(out_dir)]
    proc = subprocess.Popen(
        argv,
        env={**os.environ, "PW_MB": "x"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["record"]["record_id"] == rid and first["attachment_summary"][0]["placement"] == "chunked"
        time.sleep(1.0)
        assert proc.poll() is None, "tail exited before the chunks came"
        assert not out_dir.exists() or list(out_dir.iterdir()) == []
        producer.begin_transaction()
        for i in reversed(range(len(values))):
            producer.produce(att_topic, value=values[i], key=b"mb")
        producer.commit_transaction(30)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    (saved,) = [json.loads(x) for x in rest.splitlines()]
    assert saved["record_id"] == rid and [Path(p).name for p in saved["attachments_written"]] == ["late.bin"]
    assert (out_dir / "late.bin").read_bytes() == data
    assert oct((out_dir / "late.bin").stat().st_mode & 0o777) == "0o600"
