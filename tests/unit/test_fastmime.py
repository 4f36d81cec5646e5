"""connector.decoding.fastmime: the MIME splitter on bytes that replaced the stdlib's compat32 parser.

Two kinds of tests:

* unit tests of the splitter, named after the rule they check (RFC 2046 §5.1.1 delimiters and
  the compat32 repairs mime.py relies on). Each also checks that compat32 builds the same tree;
* a differential test: every mail we have, and thousands of seeded hostile ones, parsed by both
  splitters must give the same tree (header fields, content types, defects, preamble, epilogue,
  payloads) and the same ``decode_mail`` result (the whole DecodedMail, or the same exception).

Intentional differences are listed in KNOWN_DIFFERENCES with the reason; there are two.
"""

from __future__ import annotations

import binascii
import contextlib
import dataclasses
import email.message
import email.parser
import email.policy
import email.utils
import glob
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from support.mailgen import SHAPES, make_mail
from support.mimefuzz import deep_mail, mutate, random_mail

from connector.decoding import DecodedMail, decode_mail, fastmime, mime
from connector.decoding.fastmime import PARSER, Entity, Node, _boundary
from connector.errors import DecodeError

REPO = Path(__file__).resolve().parents[2]
COMPAT32 = email.parser.BytesParser(policy=email.policy.compat32)


# ---------------------------------------------------------------- comparing the two splitters


