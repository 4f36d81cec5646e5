"""A slow or hanging POP3 server never delays the other mailboxes beyond its own limits, on
the real broker with the real Dovecot (issue 7).

* same shard round: a hung server costs the round its inactivity timeout; a trickling server
  (never idle long enough for that timeout) is dropped at the round's time limit (0.8 x
  delivery.transaction_timeout_seconds), and the Dovecot mailbox of the round commits and
  is deleted, instead of the broker aborting the transaction (which fences the shard's
  producer: the shard would stop);
* other shards: `run` keeps polling them on schedule while a hung server holds its shard.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support.configs import mailbox, write_config
from support.kafkautil import consume_all
from support.mailgen import make_mail
from support.slowpop import SlowPop3
from test_end_to_end import put_mails, server_uidls

from connector.cli.main import _ensure_topics  # what `run`/`poll-once` do before the runner starts
from connector.config import load_config
from connector.errors import Pop3TimeoutError
from connector.records.ledger import shard_of
from connector.runtime.cycle import CycleHooks
from connector.runtime.runner import Runner

pytestmark = pytest.mark.integration


#: Fits a 10 s transaction (max_seconds_per_cycle + max_decode_seconds <= 3/4 of it).
FAST: dict[str, Any] = {"timeout_seconds": 2, "max_seconds_per_cycle": 2, "decode_limits": {"max_decode_seconds": 5}}


def bad_mailbox(server: SlowPop3, mid: str, **extra: Any) -> dict[str, Any]:
    return server.mailbox(mid, username="x", password={"env": "PW_BAD"}, **extra)


def test_one_round_with_a_hung_and_a_trickling_server(
    services, topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = put_mails(services, "t15", 3, seed=71)
    monkeypatch.setenv("PW_GOOD", "t15-pw")
    monkeypatch.setenv("PW_BAD", "whatever")
    with SlowPop3("silent") as hung, SlowPop3("trickle", interval=0.5) as trickle:
        cfg = write_config(
            tmp_path / "c.yaml",
            services.bootstrap,
            topic,
            [
                mailbox("good", "t15", services.dovecot.pop3s_port, services.cafile, env="PW_GOOD", **FAST),
                bad_mailbox(hung, "hung", **FAST),
                bad_mailbox(trickle, "trickle", **FAST),
            ],
            ledger={"topic": f"{topic}.ledger", "shards": 1},
            delivery={"transaction_timeout_seconds": 10},  # the round's POP3 limit: 8 s
        )
        config = load_config(cfg)
        _ensure_topics(config)
        runner = Runner(config)
        try:
            t0 = time.monotonic()
            good, hung_r, trickle_r = runner.poll_once()
            took = time.monotonic() - t0
        finally:
            runner.close()
        assert trickle.accepted == 1 and hung.accepted == 1
    assert good.ok and (good.published, good.deleted) == (3, 3), good.error
    assert isinstance(hung_r.error, Pop3TimeoutError) and "did not answer in time" in str(hung_r.error)
    assert isinstance(trickle_r.error, Pop3TimeoutError)
    assert "the shard round's time limit" in str(trickle_r.error)
    # One round: the trickle's 8 s limit, not the broker's abort at 10 s. Measured without the
    # limit (ROUND_FETCH_SHARE 3.0): the broker aborts the transaction and bumps the producer
    # epoch, the commit fails as fenced, the good mailbox's records are lost with it and the
    # shard stops for good.
    assert 7.5 <= took < 10.0, took
    got = consume_all(services.bootstrap, topic, expect=3, timeout=60)
    assert sorted(c.record["message_id"] for c in got) == sorted(expected)
    assert server_uidls(services, "t15") == []


def ids_in_distinct_shards(shards: int) -> tuple[str, str]:
    """A mailbox id for the hung server and one for Dovecot that land in different shards."""
    hung = "hung"
    for i in range(100):
        other = f"good-{i}"
        if shard_of(other, shards) != shard_of(hung, shards):
            return hung, other
    raise AssertionError("no id in another shard")  # pragma: no cover - 2 shards, 100 tries


def test_run_keeps_other_shards_on_schedule_while_a_server_hangs(
    services, topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    services.dovecot.clear("t17")
    monkeypatch.setenv("PW_GOOD", "t17-pw")
    monkeypatch.setenv("PW_BAD", "whatever")
    hung_id, good_id = ids_in_distinct_shards(2)
    published: list[tuple[float, str]] = []
    with SlowPop3("silent") as hung:
        cfg = write_config(
            tmp_path / "c.yaml",
            services.bootstrap,
            topic,
            [
                mailbox(good_id, "t17", services.dovecot.pop3s_port, services.cafile, env="PW_GOOD"),
                # Hangs for 30 s per attempt: far longer than the good mailbox's 1 s interval.
                bad_mailbox(hung, hung_id, timeout_seconds=30, poll_interval_seconds=1),
            ],
            ledger={"topic": f"{topic}.ledger", "shards": 2},
            runtime={"shutdown_grace_seconds": 5},
        )
        hooks = CycleHooks(on_published=lambda uidl: published.append((time.monotonic(), uidl)))
        config = load_config(cfg)
        _ensure_topics(config)
        runner = Runner(config, hooks=hooks)
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while hung.accepted == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert hung.accepted == 1, "the hung mailbox was polled"
            # While the hung session holds its shard (30 s), mail for the other shard arrives
            # and is published within a few seconds each time.
            lags = []
            for k in range(3):
                put = time.monotonic()
                put_mails_keep(services, "t17", seed=80 + k)
                while len(published) < k + 1 and time.monotonic() < put + 20:
                    time.sleep(0.05)
                assert len(published) == k + 1, f"mail {k} not published while the other shard hangs"
                lags.append(published[k][0] - put)
            assert hung.accepted == 1, "still the first hung session (its 30 s timeout not reached)"
            assert max(lags) < 8.0, lags
        finally:
            runner.stop.set()
            hung.close()  # ends the hung session, which holds its shard worker
            thread.join(timeout=60)
            runner.close()
    assert not thread.is_alive()
    got = consume_all(services.bootstrap, topic, expect=3, timeout=60)
    assert len(got) == 3


def put_mails_keep(services, user: str, seed: int) -> None:  # type: ignore[no-untyped-def]
    """One more mail in ``user``'s mailbox, without clearing it."""
    raw, _ = make_mail(0, seed=seed)
    services.dovecot.put(user, raw)
