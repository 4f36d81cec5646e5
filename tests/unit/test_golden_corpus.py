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

import email
import email.policy
import hashlib
import json
from datetime import UTC, datetime
from email.message import EmailMessage, Message
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
    assert differences({"l": [1]}, {"l": [1, 2]}) == [".l: expected 1 items, got 2: [1, 2]"]
    assert differences({"a": None}, {"a": 0}) == [".a: expected None, got 0"]
    assert differences({"a": True}, {"a": 1}) == [".a: expected True, got 1"]
    assert differences({"m": {"x": 1}}, {}) == [".m: missing from the record"]


# ---------------------------------------------------------------- differential check vs the stdlib

STDLIB_WRONG: dict[str, frozenset[str]] = {
    "subject": frozenset(
        {
            "charset-iso-8859-8-i",
            "charset-unknown-8bit",
            "charset-x-user-defined",
            "charset-ks-c-5601-1987",
            "rfc2047-gbk-labelled-gb2312",
            "obsolete-header-syntax",
        }
    ),
    "from": frozenset({"rfc6532-raw-utf8"}),
    "to": frozenset({"rfc6532-raw-utf8", "obsolete-header-syntax"}),
    "date": frozenset({"date-two-digit-year", "date-three-digit-year"}),
    "filenames": frozenset({"rfc2231-wins-over-plain"}),
    "text_body": frozenset(
        {
            "charset-cp-850",
            "charset-iso-8859-8-i",
            "charset-uft-8",
            "charset-unknown-8bit",
            "charset-unknown-label",
            "charset-x-user-defined",
            "charset-ks-c-5601-1987",
            "rfc2047-gbk-labelled-gb2312",
            "qp-trailing-whitespace",
            "obsolete-header-syntax",
        }
    ),
}
BY_DESIGN: dict[str, frozenset[str]] = {
    "from": frozenset({"address-comments-and-obsolete"}),
    "to": frozenset({"cpython-msg25"}),
}
ADDRESS_FIELDS = {"from": "from", "to": "to", "cc": "cc", "reply_to": "reply-to", "bcc": "bcc"}