@pytest.fixture(autouse=True)
def fixed_signature_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two decodes of a signed mail compare equal only with one validation moment."""
    from connector.decoding import signature

    monkeypatch.setattr(signature, "_now", lambda: datetime(2026, 1, 1, tzinfo=UTC))


def tree(entity: Entity) -> dict[str, Any]:
    """Everything mime.py can read of a parsed entity, as plain data."""
    out: dict[str, Any] = {
        "headers": list(entity.raw_items()),
        "len": len(entity),
        "type": entity.get_content_type(),
        "maintype": entity.get_content_maintype(),
        "defects": [type(d).__name__ for d in entity.defects],
        "preamble": entity.preamble,
        "epilogue": entity.epilogue,
    }
    if entity.is_multipart():
        out["children"] = [tree(child) for child in entity.get_payload()]
    else:
        out["payload"] = getattr(entity, "_payload", None)
    return out


def split(raw: bytes) -> dict[str, Any]:
    """The fast tree, after checking that compat32 builds the same one."""
    fast = tree(PARSER.parsebytes(raw))
    assert fast == tree(COMPAT32.parsebytes(raw))
    return fast


@contextmanager
def splitter(name: str) -> Iterator[None]:
    saved = mime._PARSER
    mime._PARSER = mime.SPLITTERS[name]
    try:
        yield
    finally:
        mime._PARSER = saved


def outcome(raw: bytes, kwargs: dict[str, Any], name: str) -> DecodedMail | tuple[str, str, str]:
    with splitter(name):
        try:
            return decode_mail(raw, **kwargs)
        except DecodeError as exc:
            return (type(exc).__name__, exc.reason, str(exc))


def tree_or_error(parser: Any, raw: bytes) -> dict[str, Any] | str:
    try:
        return tree(parser.parsebytes(raw))
    except RecursionError:
        return "RecursionError"  # decode_mail turns it into MailTooLargeError(max_depth)
    except Exception as exc:
        return f"raises {type(exc).__name__}"


# ---------------------------------------------------------------- intentional differences

_MIXED_RFC2231_BOUNDARY = re.compile(rb"(?i)boundary\*=.*boundary\*0\*?=|boundary\*0\*?=.*boundary\*=")


@dataclass(frozen=True)
class KnownDifference:
    reason: str
    applies: Callable[[bytes], bool]
    #: compat32's result and ours, as tree_or_error / outcome report them
    check: Callable[[Any, Any, Any, Any], bool]


def _same_but_detached_verdicts(c32: object, fast: object) -> bool:
    """Both decoded the same, except that compat32's detached signature verdicts say it has no
    offsets (and the warnings or errors that follow from the verdict)."""
    if not (isinstance(c32, DecodedMail) and isinstance(fast, DecodedMail)) or c32.smime is None or fast.smime is None:
        return False
    c32_sigs, fast_sigs = c32.smime.signatures, fast.smime.signatures
    if len(c32_sigs) != len(fast_sigs):
        return False
    for a, b in zip(c32_sigs, fast_sigs, strict=True):
        if a.type == "detached" and "keeps no offsets" in (a.detail or ""):
            continue
        if a != b:
            return False
    return dataclasses.replace(c32, smime=None) == dataclasses.replace(fast, smime=None)


KNOWN_DIFFERENCES = {
    "rfc2231-contradicting-boundary": KnownDifference(
        reason=(
            "CPython 3.11's compat32 raises TypeError decoding a boundary given as both 'boundary*=' and "
            "'boundary*0=' (RFC 2231 forms that contradict each other), which dead-letters the whole mail. "
            "fastmime treats that multipart as having no usable boundary (NoBoundaryInMultipartDefect): "
            "the mail is delivered, the multipart kept as one opaque part, with a warning."
        ),
        applies=lambda raw: bool(_MIXED_RFC2231_BOUNDARY.search(raw)),
        check=lambda c32_tree, fast_tree, c32_mail, fast_mail: (
            c32_tree == "raises TypeError"
            and isinstance(fast_tree, dict)
            and c32_mail == ("DecodeError", "unknown", "unexpected TypeError while decoding the mail")
            and (
                not isinstance(fast_mail, DecodedMail) or any("NoBoundaryInMultipart" in w for w in fast_mail.warnings)
            )
        ),
    ),
    "detached-signature-offsets": KnownDifference(
        reason=(
            "A detached S/MIME signature (multipart/signed) is checked over the exact bytes the splitter "
            "parsed the first part from: fastmime records them (Node.span); compat32 keeps no offsets, so "
            "with it every such layer is 'malformed' ('the stdlib splitter keeps no offsets'). Everything "
            "else of the decoded mail is the same."
        ),
        applies=lambda raw: b"multipart/signed" in raw.lower(),
        check=lambda c32_tree, fast_tree, c32_mail, fast_mail: (
            c32_tree == fast_tree and _same_but_detached_verdicts(c32_mail, fast_mail)
        ),
    ),
}
# Not a difference in practice, so not in the table: nesting so deep that Python's recursion
# limit is hit. Both splitters use one frame per level and both turn the overflow into
# MailTooLargeError(reason="max_depth"); only between about 980 and 990 levels does one of
# them overflow where the other still parses (the message then names the parser rather than
# the configured max_depth). test_nesting_beyond_the_recursion_limit checks both sides of it.


# ---------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    kwargs: dict[str, Any]


def _parametrizations(fn: Callable[..., Any]) -> list[dict[str, Any]] | None:
    """Argument sets of a plain test function from its parametrize marks; None if it needs fixtures."""
    axes: list[list[dict[str, Any]]] = []
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        values = []
        for entry in mark.args[1]:
            given = entry.values if hasattr(entry, "values") else entry  # pytest.param(...)
            if len(names) == 1:
                given = given if isinstance(given, tuple) and len(given) == 1 else (given,)
            values.append(dict(zip(names, given, strict=True)))
        axes.append(values)
    combos = [dict(itertools.chain.from_iterable(d.items() for d in combo)) for combo in itertools.product(*axes)]
    wanted = set(inspect.signature(fn).parameters)
    return combos if all(set(c) == wanted for c in combos) else None


def recorded_inputs(module_name: str) -> list[Case]:
    """Every decode_mail call made by the plain (fixture-free, non-hypothesis) tests of a module."""
    module = importlib.import_module(module_name)
    calls: list[Case] = []
    real = module.decode_mail

    def recorder(raw: bytes, **kwargs: Any) -> DecodedMail:
        calls.append(Case(f"{module_name}:{current}", bytes(raw), kwargs))
        return real(raw, **kwargs)  # type: ignore[no-any-return]

    module.decode_mail = recorder
    try:
        for current, fn in sorted(vars(module).items()):
            if not current.startswith("test_") or not callable(fn) or hasattr(fn, "hypothesis"):
                continue
            for kwargs in _parametrizations(fn) or []:
                # Only the inputs matter here; the test itself runs (and must pass) in its own module.
                with contextlib.suppress(Exception, pytest.skip.Exception, pytest.fail.Exception):
                    fn(**kwargs)
    finally:
        module.decode_mail = real
    return calls


def _bench_mails(count: int) -> list[bytes]:
    spec = importlib.util.spec_from_file_location("bench_parsers", REPO / "bench" / "parsers.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = random.Random(20250303)
    return [bench.build_mail(rng, n) for n in range(count)]


# Hand-made cases for the rarer paths of compat32's reading (each one was a question while
# writing fastmime); they are also seeds for the mutations below.
EDGE_CASES = (
    b"Subject: a\r\nFrom x\r\n\r\nbody",
    b"Subject: a\r\nFrom x\r\r\n\nbody",
    b"Content-Type: multipart/mixed; boundary=b\r\nFrom x\r\n\r\npre\r\n--b\r\nX: y\r\n\r\nz\r\n--b--\r\n",
    b"Content-Type: message/rfc822\r\nFrom x\r\n\r\nSubject: inner\r\n\r\nbody",
    b"Content-Type: message/delivery-status\r\nFrom x\r\n\r\nA: b\r\n\r\nC: d\r\n",
    b"Content-Type: multipart/mixed; boundary*=x; boundary*0=y\r\n\r\nbody",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b--\r\nafter\r\n--b\r\nx\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n--b--\r\nX: y\r\n\r\nz\r\n--b--\r\n",
    b'Content-Type: multipart/mixed; boundary="a:b"\r\n\r\n'
    b"--a:b\r\nContent-Type: text/plain\r\n--a:b\r\nq\r\n--a:b--\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\n"
    b"A: b\r\nnot a field\r\n\r\nC: d\r\n\r\n--b--",
    b"Content-Type: message/delivery-status\r\n\r\nContent-Type: multipart/mixed; boundary=q\r\n\r\n"
    b"--q\r\nA: b\r\n\r\nbody\r\n--q--\r\n\r\nX: y",
    b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\nx\r\n----\r\n',
    b'Content-Type: multipart/mixed; boundary="b\r\n c"\r\n\r\n--b\r\n c\r\nx\r\n',
    b"Subject: x\rContent-Type: multipart/mixed; boundary=b\r\r--b\rX: 1\r\rq\r--b--\r",
    b"Content-Type: multipart/mixed; boundary=b\xff\r\n\r\n--b\xff\r\nx\r\n--b\xff--\r\n",
)


def corpus() -> list[Case]:
    cases: list[Case] = [Case(f"edge case {i}", raw, {}) for i, raw in enumerate(EDGE_CASES)]
    for module_name in ("test_decoding", "test_decoding_v2"):
        cases += recorded_inputs(module_name)
    for seed in range(12):
        for i, shape in enumerate(SHAPES):
            cases.append(Case(f"mailgen {shape} seed {seed}", make_mail(i + seed, shape, seed)[0], {}))
    for path in sorted(glob.glob("/usr/lib/python3.11/test/test_email/data/msg_*.txt")):
        cases.append(Case(f"cpython {Path(path).name}", Path(path).read_bytes(), {}))
    for path in sorted((REPO / "tests" / "fixtures" / "mail").glob("*.eml")):
        cases.append(Case(f"fixture {path.name}", path.read_bytes(), {}))
    cases += [Case(f"bench mail {n}", raw, {}) for n, raw in enumerate(_bench_mails(20))]
    seeds = [c.raw for c in cases]
    for seed in range(2500):
        rng = random.Random(seed)
        cases.append(Case(f"random_mail seed {seed}", random_mail(rng), {}))
    for seed in range(40):
        cases.append(Case(f"deep_mail seed {seed}", deep_mail(random.Random(seed)), {}))
    for seed in range(3000):
        rng = random.Random(1_000_000 + seed)
        base = rng.choice(seeds) if seed % 2 else random_mail(rng)
        cases.append(Case(f"mutate seed {1_000_000 + seed}", mutate(rng, base), {}))
    return cases


def test_both_splitters_give_the_same_tree_and_the_same_decoded_mail() -> None:
    cases = corpus()
    recorded = sum(1 for c in cases if c.name.startswith("test_"))
    assert recorded >= 50, "the decoding tests' inputs were not recorded"
    assert len(cases) >= 5000
    known: dict[str, int] = dict.fromkeys(KNOWN_DIFFERENCES, 0)
    unexpected: list[str] = []
    for case in cases:
        fast_tree, c32_tree = tree_or_error(PARSER, case.raw), tree_or_error(COMPAT32, case.raw)
        fast_mail, c32_mail = outcome(case.raw, case.kwargs, "fast"), outcome(case.raw, case.kwargs, "compat32")
        if fast_tree == c32_tree and fast_mail == c32_mail:
            continue
        excuse = next(
            (
                key
                for key, diff in KNOWN_DIFFERENCES.items()
                if diff.applies(case.raw) and diff.check(c32_tree, fast_tree, c32_mail, fast_mail)
            ),
            None,
        )
        if excuse is not None:
            known[excuse] += 1
            continue
        what = "tree" if fast_tree != c32_tree else "decoded mail"
        unexpected.append(f"{case.name}: {what} differs (sha256 {hashlib.sha256(case.raw).hexdigest()[:16]})")
    assert not unexpected, f"{len(unexpected)} of {len(cases)} mails differ:\n" + "\n".join(unexpected[:20])


# ---------------------------------------------------------------- header section (RFC 5322 §2.2, §3.5)


def test_header_fields_keep_folding_and_lose_only_leading_blanks_and_the_final_line_break() -> None:
    t = split(b"Subject:   Hello\r\n there\r\n\tagain  \r\nX-Empty:\r\nX-Sp: \r\n\r\nbody")
    assert t["headers"] == [("Subject", "Hello\r\n there\r\n\tagain  "), ("X-Empty", ""), ("X-Sp", "")]
    assert t["payload"] == "body"
    assert t["defects"] == []


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"])
def test_lines_end_in_crlf_lf_or_bare_cr(eol: bytes) -> None:
    raw = eol.join([b"Subject: a", b" b", b"", b"line 1", b"line 2"])
    t = split(raw)
    assert t["headers"] == [("Subject", "a" + eol.decode() + " b")]
    assert t["payload"] == f"line 1{eol.decode()}line 2"


def test_8bit_header_bytes_are_surrogate_escaped() -> None:
    t = split(b"X-Name: J\xc3\xb6rg \xff\r\n\r\n")
    assert t["headers"] == [("X-Name", "J\udcc3\udcb6rg \udcff")]


def test_no_header_section() -> None:
    t = split(b"just text\r\nmore")
    assert t["headers"] == []
    assert t["defects"] == ["MissingHeaderBodySeparatorDefect"]
    assert t["payload"] == "just text\r\nmore"
    assert split(b"\r\nbody")["payload"] == "body"  # empty header section, then the body


def test_missing_empty_line_starts_the_body_at_the_first_non_field_line() -> None:
    t = split(b"Subject: x\r\nnot a field\r\nmore\r\n")
    assert t["headers"] == [("Subject", "x")]
    assert t["defects"] == ["MissingHeaderBodySeparatorDefect"]
    assert t["payload"] == "not a field\r\nmore\r\n"


def test_mbox_from_lines() -> None:
    # First line: the mbox envelope, not a field. Elsewhere: a defect, dropped. Last before the
    # empty line: the first line of the body (and the empty line is gone).
    assert split(b"From a@b Mon\r\nSubject: x\r\n\r\nbody")["headers"] == [("Subject", "x")]
    t = split(b"Subject: x\r\nFrom a@b Mon\r\nX: y\r\n\r\nbody")
    assert (t["headers"], t["defects"]) == ([("Subject", "x"), ("X", "y")], ["MisplacedEnvelopeHeaderDefect"])
    t = split(b"Subject: x\r\nFrom a@b Mon\r\n\r\nbody")
    assert (t["headers"], t["payload"]) == ([("Subject", "x")], "From a@b Mon\r\nbody")


def test_continuation_without_a_field_and_field_without_a_name_are_dropped_as_defects() -> None:
    t = split(b" orphan\r\n: nameless\r\nSubject: x\r\n\r\n")
    assert t["headers"] == [("Subject", "x")]
    assert t["defects"] == ["FirstHeaderLineIsContinuationDefect", "InvalidHeaderDefect"]


# ---------------------------------------------------------------- content type (RFC 2045 §5.2, RFC 2046)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (b"", "text/plain"),
        (b"Content-Type: TEXT/HTML; charset=x\r\n", "text/html"),
        (b"Content-Type: bogus\r\n", "text/plain"),
        (b"Content-Type: a/b/c\r\n", "text/plain"),
        (b"Content-Type: image/png\r\nContent-Type: text/html\r\n", "image/png"),  # the first one counts
        (b"Content-Type: text/\xffplain\r\n", "text/\ufffdplain"),  # as compat32's Header hands it out
    ],
)
def test_content_type(field: bytes, expected: str) -> None:
    assert split(field + b"\r\nbody")["type"] == expected


def test_parts_of_a_digest_default_to_message_rfc822() -> None:
    # RFC 2046 §5.1.5: in multipart/digest the default type of a part is message/rfc822.
    t = split(
        b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: one\r\n\r\nbody\r\n"
        b"--d\r\nContent-Type: text/plain\r\n\r\ntwo\r\n--d--\r\n"
    )
    first, second = t["children"]
    assert first["type"] == "message/rfc822"
    assert first["children"][0]["headers"] == [("Subject", "one")]
    assert second["type"] == "text/plain"


# ---------------------------------------------------------------- multipart delimiters (RFC 2046 §5.1.1)


def mixed(body: bytes, boundary: bytes = b"b") -> bytes:
    return b"Content-Type: multipart/mixed; boundary=" + boundary + b"\r\n\r\n" + body


def test_delimiter_is_dash_dash_boundary_at_the_start_of_a_line() -> None:
    t = split(mixed(b"--b\r\n\r\none x--b\r\n--bb\r\n--b\r\n\r\ntwo\r\n--b--\r\n"))
    assert [c["payload"] for c in t["children"]] == ["one x--b\r\n--bb", "two"]


def test_line_break_before_a_delimiter_belongs_to_the_delimiter() -> None:
    t = split(mixed(b"--b\r\n\r\none\r\n\r\n--b\r\n\r\ntwo\r\n--b--"))
    assert [c["payload"] for c in t["children"]] == ["one\r\n", "two"]


def test_transport_padding_after_a_delimiter_is_allowed() -> None:
    t = split(mixed(b"--b \t\r\n\r\none\r\n--b--  \r\n"))
    assert [c["payload"] for c in t["children"]] == ["one"]
    assert t["defects"] == []


def test_preamble_and_epilogue_are_kept_apart_from_the_parts() -> None:
    t = split(mixed(b"preamble\r\n--b\r\n\r\none\r\n--b--\r\nepilogue\r\n"))
    assert (t["preamble"], t["epilogue"]) == ("preamble", "epilogue\r\n")
    assert split(mixed(b"--b\r\n\r\none\r\n--b--"))["epilogue"] == ""


def test_close_delimiter_ends_the_multipart_even_before_the_end_of_input() -> None:
    t = split(mixed(b"--b\r\n\r\none\r\n--b--\r\n--b\r\n\r\nnot a part\r\n"))
    assert len(t["children"]) == 1
    assert t["epilogue"] == "--b\r\n\r\nnot a part\r\n"


def test_missing_close_delimiter() -> None:
    t = split(mixed(b"--b\r\n\r\none\r\n--b\r\n\r\ntwo\r\n"))
    # compat32 strips the last line break from the part that runs to the end of input, too.
    assert [c["payload"] for c in t["children"]] == ["one", "two"]
    assert t["defects"] == ["CloseBoundaryNotFoundDefect"]


def test_missing_opening_delimiter_keeps_the_body_as_one_string() -> None:
    t = split(mixed(b"no delimiter at all\r\n"))
    assert t["defects"] == ["StartBoundaryNotFoundDefect", "MultipartInvariantViolationDefect"]
    assert (t["payload"], t["epilogue"]) == ("no delimiter at all\r\n", "")
    # Only a close delimiter: what precedes it is the payload; what follows is dropped (compat32).
    t = split(mixed(b"before\r\n--b--\r\nafter\r\n"))
    assert (t["payload"], t["defects"][0]) == ("before\r\n", "StartBoundaryNotFoundDefect")


def test_missing_boundary_parameter() -> None:
    t = split(b"Content-Type: multipart/mixed\r\n\r\n--b\r\nx\r\n")
    assert t["defects"] == ["NoBoundaryInMultipartDefect", "MultipartInvariantViolationDefect"]
    assert t["payload"] == "--b\r\nx\r\n"


def test_repeated_delimiter_lines_delimit_no_empty_parts() -> None:
    t = split(mixed(b"--b\r\n--b\r\n\r\none\r\n--b--\r\n"))
    assert [c["payload"] for c in t["children"]] == ["one"]


def test_outer_delimiter_ends_an_inner_part() -> None:
    # RFC 2046 §5.1.2: an enclosing boundary ends every part nested inside it.
    inner = b"Content-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\n\r\ninner\r\n"
    t = split(mixed(b"--b\r\n" + inner + b"--b\r\n\r\nouter\r\n--b--\r\n"))
    nested, outer = t["children"]
    assert nested["defects"] == ["CloseBoundaryNotFoundDefect"]
    assert nested["children"][0]["payload"] == "inner"
    assert outer["payload"] == "outer"


def test_inner_multipart_reusing_the_outer_boundary_ends_at_once() -> None:
    inner = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
    t = split(mixed(b"--b\r\n" + inner + b"--b\r\n\r\nx\r\n--b--\r\n"))
    first, second = t["children"]
    assert first["defects"] == ["StartBoundaryNotFoundDefect"]
    assert second["payload"] == "x"


def test_unsplit_multipart_keeps_the_line_break_before_the_next_delimiter() -> None:
    # The rule mime._kept_boundary_eol compensates: compat32 strips the delimiter's line break
    # from the entity parsed last, but from an unsplit multipart only via its (None) epilogue.
    t = split(mixed(b"--b\r\nContent-Type: multipart/mixed\r\n\r\nopaque\r\n--b--\r\n"))
    assert t["children"][0]["payload"] == "opaque\r\n"
    t = split(mixed(b"--b\r\n" + mixed(b"--c\r\n\r\nx\r\n--c--\r\n\r\n", b"c") + b"\r\n--b--\r\n"))
    assert t["children"][0]["epilogue"] == "\r\n"


@pytest.mark.parametrize(
    ("params", "boundary"),
    [
        (b'boundary="a b:c"', "a b:c"),
        (b"BOUNDARY=x; charset=y", "x"),
        (b'name="a;boundary=no"; boundary=yes', "yes"),
        (b"boundary=x  ", "x"),
        (b'boundary="<x>"', "x"),  # unquoted twice by compat32
        (b"boundary*=utf-8''a%2Db", "a-b"),  # RFC 2231 §4
        (b"boundary*0=a; boundary*1=b", "ab"),  # RFC 2231 §3
        (b"boundary", ""),
        (b"charset=x", None),
    ],
)
def test_boundary_parameter(params: bytes, boundary: str | None) -> None:
    value = b"multipart/mixed; " + params
    assert _boundary(value.decode()) == boundary
    msg = email.message.Message()
    msg["Content-Type"] = value.decode()
    assert msg.get_boundary() == boundary


def test_boundary_parameter_agrees_with_the_stdlib_on_random_values() -> None:
    rng = random.Random(7)
    atoms = ["multipart/mixed", ";", " ", "boundary", "BOUNDARY", "=", '"', "<", ">", "x", "\t", "a b", "name", ";;"]
    atoms += ["\\", "*", "*0", "*1", "'", "utf-8''", "%41", "\r\n ", "\udcff", "=?", ","]
    for _ in range(4000):
        value = "".join(rng.choice(atoms) for _ in range(rng.randrange(1, 12)))
        msg = email.message.Message()
        msg.set_raw("Content-Type", value)
        try:
            expected = msg.get_boundary()
        except TypeError:
            expected = None  # KNOWN_DIFFERENCES["rfc2231-contradicting-boundary"]
        assert _boundary(value) == expected, value


def test_8bit_boundary_cannot_split() -> None:
    # RFC 2046 §5.1.1 allows 7-bit boundaries only; compat32 turns the 8-bit bytes into U+FFFD
    # before matching, so no line matches and the body stays one string.
    t = split(mixed(b"--\xe9\r\n\r\nx\r\n--\xe9--\r\n", b"\xe9"))
    assert t["defects"][0] == "StartBoundaryNotFoundDefect"


def test_contradicting_rfc2231_boundary_is_no_boundary_instead_of_a_crash() -> None:
    raw = b"Content-Type: multipart/mixed; boundary*=x; boundary*0=y\r\n\r\nbody"
    with pytest.raises(TypeError):
        COMPAT32.parsebytes(raw)
    t = tree(PARSER.parsebytes(raw))
    assert t["defects"] == ["NoBoundaryInMultipartDefect", "MultipartInvariantViolationDefect"]
    assert KNOWN_DIFFERENCES["rfc2231-contradicting-boundary"].applies(raw)


def test_multipart_with_a_transfer_encoding_other_than_7bit_8bit_binary() -> None:
    # RFC 2045 §6.4; compat32 compares the raw value, so even '7bit ' is a defect.
    for cte in (b"base64", b"7bit "):
        t = split(b"Content-Transfer-Encoding: " + cte + b"\r\n" + mixed(b"--b\r\n\r\nx\r\n--b--\r\n"))
        assert t["defects"] == ["InvalidMultipartContentTransferEncodingDefect"]


# ---------------------------------------------------------------- message/* (RFC 2046 §5.2, RFC 3464)


def test_message_rfc822_holds_one_parsed_message() -> None:
    t = split(b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nbody\r\n")
    (inner,) = t["children"]
    assert (inner["headers"], inner["payload"]) == ([("Subject", "inner")], "body\r\n")


def test_delivery_status_is_a_list_of_header_blocks() -> None:
    t = split(
        b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
        b"Final-Recipient: rfc822; a@b\r\nAction: failed\r\n\r\n"
    )
    assert [c["headers"] for c in t["children"]] == [
        [("Reporting-MTA", "dns; mx")],
        [("Final-Recipient", "rfc822; a@b"), ("Action", "failed")],
    ]


# ---------------------------------------------------------------- the Node API and the switch


def test_node_api() -> None:
    node = PARSER.parsebytes(
        mixed(b"--b\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 f\r\n#86)C\r\n`\r\nend\r\n--b--")
    )
    assert isinstance(node, Node)
    assert len(node) == 1
    assert node.is_multipart()
    (leaf,) = node.get_payload()
    assert node.get_payload(0) is leaf
    assert node.get_payload(decode=True) is None
    assert leaf.get_payload(decode=True) == b"abc"  # compat32's uudecode, via the stdlib
    assert "begin" not in repr(leaf)  # no content in reprs


def test_decode_mail_uses_the_fast_splitter_by_default() -> None:
    assert mime._PARSER is mime.SPLITTERS["fast"] is PARSER


def test_nesting_beyond_the_recursion_limit() -> None:
    def nested(depth: int) -> bytes:
        head = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth))
        return head + b"\r\ndeep"

    for depth, message in ((900, "MIME nesting deeper than 32 levels"), (1200, "MIME nesting too deep for the parser")):
        for name in ("fast", "compat32"):
            result = outcome(nested(depth), {}, name)
            assert result == ("MailTooLargeError", "max_depth", message), (depth, name)


# ---------------------------------------------------------------- fast paths in mime.py's own layer
# Each is held to what it replaced: the stdlib, or the previous implementation kept here as reference.


def test_plain_mailboxes_agree_with_getaddresses() -> None:
    words = ["Anna", "Smith", "J.", "=?utf-8?q?Fran=C3=A7ois?=", "O'Neil", ".", "x-y", "#1", "{x}", "a=b", "?"]
    words += ["Zoë", '"Q"', "(c)", "a,b", "<", ">", "@", "a\\b", ":", ";"]
    atoms = ["a", "b.c", "x_y", "1", "o'n", "a+b", "bob", "alice.smith", "é", "", "..", "-", "[1.2.3.4]"]
    blanks = ["", " ", "  ", "\t"]
    rng = random.Random(11)

    def element() -> str:
        addr = rng.choice(atoms) + rng.choice(["@"] * 12 + ["", "@@"]) + rng.choice(atoms) + rng.choice(["", ".org"])
        if rng.random() < 0.45:
            name = " ".join(rng.choice(words) for _ in range(rng.randrange(4)))
            return f"{rng.choice(blanks)}{name}{rng.choice(blanks)}<{addr}>{rng.choice(blanks)}"
        return rng.choice(blanks) + (addr if rng.random() < 0.85 else rng.choice(words)) + rng.choice(blanks)

    taken = 0
    for _ in range(30000):
        values = [",".join(element() for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 3))]
        fast = mime._plain_mailboxes(", ".join(values))
        if fast is not None:
            taken += 1
            assert fast == email.utils.getaddresses(values), values
    assert taken > 1000
    # and the common shapes do take it
    for value in ("Bob Smith <bob@example.org>", "a@b.c", "<a@b>", "=?utf-8?q?J=C3=B6rg?= M. <j@x.org>, c@d"):
        assert mime._plain_mailboxes(value) == email.utils.getaddresses([value]), value


def _split_params_reference(value: str) -> list[str]:
    # mime._split_params before it became a regex: a character loop over quoted strings.
    items: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            items.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    items.append("".join(buf))
    return items


def test_split_params_matches_the_reference() -> None:
    rng = random.Random(3)
    pieces = ['"', ";", "\\", "a", " ", "\n", "x=y", '\\"', '""', ";;", "é"]
    for _ in range(20000):
        value = "".join(rng.choice(pieces) for _ in range(rng.randrange(14)))
        assert mime._split_params(value) == _split_params_reference(value), value


def _qpdecode_reference(data: bytes) -> tuple[bytes, bool]:
    # mime._qpdecode (body mode) before the single-search probe and the '=' shortcut.
    if b" \n" in data or b" \r\n" in data or b"\t\n" in data or b"\t\r" in data:
        data = mime._QP_TRAILING_WS.sub(b"", data)
    elif data.endswith((b" ", b"\t")):
        data = data.rstrip(b" \t")
    decoded = binascii.a2b_qp(data)
    return decoded, decoded.count(b"=") > data.count(b"=3D") + data.count(b"=3d")


def test_quoted_printable_matches_the_reference() -> None:
    rng = random.Random(5)
    pieces = [b"a", b" ", b"\t", b"\r\n", b"\n", b"\r", b"=", b"=3D", b"=3d", b"=C3=A9", b"=\r\n", b"=ZZ", b"=2"]
    for _ in range(20000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(16)))
        assert mime._qpdecode(data) == _qpdecode_reference(data), data


def test_decoded_text_is_clean_whatever_the_codec() -> None:
    dec = mime._Decoder(mime.DEFAULT_OPTIONS)
    assert dec.decode_bytes(b"+2DQ-", "utf-7", "x") == "\ufffd"  # UTF-7 can return a lone surrogate
    assert dec.decode_bytes("café".encode(), "utf-8", "x") == "café"
    assert dec.decode_bytes(bytes(range(256)), "iso-8859-1", "x") == bytes(range(256)).decode("latin-1")


# ---------------------------------------------------------------- hostile input stays linear


def _nested_open(depth: int) -> bytes:
    return b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth))


@pytest.mark.parametrize(
    "raw",
    [
        b"Subject: x\r\n" + b"X" * 400_000 + b"\r\n\r\nbody",  # a long line that is not a field
        b'Content-Type: multipart/mixed; boundary="' + b";" * 400_000 + b'"\r\n\r\n',  # compat32: minutes
        b'Content-Type: multipart/mixed; a*=1; boundary="' + b";" * 400_000 + b'"\r\n\r\n',
        mixed(b"--b\r\n\r\n" + b"x--b" * 200_000),  # the delimiter inside lines
        mixed(b"--b\r\n\r\n" + b"--bx\r\n" * 200_000),  # lines starting like the delimiter
        _nested_open(900) + b"\r\n" + (b"y" * 74 + b"\r\n") * 27_000,  # deep, then 2 MB without delimiters
        _nested_open(900) + b"\r\n" + b"--bx\r\n" * 200_000,
        b"Content-Type: message/delivery-status\r\n\r\n" + b"A: b\r\n\r\n" * 50_000,
    ],
    ids=[
        "long-line",
        "quoted-semicolons",
        "quoted-semicolons-2231",
        "mid-line",
        "prefixes",
        "deep",
        "deep-dashes",
        "dsn",
    ],
)
def test_hostile_shapes_split_in_linear_time(raw: bytes) -> None:
    started = time.perf_counter()
    PARSER.parsebytes(raw)
    assert time.perf_counter() - started < 5  # about 0.01-0.7 s here; quadratic would be minutes


def test_deep_nesting_path_gives_the_same_trees(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under deep nesting (more than _FEW_ENDS open multiparts) the splitter looks delimiters up
    # line by line instead of searching each; force that path everywhere and compare again.
    monkeypatch.setattr(fastmime, "_FEW_ENDS", 0)
    for seed in range(3000):
        rng = random.Random(seed)
        raw = random_mail(rng) if seed % 3 else mutate(rng, random_mail(rng))
        assert tree_or_error(PARSER, raw) == tree_or_error(COMPAT32, raw) or KNOWN_DIFFERENCES[
            "rfc2231-contradicting-boundary"
        ].applies(raw), f"seed {seed}"
