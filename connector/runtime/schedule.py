"""When each mailbox is polled next: interval or cron, jitter, backoff, LOGIN-DELAY, re-poll.

Pure logic over an injected clock (wall-clock seconds since the epoch), so every rule is tested
without sleeping (tests/unit/test_schedule.py). The runner asks :meth:`Scheduler.next_due`
after each cycle and sleeps until the earliest due mailbox.

Rules, in order (docs/configuration.md, "Schedules"):

* **plan**: ``interval_seconds`` after the previous *planned* time (not after the cycle ended,
  so a 60 s schedule does not drift by each cycle's length; a cycle longer than the interval
  skips the slots it overran), or the next time the ``cron`` expression matches (5 fields,
  croniter, in the mailbox's ``timezone``). Jitter: every mailbox is shifted by a stable offset
  in ``[0, jitter_seconds)`` derived from its id (default: the whole interval, at most 5
  minutes), so thousands of mailboxes on the same interval spread evenly over it instead of
  logging in in the same seconds (and, in exactly-once mode, queueing behind their shard's
  round); each one's lag is measured against its own jittered plan. After a start the first
  polls come within 10 s, the offsets' phases after that.
* **more mail waiting**: a cycle that stopped at a bound and made progress goes again at once.
* **errors**: the retry replaces the plan. Exponential backoff from
  ``backoff_initial_seconds`` doubling up to ``backoff_max_seconds``; an authentication failure
  backs off from ``auth_backoff_seconds`` (long: a wrong password retried hot locks accounts)
  doubling up to six hours; ``[IN-USE]`` (RFC 2449 §8.1.1: another session holds the maildrop)
  is retried after ``in_use_retry_seconds``, counted, not an alarm. A success resets the
  backoff and returns to the plan.
* **LOGIN-DELAY** (RFC 2449 §6.8) is applied on top by the runner (it knows the logins).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal
from zoneinfo import ZoneInfo

from connector.config.model import ScheduleSpec
from connector.errors import Pop3AuthError, Pop3MailboxBusyError

#: After a start, the first polls of interval mailboxes spread over at most this long (their
#: phase within the interval comes after).
STARTUP_SPREAD_SECONDS = 10.0
#: The longest an authentication failure holds a mailbox back between attempts.
MAX_AUTH_BACKOFF_SECONDS = 6 * 3600.0

ErrorKind = Literal["auth", "in_use", "other"]


def error_kind(error: BaseException | None) -> ErrorKind | None:
    """How a cycle's failure is scheduled: authentication (long backoff), [IN-USE] (retry
    later), anything else (exponential backoff); None for a successful cycle."""
    if error is None:
        return None
    if isinstance(error, Pop3MailboxBusyError):
        return "in_use"
    if isinstance(error, Pop3AuthError):
        return "auth"
    return "other"


def stable_offset(mailbox_id: str, jitter_seconds: float) -> float:
    """A mailbox's jitter: uniform in [0, jitter_seconds), the same in every process and run."""
    if jitter_seconds <= 0:
        return 0.0
    h = int.from_bytes(hashlib.sha256(mailbox_id.encode()).digest()[:8], "big")
    return (h / 2**64) * jitter_seconds


@dataclass
class MailboxState:
    """What the scheduler remembers of one mailbox (also shown by ``GET /mailboxes`` later)."""

    #: the planned (un-jittered) time of the next regular poll.
    planned: float
    #: when the next poll is due (plan + jitter, or a backoff / re-poll time).
    due: float
    failures: int = 0
    last_error: ErrorKind | None = None
    backoff_until: float | None = None
    in_use_count: int = 0
    #: on-call controls and what GET /mailboxes shows (connector/runtime/admin_server.py).
    paused: bool = False
    running: bool = False
    last_cycle_at: float | None = None
    last_success_at: float | None = None
    #: the last failure, as ConnectorError.describe() says it (no secrets, no mail content).
    last_error_text: str | None = None


