"""Mutation fuzzing of the decoding path: decode_mail -> build_mail_record -> encode_single_object.

Takes the golden corpus (tests/fixtures/mail/*.eml), applies seeded mutations (byte flips,
truncation, duplicated or removed boundary lines, huge header repeats, deep nesting, random
charset labels, broken base64, long lines, NULs, spliced mails, swapped content types and
transfer encodings, mixed line endings, hostile encoded words) and runs each mutant in a child
process with ``RLIMIT_AS`` capped and a per-mail time cap. Every mutant ends in one outcome:

* ``record``: decoded, built and Avro-encoded;
* ``dead letter``: :class:`~connector.errors.DecodeError` (its ``reason`` is counted);
* ``crash``: any other exception, or the child dying (must be zero);
* ``timeout``: over the time cap (must be zero);
* ``memory``: MemoryError, also when decode_mail wrapped it in a DecodeError (must be zero).

DecodeError reason ``unknown`` (an unexpected exception inside decode_mail, turned into a dead
letter by its contract) must stay at or below 1 % of the dead letters, and the unmutated
corpus must give no dead letter at all.

Mutant *n* of seed *s* depends on nothing else, so one case can be replayed on its own:
``python tests/fuzz_decode.py --seed s --only n --dump /tmp/mutant.eml``.

Usage: ``python tests/fuzz_decode.py --mails 10000 --out bench/results/fuzz.md`` (``make fuzz``);
tests/unit/test_fuzz_decode.py runs a reduced size through :func:`run_fuzz`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "fixtures" / "mail"
DEFAULT_SEED = 20261126
MEMORY_LIMIT = 1 << 30  # RLIMIT_AS of each child: 1 GiB
TIME_CAP = 5.0  # seconds per mail, enforced in the child (SIGALRM) and by the parent's watchdog
WATCHDOG_GRACE = 5.0  # extra seconds before the parent kills a child that does not answer
MAX_MUTANT = 12 * 1024 * 1024


def load_corpus() -> list[tuple[str, bytes]]:
    return [(p.stem, p.read_bytes()) for p in sorted(CORPUS.glob("*.eml"))]


# ---------------------------------------------------------------- mutations

_BOUNDARY_LINE = re.compile(rb"(?m)^--[^\r\n]*\r?\n")
_HEADER_FIELD = re.compile(rb"(?m)^[A-Za-z][A-Za-z0-9-]*:[^\r\n]*\r?\n")
_CHARSET = re.compile(rb"(?i)(charset\*?=\"?)([^\s;\"]*)")
_WORD_CHARSET = re.compile(rb"=\?([^?\s]*)\?")
_B64_LINE = re.compile(rb"(?m)^[A-Za-z0-9+/]{16,}={0,2}\r?$")
_CTE = re.compile(rb"(?im)^(Content-Transfer-Encoding:[ \t]*)([^\r\n]*)")
_CTYPE = re.compile(rb"(?im)^(Content-Type:[ \t]*)([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)")

LABELS = [
    b"utf-8", b"UTF-8", b"uft-8", b"utf8mb4", b"utf-7", b"utf-16", b"utf-16le", b"utf-32", b"iso-8859-1",
    b"iso-8859-8-i", b"windows-1252", b"win-1252", b"cp-850", b"ibm-437", b"koi8-r", b"shift_jis",
    b"iso-2022-jp", b"gb2312", b"gbk", b"big5", b"euc-kr", b"ks_c_5601-1987", b"x-user-defined",
    b"unknown-8bit", b"us-ascii", b"rot13", b"zlib", b"base64", b"hex", b"idna", b"punycode",
    b"unicode-escape", b"raw-unicode-escape", b"undefined", b"mbcs", b"uu_codec", b"bz2", b"",
    b"\"\"", b"'", b"x-" + b"a" * 300, b"utf-8'en'", b"\xff\xfe", b"cp65001", b"charset", b"8bit",
]  # fmt: skip
CTES = [b"base64", b"quoted-printable", b"7bit", b"8bit", b"binary", b"x-uuencode", b"uuencode", b"BaSe64",
        b"x-gzip64", b"", b"base64; junk", b"\"quoted-printable\""]  # fmt: skip
CTYPES = [
    b"multipart/mixed", b"multipart/mixed; boundary=", b'multipart/alternative; boundary="z"',
    b"multipart/related; start=\"<nope>\"; boundary=\"z\"", b"multipart/digest; boundary=z",
    b"multipart/report; report-type=delivery-status; boundary=z", b"message/rfc822", b"message/global",
    b"message/delivery-status", b"message/disposition-notification", b"message/partial; id=x; number=1",
    b"message/external-body; access-type=x", b"text/plain; charset=utf-7", b"text/html", b"text/calendar",
    b"application/ms-tnef", b"application/pkcs7-signature",
    b"multipart/signed; protocol=\"application/pkcs7-signature\"",
    b"text", b"/", b"multipart/", b"x/y; a*0*=utf-8''%FF; a*1*=%C3; a*=x", b"text/plain; name*0*=utf-8''%",
    b"multipart/mixed; boundary*=x; boundary*0=y", b"multipart/mixed; boundary=\"\"",
    b"multipart/mixed; boundary=\"" + b"b" * 200 + b"\"",
    b"application/pkcs7-mime; smime-type=signed-data; name=smime.p7m",
    b"application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m",
    b"application/x-pkcs7-mime; name=smime.p7m", b"application/octet-stream; name=\"smime.p7m\"",
]  # fmt: skip


def _lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


def _flip(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    buf = bytearray(data or b"x")
    for _ in range(rng.randint(1, 40)):
        buf[rng.randrange(len(buf))] = rng.randrange(256)
    return bytes(buf)


def _truncate(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def _dup_boundary(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    found = [m.group(0) for m in _BOUNDARY_LINE.finditer(data)]
    if not found:
        return _flip(rng, data, corpus)
    line = rng.choice(found)
    lines = _lines(data)
    for _ in range(rng.choice([1, 2, 5, 50, 500])):
        lines.insert(rng.randrange(len(lines) + 1), line)
    return b"".join(lines)


def _drop_boundary(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    spans = [m.span() for m in _BOUNDARY_LINE.finditer(data)]
    if not spans:
        return _truncate(rng, data, corpus)
    if rng.random() < 0.3:  # all of them
        return _BOUNDARY_LINE.sub(b"", data)
    start, end = rng.choice(spans)
    return data[:start] + data[end:]


def _header_repeat(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    fields = [m.group(0) for m in _HEADER_FIELD.finditer(data[:65536])]
    line = rng.choice(fields) if fields else b"X-Junk: value\r\n"
    if rng.random() < 0.25:  # one huge field instead of many
        name = line.split(b":", 1)[0]
        line = name + b": " + b"=?utf-8?q?x?= " * rng.choice([100, 5000, 6000]) + b"\r\n"
        count = 1
    else:
        count = rng.choice([10, 200, 999, 1001, 5000, 20000])
    return line * count + data


def _deep_nesting(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    depth = rng.choice([3, 16, 31, 32, 33, 100, 400, 1500])
    if rng.random() < 0.5:
        head = b"".join(
            b'Content-Type: multipart/mixed; boundary="z%d"\r\n\r\n--z%d\r\n' % (i, i) for i in range(depth)
        )
        tail = b"".join(b"\r\n--z%d--\r\n" % i for i in reversed(range(depth)))
        return head + data + tail
    return b"Content-Type: message/rfc822\r\n\r\n" * depth + data


def _charsets(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    def label(_: re.Match[bytes]) -> bytes:
        return rng.choice(LABELS)

    data = _CHARSET.sub(lambda m: m.group(1) + label(m), data)
    data = _WORD_CHARSET.sub(lambda m: b"=?" + label(m) + b"?", data)
    if rng.random() < 0.5:
        data = b"Content-Type: text/plain; charset=" + rng.choice(LABELS) + b"\r\n" + data
    return data


def _broken_base64(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    spans = [m.span() for m in _B64_LINE.finditer(data)]
    if not spans:
        data = b"Content-Transfer-Encoding: base64\r\n" + data
        spans = [m.span() for m in _B64_LINE.finditer(data)] or [(len(data), len(data))]
    buf = bytearray(data)
    for start, end in sorted(rng.sample(spans, min(len(spans), rng.randint(1, 8))), reverse=True):
        line = bytearray(buf[start:end])
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(line) + 1)
            choice = rng.random()
            if choice < 0.4:
                line[pos:pos] = rng.choice([b"!", b"*", b"=", b"==", b"-", b"_", b"\x00", b" ", b"\xff"])
            elif choice < 0.7 and line:
                del line[pos : pos + rng.randint(1, 3)]
            else:
                line[pos:pos] = b"=" * rng.randint(1, 5) + b"AAAA"
        buf[start:end] = line
    return bytes(buf)


def _long_line(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    size = rng.choice([1000, 20_000, 70_000, 300_000, 3_000_000])
    filler = rng.choice([b"A", b"=", b" ", b"=?", b"a=?utf-8?q?", b"=C3", b"\t", b"<", b"(", b"begin 644 x\r\n"])
    line = (filler * (size // len(filler) + 1))[:size]
    if rng.random() < 0.3:  # inside the header block, as a field value
        return b"X-Long: " + line + b"\r\n" + data
    pos = rng.randrange(len(data) + 1)
    return data[:pos] + line + data[pos:]


def _nuls(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 30)):
        pos = rng.randrange(len(buf) + 1)
        buf[pos:pos] = b"\x00" * rng.choice([1, 1, 2, 100])
    return bytes(buf)


def _splice(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    other = rng.choice(corpus)[1]
    a, b = sorted(rng.randrange(len(other) + 1) for _ in range(2))
    pos = rng.randrange(len(data) + 1)
    return data[:pos] + other[a:b] + data[pos:]


def _transfer_encodings(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    return _CTE.sub(lambda m: m.group(1) + rng.choice(CTES), data)


def _content_types(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    matches = list(_CTYPE.finditer(data))
    if not matches:
        return b"Content-Type: " + rng.choice(CTYPES) + b"\r\n" + data
    m = rng.choice(matches)
    return data[: m.start(2)] + rng.choice(CTYPES) + data[m.end(2) :]


def _line_endings(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    a, b = sorted(rng.randrange(len(data) + 1) for _ in range(2))
    return data[:a] + data[a:b].replace(b"\r\n", rng.choice([b"\n", b"\r", b"\n\r", b"\r\r\n"])) + data[b:]


def _encoded_words(rng: random.Random, data: bytes, corpus: list[tuple[str, bytes]]) -> bytes:
    words = []
    for _ in range(rng.choice([1, 3, 50, 2000])):
        payload = bytes(rng.randrange(33, 127) for _ in range(rng.randint(0, 30))).replace(b"?", b"")
        words.append(b"=?" + rng.choice(LABELS) + b"?" + rng.choice([b"q", b"B", b"x", b""]) + b"?" + payload + b"?=")
    name = rng.choice([b"Subject", b"From", b"To", b"Reply-To", b"Content-Disposition"])
    sep = rng.choice([b" ", b"", b"\r\n ", b", "])
    value = sep.join(words)
    if name == b"Content-Disposition":
        value = b'attachment; filename="' + value + b'"'
    return name + b": " + value + b"\r\n" + data


MUTATIONS: dict[str, Callable[[random.Random, bytes, list[tuple[str, bytes]]], bytes]] = {
    "flip": _flip,
    "truncate": _truncate,
    "dup_boundary": _dup_boundary,
    "drop_boundary": _drop_boundary,
    "header_repeat": _header_repeat,
    "deep_nesting": _deep_nesting,
    "charsets": _charsets,
    "broken_base64": _broken_base64,
    "long_line": _long_line,
    "nuls": _nuls,
    "splice": _splice,
    "transfer_encodings": _transfer_encodings,
    "content_types": _content_types,
    "line_endings": _line_endings,
    "encoded_words": _encoded_words,
}


def mutant(seed: int, index: int, corpus: list[tuple[str, bytes]]) -> tuple[str, list[str], bytes]:
    """Mutant ``index`` of ``seed``: (base mail name, mutations applied, bytes). Deterministic."""
    rng = random.Random(f"pop3-kafka-fuzz:{seed}:{index}")
    name, data = rng.choice(corpus)
    ops = rng.sample(sorted(MUTATIONS), rng.choice([1, 1, 2, 2, 3]))
    for op in ops:
        data = MUTATIONS[op](rng, data, corpus)[:MAX_MUTANT]
    return name, ops, data


# ---------------------------------------------------------------- the child process


class _TimeCap(BaseException):
    """Raised by SIGALRM in the child when one mail runs over the time cap."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise _TimeCap


