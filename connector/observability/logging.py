"""Structured logging: JSON lines by default, a readable line on a terminal.

Context fields (mailbox, cycle, uidl) come from ``extra=`` on each call. Nothing here adds
mail content; callers never pass bodies, passwords or decrypted text (design.md section 6).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

CONTEXT_FIELDS = ("mailbox", "cycle", "uidl", "step")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(f"{n}={record.__dict__[n]}" for n in CONTEXT_FIELDS if record.__dict__.get(n))
        line = (
            f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} "
            f"{record.getMessage()}" + (f"  [{ctx}]" if ctx else "")
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure the root logger once: ``fmt`` is json, text or auto (text on a terminal)."""
    use_text = fmt == "text" or (fmt == "auto" and sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if use_text else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