@dataclass
class Scheduler:
    """Due times for a set of mailboxes; not thread-safe (the runner's loop owns it)."""

    specs: dict[str, ScheduleSpec]
    now: float
    states: dict[str, MailboxState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for mid in self.specs:
            self.add(mid, self.now)

    def add(self, mailbox_id: str, now: float) -> None:
        """Start scheduling a mailbox (see :meth:`_first_poll`)."""
        planned, due = self._first_poll(mailbox_id, now)
        self.states[mailbox_id] = MailboxState(planned=planned, due=due)

    def restart(self, mailbox_id: str, now: float) -> None:
        """Plan afresh from ``now`` as :meth:`add` does (first poll within the start-up spread),
        keeping failures, a backoff and a pause: for mailboxes whose shard was just fenced in and
        loaded, whose due times passed while it was being loaded or owned by another replica."""
        st = self.states[mailbox_id]
        st.planned, due = self._first_poll(mailbox_id, now)
        st.due = max(due, st.backoff_until or due)

    def _first_poll(self, mailbox_id: str, now: float) -> tuple[float, float]:
        """(planned, due) of a mailbox's first poll from ``now``. Interval: the first poll comes
        soon (within STARTUP_SPREAD_SECONDS, spread by the same stable offset), so a restart does
        not leave mail waiting a whole interval; the later ones keep the offset's phase. Cron:
        the next match plus the offset."""
        spec = self.specs[mailbox_id]
        offset = stable_offset(mailbox_id, spec.jitter_seconds)
        if spec.cron is None:
            return now, now + min(offset, STARTUP_SPREAD_SECONDS * offset / max(spec.jitter_seconds, 1e-9))
        planned = self._cron_next(spec, now)
        return planned, planned + offset

    def remove(self, mailbox_id: str) -> None:
        self.states.pop(mailbox_id, None)
        self.specs.pop(mailbox_id, None)

    def due(self, mailbox_id: str) -> float:
        return self.states[mailbox_id].due

    def earliest(self, *, skip_paused: bool = False, runnable: Callable[[str], bool] | None = None) -> float | None:
        """The earliest due time, over mailboxes that can run (not paused, ``runnable``)."""
        return min(
            (
                s.due
                for mid, s in self.states.items()
                if not (skip_paused and s.paused) and (runnable is None or runnable(mid))
            ),
            default=None,
        )

    def replan(self, mailbox_id: str, now: float) -> None:
        """A changed schedule: a new plan from now; failures, backoff and pause are kept."""
        spec, st = self.specs[mailbox_id], self.states[mailbox_id]
        st.planned = now if spec.cron is None else self._cron_next(spec, now)
        regular = st.planned + stable_offset(mailbox_id, spec.jitter_seconds)
        st.due = max(regular, st.backoff_until or regular)

    def next_due(
        self, mailbox_id: str, now: float, *, ok: bool, repoll: bool = False, error: ErrorKind | None = None
    ) -> float:
        """Record a finished cycle of ``mailbox_id`` at ``now`` and return when it is due next.

        ``repoll``: it stopped at a bound with mail still waiting and made progress (poll again
        at once). ``error``: the kind of failure when not ``ok``.
        """
        spec, st = self.specs[mailbox_id], self.states[mailbox_id]
        st.planned = self._advance(spec, st.planned, now)
        regular = st.planned + stable_offset(mailbox_id, spec.jitter_seconds)
        st.last_cycle_at = now
        if ok:
            st.last_success_at = now
            st.failures, st.last_error, st.backoff_until = 0, None, None
            st.due = now if repoll else regular
            return st.due
        st.failures += 1
        st.last_error = error or "other"
        if error == "in_use":
            # Another session holds the maildrop (RFC 2449 §8.1.1): expected now and then.
            st.in_use_count += 1
            wait = spec.in_use_retry_seconds
        elif error == "auth":
            wait = min(
                spec.auth_backoff_seconds * 2 ** (st.failures - 1),
                max(MAX_AUTH_BACKOFF_SECONDS, spec.auth_backoff_seconds),
            )
        else:
            wait = min(spec.backoff_initial_seconds * 2 ** (st.failures - 1), spec.backoff_max_seconds)
        # The retry replaces the plan: a transient failure of a mailbox on a daily cron is
        # retried after its backoff, not a day later; a failing mailbox on a short interval is
        # polled less often as its backoff grows past the interval.
        st.backoff_until = st.due = now + wait
        return st.due

    # ------------------------------------------------------------------ plans

    def _advance(self, spec: ScheduleSpec, planned: float, now: float) -> float:
        """The first planned slot after ``now`` on the mailbox's plan (slots overrun by a long
        cycle are skipped, not caught up)."""
        if spec.cron is not None:
            return self._cron_next(spec, max(now, planned))
        interval = spec.interval_seconds
        if planned > now:
            return planned
        missed = math.floor((now - planned) / interval) + 1
        return planned + missed * interval

    @staticmethod
    def _cron_next(spec: ScheduleSpec, after: float) -> float:
        from croniter import croniter  # noqa: PLC0415 - only mailboxes with a cron schedule need it

        assert spec.cron is not None
        start = datetime.fromtimestamp(after, tz=UTC).astimezone(ZoneInfo(spec.timezone))
        nxt = croniter(spec.cron, start).get_next(datetime)
        return float(nxt.timestamp())