def run_one(raw: bytes, time_cap: float) -> dict[str, Any]:
    """Decode, build and encode one mail, classifying the outcome (runs inside the child)."""
    import hashlib

    from connector.decoding import decode_mail
    from connector.errors import DecodeError
    from connector.records import Provenance, build_mail_record, encode_single_object, mail_schema

    prov = Provenance("fuzz", "1", "pop.example.test:995", 1767258000000, len(raw), hashlib.sha256(raw).hexdigest())
    started = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, time_cap)
    try:
        try:
            encode_single_object(mail_schema(), build_mail_record(decode_mail(raw), prov))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _TimeCap:
        return {"outcome": "timeout", "seconds": time.perf_counter() - started}
    except MemoryError:
        return {"outcome": "memory", "seconds": time.perf_counter() - started}
    except DecodeError as exc:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, MemoryError):
                return {"outcome": "memory", "seconds": time.perf_counter() - started}
            cause = cause.__cause__
        detail = f"{type(exc.__cause__).__name__}: {exc.__cause__}"[:300] if exc.__cause__ else str(exc)[:300]
        return {"outcome": "dead", "reason": exc.reason, "stage": exc.stage, "error": detail,
                "seconds": time.perf_counter() - started}  # fmt: skip
    except Exception as exc:
        return {"outcome": "crash", "error": f"{type(exc).__name__}: {exc}"[:300],
                "seconds": time.perf_counter() - started}  # fmt: skip
    return {"outcome": "record", "seconds": time.perf_counter() - started}


