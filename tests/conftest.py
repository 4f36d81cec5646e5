"""Shared fixtures.

Integration tests run against a real Kafka broker and a real Dovecot. The session fixture
``stack`` uses already-running services when KAFKA_BOOTSTRAP and DOVECOT_TEST_DIR (with
POP3_PORT, POP3S_PORT, POP3_CAFILE) are set, and otherwise starts both with
deploy/local/localstack.py in a temporary directory and stops them at the end.
A service that cannot be started fails the tests; it never skips them.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy" / "local"))
sys.path.insert(0, str(REPO / "tests"))

from localstack import DovecotServer, KafkaNode, Stack  # noqa: E402
from support.objectstore_fixture import object_store  # noqa: E402, F401 - S3 server fixture
from support.registry_fixture import schema_registry  # noqa: E402, F401 - schema registry fixture


@dataclass
class Services:
    bootstrap: str
    dovecot: DovecotServer
    owned: Stack | None

    @property
    def cafile(self) -> str:
        return str(self.dovecot.cafile)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    if os.environ.get("KAFKA_BOOTSTRAP") and os.environ.get("DOVECOT_TEST_DIR"):
        dove = DovecotServer(
            Path(os.environ["DOVECOT_TEST_DIR"]),
            pop3_port=int(os.environ["POP3_PORT"]),
            pop3s_port=int(os.environ["POP3S_PORT"]),
            lmtp_port=int(os.environ.get("LMTP_PORT", "0")),
            proxied_port=int(os.environ.get("POP3_PROXIED_PORT", "0")),
        )
        yield Services(os.environ["KAFKA_BOOTSTRAP"], dove, None)
        return
    # Not under pytest's tmp dir: that is mode 0700, and Dovecot's unprivileged processes
    # (dovecot, dovenull, mail) must be able to traverse every parent of their files.
    state = Path(tempfile.mkdtemp(prefix="pop3k-test-stack-"))
    state.chmod(0o755)
    stack = Stack.at(state)
    try:
        stack.up()
        yield Services(stack.kafka.bootstrap, stack.dovecot, stack)
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def own_kafka(tmp_path: Path) -> Iterator[KafkaNode]:
    """A broker only this test uses, so the test may stop and restart it."""
    node = KafkaNode(tmp_path / "kafka-own")
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def topic() -> str:
    return f"mail-{uuid.uuid4().hex[:10]}"


# A skipped test is a failure to set up, not a pass: fail the run if anything was skipped,
# and never let "no tests collected" (pytest exit code 5) look like success.
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and not os.environ.get("POP3K_ALLOW_SKIPS"):
        print(f"\nERROR: {len(_skipped)} test(s) skipped; skips are failures here: {_skipped[:5]}")
        session.exitstatus = 1
