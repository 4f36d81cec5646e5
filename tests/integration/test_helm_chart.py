"""The Helm chart (helm/pop3-kafka), proven offline.

For every scenario in helm/pop3-kafka/ci/*-values.yaml: `helm lint --strict`; `helm template`
checked by kubeconform -strict against the Kubernetes schemas of the oldest and newest supported
versions and against the prometheus-operator CRDs (ServiceMonitor, PrometheusRule); and the
rendered ConfigMap's config file loaded by `pop3-kafka config validate` inside a copy of the
pod's file tree (every file the config names, at the path the pod mounts it, with the content
the chart's Secret gives it or, for a Secret the operator manages, real key material of the
kind the config expects). Then the helm-unittest suites (helm/pop3-kafka/tests/*_test.yaml).

Tools come from deploy/tools/go-tools.sh (helm, kubeconform, helm-unittest built from the Go
module proxy, cached in ~/.cache/pop3-kafka/go-tools; minutes once, then instant) and the
schemas from deploy/tools/k8s-schemas.py (a PyPI wheel and a Go module, cached). A tool that
cannot be had fails these tests: it never skips them.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from support.oauth_endpoint import make_service_account
from support.smime import make_pki

# Cold Go builds take minutes (once per machine); every step below has its own timeout.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "pop3-kafka"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "t", "mail"
POD_NAME = f"{RELEASE}-pop3-kafka-0"
STEP_TIMEOUT = 60  # seconds for one helm, kubeconform or validate call
BUILD_TIMEOUT = 1200  # a cold build of all three tools on 2 cores takes ~4 min


@dataclass(frozen=True)
class Tools:
    helm: Path
    kubeconform: Path
    helm_unittest: Path
    plugins: Path  # HELM_PLUGINS for `helm unittest`
    schema_locations: tuple[str, ...]
    kubernetes_versions: tuple[str, ...]


def run(cmd: list[str | Path], *, timeout: float = STEP_TIMEOUT, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def tools() -> Tools:
    built = run(["bash", REPO / "deploy" / "tools" / "go-tools.sh"], timeout=BUILD_TIMEOUT)
    assert built.returncode == 0, f"deploy/tools/go-tools.sh failed:\n{built.stderr[-3000:]}"
    bin_dir = Path(built.stdout.strip().splitlines()[-1])
    paths = {name: bin_dir / name for name in ("helm", "kubeconform", "helm-unittest")}
    for name, path in paths.items():
        assert os.access(path, os.X_OK), f"{name} missing from {bin_dir} after deploy/tools/go-tools.sh"
    schemas = run([sys.executable, REPO / "deploy" / "tools" / "k8s-schemas.py"], timeout=BUILD_TIMEOUT)
    assert schemas.returncode == 0, f"deploy/tools/k8s-schemas.py failed:\n{schemas.stderr[-3000:]}"
    versions = run([sys.executable, REPO / "deploy" / "tools" / "k8s-schemas.py", "--kubernetes-versions"])
    return Tools(
        helm=paths["helm"],
        kubeconform=paths["kubeconform"],
        helm_unittest=paths["helm-unittest"],
        plugins=bin_dir.parent / "helm-plugins",
        schema_locations=tuple(schemas.stdout.split("\n")[:-1]),
        kubernetes_versions=tuple(versions.stdout.split()),
    )


def render(tools: Tools, values: Path | None, *args: str, kube_version: str | None = None) -> str:
    cmd: list[str | Path] = [tools.helm, "template", RELEASE, CHART, "--namespace", NAMESPACE]
    if values is not None:
        cmd += ["-f", values]
    if kube_version:
        cmd += ["--kube-version", kube_version]
    proc = run([*cmd, *args])
    assert proc.returncode == 0, f"helm template {values and values.name} {args} failed:\n{proc.stderr}"
    return proc.stdout


def manifests(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects rendered"
    return found[0]


def ids(paths: list[Path]) -> list[str]:
    return [p.name.removesuffix("-values.yaml") for p in paths]


def test_every_ci_scenario_is_covered() -> None:
    names = set(ids(CI_VALUES))
    assert {"minimal", "scale-out", "existing-secrets", "created-secrets", "smime", "offload-s3"} <= names


def test_the_tools_are_the_pinned_versions(tools: Tools) -> None:
    assert run([tools.helm, "version", "--short"]).stdout.startswith("v3.22.0")
    assert run([tools.kubeconform, "-v"]).stdout.strip() == "v0.8.0"
    usage = run([tools.helm_unittest, "--help"])  # the standalone binary, no helm plugin needed
    assert usage.returncode == 0 and "helm unittest" in usage.stdout


# ---------------------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("values", CI_VALUES, ids=ids(CI_VALUES))
def test_helm_lint_strict(tools: Tools, values: Path) -> None:
    proc = run([tools.helm, "lint", "--strict", CHART, "-f", values])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def kubeconform(tools: Tools, text: str, kube_version: str) -> tuple[int, dict[str, Any], str]:
    cmd: list[str | Path] = [tools.kubeconform, "-strict", "-summary", "-output", "json"]
    cmd += ["-kubernetes-version", kube_version]
    for location in tools.schema_locations:
        cmd += ["-schema-location", location]
    proc = run([*cmd, "-"], input=text)
    return proc.returncode, json.loads(proc.stdout or "{}"), proc.stderr


@pytest.mark.parametrize("values", CI_VALUES, ids=ids(CI_VALUES))
def test_rendered_manifests_pass_kubeconform(tools: Tools, values: Path) -> None:
    for version in tools.kubernetes_versions:
        text = render(tools, values, kube_version=version)
        rc, report, err = kubeconform(tools, text, version)
        assert rc == 0, f"Kubernetes {version}: {json.dumps(report.get('resources'), indent=1)}\n{err}"
        summary = report["summary"]
        # Nothing skipped: every kind, the two CRDs included, had a schema and was checked.
        assert summary["valid"] == len(manifests(text)) and summary["skipped"] == 0, summary


def test_kubeconform_catches_mistakes_offline(tools: Tools) -> None:
    """The offline schemas are not a formality: a misspelt field fails, CRDs included."""
    docs = manifests(render(tools, CHART / "ci" / "scale-out-values.yaml"))
    sts = copy.deepcopy(one(docs, "StatefulSet"))
    sts["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    monitor = copy.deepcopy(one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    rule = copy.deepcopy(one(docs, "PrometheusRule"))
    rule["spec"]["groups"][0]["rulez"] = []
    for broken in (sts, monitor, rule):
        rc, report, _ = kubeconform(tools, yaml.safe_dump(broken), tools.kubernetes_versions[-1])
        assert rc != 0 and report["summary"]["invalid"] == 1, (broken["kind"], report)


def test_values_schema_checks_the_connector_config(tools: Tools) -> None:
    minimal = CHART / "ci" / "minimal-values.yaml"
    proc = run([tools.helm, "template", RELEASE, CHART, "-f", minimal, "--set", "config.kafka.bootstrap_server=x:9092"])
    assert proc.returncode != 0
    assert "additional properties 'bootstrap_server' not allowed" in proc.stderr


# ---------------------------------------------------------------------------- the rendered config


Keys = tuple[str | int, ...]


def walk(value: Any, keys: Keys = ()) -> Iterator[tuple[Keys, Any]]:
    """(keys, value) of every scalar, e.g. (('mailboxes', 0, 'password', 'file'), '/...')."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, (*keys, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, (*keys, i))
    else:
        yield keys, value


