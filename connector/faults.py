"""Crash injection for the exactly-once proof (tests/integration/test_crash_matrix.py).

Off unless the environment says so, and then it kills the process with SIGKILL (as a power
cut or an OOM kill would: no finally blocks, no QUIT, no abort):

    POP3K_FAULT=after_retr          kill at the first pass through that point
    POP3K_FAULT=after_retr@3        kill at the third pass
    POP3K_FAULT=during_commit       kill while commit_transaction() runs, after a random delay
    POP3K_FAULT_SEED=1234           seeds that delay (the crash matrix prints the seed)
    POP3K_FAULT_WINDOW_MS=8         the delay is uniform in [0, window) (default 8 ms; a local commit
                                    takes 1-12 ms, median 2.4, so both outcomes occur)

Named points, in cycle order: after_retr, before_commit (records produced, not committed),
during_commit, after_commit (before any DELE), after_dele (before QUIT), during_quit
(QUIT sent, reply not read); and dlq_before_commit, dlq_during_commit in `dlq replay`.

This module has no dependencies so that any layer may call it; with the variable unset,
each call is one dictionary lookup.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: the poll cycle's points (the crash matrix kills at each).
POINTS = ("after_retr", "before_commit", "during_commit", "after_commit", "after_dele", "during_quit")
#: dlq replay (connector/runtime/dlq_replay.py): records and offsets sent, not yet committed;
#: and while the commit runs (tests/integration/test_dlq_replay.py).
REPLAY_POINTS = ("dlq_before_commit", "dlq_during_commit")
#: placement (connector/runtime/placement.py): after each chunk record is produced, so
#: ``during_chunks@N`` kills in the middle of a chunked transaction (tests/integration/test_large_mail_e2e.py).
PLACEMENT_POINTS = ("during_chunks",)

_spec = os.environ.get("POP3K_FAULT", "")
_point, _, _nth = _spec.partition("@")
_lock = threading.Lock()
_passes = [0]  # a list, not a global int: mutated under the lock from any thread


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def point(name: str) -> None:
    """Die here if POP3K_FAULT names this point (and this is the chosen pass)."""
    if _point != name:
        return
    with _lock:
        _passes[0] += 1
        if _passes[0] >= int(_nth or 1):
            _kill()


@contextmanager
def during(name: str) -> Iterator[None]:
    """Around a blocking call: if POP3K_FAULT names ``name``, a timer kills the process after
    a seeded random delay, so some kills land before the call completes and some after."""
    if _point != name:
        yield
        return
    rnd = random.Random(int(os.environ.get("POP3K_FAULT_SEED", "0")))  # noqa: S311 - test timing, not crypto
    delay = rnd.uniform(0, float(os.environ.get("POP3K_FAULT_WINDOW_MS", "8"))) / 1000
    timer = threading.Timer(delay, _kill)
    timer.daemon = True
    timer.start()
    yield
    # The call finished first: die anyway right after it (the "committed" outcome).
    _kill()
