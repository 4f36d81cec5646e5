"""Release hygiene (issue 8): one version, written once (connector/__init__.py), seen the same
by the installed package metadata, the CLI and the metrics; `make dist` builds and checks the
wheel and the sdist in CI."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

import connector
from connector.observability import metrics

REPO = Path(__file__).resolve().parents[2]


def test_the_version_is_written_once() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"] and "version" not in project["project"]
    assert project["tool"]["hatch"]["version"]["path"] == "connector/__init__.py"
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:[ab]\d+|rc\d+)?", connector.__version__)
    others = [
        p
        for p in REPO.rglob("*.py")
        if ".venv" not in p.parts and p != REPO / "connector" / "__init__.py"
        and re.search(r"^__version__\s*=", p.read_text(errors="replace"), re.M)
    ]  # fmt: skip
    assert others == [], "a second __version__ assignment"


def test_metadata_cli_and_metrics_agree() -> None:
    assert importlib.metadata.version("pop3-kafka") == connector.__version__
    out = subprocess.run(
        [sys.executable, "-m", "connector.cli.main", "--version"], check=True, capture_output=True, text=True
    )
    assert out.stdout.strip() == f"pop3-kafka {connector.__version__}"
    assert f'version="{connector.__version__}"' in metrics.exposition().decode()


def test_the_chart_ships_this_version() -> None:
    chart = yaml.safe_load((REPO / "helm" / "pop3-kafka" / "Chart.yaml").read_text())
    assert chart["appVersion"] == connector.__version__
