"""The deploy kit (issue 8), checked without Docker or Prometheus: the compose stack against the
compose-spec schema and its own files, the Dockerfile's supply-chain and run-time rules, the
Grafana dashboard and the alert rules against the metrics the connector exports, and the
runbooks against the alerts. promtool's checks are in tests/integration/test_promtool.py."""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support.cli import run_cli

from connector.observability.metrics import REGISTRY

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DASHBOARD = REPO / "deploy" / "grafana" / "pop3-kafka-dashboard.json"
RULES = REPO / "helm" / "pop3-kafka" / "files" / "prometheus-rules.yaml"
RULES_TEST = REPO / "deploy" / "prometheus" / "rules_test.yaml"
RUNBOOKS = REPO / "docs" / "runbooks.md"
COMPOSE_SPEC = REPO / "tests" / "fixtures" / "compose-spec.json"
RUNBOOK_PREFIX = "https://github.com/pop3-kafka/pop3-kafka/blob/main/docs/runbooks.md#"


# ----------------------------------------------------------------------------------- PromQL


def exported_metric_names() -> set[str]:
    """Every series name /metrics can show, from the registry itself: counters with _total,
    histograms as _bucket/_sum/_count, gauges as they are."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS |= {"offset", "bool", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords, labels or numbers)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", s):
        name, call = m.group(1), m.group(2)
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(a_bucket{job=~"$job", x="y(z)"}[$__rate_interval]))', {"a_bucket"}),
        ("histogram_quantile(0.95, sum(rate(b_bucket[5m])) by (le))", {"b_bucket"}),
        ("c unless c offset 15m and on (job) group_left () max by (job) (d offset 1h)", {"c", "d"}),
        ("time() - e > 14 * 86400 or vector(1e3)", {"e"}),
        ("max_over_time(rec:ord_er[6h]) unless on (m) rec:age < 600", {"rec:ord_er", "rec:age"}),
        ('up{job=~".*pop3-kafka.*"} == bool 0', {"up"}),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


# ----------------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def test_compose_file_matches_the_compose_spec_schema() -> None:
    schema = json.loads(COMPOSE_SPEC.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    # The schema does reject what docker compose rejects (a typo in a service key).
    broken = compose()
    broken["services"]["kafka"]["imge"] = broken["services"]["kafka"].pop("image")
    assert list(validator.iter_errors(broken))


def test_compose_files_exist() -> None:
    """Build context, bind-mount sources and secret files named by compose.yaml are in the repo."""
    doc = compose()
    for name, svc in doc["services"].items():
        if "build" in svc:
            context = (COMPOSE_DIR / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).resolve() == DOCKERFILE, name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source}"
            else:
                assert source in doc["volumes"], f"{name}: undeclared volume {source}"
        for secret in svc.get("secrets", []):
            assert secret in doc["secrets"], f"{name}: undeclared secret {secret}"
    for name, secret in doc["secrets"].items():
        assert (COMPOSE_DIR / secret["file"]).is_file(), name


def mounts(service: str) -> dict[str, str]:
    """target -> source of a service's volumes."""
    out = {}
    for volume in compose()["services"][service].get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def test_compose_prometheus_loads_the_charts_rules_file() -> None:
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    (rule_file,) = prom["rule_files"]
    assert (COMPOSE_DIR / mounts("prometheus")[rule_file]).resolve() == RULES
    jobs = {t: job["job_name"] for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert re.fullmatch(".*pop3-kafka.*", jobs["connector:9108"])  # what Pop3KafkaTargetDown matches


def test_compose_grafana_provisions_the_dashboard() -> None:
    provider = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/pop3-kafka.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    dashboards = {t: s for t, s in mounts("grafana").items() if t.startswith(path + "/")}
    assert [(COMPOSE_DIR / s).resolve() for s in dashboards.values()] == [DASHBOARD]


def container_paths(node: Any) -> list[str]:
    """Absolute paths inside the container that a loaded configuration names."""
    if isinstance(node, dict):
        return [p for v in node.values() for p in container_paths(v)]
    if isinstance(node, list):
        return [p for v in node for p in container_paths(v)]
    return [node] if isinstance(node, str) and node.startswith(("/run/secrets/", "/etc/pop3-kafka/")) else []


def rewrite(node: Any, new: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: rewrite(v, new) for k, v in node.items()}
    if isinstance(node, list):
        return [rewrite(v, new) for v in node]
    return new.get(node, node) if isinstance(node, str) else node


def throwaway_ca_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pop3-kafka compose demo CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_compose_connector_config_validates(tmp_path: Path) -> None:
    """config.yaml passes `pop3-kafka config validate` once the files it names exist: the secrets
    and the CA the container has, here copied to a temporary directory."""
    config = yaml.safe_load((COMPOSE_DIR / "config.yaml").read_text())
    doc = compose()
    connector = doc["services"]["connector"]
    assert mounts("connector")["/etc/pop3-kafka/config.yaml"] == "./config.yaml"
    paths = container_paths(config)
    assert paths, "the compose config names no files?"
    local = {}
    for path in paths:
        if path.startswith("/run/secrets/"):
            name = path.removeprefix("/run/secrets/")
            assert name in connector["secrets"], f"{path}: not a secret of the connector service"
            content = (COMPOSE_DIR / doc["secrets"][name]["file"]).read_bytes()
        else:
            assert any(path.startswith(target + "/") for target in mounts("connector")), f"{path}: not mounted"
            content = throwaway_ca_pem()  # what the seed service writes into the pop3-ca volume
        local[path] = tmp_path / path.lstrip("/")
        local[path].parent.mkdir(parents=True, exist_ok=True)
        local[path].write_bytes(content)
    rewritten = tmp_path / "config.yaml"
    rewritten.write_text(yaml.safe_dump(rewrite(config, {k: str(v) for k, v in local.items()})))
    result = run_cli("config", "validate", str(rewritten))
    assert result.returncode == 0, result.stderr
    assert "OK (2 mailbox(es): alice, bob)" in result.stdout


def test_compose_dovecot_users_match_the_connectors_secrets() -> None:
    users = {}
    for line in (COMPOSE_DIR / "dovecot" / "users").read_text().splitlines():
        if line and not line.startswith("#"):
            user, password = line.split(":")[:2]
            users[user] = password.removeprefix("{PLAIN}")
    config = yaml.safe_load((COMPOSE_DIR / "config.yaml").read_text())
    for mb in config["mailboxes"]:
        secret = Path(mb["password"]["file"]).name
        assert (COMPOSE_DIR / "secrets" / secret).read_text().rstrip("\n") == users[mb["username"]]
        assert (COMPOSE_DIR / "seed" / "mail" / mb["username"]).is_dir()


# ----------------------------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages): comment lines dropped, continuations joined, the ARGs
    before the first FROM substituted into FROM lines as `docker build` does."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    logical: list[str] = []
    buf = ""
    for ln in lines:
        if ln.rstrip().endswith("\\"):
            buf += ln.rstrip()[:-1] + " "
            continue
        buf += ln
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ln in logical:
        keyword, _, args = ln.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m.group(1) or m.group(2)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before FROM, not {keyword}"
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def pairs(args: str) -> dict[str, str]:
    """KEY=VALUE words of ENV and LABEL."""
    return dict(word.split("=", 1) for word in shlex.split(args))


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"not in exec (JSON) form: {args}"
    value: list[str] = json.loads(args)
    return value


def test_dockerfile_pins_every_base_image_by_digest() -> None:
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    assert len(stages) >= 2, "multi-stage: the wheel is built in a stage of its own"
    names = set()
    for stage in stages:
        if stage.base not in names:
            assert re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", stage.base), f"not pinned by digest: {stage.base}"
        if stage.name:
            names.add(stage.name)


def test_dockerfile_builds_the_wheel_in_a_builder_stage() -> None:
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    *builders, final = stages
    assert any("pip wheel" in run for b in builders for run in b.all("RUN"))
    copies = final.all("COPY")
    assert copies and all(c.startswith("--from=") for c in copies), "the final stage takes only build results"
    assert all(" /wheels" not in c and ".cache" not in c for c in copies)


BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|cmake|build-essential|libc6-dev|python3?-dev|librdkafka-dev|rustc|cargo)\b"
)
INSTALLERS = re.compile(r"\b(apt-get|apt|apk|yum|dnf|microdnf)\s+(-\S+\s+)*(install|add)\b|\bpip3?\s+install\b")