def dotted(keys: Keys) -> str:
    """config.mailboxes[0].password.file, as the connector's errors name keys."""
    return "config" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys)


def lookup(config: Any, keys: Keys) -> Any:
    for k in keys:
        config = config[k]
    return config


@dataclass
class Pod:
    """What the rendered objects put into the connector's container."""

    config: dict[str, Any]
    mounts: list[dict[str, Any]]
    volumes: dict[str, dict[str, Any]]
    env: list[dict[str, Any]]
    created: dict[str, dict[str, bytes]]  # chart-created Secret name -> key -> content

    @classmethod
    def of(cls, docs: list[dict[str, Any]]) -> Pod:
        sts = one(docs, "StatefulSet")
        container = sts["spec"]["template"]["spec"]["containers"][0]
        created = {}
        for s in (d for d in docs if d["kind"] == "Secret"):
            data = {k: str(v).encode() for k, v in (s.get("stringData") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (s.get("data") or {}).items()})
            created[s["metadata"]["name"]] = data
        return cls(
            config=yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"]),
            mounts=container["volumeMounts"],
            volumes={v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]},
            env=container.get("env", []),
            created=created,
        )

    def source(self, path: str) -> tuple[dict[str, Any], str]:
        """The volume a path lies in and the path inside it; fails when nothing mounts it."""
        best = max(
            (m for m in self.mounts if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")),
            key=lambda m: len(m["mountPath"]),
            default=None,
        )
        assert best is not None, f"{path}: the config names it, but no volume is mounted there"
        return self.volumes[best["name"]], path[len(best["mountPath"]) :].lstrip("/")

    def secret_file(self, path: str) -> bytes | None:
        """Content of a file from a chart-created Secret; None for an operator's Secret.
        Fails when the pod would not have the file: a key the Secret or the projection lacks."""
        volume, inner = self.source(path)
        assert "secret" in volume, f"{path} lies in volume {volume['name']}, which is no Secret"
        items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
        if items:
            assert inner in items, f"{path}: volume {volume['name']} projects only {sorted(items)}"
        key = items.get(inner, inner)
        name = volume["secret"]["secretName"]
        if name not in self.created:
            return None
        assert key in self.created[name], f"{path}: Secret {name} has no key {key!r}"
        return self.created[name][key]

    def environ(self, root: Path) -> dict[str, str]:
        out = {"PATH": os.environ["PATH"], "HOME": str(root), "LANG": "C.UTF-8"}
        for e in self.env:
            if "value" in e:
                out[e["name"]] = str(e["value"])
            elif "fieldRef" in e["valueFrom"]:
                out[e["name"]] = POD_NAME
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                content = self.created.get(ref["name"], {}).get(ref["key"], b"operator-secret-0123456789")
                out[e["name"]] = content.decode()
        out["TMPDIR"] = str(root / "tmp")
        return out


@pytest.fixture(scope="module")
def key_material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Real keys and certificates, for the files of Secrets the operator manages."""
    root = tmp_path_factory.mktemp("keys")
    pki = make_pki(root)
    alice = pki["alice"]
    sa = root / "sa.json"
    make_service_account(sa, "https://oauth2.googleapis.com/token")
    return {
        "cert": alice.cert.public_bytes(serialization.Encoding.PEM),
        "key": alice.key_path.read_bytes(),
        "smime_pem": pki.pem_file("alice", key_first=True).read_bytes(),
        "service_account": sa.read_bytes(),
    }


SMIME_KEY = re.compile(r"\.smime\.keys\[\d+\]\.file$")


def content_for(keys: Keys, material: dict[str, bytes]) -> bytes:
    """What a file the operator provides holds, by the key that names it."""
    name = dotted(keys)
    if name.endswith(".oauth2.service_account_file"):
        return material["service_account"]
    if name.endswith(".tls_client_key"):
        return material["key"]
    if re.search(r"(tls_client_cert|ca_file|ca_bundle|ssl\.ca\.location)$", name):
        return material["cert"]
    if SMIME_KEY.search(name):
        return material["smime_pem"]
    return b"operator-secret-0123456789\n"


def pkcs12_file(material: dict[str, bytes], password: str) -> bytes:
    key = serialization.load_pem_private_key(material["key"], None)
    assert isinstance(key, rsa.RSAPrivateKey)
    cert = x509.load_pem_x509_certificate(material["cert"])
    return pkcs12.serialize_key_and_certificates(
        b"archive", key, cert, None, serialization.BestAvailableEncryption(password.encode())
    )


def materialise(pod: Pod, root: Path, material: dict[str, bytes]) -> Path:
    """The pod's file tree under ``root``: the config with every absolute path moved under it,
    every file it names written where the pod mounts it. Returns the config file."""
    config = copy.deepcopy(pod.config)
    pkcs12_keys: list[tuple[Keys, Path]] = []
    for keys, value in walk(pod.config):
        if not (isinstance(value, str) and value.startswith("/")):
            continue
        target = root / value.lstrip("/")
        lookup(config, keys[:-1])[keys[-1]] = str(target)
        volume, _ = pod.source(value)
        if "emptyDir" in volume:  # the spool: a writable directory
            target.mkdir(parents=True, exist_ok=True)
            continue
        content = pod.secret_file(value)
        target.parent.mkdir(parents=True, exist_ok=True)
        if content is None and SMIME_KEY.search(dotted(keys)) and value.endswith((".p12", ".pfx")):
            pkcs12_keys.append((keys, target))  # written once its passphrase file exists
            continue
        target.write_bytes(content if content is not None else content_for(keys, material))
    env = pod.environ(root)
    for keys, target in pkcs12_keys:  # encrypted with the passphrase the config points at
        spec = lookup(config, keys[:-1]).get("password")
        assert spec, f"{dotted(keys)}: a PKCS#12 key needs its password here"
        password = Path(spec["file"]).read_text().rstrip("\r\n") if "file" in spec else env[spec["env"]]
        target.write_bytes(pkcs12_file(material, password))
    (root / "tmp").mkdir(exist_ok=True)
    config_file = root / "etc" / "pop3-kafka" / "config.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_file


@pytest.mark.parametrize("values", CI_VALUES, ids=ids(CI_VALUES))
def test_rendered_config_passes_config_validate(
    tools: Tools, values: Path, tmp_path: Path, key_material: dict[str, bytes]
) -> None:
    pod = Pod.of(manifests(render(tools, values)))
    # Every {env: NAME} the config uses is set in the container.
    names = {e["name"] for e in pod.env}
    for keys, value in walk(pod.config):
        if keys[-1] == "env":
            assert value in names, f"{dotted(keys)}: {value} is not set in the container"
    config_file = materialise(pod, tmp_path, key_material)
    proc = run(
        [REPO / ".venv" / "bin" / "pop3-kafka", "config", "validate", config_file],
        env=pod.environ(tmp_path),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"{values.name}: {proc.stderr}\n{config_file.read_text()}"
    assert ": OK (" in proc.stdout


# ---------------------------------------------------------------------------- image, egress, labels


def test_an_unquoted_version_tag_is_refused_and_a_quoted_one_kept(tools: Tools, tmp_path: Path) -> None:
    """`tag: 1.10` is the number 1.1 to YAML: it would deploy pop3-kafka:1.1. The schema refuses it."""
    minimal = CHART / "ci" / "minimal-values.yaml"
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text("image:\n  tag: 1.10\n")
    proc = run([tools.helm, "template", RELEASE, CHART, "-f", minimal, "-f", unquoted])
    assert proc.returncode != 0
    assert "at '/image/tag': got number, want string" in proc.stderr, proc.stderr
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text('image:\n  tag: "1.10"\n  digest: sha256:' + "ab" * 32 + "\n")
    docs = manifests(render(tools, minimal, "-f", str(quoted)))
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "pop3-kafka:1.10@sha256:" + "ab" * 32
    assert {d["metadata"]["labels"]["app.kubernetes.io/version"] for d in docs} == {"1.10"}


def needed_egress(config: dict[str, Any]) -> list[tuple[str, int]]:
    """(what, TCP port) of everything the config connects to, by the connector's own defaults."""

    def url_port(url: str) -> int:
        parts = urllib.parse.urlsplit(url)
        return parts.port or (80 if parts.scheme == "http" else 443)

    needed: list[tuple[str, int]] = []
    for server in config["kafka"]["bootstrap_servers"].split(","):
        port = server.strip().rpartition(":")[2]
        needed.append((f"kafka {server}", int(port) if port.isdigit() else 9092))
    for m in config["mailboxes"]:
        port = m.get("port") or (995 if m.get("tls", "implicit") == "implicit" else 110)
        needed.append((f"mailbox {m['id']}", port))
        if m.get("oauth2"):
            token_url = m["oauth2"].get("token_url")
            needed.append((f"mailbox {m['id']} token endpoint", url_port(token_url) if token_url else 443))
    offload = config.get("offload") or {}
    if offload.get("kind") == "s3":
        endpoint = offload.get("endpoint_url")
        needed.append(("offload s3", url_port(endpoint) if endpoint else 443))
    return needed


def admits(egress: list[dict[str, Any]], port: int) -> bool:
    """Whether a NetworkPolicy egress rule lets TCP ``port`` out (to some peer)."""
    for rule in egress:
        ports = rule.get("ports") or []
        if not ports:
            return True
        for p in ports:
            if p.get("protocol", "TCP") != "TCP" or isinstance(p["port"], str):
                continue
            if p["port"] == port or p["port"] <= port <= p.get("endPort", p["port"]):
                return True
    return False


WITH_NETWORK_POLICY = [
    p for p in CI_VALUES if (yaml.safe_load(p.read_text()).get("networkPolicy") or {}).get("enabled")
]


@pytest.mark.parametrize("values", WITH_NETWORK_POLICY, ids=ids(WITH_NETWORK_POLICY))
def test_network_policy_lets_out_what_the_config_connects_to(tools: Tools, values: Path) -> None:
    docs = manifests(render(tools, values))
    egress = one(docs, "NetworkPolicy")["spec"]["egress"]
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    blocked = [(what, port) for what, port in needed_egress(config) if not admits(egress, port)]
    assert blocked == [], f"{values.name}: the NetworkPolicy blocks {blocked}"


def test_network_policy_opens_ports_from_the_config(tools: Tools, tmp_path: Path) -> None:
    """A mailbox on port 1995, a token endpoint on 8443 and an S3 endpoint on 9000, with the token
    endpoint and object store rules left at their defaults: all let out, nothing configured by hand."""
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        yaml.safe_dump(
            {
                "networkPolicy": {"enabled": True},
                "secrets": {"idp": {"stringData": {"client_secret": "not-a-real-secret"}}},
                "config": {
                    "offload": {"kind": "s3", "bucket": "mail", "endpoint_url": "https://s3.example.com:9000"},
                    "mailboxes": [
                        {
                            "id": "odd-port",
                            "host": "pop.example.com",
                            "port": 1995,
                            "username": "u",
                            "password": {"file": "/var/run/secrets/pop3-kafka/orders/password"},
                        },
                        {
                            "id": "oauth",
                            "host": "pop.example.com",
                            "username": "u@example.com",
                            "auth_mechanisms": ["XOAUTH2"],
                            "oauth2": {
                                "grant": "client_credentials",
                                "token_url": "https://idp.example.com:8443/token",
                                "client_id": "pop3-kafka",
                                "client_secret": {"file": "/var/run/secrets/pop3-kafka/idp/client_secret"},
                            },
                        },
                    ],
                },
            }
        )
    )
    minimal = CHART / "ci" / "minimal-values.yaml"
    docs = manifests(render(tools, minimal, "-f", str(extra)))
    egress = one(docs, "NetworkPolicy")["spec"]["egress"]
    for port in (1995, 8443, 9000):
        assert admits(egress, port), (port, egress)
    rc, report, err = kubeconform(tools, yaml.safe_dump(one(docs, "NetworkPolicy")), tools.kubernetes_versions[0])
    assert rc == 0, (report, err)
    # Switched off by hand while the config needs it: refused, naming the mailbox and the fix.
    switched_off = "networkPolicy.egress.tokenEndpoint.enabled=false"
    proc = run([tools.helm, "template", RELEASE, CHART, "-f", minimal, "-f", extra, "--set", switched_off])
    assert proc.returncode != 0
    assert "networkPolicy.egress.tokenEndpoint.enabled: false blocks config.mailboxes[1] (id oauth)" in proc.stderr
    assert "set networkPolicy.egress.tokenEndpoint.enabled: true" in proc.stderr


