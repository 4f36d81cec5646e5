"""The decoding fuzzer (tests/fuzz_decode.py) at CI size, and its harness.

``make fuzz`` runs 10,000 mutants and writes bench/results/fuzz.md; here 600 run in a few
seconds with the same limits (child processes, RLIMIT_AS 1 GiB, 5 s per mail).
"""

from __future__ import annotations

import signal
import sys
import time

import fuzz_decode
import pytest

from connector.errors import DecodeError

CI_MAILS = 600


def test_reduced_fuzz_run() -> None:
    result = fuzz_decode.run_fuzz(CI_MAILS, fuzz_decode.DEFAULT_SEED, jobs=2)
    text = fuzz_decode.report(result, "tests/unit/test_fuzz_decode.py")
    assert sum(result.outcomes.values()) == CI_MAILS, text
    assert result.outcomes["crash"] == 0, text
    assert result.outcomes["timeout"] == 0, text
    assert result.outcomes["memory"] == 0, text
    assert result.unknown_share <= 0.01, text
    # The valid corpus gives records only, never a dead letter.
    assert result.corpus_outcomes == {"record": len(fuzz_decode.load_corpus())}, text
    # The mutations do reach the limits (otherwise the fuzzer would be too timid to prove much).
    assert result.outcomes["record"] > 0 and result.dead_letters > 0, text
    assert set(result.ops) == set(fuzz_decode.MUTATIONS), text
    assert result.failures() == []


def test_mutants_are_reproducible() -> None:
    corpus = fuzz_decode.load_corpus()
    assert fuzz_decode.mutant(7, 42, corpus) == fuzz_decode.mutant(7, 42, corpus)
    assert fuzz_decode.mutant(7, 42, corpus) != fuzz_decode.mutant(8, 42, corpus)
    every_op = {op for i in range(300) for op in fuzz_decode.mutant(1, i, corpus)[1]}
    assert every_op == set(fuzz_decode.MUTATIONS)


def test_child_enforces_the_memory_limit() -> None:
    child = fuzz_decode._Child(1, time_cap=5.0, memory_limit=512 << 20)
    try:
        assert child.ask("probe", 0) == {"outcome": "memory"}
        assert child.ask("corpus", 0)["outcome"] == "record"
    finally:
        child.close()


def test_watchdog_and_dead_child_are_counted() -> None:
    hung = fuzz_decode._Child(1, time_cap=0.1, memory_limit=1 << 30, grace=0.2)
    hung.args = [sys.executable, "-c", "import time; time.sleep(60)"]
    started = time.monotonic()
    assert hung.ask("mutant", 0) == {"outcome": "timeout", "error": "killed by the watchdog"}
    assert time.monotonic() - started < 5
    assert hung.proc is None  # killed and reaped
    dead = fuzz_decode._Child(1, time_cap=1.0, memory_limit=1 << 30)
    dead.args = [sys.executable, "-c", "import sys; sys.stdin.readline(); sys.exit(3)"]
    assert dead.ask("mutant", 0) == {"outcome": "crash", "error": "worker died with exit code 3"}


@pytest.mark.parametrize(
    ("raised", "outcome", "reason"),
    [
        (ValueError("boom"), "crash", None),
        (DecodeError("x", reason="max_depth"), "dead", "max_depth"),
        (MemoryError(), "memory", None),
        (None, "timeout", None),
    ],
)
def test_run_one_classifies(
    monkeypatch: pytest.MonkeyPatch, raised: BaseException | None, outcome: str, reason: str | None
) -> None:
    def fake_decode(raw: bytes) -> None:
        if raised is None:
            time.sleep(2)  # over the cap below
        elif isinstance(raised, MemoryError):
            # decode_mail's contract wraps it; the harness must still see a memory error
            raise DecodeError("unexpected MemoryError", reason="unknown") from raised
        else:
            raise raised

    monkeypatch.setattr("connector.decoding.decode_mail", fake_decode)
    previous = signal.signal(signal.SIGALRM, fuzz_decode._on_alarm)
    try:
        result = fuzz_decode.run_one(b"Subject: x\r\n\r\ny", time_cap=0.2)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert result["outcome"] == outcome
    assert result.get("reason") == reason


# ---------------------------------------------------------------- what fuzzing found, pinned down


@pytest.mark.parametrize(
    "raw",
    [
        # 'begin' lines without 'end' made the uuencode scan quadratic (mutant 115 of the first run:
        # minutes for 3 MB); now linear.
        b"Subject: uu\r\n\r\n" + b"begin 644 x\r\n" * 200_000,
        b"Subject: uu\r\n\r\n" + b"begin 644 x\r\n" * 100_000 + b"end\r\n",
        # The RFC 5322 §3.4 empty-group and §4.5 obsolete-colon checks, on hostile values.
        b"To: " + b" " * 60_000 + b"x\r\n\r\nbody",
        b"To: " + b"a:; " * 15_000 + b"x\r\n\r\nbody",
        b"Subject" + b" " * 60_000 + b":x\r\n" + b"X" * 60_000 + b" \r\n\r\nbody",
    ],
)
def test_hostile_shapes_decode_in_linear_time(raw: bytes) -> None:
    from connector.decoding import decode_mail

    started = time.perf_counter()
    decode_mail(raw)
    assert time.perf_counter() - started < 3.0
