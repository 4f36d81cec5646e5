"""The admin endpoint of a real `pop3-kafka run` process against Dovecot and Kafka (issue 7):
`pop3-kafka admin list|poll|pause|resume` start a cycle now and control the schedule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from localstack import free_port
from support.cli import run_cli
from support.configs import mailbox, write_config
from support.kafkautil import consume_all
from support.mailgen import make_mail

pytestmark = pytest.mark.integration

TOKEN = "e2e-admin-token-abcdefghijkl"


def test_on_demand_poll_and_pause_through_a_running_process(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t20")
    port = free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    box = mailbox("ondemand", "t20", services.dovecot.pop3s_port, services.cafile, poll_interval_seconds=3600)
    box["schedule"] = {"jitter_seconds": 0}
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [box],
        admin={"bind": f"127.0.0.1:{port}", "token": {"file": str(tmp_path / "token")}},
        ledger={"topic": f"{topic}.ledger"},
    )
    env = {"PW_ONDEMAND": "t20-pw"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector.cli.main", "run", "--config", str(cfg)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The first (empty) cycle runs at start; then nothing is due for an hour.
        deadline = time.monotonic() + 60
        while True:
            listed = run_cli("admin", "list", "--config", str(cfg), env=env)
            if listed.returncode == 0 and json.loads(listed.stdout)["mailboxes"][0]["last_success"]:
                break
            assert time.monotonic() < deadline and proc.poll() is None, listed.stderr
            time.sleep(0.5)
        for i in range(3):
            services.dovecot.put("t20", make_mail(i, seed=91)[0])
        polled = run_cli("admin", "poll", "--config", str(cfg), "--mailbox", "ondemand", env=env)
        assert polled.returncode == 0, polled.stdout + polled.stderr
        out = json.loads(polled.stdout)
        assert out["ok"] and out["published"] == 3 and out["deleted"] == 3
        assert len(consume_all(services.bootstrap, topic, expect=3)) == 3
        assert services.dovecot.count("t20") == 0

        assert run_cli("admin", "pause", "--config", str(cfg), "--mailbox", "ondemand", env=env).returncode == 0
        services.dovecot.put("t20", make_mail(9, seed=91)[0])
        refused = run_cli("admin", "poll", "--config", str(cfg), "--mailbox", "ondemand", env=env)
        assert refused.returncode == 1 and "paused" in refused.stdout
        assert services.dovecot.count("t20") == 1
        assert run_cli("admin", "resume", "--config", str(cfg), "--mailbox", "ondemand", env=env).returncode == 0
        deadline = time.monotonic() + 30
        while services.dovecot.count("t20"):  # resumed: polled at once
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # A wrong token is refused by the running process.
        (tmp_path / "bad.yaml").write_text(
            (tmp_path / "c.yaml").read_text().replace(str(tmp_path / "token"), str(tmp_path / "bad"))
        )
        (tmp_path / "bad").write_text("not-the-token-at-all-xx")
        denied = run_cli("admin", "list", "--config", str(tmp_path / "bad.yaml"), env=env)
        assert denied.returncode == 1 and "bearer token" in denied.stdout and TOKEN not in denied.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert TOKEN not in err
