"""Dead letters: mail we cannot decode goes to the dead-letter topic, in both delivery modes.

Scripted maildrops (tests/support/fakepop.py) and librdkafka's mock cluster, as in
test_cycle.py (at-least-once) and test_shard_rounds.py (exactly-once); against the real broker
and Dovecot: tests/integration/test_dead_letters_e2e.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError
from support.badmail import nested_mail
from support.fakepop import Maildrop
from support.mailgen import make_mail

from connector.config import parse_config
from connector.config.model import Config
from connector.delivery.kafka import Delivery, Publisher
from connector.delivery.transactional import ShardProducer
from connector.errors import ConfigError, DeliveryError, MailTooLargeError
from connector.records import Provenance, decode_single_object, mail_schema
from connector.records.dead_letter import DeadLetter, dead_letter_schema, decode_dead_letter
from connector.records.ledger import LedgerEntry, ShardLedger
from connector.runtime.cycle import CycleContext, CycleHooks, run_cycle
from connector.runtime.exactly_once import ShardWorker

MOCK = {"test.mock.num.brokers": 1}
SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
MARKER = "BODY-MARKER-DO-NOT-LOG"


def config(mode: str = "at_least_once", topics: dict[str, Any] | None = None, **mailbox: Any) -> Config:
    m: dict[str, Any] = {"id": "orders", "host": "pop.test", "username": "u", "password": {"env": "PW"}, **mailbox}
    return parse_config(
        {
            "kafka": {"bootstrap_servers": "mock:9092", "delivery_timeout_seconds": 5},
            "topics": {"mail": "mail", **(topics or {})},
            "delivery": {"mode": mode},
            "ledger": {"topic": "ledger", "shards": 1},
            "mailboxes": [m],
        },
        environ={"PW": "pw"},
    )


def drop_with_bad_mail() -> Maildrop:
    """good, bad (40 nested multiparts: MailTooLargeError max_depth), good."""
    return Maildrop({"G0": make_mail(0)[0], "BAD": nested_mail(1), "G2": make_mail(2)[0]})


Sent = tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]


class RecordingPublisher(Publisher):
    """The mock cluster, recording what was sent; deliveries of ``fail`` topics fail."""

    def __init__(self, fail: set[str] | None = None, **conf: Any) -> None:
        super().__init__("mock:9092", {**MOCK, **conf}, 5)
        self.sent: list[Sent] = []
        self.fail = fail or set()

    def send(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,
        headers: Any,
        partition: int | None = None,
    ) -> Delivery:
        self.sent.append((topic, key, value, list(headers)))
        if topic in self.fail:
            d = Delivery(topic)
            d.error = KafkaError(KafkaError._MSG_TIMED_OUT)
            d.done = True
            return d
        return super().send(topic, key, value, headers, partition)


def run(drop: Maildrop, publisher: Publisher, cfg: Config | None = None, hooks: CycleHooks | None = None) -> Any:
    cfg = cfg or config()
    ctx = CycleContext(config=cfg, publisher=publisher, session_factory=drop.session, hooks=hooks or CycleHooks())
    return run_cycle(ctx, cfg.mailboxes[0])


# ---------------------------------------------------------------- the record and its schema


def test_every_field_of_the_schema_is_documented() -> None:
    doc = json.loads((SCHEMAS / "dead_letter.avsc").read_text())
    assert doc["namespace"] + "." + doc["name"] == "io.pop3kafka.DeadLetter"
    assert "Evolution rule: new fields are optional with defaults" in doc["doc"]

    def walk(fields: list[dict[str, Any]]) -> None:
        for f in fields:
            assert f.get("doc"), f["name"]
            t = f["type"]
            if isinstance(t, dict) and t.get("type") == "record":
                walk(t["fields"])

    walk(doc["fields"])
    names = [f["name"] for f in doc["fields"]]
    assert names == [
        "record_id",
        "provenance",
        "stage",
        "reason",
        "error_class",
        "error_message",
        "failed_at",
        "raw",
        "raw_ref",
    ]


def test_provenance_is_the_mail_records_named_type() -> None:
    """Same full name and same fields (Parsing Canonical Form) as MailRecord.provenance, so a
    consumer's Provenance class reads both."""
    from fastavro.schema import to_parsing_canonical_form

    def provenance_of(filename: str) -> str:
        doc = json.loads((SCHEMAS / filename).read_text())
        (field,) = [f for f in doc["fields"] if f["name"] == "provenance"]
        return to_parsing_canonical_form({**field["type"], "namespace": doc["namespace"]})

    assert provenance_of("dead_letter.avsc") == provenance_of("mail_record.avsc")
    assert dead_letter_schema().fingerprint != mail_schema().fingerprint


