"""The connector against a second real POP3 server: GNU Mailutils pop3d (deploy/local/mailutils.py).

What this peer does differently from Dovecot, and what each test pins down:

* no SASL (CAPA has no ``SASL`` line): the default login choice must fall back to USER/PASS;
  APOP works from a popauth database;
* login names are ``NAME@test.example``;
* UIDLs are ``<md5 hex>.<uidvalidity>.<uid>``, kept in an ``X-UIDL:`` header that pop3d adds to
  the message: in the first session RETR returns exactly that header line more than LIST said;
* a second session is refused with ``[IN-USE]`` at once (Dovecot: after ~10 s);
* its own error texts (``[AUTH] Bad login``, ``Message has been deleted``).

Each test owns one user (g1..g8), so tests never see each other's mail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mailutils import GnuPop3d
from support.configs import mailbox as mailbox_entry
from support.configs import write_config
from support.kafkautil import consume_all
from support.mailgen import make_mail, norm_text

from connector.config import parse_config
from connector.config.model import MailboxConfig
from connector.delivery.kafka import Publisher
from connector.errors import Pop3AuthError, Pop3CommandError, Pop3LoginDelayError, Pop3MailboxBusyError
from connector.protocol import Pop3Session, TlsMode, make_tls_context
from connector.runtime.cycle import CycleContext, run_cycle
from connector.runtime.login import login
from connector.runtime.runner import Runner
from connector.runtime.sessions import open_session

pytestmark = pytest.mark.integration

UIDL_SHAPE = re.compile(r"^([0-9a-f]{32})\.(\d+)\.(\d+)$")


@pytest.fixture(scope="module")
def gnu() -> Iterator[GnuPop3d]:
    # Not under pytest's tmp dir (mode 0700): pop3d sessions run as the mail user.
    state = Path(tempfile.mkdtemp(prefix="pop3k-test-gnu-"))
    state.chmod(0o755)
    server = GnuPop3d(state)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)


def mailbox(
    gnu: GnuPop3d, user: str, tls: str = "implicit", *, password: str | None = None, **extra: Any
) -> MailboxConfig:
    m = {
        "id": "gnu",
        "host": "127.0.0.1",
        "port": gnu.pop3s_port if tls == "implicit" else gnu.pop3_port,
        "tls": tls,
        "tls_ca_file": str(gnu.cafile),
        "username": gnu.login_name(user),
        "password": {"env": "PW_GNU"},
        "timeout_seconds": 10,
        **extra,
    }
    cfg = parse_config(
        {"kafka": {"bootstrap_servers": "x:1"}, "topics": {"mail": "m"}, "mailboxes": [m]},
        environ={**os.environ, "PW_GNU": password or gnu.users[user]},
    )
    return cfg.mailboxes[0]


def log_in(mb: MailboxConfig) -> tuple[str, Pop3Session]:
    """Connect and log in the way the runtime does; the caller ends the session."""
    session = open_session(mb)
    assert isinstance(session, Pop3Session)
    try:
        used = login(session, mb)
    except BaseException:
        session.abort()
        raise
    return used, session


def connect(gnu: GnuPop3d, user: str, tls: TlsMode = "implicit") -> Pop3Session:
    """A USER/PASS session straight on the protocol layer."""
    port = gnu.pop3s_port if tls == "implicit" else gnu.pop3_port
    s = Pop3Session.connect(
        "127.0.0.1",
        port,
        tls=tls,
        ssl_context=make_tls_context(str(gnu.cafile)),
        timeout=10,
    )
    s.login_user_pass(gnu.login_name(user), gnu.users[user])
    return s


def crlf(raw: bytes) -> bytes:
    """What the server serves for a mail put as LF (sizes and bytes are in CRLF)."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def message_id(raw: bytes) -> str:
    m = re.search(rb"^Message-ID: (<[^>]+>)\r?$", raw, re.M | re.I)
    assert m, raw[:300]
    return m.group(1).decode()


