"""Metrics end to end (issue 8): a real `pop3-kafka run` process against Dovecot and the broker,
scraped by a real Prometheus (Debian package). /metrics is checked against what happened, and
Prometheus's HTTP API must return the same values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from localstack import free_port
from prometheus_client.parser import text_string_to_metric_families
from support.badmail import nested_mail
from support.configs import mailbox, write_config
from support.kafkautil import consume_all
from support.waits import http_get as get
from support.waits import wait_for
from test_end_to_end import put_mails, server_uidls

from connector.records.ledger import shard_of

pytestmark = pytest.mark.integration


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(all_: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return all_.get((name, tuple(sorted(labels.items()))), 0.0)


def start_prometheus(tmp_path: Path, target: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: pop3kafka\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={conf}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def prom_query(base: str, query: str) -> list[dict[str, object]]:
    code, body = get(f"{base}/api/v1/query?query={urllib.parse.quote(query)}")
    if code != 200:
        return []
    doc = json.loads(body)
    return list(doc["data"]["result"]) if doc.get("status") == "success" else []


def test_metrics_match_what_happened_and_prometheus_scrapes_them(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = put_mails(services, "t13", 3, seed=81)
    bad = nested_mail(1)
    services.dovecot.put("t13", bad)
    port = free_port()
    no_jitter = {"jitter_seconds": 0}
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox("good", "t13", services.dovecot.pop3s_port, services.cafile, poll_interval_seconds=3600,
                    schedule=no_jitter),
            mailbox("wrongpw", "t12", services.dovecot.pop3s_port, services.cafile, poll_interval_seconds=3600,
                    schedule=no_jitter),
        ],
        admin={"bind": f"127.0.0.1:{port}"},
        ledger={"topic": f"{topic}.ledger", "shards": 2},
    )  # fmt: skip
    env = {**os.environ, "PW_GOOD": "t13-pw", "PW_WRONGPW": "not-the-password"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector.cli.main", "--log-format", "json", "run", "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "connector.log", "w"),  # noqa: SIM115 - closed at exit
    )
    prom = None
    base = f"http://127.0.0.1:{port}"
    try:

        def cycles_done() -> bool:
            code, body = get(f"{base}/mailboxes")
            if code != 200:
                return False
            states = {m["id"]: m for m in json.loads(body)["mailboxes"]}
            return states["good"]["last_success"] is not None and states["wrongpw"]["last_error"] is not None

        wait_for("the first cycles", cycles_done, timeout=90)
        assert get(f"{base}/readyz")[0] == 200

        code, text = get(f"{base}/metrics")
        assert code == 200
        m = samples(text)
        assert sample(m, "pop3kafka_cycles_total", mailbox="good", outcome="ok") == 1
        assert sample(m, "pop3kafka_mails_fetched_total", mailbox="good") == 4
        assert sample(m, "pop3kafka_mails_published_total", mailbox="good") == 3
        assert sample(m, "pop3kafka_mails_dead_lettered_total", mailbox="good", reason="max_depth") == 1
        assert sample(m, "pop3kafka_mails_deleted_total", mailbox="good") == 4
        assert sample(m, "pop3kafka_mailbox_messages", mailbox="good") == 4  # listed before the deletes
        # Dovecot's LIST sizes are exact: RETR brought every listed octet, no more
        listed_bytes = sample(m, "pop3kafka_mailbox_bytes", mailbox="good")
        assert listed_bytes > len(bad) and sample(m, "pop3kafka_fetched_bytes_total", mailbox="good") == listed_bytes
        assert sample(m, "pop3kafka_login_failures_total", mailbox="wrongpw", reason="auth") == 1
        assert sample(m, "pop3kafka_cycles_total", mailbox="wrongpw", outcome="auth") == 1
        assert sample(m, "pop3kafka_last_success_timestamp_seconds", mailbox="good") > time.time() - 120
        assert sample(m, "pop3kafka_transactions_total", shard=_shard("good", 2), outcome="committed") >= 1
        assert sample(m, "pop3kafka_kafka_delivery_latency_seconds_count") >= 4  # 3 records + 1 dead letter, + ledger
        assert sample(m, "pop3kafka_shards_owned") >= 1
        cert = x509.load_pem_x509_certificate(Path(services.dovecot.dir / "tls" / "server.pem").read_bytes())
        server = f"127.0.0.1:{services.dovecot.pop3s_port}"
        assert sample(m, "pop3kafka_tls_certificate_expiry_timestamp_seconds", server=server) == (
            cert.not_valid_after_utc.timestamp()
        )
        assert any(k[0] == "pop3kafka_build_info" and v == 1 for k, v in m.items())
        # what the metrics say happened, happened
        assert len(consume_all(services.bootstrap, topic, expect=3, timeout=60)) == 3
        assert server_uidls(services, "t13") == []
        assert len(good) == 3

        # A real Prometheus scrapes the same values.
        prom, prom_base = start_prometheus(tmp_path, f"127.0.0.1:{port}")
        wait_for(
            "Prometheus to scrape the connector",
            lambda: any(r["value"][1] == "1" for r in prom_query(prom_base, 'up{job="pop3kafka"}')),  # type: ignore[index]
            timeout=60,
        )
        for query, expected in (
            ('pop3kafka_mails_published_total{mailbox="good"}', "3"),
            ('pop3kafka_mails_dead_lettered_total{mailbox="good",reason="max_depth"}', "1"),
            ('pop3kafka_mails_deleted_total{mailbox="good"}', "4"),
            ('pop3kafka_login_failures_total{mailbox="wrongpw",reason="auth"}', "1"),
            ("sum(pop3kafka_shards_owned)", str(int(sample(m, "pop3kafka_shards_owned")))),
        ):
            got = prom_query(prom_base, query)
            assert [r["value"][1] for r in got] == [expected], (query, got)  # type: ignore[index]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(timeout=30)
            except subprocess.TimeoutExpired:
                prom.kill()
    assert proc.returncode == 0, (tmp_path / "connector.log").read_text()[-3000:]


def _shard(mailbox_id: str, shards: int) -> str:
    return str(shard_of(mailbox_id, shards))
