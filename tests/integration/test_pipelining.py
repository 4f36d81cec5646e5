"""PIPELINING (RFC 2449 §6.6) through a proxy that adds 20 ms each way: 100 RETRs cost a
handful of round trips, not 100. Real Dovecot over POP3S; the ratio is measured in one test
because the claim is about round trips, not about seconds."""

from __future__ import annotations

import time

import pytest
from support.mailgen import make_mail
from support.tcpproxy import TcpProxy

from connector.protocol import Pop3Session, make_tls_context

pytestmark = pytest.mark.integration

RTT = 0.040  # 20 ms each way


def fetch_all(port: int, cafile: str, window: int | None) -> tuple[float, int]:
    s = Pop3Session.connect("127.0.0.1", port, tls="implicit", ssl_context=make_tls_context(cafile), timeout=30)
    try:
        s.login_user_pass("t11", "t11-pw")
        nums = [n for n, _ in s.uidl()]
        assert s.pipelining
        t0 = time.monotonic()
        got = sum(1 for _, mail in s.retr_many(nums, window=window) if mail.read())
        elapsed = time.monotonic() - t0
        s.dele_many(nums[:0])
        return elapsed, got
    finally:
        s.abort()


def test_pipelined_retrieval_takes_a_handful_of_round_trips(services) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t11")
    for i in range(100):
        services.dovecot.put("t11", make_mail(i, seed=11)[0])
    proxy = TcpProxy(services.dovecot.pop3s_port)
    proxy.latency = RTT / 2
    try:
        pipelined, n1 = fetch_all(proxy.port, services.cafile, window=None)
        serial, n2 = fetch_all(proxy.port, services.cafile, window=1)
    finally:
        proxy.close()
        services.dovecot.clear("t11")
    assert n1 == n2 == 100
    assert serial >= 100 * RTT, "one RETR per round trip without pipelining"
    assert pipelined < 15 * RTT, f"pipelined: {pipelined / RTT:.1f} round trips for 100 RETRs"


def test_pipelined_dele_and_early_stop_keep_the_session_in_step(services) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t11")
    for i in range(40):
        services.dovecot.put("t11", make_mail(i, seed=12)[0])
    s = Pop3Session.connect(
        "127.0.0.1", services.dovecot.pop3s_port, tls="implicit", ssl_context=make_tls_context(services.cafile)
    )
    s.login_user_pass("t11", "t11-pw")
    nums = [n for n, _ in s.uidl()]
    it = s.retr_many(nums)
    taken = [next(it) for _ in range(5)]
    it.close()  # stop early with RETRs still in flight: they are drained
    assert [n for n, _ in taken] == nums[:5]
    s.dele_many(nums[:20])
    assert s.stat()[0] == 20  # RFC 1939 §5: STAT does not count messages marked as deleted
    s.quit()
    s2 = Pop3Session.connect(
        "127.0.0.1", services.dovecot.pop3s_port, tls="implicit", ssl_context=make_tls_context(services.cafile)
    )
    s2.login_user_pass("t11", "t11-pw")
    assert s2.stat()[0] == 20
    s2.abort()
    services.dovecot.clear("t11")


def test_pipelined_dele_takes_a_handful_of_round_trips_and_rset_undoes_it(services) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t11")
    for i in range(600):
        services.dovecot.put("t11", b"Subject: d%d\r\n\r\nx\r\n" % i)
    proxy = TcpProxy(services.dovecot.pop3s_port)
    proxy.latency = RTT / 2
    try:
        s = Pop3Session.connect("127.0.0.1", proxy.port, tls="implicit", ssl_context=make_tls_context(services.cafile))
        s.login_user_pass("t11", "t11-pw")
        nums = [n for n, _ in s.list()]
        t0 = time.monotonic()
        s.dele_many(nums)
        elapsed = time.monotonic() - t0
        assert s.stat()[0] == 0  # every one marked (RFC 1939 §5)
        s.abort()  # RSET + QUIT: nothing is removed
    finally:
        proxy.close()
    assert len(nums) == 600
    assert elapsed < 12 * RTT, f"pipelined: {elapsed / RTT:.1f} round trips for 600 DELEs"
    assert services.dovecot.count("t11") == 600
    services.dovecot.clear("t11")
