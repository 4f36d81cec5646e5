"""The pieces of `pop3-kafka dlq replay` that need no broker (the loop itself is proven against
the real broker in tests/integration/test_dlq_replay.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from connector.cli.main import parse_since
from connector.errors import ConfigError
from connector.runtime.dlq_replay import ReplaySummary

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("text", "millis"),
    [
        ("7d", int((NOW - 7 * 86400) * 1000)),
        ("12h", int((NOW - 12 * 3600) * 1000)),
        ("30m", int((NOW - 1800) * 1000)),
        ("1.5h", int((NOW - 5400) * 1000)),
        ("2026-11-01T00:00:00Z", 1_793_491_200_000),
        ("2026-11-01T01:00:00+01:00", 1_793_491_200_000),
        ("2026-11-01T00:00:00", 1_793_491_200_000),  # naive: UTC
    ],
)
def test_since_forms(text: str, millis: int) -> None:
    assert parse_since(text, now=NOW) == millis


@pytest.mark.parametrize("text", ["yesterday", "7 days", "-3d", ""])
def test_since_garbage_is_a_usage_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--since"):
        parse_since(text, now=NOW)


def test_summary_line() -> None:
    s = ReplaySummary(read=10, replayed=6, still_failing=Counter({"no_key": 3, "max_depth": 1}))
    assert s.line() == "10 dead letters read, 6 replayed, 4 still failing (max_depth: 1, no_key: 3)"
    s = ReplaySummary(read=3, dry_run=True, skipped_before_since=2, unknown_mailbox=1)
    assert s.line() == (
        "3 dead letters read, 0 would be replayed, 0 still failing, 2 before --since passed over, "
        "1 of mailboxes no longer configured (default decoding)"
    )
