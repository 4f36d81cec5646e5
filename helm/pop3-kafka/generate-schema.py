#!/usr/bin/env python3
"""Embed the connector's configuration schema in the chart's values.schema.json.

values.schema.json is edited by hand except ``properties.config``: that is the JSON Schema
``pop3-kafka config schema`` prints (connector/config/export.py, generated from
connector/config/model.py), without its ``$schema`` (the file has one at its root). Helm checks
``config`` against it before rendering, so a typo in a key fails ``helm install`` instead of the
pod. tests/unit/test_helm_values_schema.py fails when the file is stale.

    .venv/bin/python helm/pop3-kafka/generate-schema.py          # rewrite values.schema.json
    .venv/bin/python helm/pop3-kafka/generate-schema.py --check  # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parent
REPO = CHART.parents[1]
SCHEMA_FILE = CHART / "values.schema.json"
COMMAND = ".venv/bin/python helm/pop3-kafka/generate-schema.py"


def config_schema() -> dict[str, Any]:
    """What `pop3-kafka config schema` prints, as the chart embeds it."""
    sys.path.insert(0, str(REPO))
    from connector.config.export import json_schema  # noqa: PLC0415 - importable once REPO is on the path

    return {k: v for k, v in json_schema().items() if k != "$schema"}


def render(current: str) -> str:
    """``current`` (the file's text) with properties.config replaced by the connector's schema."""
    doc = json.loads(current)
    doc["properties"]["config"] = config_schema()
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file is stale")
    args = parser.parse_args(argv)
    current = SCHEMA_FILE.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if current != wanted:
            print(f"{SCHEMA_FILE.relative_to(REPO)} is stale: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        SCHEMA_FILE.write_text(wanted, encoding="utf-8")
        print(f"wrote {SCHEMA_FILE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
