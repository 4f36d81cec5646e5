"""Large mail end to end (issue 6): real Dovecot, real Kafka, real S3-compatible server.

* chunked: a mail of about 50 MB with several attachments, exactly-once: the mail record
  references chunk records on the attachments topic that rebuild every attachment
  byte-identical (SHA-256), the mail is deleted, the spool directory is empty;
* offload to S3 (SeaweedFS, deploy/local/objectstore.py) and to a directory: objects named by
  SHA-256, byte-identical;
* kill -9 in the middle of a chunked transaction: a read_committed consumer sees nothing of it;
  the next cycle publishes the mail once with one complete chunk set.
* three mails over the spool threshold in one cycle: received one ahead in a thread of their
  own (connector/runtime/readahead.py), each published once with complete chunk sets.

CI runs these at the sizes below; ``make large-mail`` runs them at 50, 120 and 200 MB
(LARGE_MAIL_MB="50 120 200"), see bench/results/large_mail_e2e.md; memory: bench/results/large_mail.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_cli
from support.configs import mailbox, write_config
from support.kafkautil import Consumed, consume_all

from connector.consumer import ChunkAssembler, fetch_offloaded
from connector.delivery.offload import OffloadSettings, read_uri
from connector.records.avro import decode_single_object
from connector.records.content import chunk_schema

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

MB = 1_000_000
SIZES_MB = [int(x) for x in os.environ.get("LARGE_MAIL_MB", "50").split()]


def big_mail(total_mb: int, seed: int) -> tuple[bytes, dict[str, bytes]]:
    """A mail of about ``total_mb`` MB: a text body, two large base64 attachments, a
    quoted-printable one and a small one (inline). Returns the raw mail (LF line ends, as a
    maildir file holds it) and the attachment bytes by filename."""
    rnd = random.Random(seed)
    budget = total_mb * MB
    files = {
        "scan.pdf": rnd.randbytes(int(budget * 0.55 / 1.37)),
        "drawing.dwg": rnd.randbytes(int(budget * 0.38 / 1.37)),
        "notes.txt": b"".join(
            rnd.choice([b"plain text line with some words\n", b"caf\xc3\xa9 = cr\xc3\xa8me\n"]) for _ in range(20_000)
        ),
        "small.csv": b"a,b,c\n1,2,3\n" * 100,
    }
    parts = [
        b"From: Sender <sender@example.com>\nTo: ops@example.com\nSubject: large "
        + str(total_mb).encode()
        + b" MB\nMessage-ID: <large-"
        + str(seed).encode()
        + b'@example.com>\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="=_b"\n\n'
        b"--=_b\nContent-Type: text/plain; charset=utf-8\n\nPlease find the files attached.\n"
    ]
    for name, data in files.items():
        if name == "notes.txt":
            enc, cte = binascii.b2a_qp(data, istext=False), b"quoted-printable"
        else:
            enc, cte = base64.encodebytes(data), b"base64"
        parts.append(
            b'--=_b\nContent-Type: application/octet-stream\nContent-Disposition: attachment; filename="'
            + name.encode()
            + b'"\nContent-Transfer-Encoding: '
            + cte
            + b"\n\n"
            + enc
            + (b"" if enc.endswith(b"\n") else b"\n")
        )
    parts.append(b"--=_b--\n")
    return b"".join(parts), files


def big_limits() -> dict[str, Any]:
    return {"max_message_bytes": 400 * MB, "max_bytes_per_cycle": 512 * MB, "max_seconds_per_cycle": 60}


def chunks_by_content(bootstrap: str, topic: str, expect: int) -> dict[str, list[Consumed]]:
    s = chunk_schema()
    got = consume_all(
        bootstrap, topic, expect=expect, timeout=120, decode=lambda v: decode_single_object(v, {s.fingerprint: s})
    )
    out: dict[str, list[Consumed]] = {}
    for c in got:
        out.setdefault(c.record["content_id"], []).append(c)
    return out


def rebuild(chunks: list[Consumed]) -> bytes:
    """Chunks in index order (each index once), checked against the SHA-256 they carry."""
    by_index = {c.record["index"]: c.record["data"] for c in chunks}
    assert len(by_index) == len(chunks), "a chunk index was seen twice"
    count = chunks[0].record["count"]
    assert sorted(by_index) == list(range(count))
    whole = b"".join(by_index[i] for i in range(count))
    assert hashlib.sha256(whole).hexdigest() == chunks[0].record["sha256"]
    return whole


def check_attachments(record: dict[str, Any], files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    atts = {a["filename"]: a for a in record["attachments"]}
    assert set(atts) == set(files)
    for name, data in files.items():
        assert atts[name]["size"] == len(data) and atts[name]["sha256"] == hashlib.sha256(data).hexdigest()
    assert atts["small.csv"]["data"] == files["small.csv"] and atts["small.csv"]["ref"] is None
    return atts


@pytest.mark.parametrize("size_mb", SIZES_MB)
def test_chunked_large_mail_exactly_once(services, topic: str, tmp_path: Path, size_mb: int) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t19")
    raw, files = big_mail(size_mb, seed=size_mb)
    services.dovecot.put("t19", raw)
    spool = tmp_path / "spool"
    spool.mkdir()
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("big", "t19", services.dovecot.pop3s_port, services.cafile, **big_limits())],
        runtime={"spool_directory": str(spool)},
        kafka={"delivery_timeout_seconds": 60},
    )
    proc = run_cli("poll-once", "--config", str(cfg), env={"PW_BIG": "t19-pw"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "big: ok: 1 published" in proc.stdout, proc.stdout
    [mail] = consume_all(services.bootstrap, topic, expect=1, timeout=120)
    atts = check_attachments(mail.record, files)
    expected_chunks = sum(a["ref"]["chunks"] for a in atts.values() if a["ref"] is not None)
    chunks = chunks_by_content(services.bootstrap, f"{topic}.attachments", expected_chunks)
    # What a downstream consumer does: connector.consumer reassembles the chunks (here in
    # reverse order) into verified files.
    with ChunkAssembler(tmp_path / "rebuilt") as assembler:
        done = {}
        for group in chunks.values():
            for c in reversed(group):
                got = assembler.add(c.record)
                if got is not None:
                    done[got.content_id] = got
        for name in ("scan.pdf", "drawing.dwg", "notes.txt"):
            ref = atts[name]["ref"]
            assert ref["placement"] == "chunked" and ref["topic"] == f"{topic}.attachments"
            assert done[ref["id"]].sha256 == ref["sha256"] and done[ref["id"]].path.read_bytes() == files[name]
            # Same key as the mail record, so the same partition.
            assert {c.key for c in chunks[ref["id"]]} == {mail.key}
    assert set(chunks) == {atts[n]["ref"]["id"] for n in ("scan.pdf", "drawing.dwg", "notes.txt")}
    assert services.dovecot.count("t19") == 0
    assert list(spool.iterdir()) == []


def test_offload_to_s3_and_to_a_directory(services, topic: str, tmp_path: Path, object_store) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t20")
    raw, files = big_mail(12, seed=7)
    services.dovecot.put("t20", raw)
    bucket = f"mail-{uuid.uuid4().hex[:10]}"
    object_store.client().create_bucket(Bucket=bucket)
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "id").write_text(object_store.access_key)
    (keys / "secret").write_text(object_store.secret_key)
    s3 = {
        "kind": "s3",
        "bucket": bucket,
        "prefix": "pop3-kafka/",
        "endpoint_url": object_store.endpoint_url,
        "region": "us-east-1",
        "access_key_id_file": str(keys / "id"),
        "secret_access_key_file": str(keys / "secret"),
        "part_bytes": 5 * 1024 * 1024,
    }
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox(
                "s3box",
                "t20",
                services.dovecot.pop3s_port,
                services.cafile,
                attachments={"placement": "offload"},
                raw_mail="include",
                **big_limits(),
            )
        ],
        offload=s3,
        delivery={"mode": "at_least_once"},
    )
    proc = run_cli("poll-once", "--config", str(cfg), env={"PW_S3BOX": "t20-pw"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [mail] = consume_all(services.bootstrap, topic, expect=1, timeout=60)
    atts = check_attachments(mail.record, files)
    settings = OffloadSettings(
        kind="s3",
        bucket=bucket,
        prefix="pop3-kafka/",
        endpoint_url=object_store.endpoint_url,
        region="us-east-1",
        access_key_id_file=str(keys / "id"),
        secret_access_key_file=str(keys / "secret"),
    )
    for name in ("scan.pdf", "drawing.dwg", "notes.txt"):
        ref = atts[name]["ref"]
        assert ref["placement"] == "offload"
        assert ref["uri"] == f"s3://{bucket}/pop3-kafka/sha256/{ref['sha256']}"
        assert b"".join(read_uri(ref["uri"], settings)) == files[name]
    # raw_mail: include -> the raw mail (CRLF, as retrieved) offloaded too.
    raw_ref = mail.record["raw_ref"]
    crlf = raw.replace(b"\n", b"\r\n")
    assert raw_ref["id"].endswith("/raw") and raw_ref["sha256"] == hashlib.sha256(crlf).hexdigest()
    assert b"".join(read_uri(raw_ref["uri"], settings)) == crlf
    assert services.dovecot.count("t20") == 0

    # The same mail again, offloaded to a directory this time.
    services.dovecot.put("t20", raw)
    objects = tmp_path / "objects"
    objects.mkdir()
    cfg2 = write_config(
        tmp_path / "c2.yaml",
        services.bootstrap,
        topic + "-fs",
        [
            mailbox(
                "fsbox",
                "t20",
                services.dovecot.pop3s_port,
                services.cafile,
                attachments={"placement": "offload"},
                **big_limits(),
            )
        ],
        offload={"kind": "filesystem", "directory": str(objects)},
    )
    proc = run_cli("poll-once", "--config", str(cfg2), env={"PW_FSBOX": "t20-pw"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [mail2] = consume_all(services.bootstrap, topic + "-fs", expect=1, timeout=60)
    atts2 = check_attachments(mail2.record, files)
    for name in ("scan.pdf", "drawing.dwg", "notes.txt"):
        ref = atts2[name]["ref"]
        path = objects / "sha256" / ref["sha256"]
        assert ref["uri"] == path.as_uri() and path.read_bytes() == files[name]
        assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_kill_in_the_middle_of_a_chunked_transaction(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t19")
    raw, files = big_mail(8, seed=3)
    services.dovecot.put("t19", raw)
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("kill", "t19", services.dovecot.pop3s_port, services.cafile, **big_limits())],
    )
    # 8 MB of attachments are about 15 chunks: die after the 5th is produced.
    killed = run_cli("poll-once", "--config", str(cfg), env={"PW_KILL": "t19-pw", "POP3K_FAULT": "during_chunks@5"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert services.dovecot.count("t19") == 1
    # read_committed: nothing of the killed transaction, neither mail record nor chunks.
    assert consume_all(services.bootstrap, topic, expect=1, timeout=10) == []
    assert chunks_by_content(services.bootstrap, f"{topic}.attachments", 1) == {}
    again = run_cli("poll-once", "--config", str(cfg), env={"PW_KILL": "t19-pw"}, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    [mail] = consume_all(services.bootstrap, topic, expect=1, timeout=60)
    atts = check_attachments(mail.record, files)
    total = sum(a["ref"]["chunks"] for a in atts.values() if a["ref"] is not None)
    chunks = chunks_by_content(services.bootstrap, f"{topic}.attachments", total)
    assert sum(len(v) for v in chunks.values()) == total  # one complete set, nothing from the killed attempt
    for name in ("scan.pdf", "drawing.dwg", "notes.txt"):
        assert rebuild(chunks[atts[name]["ref"]["id"]]) == files[name]
    assert services.dovecot.count("t19") == 0


@pytest.mark.parametrize("size_mb", SIZES_MB)
def test_offloaded_large_mail_to_a_directory(services, topic: str, tmp_path: Path, size_mb: int) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t20")
    raw, files = big_mail(size_mb, seed=100 + size_mb)
    services.dovecot.put("t20", raw)
    objects = tmp_path / "objects"
    objects.mkdir()
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox(
                "off",
                "t20",
                services.dovecot.pop3s_port,
                services.cafile,
                attachments={"placement": "offload"},
                **big_limits(),
            )
        ],
        offload={"kind": "filesystem", "directory": str(objects)},
    )
    proc = run_cli("poll-once", "--config", str(cfg), env={"PW_OFF": "t20-pw"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [mail] = consume_all(services.bootstrap, topic, expect=1, timeout=120)
    atts = check_attachments(mail.record, files)
    for name in ("scan.pdf", "drawing.dwg", "notes.txt"):
        got = fetch_offloaded(atts[name]["ref"], tmp_path / name)  # verifies size and SHA-256
        assert got.sha256 == hashlib.sha256(files[name]).hexdigest()
        assert (tmp_path / name).read_bytes() == files[name]
    assert services.dovecot.count("t20") == 0


def test_large_dead_letter_keeps_its_raw_mail_as_chunks_and_replays(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A 12 MB mail that cannot be decoded (the mailbox wants a body part it lacks) becomes a
    dead letter whose raw mail travels as chunk records on the dead-letter topic; after the
    config is fixed, `dlq replay` (in small batches, so chunks and dead letter fall in different
    transactions) rebuilds it and publishes the mail record with its attachments chunked."""
    from connector.records.dead_letter import decode_dead_letter

    services.dovecot.clear("t19")
    raw, files = big_mail(12, seed=21)
    services.dovecot.put("t19", raw)
    box = mailbox("dlbig", "t19", services.dovecot.pop3s_port, services.cafile, **big_limits())
    strict = {**box, "body_part": {"content_type": "application/x-missing"}}
    cfg = write_config(tmp_path / "c.yaml", services.bootstrap, topic, [strict])
    proc = run_cli("poll-once", "--config", str(cfg), env={"PW_DLBIG": "t19-pw"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dlbig: ok: 0 published, 1 dead-lettered, 1 deleted" in proc.stdout, proc.stdout
    assert services.dovecot.count("t19") == 0

    s = chunk_schema()
    from connector.consumer import decode_value

    everything = consume_all(services.bootstrap, f"{topic}.dlq", expect=30, timeout=60, decode=lambda v: {"v": v})
    [dead] = [decode_dead_letter(c.record["v"]) for c in everything if c.record["v"][2:10] != s.fingerprint]
    chunks = [decode_value(c.record["v"]).record for c in everything if c.record["v"][2:10] == s.fingerprint]
    ref = dead["raw_ref"]
    crlf = raw.replace(b"\n", b"\r\n")
    assert dead["reason"] == "body_part_missing" and dead["raw"] == b""
    assert ref["placement"] == "chunked" and ref["topic"] == f"{topic}.dlq" and ref["size"] == len(crlf)
    assert (
        len(chunks) == ref["chunks"] and b"".join(c["data"] for c in sorted(chunks, key=lambda c: c["index"])) == crlf
    )

    fixed = write_config(tmp_path / "fixed.yaml", services.bootstrap, topic, [box])
    # First a replay killed in its second transaction: the first 5 chunks are behind the
    # group's committed progress, so the next run must read them again from the partition.
    args = ("dlq", "replay", "--config", str(fixed), "--batch", "5")
    killed = run_cli(*args, env={"PW_DLBIG": "t19-pw", "POP3K_FAULT": "dlq_before_commit@2"}, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    replay = run_cli(*args, env={"PW_DLBIG": "t19-pw"}, timeout=600)
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert "1 replayed" in replay.stdout, replay.stdout
    [mail] = consume_all(services.bootstrap, topic, expect=1, timeout=60)  # once, not twice
    atts = check_attachments(mail.record, files)
    total = sum(a["ref"]["chunks"] for a in atts.values() if a["ref"] is not None)
    got = chunks_by_content(services.bootstrap, f"{topic}.attachments", total)
    for name in ("scan.pdf", "drawing.dwg", "notes.txt"):
        assert rebuild(got[atts[name]["ref"]["id"]]) == files[name]
    again = run_cli(*args, env={"PW_DLBIG": "t19-pw"}, timeout=600)
    assert again.returncode == 0 and "0 replayed" in again.stdout, again.stdout


def test_several_large_mails_are_received_one_ahead_and_published_once(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Three mails over the spool threshold (4 MiB): the cycle receives the next one in a
    # thread of its own while it decodes and produces this one (connector/runtime/readahead.py).
    services.dovecot.clear("t19")
    made = [big_mail(6, seed=600 + i) for i in range(3)]
    for raw, _ in made:
        services.dovecot.put("t19", raw)
    spool = tmp_path / "spool"
    spool.mkdir()
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("big3", "t19", services.dovecot.pop3s_port, services.cafile, **big_limits())],
        runtime={"spool_directory": str(spool)},
        kafka={"delivery_timeout_seconds": 60},
    )
    proc = run_cli("--log-level", "debug", "poll-once", "--config", str(cfg), env={"PW_BIG3": "t19-pw"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "big3: ok: 3 published" in proc.stdout, proc.stdout
    assert "receiving one mail ahead in a thread of its own" in proc.stderr
    mails = consume_all(services.bootstrap, topic, expect=3, timeout=120)
    assert len(mails) == 3 and len({m.record["record_id"] for m in mails}) == 3
    by_id = {m.record["message_id"]: m.record for m in mails}
    expected_chunks = 0
    for i, (_, files) in enumerate(made):
        atts = check_attachments(by_id[f"<large-{600 + i}@example.com>"], files)
        expected_chunks += sum(a["ref"]["chunks"] for a in atts.values() if a["ref"] is not None)
    chunks = chunks_by_content(services.bootstrap, f"{topic}.attachments", expected_chunks)
    for group in chunks.values():
        rebuild(group)  # every chunk set complete, each index once, SHA-256 checked
    assert services.dovecot.count("t19") == 0
    assert list(spool.iterdir()) == []