def _worker(seed: int, time_cap: float, memory_limit: int) -> None:
    """Child: read 'corpus N' / 'mutant N' lines, answer one JSON line each."""
    sys.path.insert(0, str(REPO))
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    import connector.decoding
    import connector.records  # noqa: F401

    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    signal.signal(signal.SIGALRM, _on_alarm)
    corpus = load_corpus()
    out = sys.stdout
    for line in sys.stdin:
        kind, _, number = line.strip().partition(" ")
        index = int(number)
        if kind == "probe":  # harness self-test: is the address-space limit in force?
            try:
                bytearray(memory_limit)
                result: dict[str, Any] = {"outcome": "record"}
            except MemoryError:
                result = {"outcome": "memory"}
            out.write(json.dumps(result) + "\n")
            out.flush()
            continue
        if kind == "corpus":
            name, ops, raw = corpus[index][0], [], corpus[index][1]
        else:
            name, ops, raw = mutant(seed, index, corpus)
        result = run_one(raw, time_cap)
        result.update(base=name, ops=ops, size=len(raw))
        out.write(json.dumps(result) + "\n")
        out.flush()
        if result["outcome"] == "memory":
            return  # start afresh after running out of address space


class _Child:
    """One worker process, driven synchronously by one parent thread, with a watchdog."""

    def __init__(self, seed: int, time_cap: float, memory_limit: int, grace: float = WATCHDOG_GRACE) -> None:
        self.args = [sys.executable, str(Path(__file__).resolve()), "--worker", "--seed", str(seed),
                     "--time-cap", str(time_cap), "--memory-limit", str(memory_limit)]  # fmt: skip
        self.time_cap = time_cap
        self.grace = grace
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
        return self.proc

    def ask(self, kind: str, index: int) -> dict[str, Any]:
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(f"{kind} {index}\n".encode())
            proc.stdin.flush()
        except BrokenPipeError:
            self.close()
            return {"outcome": "crash", "error": "worker pipe closed"}
        # Generous: the child may still be building a large mutant before its own alarm starts.
        ready, _, _ = select.select([proc.stdout], [], [], self.time_cap + self.grace)
        if not ready:
            self.close()  # stuck where SIGALRM cannot interrupt (inside C code)
            return {"outcome": "timeout", "error": "killed by the watchdog"}
        line = proc.stdout.readline()
        if not line:
            code = proc.wait()
            self.close()
            return {"outcome": "crash", "error": f"worker died with exit code {code}"}
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