def _stdlib_fields(raw: bytes) -> dict[str, Any]:
    """The compared fields as ``email.policy.default`` sees them; an exception becomes a value."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    out: dict[str, Any] = {}

    def guarded(field: str, compute: Any) -> None:
        try:
            out[field] = compute()
        except Exception as exc:  # the stdlib failing is a result to compare, not a test error
            out[field] = f"raised {type(exc).__name__}"

    def header(name: str) -> str | None:
        value = msg[name]
        return None if value is None else str(value)

    def date() -> int | None:
        value = msg["date"]
        if value is None or value.datetime is None:
            return None
        dt = value.datetime if value.datetime.tzinfo else value.datetime.replace(tzinfo=UTC)
        return round(dt.timestamp() * 1000)

    def addresses(name: str) -> list[tuple[str, str]]:
        value = msg[name]
        return [] if value is None else [(a.display_name, a.addr_spec) for a in value.addresses]

    def tree() -> tuple[list[str], dict[str, Message]]:
        types: list[str] = []
        by_path: dict[str, Message] = {}
        stack: list[tuple[Message, str]] = [(msg, "")]
        while stack:
            part, path = stack.pop()
            types.append(part.get_content_type())
            by_path[path] = part
            if part.get_content_maintype() == "multipart" and part.is_multipart():
                children = [(c, f"{path}.{i}" if path else str(i)) for i, c in enumerate(part.get_payload(), 1)]
                stack.extend(reversed(children))
        return types, by_path

    def body(kind: str) -> str | None:
        found = msg.get_body((kind,))
        return None if found is None else found.get_content()

    guarded("subject", lambda: header("subject"))
    guarded("message_id", lambda: None if msg["message-id"] is None else str(msg["message-id"]).strip())
    guarded("date", date)
    for field, name in ADDRESS_FIELDS.items():
        guarded(field, lambda name=name: addresses(name))
    types, by_path = tree()
    out["content_types"] = types
    out["filenames_by_path"] = {path: part.get_filename() for path, part in by_path.items()}
    guarded("text_body", lambda: body("plain"))
    guarded("html_body", lambda: body("html"))
    return out


@pytest.mark.parametrize("name", [p.stem for p in MAILS])
def test_agrees_with_stdlib_where_it_is_right(name: str) -> None:
    """Differential check: our record against ``email.policy.default`` (the modern stdlib API).

    For every corpus mail the fields below are computed both ways and must agree, except on the mails
    listed here, where they must *differ* (so the list cannot go stale):

    Fields compared: subject, message_id, from/to/cc/reply-to/bcc as (display name, addr-spec)
    pairs, date (as an instant), the MIME tree's content types in document order (without entering
    message/* parts), the filename of every attachment part, text_body and html_body (via
    ``get_body()`` and ``get_content()``).

    Where the stdlib is known wrong, and the mails that show it:

    * subject: encoded words in a charset label Python does not know, or knows as a smaller set,
      become U+FFFD: charset-iso-8859-8-i (RFC 1556 label), charset-unknown-8bit (RFC 1428),
      charset-x-user-defined, charset-ks-c-5601-1987 (cp949 syllable outside EUC-KR),
      rfc2047-gbk-labelled-gb2312 (GBK character under a gb2312 label); obsolete-header-syntax
      (RFC 5322 §4.5 'Subject :' is not recognised, the field is lost).
    * from/to: raw UTF-8 addresses (RFC 6532 §3.2) come back as lone surrogates: rfc6532-raw-utf8;
      'To :' (obsolete syntax) is lost: obsolete-header-syntax.
    * date: two-digit years 50-68 map to 20xx and three-digit years are taken literally, against
      RFC 5322 §4.3: date-two-digit-year, date-three-digit-year.
    * attachment filename: the plain ``filename=`` wins over RFC 2231 ``filename*=``:
      rfc2231-wins-over-plain.
    * text_body: unknown or misspelt charset labels raise LookupError in ``get_content()``:
      charset-cp-850, charset-iso-8859-8-i, charset-uft-8, charset-unknown-8bit,
      charset-unknown-label, charset-x-user-defined; aliases decoded with a smaller codec lose
      characters: charset-ks-c-5601-1987, rfc2047-gbk-labelled-gb2312; transport whitespace is
      kept and a soft line break followed by it is not one (RFC 2045 §6.7 rules 3 and 5):
      qp-trailing-whitespace; obsolete-header-syntax (the header block ends early, so the body
      starts with header fields).

    Where we differ on purpose (neither is wrong by the RFCs):

    * from: the legacy ``addr (Full Name)`` comment is kept as the display name by us
      (email.utils.getaddresses), dropped by the stdlib: address-comments-and-obsolete.
    * to: a mail with two To fields (forbidden by RFC 5322 §3.6) gives both fields' addresses in our
      record, only the first field's in the stdlib's: cpython-msg25.

    The modern API is right where decision 0001 found ``email.header.decode_header`` wrong:
    adjacent encoded words with a UTF-8 character split between them (rfc2047-split-utf8) and raw
    UTF-8 in unstructured fields (rfc6532-raw-utf8, subject) agree with ours.
    """
    raw = (CORPUS / f"{name}.eml").read_bytes()
    ours = record_of(name)
    std = _stdlib_fields(raw)
    pairs: dict[str, tuple[Any, Any]] = {
        "subject": (ours["subject"], std["subject"]),
        "message_id": (ours["message_id"], std["message_id"]),
        "date": (ours["date"], std["date"]),
        "content_types": ([p["content_type"] for p in ours["parts"]], std["content_types"]),
        "filenames": (
            [a["filename"] for a in ours["attachments"] if a["kind"] != "uuencoded"],
            [std["filenames_by_path"].get(a["part"]) for a in ours["attachments"] if a["kind"] != "uuencoded"],
        ),
        "text_body": (ours["text_body"], std["text_body"]),
        "html_body": (ours["html_body"], std["html_body"]),
    }
    for field in ADDRESS_FIELDS:
        pairs[field] = ([(a["name"], a["address"]) for a in ours[field]], std[field])
    for field, (mine, theirs) in pairs.items():
        if name in STDLIB_WRONG.get(field, ()) or name in BY_DESIGN.get(field, ()):
            assert mine != theirs, f"{field}: now agrees with the stdlib; update the lists and the docstring"
        else:
            assert mine == theirs, f"{field}: ours {mine!r}, stdlib {theirs!r}"


def test_differential_lists_are_documented() -> None:
    names = {p.stem for p in MAILS}
    doc = test_agrees_with_stdlib_where_it_is_right.__doc__ or ""
    for table in (STDLIB_WRONG, BY_DESIGN):
        for field, mails in table.items():
            assert mails <= names, f"{field}: not in the corpus: {mails - names}"
            for mail in mails:
                assert mail in doc, f"{mail} ({field}) is not named in the docstring"
