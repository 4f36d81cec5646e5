"""The configuration's JSON Schema (connector/config/export.py) against our own validator: the
same documents pass, the same structural mistakes fail. The Helm chart embeds this schema."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from connector.cli.main import main
from connector.config import parse_config
from connector.config.export import json_schema
from connector.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ENV = {"PW": "x", "TOKEN": "y" * 20}

RICH: dict[str, Any] = {
    "kafka": {
        "bootstrap_servers": "kafka-0:9092,kafka-1:9092",
        "client": {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "u"},
        "delivery_timeout_seconds": 30,
    },
    "topics": {"mail": "mail", "partitions": 6, "replication_factor": 3, "create": False},
    "delivery": {"mode": "exactly_once", "transaction_timeout_seconds": 120},
    "ledger": {"topic": "mail.ledger", "shards": 8},
    "runtime": {"ownership": "group", "max_concurrent_sessions": 16, "shutdown_grace_seconds": 60},
    "admin": {"bind": "0.0.0.0:9108", "token": {"env": "TOKEN"}},
    "mailboxes": [
        {
            "id": "orders",
            "host": "outlook.office365.com",
            "username": "orders@example.com",
            "auth_mechanisms": ["XOAUTH2"],
            "oauth2": {
                "grant": "client_credentials",
                "token_url": "https://login.microsoftonline.com/t/oauth2/v2.0/token",
                "client_id": "abc",
                "client_secret": {"env": "PW"},
                "scope": "https://outlook.office365.com/.default",
            },
            "schedule": {"cron": "*/5 * * * *", "timezone": "Europe/Berlin"},
        },
        {
            "id": "invoices",
            "host": "pop.example.com",
            "port": 995,
            "username": "invoices",
            "password": {"env": "PW"},
            "poll_interval_seconds": 60,
            "delete": False,
            "attachments": {"placement": "chunked"},
        },
    ],
}


def schema_errors(doc: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(json_schema())
    return [e.message for e in validator.iter_errors(doc)]


def ours(doc: Any) -> str | None:
    try:
        parse_config(copy.deepcopy(doc), environ=ENV)
    except ConfigError as exc:
        return str(exc)
    return None


def test_the_schema_is_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(json_schema())


def doc_configs() -> list[tuple[str, dict[str, Any]]]:
    """Every complete configuration shown in the docs (```yaml blocks with a mailboxes key)."""
    out = []
    for md in sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")]):
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", md.read_text(), re.S)):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and "mailboxes" in data and "kafka" in data:
                out.append((f"{md.name}#{i}", data))
    return out


def test_a_rich_configuration_passes_both() -> None:
    assert ours(RICH) is None
    assert schema_errors(RICH) == []


@pytest.mark.parametrize(("name", "doc"), doc_configs())
def test_the_configurations_in_the_docs_pass_the_schema(name: str, doc: dict[str, Any]) -> None:
    # (our validator also checks that files such as tls_ca_file exist, which the examples name
    # but this machine does not have; the structure is what the schema is about)
    assert schema_errors(doc) == [], name


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("kafka", "bootstrap_server"), "typo"),  # unknown key
        (("topics", "partitions"), "six"),  # wrong type
        (("delivery", "mode"), "exactly-once"),  # not a choice
        (("ledger", "shards"), 0),  # below the minimum
        (("runtime", "max_concurrent_sessions"), 1.5),  # not an integer
        (("mailboxes", 1, "port"), 70000),  # above the maximum
        (("mailboxes", 1, "delete"), "no"),  # not a boolean
        (("mailboxes", 1, "host"), ""),  # empty string
        (("kafka",), None),  # a required section missing
    ],
)
def test_structural_mistakes_fail_both(path: tuple[Any, ...], value: Any) -> None:
    doc = copy.deepcopy(RICH)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    assert ours(doc) is not None, path
    assert schema_errors(doc) != [], path


def test_cli_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()