# ---------------------------------------------------------------- the parent


@dataclass
class FuzzResult:
    seed: int
    mails: int
    jobs: int
    time_cap: float
    memory_limit: int
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    ops: Counter[str] = field(default_factory=Counter)
    corpus_outcomes: Counter[str] = field(default_factory=Counter)
    #: (kind, index, result) of every crash, timeout, memory error, 'unknown' and corpus dead letter.
    problems: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    slowest: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)

    @property
    def dead_letters(self) -> int:
        return self.outcomes["dead"]

    @property
    def unknown_share(self) -> float:
        return self.reasons["unknown"] / self.dead_letters if self.dead_letters else 0.0

    def failures(self) -> list[str]:
        """What breaks the decoder's contract; empty when the run passes."""
        found = []
        for outcome in ("crash", "timeout", "memory"):
            if self.outcomes[outcome]:
                found.append(f"{self.outcomes[outcome]} {outcome}(s)")
        if self.unknown_share > 0.01:
            found.append(f"reason 'unknown' is {self.unknown_share:.1%} of the dead letters (limit 1 %)")
        bad_corpus = sum(n for outcome, n in self.corpus_outcomes.items() if outcome != "record")
        if bad_corpus:
            found.append(f"{bad_corpus} corpus mail(s) did not give a record: {dict(self.corpus_outcomes)}")
        return found


