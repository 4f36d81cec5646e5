"""The golden corpus: tests/fixtures/mail/*.eml decoded into MailRecords and checked field by field.

Every ``<name>.eml`` has a ``<name>.json`` holding the subset of MailRecord fields (names as in
schemas/mail_record.avsc) that the mail checks. Comparison rules:

* only the keys present are compared, at every level of nesting (dicts are subsets);
* lists are compared whole: same length, item by item (an item that is a dict is again a subset,
  so an ``attachments`` or ``parts`` entry lists only the keys that case is about);
* keys starting with ``_`` are notes: ``_hand_written`` marks an expectation written by hand from
  the RFCs (``_why`` cites the section), not a snapshot of our output; ``_source`` names the origin
  of mails taken from elsewhere (tests/fixtures/mail/SOURCES.md).

Each record is built with a fixed Provenance and goes through Avro single-object encoding and
decoding before it is compared, so every corpus mail also proves that the record fits the schema.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from connector.decoding import decode_mail
from connector.records import Provenance, build_mail_record, decode_single_object, encode_single_object, mail_schema

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "mail"
MAILS = sorted(CORPUS.glob("*.eml"))
FETCHED_AT = 1767258000000  # 2026-01-01T09:00:00Z


def provenance(name: str, raw: bytes) -> Provenance:
    return Provenance(
        mailbox_id="golden",
        uidl=name,
        server="pop.example.test:995",
        fetched_at_millis=FETCHED_AT,
        raw_size=len(raw),
        raw_sha256=hashlib.sha256(raw).hexdigest(),
    )


def _plain(value: Any) -> Any:
    """The reader's view of a record with logical types turned back into what the writer got."""
    if isinstance(value, datetime):
        return round(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@cache
def record_of(name: str) -> dict[str, Any]:
    """Decode, build, Avro-encode and decode again; the round trip must be lossless."""
    raw = (CORPUS / f"{name}.eml").read_bytes()
    built = build_mail_record(decode_mail(raw), provenance(name, raw))
    frame = encode_single_object(mail_schema(), built)
    back = _plain(decode_single_object(frame))
    assert back == built, f"{name}: the record changed in the Avro round trip"
    return back


def expectation(name: str) -> dict[str, Any]:
    data = json.loads((CORPUS / f"{name}.json").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def differences(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Where ``actual`` does not match ``expected`` under the subset rules of this module."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where or '.'}: expected an object, got {actual!r}"]
        found: list[str] = []
        for key, value in expected.items():
            if key.startswith("_"):
                continue
            if key not in actual:
                found.append(f"{where}.{key}: missing from the record")
            else:
                found += differences(value, actual[key], f"{where}.{key}")
        return found
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{where}: expected a list, got {actual!r}"]
        if len(expected) != len(actual):
            return [f"{where}: expected {len(expected)} items, got {len(actual)}: {actual!r}"]
        found = []
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            found += differences(e, a, f"{where}[{i}]")
        return found
    if expected != actual or type(expected) is not type(actual):
        return [f"{where}: expected {expected!r}, got {actual!r}"]
    return []


@pytest.mark.parametrize("name", [p.stem for p in MAILS])
def test_golden_mail(name: str) -> None:
    found = differences(expectation(name), record_of(name))
    assert not found, "\n".join(found)


def test_corpus_shape() -> None:
    names = {p.stem for p in MAILS}
    assert len(names) >= 60
    assert names == {p.stem for p in CORPUS.glob("*.json")}, "every .eml needs its .json and vice versa"
    hand = [n for n in sorted(names) if expectation(n).get("_hand_written")]
    assert len(hand) >= 20
    for name in hand:
        why = expectation(name).get("_why", "")
        assert "RFC" in why or "MS-OXTNEF" in why, f"{name}: a hand-written expectation cites its source"
    for name in names - set(hand):
        # The rest are reviewed snapshots; those taken from elsewhere say where from.
        assert name.startswith("cpython-") == ("_source" in expectation(name)), name


def test_differences_helper() -> None:
    assert differences({"a": 1, "_note": "x"}, {"a": 1, "b": 2}) == []
    assert differences({"l": [{"k": 1}]}, {"l": [{"k": 1, "z": 0}]}) == []
    assert differences({"l": [1]}, {"l": [1, 2]}) == ["l: expected 1 items, got 2: [1, 2]".replace("l:", ".l:")]
    assert differences({"a": None}, {"a": 0}) == [".a: expected None, got 0"]
    assert differences({"a": True}, {"a": 1}) == [".a: expected True, got 1"]
    assert differences({"m": {"x": 1}}, {}) == [".m: missing from the record"]
