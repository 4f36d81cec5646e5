"""The alert rules, the compose stack's Prometheus configuration and the Grafana dashboard's
queries, checked by the real promtool (Debian package `prometheus`, installed by `make deps`):
`check rules`, the unit tests of every alert (`test rules` on deploy/prometheus/rules_test.yaml),
`check config`. The rules' unit tests must also notice when a rule is broken: each mutation
below has to make them fail. A missing promtool fails these tests; it never skips them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "helm" / "pop3-kafka" / "files" / "prometheus-rules.yaml"
RULES_TEST = REPO / "deploy" / "prometheus" / "rules_test.yaml"
PROMETHEUS_YML = REPO / "deploy" / "compose" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "pop3-kafka-dashboard.json"


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: install Debian's `prometheus` package (make deps)"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def alert_count() -> int:
    doc = yaml.safe_load(RULES.read_text())
    return sum(1 for group in doc["groups"] for rule in group["rules"] if "alert" in rule)


def test_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULES_TEST.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_compose_prometheus_config(tmp_path: Path) -> None:
    """The compose stack's prometheus.yml, with its rule file path (a path inside the container,
    where compose mounts the chart's rules file) pointed at the file in the repository."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/pop3-kafka.yaml"]
    config["rule_files"] = [str(RULES)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(local))
    assert result.returncode == 0, result.stdout + result.stderr
    rules_found = int(result.stdout.split("SUCCESS: ")[-1].split()[0])
    assert rules_found > alert_count()  # every alert plus the recording rules


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every panel query, with Grafana's variables filled in, parses: promtool checks them as the
    expressions of recording rules."""
    doc = json.loads(DASHBOARD.read_text())
    variables = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*", "$mailbox": ".*"}
    exprs = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in variables.items():
                expr = expr.replace(name, value)
            assert not re.search(r"\$\w", expr), f"{panel['title']}: unknown variable in {expr}"
            exprs.append(expr)
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", "--lint=none", str(tmp_path / "dashboard.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


# Each mutation breaks one alert the way a careless edit would; its unit test must catch it.
MUTATIONS = {
    "contention pages": ('{reason!~"in_use|login_delay"}', ""),
    "no-success window": (
        "pop3kafka:mailbox_last_success_age_seconds > 1800",
        "pop3kafka:mailbox_last_success_age_seconds > 18000",
    ),
    "stale replica wins": (
        "max by (namespace, app_kubernetes_io_instance, job, mailbox) "
        "(max_over_time(pop3kafka_last_success_timestamp_seconds[6h]))",
        "min by (namespace, app_kubernetes_io_instance, job, mailbox) "
        "(max_over_time(pop3kafka_last_success_timestamp_seconds[6h]))",
    ),
    "first fencing missed": (
        "(pop3kafka_fencing_events_total unless pop3kafka_fencing_events_total offset 15m)",
        "(pop3kafka_fencing_events_total == -1)",
    ),
    "one idle broker pages": (
        "max by (namespace, app_kubernetes_io_instance, job, instance, client) (pop3kafka_kafka_broker_up)",
        "max by (namespace, app_kubernetes_io_instance, job, instance, broker) (pop3kafka_kafka_broker_up)",
    ),
    "backlog without growth": (
        "delta(pop3kafka_mailbox_messages[1h]) > 0",
        "delta(pop3kafka_mailbox_messages[1h]) >= 0",
    ),
}


def unit_tests_against(tmp_path: Path, rules_text: str) -> subprocess.CompletedProcess[str]:
    """deploy/prometheus/rules_test.yaml run against ``rules_text`` instead of the rules file."""
    (tmp_path / "rules.yaml").write_text(rules_text)
    tests = yaml.safe_load(RULES_TEST.read_text())
    tests["rule_files"] = ["rules.yaml"]
    (tmp_path / "rules_test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    assert promtool("check", "rules", "rules.yaml", cwd=tmp_path).returncode == 0
    return promtool("test", "rules", "rules_test.yaml", cwd=tmp_path)


def test_rules_unit_tests_pass_on_a_copy(tmp_path: Path) -> None:
    """The control for the mutations: the copy, unchanged, passes."""
    result = unit_tests_against(tmp_path, RULES.read_text())
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_rules_unit_tests_catch_a_broken_rule(tmp_path: Path, mutation: str) -> None:
    old, new = MUTATIONS[mutation]
    text = RULES.read_text()
    assert old in text, f"mutation {mutation!r} no longer applies to the rules file"
    result = unit_tests_against(tmp_path, text.replace(old, new))
    assert result.returncode != 0, f"the unit tests did not notice: {mutation}"
    assert "FAILED" in result.stdout + result.stderr