def test_dockerfile_final_stage_runs_as_non_root_without_build_tools() -> None:
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    final = stages[-1]
    users = final.all("USER")
    assert users, "the final stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid, not {users[-1]!r}"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    for run in final.all("RUN"):
        assert not INSTALLERS.search(run), f"installs packages in the final stage: {run}"
        assert not BUILD_TOOLS.search(run), f"build tool in the final stage: {run}"
    # pip's cache stays out of every stage that runs pip
    for stage in stages[:-1]:
        env = {k: v for args in stage.all("ENV") for k, v in pairs(args).items()}
        if any("pip" in run for run in stage.all("RUN")):
            assert env.get("PIP_NO_CACHE_DIR") == "1" or all("--no-cache-dir" in r for r in stage.all("RUN"))


def test_dockerfile_entrypoint_and_run_time_environment() -> None:
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    final = stages[-1]
    assert exec_form(final.all("ENTRYPOINT")[-1]) == ["pop3-kafka"]
    assert exec_form(final.all("CMD")[-1]) == ["--log-format", "json", "run", "--config", "/etc/pop3-kafka/config.yaml"]
    assert "9108" in " ".join(final.all("EXPOSE")).split()
    env = {k: v for args in final.all("ENV") for k, v in pairs(args).items()}
    assert env["TMPDIR"] == "/tmp"  # spool and temp files on the emptyDir/tmpfs; root stays read-only
    assert env["HOME"] == "/tmp"
    labels = {k: v for args in final.all("LABEL") for k, v in pairs(args).items()}
    for key in ("title", "description", "version", "revision", "created", "source", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out of the context (last matching pattern wins)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/")) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_else() -> None:
    patterns = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    sources = [
        src.rstrip("/")
        for stage in stages
        for args in stage.all("COPY")
        if not args.startswith("--from=")
        for src in args.split()[:-1]
    ]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert not dockerignored(src, patterns), f"{src} is copied but .dockerignore leaves it out"
    assert not dockerignored("connector/cli/main.py", patterns)
    for path in (".venv", ".git", "tests/fixtures/mail", "connector/__pycache__/x.pyc", "dist", "helm"):
        assert dockerignored(path, patterns), path


# ----------------------------------------------------------------------------------- Grafana


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panel_exprs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
        for inner in panel.get("panels", []):  # collapsed rows keep their panels inside
            out.extend((inner["title"], t["expr"]) for t in inner.get("targets", []))
    return out


def test_dashboard_uses_only_exported_metrics() -> None:
    doc = dashboard()
    exported = exported_metric_names()
    used: set[str] = set()
    exprs = panel_exprs(doc)
    assert exprs
    for title, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        assert names <= exported, f"{title}: unknown metric(s) {sorted(names - exported)} in {expr}"
        used |= names
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+)(\{[^}]*\})?,\s*\w+\)", var["definition"])
            assert m and m.group(1) in exported, var["definition"]
    # what the on-call needs to see
    for metric in (
        "pop3kafka_cycles_total",
        "pop3kafka_mails_published_total",
        "pop3kafka_mails_dead_lettered_total",
        "pop3kafka_mails_deleted_total",
        "pop3kafka_mailbox_messages",
        "pop3kafka_mailbox_oldest_undeleted_age_seconds",
        "pop3kafka_login_failures_total",
        "pop3kafka_transactions_total",
        "pop3kafka_transaction_duration_seconds_bucket",
        "pop3kafka_kafka_delivery_latency_seconds_bucket",
        "pop3kafka_producer_queue_messages",
        "pop3kafka_kafka_broker_up",
        "pop3kafka_shards_owned",
        "pop3kafka_shard_owned",
        "pop3kafka_tls_certificate_expiry_timestamp_seconds",
        "pop3kafka_oauth_token_expiry_seconds",
    ):
        assert metric in used, f"no panel shows {metric}"