# --------------------------------------------------------------------------- logins


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_user_pass_login(gnu: GnuPop3d, tls: str) -> None:
    used, s = log_in(mailbox(gnu, "g1", tls, auth_mechanisms=["USER"]))
    try:
        assert used == "USER"
        assert s.is_tls
        assert s.stat() == (0, 0)  # TRANSACTION state: the login really happened
        assert s.capabilities()["IMPLEMENTATION"][:2] == ["GNU", "Mailutils"]
    finally:
        s.quit()


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_default_choice_falls_back_to_user_without_sasl(gnu: GnuPop3d, tls: str) -> None:
    mb = mailbox(gnu, "g1", tls)
    assert mb.auth_mechanisms is None  # the connector's own default choice
    session = open_session(mb)
    assert isinstance(session, Pop3Session)
    try:
        caps = session.capabilities()
        assert "SASL" not in caps and "USER" in caps, caps
        assert session.is_tls and "STLS" not in caps  # after STLS the capabilities are re-read
    finally:
        session.abort()
    used, s = log_in(mb)
    try:
        assert used == "USER"
        s.stat()
    finally:
        s.quit()


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_apop_login_from_the_popauth_database(gnu: GnuPop3d, tls: str) -> None:
    used, s = log_in(mailbox(gnu, "g1", tls, auth_mechanisms=["APOP"]))
    try:
        assert used == "APOP"
        assert s.greeting is not None and re.search(r"<\d+\.\d+@[^>]+>", s.greeting.text)
        s.stat()
    finally:
        s.quit()


