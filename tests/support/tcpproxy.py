"""A TCP proxy the test controls: forwards bytes, counts them, and can cut every connection.

TLS passes through untouched (the client still verifies the server's certificate). With
``proxy_v1_source`` it plays a load balancer that speaks the PROXY protocol: each upstream
connection starts with a PROXY v1 header claiming that source address, so a server listening
with PROXY protocol (Dovecot's ``haproxy = yes``) sees that address instead of 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable


def proxy_v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """The human-readable PROXY protocol header (HAProxy's PROXY protocol specification,
    version 1, section 2.1): ``PROXY TCP4 <src ip> <dst ip> <src port> <dst port> CRLF``."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode("ascii")


class TcpProxy:
    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", *, proxy_v1_source: tuple[str, int] | None = None
    ) -> None:
        self.target = (target_host, target_port)
        #: (ip, port) claimed in a PROXY v1 header sent first on every upstream connection
        self.proxy_v1_source = proxy_v1_source
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.downstream_bytes = 0  # server -> client
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        #: called with the downstream byte count after each chunk; may call cut()
        self.on_bytes: Callable[[int], None] | None = None
        #: seconds to sleep per downstream chunk (a slow link), 0 = full speed
        self.delay = 0.0
        #: one-way latency in seconds, both directions (a WAN); chunks are not serialised by it
        self.latency = 0.0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # A small window, so a slowed proxy really holds the server back mid-response
            # (instead of megabytes sitting in loopback buffers).
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            try:
                upstream.settimeout(10)
                upstream.connect(self.target)
                if self.proxy_v1_source is not None:
                    # before any byte of the client's: the server reads the header first
                    upstream.sendall(proxy_v1_header(self.proxy_v1_source, self.target))
                upstream.settimeout(None)
            except OSError:
                upstream.close()
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        delayed: queue.Queue[tuple[float, bytes | None]] | None = None
        if self.latency:
            delayed = queue.Queue()

            def sender() -> None:
                while True:
                    due, chunk = delayed.get()
                    if chunk is None:
                        return
                    time.sleep(max(0.0, due - time.monotonic()))
                    with contextlib.suppress(OSError):
                        dst.sendall(chunk)

            threading.Thread(target=sender, daemon=True).start()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if delayed is not None:
                    delayed.put((time.monotonic() + self.latency, data))
                    continue
                dst.sendall(data)
                if downstream and self.delay:
                    time.sleep(self.delay)
                if downstream:
                    with self._lock:
                        self.downstream_bytes += len(data)
                        n = self.downstream_bytes
                    if self.on_bytes is not None:
                        self.on_bytes(n)
        except OSError:
            pass
        finally:
            if delayed is not None:
                delayed.put((0.0, None))
                time.sleep(self.latency * 2)  # let the delayed chunks out before closing
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Reset every open connection (RST, as a failing middlebox would)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                # linger 0 -> RST; shutdown() also wakes the pump thread blocked in recv()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._stop = True
        self.cut()
        self.listener.close()
