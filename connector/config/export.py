"""The configuration schema as JSON Schema (draft 2020-12), generated from ROOT_SCHEMA.

`pop3-kafka config schema` prints it; the Helm chart's values.schema.json embeds it under
``config`` (helm/pop3-kafka, checked by tests/unit/test_helm_values_schema.py so the two cannot
drift). It says what the structure allows: keys (unknown keys are refused, as by our
validator), types, choices, bounds, required keys. Cross-key rules and checks written in
Python (a cron expression, a topic name, "this needs that") stay with `pop3-kafka config
validate`, which is the authority; the chart's tests run it on every rendered ConfigMap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connector import __version__
from connector.config.model import ROOT_SCHEMA
from connector.config.schema import Field

_SCALARS = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}


def json_schema() -> dict[str, Any]:
    """The whole configuration file's JSON Schema."""
    doc = _object(ROOT_SCHEMA)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://pop3-kafka.invalid/schemas/config-{__version__}.json",
        "title": "pop3-kafka configuration",
        "description": "Generated from connector/config/model.py ROOT_SCHEMA; `pop3-kafka config validate` has "
        "the last word (cross-key rules).",
        **doc,
    }


def _object(schema: Mapping[str, Field]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "object",
        "properties": {key: _field(spec) for key, spec in schema.items()},
        "additionalProperties": False,
    }
    required = [key for key, spec in schema.items() if spec.required]
    if required:
        out["required"] = required
    return out


def _field(spec: Field) -> dict[str, Any]:
    out = _shape(spec)
    if spec.default is not None and not callable(spec.default) and spec.kind in _SCALARS:
        out["default"] = spec.default
    if not spec.required:
        # An absent key and a null value mean the same to our validator (the default applies).
        out = {"anyOf": [out, {"type": "null"}]}
    if spec.help:
        out["description"] = spec.help
    return out


def _shape(spec: Field) -> dict[str, Any]:
    if spec.kind in _SCALARS:
        out: dict[str, Any] = {"type": _SCALARS[spec.kind]}
        if spec.kind == "str":
            out["minLength"] = 1
            if spec.choices is not None:
                out["enum"] = list(spec.choices)
        if spec.minimum is not None:
            out["minimum"] = spec.minimum
        if spec.maximum is not None:
            out["maximum"] = spec.maximum
        return out
    if spec.kind == "map":
        if spec.free_form or spec.schema is None:
            return {"type": "object"}
        return _object(spec.schema)
    if spec.kind == "list":
        if spec.schema is not None:
            return {"type": "array", "items": _object(spec.schema)}
        item = _SCALARS.get(spec.items or "any")
        return {"type": "array", "items": {"type": item} if item else {}}
    return {}  # "any"