def sample(raw: bytes = b"Subject: x\r\n\r\nbody\r\n") -> DeadLetter:
    prov = Provenance("orders", "UID1", "pop.test:995", 1767258000123, len(raw), hashlib.sha256(raw).hexdigest())
    exc = MailTooLargeError("MIME nesting deeper than 32 levels", reason="max_depth")
    return DeadLetter.of(exc, prov, raw, 1767258000456)


def test_dead_letter_round_trip_and_headers() -> None:
    raw = b"Subject: x\r\n\r\n\xff\xfe binary \r\n"
    dl = sample(raw)
    value = dl.encode()
    assert value[:2] == b"\xc3\x01" and value[2:10] == dead_letter_schema().fingerprint
    rec = decode_dead_letter(value)
    assert rec["record_id"] == "orders:UID1"
    assert rec["provenance"]["raw_sha256"] == hashlib.sha256(raw).hexdigest()
    assert (rec["stage"], rec["reason"]) == ("limits", "max_depth")
    assert rec["error_class"] == "connector.errors.MailTooLargeError"
    assert rec["error_message"] == "MIME nesting deeper than 32 levels"
    assert int(rec["failed_at"].timestamp() * 1000) == 1767258000456
    assert rec["raw"] == raw
    assert dict(dl.headers()) == {
        "pop3kafka.record_id": b"orders:UID1",
        "pop3kafka.mailbox_id": b"orders",
        "pop3kafka.errors.stage": b"limits",
        "pop3kafka.errors.reason": b"max_depth",
        "pop3kafka.errors.exception.class.name": b"connector.errors.MailTooLargeError",
        "pop3kafka.errors.exception.message": b"MIME nesting deeper than 32 levels",
    }
    # a mail-record reader recognises it is not a mail record by its fingerprint
    with pytest.raises(ValueError, match="unknown schema fingerprint"):
        decode_single_object(value)


# ---------------------------------------------------------------- configuration


def test_dead_letter_topic_defaults_to_mail_dot_dlq_and_policy_to_dead_letter() -> None:
    cfg = config()
    assert cfg.topics.dead_letter == "mail.dlq"
    assert cfg.mailboxes[0].on_undecodable == "dead_letter"
    assert config(topics={"dead_letter": "mail.bad"}).topics.dead_letter == "mail.bad"
    assert config(on_undecodable="leave").mailboxes[0].on_undecodable == "leave"


