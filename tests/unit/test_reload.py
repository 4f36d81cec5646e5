"""Configuration reload without a restart (issue 7): SIGHUP or a changed file; the mailbox list
and mailbox settings change live, Kafka-side settings are refused with a message."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.fakepop import RefillingSession as Session

from connector.config import load_config
from connector.delivery.kafka import Publisher
from connector.runtime.runner import Runner

MOCK = {"test.mock.num.brokers": 1}


def doc(ids: list[str], **kafka: Any) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": "mock:9092", "delivery_timeout_seconds": 5, **kafka},
        "topics": {"mail": "mail"},
        "delivery": {"mode": "at_least_once"},
        "mailboxes": [
            {
                "id": i,
                "host": "pop.test",
                "username": "u",
                "password": {"env": "PW"},
                "poll_interval_seconds": 1,
                "schedule": {"jitter_seconds": 0},
            }
            for i in ids
        ],
    }


def test_sighup_style_reload_adds_and_removes_mailboxes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PW", "pw")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc(["a", "b"])))
    polled: list[str] = []
    lock = threading.Lock()

    def factory(m: Any) -> Session:
        with lock:
            polled.append(m.id)
        return Session(m.id)

    Session.slow = 0.0
    runner = Runner(load_config(path), session_factory=factory)
    runner.publisher = Publisher("mock:9092", MOCK, 5)
    runner.ctx.publisher = runner.publisher
    loop = threading.Thread(target=runner.run, daemon=True)
    loop.start()

    def wait_for(cond: Any, what: str) -> None:
        deadline = time.monotonic() + 15
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    try:
        wait_for(lambda: {"a", "b"} <= set(polled), "a and b polled")
        with caplog.at_level(logging.INFO, logger="pop3kafka.runner"):
            path.write_text(yaml.safe_dump(doc(["a", "c"])))
            runner.request_reload()
            wait_for(lambda: "c" in polled, "c polled after the reload")
        assert "configuration reloaded: 1 mailbox(es) added, 1 removed, 0 changed" in caplog.text
        with lock:
            mark = len(polled)
        time.sleep(2.5)  # a few intervals: b is not polled again, a and c are
        with lock:
            later = polled[mark:]
        assert "b" not in later and {"a", "c"} <= set(later)
        assert [m["id"] for m in runner.status()] == ["a", "c"]

        # A broken file and a Kafka-side change are refused; the process goes on as it was.
        with caplog.at_level(logging.ERROR, logger="pop3kafka.runner"):
            path.write_text("kafka: [")
            runner.request_reload()
            wait_for(lambda: "not valid YAML" in caplog.text, "broken file reported")
            path.write_text(yaml.safe_dump(doc(["a", "c"], bootstrap_servers="elsewhere:9092")))
            runner.request_reload()
            wait_for(lambda: "kafka changed: these need a restart" in caplog.text, "restart-only change refused")
        assert [m.id for m in runner.config.mailboxes] == ["a", "c"]
        assert runner.config.kafka.bootstrap_servers == "mock:9092"
    finally:
        runner.stop.set()
        loop.join(15)
        runner.close()
