"""The admin endpoint of `run` (issue 7): on-demand poll, pause/resume, GET /mailboxes, the
bearer token; against the real scheduling loop with scripted POP3 sessions and librdkafka's
mock cluster."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from support.fakepop import RefillingSession as Session

from connector.config import parse_config
from connector.config.model import AdminConfig, Config, Secret
from connector.delivery.kafka import Publisher
from connector.runtime.admin_server import AdminServer
from connector.runtime.runner import Runner

MOCK = {"test.mock.num.brokers": 1}
TOKEN = "s3cret-admin-token-0123456789"


def config() -> Config:
    boxes = [
        {
            "id": i,
            "host": "pop.test",
            "username": "u",
            "password": {"env": "PW"},
            "poll_interval_seconds": 3600,
            "schedule": {"jitter_seconds": 0},
        }
        for i in ("a", "b")
    ]
    return parse_config(
        {
            "kafka": {"bootstrap_servers": "mock:9092", "delivery_timeout_seconds": 5},
            "topics": {"mail": "mail"},
            "delivery": {"mode": "at_least_once"},
            "mailboxes": boxes,
        },
        environ={"PW": "pw"},
    )


@pytest.fixture
def running() -> Iterator[tuple[Runner, str]]:
    Session.slow = 0.0
    runner = Runner(config(), session_factory=lambda m: Session(m.id))
    runner.publisher = Publisher("mock:9092", MOCK, 5)
    runner.ctx.publisher = runner.publisher
    admin = AdminServer(runner, "127.0.0.1", 0, Secret(TOKEN, "test"))
    admin.start()
    loop = threading.Thread(target=runner.run, daemon=True)
    loop.start()
    host, port = admin.address
    base = f"http://{host}:{port}"
    deadline = time.monotonic() + 10
    while any(s.last_success_at is None for s in runner.scheduler.states.values()):
        assert time.monotonic() < deadline, "the first cycles did not run"
        time.sleep(0.05)
    try:
        yield runner, base
    finally:
        runner.stop.set()
        runner._wake.set()
        loop.join(15)
        admin.close()
        runner.close()


def call(base: str, method: str, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
    req = urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None)  # noqa: S310
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - http://127.0.0.1
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_list_poll_pause_resume(running: tuple[Runner, str]) -> None:
    runner, base = running
    status, body = call(base, "GET", "/mailboxes")
    assert status == 200 and [m["id"] for m in body["mailboxes"]] == ["a", "b"]
    a = body["mailboxes"][0]
    assert a["state"] == "idle" and a["last_success"] is not None and a["server"] == "pop.test:995"
    assert a["next_due"] > time.time() + 3000 and a["owner"] == runner.identity

    status, out = call(base, "POST", "/mailboxes/a/poll")
    assert status == 200 and out["ok"] and out["published"] == 2 and out["deleted"] == 2 and out["error"] is None

    assert call(base, "POST", "/mailboxes/b/pause") == (200, {"mailbox": "b", "state": "paused"})
    status, out = call(base, "POST", "/mailboxes/b/poll")
    assert status == 409 and "paused" in out["error"]
    assert call(base, "GET", "/mailboxes")[1]["mailboxes"][1]["state"] == "paused"
    before = runner.scheduler.states["b"].last_cycle_at
    assert call(base, "POST", "/mailboxes/b/resume")[0] == 200
    deadline = time.monotonic() + 10
    while runner.scheduler.states["b"].last_cycle_at == before:  # resumed: polled at once
        assert time.monotonic() < deadline
        time.sleep(0.05)

    assert call(base, "POST", "/mailboxes/nope/poll")[0] == 404
    assert call(base, "GET", "/nothing")[0] == 404


def test_poll_of_a_running_mailbox_answers_202(running: tuple[Runner, str]) -> None:
    _, base = running
    Session.slow = 1.5
    status, out = call(base, "POST", "/mailboxes/a/poll?wait=0.2")
    assert status == 202 and "not finished" in out["status"]
    status, out = call(base, "POST", "/mailboxes/a/poll")
    assert status == 202 and "already running" in out["status"]
    assert call(base, "GET", "/mailboxes")[1]["mailboxes"][0]["state"] == "running"
    assert call(base, "POST", "/mailboxes/a/poll?wait=x")[0] == 400


def test_the_token_is_required_and_never_echoed(running: tuple[Runner, str]) -> None:
    _, base = running
    for token in (None, "wrong-token-wrong-token"):
        status, body = call(base, "GET", "/mailboxes", token=token)
        assert status == 401 and TOKEN not in json.dumps(body)
    status, body = call(base, "GET", "/mailboxes")
    assert status == 200 and TOKEN not in json.dumps(body)


def test_admin_config() -> None:
    from connector.errors import ConfigError

    def parse(admin: dict[str, Any], env: dict[str, str] | None = None) -> Any:
        return parse_config(
            {
                "kafka": {"bootstrap_servers": "k:1"},
                "topics": {"mail": "m"},
                "admin": admin,
                "mailboxes": [{"id": "a", "host": "h", "username": "u", "password": {"env": "PW"}}],
            },
            environ={"PW": "x", **(env or {})},
        ).admin

    assert parse({}) == AdminConfig("127.0.0.1", 9108, None)
    with pytest.raises(ConfigError, match=r"reachable from other hosts; set admin\.token"):
        parse({"bind": "0.0.0.0:8080"})
    wide = parse({"bind": "0.0.0.0:8080", "token": {"env": "T"}}, {"T": TOKEN})
    assert (wide.host, wide.port) == ("0.0.0.0", 8080)  # noqa: S104
    got = parse({"bind": "[::1]:9000", "token": {"env": "T"}}, {"T": TOKEN})
    assert (got.host, got.port, got.token.reveal()) == ("::1", 9000, TOKEN)
    with pytest.raises(ConfigError, match=r"admin\.bind"):
        parse({"bind": "localhost"})
    with pytest.raises(ConfigError, match="at least 16"):
        parse({"token": {"env": "T"}}, {"T": "short"})


def test_probes_are_open_and_follow_the_loop(running: tuple[Runner, str]) -> None:
    """Kubernetes probes carry no token: /healthz and /readyz answer without it (and with a
    wrong one), while everything else still needs it."""
    runner, base = running
    status, body = call(base, "GET", "/healthz", token=None)
    assert status == 200 and body["ok"] and body["state"] == "running"
    status, body = call(base, "GET", "/readyz", token="wrong")
    assert (status, body) == (
        200,
        {"ok": True, "mode": "at_least_once", "ownership": "all", "owned_shards": [], "preparing_shards": []},
    )
    assert call(base, "GET", "/mailboxes", token=None)[0] == 401
    assert call(base, "POST", "/healthz")[0] == 405
    # A loop that stopped turning is not alive (the kubelet restarts the pod).
    runner.heartbeat = time.monotonic() - 500
    status, body = call(base, "GET", "/healthz")
    assert status == 503 and "has not turned for" in body["reason"]


def test_readiness_and_liveness_before_and_after_the_loop() -> None:
    runner = Runner(config(), session_factory=lambda m: Session(m.id))
    try:
        assert runner.liveness() == (True, {"state": "starting"})
        ok, why = runner.readiness()
        assert not ok and why["reason"] == "fencing in shards and loading their ledgers"
        runner._ready.set()
        runner._to_prepare.add(3)  # a shard assigned, not yet fenced in and loaded
        ok, why = runner.readiness()
        assert not ok and why["preparing_shards"] == [3] and "shard(s) [3]" in why["reason"]
        runner._to_prepare.clear()
        assert runner.readiness()[0] and runner.ready
        runner.fatal = True
        assert runner.liveness()[0] is False
        runner.stop.set()
        assert runner.readiness() == (
            False,
            {
                "mode": "at_least_once",
                "ownership": "all",
                "owned_shards": [],
                "preparing_shards": [],
                "reason": "shutting down",
            },
        )
    finally:
        runner.close()
