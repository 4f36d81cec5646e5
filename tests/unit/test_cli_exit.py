"""The ``pop3-kafka`` command ends its process at once after main() (cli.entry_point): its
output and its exit code must get out first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector.cli.main", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PW_A": "pw"},
    )


def test_output_logs_and_exit_code_get_out_before_the_process_ends(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap_servers": "127.0.0.1:1"},
                "topics": {"mail": "mail"},
                "mailboxes": [{"id": "a", "host": "pop.test", "username": "u", "password": {"env": "PW_A"}}],
            }
        )
    )
    ok = run("config", "validate", str(good))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == f"{good}: OK (1 mailbox(es): a)\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka: {}\n")
    refused = run("config", "validate", str(bad))
    assert refused.returncode == 2 and "configuration error" in refused.stderr
    unknown = run("poll-once", "--config", str(good), "--mailbox", "nosuch")
    assert unknown.returncode == 2 and "nosuch" in unknown.stderr