def test_dashboard_datasource_is_a_variable() -> None:
    doc = dashboard()
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in doc["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
    assert doc["uid"] == "pop3-kafka"


# ----------------------------------------------------------------------------------- rules


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {github_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", RUNBOOKS.read_text(), flags=re.M)}


def test_every_alert_has_severity_annotations_and_a_runbook_section() -> None:
    anchors = runbook_anchors()
    assert alerts()
    for alert in alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], name
        url = annotations["runbook_url"]
        assert url.startswith(RUNBOOK_PREFIX), f"{name}: {url}"
        anchor = url.removeprefix(RUNBOOK_PREFIX)
        assert anchor == github_anchor(name), f"{name}: the anchor is the alert's own section"
        assert anchor in anchors, f"{name}: docs/runbooks.md has no section #{anchor}"


def test_runbooks_have_no_section_for_an_alert_that_does_not_exist() -> None:
    names = {github_anchor(a["alert"]) for a in alerts()}
    sections = {a for a in runbook_anchors() if a.startswith("pop3kafka")}
    assert sections == names


def test_runbooks_links_resolve() -> None:
    text = RUNBOOKS.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("http"):
            continue
        path, _, anchor = target.partition("#")
        doc = (RUNBOOKS.parent / path).resolve() if path else RUNBOOKS
        assert doc.exists(), target
        if anchor and doc.suffix == ".md":
            headings = re.findall(r"^#{1,6} (.+)$", doc.read_text(), flags=re.M)
            assert anchor in {github_anchor(h) for h in headings}, target


def test_every_alert_has_unit_tests_that_fire_and_that_stay_quiet() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())
    assert [(RULES_TEST.parent / f).resolve() for f in tests["rule_files"]] == [RULES]
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - fires == set(), "alerts without a test where they fire"
    assert names - quiet == set(), "alerts without a test where they must not fire"
    assert (fires | quiet) - names == set(), "tests of alerts that do not exist"


def test_rules_use_only_exported_metrics() -> None:
    allowed = exported_metric_names() | {"up"} | {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        names = promql_metric_names(rule["expr"])
        assert names, rule
        assert names <= allowed, f"{rule.get('alert') or rule.get('record')}: unknown {sorted(names - allowed)}"
