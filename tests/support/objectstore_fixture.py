"""Session fixture ``object_store``: a real SeaweedFS S3 server (deploy/local/objectstore.py).

Imported by tests/conftest.py, so every test can ask for it. It uses an already-running store
when OBJECTSTORE_DIR names its state directory (``objectstore.py up --dir D`` prints that
export); otherwise it builds the ``weed`` binary if it is not cached yet (minutes, once per
machine; ``make objectstore`` does it ahead), starts a server in a temporary directory and stops it
at the end of the session. A server that cannot be built or started fails the tests; it never
skips them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from objectstore import ObjectStore, StackError


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    existing = os.environ.get("OBJECTSTORE_DIR")
    if existing:
        store = ObjectStore.at(Path(existing))
        if not store.running():
            pytest.fail(f"OBJECTSTORE_DIR={existing}: no object store runs there", pytrace=False)
        store.wait_ready(30)
        yield store
        return
    store = ObjectStore(tmp_path_factory.mktemp("objectstore"))
    try:
        store.start(timeout=90)
    except StackError as exc:
        pytest.fail(f"the S3 object store did not start: {exc}", pytrace=False)
    try:
        yield store
    finally:
        store.stop()