def run_fuzz(
    mails: int,
    seed: int = DEFAULT_SEED,
    *,
    jobs: int = 2,
    time_cap: float = TIME_CAP,
    memory_limit: int = MEMORY_LIMIT,
    only: list[int] | None = None,
) -> FuzzResult:
    """Run the unmutated corpus and ``mails`` mutants through child processes; count outcomes."""
    corpus_size = len(load_corpus())
    result = FuzzResult(seed=seed, mails=mails if only is None else len(only), jobs=jobs, time_cap=time_cap,
                        memory_limit=memory_limit)  # fmt: skip
    work: list[tuple[str, int]] = [] if only is not None else [("corpus", i) for i in range(corpus_size)]
    work += [("mutant", i) for i in (range(mails) if only is None else only)]
    queue = iter(work)
    lock = threading.Lock()

    def drive() -> None:
        child = _Child(seed, time_cap, memory_limit)
        try:
            while True:
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                kind, index = item
                answer = child.ask(kind, index)
                with lock:
                    _record(result, kind, index, answer)
        finally:
            child.close()

    started = time.monotonic()
    threads = [threading.Thread(target=drive, name=f"fuzz-{n}") for n in range(max(1, jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - started
    result.slowest.sort(key=lambda item: -item[0])
    return result


def _record(result: FuzzResult, kind: str, index: int, answer: dict[str, Any]) -> None:
    outcome = answer["outcome"]
    if kind == "corpus":
        result.corpus_outcomes[outcome] += 1
        if outcome != "record":
            result.problems.append((kind, index, answer))
        return
    result.outcomes[outcome] += 1
    result.ops.update(answer.get("ops", []))
    if outcome == "dead":
        result.reasons[answer["reason"]] += 1
    if outcome in ("crash", "timeout", "memory") or answer.get("reason") == "unknown":
        result.problems.append((kind, index, answer))
    seconds = float(answer.get("seconds", 0.0))
    result.slowest.append((seconds, index, answer))
    result.slowest.sort(key=lambda item: -item[0])
    del result.slowest[5:]


def report(result: FuzzResult, command: str) -> str:
    """The Markdown of bench/results/fuzz.md."""
    total = sum(result.outcomes.values())
    rows = [("record", "record"), ("dead letter", "dead"), ("crash", "crash"), ("timeout", "timeout"),
            ("memory error", "memory")]  # fmt: skip
    lines = [
        "# Decoder fuzzing",
        "",
        f"Command: `{command}` (`make fuzz` runs `--mails 10000 --out bench/results/fuzz.md`).",
        "",
        f"Seed {result.seed}, {result.mails} mutated mails from {sum(result.corpus_outcomes.values())} corpus mails "
        f"(tests/fixtures/mail), {result.jobs} worker processes, RLIMIT_AS {result.memory_limit // (1 << 20)} MiB and "
        f"{result.time_cap:g} s per mail; {result.seconds:.1f} s in all "
        f"({total / max(result.seconds, 1e-9):.0f} mails/s).",
        "",
        "| outcome | mails |",
        "|---|---:|",
        *(f"| {label} | {result.outcomes[key]} |" for label, key in rows),
        f"| **total** | {total} |",
        "",
        f"Unmutated corpus: {dict(result.corpus_outcomes)} (must be records only).",
        "",
        f"Dead letters by reason ('unknown' is {result.unknown_share:.2%} of them; limit 1 %):",
        "",
        "| reason | mails |",
        "|---|---:|",
        *(f"| {reason} | {n} |" for reason, n in result.reasons.most_common()),
        "",
        "Mutations applied (a mutant gets one to three):",
        "",
        ", ".join(f"{op} {n}" for op, n in sorted(result.ops.items())),
        "",
        "Slowest mutants:",
        "",
        "| seconds | mutant | base mail | mutations | bytes |",
        "|---:|---:|---|---|---:|",
        *(
            f"| {s:.2f} | {i} | {a.get('base')} | {', '.join(a.get('ops', []))} | {a.get('size')} |"
            for s, i, a in result.slowest
        ),
        "",
    ]
    failures = result.failures()
    lines += ["Result: " + ("**pass**" if not failures else "**FAIL**: " + "; ".join(failures)), ""]
    if result.problems:
        lines += ["Problems (replay with `--only N --dump FILE`):", ""]
        lines += [f"* {kind} {index}: {json.dumps(answer)}" for kind, index, answer in result.problems[:50]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mails", type=int, default=10_000, help="mutated mails to run (default 10000)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--time-cap", type=float, default=TIME_CAP, help="seconds per mail")
    parser.add_argument("--memory-limit", type=int, default=MEMORY_LIMIT, help="RLIMIT_AS of a worker, bytes")
    parser.add_argument("--out", type=Path, help="write the Markdown report here (e.g. bench/results/fuzz.md)")
    parser.add_argument("--only", type=int, action="append", help="run just this mutant (repeatable)")
    parser.add_argument("--dump", type=Path, help="with one --only: write the mutant's bytes to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.seed, args.time_cap, args.memory_limit)
        return 0
    if args.dump:
        if not args.only or len(args.only) != 1:
            parser.error("--dump needs exactly one --only")
        name, ops, raw = mutant(args.seed, args.only[0], load_corpus())
        args.dump.write_bytes(raw)
        print(f"mutant {args.only[0]}: base {name}, mutations {ops}, {len(raw)} bytes -> {args.dump}")
    result = run_fuzz(args.mails, args.seed, jobs=args.jobs, time_cap=args.time_cap,
                      memory_limit=args.memory_limit, only=args.only)  # fmt: skip
    command = "python tests/fuzz_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(result, command.strip())
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 1 if result.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
