"""FULL_TRANSITIVE, offline: every current schema against every earlier version in schemas/history/,
in both directions, with fastavro, so CI catches an incompatible change without a registry.

Data written with the old schema must read with the new one (BACKWARD) and data written with the
new one must read with each old one (FORWARD); for all earlier versions, not just the last
(TRANSITIVE). Schema resolution in fastavro only fails on a path the data takes (a union branch,
an enum symbol), so each pair is exercised with several generated records: every union branch
and every enum symbol in turn, lists empty and full. A deliberately incompatible change is caught
by the same check. Then: a frame written with each schema file, in either framing, still decodes
through connector.consumer.decode_value (old fingerprints and ids resolve).

The server-side check of the same rule is tests/integration/test_schema_registry.py.
"""

from __future__ import annotations

import copy
import io
import json
import re
import struct
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.read import SchemaResolutionError

from connector.consumer import decode_value, known_schemas
from connector.records.avro import load_schema
from connector.records.framing import Framer
from connector.records.subjects import ROLES, SCHEMA_FILES, schema_versions

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
#: variants of generated data per pair: union branch / enum symbol index = variant, modulo their count;
#: the last variant leaves arrays and maps empty.
VARIANTS = 4
EMPTY = VARIANTS - 1


def current_files() -> list[str]:
    return sorted(p.name for p in SCHEMAS.glob("*.avsc"))


def history_of(current: str) -> list[str]:
    stem = current.removesuffix(".avsc")
    found = []
    for p in (SCHEMAS / "history").glob(f"{stem}.v*.avsc"):
        m = re.fullmatch(rf"{re.escape(stem)}\.v(\d+)\.avsc", p.name)
        if m:
            found.append((int(m[1]), f"history/{p.name}"))
    return [f for _, f in sorted(found)]


PAIRS = [(old, cur) for cur in current_files() for old in history_of(cur)]


def raw(file: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / file).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------- sample records


def named_types(node: Any, namespace: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every record, enum and fixed defined anywhere in ``node``, by short and full name: a
    reference may come before the branch that defines it is ever sampled."""
    out = {} if out is None else out
    if isinstance(node, list):
        for item in node:
            named_types(item, namespace, out)
    elif isinstance(node, dict):
        if node.get("type") in ("record", "enum", "fixed"):
            ns = node.get("namespace", namespace)
            name = node["name"]
            out[name.rsplit(".", 1)[-1]] = out[name if "." in name else f"{ns}.{name}"] = node
            namespace = ns
        for key in ("type", "fields", "items", "values"):
            if key in node and not isinstance(node[key], str):
                named_types(node[key], namespace, out)
    return out


def sample(schema: Any, variant: int, named: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A value of ``schema`` (raw JSON form): ``variant`` picks union branches and enum symbols;
    variant EMPTY leaves arrays and maps empty. Recursive named types stop at nulls by depth."""
    named = named_types(schema) if named is None else named
    if isinstance(schema, str):
        if schema in named:
            return sample(named[schema], variant, named, depth)
        return _primitive(schema, variant)
    if isinstance(schema, list):  # union
        branches = schema
        if depth > 6 and "null" in branches:
            return None
        return sample(branches[variant % len(branches)], variant, named, depth + 1)
    t = schema["type"]
    if t == "record":
        return {f["name"]: sample(f["type"], variant, named, depth + 1) for f in schema["fields"]}
    if t == "enum":
        return schema["symbols"][variant % len(schema["symbols"])]
    if t == "fixed":
        return bytes(schema["size"])
    if t == "array":
        return [] if variant == EMPTY else [sample(schema["items"], variant, named, depth + 1) for _ in range(2)]
    if t == "map":
        return {} if variant == EMPTY else {"k": sample(schema["values"], variant, named, depth + 1)}
    return _primitive(t, variant)


def _primitive(t: str, variant: int) -> Any:
    return {
        "null": None,
        "boolean": variant % 2 == 0,
        "int": 7 + variant,
        "long": 1_700_000_000_000 + variant,
        "float": 1.5,
        "double": 2.5,
        "bytes": b"bytes-%d" % variant,
        "string": f"text-{variant}",
    }[t]


def write(schema_raw: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema_raw), record, strict=True)
    return buf.getvalue()


def incompatibilities(writer: dict[str, Any], reader: dict[str, Any]) -> list[str]:
    """Why data of ``writer`` cannot be read with ``reader`` (empty: it can, for every variant)."""
    problems = []
    w, r = fastavro.parse_schema(copy.deepcopy(writer)), fastavro.parse_schema(copy.deepcopy(reader))
    for variant in range(VARIANTS):
        data = write(writer, sample(writer, variant))
        try:
            fastavro.schemaless_reader(io.BytesIO(data), w, r)
        except (SchemaResolutionError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"variant {variant}: {type(exc).__name__}: {exc}")
    return problems


