"""A small declarative validator for configuration data.

Why our own: the config is a few dozen keys, and what matters is the error message
(key path, bad value, what is allowed, a "did you mean"), which generic schema libraries
word for machines. Unknown keys are always rejected, so a typo never silently falls back
to a default.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from connector.errors import ConfigError


@dataclass(frozen=True)
class Field:
    """One key of a mapping: its kind, whether it is required and its default."""

    kind: str  # "str", "int", "float", "bool", "map", "list", "any"
    required: bool = False
    default: Any = None
    choices: Sequence[str] | None = None
    minimum: float | None = None
    maximum: float | None = None
    #: for "map": the nested schema; for "list": the schema of each item (when items are maps).
    schema: Mapping[str, Field] | None = None
    #: for "map" without schema: values pass through untouched (e.g. librdkafka settings).
    free_form: bool = False
    check: Callable[[Any, str], None] | None = None
    help: str = ""
    items: str | None = field(default=None)  # for "list" of scalars: the scalar kind
    #: the value may be a secret: error messages never show it, only its type.
    secret: bool = False


def _type_name(value: object) -> str:
    if value is None:
        return "nothing"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "true/false",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _show(value: object, secret: bool = False) -> str:
    if secret:
        return "(value hidden)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_scalar(kind: str, value: Any, path: str, spec: Field) -> Any:
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"{path}: expected a non-empty string, got {_type_name(value)} {_show(value, spec.secret)}"
            )
        if spec.choices is not None and value not in spec.choices:  # choices are never secret
            hint = difflib.get_close_matches(value, list(spec.choices), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{path}: {value!r} is not allowed; use one of: {', '.join(spec.choices)}{extra}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_type_name(value)} {_show(value, spec.secret)}")
        return value
    if kind in ("int", "float"):
        ok = isinstance(value, int) and not isinstance(value, bool)
        if kind == "float":
            ok = ok or isinstance(value, float)
        if not ok:
            want = "an integer" if kind == "int" else "a number"
            raise ConfigError(f"{path}: expected {want}, got {_type_name(value)} {_show(value, spec.secret)}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: {value} is not a finite number")
        if spec.minimum is not None and value < spec.minimum:
            raise ConfigError(f"{path}: {value} is below the minimum {spec.minimum:g}")
        if spec.maximum is not None and value > spec.maximum:
            raise ConfigError(f"{path}: {value} is above the maximum {spec.maximum:g}")
        return float(value) if kind == "float" else value
    if kind == "any":
        return value
    raise AssertionError(f"unknown field kind {kind}")  # pragma: no cover - schema bug


def validate(data: Any, schema: Mapping[str, Field], path: str) -> dict[str, Any]:
    """Check ``data`` against ``schema``; return a new dict with defaults filled in."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'the file'}: expected a mapping of keys, got {_type_name(data)}")
    out: dict[str, Any] = {}
    for key in data:
        if not isinstance(key, str) or key not in schema:
            hint = difflib.get_close_matches(str(key), list(schema), n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"{_join(path, str(key))}: unknown key{extra} (allowed here: {', '.join(sorted(schema))})"
            )
    for key, spec in schema.items():
        p = _join(path, key)
        if key not in data or data[key] is None:
            if spec.required:
                what = f" ({spec.help})" if spec.help else ""
                raise ConfigError(f"{p}: required key is missing{what}")
            if spec.kind == "map" and spec.schema is not None and spec.default is not None:
                out[key] = validate({}, spec.schema, p)  # an absent section still gets its defaults
            else:
                out[key] = spec.default() if callable(spec.default) else spec.default
            continue
        out[key] = _value(data[key], spec, p)
    return out


def _value(value: Any, spec: Field, path: str) -> Any:
    if spec.kind == "map":
        if not isinstance(value, dict):
            what = f" ({spec.help})" if spec.help else ""
            raise ConfigError(f"{path}: expected a mapping{what}, got {_type_name(value)} {_show(value, spec.secret)}")
        result: Any = dict(value) if spec.free_form else validate(value, spec.schema or {}, path)
    elif spec.kind == "list":
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_type_name(value)} {_show(value)}")
        items: list[Any] = []
        for i, item in enumerate(value):
            p = f"{path}[{i}]"
            if spec.schema is not None:
                items.append(validate(item, spec.schema, p))
            else:
                items.append(_check_scalar(spec.items or "any", item, p, Field(spec.items or "any")))
        result = items
    else:
        result = _check_scalar(spec.kind, value, path, spec)
    if spec.check is not None:
        spec.check(result, path)
    return result


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
