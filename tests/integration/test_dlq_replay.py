"""`pop3-kafka dlq replay` against the real broker: dead letters that decode after a config
change are published exactly once, progress lives in Kafka, and kill -9 at any point of a
replay neither loses nor duplicates a record."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from support.cli import run_cli
from support.configs import write_config
from support.kafkautil import consume_all

from connector.decoding import decode_mail
from connector.delivery.admin import ensure_topic
from connector.errors import DecodeError
from connector.records import Provenance
from connector.records.dead_letter import DeadLetter

pytestmark = pytest.mark.integration

N_GOOD, N_BAD = 12, 6


def nested(depth: int, tag: str) -> bytes:
    """A mail nested ``depth`` multiparts deep, its innermost text carrying ``tag``."""
    head = b"From: a@x.org\r\nSubject: nested\r\nMessage-ID: <%s@x>\r\n" % tag.encode()
    opening = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth))
    closing = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return head + opening + b"Content-Type: text/plain\r\n\r\n" + tag.encode() + closing


#: the first dead letters are written with a timestamp two days old (for --since).
OLD_MS = int((time.time() - 2 * 86400) * 1000)
N_OLD = 6


def seed_dead_letters(bootstrap: str, topic: str) -> dict[str, bytes]:
    """Dead letters as the connector writes them: mail that failed the default max_depth (32);
    the good ones nest 40 deep (fine with max_depth 64), the bad ones 80. Plus one damaged record
    (right fingerprint, truncated), which replay must pass over without being stuck on it."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    raws: dict[str, bytes] = {}
    for i in range(N_GOOD + N_BAD):
        uidl = f"U{i:03d}"
        raw = nested(40 if i < N_GOOD else 80, uidl)
        with pytest.raises(DecodeError) as exc:
            decode_mail(raw)
        prov = Provenance(
            "replay", uidl, "pop.test:995", 1_700_000_000_000 + i, len(raw), hashlib.sha256(raw).hexdigest()
        )
        dl = DeadLetter.of(exc.value, prov, raw, 1_700_000_000_000 + i)
        stamp = {"timestamp": OLD_MS} if i < N_OLD else {}
        p.produce(topic, key=b"replay", value=dl.encode(), headers=dl.headers(), **stamp)
        raws[uidl] = raw
    p.produce(topic, key=b"replay", value=dl.encode()[:40])  # damaged
    assert p.flush(30) == 0
    return raws


def cli(cfg: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("dlq", "replay", "--config", str(cfg), *args, env={"PW_REPLAY": "x", **(env or {})})


@pytest.fixture
def replay_setup(services, topic: str, tmp_path: Path) -> tuple[Path, str, dict[str, bytes]]:  # type: ignore[no-untyped-def]
    dlq = f"{topic}.dlq"
    for t, parts in ((topic, 1), (dlq, 2)):
        ensure_topic(services.bootstrap, {}, t, create=True, partitions=parts, replication_factor=1)
    raws = seed_dead_letters(services.bootstrap, dlq)
    box = {
        "id": "replay",
        "host": "127.0.0.1",
        "port": 1,
        "tls_ca_file": services.cafile,
        "username": "u",
        "password": {"env": "PW_REPLAY"},
        "decode_limits": {"max_depth": 64},
    }
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [box],
        delivery={"transactional_id_prefix": f"replay-{topic}"},
    )
    return cfg, topic, raws


def mail_records(services, topic: str, expect: int) -> list[object]:  # type: ignore[no-untyped-def]
    return consume_all(services.bootstrap, topic, expect=expect, timeout=20 if expect else 4, settle=2)


def test_dry_run_reports_and_writes_nothing(services, replay_setup) -> None:  # type: ignore[no-untyped-def]
    cfg, topic, _ = replay_setup
    proc = cli(cfg, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert (
        f"19 dead letters read, {N_GOOD} would be replayed, {N_BAD} still failing (max_depth: {N_BAD}), "
        "1 unreadable dead letters passed over" in proc.stdout
    ), proc.stdout
    assert mail_records(services, topic, 0) == []
    again = cli(cfg, "--dry-run")  # nothing was recorded as done
    assert f"{N_GOOD} would be replayed" in again.stdout


def test_replay_is_exactly_once_across_kill_9(services, replay_setup) -> None:  # type: ignore[no-untyped-def]
    cfg, topic, raws = replay_setup
    # Killed before the 3rd transaction commits (batches of 2 per partition read): two committed.
    killed = cli(cfg, "--batch", "2", env={"POP3K_FAULT": "dlq_before_commit@3"})
    assert killed.returncode == -9, killed.stderr
    # Killed while the next commit is in flight: either outcome is fine.
    killed = cli(cfg, "--batch", "2", env={"POP3K_FAULT": "dlq_during_commit", "POP3K_FAULT_SEED": "7"})
    assert killed.returncode == -9, killed.stderr
    done = cli(cfg, "--batch", "2")
    assert done.returncode == 0, done.stderr
    got = mail_records(services, topic, N_GOOD)
    ids = [c.record["record_id"] for c in got]  # type: ignore[attr-defined]
    assert sorted(ids) == [f"replay:U{i:03d}" for i in range(N_GOOD)], "each decodable dead letter exactly once"
    for c in got:
        r = c.record  # type: ignore[attr-defined]
        raw = raws[r["provenance"]["uidl"]]
        assert r["provenance"]["raw_sha256"] == hashlib.sha256(raw).hexdigest()
        assert r["message_id"] == f"<{r['provenance']['uidl']}@x>"
        assert c.key == b"replay"  # type: ignore[attr-defined]
        assert c.headers["pop3kafka.replayed_from"].startswith(f"{topic}.dlq/".encode())  # type: ignore[attr-defined]
    # Progress is in Kafka: a new run has nothing left.
    again = cli(cfg)
    assert again.returncode == 0 and "0 dead letters read, 0 replayed" in again.stdout, again.stdout
    assert "unreadable" not in again.stdout  # the damaged record was passed over for good
    assert len(mail_records(services, topic, N_GOOD)) == N_GOOD


def test_since_passes_over_older_dead_letters(services, replay_setup) -> None:  # type: ignore[no-untyped-def]
    cfg, topic, _ = replay_setup
    proc = cli(cfg, "--since", "1d")
    assert proc.returncode == 0, proc.stderr
    assert f"{N_GOOD - N_OLD} replayed" in proc.stdout and f"{N_OLD} before --since passed over" in proc.stdout
    got = mail_records(services, topic, N_GOOD - N_OLD)
    uidls = sorted(c.record["provenance"]["uidl"] for c in got)  # type: ignore[attr-defined]
    assert uidls == [f"U{i:03d}" for i in range(N_OLD, N_GOOD)]
    future = cli(cfg, "--since", "2099-01-01T00:00:00Z")
    assert future.returncode == 2 and "is in the future" in future.stderr


def test_bad_since_is_a_usage_error(services, replay_setup) -> None:  # type: ignore[no-untyped-def]
    cfg, _, _ = replay_setup
    proc = cli(cfg, "--since", "last tuesday")
    assert proc.returncode == 2 and "--since: 'last tuesday' is neither" in proc.stderr
