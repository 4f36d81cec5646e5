"""The admin HTTP endpoint of ``pop3-kafka run``: on-demand polls and on-call controls.

    GET  /mailboxes                 every mailbox's state (JSON): next due, last success, last
                                    error, backoff, owner, shard
    POST /mailboxes/{id}/poll       start a cycle now; 200 with its outcome when it finishes within
                                    ?wait=SECONDS (default 60, at most 600), 202 when a cycle of
                                    it is already running (or still running when the wait ends),
                                    409 when the mailbox is paused, 404 for an unknown id
    POST /mailboxes/{id}/pause      no new cycle starts (one in flight finishes); 200
    POST /mailboxes/{id}/resume     back to the schedule, polled at once; 200
    GET  /metrics                   Prometheus text format (connector/observability/metrics.py)
    GET  /healthz                   200 while the scheduling loop turns (liveness), else 503
    GET  /readyz                    200 when every shard this process owns is fenced in and its
                                    ledger loaded, also when it owns none; else 503 with why

Configuration: ``admin: {bind: "127.0.0.1:9108", token: {file: ...}}`` (docs/configuration.md).
With a token every request needs ``Authorization: Bearer <token>`` (compared in constant
time), else 401; binding to a non-loopback address needs a token. /metrics, /healthz and
/readyz are open (probes and scrapers carry no secrets; they answer mailbox ids, server
host:port, states, counts and reasons only).
Responses carry mailbox ids, POP3 server host:port, times and ConnectorError descriptions
only: no passwords, tokens, mail addresses or mail content. Stdlib ``ThreadingHTTPServer``:
a handful of on-call requests and probes, not a traffic path; each request has its own thread, a waiting poll blocks
only its own.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import urllib.parse
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from connector.config.model import Secret
from connector.observability import metrics
from connector.runtime.runner import Runner, error_text
from connector.runtime.sessions import CycleResult

log = logging.getLogger("pop3kafka.admin")

DEFAULT_WAIT_S = 60.0
#: open without the token: Kubernetes probes and Prometheus scrapes hold no secret, and these
#: say nothing private.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
MAX_WAIT_S = 600.0


def outcome(r: CycleResult) -> dict[str, Any]:
    """A cycle's result as the poll endpoint answers it."""
    return {
        "mailbox": r.mailbox,
        "cycle_id": r.cycle_id,
        "ok": r.ok,
        "listed": r.listed,
        "fetched": r.fetched,
        "published": r.published,
        "dead_lettered": r.dead_lettered,
        "deleted": r.deleted,
        "left": {
            "undecodable": r.undecodable,
            "oversized": r.oversized,
            "long_lines": r.long_lines,
            "too_large": r.too_large,
        },
        "more_pending": r.more_pending,
        "duration_s": round(r.duration_s, 3),
        "error": None if r.error is None else error_text(r.error),
    }


class AdminServer:
    """Serves the admin endpoint for ``runner`` on ``host:port`` in a background thread."""

    def __init__(self, runner: Runner, host: str, port: int, token: Secret | None = None) -> None:
        self.runner = runner
        self.token = token
        handler = _handler(self)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="admin-http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.thread.start()
        log.info("admin endpoint on http://%s:%d (token %s)", *self.address, "required" if self.token else "off")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ requests

    def authorised(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self.token.reveal().encode())

    def handle(self, method: str, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/") if p]
        if parts in (["healthz"], ["readyz"]):
            if method != "GET":
                return 405, {"error": f"GET /{parts[0]}"}
            ok, why = self.runner.liveness() if parts == ["healthz"] else self.runner.readiness()
            return (200 if ok else 503), {"ok": ok, **why}
        if parts == ["mailboxes"] and method == "GET":
            return 200, {"mailboxes": self.runner.status()}
        if len(parts) == 3 and parts[0] == "mailboxes" and method == "POST":
            mid, action = parts[1], parts[2]
            if mid not in self.runner.scheduler.states:
                return 404, {"error": f"no mailbox {mid!r} in this configuration"}
            try:
                if action == "pause":
                    self.runner.pause(mid)
                    return 200, {"mailbox": mid, "state": "paused"}
                if action == "resume":
                    self.runner.resume(mid)
                    return 200, {"mailbox": mid, "state": "scheduled", "poll": "now"}
                if action == "poll":
                    return self._poll(mid, query)
            except KeyError:  # removed by a reload meanwhile
                return 404, {"error": f"no mailbox {mid!r} in this configuration"}
        if parts[:1] == ["mailboxes"]:
            return 405 if method not in ("GET", "POST") else 404, {"error": "see GET /mailboxes"}
        return 404, {
            "error": "endpoints: GET /mailboxes, /metrics, /healthz, /readyz; POST /mailboxes/{id}/poll|pause|resume"
        }

    def _poll(self, mid: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        try:
            wait_s = min(MAX_WAIT_S, max(0.0, float(query.get("wait", [DEFAULT_WAIT_S])[0])))
        except ValueError:
            return 400, {"error": "wait: a number of seconds"}
        try:
            future = self.runner.request_poll(mid)
        except PermissionError:
            return 409, {"mailbox": mid, "error": "paused; POST /mailboxes/{id}/resume first"}
        except LookupError:
            return 409, {"mailbox": mid, "error": "its shard is owned by another replica; ask that one"}
        if future is None:
            return 202, {"mailbox": mid, "status": "a cycle of this mailbox is already running"}
        try:
            return 200, outcome(future.result(timeout=wait_s))
        except FutureTimeout:
            return 202, {"mailbox": mid, "status": f"started; not finished within {wait_s:g} s (see GET /mailboxes)"}
        except CancelledError:
            return 503, {"mailbox": mid, "status": "shutting down; the cycle did not run"}


def _handler(server: AdminServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pop3-kafka-admin"
        sys_version = ""
        # A slow or silent client (headers never finished) frees its thread after this.
        timeout = 30

        def _serve(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            probe = url.path.rstrip("/") in PROBES
            if url.path.rstrip("/") == "/metrics" and method == "GET":
                self._send_raw(200, metrics.exposition(), CONTENT_TYPE_PLAIN_0_0_4)  # what every Prometheus reads
                return
            if not probe and not server.authorised(self.headers.get("Authorization")):
                self._send(401, {"error": "missing or wrong bearer token"}, {"WWW-Authenticate": "Bearer"})
                return
            try:
                status, body = server.handle(method, url.path, urllib.parse.parse_qs(url.query))
            except Exception:  # a bug must not kill the endpoint, nor print a request's details
                log.exception("admin endpoint: internal error on %s %s", method, url.path)
                status, body = 500, {"error": "internal error; see the log"}
            self._send(status, body)

        def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            self._send_raw(status, (json.dumps(body, indent=1) + "\n").encode(), "application/json", headers)

        def _send_raw(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:
            # Through our logger at DEBUG: the request line only (never headers: the token).
            log.debug("admin %s", format % args)

    return Handler