@pytest.mark.parametrize("mech", ["USER", "APOP"])
def test_wrong_password_is_an_auth_error(gnu: GnuPop3d, mech: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(Pop3AuthError, match=r"\[AUTH\]") as e:
        log_in(mailbox(gnu, "g1", auth_mechanisms=[mech], password="not-the-password"))
    assert "not-the-password" not in str(e.value)
    assert time.monotonic() - t0 < 5  # pop3d has no auth penalty worth waiting for


def test_bare_user_name_is_refused(gnu: GnuPop3d) -> None:
    mb = mailbox(gnu, "g1", auth_mechanisms=["USER"])
    session = open_session(mb)
    try:
        with pytest.raises(Pop3AuthError, match="Bad login"):
            session.login_user_pass("g1", gnu.users["g1"])  # virtdomain wants g1@test.example
    finally:
        session.abort()


# --------------------------------------------------------------------------- mailbox behaviour


def test_uidl_shape_and_the_added_x_uidl_header(gnu: GnuPop3d) -> None:
    gnu.clear("g2")
    originals = {}
    for i in range(3):
        raw, exp = make_mail(i, seed=71)
        gnu.put("g2", raw)
        originals[exp.message_id] = crlf(raw)

    s = connect(gnu, "g2")
    sizes = dict(s.list())
    uidls = dict(s.uidl())
    assert sorted(sizes) == sorted(uidls) == [1, 2, 3]
    shapes = {n: UIDL_SHAPE.match(u) for n, u in uidls.items()}
    assert all(shapes.values()), uidls
    assert len({m.group(2) for m in shapes.values() if m}) == 1  # one uidvalidity for the mailbox
    assert sorted(int(m.group(3)) for m in shapes.values() if m) == [1, 2, 3]  # uid = arrival order

    first: dict[int, bytes] = {}
    for n in sorted(sizes):
        got = s.retr(n)
        first[n] = got
        want = originals[message_id(got)]
        x_uidl = b"X-UIDL: " + uidls[n].encode() + b"\r\n"
        assert sizes[n] == len(want)  # LIST: the stored mail, in CRLF
        assert len(got) == sizes[n] + len(x_uidl)  # RETR: exactly one header line more
        head, body = want.split(b"\r\n\r\n", 1)
        assert got == head + b"\r\n" + x_uidl + b"\r\n" + body  # appended to the header section
    s.quit()  # no DELE: pop3d now rewrites the files with the header stored

    s = connect(gnu, "g2")
    try:
        assert dict(s.uidl()) == uidls  # stable across sessions
        sizes2 = dict(s.list())
        for n in sorted(sizes2):
            again = s.retr(n)
            assert again == first[n]
            assert sizes2[n] == len(again)  # from the second session on, LIST agrees with RETR
    finally:
        s.quit()
    assert gnu.count("g2") == 3


def test_dele_then_quit_removes_and_error_texts(gnu: GnuPop3d) -> None:
    gnu.clear("g3")
    raws = [make_mail(i, seed=72)[0] for i in range(2)]
    for raw in raws:
        gnu.put("g3", raw)
    s = connect(gnu, "g3", tls="starttls")
    keep_uidl = dict(s.uidl())[2]
    s.dele(1)
    with pytest.raises(Pop3CommandError, match="Message has been deleted"):
        s.retr(1)
    with pytest.raises(Pop3CommandError, match="No such message"):
        s.retr(9)
    s.dele(1)  # GNU pop3d answers +OK to a second DELE of the same message (Dovecot: -ERR)
    assert s.stat()[0] == 1
    s.quit()

    assert gnu.count("g3") == 1
    s = connect(gnu, "g3")
    try:
        assert [u for _, u in s.uidl()] == [keep_uidl]
        got = s.retr(1)
        assert message_id(got) == message_id(raws[1])
    finally:
        s.quit()

    # without QUIT nothing is removed
    s = connect(gnu, "g3")
    s.dele(1)
    s.close()
    assert gnu.count("g3") == 1


def test_second_session_gets_in_use_at_once(gnu: GnuPop3d) -> None:
    gnu.clear("g4")
    gnu.put("g4", make_mail(0, seed=73)[0])
    holder = connect(gnu, "g4")
    try:
        holder.stat()
        t0 = time.monotonic()
        with pytest.raises(Pop3MailboxBusyError, match=r"\[IN-USE\]"):
            log_in(mailbox(gnu, "g4"))
        assert time.monotonic() - t0 < 2.0
    finally:
        holder.quit()
    used, s = log_in(mailbox(gnu, "g4"))  # the lock is gone with the first session
    try:
        assert used == "USER" and s.stat()[0] == 1
    finally:
        s.quit()


# --------------------------------------------------------------------------- the connector itself


def test_poll_once_end_to_end(gnu: GnuPop3d, services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    expected = {}
    lf: dict[str, bytes] = {}
    for user, seed in (("g5", 74), ("g6", 75)):
        gnu.clear(user)
        for i in range(8):  # every mailgen shape
            raw, exp = make_mail(i, seed=seed)
            raw = raw.replace(b"\r\n", b"\n")  # GNU pop3d needs LF maildir files
            gnu.put(user, raw)
            expected[exp.message_id] = (user, exp)
            lf[exp.message_id] = raw
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox_entry("gnu-s", gnu.login_name("g5"), gnu.pop3s_port, str(gnu.cafile)),
            mailbox_entry("gnu-t", gnu.login_name("g6"), gnu.pop3_port, str(gnu.cafile), tls="starttls"),
        ],
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "connector.cli.main", "--log-format", "json", "poll-once", "--config", str(cfg)],
        env={**os.environ, "PW_GNU_S": "g5-pw", "PW_GNU_T": "g6-pw"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gnu-s: ok: 8 published, 8 deleted of 8 listed" in proc.stdout, proc.stdout
    assert "gnu-t: ok: 8 published, 8 deleted of 8 listed" in proc.stdout, proc.stdout
    assert elapsed < 30, f"poll-once took {elapsed:.1f}s"

    got = consume_all(services.bootstrap, topic, expect=16, settle=1.0)
    by_mid = {c.record["message_id"]: c for c in got}
    assert len(got) == 16 and set(by_mid) == set(expected)
    for mid, (user, exp) in expected.items():
        c = by_mid[mid]
        r = c.record
        mid_box = "gnu-s" if user == "g5" else "gnu-t"
        uidl = r["provenance"]["uidl"]
        assert c.key == mid_box.encode()
        assert UIDL_SHAPE.match(uidl), uidl
        assert r["record_id"] == f"{mid_box}:{uidl}"
        # the record holds what RETR returned: the mail plus pop3d's X-UIDL line
        assert r["provenance"]["raw_size"] == len(crlf(lf[mid])) + len(f"X-UIDL: {uidl}\r\n")
        assert r["subject"] == exp.subject
        assert norm_text(r["text_body"]) == norm_text(exp.text_body), exp.shape
        assert [(a["sha256"]) for a in r["attachments"]] == [a.sha256 for a in exp.attachments]
    assert gnu.count("g5") == gnu.count("g6") == 0
    for user in ("g5", "g6"):
        s = connect(gnu, user)
        try:
            assert s.stat() == (0, 0)
        finally:
            s.quit()


# --------------------------------------------------------------------------- delayed ACKs


# GNU pop3d writes a body and its final "." separately; with Nagle on its side and delayed
# ACKs on ours every response stalled ~40 ms until the transport re-armed TCP_QUICKACK after
# each read (connector/protocol/transport.py). This guards that fix.
def test_sequential_retr_is_not_slowed_by_delayed_acks(gnu: GnuPop3d) -> None:
    gnu.clear("g7")
    for i in range(20):
        gnu.put("g7", make_mail(i, seed=76)[0])
    s = connect(gnu, "g7")
    try:
        sizes = dict(s.list())
        t0 = time.monotonic()
        for n in sorted(sizes):
            s.retr(n)
        per_retr = (time.monotonic() - t0) / len(sizes)
    finally:
        s.quit()
    assert per_retr < 0.010, f"{per_retr * 1000:.1f} ms per RETR"


# --------------------------------------------------------------------------- RFC 2449 EXPIRE and LOGIN-DELAY

EXPIRE_DAYS = 0  # pop3d `expire 0`: retrieved mail is deleted when the session ends
LOGIN_DELAY = 120  # pop3d `login-delay 120`: a second login within 120 s gets [LOGIN-DELAY]


@pytest.fixture(scope="module")
def gnu_policy() -> Iterator[GnuPop3d]:
    """A second pop3d with an EXPIRE and a LOGIN-DELAY policy; each test logs in as its own
    user, since a user's second login within LOGIN_DELAY seconds is refused."""
    state = Path(tempfile.mkdtemp(prefix="pop3k-test-gnu-policy-"))
    state.chmod(0o755)
    server = GnuPop3d(state, expire=EXPIRE_DAYS, login_delay=LOGIN_DELAY)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)


