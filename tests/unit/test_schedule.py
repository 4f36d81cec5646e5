"""The scheduler with an injected clock: interval, cron, jitter bounds, backoff, re-poll."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from connector.config.model import ScheduleSpec, validate_cron
from connector.runtime.schedule import MAX_AUTH_BACKOFF_SECONDS, Scheduler, stable_offset

T0 = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC).timestamp()  # a Thursday


def one(spec: ScheduleSpec, mid: str = "m") -> Scheduler:
    return Scheduler({mid: spec}, now=T0)


def test_interval_polls_at_once_then_on_the_plan_without_drift() -> None:
    s = one(ScheduleSpec(interval_seconds=60))
    assert s.due("m") == T0
    assert s.next_due("m", T0 + 5, ok=True) == T0 + 60  # planned from the slot, not from the cycle's end
    assert s.next_due("m", T0 + 61, ok=True) == T0 + 120
    # a cycle that overran two slots skips them instead of catching up
    assert s.next_due("m", T0 + 250, ok=True) == T0 + 300


def test_more_mail_waiting_polls_again_at_once() -> None:
    s = one(ScheduleSpec(interval_seconds=60))
    assert s.next_due("m", T0 + 3, ok=True, repoll=True) == T0 + 3
    assert s.next_due("m", T0 + 4, ok=True) == T0 + 60


def test_jitter_is_stable_bounded_and_spread() -> None:
    ids = [f"mailbox-{i}" for i in range(2000)]
    offsets = [stable_offset(i, 30.0) for i in ids]
    assert all(0 <= o < 30.0 for o in offsets)
    assert offsets == [stable_offset(i, 30.0) for i in ids]  # the same in every process
    buckets = Counter(int(o // 3) for o in offsets)  # ten 3-second buckets
    assert len(buckets) == 10 and all(150 <= n <= 250 for n in buckets.values()), buckets
    s = Scheduler({i: ScheduleSpec(interval_seconds=60, jitter_seconds=30) for i in ids[:50]}, now=T0)
    for i in ids[:50]:
        first = s.due(i)
        assert T0 <= first < T0 + 10  # after a start: the first polls within STARTUP_SPREAD_SECONDS
        # then on the plan, shifted by the mailbox's own offset
        assert s.next_due(i, first + 2, ok=True) == pytest.approx(T0 + 60 + stable_offset(i, 30), abs=1e-6)
    assert stable_offset("x", 0) == 0


def test_cron_in_utc_and_in_a_time_zone() -> None:
    s = one(ScheduleSpec(cron="*/5 * * * *"))
    assert s.due("m") == T0 + 300  # 10:00 exactly is not "after" 10:00
    assert s.next_due("m", T0 + 301, ok=True) == T0 + 600
    berlin = one(ScheduleSpec(cron="0 9 * * mon-fri", timezone="Europe/Berlin"))
    # 10:00 UTC on Thursday is 11:00 in Berlin (CET, UTC+1): next is Friday 09:00 CET = 08:00 UTC
    assert berlin.due("m") == datetime(2026, 11, 27, 8, 0, tzinfo=UTC).timestamp()
    friday = datetime(2026, 11, 27, 8, 0, 30, tzinfo=UTC).timestamp()
    # after Friday's poll: Monday 09:00 CET
    assert berlin.next_due("m", friday, ok=True) == datetime(2026, 11, 30, 8, 0, tzinfo=UTC).timestamp()


def test_error_backoff_doubles_to_its_cap_and_resets_on_success() -> None:
    s = one(ScheduleSpec(interval_seconds=60, backoff_initial_seconds=10, backoff_max_seconds=100))
    now = T0
    waits = []
    for _ in range(6):
        due = s.next_due("m", now, ok=False, error="other")
        waits.append(due - now)
        now = due
    assert waits == [10, 20, 40, 80, 100, 100]
    st = s.states["m"]
    assert st.failures == 6 and st.last_error == "other" and st.backoff_until == now
    back = s.next_due("m", now + 1, ok=True)
    assert st.failures == 0 and st.backoff_until is None and back > now and (back - T0) % 60 == 0


def test_auth_failures_back_off_long_and_are_never_retried_hot() -> None:
    s = one(ScheduleSpec(interval_seconds=60, auth_backoff_seconds=900))
    now, waits = T0, []
    for _ in range(8):
        due = s.next_due("m", now, ok=False, error="auth")
        waits.append(due - now)
        now = due
    assert waits[:5] == [900, 1800, 3600, 7200, 14400]
    assert max(waits) == MAX_AUTH_BACKOFF_SECONDS and min(waits) >= 900


def test_in_use_is_retried_later_and_counted() -> None:
    s = one(ScheduleSpec(interval_seconds=3600, in_use_retry_seconds=60))
    assert s.next_due("m", T0 + 1, ok=False, error="in_use") == T0 + 61
    assert s.next_due("m", T0 + 62, ok=False, error="in_use") == T0 + 122
    assert s.states["m"].in_use_count == 2
    assert s.next_due("m", T0 + 130, ok=True) == T0 + 3600


def test_earliest_and_cron_validation() -> None:
    s = Scheduler({"a": ScheduleSpec(interval_seconds=60), "b": ScheduleSpec(cron="0 * * * *")}, now=T0 + 10)
    assert s.earliest() == T0 + 10
    assert validate_cron("*/5 * * * *") is None
    assert validate_cron("61 * * * *") == "not a valid cron expression"
    assert "5 fields" in (validate_cron("* * * * * *") or "")


def test_a_changed_schedule_keeps_pause_and_backoff() -> None:
    s = one(ScheduleSpec(interval_seconds=60, auth_backoff_seconds=3600))
    due = s.next_due("m", T0 + 1, ok=False, error="auth")
    st = s.states["m"]
    st.paused = True
    s.specs["m"] = ScheduleSpec(interval_seconds=30)
    s.replan("m", T0 + 5)
    assert st.paused and st.failures == 1 and st.due == due == T0 + 3601  # the backoff still holds
    s.specs["m"] = ScheduleSpec(cron="*/5 * * * *")
    st.backoff_until = None
    s.replan("m", T0 + 5)
    assert st.due == T0 + 300


def test_earliest_skips_mailboxes_that_cannot_run() -> None:
    s = Scheduler({"a": ScheduleSpec(interval_seconds=60), "b": ScheduleSpec(interval_seconds=60)}, now=T0)
    s.states["a"].due = T0 - 100  # overdue, but its shard is owned elsewhere
    assert s.earliest(runnable=lambda mid: mid != "a") == T0
    s.states["b"].paused = True
    assert s.earliest(skip_paused=True, runnable=lambda mid: mid != "a") is None


def test_file_secrets_are_equal_by_file_so_a_rotation_is_no_config_change(tmp_path: object) -> None:
    from pathlib import Path

    from connector.config.model import Secret

    p = Path(str(tmp_path)) / "pw"
    p.write_text("one")
    a = Secret("one", f"file:{p}", p)
    p.write_text("two-longer")
    b = Secret("two-longer", f"file:{p}", p)
    assert a == b and Secret("x", "env:A") != Secret("y", "env:A") and Secret("x", "env:A") == Secret("x", "env:A")


def test_restart_plans_afresh_and_keeps_the_state() -> None:
    """A shard just fenced in and loaded: its mailboxes' due times passed meanwhile; they start
    again within the start-up spread from now instead of all at once, and keep pause/backoff."""
    spec = ScheduleSpec(interval_seconds=600, jitter_seconds=600)
    s = Scheduler({f"m{i}": spec for i in range(50)}, now=T0)
    s.states["m0"].paused = True
    later = T0 + 7200
    backoff = s.next_due("m1", T0 + 1, ok=False)
    s.states["m2"].backoff_until = s.states["m2"].due = later + 500  # a long backoff still holds
    for mid in list(s.states):
        s.restart(mid, later)
    dues = [s.states[f"m{i}"].due for i in range(3, 50)]
    assert all(later <= d < later + 10 for d in dues) and len(set(dues)) == len(dues)  # spread
    assert s.states["m0"].paused and s.states["m1"].failures == 1 and backoff < later
    assert s.states["m2"].due == later + 500
    # the plan's phase follows: the next regular slot is one interval after the restart
    assert s.next_due("m3", later + 20, ok=True) == later + 600 + stable_offset("m3", 600)