def test_service_monitor_labels_series_with_the_release(tools: Tools) -> None:
    """Two releases in one namespace: app_kubernetes_io_instance keeps their series (and alerts) apart."""
    docs = manifests(render(tools, CHART / "ci" / "scale-out-values.yaml"))
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["targetLabels"] == ["app.kubernetes.io/instance"]
    selected = [
        d
        for d in docs
        if d["kind"] == "Service"
        and all(d["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    ]
    assert len(selected) == 1 and selected[0]["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


# ---------------------------------------------------------------------------- rolling on change


def rolled(tools: Tools, *sets: str) -> tuple[dict[str, str], str]:
    docs = manifests(render(tools, CHART / "ci" / "minimal-values.yaml", *(a for s in sets for a in ("--set", s))))
    annotations = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    return annotations, one(docs, "ConfigMap")["data"]["config.yaml"]


def test_checksums_follow_the_config_and_the_created_secrets(tools: Tools) -> None:
    base, base_config = rolled(tools)
    config_changed, new_config = rolled(tools, "config.topics.mail=mail.other")
    secret_changed, same_config = rolled(tools, "secrets.orders.stringData.password=rotated")
    unrelated, _ = rolled(tools, "resources.limits.memory=1Gi", "podAnnotations.team=mail")
    assert new_config != base_config and same_config == base_config
    assert config_changed["checksum/config"] != base["checksum/config"]
    assert config_changed["checksum/secrets"] == base["checksum/secrets"]
    assert secret_changed["checksum/secrets"] != base["checksum/secrets"]
    assert secret_changed["checksum/config"] == base["checksum/config"]
    assert unrelated["checksum/config"] == base["checksum/config"]
    assert unrelated["checksum/secrets"] == base["checksum/secrets"]
    # The hash is over the config the chart renders (the ConfigMap's file without its comment).
    body = "".join(line + "\n" for line in base_config.splitlines() if not line.startswith("#"))
    assert base["checksum/config"] == hashlib.sha256(body.rstrip("\n").encode()).hexdigest()


def test_prometheus_rule_embeds_the_rules_file(tools: Tools) -> None:
    rules = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    docs = manifests(render(tools, CHART / "ci" / "minimal-values.yaml", "--set", "prometheusRule.enabled=true"))
    assert one(docs, "PrometheusRule")["spec"]["groups"] == rules["groups"]
    default = "https://github.com/pop3-kafka/pop3-kafka/blob/main/docs/runbooks.md"
    text = render(
        tools,
        CHART / "ci" / "minimal-values.yaml",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "prometheusRule.runbookUrlPrefix=https://wiki.example.com/pop3-kafka/runbooks/",
    )
    assert default not in text
    if default in (CHART / "files" / "prometheus-rules.yaml").read_text():
        assert "https://wiki.example.com/pop3-kafka/runbooks#" in text


# ---------------------------------------------------------------------------- helm-unittest


def test_helm_unittest_suites(tools: Tools) -> None:
    proc = run([tools.helm_unittest, "--color=false", CHART])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr
    passed = re.search(r"Tests:\s+(\d+) passed, (\d+) total", proc.stdout)
    suites = len(list((CHART / "tests").glob("*_test.yaml")))
    assert passed and passed.group(1) == passed.group(2), proc.stdout[-2000:]
    assert re.search(rf"Test Suites:\s+{suites} passed, {suites} total", proc.stdout), proc.stdout[-2000:]


def test_helm_unittest_runs_as_a_helm_plugin(tools: Tools) -> None:
    """The same binary laid out as a plugin directory: `helm unittest` works without a download."""
    proc = run([tools.helm, "unittest", "--color=false", CHART], env={**os.environ, "HELM_PLUGINS": str(tools.plugins)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
