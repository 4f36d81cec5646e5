"""The cycle's delivery rules, with a scripted POP3 session and librdkafka's mock cluster.

The same rules are proven against the real broker and Dovecot in tests/integration; these
tests reach the corners (a failed delivery, a POP3 failure mid-cycle, bounds) quickly.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import KafkaError
from support.fakepop import FakeSessionBase
from support.mailgen import make_mail

from connector.config import parse_config
from connector.config.model import MailboxConfig
from connector.delivery.kafka import Delivery, Publisher
from connector.errors import (
    DeliveryError,
    DeliveryFatalError,
    DeliveryTimeoutError,
    Pop3AuthError,
    Pop3ConnectError,
    Pop3ProtocolError,
    Pop3UnsupportedError,
)
from connector.records import decode_single_object
from connector.runtime.cycle import CycleContext, CycleHooks, run_cycle

MOCK = {"test.mock.num.brokers": 1}


@dataclass
class FakeSession(FakeSessionBase):
    mails: dict[str, bytes]
    fail_login: bool = False
    fail_retr_at: int | None = None
    duplicate_uidl: bool = False
    log: list[str] = field(default_factory=list)
    #: LIST sizes that lie (uidl -> size), for servers whose LIST and RETR disagree
    list_sizes: dict[str, int] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)

    @property
    def order(self) -> list[str]:
        return list(self.mails)

    def login_user_pass(self, username: str, password: str) -> None:
        self.log.append("LOGIN")
        if self.fail_login:
            raise Pop3AuthError("login refused [AUTH]")

    def uidl(self) -> list[tuple[int, str]]:
        self.log.append("UIDL")
        u = [(i + 1, uid) for i, uid in enumerate(self.order)]
        if self.duplicate_uidl:
            u.append((len(u) + 1, u[0][1]))
        return u

    def list(self) -> list[tuple[int, int]]:
        return [(i + 1, self.list_sizes.get(uid, len(m))) for i, (uid, m) in enumerate(self.mails.items())]

    def retr(self, msg_num: int) -> bytes:
        self.log.append(f"RETR {msg_num}")
        if self.fail_retr_at == msg_num:
            raise Pop3ConnectError("connection reset")
        return self.mails[self.order[msg_num - 1]]

    def dele(self, msg_num: int) -> None:
        self.log.append(f"DELE {msg_num}")
        self.deleted.add(msg_num)

    def quit(self) -> None:
        self.log.append("QUIT")

    def abort(self) -> None:
        self.log.append("ABORT")

    def close(self) -> None:
        self.log.append("CLOSE")

    def top(self, msg_num: int, lines: int = 0) -> bytes:
        self.log.append(f"TOP {msg_num}")
        raw = self.mails[self.order[msg_num - 1]]
        end = raw.find(b"\r\n\r\n")
        return raw if end < 0 else raw[: end + 4]


def config(topic: str = "mail", *, runtime: dict[str, Any] | None = None, **mailbox: Any) -> tuple[Any, MailboxConfig]:
    m: dict[str, Any] = {"id": "orders", "host": "pop.test", "username": "u", "password": {"env": "PW"}}
    m.update(mailbox)
    cfg = parse_config(
        {
            "kafka": {"bootstrap_servers": "mock:9092", "delivery_timeout_seconds": 2},
            "topics": {"mail": topic},
            **({"runtime": runtime} if runtime is not None else {}),
            "mailboxes": [m],
        },
        environ={"PW": "pw"},
    )
    return cfg, cfg.mailboxes[0]


def mails(n: int) -> dict[str, bytes]:
    return {f"UID{i:04d}": make_mail(i)[0] for i in range(n)}


def run(session: FakeSession, publisher: Publisher, **mailbox: Any) -> Any:
    cfg, mb = config(**mailbox)
    ctx = CycleContext(config=cfg, publisher=publisher, session_factory=lambda _m: session)
    return run_cycle(ctx, mb)


@pytest.fixture(scope="module")
def mock_publisher() -> Publisher:
    return Publisher("mock:9092", MOCK, 5)


def test_happy_path_deletes_after_delivery_then_quits(mock_publisher: Publisher) -> None:
    s = FakeSession(mails(5))
    res = run(s, mock_publisher)
    assert res.ok and (res.published, res.deleted, res.listed) == (5, 5, 5)
    # every RETR before any DELE (all deliveries confirmed first), QUIT last
    assert s.log.index("DELE 1") > s.log.index("RETR 5")
    assert s.log[-1] == "QUIT" and "ABORT" not in s.log


def test_dead_broker_deletes_nothing_and_quits_without_dele() -> None:
    s = FakeSession(mails(3))
    dead = Publisher("127.0.0.1:1", {}, 1)
    res = run(s, dead)
    assert isinstance(res.error, DeliveryError) and res.error.step == "produce"
    assert res.error.mailbox == "orders"
    assert not s.deleted and "QUIT" in s.log  # QUIT with no DELE applies nothing
    assert res.deleted == 0


def test_pop3_failure_mid_cycle_aborts_without_delete(mock_publisher: Publisher) -> None:
    s = FakeSession(mails(4), fail_retr_at=3)
    res = run(s, mock_publisher)
    assert isinstance(res.error, Pop3ConnectError) and res.error.step == "retr"
    assert not s.deleted and s.log[-1] == "ABORT" and "QUIT" not in s.log


def test_auth_failure_names_mailbox_and_step(mock_publisher: Publisher) -> None:
    s = FakeSession(mails(1), fail_login=True)
    res = run(s, mock_publisher)
    assert isinstance(res.error, Pop3AuthError)
    assert res.error.describe().startswith("[mailbox 'orders', step login] Pop3AuthError")


def test_duplicate_uidls_are_refused(mock_publisher: Publisher) -> None:
    s = FakeSession(mails(2), duplicate_uidl=True)
    res = run(s, mock_publisher)
    assert isinstance(res.error, Pop3UnsupportedError) and "two messages" in str(res.error)
    assert "RETR 1" not in s.log


def test_count_bound_leaves_rest_for_next_cycle(mock_publisher: Publisher) -> None:
    s = FakeSession(mails(5))
    res = run(s, mock_publisher, max_messages_per_cycle=2)
    assert res.ok and res.deleted == 2 and res.more_pending
    assert s.deleted == {1, 2}


def test_oversized_mail_is_left_on_server(mock_publisher: Publisher) -> None:
    m = mails(2)
    m["BIG"] = b"Subject: big\r\n\r\n" + b"x" * 5000
    s = FakeSession(m)
    res = run(s, mock_publisher, max_message_bytes=4096)
    assert res.ok and res.oversized == 1 and res.deleted == 2 and 3 not in s.deleted


def test_stop_event_ends_fetching_but_finishes_delivery(mock_publisher: Publisher) -> None:
    s = FakeSession(mails(5))
    cfg, mb = config()
    stop = threading.Event()

    def retr_then_stop(n: int, orig: Any = s.retr) -> bytes:
        if n == 3:  # SIGTERM arrives while mail 3 comes in: 1 and 2 are done, 3 is left
            stop.set()
        return orig(n)  # type: ignore[no-any-return]

    s.retr = retr_then_stop  # type: ignore[method-assign]
    ctx = CycleContext(config=cfg, publisher=mock_publisher, stop=stop, session_factory=lambda _m: s)
    res = run_cycle(ctx, mb)
    assert res.ok and res.deleted == 2 and s.deleted == {1, 2} and res.more_pending and s.log[-1] == "QUIT"


class RecordingPublisher(Publisher):
    def __init__(self) -> None:
        super().__init__("mock:9092", MOCK, 5)
        self.sent: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = []

    def send(self, topic: str, key: bytes, value: bytes, headers: Any) -> Any:
        self.sent.append((topic, key, value, list(headers)))
        return super().send(topic, key, value, headers)


@pytest.mark.parametrize(
    ("key_mode", "keys"),
    [
        ("mailbox", [b"orders", b"orders"]),
        ("record_id", [b"orders:UID0000", b"orders:UID0001"]),
    ],
)
def test_record_keys_and_headers(key_mode: str, keys: list[bytes]) -> None:
    pub = RecordingPublisher()
    cfg, mb = config()
    cfg = dataclasses.replace(cfg, record=dataclasses.replace(cfg.record, key=key_mode))
    ctx = CycleContext(config=cfg, publisher=pub, session_factory=lambda _m: FakeSession(mails(2)))
    assert run_cycle(ctx, mb).ok
    assert [k for _, k, _, _ in pub.sent] == keys
    for i, (topic, _, value, headers) in enumerate(pub.sent):
        rec = decode_single_object(value)
        assert topic == "mail"
        assert rec["record_id"] == f"orders:UID{i:04d}"
        assert dict(headers) == {"pop3kafka.record_id": rec["record_id"].encode(), "pop3kafka.mailbox_id": b"orders"}
        assert rec["provenance"]["server"] == "pop.test:995"


def test_record_too_large_for_kafka_skips_only_that_mail() -> None:
    pub = Publisher("mock:9092", {**MOCK, "message.max.bytes": 20_000}, 5)
    m = mails(3)
    m = {"UID0000": m["UID0000"], "HUGE": b"Subject: huge\r\n\r\n" + b"x" * 60_000 + b"\r\n", "UID0002": m["UID0002"]}
    s = FakeSession(m)
    res = run(s, pub)
    assert res.ok and res.too_large == 1 and res.deleted == 2
    assert s.deleted == {1, 3} and s.log[-1] == "QUIT"


def test_mail_growing_past_the_limit_during_retr_is_left_and_session_goes_on(mock_publisher: Publisher) -> None:
    m = mails(2)
    m["LIAR"] = b"Subject: liar\r\n\r\n" + b"y" * 12000 + b"\r\n"
    m.update({"UID9": make_mail(9)[0]})
    s = FakeSession(m, list_sizes={"LIAR": 100})
    res = run(s, mock_publisher, max_message_bytes=8192)
    assert res.ok and res.oversized == 1 and res.deleted == 3 and 3 not in s.deleted


def test_uidl_without_list_entry_is_a_protocol_error(mock_publisher: Publisher) -> None:
    s = FakeSession(mails(2))
    s.list = lambda: [(1, 100)]  # type: ignore[method-assign]
    res = run(s, mock_publisher)
    assert isinstance(res.error, Pop3ProtocolError) and "LIST does not" in str(res.error)
    assert s.log[-1] == "ABORT"


class PartlyFailingPublisher(Publisher):
    """Deliveries of the listed record ids fail; the rest go to the mock cluster."""

    def __init__(self, fail: set[str]) -> None:
        super().__init__("mock:9092", MOCK, 5)
        self.fail = fail

    def send(self, topic: str, key: bytes, value: bytes, headers: Any) -> Delivery:
        rid = dict(headers)["pop3kafka.record_id"].decode()
        if rid in self.fail:
            d = Delivery(topic)
            d.error = KafkaError(KafkaError._MSG_TIMED_OUT)
            d.done = True
            return d
        return super().send(topic, key, value, headers)


def test_only_confirmed_mails_are_deleted() -> None:
    s = FakeSession(mails(5))
    res = run(s, PartlyFailingPublisher({"orders:UID0001", "orders:UID0003"}))
    assert isinstance(res.error, DeliveryTimeoutError) and "2 of 5" in str(res.error)
    assert s.deleted == {1, 3, 5} and res.deleted == 3 and s.log[-1] == "QUIT"


def test_shutdown_bounds_the_wait_for_a_dead_broker() -> None:
    s = FakeSession(mails(2))
    cfg, mb = config()
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, shutdown_grace_seconds=2))
    stop = threading.Event()
    stop.set()  # SIGTERM arrived; the broker is gone
    dead = Publisher("127.0.0.1:1", {}, 60)
    ctx = CycleContext(config=cfg, publisher=dead, stop=stop, session_factory=lambda _m: s)
    # stop is set before the first RETR, so nothing is fetched at all
    res = run_cycle(ctx, mb)
    assert res.ok and res.fetched == 0 and s.log[-1] == "QUIT"

    s2 = FakeSession(mails(2))
    stop2 = threading.Event()
    orig = s2.retr

    def retr_then_sigterm(n: int) -> bytes:
        if n == 2:  # SIGTERM while the second mail comes in; the first was already produced
            stop2.set()
        return orig(n)

    s2.retr = retr_then_sigterm  # type: ignore[method-assign]
    ctx = CycleContext(config=cfg, publisher=dead, stop=stop2, session_factory=lambda _m: s2)
    t0 = time.monotonic()
    res = run_cycle(ctx, mb)
    assert time.monotonic() - t0 < 5, "the wait ignored the shutdown grace"
    assert isinstance(res.error, DeliveryTimeoutError) and not s2.deleted and s2.log[-1] == "QUIT"


def test_fatal_producer_stops_before_connecting() -> None:
    pub = Publisher("mock:9092", MOCK, 5)
    pub._fatal = KafkaError(KafkaError._FENCED, "fenced", fatal=True)
    opened: list[str] = []

    def factory(_m: MailboxConfig) -> FakeSession:
        opened.append("x")
        return FakeSession(mails(1))

    cfg, mb = config()
    res = run_cycle(CycleContext(config=cfg, publisher=pub, session_factory=factory), mb)
    assert isinstance(res.error, DeliveryFatalError) and opened == []


def test_runner_repolls_at_once_only_when_a_bounded_cycle_made_progress() -> None:
    from connector.runtime.runner import Runner

    def run_for(mail_maker: Any, seconds: float, **session: Any) -> int:
        cfg, _ = config(
            max_messages_per_cycle=1, poll_interval_seconds=3600, max_message_bytes=8192, schedule={"jitter_seconds": 0}
        )
        cfg = dataclasses.replace(cfg, delivery=dataclasses.replace(cfg.delivery, mode="at_least_once"))
        calls: list[int] = []

        def factory(_m: MailboxConfig) -> FakeSession:
            calls.append(1)
            return FakeSession(mail_maker(), **session)

        runner = Runner(cfg, session_factory=factory)
        runner.publisher = Publisher("mock:9092", MOCK, 5)
        runner.ctx.publisher = runner.publisher
        t = threading.Timer(seconds, runner.stop.set)
        t.start()
        runner.run()
        runner.close()
        return len(calls)

    # progress each time (the fake refills, so the bound is always hit): polled again at once
    assert run_for(lambda: mails(3), 1.5) >= 3
    # nothing deletable (mail at the front that has to stay): no hot loop, one cycle per interval
    big = {f"B{i}": b"Subject: b\r\n\r\n" + b"z" * 12000 for i in range(3)}
    assert run_for(lambda: dict(big), 1.5, list_sizes=dict.fromkeys(big, 100)) == 1


def test_mail_with_a_line_over_max_line_bytes_is_left_and_counted(mock_publisher: Publisher) -> None:
    m = mails(2)
    m["WIDE"] = b"Subject: wide\r\n\r\n" + b"w" * 3000 + b"\r\n"
    m.update({"UID9": make_mail(9)[0]})
    s = FakeSession(dict(m))
    res = run(s, mock_publisher, max_line_bytes=2000, on_undecodable="leave")
    assert res.ok and res.long_lines == 1 and res.oversized == 0 and res.undecodable == 0
    assert res.deleted == 3 and 3 not in s.deleted
    # By default such mail is a dead letter (reason max_line_bytes), then deleted like the rest.
    s = FakeSession(dict(m))
    res = run(s, mock_publisher, max_line_bytes=2000)
    assert res.ok and res.dead_lettered == 1 and res.long_lines == 0 and res.deleted == 4


def test_every_mail_spooled_is_published_and_every_spool_file_closed(mock_publisher: Publisher, tmp_path: Any) -> None:
    cfg, _ = spooling(tmp_path, threshold=0)
    s = FakeSession(mails(6))

    spooled: list[list[str]] = []
    orig = s.retr_many

    def retr_many_watched(*args: Any, **kwargs: Any) -> Any:
        for item in orig(*args, **kwargs):
            spooled.append(open_under(tmp_path))
            yield item

    s.retr_many = retr_many_watched  # type: ignore[method-assign]
    res = run_cycle(CycleContext(config=cfg, publisher=mock_publisher, session_factory=lambda _m: s), cfg.mailboxes[0])
    assert res.ok and res.published == res.deleted == 6
    assert len(spooled) == 6 and all(spooled)  # each mail was in a spool file while it was handled
    assert open_under(tmp_path) == []  # and none is left open
    assert list(tmp_path.iterdir()) == []


def test_retr_a_little_larger_than_list_at_the_limit_is_still_taken(mock_publisher: Publisher) -> None:
    # RFC 1939 §11: LIST sizes are estimates; a mail LISTed at the limit may arrive a few bytes
    # larger (no final CRLF; a server-added header): not "grew past max_message_bytes".
    raw = b"Subject: edge\r\nX-UIDL: 0123456789abcdef\r\n\r\n" + b"e" * 4060 + b"\r\n"
    s = FakeSession({"EDGE": raw}, list_sizes={"EDGE": 4096})
    res = run(s, mock_publisher, max_message_bytes=4096)
    assert len(raw) > 4096
    assert res.ok and res.oversized == 0 and res.published == res.deleted == 1


def test_leave_policy_reports_each_undecodable_mail_once(
    mock_publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    from support.badmail import nested_mail

    caplog.set_level("DEBUG", logger="pop3kafka.cycle")
    m = mails(1)
    m["DEEP1"] = nested_mail(1)
    for _ in range(2):  # two cycles: the mail stays and is tried again
        res = run(FakeSession(dict(m)), mock_publisher, id="leaveonce", on_undecodable="leave")
        assert res.ok and res.undecodable == 1
    errors = [r for r in caplog.records if "left on the server (on_undecodable: leave)" in r.getMessage()]
    assert [r.levelname for r in errors] == ["ERROR", "DEBUG"]


def test_oversized_mail_is_reported_once_per_uidl(mock_publisher: Publisher, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="pop3kafka.cycle")
    m = {"HUGE1": b"Subject: big\r\n\r\n" + b"x" * 5000}
    for _ in range(2):
        res = run(FakeSession(dict(m)), mock_publisher, id="bigonce", max_message_bytes=4096)
        assert res.ok and res.oversized == 1
    said = [r.levelname for r in caplog.records if "exceeds max_message_bytes" in r.getMessage()]
    assert said == ["ERROR", "DEBUG"]


def test_oversized_delete_deletes_unread_after_the_others_are_delivered(mock_publisher: Publisher) -> None:
    m = mails(2)
    m["BIG"] = b"Subject: big\r\n\r\n" + b"x" * 5000
    s = FakeSession(m)
    res = run(s, mock_publisher, max_message_bytes=4096, oversized="delete")
    assert res.ok and res.oversized == 0 and res.deleted_unread == 1 and res.published == 2
    assert s.deleted == {1, 2, 3} and "RETR 3" not in s.log


def test_oversized_dead_letter_keeps_the_raw_mail_as_chunks() -> None:
    pub = RecordingPublisher()
    m = mails(1)
    big = b"Subject: big\r\nMessage-ID: <big@x>\r\n\r\n" + b"0123456789abcdef\r\n" * 40_000  # 720,000 bytes
    m["BIG"] = big
    s = FakeSession(m)
    res = run(s, pub, max_message_bytes=100_000, oversized="dead_letter")
    assert res.ok and res.oversized == 0 and res.dead_lettered == 1 and res.published == 1
    assert s.deleted == {1, 2} and "RETR 2" in s.log
    topics = [t for t, *_ in pub.sent]
    # 512 KiB chunks, on the dead-letter topic itself (its retention), before the dead letter
    assert topics == ["mail", "mail.dlq", "mail.dlq", "mail.dlq"]
    from connector.records.content import chunk_schema
    from connector.records.dead_letter import decode_dead_letter

    dead = decode_dead_letter(pub.sent[-1][2])
    assert dead["reason"] == "max_message_bytes" and dead["raw"] == b""
    ref = dead["raw_ref"]
    assert ref["placement"] == "chunked" and ref["size"] == len(big) and ref["id"] == "orders:BIG/raw"
    cs = chunk_schema()
    chunks = [decode_single_object(v, {cs.fingerprint: cs}) for t, _, v, _ in pub.sent[1:3]]
    assert ref["topic"] == "mail.dlq"
    assert b"".join(c["data"] for c in chunks) == big
    assert {k for _, k, _, _ in pub.sent} == {b"orders"}  # one key: one partition


def test_large_attachment_goes_as_chunks_before_its_mail_record() -> None:
    import base64
    import hashlib
    import random

    blob = random.Random(1).randbytes(700_000)
    raw = (
        b"Subject: att\r\nMessage-ID: <att@x>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(blob).replace(b"\n", b"\r\n")
        + b"--b--\r\n"
    )
    pub = RecordingPublisher()
    s = FakeSession({"A1": raw})
    res = run(s, pub)
    assert res.ok and res.published == 1 and s.deleted == {1}
    assert [t for t, *_ in pub.sent] == ["mail.attachments", "mail.attachments", "mail"]
    rec = decode_single_object(pub.sent[-1][2])
    [att] = rec["attachments"]
    assert att["ref"]["chunks"] == 2 and att["sha256"] == hashlib.sha256(blob).hexdigest() and att["data"] is None


def _with_attachment(tag: str) -> bytes:
    import base64
    import random

    blob = random.Random(tag).randbytes(700_000)
    return (
        b"Subject: " + tag.encode() + b"\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: application/pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(blob).replace(b"\n", b"\r\n") + b"--b--\r\n"
    )


class ChunkFailingPublisher(RecordingPublisher):
    """Chunk records fail (delivery error), or raise at produce time with ``raise_on_chunk``."""

    def __init__(self, *, raise_on_chunk: bool = False) -> None:
        super().__init__()
        self.raise_on_chunk = raise_on_chunk

    def send(self, topic: str, key: bytes, value: bytes, headers: Any) -> Any:
        if topic.endswith(".attachments"):
            if self.raise_on_chunk:
                raise DeliveryTimeoutError("local producer queue stayed full")
            self.sent.append((topic, key, value, list(headers)))
            d = Delivery(topic)
            d.error = KafkaError(KafkaError._MSG_TIMED_OUT)
            d.done = True
            return d
        return super().send(topic, key, value, headers)


def test_at_least_once_sends_no_record_whose_chunks_failed() -> None:
    m = mails(2)
    m["BIG"] = _with_attachment("big")
    s = FakeSession(m)
    pub = ChunkFailingPublisher()
    res = run(s, pub)
    assert isinstance(res.error, DeliveryError) and res.error.step == "produce"
    # the two mails before it are delivered and deleted; no mail record for the big one
    assert s.deleted == {1, 2} and res.published == 2 and s.log[-1] == "QUIT"
    assert [t for t, *_ in pub.sent if t == "mail"] == ["mail", "mail"]


def test_a_placement_error_still_settles_what_was_confirmed() -> None:
    m = mails(2)
    m["BIG"] = _with_attachment("big")
    s = FakeSession(m)
    res = run(s, ChunkFailingPublisher(raise_on_chunk=True))
    assert isinstance(res.error, DeliveryTimeoutError)
    assert s.deleted == {1, 2} and res.deleted == 2 and "ABORT" not in s.log and s.log[-1] == "QUIT"


def test_in_use_is_logged_at_info_and_counted_by_the_scheduler(
    mock_publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from connector.errors import Pop3MailboxBusyError
    from connector.runtime.schedule import error_kind

    class Busy(FakeSession):
        def login_user_pass(self, username: str, password: str) -> None:
            raise Pop3MailboxBusyError("-ERR [IN-USE] maildrop locked")

    with caplog.at_level(logging.INFO, logger="pop3kafka.cycle"):
        res = run(Busy(mails(1)), mock_publisher)
    assert isinstance(res.error, Pop3MailboxBusyError) and error_kind(res.error) == "in_use"
    [rec] = [r for r in caplog.records if "IN-USE" in r.getMessage()]
    assert rec.levelno == logging.INFO
    assert error_kind(Pop3AuthError("bad")) == "auth" and error_kind(None) is None


def _many(n: int, per_server: int, mode: str, host_of: Any) -> tuple[Any, list[MailboxConfig]]:
    boxes = [
        {
            "id": f"b{i}",
            "host": host_of(i),
            "username": "u",
            "password": {"env": "PW"},
            "schedule": {"jitter_seconds": 0},
        }
        for i in range(n)
    ]
    cfg = parse_config(
        {
            "kafka": {"bootstrap_servers": "mock:9092", "delivery_timeout_seconds": 2},
            "topics": {"mail": "mail"},
            "delivery": {"mode": mode},
            "runtime": {"max_concurrent_sessions": 16, "max_sessions_per_server": per_server},
            "mailboxes": boxes,
        },
        environ={"PW": "pw"},
    )
    return cfg, list(cfg.mailboxes)


def test_waves_keep_at_most_n_per_server_in_order() -> None:
    from connector.runtime.sessions import waves

    _, ms = _many(7, 2, "at_least_once", lambda i: "a.test" if i % 3 else "b.test")
    got = [[m.id for m in w] for w in waves(ms, 2)]
    assert got == [["b0", "b1", "b2", "b3"], ["b4", "b5", "b6"]]
    for w in waves(ms, 2):
        assert max(sum(1 for m in w if m.host == h) for h in ("a.test", "b.test")) <= 2


def test_run_loop_respects_the_per_server_session_limit() -> None:
    from connector.runtime.runner import Runner

    cfg, _ = _many(6, 2, "at_least_once", lambda i: "slow.test" if i < 4 else "other.test")
    lock = threading.Lock()
    active: dict[str, int] = {}
    peak: dict[str, int] = {}
    logins: list[str] = []

    class Slow(FakeSession):
        host: str = ""

        def login_user_pass(self, username: str, password: str) -> None:
            with lock:
                active[self.host] = active.get(self.host, 0) + 1
                peak[self.host] = max(peak.get(self.host, 0), active[self.host])
                logins.append(self.host)
            time.sleep(0.2)

        def quit(self) -> None:
            with lock:
                active[self.host] -= 1
            super().quit()

    def factory(m: MailboxConfig) -> FakeSession:
        s = Slow({})
        s.host = m.host
        if len(logins) >= 5:
            runner.stop.set()
        return s

    runner = Runner(cfg, session_factory=factory)
    runner.publisher = Publisher("mock:9092", MOCK, 5)
    runner.ctx.publisher = runner.publisher
    guard = threading.Timer(10, runner.stop.set)
    guard.start()
    try:
        runner.run()
    finally:
        guard.cancel()
        runner.close()
    assert peak["slow.test"] == 2 and peak["other.test"] <= 2
    assert logins.count("slow.test") >= 3  # the third slow mailbox got its turn when a slot freed


def test_publisher_start_connects_before_the_first_record() -> None:
    """Publisher.start(): the producer exists, and has asked the broker for metadata, before
    anything is sent (the speed-up is measured in bench/, not here); the first record is
    then delivered like any other."""
    pub = Publisher("mock:9092", MOCK, 5)
    try:
        pub.start()
        assert pub._producer is not None  # created by start(), not by the first send
        d = pub.send("t", b"k", b"v", [])
        pub.wait([d])
        assert d.ok and d.offset == 0
    finally:
        pub.close(timeout=5.0)


def test_publisher_start_against_an_unreachable_broker_leaves_the_error_to_delivery() -> None:
    pub = Publisher("127.0.0.1:1", {}, 1)
    try:
        pub.start()  # bounded by the delivery timeout (1 s here); never raises
        d = pub.send("t", b"k", b"v", [])
        pub.wait([d])
        assert d.done and not d.ok  # the record's own report says what went wrong
        assert isinstance(pub.check([d]), DeliveryError)
    finally:
        pub.close(timeout=1.0)


def open_under(path: Any) -> list[str]:
    """What the process holds open under ``path`` (spool files are anonymous, O_TMPFILE: they
    never show in the directory). Not a count of every open descriptor: librdkafka's threads
    open and close sockets of their own meanwhile."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(str(path)):
            found.append(target)
    return found


