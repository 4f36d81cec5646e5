"""The cycle's delivery rules, with a scripted POP3 session and librdkafka's mock cluster.

The same rules are proven against the real broker and Dovecot in tests/integration; these
tests reach the corners (a failed delivery, a POP3 failure mid-cycle, bounds) quickly.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
from support.mailgen import make_mail

from connector.config import parse_config
from connector.config.model import MailboxConfig
from connector.delivery.kafka import Publisher
from connector.errors import DeliveryError, Pop3AuthError, Pop3ConnectError, Pop3UnsupportedError
from connector.records import decode_single_object
from connector.runtime.cycle import CycleContext, run_cycle

MOCK = {"test.mock.num.brokers": 1}


@dataclass
class FakeSession:
    mails: dict[str, bytes]
    fail_login: bool = False
    fail_retr_at: int | None = None
    duplicate_uidl: bool = False
    log: list[str] = field(default_factory=list)
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
        return [(i + 1, len(m)) for i, m in enumerate(self.mails.values())]

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


def config(topic: str = "mail", **mailbox: Any) -> tuple[Any, MailboxConfig]:
    m: dict[str, Any] = {"id": "orders", "host": "pop.test", "username": "u", "password": {"env": "PW"}}
    m.update(mailbox)
    cfg = parse_config({"kafka": {"bootstrap_servers": "mock:9092", "delivery_timeout_seconds": 2},
                        "topics": {"mail": topic}, "mailboxes": [m]}, environ={"PW": "pw"})
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


def test_dead_broker_deletes_nothing_and_aborts() -> None:
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
        if n == 2:
            stop.set()
        return orig(n)  # type: ignore[no-any-return]

    s.retr = retr_then_stop  # type: ignore[method-assign]
    ctx = CycleContext(config=cfg, publisher=mock_publisher, stop=stop, session_factory=lambda _m: s)
    res = run_cycle(ctx, mb)
    assert res.ok and res.deleted == 2 and res.more_pending and s.log[-1] == "QUIT"


class RecordingPublisher(Publisher):
    def __init__(self) -> None:
        super().__init__("mock:9092", MOCK, 5)
        self.sent: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = []

    def send(self, topic: str, key: bytes, value: bytes, headers: Any) -> Any:
        self.sent.append((topic, key, value, list(headers)))
        return super().send(topic, key, value, headers)


@pytest.mark.parametrize(("key_mode", "keys"), [
    ("mailbox", [b"orders", b"orders"]),
    ("record_id", [b"orders:UID0000", b"orders:UID0001"]),
])
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
        assert dict(headers) == {"pop3kafka.record_id": rec["record_id"].encode(),
                                 "pop3kafka.mailbox_id": b"orders"}
        assert rec["provenance"]["server"] == "pop.test:995"
