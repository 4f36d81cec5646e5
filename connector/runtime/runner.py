"""The runner: poll-once and the scheduling loop of ``pop3-kafka run``.

Concurrency (docs/decisions/0001): blocking sockets, one worker thread per mailbox cycle,
at most ``runtime.max_concurrent_sessions`` at once; one shared idempotent producer. A slow
or hanging server only holds its own worker, bounded by the mailbox's timeout.

Shutdown: ``stop`` is an Event set by SIGTERM/SIGINT. A cycle in flight stops fetching new
mail after the current one, waits for the delivery reports of what it produced, deletes what
Kafka confirmed, and QUITs; no new cycle starts. The process exits after the cycles end or
the grace period passes (then the POP3 connections are dropped without QUIT, which by
RFC 1939 applies no deletes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from connector.config.model import Config, MailboxConfig
from connector.delivery.kafka import Publisher
from connector.runtime.cycle import (
    CycleContext,
    CycleHooks,
    CycleResult,
    MailboxSession,
    open_session,
    run_cycle,
)

log = logging.getLogger("pop3kafka.runner")


class Runner:
    """Owns the producer and the worker pool for one configuration."""

    def __init__(
        self,
        config: Config,
        *,
        hooks: CycleHooks | None = None,
        clock: Callable[[], float] = time.monotonic,
        session_factory: Callable[[MailboxConfig], MailboxSession] | None = None,
    ) -> None:
        self.config = config
        self.stop = threading.Event()
        self.publisher = Publisher(
            config.kafka.bootstrap_servers, config.kafka.client, config.kafka.delivery_timeout_seconds
        )
        self.ctx = CycleContext(
            config=config,
            publisher=self.publisher,
            stop=self.stop,
            hooks=hooks or CycleHooks(),
            session_factory=session_factory or open_session,
        )
        self._clock = clock
        #: set when run() stopped because the producer hit a fatal error.
        self.fatal = False

    def poll_once(self, mailboxes: Sequence[MailboxConfig] | None = None) -> list[CycleResult]:
        """One cycle per mailbox (concurrently, bounded); results in configuration order."""
        targets = list(mailboxes if mailboxes is not None else self.config.mailboxes)
        workers = max(1, min(len(targets), self.config.runtime.max_concurrent_sessions))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cycle") as pool:
            futures = [pool.submit(run_cycle, self.ctx, m) for m in targets]
            return [f.result() for f in futures]

    def run(self) -> None:
        """Poll every mailbox on its interval until :attr:`stop` is set."""
        mailboxes = self.config.mailboxes
        next_due = {m.id: self._clock() for m in mailboxes}
        running: dict[Future[CycleResult], MailboxConfig] = {}
        workers = max(1, min(len(mailboxes), self.config.runtime.max_concurrent_sessions))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cycle")
        try:
            while not self.stop.is_set():
                if self.publisher.fatal is not None:
                    # A fatal producer never recovers; exit so the orchestrator restarts us.
                    log.error("Kafka producer is in a fatal state (%s); stopping", self.publisher.fatal)
                    self.fatal = True
                    self.stop.set()
                    break
                now = self._clock()
                busy = {m.id for m in running.values()}
                for m in mailboxes:
                    if m.id not in busy and next_due[m.id] <= now and len(running) < workers:
                        running[pool.submit(run_cycle, self.ctx, m)] = m
                        busy.add(m.id)
                idle = [next_due[m.id] for m in mailboxes if m.id not in busy]
                sleep = max(0.05, min(idle) - now) if idle else 1.0
                if running:
                    done, _ = wait(list(running), timeout=min(sleep, 1.0), return_when=FIRST_COMPLETED)
                    for f in done:
                        m = running.pop(f)
                        result = f.result()
                        # A cycle that stopped at its bound with mail waiting goes again at once,
                        # but only if it made progress: mail it had to leave (undecodable,
                        # oversized) must not turn into a hot loop.
                        again = result.ok and result.more_pending and result.deleted > 0
                        delay = 0.0 if again else m.poll_interval_seconds
                        next_due[m.id] = self._clock() + delay
                else:
                    self.stop.wait(min(sleep, 1.0))
        finally:
            self._drain(pool, list(running))

    def _drain(self, pool: ThreadPoolExecutor, futures: list[Future[CycleResult]]) -> None:
        grace = self.config.runtime.shutdown_grace_seconds
        if futures:
            log.info("shutting down: waiting up to %.0fs for %d cycle(s) in flight", grace, len(futures))
            _, not_done = wait(futures, timeout=grace)
            if not_done:
                log.warning(
                    "%d cycle(s) did not finish within the grace period; their POP3 connections "
                    "are dropped without QUIT, so nothing of theirs is deleted",
                    len(not_done),
                )
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        left = self.publisher.close(timeout=10.0)
        if left:
            log.warning("%d record(s) still unconfirmed at exit; their mail stays on the server", left)
