"""Write connector config files for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def mailbox(
    mid: str, user: str, port: int, cafile: str, *, tls: str = "implicit", env: str | None = None, **extra: Any
) -> dict[str, Any]:
    m: dict[str, Any] = {
        "id": mid,
        "host": "127.0.0.1",
        "port": port,
        "tls": tls,
        "tls_ca_file": cafile,
        "username": user,
        "password": {"env": env or f"PW_{mid.upper().replace('-', '_')}"},
        "poll_interval_seconds": 1,
    }
    m.update(extra)
    return m


def write_config(path: Path, bootstrap: str, topic: str, mailboxes: list[dict[str, Any]], **sections: Any) -> Path:
    doc: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap, "delivery_timeout_seconds": 10},
        "topics": {"mail": topic, "partitions": 1},
        "mailboxes": mailboxes,
    }
    for k, v in sections.items():
        doc.setdefault(k, {}).update(v)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
