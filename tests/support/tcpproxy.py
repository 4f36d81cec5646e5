"""A TCP proxy the test controls: forwards bytes, counts them, and can cut every connection.

TLS passes through untouched (the client still verifies the server's certificate).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.downstream_bytes = 0  # server -> client
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        #: called with the downstream byte count after each chunk; may call cut()
        self.on_bytes: Callable[[int], None] | None = None
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if downstream:
                    with self._lock:
                        self.downstream_bytes += len(data)
                        n = self.downstream_bytes
                    if self.on_bytes is not None:
                        self.on_bytes(n)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Reset every open connection (RST, as a failing middlebox would)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self.cut()
        self.listener.close()