def test_capa_policy_in_the_mailutils_form(gnu_policy: GnuPop3d) -> None:
    # GNU Mailutils 3.15 prints EXPIRE without the space ("EXPIRE0") and LOGIN-DELAY as the bare
    # number ("120"); the parser reads both forms and says so in its notes.
    s = Pop3Session.connect(
        "127.0.0.1", gnu_policy.pop3s_port, tls="implicit", ssl_context=make_tls_context(str(gnu_policy.cafile))
    )
    try:
        caps = s.capabilities()
        assert f"EXPIRE{EXPIRE_DAYS}" in caps and str(LOGIN_DELAY) in caps, caps
        before = s.server_policy()
        assert (before.expire_days, before.login_delay_seconds, before.per_user) == (EXPIRE_DAYS, LOGIN_DELAY, False)
        assert len(before.notes) == 2
        s.login_user_pass(gnu_policy.login_name("g1"), gnu_policy.users["g1"])
        assert s.server_policy() == before  # no USER suffix: the values before login stand
        after = s.capabilities()  # and the CAPA after login says the same
        assert after["IMPLEMENTATION"][:2] == ["GNU", "Mailutils"] and f"EXPIRE{EXPIRE_DAYS}" in after, after
    finally:
        s.quit()


def test_expire_and_login_delay_reach_the_cycle_result_and_the_scheduler(gnu_policy: GnuPop3d) -> None:
    gnu_policy.clear("g2")
    for i in range(2):
        gnu_policy.put("g2", make_mail(i, seed=81)[0])
    m = {
        "id": "gnu-policy",
        "host": "127.0.0.1",
        "port": gnu_policy.pop3s_port,
        "tls": "implicit",
        "tls_ca_file": str(gnu_policy.cafile),
        "username": gnu_policy.login_name("g2"),
        "password": {"env": "PW_GNU"},
        "poll_interval_seconds": 60,
    }
    cfg = parse_config(
        {
            "kafka": {"bootstrap_servers": "mock:9092"},
            "topics": {"mail": "m"},
            "delivery": {"mode": "at_least_once"},
            "mailboxes": [m],
        },
        environ={"PW_GNU": gnu_policy.users["g2"]},
    )
    mb = cfg.mailboxes[0]
    publisher = Publisher("mock:9092", {"test.mock.num.brokers": 1}, 5)
    try:
        ctx = CycleContext(config=cfg, publisher=publisher)
        first = run_cycle(ctx, mb)
        second = run_cycle(ctx, mb)  # at once: within the server's LOGIN-DELAY
    finally:
        publisher.close(timeout=5)
    assert first.ok, first.error
    assert (first.published, first.deleted, first.logged_in) == (2, 2, True)
    assert (first.expire_days, first.login_delay_seconds) == (EXPIRE_DAYS, LOGIN_DELAY)

    # RFC 2449 §8.1.2: the server refuses the early login with [LOGIN-DELAY]
    assert isinstance(second.error, Pop3LoginDelayError) and "[LOGIN-DELAY]" in str(second.error)
    assert not second.logged_in and second.login_delay_seconds == LOGIN_DELAY  # as announced before login

    runner = Runner(cfg, clock=lambda: 0.0)  # plans start at 0 on this clock, like the times below
    try:
        assert runner.next_poll(mb, first, 1000.0) == 1000.0 + LOGIN_DELAY  # not after poll_interval (60)
        assert runner.next_poll(mb, second, 1001.0) == 1001.0 + LOGIN_DELAY  # a whole delay from the refusal
    finally:
        runner.close()


