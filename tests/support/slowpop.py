"""POP3 servers that misbehave slowly, for the time-limit tests (plain TCP on loopback).

* ``silent``: accepts the connection and never says anything (a hung server);
* ``trickle``: greets, then answers any command with a line that never ends, one byte every
  ``interval`` seconds, so the client's inactivity timeout never fires.

Every connection is served by its own thread until the client hangs up or :meth:`close`.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType
from typing import Any


class SlowPop3:
    def __init__(self, mode: str, *, interval: float = 0.2) -> None:
        if mode not in ("silent", "trickle"):
            raise ValueError(mode)
        self.mode = mode
        self.interval = interval
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        #: connections accepted so far.
        self.accepted = 0
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, name=f"slowpop-{mode}", daemon=True)
        self._accept.start()

    def mailbox(self, mid: str, **extra: Any) -> dict[str, Any]:
        """A mailbox configuration (plain POP3, no TLS) pointing at this server."""
        return {
            "id": mid,
            "host": "127.0.0.1",
            "port": self.port,
            "tls": "none",
            "allow_plaintext_auth": True,
            **extra,
        }

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            t = threading.Thread(target=self._conn, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _conn(self, conn: socket.socket) -> None:
        with conn:
            if self.mode == "silent":
                self.stop.wait(600)  # bounded: the tests end long before
                return
            conn.sendall(b"+OK slow server ready\r\n")
            conn.settimeout(600)
            try:
                conn.recv(4096)  # the client's first command
                while not self.stop.wait(self.interval):
                    conn.sendall(b"+")  # "+OK" that never comes, one byte at a time
            except OSError:
                return  # the client gave up: what the tests wait for

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self._accept.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> SlowPop3:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
