"""The Helm chart's values.schema.json against the connector's configuration schema: the chart
embeds `pop3-kafka config schema` under properties.config (helm/pop3-kafka/generate-schema.py),
so the two cannot drift. No tools needed; tests/integration/test_helm_chart.py renders the chart."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from connector import __version__
from connector.config.export import json_schema

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "pop3-kafka"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
REGENERATE = ".venv/bin/python helm/pop3-kafka/generate-schema.py"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_schema", CHART / "generate-schema.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def values_schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))


def merged(base: Any, override: Any) -> Any:
    """Helm's coalescing of a values file over values.yaml: maps merge, null deletes, rest replaces."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return copy.deepcopy(override)
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merged(out.get(key), value)
    return out


def test_values_schema_embeds_the_current_config_schema() -> None:
    current = (CHART / "values.schema.json").read_text(encoding="utf-8")
    assert generator().render(current) == current, (
        f"helm/pop3-kafka/values.schema.json does not embed the current `pop3-kafka config schema`: run {REGENERATE}"
    )


def test_the_embedded_schema_is_the_cli_output() -> None:
    embedded = values_schema()["properties"]["config"]
    assert embedded == {k: v for k, v in json_schema().items() if k != "$schema"}


def test_values_schema_is_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(values_schema())


def test_chart_app_version_is_the_connector_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert str(chart["appVersion"]) == __version__, (
        "helm/pop3-kafka/Chart.yaml appVersion (the default image tag) must be connector.__version__"
    )


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.name for p in CI_VALUES])
def test_ci_scenarios_pass_the_values_schema(values: Path) -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    doc = merged(defaults, yaml.safe_load(values.read_text(encoding="utf-8")))
    errors = [
        f"{list(e.absolute_path)}: {e.message}"
        for e in jsonschema.Draft202012Validator(values_schema()).iter_errors(doc)
    ]
    assert errors == []


def test_values_schema_refuses_a_misspelt_config_key() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    doc = merged(defaults, yaml.safe_load(CI_VALUES[0].read_text(encoding="utf-8")))
    doc["config"]["kafka"]["bootstrap_server"] = doc["config"]["kafka"].pop("bootstrap_servers")
    messages = [e.message for e in jsonschema.Draft202012Validator(values_schema()).iter_errors(doc)]
    assert any("bootstrap_server" in m for m in messages), messages


def test_values_schema_refuses_a_misspelt_chart_key() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    doc = merged(defaults, {"replicas": 3})
    messages = [e.message for e in jsonschema.Draft202012Validator(values_schema()).iter_errors(doc)]
    assert any("replicas" in m for m in messages), messages


def value_keys(values: Any, prefix: str = "") -> list[str]:
    """Documented keys of values.yaml: nested maps are walked, except those documented whole."""
    whole = {"resources", "podSecurityContext", "securityContext", "updateStrategy"}
    whole |= {"startup", "liveness", "readiness", "dns", "kafka", "pop3", "tokenEndpoint", "objectStore"}
    if not isinstance(values, dict) or not values or prefix.rpartition(".")[2] in whole:
        return [prefix]
    return [k for key, value in values.items() for k in value_keys(value, f"{prefix}.{key}" if prefix else key)]


def test_the_chart_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    missing = [k for k in value_keys(defaults) if f"| `{k}` |" not in readme]
    assert missing == [], f"helm/pop3-kafka/README.md, section Values, lacks: {missing}"


def schema_errors(override: Any) -> list[str]:
    """The values schema's complaints about values.yaml and ci/minimal-values.yaml with ``override``."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    minimal = yaml.safe_load((CHART / "ci" / "minimal-values.yaml").read_text(encoding="utf-8"))
    doc = merged(merged(defaults, minimal), override)
    validator = jsonschema.Draft202012Validator(values_schema())
    return ["/".join(map(str, e.absolute_path)) for e in validator.iter_errors(doc)]


@pytest.mark.parametrize(
    ("text", "faulty"),
    [
        ("image: {tag: 1.10}", "image/tag"),  # YAML's 1.10 is the number 1.1: pop3-kafka:1.1
        ("image: {tag: 2}", "image/tag"),
        ("podLabels: {version: 1.10}", "podLabels/version"),
        ("commonLabels: {release: 2024.10}", "commonLabels/release"),
        ("podAnnotations: {revision: 3}", "podAnnotations/revision"),
        ("extraEnv: [{name: APP_VERSION, value: 1.10}]", "extraEnv/0/value"),
        ("podDisruptionBudget: {minAvailable: 50}", None),
        ("podDisruptionBudget: {minAvailable: 'half'}", "podDisruptionBudget/minAvailable"),
        (
            "podDisruptionBudget: {unhealthyPodEvictionPolicy: Sometimes}",
            "podDisruptionBudget/unhealthyPodEvictionPolicy",
        ),
    ],
)
def test_values_schema_refuses_numbers_where_strings_go(text: str, faulty: str | None) -> None:
    errors = schema_errors(yaml.safe_load(text))
    assert errors == ([faulty] if faulty else []), errors


def test_values_schema_takes_quoted_versions_and_automatic_egress() -> None:
    assert schema_errors(yaml.safe_load('image: {tag: "1.10"}\npodLabels: {version: "1.10"}')) == []
    egress = {name: {"enabled": None} for name in ("dns", "kafka", "pop3", "tokenEndpoint", "objectStore")}
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    doc = merged(defaults, yaml.safe_load((CHART / "ci" / "minimal-values.yaml").read_text(encoding="utf-8")))
    doc["networkPolicy"]["egress"].update(egress)  # null: on when the config needs it (not deleted here)
    assert list(jsonschema.Draft202012Validator(values_schema()).iter_errors(doc)) == []