def test_keep_mode_warns_that_expire_0_deletes_retrieved_mail(  # type: ignore[no-untyped-def]
    gnu_policy: GnuPop3d, services, topic: str, tmp_path: Path
) -> None:
    gnu_policy.clear("g3")
    for i in range(2):
        gnu_policy.put("g3", make_mail(i, seed=82)[0])
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox_entry(
                "gnu-keep", gnu_policy.login_name("g3"), gnu_policy.pop3s_port, str(gnu_policy.cafile), delete=False
            )
        ],
        ledger={"topic": f"{topic}.ledger", "shards": 1},
    )
    proc = subprocess.run(
        [sys.executable, "-m", "connector.cli.main", "--log-format", "json", "poll-once", "--config", str(cfg)],
        env={**os.environ, "PW_GNU_KEEP": gnu_policy.users["g3"]},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gnu-keep: ok: 2 published, 0 deleted of 2 listed" in proc.stdout, proc.stdout
    logs = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    warned = [r for r in logs if r["level"] == "warning" and "EXPIRE 0" in r["msg"]]
    assert len(warned) == 1 and warned[0]["mailbox"] == "gnu-keep", proc.stderr
    assert "keep mode (delete: false) cannot keep it" in warned[0]["msg"]
    done = [r["msg"] for r in logs if r["msg"].startswith("cycle done")]
    assert done and done[0].endswith(f"server: EXPIRE={EXPIRE_DAYS} LOGIN-DELAY={LOGIN_DELAY}s"), done
    # and that is what happened: keep mode sent no DELE, the server removed the retrieved mail itself
    assert gnu_policy.count("g3") == 0
    assert len(consume_all(services.bootstrap, topic, expect=2)) == 2