def full_problems(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """FULL: old data read with new (backward) and new data read with old (forward)."""
    return [f"backward {p}" for p in incompatibilities(old, new)] + [
        f"forward {p}" for p in incompatibilities(new, old)
    ]


# ------------------------------------------------------------------------- the rule


def test_mail_records_and_dead_letters_have_earlier_versions() -> None:
    # Otherwise the parametrised check below would pass by having nothing to check.
    assert {cur for _, cur in PAIRS} >= {"mail_record.avsc", "dead_letter.avsc"}


@pytest.mark.parametrize(("old", "current"), PAIRS, ids=[f"{c}<->{o}" for o, c in PAIRS])
def test_full_transitive_against_every_earlier_version(old: str, current: str) -> None:
    assert full_problems(raw(old), raw(current)) == []


@pytest.mark.parametrize("current", current_files())
def test_history_versions_are_fully_compatible_among_themselves(current: str) -> None:
    # Transitive also means every later history version against every earlier one.
    files = history_of(current)
    for i, newer in enumerate(files):
        for older in files[:i]:
            assert full_problems(raw(older), raw(newer)) == [], (older, newer)


def test_the_generated_data_takes_every_union_branch() -> None:
    # The check is only as good as its data: some variant must write a non-null attachment
    # reference and some a null one, or a broken union would go unnoticed.
    mail = raw("mail_record.avsc")
    seen = set()
    for variant in range(VARIANTS):
        rec = sample(mail, variant)
        for att in rec["attachments"]:
            seen.add(att["ref"] is None)
    assert seen == {True, False}


def test_a_new_required_field_is_caught() -> None:
    new = raw("mail_record.avsc")
    new["fields"].append({"name": "tenant", "type": "string", "doc": "no default: old data lacks it"})
    problems = full_problems(raw(history_of("mail_record.avsc")[0]), new)
    assert any(p.startswith("backward") and "tenant" in p for p in problems), problems


def test_a_removed_field_without_default_is_caught() -> None:
    new = raw("dead_letter.avsc")
    new["fields"] = [f for f in new["fields"] if f["name"] != "reason"]
    problems = full_problems(raw("dead_letter.avsc"), new)
    assert any(p.startswith("forward") and "reason" in p for p in problems), problems


def test_a_changed_type_is_caught() -> None:
    chunk = raw("attachment_chunk.avsc")
    changed = copy.deepcopy(chunk)
    for f in changed["fields"]:
        if f["name"] == "record_id":
            f["type"] = "long"
    assert full_problems(chunk, changed)


def test_a_dropped_union_branch_is_caught() -> None:
    # "subject" becomes a plain string: old mail without a subject (null) no longer reads.
    mail = raw("mail_record.avsc")
    narrowed = copy.deepcopy(mail)
    for f in narrowed["fields"]:
        if f["name"] == "subject":
            assert f["type"] == ["null", "string"]
            f["type"], f["default"] = "string", ""
    assert any(p.startswith("backward") for p in full_problems(mail, narrowed))


def test_a_dropped_enum_symbol_is_caught() -> None:
    # The ledger has the only enum of our schemas (no default symbol: a dropped one is fatal).
    ledger = raw("ledger_entry.avsc")
    narrowed = copy.deepcopy(ledger)
    enum = next(e for e in named_types(narrowed).values() if e["type"] == "enum" and len(e["symbols"]) > 1)
    enum["symbols"] = enum["symbols"][:1]
    assert any(p.startswith("backward") for p in full_problems(ledger, narrowed))


# ------------------------------------------------------------------------- old frames still decode


KIND = {
    "io.pop3kafka.MailRecord": "mail",
    "io.pop3kafka.DeadLetter": "dead_letter",
    "io.pop3kafka.AttachmentChunk": "chunk",
}
CONSUMER_FILES = [k.file for k in known_schemas() if k.name in KIND]


@pytest.mark.parametrize("file", sorted(CONSUMER_FILES))
def test_a_single_object_frame_of_every_schema_file_decodes(file: str) -> None:
    schema = load_schema(file)
    record = sample(raw(file), 0)
    value = Framer().encode(schema, record)
    assert value[:2] == b"\xc3\x01" and value[2:10] == schema.fingerprint
    d = decode_value(value)
    version = next(k.version for k in known_schemas() if k.file == file)
    assert (d.kind, d.schema_version, d.framing) == (KIND[schema.name], version, "single_object")
    assert d.record["record_id"] == record["record_id"]


class IdRegistry:
    """A registry by schema id, as decode_value needs it (SchemaRegistryClient.get_schema)."""

    class Registered:
        def __init__(self, text: str) -> None:
            self.schema_str, self.schema_type = text, "AVRO"

    def __init__(self) -> None:
        self.by_id: dict[int, IdRegistry.Registered] = {}

    def get_schema(self, schema_id: int) -> IdRegistry.Registered:
        return self.by_id[schema_id]


@pytest.mark.parametrize("role", ROLES)
def test_registry_frames_of_every_version_decode_with_the_registry(role: str) -> None:
    registry = IdRegistry()
    versions = schema_versions(SCHEMA_FILES[role])  # type: ignore[index]
    for sid, v in enumerate(versions, start=41):
        registry.by_id[sid] = IdRegistry.Registered(v.text)
        record = sample(raw(v.file), 1)
        value = Framer("schema_registry", {v.schema.fingerprint: sid}).encode(v.schema, record)
        assert value[:5] == b"\x00" + struct.pack(">I", sid)
        d = decode_value(value, registry=registry)
        assert (d.framing, d.schema_id, d.schema_version) == ("registry", sid, v.version)
        assert d.record["record_id"] == record["record_id"]


def test_registry_texts_are_the_files_without_whitespace() -> None:
    for role in ROLES:
        for v in schema_versions(SCHEMA_FILES[role]):
            assert json.loads(v.text) == raw(v.file)
            assert "\n" not in v.text
