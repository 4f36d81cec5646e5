"""/readyz and /healthz of `run` with group ownership, on the real broker and Dovecot.

Ready means: every shard this replica owns is fenced in and its ledger loaded, and also when
it owns none (a replica without shards must not stall a rollout). The shard load is held at
a gate here so that the not-ready window is observed for certain rather than raced.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from support.configs import mailbox, write_config
from support.kafkautil import consume_all
from support.mailgen import make_mail
from support.waits import http_get, wait_for

from connector.cli.main import _ensure_topics  # what `run` does before the runner starts
from connector.config import load_config
from connector.config.model import Config
from connector.runtime import runner as runner_mod
from connector.runtime.admin_server import AdminServer
from connector.runtime.runner import Runner

pytestmark = pytest.mark.integration


def get(base: str, path: str) -> tuple[int, dict[str, Any]]:
    code, body = http_get(base + path)
    return code, json.loads(body)


@contextmanager
def replica(config: Config, instance: str) -> Iterator[tuple[Runner, str]]:
    config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, instance_id=instance))
    runner = Runner(config)
    admin = AdminServer(runner, "127.0.0.1", 0, None)
    admin.start()
    thread = threading.Thread(target=runner.run, name=f"replica-{instance}", daemon=True)
    thread.start()
    host, port = admin.address
    try:
        yield runner, f"http://{host}:{port}"
    finally:
        runner.stop.set()
        runner._wake.set()
        thread.join(timeout=60)
        admin.close()
        runner.close()
        assert not thread.is_alive()


def test_readyz_is_503_until_the_owned_shard_is_loaded_and_200_without_shards(
    services, topic: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    services.dovecot.clear("t18")
    monkeypatch.setenv("PW_READY", "t18-pw")
    cfg_path = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("ready", "t18", services.dovecot.pop3s_port, services.cafile)],
        ledger={"topic": f"{topic}.ledger", "shards": 1},
        runtime={"ownership": "group", "group_session_timeout_seconds": 6, "shutdown_grace_seconds": 5},
    )
    config = load_config(cfg_path)
    _ensure_topics(config)
    # The gate: the replica's shard load waits here until the test has seen it not ready.
    gate = threading.Event()
    loading = threading.Event()
    real_load = runner_mod.load_shard_ledger

    def gated_load(*args: Any, **kwargs: Any) -> Any:
        loading.set()
        assert gate.wait(60), "the test never opened the gate"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "load_shard_ledger", gated_load)

    with replica(config, "ready-a") as (a, base_a):
        code, body = get(base_a, "/healthz")
        assert code == 200 and body["ok"], body
        wait_for("the shard to be assigned and its load to start", loading.is_set)
        # The load runs off the loop thread: the loop keeps turning (and would keep polling the
        # shards it has) while a long ledger is read.
        time.sleep(2.5)
        assert a.heartbeat is not None and time.monotonic() - a.heartbeat < 1.5
        code, body = get(base_a, "/readyz")
        assert code == 503 and body["ok"] is False, body
        assert body["preparing_shards"] == [0] and body["owned_shards"] == []
        assert "loading shard(s) [0]" in body["reason"]
        gate.set()
        wait_for("/readyz 200", lambda: get(base_a, "/readyz")[0] == 200)
        code, body = get(base_a, "/readyz")
        assert body == {
            "ok": True,
            "mode": "exactly_once",
            "ownership": "group",
            "owned_shards": [0],
            "preparing_shards": [],
        }
        # Ready means polling: mail put now is published.
        services.dovecot.put("t18", make_mail(0, seed=93)[0])
        assert len(consume_all(services.bootstrap, topic, expect=1, timeout=60, settle=0)) == 1

        # A second replica gets no shard (one partition, sticky assignment): ready all the same.
        with replica(config, "ready-b") as (b, base_b):
            wait_for("replica b to join", lambda: b.membership is not None and b.membership.settled.is_set())
            wait_for("/readyz of b 200", lambda: get(base_b, "/readyz")[0] == 200)
            code, body = get(base_b, "/readyz")
            assert body["owned_shards"] == [] and body["ok"] is True
            assert get(base_a, "/readyz")[1]["owned_shards"] == [0]
            assert get(base_b, "/healthz")[0] == 200
        # Stopping: no longer ready (the pod leaves the Service before it goes).
        a.stop.set()
        code, body = get(base_a, "/readyz")
        assert code == 503 and body["reason"] == "shutting down"
