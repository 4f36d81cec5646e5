"""The crash matrix at reduced size (CI): every named point twice, 8 random kill -9.

The full matrix (10 per point, 200 random kills) is `make crash-matrix`; its latest result is
committed in bench/results/crash-matrix.md.
"""

from __future__ import annotations

import os

import pytest
from crash_matrix import run_matrix

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_crash_matrix_reduced(services) -> None:  # type: ignore[no-untyped-def]
    seed = int(os.environ.get("POP3K_CRASH_SEED", "20261126"))
    s = run_matrix(services.bootstrap, services.dovecot, "t12", runs_per_point=2, random_kills=8, seed=seed)
    print(s.table())
    assert not s.lost, f"lost {s.lost[:5]} (seed {seed})"
    assert not s.duplicated, f"duplicated {s.duplicated[:5]} (seed {seed})"
    assert s.left_on_server == 0
    assert s.mails >= 6 * 2 * 3
    for name, st in s.points.items():
        assert st.killed == st.runs, f"{name}: the fault point was not reached in every run"
    assert s.random_killed == 8
    # aborted copies exist: the exactly-once result is the transactions' doing
    assert s.uncommitted_records > s.committed_records
