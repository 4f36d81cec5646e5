"""RFC 2449 §6.7 EXPIRE and §6.8 LOGIN-DELAY: the parser, the cycle result, the keep-mode
warning and the scheduler's login pacing (scripted sessions, librdkafka's mock cluster).

The session accessor and its re-CAPA after login are in test_pop3_session.py; the real
server (GNU pop3d) is in tests/integration/test_gnu_pop3d.py.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from support.fakepop import Maildrop, MaildropSession
from support.mailgen import make_mail

from connector.config import parse_config
from connector.config.model import Config, MailboxConfig
from connector.delivery.kafka import Publisher
from connector.delivery.transactional import ShardProducer
from connector.errors import Pop3ConnectError, Pop3LoginDelayError
from connector.protocol import ServerPolicy, parse_capa, parse_server_policy
from connector.records.ledger import ShardLedger
from connector.runtime.cycle import CycleContext, run_cycle
from connector.runtime.exactly_once import ShardWorker
from connector.runtime.runner import MAX_LOGIN_DELAY_SECONDS, Runner
from connector.runtime.sessions import CycleResult, expire_conflict

MOCK = {"test.mock.num.brokers": 1}


def policy(*lines: str) -> ServerPolicy:
    body = "".join(f"{line}\r\n" for line in lines).encode()
    return parse_server_policy(parse_capa(body))


# ---------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("line", "days", "never", "per_user"),
    [
        ("EXPIRE 0", 0, False, False),
        ("EXPIRE 30", 30, False, False),
        ("EXPIRE NEVER", None, True, False),
        ("EXPIRE 30 USER", 30, False, True),
        ("EXPIRE NEVER USER", None, True, True),
        ("expire never user", None, True, True),  # tags and keywords are case-insensitive
        ("EXPIRE 007", 7, False, False),
        ("EXPIRE 999999999", 999_999_999, False, False),
    ],
)
def test_expire_forms(line: str, days: int | None, never: bool, per_user: bool) -> None:
    p = policy("TOP", line, "UIDL")
    assert p.expire_advertised and p.expire_days == days and p.expire_never is never
    assert p.expire_per_user is per_user and p.per_user is per_user
    assert p.login_delay_seconds is None and p.notes == ()


@pytest.mark.parametrize(
    ("line", "seconds", "per_user"),
    [("LOGIN-DELAY 900", 900, False), ("LOGIN-DELAY 0", 0, False), ("Login-Delay 60 user", 60, True)],
)
def test_login_delay_forms(line: str, seconds: int, per_user: bool) -> None:
    p = policy(line)
    assert p.login_delay_seconds == seconds and p.login_delay_per_user is per_user and p.notes == ()
    assert not p.expire_advertised and p.expire_days is None and not p.expire_never


def test_nothing_advertised() -> None:
    p = policy("TOP", "UIDL", "USER")
    assert p == ServerPolicy() == parse_server_policy({})
    assert not p.expire_advertised and not p.expire_never and not p.per_user and p.describe() == ""


def test_both_and_describe() -> None:
    p = policy("EXPIRE 14", "LOGIN-DELAY 900")
    assert (p.expire_days, p.login_delay_seconds) == (14, 900)
    assert p.describe() == "EXPIRE=14 LOGIN-DELAY=900s"
    assert policy("EXPIRE NEVER").describe() == "EXPIRE=NEVER"


@pytest.mark.parametrize(
    "line",
    [
        "EXPIRE",
        "EXPIRE soon",
        "EXPIRE -1",
        "EXPIRE 1.5",
        "EXPIRE 30 FOO",
        "EXPIRE 30 USER EXTRA",
        "EXPIRE 1234567890",
        "EXPIRE \uff13",  # a fullwidth digit: str.isdigit() says yes, RFC 2449 says no
        "EXPIRE USER",
    ],
)
def test_malformed_expire_is_ignored_with_a_reason(line: str) -> None:
    p = policy(line, "LOGIN-DELAY 60")
    assert not p.expire_advertised and p.expire_days is None and not p.expire_never
    assert p.login_delay_seconds == 60  # the other value is unaffected
    assert len(p.notes) == 1 and "RFC 2449 §6.7" in p.notes[0] and "ignored" in p.notes[0]


@pytest.mark.parametrize(
    "line", ["LOGIN-DELAY", "LOGIN-DELAY NEVER", "LOGIN-DELAY 15m", "LOGIN-DELAY 60 LATER", "LOGIN-DELAY -5"]
)
def test_malformed_login_delay_is_ignored_with_a_reason(line: str) -> None:
    p = policy("EXPIRE 3", line)
    assert p.login_delay_seconds is None and p.expire_days == 3
    assert len(p.notes) == 1 and "RFC 2449 §6.8" in p.notes[0]


def test_gnu_mailutils_run_together_forms() -> None:
    # GNU Mailutils 3.x: "EXPIRE<value>" without the space, LOGIN-DELAY as the bare number.
    p = parse_server_policy({"TOP": [], "120": [], "EXPIRE3": [], "USER": []})
    assert (p.expire_days, p.login_delay_seconds) == (3, 120)
    assert len(p.notes) == 2 and "EXPIRE3" in p.notes[0] and "'120'" in p.notes[1]
    assert parse_server_policy({"EXPIRENEVER": []}).expire_never
    assert parse_server_policy({"EXPIRE0": []}).expire_days == 0


def test_a_bare_number_alone_is_not_a_login_delay() -> None:
    assert parse_server_policy({"120": []}).login_delay_seconds is None
    # next to a proper EXPIRE the bare line is someone else's oddity, not Mailutils'
    assert parse_server_policy({"EXPIRE": ["5"], "120": []}).login_delay_seconds is None
    # a proper LOGIN-DELAY wins over the bare number
    assert parse_server_policy({"EXPIRE5": [], "120": [], "LOGIN-DELAY": ["30"]}).login_delay_seconds == 30
    # two bare numbers: ambiguous, neither is taken
    assert parse_server_policy({"EXPIRE5": [], "120": [], "300": []}).login_delay_seconds is None
    assert parse_server_policy({"EXPIREX": []}) == ServerPolicy()


# ---------------------------------------------------------------------------- keep mode vs EXPIRE


def mailbox(**extra: Any) -> MailboxConfig:
    return config(**extra).mailboxes[0]


def config(mode: str = "exactly_once", **extra: Any) -> Config:
    m: dict[str, Any] = {"id": f"m-{uuid.uuid4().hex[:8]}", "host": "pop.test", "username": "u"}
    m["password"] = {"env": "PW"}
    m.update(extra)
    return parse_config(
        {
            "kafka": {"bootstrap_servers": "mock:9092", "delivery_timeout_seconds": 5},
            "topics": {"mail": "mail"},
            "ledger": {"topic": "ledger", "shards": 1},
            "delivery": {"mode": mode},
            "mailboxes": [m],
        },
        environ={"PW": "pw"},
    )


@pytest.mark.parametrize(
    ("keep", "lines", "conflict"),
    [
        ({"delete": False}, ["EXPIRE 0"], "EXPIRE 0"),
        ({"delete": False}, ["EXPIRE 30"], "forever"),  # keep forever, but the server expires after 30 days
        ({"delete": False, "delete_after_days": 10}, ["EXPIRE 3"], "delete_after_days=10"),
        ({"delete": False, "delete_after_days": 10}, ["EXPIRE 0"], "EXPIRE 0"),
        ({"delete": False, "delete_after_days": 10}, ["EXPIRE 10"], None),
        ({"delete": False, "delete_after_days": 10}, ["EXPIRE 30"], None),
        ({"delete": False}, ["EXPIRE NEVER"], None),
        ({"delete": False}, [], None),
        ({"delete": True}, ["EXPIRE 0"], None),  # delete mode deletes anyway
    ],
)
def test_expire_conflict(keep: dict[str, Any], lines: list[str], conflict: str | None) -> None:
    text = expire_conflict(mailbox(**keep), policy(*lines))
    if conflict is None:
        assert text is None
    else:
        assert text is not None and conflict in text and "RFC 2449 §6.7" in text and "Kafka" in text


class PolicySession(MaildropSession):
    """A maildrop whose CAPA advertises ``caps``; ``refuse`` is raised by the login."""

    def __init__(self, drop: Maildrop, caps: dict[str, list[str]], refuse: Exception | None = None) -> None:
        super().__init__(drop)
        self.caps = caps
        self.refuse = refuse

    def capabilities(self, *, refresh: bool = False) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.caps.items()}

    def login_user_pass(self, username: str, password: str) -> None:
        super().login_user_pass(username, password)
        if self.refuse is not None:
            raise self.refuse


def test_keep_mode_warns_once_about_a_short_expire(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(delete=False, delete_after_days=10)
    m = cfg.mailboxes[0]
    drop = Maildrop({f"U{i}": make_mail(i)[0] for i in range(2)})
    producer = ShardProducer("mock:9092", MOCK, 5, prefix="t", shard=0, transaction_timeout_s=60)
    producer.init()
    worker = ShardWorker(
        cfg,
        0,
        producer,
        ShardLedger(0),
        stop=threading.Event(),
        session_factory=lambda _m: PolicySession(drop, {"EXPIRE": ["3"], "LOGIN-DELAY": ["900"]}),
    )
    with ThreadPoolExecutor(2) as pool, caplog.at_level(logging.INFO):
        (first,) = worker.round([m], pool)
        (second,) = worker.round([m], pool)
    producer.close(timeout=5)
    assert first.ok and second.ok and first.published == 2 and drop.mails  # kept on the server
    for r in (first, second):
        assert r.logged_in and r.expire_days == 3 and r.login_delay_seconds == 900
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "EXPIRE 3" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].__dict__["mailbox"] == m.id
    assert "delete_after_days=10" in warnings[0].getMessage()
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cycle done")]
    assert len(done) == 2 and all(line.endswith("server: EXPIRE=3 LOGIN-DELAY=900s") for line in done)


# ---------------------------------------------------------------------------- the cycle result


@pytest.fixture(scope="module")
def publisher() -> Publisher:
    return Publisher("mock:9092", MOCK, 5)


def cycle(session: MaildropSession, publisher: Publisher, **extra: Any) -> CycleResult:
    cfg = config("at_least_once", **extra)
    ctx = CycleContext(config=cfg, publisher=publisher, session_factory=lambda _m: session)
    return run_cycle(ctx, cfg.mailboxes[0])


def test_cycle_reports_the_policy_read_after_login(publisher: Publisher, caplog: pytest.LogCaptureFixture) -> None:
    drop = Maildrop({"U1": make_mail(1)[0]})
    with caplog.at_level(logging.INFO):
        res = cycle(PolicySession(drop, {"EXPIRE": ["0"], "LOGIN-DELAY": ["600"]}), publisher)
    assert res.ok and res.deleted == 1 and res.logged_in
    assert res.policy is not None and (res.expire_days, res.login_delay_seconds) == (0, 600)
    assert drop.log.index("LOGIN") < drop.log.index("UIDL")
    # delete mode: EXPIRE 0 is no conflict, so no warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(r.getMessage().endswith("server: EXPIRE=0 LOGIN-DELAY=600s") for r in caplog.records)


def test_cycle_without_a_policy(publisher: Publisher, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        res = cycle(PolicySession(Maildrop(), {}), publisher)
    assert res.ok and res.logged_in and res.policy == ServerPolicy()
    assert res.expire_days is None and res.login_delay_seconds is None
    assert not any("server:" in r.getMessage() for r in caplog.records)


def test_login_delay_refusal_keeps_the_delay_announced_before_login(publisher: Publisher) -> None:
    refusal = Pop3LoginDelayError("login refused: [LOGIN-DELAY] wait")
    res = cycle(PolicySession(Maildrop(), {"LOGIN-DELAY": ["900", "USER"]}, refusal), publisher)
    assert isinstance(res.error, Pop3LoginDelayError) and res.error.step == "login"
    assert not res.logged_in
    assert res.policy is not None and res.login_delay_seconds == 900 and res.policy.login_delay_per_user


def test_lenient_capa_is_noted_once(publisher: Publisher, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config("at_least_once")
    caps: dict[str, list[str]] = {"EXPIRE7": [], "300": []}
    ctx = CycleContext(config=cfg, publisher=publisher, session_factory=lambda _m: PolicySession(Maildrop(), caps))
    with caplog.at_level(logging.INFO):
        results = [run_cycle(ctx, cfg.mailboxes[0]) for _ in range(2)]
    assert all(r.expire_days == 7 and r.login_delay_seconds == 300 for r in results)
    assert len([r for r in caplog.records if r.getMessage().startswith("server CAPA: read 'EXPIRE7'")]) == 1


# ---------------------------------------------------------------------------- the scheduler


def result(m: MailboxConfig, *, logged_in: bool = True, error: Exception | None = None, **caps: Any) -> CycleResult:
    r = CycleResult(mailbox=m.id, cycle_id="c", error=error, logged_in=logged_in)
    if caps:
        r.policy = parse_server_policy({k.replace("_", "-").upper(): v for k, v in caps.items()})
    return r


@pytest.fixture
def runner() -> Runner:
    # Plans start at 0 on this clock; no jitter, so the figures below are exact.
    return Runner(config("at_least_once", poll_interval_seconds=60, schedule={"jitter_seconds": 0}), clock=lambda: 0.0)


def test_next_poll_waits_for_login_delay(runner: Runner, caplog: pytest.LogCaptureFixture) -> None:
    m = runner.config.mailboxes[0]
    with caplog.at_level(logging.INFO, logger="pop3kafka.runner"):
        assert runner.next_poll(m, result(m, login_delay=["900"]), 1000.0) == 1900.0
        # the next cycle fails to connect: no new login, so still 900 s after the last one
        failed = result(m, logged_in=False, error=Pop3ConnectError("reset"))
        assert runner.next_poll(m, failed, 1910.0) == 1920.0  # first backoff (10 s): already past 1900
        assert runner.next_poll(m, failed, 1200.0) == 1900.0  # an early failure still waits for 1900
        assert runner.next_poll(m, result(m, login_delay=["900"]), 2000.0) == 2900.0
    notes = [r for r in caplog.records if "LOGIN-DELAY" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO and "poll_interval_seconds=60" in notes[0].getMessage()


def test_next_poll_after_a_login_delay_refusal(runner: Runner) -> None:
    m = runner.config.mailboxes[0]
    refusal = Pop3LoginDelayError("[LOGIN-DELAY]")
    # delay known (announced before the login): a whole delay from now
    assert runner.next_poll(m, result(m, logged_in=False, error=refusal, login_delay=["600"]), 50.0) == 650.0
    # delay remembered from an earlier cycle, this session's CAPA said nothing new
    assert runner.next_poll(m, result(m, logged_in=False, error=refusal), 700.0) == 1300.0


def test_next_poll_after_a_refusal_without_known_delay(runner: Runner) -> None:
    m = runner.config.mailboxes[0]
    refusal = Pop3LoginDelayError("[LOGIN-DELAY]")
    assert runner.next_poll(m, result(m, logged_in=False, error=refusal), 50.0) == 110.0


def test_next_poll_short_or_withdrawn_delay(runner: Runner, caplog: pytest.LogCaptureFixture) -> None:
    m = runner.config.mailboxes[0]
    with caplog.at_level(logging.INFO, logger="pop3kafka.runner"):
        assert runner.next_poll(m, result(m, login_delay=["30"]), 0.0) == 60.0  # the interval is longer
        assert runner.next_poll(m, result(m, login_delay=["900"]), 100.0) == 1000.0
        assert runner.next_poll(m, result(m, expire=["5"]), 1000.0) == 1020.0  # no longer advertised: the plan
    assert not [r for r in caplog.records if "30 s" in r.getMessage()]


def test_next_poll_bounded_cycle_and_absurd_delay(runner: Runner) -> None:
    m = runner.config.mailboxes[0]
    again = result(m, login_delay=["900"])
    again.more_pending, again.published = True, 5
    assert runner.next_poll(m, again, 10.0) == 910.0  # progress, but the server allows no login before
    huge = result(m, login_delay=["999999999"])
    assert runner.next_poll(m, huge, 0.0) == MAX_LOGIN_DELAY_SECONDS


def run_loop(caps: dict[str, list[str]], logins: int) -> list[float]:
    """The real scheduling loop on a virtual clock that only moves while the loop idles;
    returns the clock at each login, stopping after ``logins`` of them."""
    now = [0.0]
    cfg = config("at_least_once", poll_interval_seconds=1)
    at: list[float] = []
    runner: Runner

    def idle(seconds: float) -> None:
        now[0] += seconds

    def factory(_m: MailboxConfig) -> PolicySession:
        at.append(now[0])
        if len(at) >= logins:
            runner.stop.set()
        return PolicySession(Maildrop(), caps)

    runner = Runner(cfg, session_factory=factory, clock=lambda: now[0], idle_wait=idle)
    runner.publisher = Publisher("mock:9092", MOCK, 5)
    runner.ctx.publisher = runner.publisher
    guard = threading.Timer(30, runner.stop.set)  # never hang the suite
    guard.start()
    try:
        runner.run()
    finally:
        guard.cancel()
        runner.close()
    assert len(at) == logins, at
    return at


def test_run_loop_spaces_logins_by_login_delay() -> None:
    paced = run_loop({"LOGIN-DELAY": ["900"]}, 4)
    gaps = [b - a for a, b in itertools.pairwise(paced)]
    # never before 900 s after the last login (the loop idles in steps of at most 1 s)
    assert all(900 - 1e-6 <= g <= 902 for g in gaps), paced  # float sums of the clock
    free = run_loop({}, 4)
    assert all(b - a <= 2 for a, b in itertools.pairwise(free)), free  # poll_interval_seconds: 1
