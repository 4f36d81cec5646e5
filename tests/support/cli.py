"""Run the `pop3-kafka` command line in a child process, as a user or an orchestrator would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping


def run_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`pop3-kafka ARGS` with this environment plus ``env``; output captured as text, and a
    non-zero exit is returned, not raised (tests assert on it)."""
    return subprocess.run(
        [sys.executable, "-m", "connector.cli.main", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