def guarded(s: FakeSession, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make ``s`` flag every session call made while its RETR generator is still open (the
    session is single-threaded: a read-ahead must have ended first), and drain like a real
    session when that generator is closed (reading takes a moment). Also flags a retrieval
    still open when the cycle's retrieve_encoded has ended (its close must wait for the
    read-ahead thread, however long that thread's drain takes). Returns the flags."""
    problems: list[str] = []
    open_in: list[str] = []
    orig = s.retr_many

    def retr_many(*args: Any, **kwargs: Any) -> Any:
        open_in.append(threading.current_thread().name)
        try:
            yield from orig(*args, **kwargs)
        finally:
            time.sleep(0.2)  # the RETRs in flight being read
            s.log.append("DRAINED")
            open_in.clear()

    def watch(name: str) -> None:
        inner = getattr(s, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if open_in:
                problems.append(f"{name} while the retrieval is open in {open_in[0]}")
            return inner(*args, **kwargs)

        setattr(s, name, call)

    s.retr_many = retr_many  # type: ignore[method-assign]
    for name in ("dele", "quit", "abort", "close"):
        watch(name)

    from connector.runtime import cycle

    inner_retrieve = cycle.retrieve_encoded

    def retrieve_encoded(*args: Any, **kwargs: Any) -> Any:
        mails = inner_retrieve(*args, **kwargs)
        try:
            yield from mails
        finally:
            mails.close()
            if open_in:
                problems.append(f"retrieve_encoded ended with the retrieval open in {open_in[0]}")

    monkeypatch.setattr(cycle, "retrieve_encoded", retrieve_encoded)
    return problems


def spooling(tmp_path: Any, threshold: int = 1) -> tuple[Any, MailboxConfig]:
    """Mail spooled into ``tmp_path`` over ``threshold`` bytes; with the default, every mail is
    over it, so a cycle of two or more reads ahead (ReadAhead)."""
    return config(runtime={"spool_threshold_bytes": threshold, "spool_directory": str(tmp_path)})


def test_large_mail_is_received_in_a_thread_of_its_own_and_published_in_order(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, mb = spooling(tmp_path)
    s = FakeSession(mails(5))
    readers: list[str] = []
    orig = s.retr

    def retr(n: int) -> bytes:
        readers.append(threading.current_thread().name)
        return orig(n)

    s.retr = retr  # type: ignore[method-assign]
    problems = guarded(s, monkeypatch)
    pub = RecordingPublisher()
    res = run_cycle(CycleContext(config=cfg, publisher=pub, session_factory=lambda _m: s), mb)
    assert res.ok and res.published == res.deleted == 5
    assert readers == ["read-ahead-orders"] * 5  # never the cycle's own thread
    assert [decode_single_object(v)["record_id"] for _, _, v, _ in pub.sent] == [f"orders:{u}" for u in s.mails]
    assert s.log.index("DRAINED") < s.log.index("DELE 1") and s.log[-1] == "QUIT"
    assert problems == [] and open_under(tmp_path) == []  # every spool file released


def test_a_pop3_failure_while_reading_ahead_deletes_nothing(
    mock_publisher: Publisher, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, mb = spooling(tmp_path)
    s = FakeSession(mails(4), fail_retr_at=3)
    problems = guarded(s, monkeypatch)
    res = run_cycle(CycleContext(config=cfg, publisher=mock_publisher, session_factory=lambda _m: s), mb)
    assert isinstance(res.error, Pop3ConnectError) and res.error.step == "retr"
    assert not s.deleted and s.log[-1] == "ABORT" and "QUIT" not in s.log
    assert s.log.index("DRAINED") < s.log.index("ABORT")
    assert problems == [] and open_under(tmp_path) == []


def test_stopping_while_reading_ahead_publishes_what_was_taken_and_drains_the_rest(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, mb = spooling(tmp_path)
    s = FakeSession(mails(6))
    problems = guarded(s, monkeypatch)
    stop = threading.Event()
    pub = RecordingPublisher()
    hooks = CycleHooks(on_retrieved=lambda uidl, _n: stop.set() if uidl == "UID0001" else None)
    ctx = CycleContext(config=cfg, publisher=pub, session_factory=lambda _m: s, stop=stop, hooks=hooks)
    res = run_cycle(ctx, mb)
    # UID0001 was being handled when the stop came: it and UID0000 are published and deleted;
    # the mail received ahead was dropped (its spool file too) and stays for the next cycle.
    assert res.ok and res.more_pending and res.published == res.deleted == 2
    assert sorted(s.deleted) == [1, 2]
    # Taken: 1, 2 and 3 (where the stop was seen); received ahead: 4 at most, never 5.
    assert sum(1 for e in s.log if e.startswith("RETR")) <= 4
    assert problems == [] and open_under(tmp_path) == []
