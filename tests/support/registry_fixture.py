"""Session fixture ``schema_registry``: a real Apicurio Registry (deploy/local/registry.py).

Imported by tests/conftest.py, so every test can ask for it. Its ``.url`` is the
Confluent-compatible base URL (``.../apis/ccompat/v7``), what ``schema_registry.url`` of a
connector config takes. It uses an already-running registry when SCHEMA_REGISTRY_DIR names its
state directory (``registry.py up --dir D`` prints that export); otherwise it fetches the
registry if it is not cached yet (``make registry`` does it ahead), starts one in a temporary
directory and stops it at the end of the session. A registry that cannot be fetched or started
fails the tests with the reason; it never skips them.

The registry keeps its data in memory and lives for the whole session: tests use subjects of
their own (random topic names), so they never see each other's schemas.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry import Registry, StackError


@pytest.fixture(scope="session")
def schema_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    existing = os.environ.get("SCHEMA_REGISTRY_DIR")
    if existing:
        reg = Registry.at(Path(existing))
        if not reg.running():
            pytest.fail(f"SCHEMA_REGISTRY_DIR={existing}: no schema registry runs there", pytrace=False)
        try:
            reg.wait_ready(30)
        except StackError as exc:
            pytest.fail(f"SCHEMA_REGISTRY_DIR={existing}: {exc}", pytrace=False)
        yield reg
        return
    reg = Registry(tmp_path_factory.mktemp("registry"))
    try:
        reg.start(timeout=120)
    except StackError as exc:
        pytest.fail(f"the schema registry (Apicurio) did not start: {exc}", pytrace=False)
    try:
        yield reg
    finally:
        reg.stop()
