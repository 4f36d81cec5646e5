"""Bounded waits and a plain HTTP GET for the integration tests."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60, interval: float = 0.25) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET; an HTTP error is a status, an unreachable server is (0, why)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback test servers
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)
