"""Structured logs (issue 8): JSON lines by default, a readable line on a terminal, with the
mailbox id, cycle id and UIDL as fields."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from connector.observability.logging import JsonFormatter, TextFormatter, setup_logging


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_root() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def emit(stream: io.StringIO, fmt: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging("debug", fmt)
    log = logging.getLogger("pop3kafka.test")
    log.info("cycle done: %d published", 3, extra={"mailbox": "orders", "cycle": "c0ffee", "uidl": "U1"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("internal error", extra={"mailbox": "orders"})
    return stream.getvalue()


def test_json_lines_by_default_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    out = emit(io.StringIO(), "auto", monkeypatch)
    first, second = (json.loads(line) for line in out.splitlines() if line.startswith("{"))
    assert first["msg"] == "cycle done: 3 published" and first["level"] == "info"
    assert (first["mailbox"], first["cycle"], first["uidl"]) == ("orders", "c0ffee", "U1")
    assert first["logger"] == "pop3kafka.test" and first["ts"].endswith("Z")
    assert second["level"] == "error" and "ValueError: boom" in second["exc"]
    assert isinstance(logging.getLogger().handlers[0].formatter, JsonFormatter)


def test_a_readable_line_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    out = emit(Terminal(), "auto", monkeypatch)
    line = out.splitlines()[0]
    assert "INFO" in line and "cycle done: 3 published" in line
    assert "mailbox=orders" in line and "cycle=c0ffee" in line and "uidl=U1" in line
    assert not line.startswith("{")
    assert isinstance(logging.getLogger().handlers[0].formatter, TextFormatter)


def test_json_can_be_forced_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    out = emit(Terminal(), "json", monkeypatch)
    assert json.loads(out.splitlines()[0])["mailbox"] == "orders"