@pytest.mark.parametrize(
    ("topics", "mailbox", "message"),
    [
        ({"dead_letter": "bad topic!"}, {}, "topics.dead_letter: 'bad topic!' is not a valid Kafka topic name"),
        ({"dead_letter": "mail"}, {}, "topics.dead_letter: 'mail' is also topics.mail"),
        ({"dead_letter": "ledger"}, {}, "topics.dead_letter: 'ledger' is also ledger.topic"),
        ({"mail": "m" * 248}, {}, "topics.dead_letter: the default"),
        ({}, {"on_undecodable": "drop"}, "mailboxes[0].on_undecodable: 'drop' is not allowed"),
    ],
)
def test_dead_letter_settings_are_validated(topics: dict[str, Any], mailbox: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config("exactly_once", topics=topics, **mailbox)
    assert message in str(info.value)


# ---------------------------------------------------------------- at-least-once


def test_undecodable_mail_is_dead_lettered_then_deleted() -> None:
    drop = drop_with_bad_mail()
    raw = drop.mails["BAD"]
    orig = dict(drop.mails)
    pub = RecordingPublisher()
    seen: list[str] = []
    res = run(drop, pub, hooks=CycleHooks(on_dead_lettered=seen.append))
    assert res.ok, res.error
    assert (res.published, res.dead_lettered, res.deleted, res.undecodable) == (2, 1, 3, 0)
    assert res.dead_letter_reasons == {"max_depth": 1}  # the metric's reason label
    assert res.fetched_bytes == sum(len(m) for m in (raw, *(v for k, v in orig.items() if k != "BAD")))
    assert drop.mails == {} and drop.log[-1] == "QUIT" and seen == ["BAD"]
    # the DELE of the dead-lettered mail comes after its delivery report, like any other
    assert drop.log.index("DELE 2") > drop.log.index("RETR 3")
    assert [t for t, *_ in pub.sent] == ["mail", "mail.dlq", "mail"]
    _, key, value, headers = pub.sent[1]
    assert key == b"orders"  # record.key: mailbox, like the mail record
    assert value is not None
    rec = decode_dead_letter(value)
    assert rec["record_id"] == "orders:BAD" and rec["raw"] == raw
    assert rec["provenance"]["raw_size"] == len(raw)
    assert rec["provenance"]["raw_sha256"] == hashlib.sha256(raw).hexdigest()
    assert rec["provenance"]["server"] == "pop.test:995" and rec["provenance"]["uidl"] == "BAD"
    assert (rec["stage"], rec["reason"]) == ("limits", "max_depth")
    h = dict(headers)
    assert h["pop3kafka.record_id"] == b"orders:BAD" and h["pop3kafka.mailbox_id"] == b"orders"
    assert h["pop3kafka.errors.stage"] == b"limits" and h["pop3kafka.errors.reason"] == b"max_depth"
    assert h["pop3kafka.errors.exception.class.name"] == b"connector.errors.MailTooLargeError"
    assert h["pop3kafka.errors.exception.message"] == rec["error_message"].encode()


def test_dead_letter_key_follows_record_key_setting() -> None:
    drop = Maildrop({"BAD": nested_mail(1)})
    pub = RecordingPublisher()
    cfg = parse_config(
        {
            "kafka": {"bootstrap_servers": "mock:9092"},
            "topics": {"mail": "mail", "dead_letter": "undecodable"},
            "record": {"key": "record_id"},
            "delivery": {"mode": "at_least_once"},
            "mailboxes": [{"id": "orders", "host": "pop.test", "username": "u", "password": {"env": "PW"}}],
        },
        environ={"PW": "pw"},
    )
    assert run(drop, pub, cfg).dead_lettered == 1
    assert [(t, k) for t, k, _, _ in pub.sent] == [("undecodable", b"orders:BAD")]


def test_leave_policy_leaves_the_mail_and_counts_it() -> None:
    drop = drop_with_bad_mail()
    pub = RecordingPublisher()
    res = run(drop, pub, config(on_undecodable="leave"))
    assert res.ok and (res.published, res.dead_lettered, res.deleted, res.undecodable) == (2, 0, 2, 1)
    assert list(drop.mails) == ["BAD"]
    assert [t for t, *_ in pub.sent] == ["mail", "mail"]


def test_failed_dead_letter_delivery_deletes_nothing_of_that_mail() -> None:
    only_bad = Maildrop({"BAD": nested_mail(1)})
    res = run(only_bad, RecordingPublisher(fail={"mail.dlq"}))
    assert isinstance(res.error, DeliveryError) and res.error.step == "produce"
    assert res.dead_lettered == 0 and res.deleted == 0
    assert list(only_bad.mails) == ["BAD"] and not any(c.startswith("DELE") for c in only_bad.log)

    # With other mail: what Kafka confirmed is deleted (the at-least-once rule), the bad mail stays.
    drop = drop_with_bad_mail()
    res = run(drop, RecordingPublisher(fail={"mail.dlq"}))
    assert isinstance(res.error, DeliveryError)
    assert (res.published, res.dead_lettered, res.deleted) == (2, 0, 2) and list(drop.mails) == ["BAD"]


def test_dead_letter_too_large_for_kafka_is_left_and_counted() -> None:
    big_bad = nested_mail(1) + b"X" * 30_000 + b"\r\n"
    drop = Maildrop({"G0": make_mail(0)[0], "BAD": big_bad})
    res = run(drop, RecordingPublisher(**{"message.max.bytes": 20_000}))
    assert res.ok and (res.published, res.dead_lettered, res.too_large, res.deleted) == (1, 0, 1, 1)
    assert list(drop.mails) == ["BAD"]


def test_one_error_line_per_dead_letter_without_the_body(caplog: pytest.LogCaptureFixture) -> None:
    drop = drop_with_bad_mail()
    with caplog.at_level(logging.DEBUG, logger="pop3kafka"):
        assert run(drop, RecordingPublisher()).dead_lettered == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    (line,) = errors
    text = line.getMessage()
    assert line.__dict__["mailbox"] == "orders" and line.__dict__["uidl"] == "BAD"
    assert "stage=limits" in text and "reason=max_depth" in text and "error=MailTooLargeError" in text
    assert all(MARKER not in r.getMessage() for r in caplog.records)
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cycle done")]
    assert done and "dead_lettered=1" in done[0]


# ---------------------------------------------------------------- exactly-once


class RecordingShardProducer(ShardProducer):
    """A real transactional producer on the mock cluster that records each call in order."""

    def __init__(self, *a: Any, fail_topics: set[str] | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.fail_topics = fail_topics or set()
        self.calls: list[tuple[str, str, bytes | None, bytes | None]] = []

    def begin(self) -> None:
        super().begin()
        self.calls.append(("begin", "", None, None))

    def commit(self) -> None:
        super().commit()
        self.calls.append(("commit", "", None, None))

    def abort(self) -> None:
        super().abort()
        self.calls.append(("abort", "", None, None))

    def send(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,
        headers: Any,
        partition: int | None = None,
    ) -> Delivery:
        self.calls.append(("send", topic, key, value))
        if topic in self.fail_topics:
            d = Delivery(topic)
            d.error = KafkaError(KafkaError._MSG_TIMED_OUT)
            d.done = True
            return d
        return super().send(topic, key, value, headers, partition)

    def send_in_transaction(self, topic: str, key: bytes, value: bytes | None, *, partition: int) -> None:
        self.calls.append(("send", topic, key, value))
        super().send_in_transaction(topic, key, value, partition=partition)


class Harness:
    def __init__(self, cfg: Config, drop: Maildrop, fail_topics: set[str] | None = None) -> None:
        self.cfg = cfg
        self.drop = drop
        self.published: list[str] = []
        self.dead: list[str] = []
        self.producer = RecordingShardProducer(
            "mock:9092", MOCK, 5, prefix="t", shard=0, transaction_timeout_s=60, fail_topics=fail_topics
        )
        self.producer.init()
        self.ledger = ShardLedger(0)
        self.worker = ShardWorker(
            cfg,
            0,
            self.producer,
            self.ledger,
            stop=threading.Event(),
            session_factory=lambda _m: drop.session(),
            hooks=CycleHooks(on_published=self.published.append, on_dead_lettered=self.dead.append),
            clock_ms=lambda: 1_767_258_000_000,
        )
        self.pool = ThreadPoolExecutor(2)

    def round(self) -> Any:
        (r,) = self.worker.round(list(self.cfg.mailboxes), self.pool)
        return r


def test_eos_dead_letter_and_its_ledger_entry_commit_together_then_dele() -> None:
    drop = drop_with_bad_mail()
    raw = drop.mails["BAD"]
    h = Harness(config("exactly_once"), drop)
    r = h.round()
    assert r.ok, r.error
    assert (r.published, r.dead_lettered, r.deleted, r.undecodable) == (2, 1, 3, 0)
    assert r.dead_letter_reasons == {"max_depth": 1} and r.listed == 3 and len(r.waiting) == 3
    assert drop.mails == {} and h.published == ["G0", "G2"] and h.dead == ["BAD"]

    calls = h.producer.calls
    begin, commit = calls.index(("begin", "", None, None)), calls.index(("commit", "", None, None))
    sends = [(t, k, v) for op, t, k, v in calls[begin:commit] if op == "send"]
    (dlq,) = [(k, v) for t, k, v in sends if t == "mail.dlq"]
    assert dlq[0] == b"orders" and dlq[1] is not None and decode_dead_letter(dlq[1])["raw"] == raw
    entries = {k: LedgerEntry.decode(v) for t, k, v in sends if t == "ledger" and v is not None}
    assert entries[b"orders:BAD"].state == "dead_lettered"
    assert entries[b"orders:BAD"].topic == "mail.dlq" and entries[b"orders:BAD"].offset is not None
    assert entries[b"orders:BAD"].raw_sha256 == hashlib.sha256(raw).hexdigest()
    assert {entries[b"orders:G0"].state, entries[b"orders:G2"].state} == {"delivered"}
    # DELE only after the commit (the session log has no DELE before the last RETR either)
    assert drop.log.index("DELE 2") > drop.log.index("RETR 3") and drop.log[-1] == "QUIT"

    h.round()  # the next transaction tombstones the three entries, as for delivered mail
    assert h.worker._tombstones == [] and h.ledger.known("orders") == {}


def test_eos_failed_dead_letter_aborts_the_round_and_deletes_nothing() -> None:
    drop = drop_with_bad_mail()
    h = Harness(config("exactly_once"), drop, fail_topics={"mail.dlq"})
    r = h.round()
    assert isinstance(r.error, DeliveryError) and r.deleted == 0 and r.dead_lettered == 0
    assert len(drop.mails) == 3 and "QUIT" not in drop.log and drop.log[-1] == "ABORT"
    assert ("abort", "", None, None) in h.producer.calls and h.ledger.known("orders") == {}


def test_eos_known_dead_letter_is_deleted_not_sent_again() -> None:
    """A crash after the commit and before DELE: the ledger knows the dead letter."""
    drop = drop_with_bad_mail()
    h = Harness(config("exactly_once"), drop)
    h.ledger.record(LedgerEntry("orders", "BAD", "dead_lettered", 0, topic="mail.dlq", partition=0, offset=7))
    r = h.round()
    assert r.ok and (r.published, r.dead_lettered, r.deleted) == (2, 0, 3) and drop.mails == {}
    assert "RETR 2" not in drop.log
    assert not [c for c in h.producer.calls if c[1] == "mail.dlq"]


def test_eos_keep_mode_dead_letters_once() -> None:
    drop = drop_with_bad_mail()
    h = Harness(config("exactly_once", delete=False), drop)
    assert h.round().dead_lettered == 1
    r = h.round()
    assert r.ok and (r.published, r.dead_lettered, r.deleted) == (0, 0, 0) and len(drop.mails) == 3
    assert h.ledger.known("orders")["BAD"].state == "dead_lettered"
    assert len([c for c in h.producer.calls if c[1] == "mail.dlq"]) == 1


def test_eos_leave_policy_writes_no_ledger_entry_and_retries_next_round() -> None:
    drop = drop_with_bad_mail()
    h = Harness(config("exactly_once", on_undecodable="leave"), drop)
    r = h.round()
    assert r.ok and (r.published, r.dead_lettered, r.deleted, r.undecodable) == (2, 0, 2, 1)
    assert list(drop.mails) == ["BAD"] and "BAD" not in h.ledger.known("orders")
    r = h.round()  # left on the server and unknown to the ledger: tried (and counted) again
    assert r.undecodable == 1 and list(drop.mails) == ["BAD"]
    assert not [c for c in h.producer.calls if c[1] == "mail.dlq"]


# ---------------------------------------------------------------- CLI


def test_doctor_prints_warn_with_the_fix_and_still_passes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from connector.cli.main import main
    from connector.delivery import doctor

    findings = [
        doctor.Finding("kafka.broker", True, "mock"),
        doctor.Finding("kafka.dead_letter_topic.retention", True, "retention.ms=604800000", "kafka-configs ...", True),
    ]
    monkeypatch.setattr(doctor, "check_kafka", lambda _cfg: findings)
    monkeypatch.setenv("PW", "pw")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "kafka: {bootstrap_servers: 'mock:9092'}\ntopics: {mail: mail}\n"
        "mailboxes: [{id: a, host: pop.test, username: u, password: {env: PW}}]\n"
    )
    assert main(["--log-format", "text", "doctor", "--config", str(cfg), "--kafka-only"]) == 0
    out = capsys.readouterr().out
    assert "WARN kafka.dead_letter_topic.retention: retention.ms=604800000\n     fix: kafka-configs ..." in out
    assert "2 ok (1 with a warning), 0 failed" in out
