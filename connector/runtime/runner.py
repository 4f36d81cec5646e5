"""The runner: poll-once and the scheduling loop of ``pop3-kafka run``, in both delivery modes.

Concurrency (docs/decisions/0001 and 0002): blocking sockets, one thread per POP3 session,
at most ``runtime.max_concurrent_sessions`` sessions at once. A slow or hanging server only
holds its own thread, bounded by the mailbox's timeout.

* exactly_once (default): mailboxes map to shards (ledger partitions); each shard has one
  transactional producer and runs one *round* at a time, a round being one transaction for
  all of that shard's due mailboxes (group commit). Shards run their rounds in parallel.
  Start order per shard: init_transactions() -> ledger rebuild -> poll (:meth:`prepare`).
* at_least_once: one shared idempotent producer, one independent cycle per mailbox.

Shutdown: ``stop`` is an Event set by SIGTERM/SIGINT. Work in flight stops fetching new mail,
settles what it produced (commit, or wait for delivery reports) and QUITs; nothing new
starts. If work outlives the grace period the process exits and the POP3 connections drop
without QUIT, which by RFC 1939 applies no deletes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from connector.config.model import Config, MailboxConfig, load_config
from connector.delivery.admin import ensure_ledger_topic
from connector.delivery.kafka import Publisher
from connector.delivery.registry import resolve_framer
from connector.delivery.transactional import ShardProducer, load_shard_ledger
from connector.errors import ConfigError, ConnectorError, Pop3LoginDelayError
from connector.protocol import spool
from connector.records.framing import Framer
from connector.records.ledger import shard_of
from connector.runtime import telemetry
from connector.runtime.cycle import CycleContext, CycleHooks, run_cycle
from connector.runtime.exactly_once import ShardWorker
from connector.runtime.membership import Membership
from connector.runtime.schedule import Scheduler, error_kind
from connector.runtime.sessions import (
    CycleResult,
    MailboxSession,
    Prepared,
    end_unused,
    file_stamp,
    open_first_wave,
    open_session,
    waves,
)

log = logging.getLogger("pop3kafka.runner")

#: How often the configuration file is checked for changes (Kubernetes updates a mounted
#: ConfigMap in place, within a minute or so).
RELOAD_CHECK_SECONDS = 10.0
#: The longest a server's LOGIN-DELAY holds a mailbox back: RFC 2449 §6.8 sets no upper bound,
#: and a garbled or hostile value must not stop a mailbox for good.
MAX_LOGIN_DELAY_SECONDS = 86_400.0
#: Shards fenced in and loaded at once (at start, on assignment).
PREPARE_PARALLEL = 8
#: A shard that could not be fenced in or loaded (broker away, ACL missing) is tried again after.
PREPARE_RETRY_SECONDS = 5.0


class LinkedEvent(threading.Event):
    """A shard's own stop: set by its revocation, and set whenever the process's stop is."""

    def __init__(self, parent: threading.Event) -> None:
        super().__init__()
        self.parent = parent

    def is_set(self) -> bool:
        return super().is_set() or self.parent.is_set()


def error_text(error: BaseException) -> str:
    """A failure as on-call sees it: ConnectorError.describe() (mailbox, step, class, message;
    messages never carry secrets or mail content), only the class of anything else (a bug's
    message might quote anything)."""
    if isinstance(error, ConnectorError):
        return error.describe()
    return f"internal error ({type(error).__name__}); see the log"


class Runner:
    """Owns the producers, the shard workers and the thread pools for one configuration."""

    def __init__(
        self,
        config: Config,
        *,
        hooks: CycleHooks | None = None,
        clock: Callable[[], float] = time.time,
        idle_wait: Callable[[float], object] | None = None,
        session_factory: Callable[[MailboxConfig], MailboxSession] | None = None,
        framer: Framer | None = None,
    ) -> None:
        self.config = config
        #: record.framing; registry schema ids are resolved here, once, before anything starts:
        #: an unregistered schema stops the process now (ConfigError), never a cycle later.
        #: Fixed for the process (record and schema_registry changes need a restart).
        self.framer = framer if framer is not None else resolve_framer(config)
        removed = spool.sweep(config.runtime.spool_directory)
        if removed:
            log.warning("removed %d spool file(s) left by a crashed process", removed)
        self.stop = threading.Event()
        telemetry.install()  # delivery latency and librdkafka statistics, before any producer
        me = weakref.ref(self)  # the gauge must not keep a finished runner alive
        telemetry.readiness(lambda: (runner := me()) is not None and runner.ready)
        self.hooks = hooks or CycleHooks()
        self.session_factory = session_factory or open_session
        self.exactly_once = config.delivery.mode == "exactly_once"
        self.publisher = Publisher(
            config.kafka.bootstrap_servers, config.kafka.client_conf(), config.kafka.delivery_timeout_seconds
        )
        self.ctx = CycleContext(
            config=config,
            publisher=self.publisher,
            stop=self.stop,
            hooks=self.hooks,
            session_factory=self.session_factory,
            framer=self.framer,
        )
        self._clock = clock
        #: when each mailbox is due (interval or cron, jitter, backoff): connector/runtime/schedule.py.
        self.scheduler = Scheduler({m.id: m.schedule for m in config.mailboxes}, now=clock())
        #: set to cut the loop's idle wait short (a poll request, a resume, a stop).
        self._wake = threading.Event()
        #: how the loop idles for up to N clock units when nothing runs; tests with a virtual
        #: ``clock`` advance it here instead of sleeping.
        self._idle_wait: Callable[[float], object] = idle_wait or self._wait_for_wake
        #: on-call controls (admin endpoint): guards the scheduler's states and the waiters.
        self._control = threading.Lock()
        self._poll_requests: set[str] = set()
        self._waiters: dict[str, list[Future[CycleResult]]] = defaultdict(list)
        #: group ownership (runtime.ownership: group): the membership, shards waiting to be
        #: fenced in and loaded, shards being handed over, the unit of each round in flight.
        self.membership: Membership | None = None
        self._to_prepare: set[int] = set()
        self._revoking: set[int] = set()
        self._preparing: set[int] = set()
        self._prepare_retry_at: dict[int, float] = {}
        self._prepare_futures: dict[int, Future[None]] = {}
        #: every shard this process ever had (its owned gauge drops to 0 when it goes), and the
        #: mailboxes it polls now (their metrics series exist).
        self._shards_seen: set[int] = set()
        self._polled: set[str] = set()
        #: fences in and loads assigned shards off the loop thread (group ownership).
        self._prepare_pool = ThreadPoolExecutor(max_workers=PREPARE_PARALLEL, thread_name_prefix="prepare")
        self._running_units: dict[Future[list[CycleResult]], object] = {}
        self._ready = threading.Event()
        #: time.monotonic() of the loop's last turn (None before it first turns): /healthz.
        self.heartbeat: float | None = None
        #: schedule lag of each cycle started by run(): seconds after its due time (the last
        #: 100,000; bench/many_mailboxes.py and, later, a metric read it).
        self.lags: deque[float] = deque(maxlen=100_000)
        #: this process, as GET /mailboxes names the owner of a mailbox.
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        #: reloading (SIGHUP, or the file changed): see _maybe_reload().
        self._reload_requested = False
        self._reload_checked = time.monotonic()
        self._config_mtime = file_stamp(config.source)
        self._bad_stamp: tuple[int, int, int] | None = None
        #: the units of work of the configuration object they were computed for (a reload
        #: replaces the object) and shard count (see _units), and its mailboxes by id.
        self._plan_for: Config | None = None
        self._plan_shards = -1
        self._plan_units: dict[object, list[MailboxConfig]] = {}
        self._map_for: Config | None = None
        self._mailbox_map: dict[str, MailboxConfig] = {}
        #: exactly-once: shard -> worker (filled by prepare()).
        self.workers: dict[int, ShardWorker] = {}
        self.shards = 0
        #: set when run() stopped because no producer can go on (fatal or fenced).
        self.fatal = False
        #: per mailbox: the server's LOGIN-DELAY (RFC 2449 §6.8), and when its last login ended
        #: (runner clock); see next_poll().
        self._login_delay: dict[str, float] = {}
        self._last_login: dict[str, float] = {}
        self._delay_noted: set[tuple[str, int]] = set()
        #: poll-once: sessions opened while the shards start (open_early), by mailbox id,
        #: until their round takes them (or close() ends them).
        self._early: dict[str, Prepared] = {}

    # ------------------------------------------------------------------ start

    def prepare(self, mailboxes: Sequence[MailboxConfig] | None = None, *, shards: Sequence[int] | None = None) -> None:
        """exactly_once: check the ledger topic, then for each shard with mailboxes (or each of
        ``shards``): init_transactions() (fences a zombie) and rebuild its ledger. No-op otherwise."""
        if not self.exactly_once:
            return
        c = self.config
        targets = mailboxes if mailboxes is not None else c.mailboxes
        if self.shards:
            asked = shards if shards is not None else {shard_of(m.id, self.shards) for m in targets}
            if all(s in self.workers for s in asked):
                return  # every shard asked for is up (poll-once prepares before its first wave)
        self.shards = ensure_ledger_topic(
            c.kafka.bootstrap_servers,
            c.kafka.client_conf(),
            c.ledger.topic,
            shards=c.ledger.shards,
            create=c.ledger.create,
            replication_factor=c.topics.replication_factor,
        )
        wanted = shards if shards is not None else {shard_of(m.id, self.shards) for m in targets}
        todo = [s for s in sorted(wanted) if s not in self.workers]
        if len(todo) <= 1:
            for shard in todo:
                self._prepare_shard(shard)
            return
        # In parallel: each shard's init_transactions() and ledger read are round trips to
        # the broker (and a ledger read is as long as its partition), so serially the last
        # shard of a process with many waited for all the others.
        with ThreadPoolExecutor(max_workers=min(PREPARE_PARALLEL, len(todo)), thread_name_prefix="prepare") as pool:
            for _ in pool.map(self._prepare_shard, todo):
                pass

    def _prepare_shard(self, shard: int) -> None:
        """Fence in one shard (init_transactions) and load its ledger; then it has a worker."""
        c = self.config
        producer = ShardProducer(
            c.kafka.bootstrap_servers,
            c.kafka.client_conf(),
            c.kafka.delivery_timeout_seconds,
            prefix=c.delivery.transactional_id_prefix,
            shard=shard,
            transaction_timeout_s=c.delivery.transaction_timeout_seconds,
        )
        try:
            producer.init()
            ledger = load_shard_ledger(c.kafka.bootstrap_servers, c.kafka.client_conf(), c.ledger.topic, shard)
        except BaseException:
            producer.close(timeout=5.0)
            raise
        worker = ShardWorker(
            c,
            shard,
            producer,
            ledger,
            stop=LinkedEvent(self.stop),
            session_factory=self.session_factory,
            hooks=self.hooks,
            framer=self.framer,
        )
        with self._control:
            self.workers[shard] = worker

    def start_publisher(self) -> None:
        """at_least_once: start the producer now (Publisher.start), so that poll-once's first
        records do not wait for its producer id. No-op exactly-once (the shards produce)."""
        if not self.exactly_once:
            self.publisher.start()

    def open_early(self, mailboxes: Sequence[MailboxConfig]) -> None:
        """exactly_once poll-once: open the first wave's sessions now, beside prepare()
        (sessions.open_first_wave). No-op if sessions were opened already (adopt_early)."""
        if self.exactly_once and not self._early:
            self._early = open_first_wave(self.config, mailboxes, self.session_factory)

    def adopt_early(self, early: dict[str, Prepared]) -> None:
        """Take over sessions open_first_wave() opened before this runner existed (poll-once
        opens them before the Kafka side is even imported): the rounds use them, close() ends
        those no round took."""
        self._early.update(early)

    def _end_early(self) -> None:
        """End the sessions open_early() opened that no round took (prepare() failed)."""
        while self._early:
            end_unused(self._early.popitem()[1])

    def _by_shard(self, mailboxes: Sequence[MailboxConfig]) -> dict[int, list[MailboxConfig]]:
        groups: dict[int, list[MailboxConfig]] = defaultdict(list)
        for m in mailboxes:
            groups[shard_of(m.id, self.shards)].append(m)
        return groups

    # ------------------------------------------------------------------ poll-once

    def poll_once(self, mailboxes: Sequence[MailboxConfig] | None = None) -> list[CycleResult]:
        """One cycle per mailbox (concurrently, bounded globally and per server); results in
        the order given. Mailboxes of one server beyond runtime.max_sessions_per_server go in
        later waves."""
        targets = list(mailboxes if mailboxes is not None else self.config.mailboxes)
        by_id: dict[str, CycleResult] = {}
        for wave in waves(targets, self.config.runtime.max_sessions_per_server):
            for r in self._poll_wave(wave):
                by_id[r.mailbox] = r
        for m in targets:
            telemetry.cycle_done(m, by_id[m.id])
        return [by_id[m.id] for m in targets]

    def _poll_wave(self, targets: list[MailboxConfig]) -> list[CycleResult]:
        sessions_n = max(1, min(len(targets), self.config.runtime.max_concurrent_sessions))
        if not self.exactly_once:
            with ThreadPoolExecutor(max_workers=sessions_n, thread_name_prefix="cycle") as pool:
                futures = [pool.submit(run_cycle, self.ctx, m) for m in targets]
                return [f.result() for f in futures]
        self.prepare(targets)
        groups = self._by_shard(targets)
        by_id: dict[str, CycleResult] = {}
        with (
            ThreadPoolExecutor(max_workers=sessions_n, thread_name_prefix="cycle") as sessions,
            ThreadPoolExecutor(max_workers=max(1, len(groups)), thread_name_prefix="round") as rounds,
        ):
            round_futures = [
                rounds.submit(self.workers[s].round, ms, sessions, self._take_early(ms)) for s, ms in groups.items()
            ]
            for rf in round_futures:
                for r in rf.result():
                    by_id[r.mailbox] = r
        return [by_id[m.id] for m in targets]

    def _take_early(self, mailboxes: Sequence[MailboxConfig]) -> dict[str, Prepared]:
        return {m.id: self._early.pop(m.id) for m in mailboxes if m.id in self._early}

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        """Poll every mailbox on its interval until :attr:`stop` is set.

        runtime.ownership ``all``: this process owns every shard. ``group``: the shards this
        replica owns come from a consumer group on the ledger topic (docs/decisions/0005);
        they are fenced in and loaded as they are assigned, stopped before they are revoked.
        """
        if self.exactly_once and self.config.runtime.ownership == "group":
            self.membership = Membership(
                self.config,
                self._on_assign,
                self._on_revoke,
                instance_id=self.config.runtime.instance_id,
                session_timeout_ms=int(self.config.runtime.group_session_timeout_seconds * 1000),
                max_poll_interval_ms=int(max(300.0, self.config.runtime.shutdown_grace_seconds + 120) * 1000),
            )
            self.shards = ensure_ledger_topic(
                self.config.kafka.bootstrap_servers,
                self.config.kafka.client_conf(),
                self.config.ledger.topic,
                shards=self.config.ledger.shards,
                create=self.config.ledger.create,
                replication_factor=self.config.topics.replication_factor,
            )
            self.membership.start()
        elif self.exactly_once:
            self.prepare()
            with self._control:  # plans count from now, not from before the shards were loaded
                self._restart_plans(list(self.scheduler.states))
            self._note_owned()
            self._ready.set()
        else:
            self.publisher.start()  # the first cycle's records need not wait for a producer id
            self._note_owned()
            self._ready.set()
        sessions_n = max(1, self.config.runtime.max_concurrent_sessions)
        sessions = ThreadPoolExecutor(max_workers=sessions_n, thread_name_prefix="cycle")
        # Units run in parallel, each one thread: shards (exactly_once) or mailboxes.
        pool = ThreadPoolExecutor(max_workers=max(1, sessions_n), thread_name_prefix="unit")
        running: dict[Future[list[CycleResult]], object] = {}
        #: sessions in flight per server (host:port), by the units that hold them.
        per_server: dict[str, int] = defaultdict(int)
        holding: dict[Future[list[CycleResult]], list[str]] = {}
        started: dict[Future[list[CycleResult]], list[MailboxConfig]] = {}
        try:
            while not self.stop.is_set():
                self.heartbeat = time.monotonic()
                if self._no_way_forward():
                    self.fatal = True
                    self.stop.set()
                    break
                self._maybe_reload()
                self._take_assignments()
                limit = self.config.runtime.max_sessions_per_server
                units = self._units()
                now = self._clock()
                busy = set(running.values())
                with self._control:
                    for mid in self._poll_requests:  # on demand: due now
                        if mid in self.scheduler.states:
                            self.scheduler.states[mid].due = now
                    self._poll_requests.clear()
                    for unit, ms in units.items():
                        if self.exactly_once and (unit not in self.workers or unit in self._revoking):
                            continue  # not ours (group ownership), or being handed over
                        if unit in busy or (self.exactly_once and self.workers[unit].dead is not None):  # type: ignore[index]
                            continue
                        due = []
                        for m in ms:
                            st = self.scheduler.states[m.id]
                            # Over the per-server limit: stays due, taken when a slot frees.
                            if not st.paused and st.due <= now and per_server[m.server] < limit:
                                per_server[m.server] += 1
                                st.running = True
                                due.append(m)
                                # How late against its (jittered) plan it starts: the schedule lag.
                                self.lags.append(now - st.due)
                        if due:
                            work = self.workers[unit].round if self.exactly_once else None  # type: ignore[index]
                            f = pool.submit(self._work, work, due, sessions)
                            running[f] = unit
                            self._running_units[f] = unit
                            holding[f] = [m.server for m in due]
                            started[f] = due
                with self._control:
                    earliest = self.scheduler.earliest(skip_paused=True, runnable=self._runnable)
                sleep = max(0.05, earliest - now) if earliest is not None else 1.0
                if running:
                    done, _ = wait(list(running), timeout=min(sleep, 1.0), return_when=FIRST_COMPLETED)
                    for f in done:
                        running.pop(f)
                        with self._control:
                            self._running_units.pop(f, None)
                        for server in holding.pop(f, []):
                            per_server[server] -= 1
                        for r in self._results(f, started.pop(f, [])):
                            with self._control:
                                mb = self._mailboxes.get(r.mailbox)
                                if mb is None:  # removed by a reload while its cycle ran
                                    self.scheduler.remove(r.mailbox)
                                    telemetry.forget([r.mailbox])
                                else:
                                    self.next_poll(mb, r, self._clock())
                                    self.scheduler.states[mb.id].running = False
                                waiters = self._waiters.pop(r.mailbox, [])
                            if mb is not None:
                                telemetry.cycle_done(mb, r)
                            for w in waiters:
                                w.set_result(r)
                else:
                    self._idle_wait(min(sleep, 1.0))
        finally:
            self._drain(pool, list(running))
            sessions.shutdown(wait=False, cancel_futures=True)
            self._prepare_pool.shutdown(wait=False, cancel_futures=True)
            with self._control:  # a load that never started is not waited for by the revocation
                for shard, future in self._prepare_futures.items():
                    if future.cancelled():
                        self._preparing.discard(shard)
            if self.membership is not None:
                self.membership.close()
            with self._control:
                pending = [w for ws in self._waiters.values() for w in ws]
                self._waiters.clear()
            for w in pending:
                if not w.done():
                    w.cancel()  # shutting down: the poll request is answered as not run

    # ------------------------------------------------------------------ group ownership

    @property
    def ready(self) -> bool:
        """Every owned shard fenced in and loaded (also true when it owns no shard)."""
        return self.readiness()[0]

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, why) for /readyz: ready when every shard this process owns is fenced in and
        its ledger loaded, including when it owns none (a replica without shards must not
        stall a rollout). Not ready before that, while shards assigned to it are being
        prepared, when group membership failed, and once the process stops."""
        with self._control:
            owned = sorted(s for s in self.workers if s not in self._revoking)
            pending = sorted(self._to_prepare)
        failed = self.membership is not None and self.membership.failed
        body: dict[str, Any] = {
            "mode": self.config.delivery.mode,
            "ownership": self.config.runtime.ownership if self.exactly_once else "all",
            "owned_shards": owned,
            "preparing_shards": pending,
        }
        if self.stop.is_set():
            return False, {**body, "reason": "shutting down"}
        if failed:
            return False, {**body, "reason": "group membership failed (see the log)"}
        if pending:
            return False, {**body, "reason": f"fencing in and loading shard(s) {pending}"}
        if not self._ready.is_set():
            if self.membership is not None and not self.membership.settled.is_set():
                return False, {**body, "reason": "waiting for the owners group to assign shards"}
            return False, {**body, "reason": "fencing in shards and loading their ledgers"}
        return True, body

    def liveness(self, stale_after: float = 120.0) -> tuple[bool, dict[str, Any]]:
        """(alive, why) for /healthz: the scheduling loop turned within ``stale_after`` seconds
        (it turns at least once a second; fencing in a shard and loading its ledger happen
        inside a turn and are covered by the startup probe and this margin). Before the loop's
        first turn, starting up counts as alive. A process that stopped polling for good
        (every producer fenced or fatal) is not."""
        if self.fatal:
            return False, {"reason": "no shard producer can go on (fenced or fatal); the process exits"}
        beat = self.heartbeat
        if beat is None:
            return True, {"state": "starting"}
        age = time.monotonic() - beat
        if age > stale_after:
            return False, {"reason": f"the scheduling loop has not turned for {age:.0f}s"}
        return True, {"state": "running", "loop_turned_seconds_ago": round(age, 3)}

    def _on_assign(self, shards: list[int]) -> None:
        """Membership thread: new shards; the loop fences them in and loads their ledgers."""
        with self._control:
            self._to_prepare.update(shards)
            self._revoking.difference_update(shards)
        self._wake.set()

    def _take_assignments(self) -> None:
        """Loop thread: start fencing in and loading the shards assigned since the last turn,
        in the background: the loop goes on scheduling the shards it has meanwhile (a long
        ledger must not hold every other mailbox of the replica)."""
        if self.membership is None:
            return
        now = time.monotonic()
        with self._control:
            todo = [
                s
                for s in sorted(self._to_prepare)
                if s not in self._preparing and self._prepare_retry_at.get(s, 0.0) <= now
            ]
            self._preparing.update(todo)
        for shard in todo:
            future = self._prepare_pool.submit(self._prepare_assigned, shard)
            with self._control:
                self._prepare_futures[shard] = future
        if self.membership.settled.is_set():
            self._ready.set()

    def _prepare_assigned(self, shard: int) -> None:
        """A prepare thread: one assigned shard; a failure is retried after PREPARE_RETRY_SECONDS."""
        try:
            self._prepare_shard(shard)
        except Exception as exc:
            why = exc.describe() if isinstance(exc, ConnectorError) else f"internal error ({type(exc).__name__})"
            log.error("shard %d not fenced in / loaded (%s); retried in %gs", shard, why, PREPARE_RETRY_SECONDS)
            if not isinstance(exc, ConnectorError):
                log.debug("shard %d prepare failure", shard, exc_info=True)
            with self._control:
                self._preparing.discard(shard)
                self._prepare_futures.pop(shard, None)
                self._prepare_retry_at[shard] = time.monotonic() + PREPARE_RETRY_SECONDS
            self._wake.set()
            return
        with self._control:
            stale = self.workers.pop(shard, None) if shard in self._revoking else None
            self._to_prepare.discard(shard)
            self._preparing.discard(shard)
            self._prepare_futures.pop(shard, None)
            self._prepare_retry_at.pop(shard, None)
            if stale is None:
                # Its mailboxes start afresh: first polls spread over the next seconds, not all
                # at once because they fell due while the shard belonged to someone else.
                self._restart_plans(m.id for m in self.config.mailboxes if shard_of(m.id, self.shards) == shard)
        if stale is not None:
            # Revoked while it was being prepared: never run it, hand it back at once.
            stale.producer.abort()
            stale.producer.close(timeout=10.0)
            log.info("shard %d revoked while it was being fenced in; handed back", shard)
        else:
            log.info("shard %d fenced in and loaded; polling its mailboxes", shard)
        self._note_owned()
        self._wake.set()

    def _note_owned(self) -> None:
        """The owned-shard gauges follow the workers (fenced or failed shards are not owned);
        the mailboxes polled get their counters at 0, those no longer polled here (their shard
        moved, a reload removed them) lose their series, so no replica shows stale values."""
        with self._control:
            if self.exactly_once:
                owned = {s for s, w in self.workers.items() if w.dead is None and s not in self._revoking}
                polled = [m for m in self.config.mailboxes if self.shards and shard_of(m.id, self.shards) in owned]
            else:
                owned, polled = set(), list(self.config.mailboxes)
            self._shards_seen.update(self.workers)
            seen = set(self._shards_seen)
            ids = {m.id for m in polled}
            gone, self._polled = self._polled - ids, ids
            paused = {m.id: self.scheduler.states[m.id].paused for m in polled if m.id in self.scheduler.states}
        if self.exactly_once:
            telemetry.shards_owned(owned, seen)
        if gone:
            telemetry.forget(gone)
        telemetry.mailboxes_polled(polled)
        for mid, on in paused.items():
            telemetry.paused(mid, on)

    def _restart_plans(self, mailbox_ids: Iterable[str]) -> None:
        """Under _control: plans start from now (see Scheduler.restart)."""
        now = self._clock()
        for mid in mailbox_ids:
            if mid in self.scheduler.states:
                self.scheduler.restart(mid, now)

    def _on_revoke(self, shards: list[int]) -> None:
        """Membership thread, inside the rebalance: stop the shards before another replica
        gets them. No new round starts; a round in flight ends (commit or abort) within the
        grace period; the last tombstones are written; the producers close."""
        with self._control:
            self._revoking.update(shards)
            self._to_prepare.difference_update(shards)
            for shard in shards:
                w = self.workers.get(shard)
                if w is not None and isinstance(w.stop, LinkedEvent):
                    w.stop.set()  # its round stops fetching and settles what it has
        deadline = time.monotonic() + self.config.runtime.shutdown_grace_seconds
        while time.monotonic() < deadline:
            with self._control:
                busy = [f for f, u in self._running_units.items() if u in shards and not f.done()]
                preparing = bool(self._preparing & set(shards))
            if not busy and not preparing:
                break
            if busy:
                wait(busy, timeout=0.5)
            else:
                time.sleep(0.1)
        for shard in shards:
            with self._control:
                worker = self.workers.pop(shard, None)
            if worker is not None:
                worker.flush_tombstones()
                worker.producer.abort()
                worker.producer.close(timeout=10.0)
        self._note_owned()
        log.info("shards %s handed over", shards)

    # ------------------------------------------------------------------ reload

    def _units(self) -> dict[object, list[MailboxConfig]]:
        """exactly_once: one unit of work = one shard round; at_least_once: one mailbox cycle.
        Computed once per configuration and shard count, not per loop turn: with thousands of
        mailboxes the grouping (a SHA-256 per mailbox) was most of the loop's CPU."""
        config = self.config
        if self._plan_for is not config or self._plan_shards != self.shards:
            if self.exactly_once:
                self._plan_units = {s: list(ms) for s, ms in self._by_shard(config.mailboxes).items()}
            else:
                self._plan_units = {m.id: [m] for m in config.mailboxes}
            self._plan_for, self._plan_shards = config, self.shards
        return self._plan_units

    @property
    def _mailboxes(self) -> dict[str, MailboxConfig]:
        config = self.config
        if self._map_for is not config:
            self._mailbox_map = {m.id: m for m in config.mailboxes}
            self._map_for = config
        return self._mailbox_map

    def request_reload(self) -> None:
        """SIGHUP: re-read the configuration file before the next scheduling decision."""
        self._reload_requested = True
        self._wake.set()

    def _maybe_reload(self) -> None:
        source = self.config.source
        if source == "<memory>":
            return
        now = time.monotonic()
        if not self._reload_requested and now - self._reload_checked < RELOAD_CHECK_SECONDS:
            return
        self._reload_checked = now
        stamp = file_stamp(source)
        asked, self._reload_requested = self._reload_requested, False
        if not asked and stamp in (self._config_mtime, self._bad_stamp):
            return
        try:
            new = load_config(source)
            self.apply_config(new)
        except ConnectorError as exc:
            # The process goes on with what it has; the fix is in the file. Reported once per
            # version of the file (a half-written file is read again when it changes).
            self._bad_stamp = stamp
            log.error("configuration %s not reloaded, still running the previous one: %s", source, exc)
            return
        self._config_mtime = stamp

    def apply_config(self, new: Config) -> None:
        """Take a reloaded configuration: the mailbox list and mailbox settings change at once
        (cycles in flight finish with the settings they started with); Kafka, topics, ledger,
        delivery and runtime pool sizes need a restart and are refused here."""
        old = self.config
        fixed = ("kafka", "topics", "record", "delivery", "ledger", "offload", "admin", "schema_registry")
        changed = [name for name in fixed if getattr(old, name) != getattr(new, name)]
        # runtime: only max_sessions_per_server applies live (pools, spool, ownership do not).
        if dataclasses.replace(old.runtime, max_sessions_per_server=0) != dataclasses.replace(
            new.runtime, max_sessions_per_server=0
        ):
            changed.append("runtime (other than max_sessions_per_server)")
        if changed:
            raise ConfigError(f"{', '.join(changed)} changed: these need a restart (the mailbox list reloads live)")
        before = {m.id: m for m in old.mailboxes}
        after = {m.id: m for m in new.mailboxes}
        added = [i for i in after if i not in before]
        removed = [i for i in before if i not in after]
        edited = [i for i in after if i in before and after[i] != before[i]]
        if self.exactly_once and added and self.membership is None:
            # Their shards fenced in and loaded first. Off the loop thread, which keeps its
            # heartbeat meanwhile: a long ledger must not make /healthz fail and the pod restart.
            loading = self._prepare_pool.submit(self.prepare, [after[i] for i in added])
            while not loading.done():
                self.heartbeat = time.monotonic()
                wait([loading], timeout=1.0)
            loading.result()
        with self._control:
            self.config = new
            self.ctx.config = new
            for worker in self.workers.values():
                worker.config = new
            for i in added:
                self.scheduler.specs[i] = after[i].schedule
                self.scheduler.add(i, self._clock())
            for i in edited:
                if after[i].schedule != before[i].schedule:
                    # A new plan, the same state: a pause, a backoff (an auth failure's) stay.
                    self.scheduler.specs[i] = after[i].schedule
                    self.scheduler.replan(i, self._clock())
            cancelled: list[Future[CycleResult]] = []
            for i in removed:
                if not self.scheduler.states[i].running:
                    self.scheduler.remove(i)
                    cancelled += self._waiters.pop(i, [])
                    telemetry.forget([i])
                else:
                    self.scheduler.states[i].paused = True  # no new cycle; removed when it ends
        for w in cancelled:
            w.cancel()
        self._note_owned()
        log.info(
            "configuration reloaded: %d mailbox(es) added, %d removed, %d changed",
            len(added),
            len(removed),
            len(edited),
            extra={"mailboxes": ",".join(added + removed + edited)[:500]},
        )

    # ------------------------------------------------------------------ on-call controls

    def _wait_for_wake(self, seconds: float) -> None:
        if self._wake.wait(seconds):
            self._wake.clear()

    def request_poll(self, mailbox_id: str) -> Future[CycleResult] | None:
        """Start a cycle of ``mailbox_id`` now; the future gets its result. None when a cycle of
        it is running already. KeyError for an unknown mailbox, PermissionError when paused."""
        with self._control:
            st = self.scheduler.states[mailbox_id]
            if st.paused:
                raise PermissionError(mailbox_id)
            if not self._runnable(mailbox_id):
                raise LookupError(mailbox_id)  # its shard is owned by another replica
            if st.running:
                return None
            f: Future[CycleResult] = Future()
            self._waiters[mailbox_id].append(f)
            self._poll_requests.add(mailbox_id)
        self._wake.set()
        return f

    def pause(self, mailbox_id: str) -> None:
        """No new cycle of the mailbox starts until resume(); one in flight finishes."""
        with self._control:
            self.scheduler.states[mailbox_id].paused = True
        telemetry.paused(mailbox_id, True)
        log.info("paused by an operator", extra={"mailbox": mailbox_id})

    def resume(self, mailbox_id: str) -> None:
        """Back to its schedule, polled at once."""
        with self._control:
            st = self.scheduler.states[mailbox_id]
            st.paused = False
            self._poll_requests.add(mailbox_id)
        telemetry.paused(mailbox_id, False)
        log.info("resumed by an operator", extra={"mailbox": mailbox_id})
        self._wake.set()

    def status(self) -> list[dict[str, Any]]:
        """Each mailbox's state for GET /mailboxes: ids, times (epoch seconds), no secrets."""
        out = []
        with self._control:
            for m in self.config.mailboxes:
                st = self.scheduler.states[m.id]
                shard = shard_of(m.id, self.shards) if self.exactly_once and self.shards else None
                state = "paused" if st.paused else "running" if st.running else "backoff" if st.failures else "idle"
                out.append(
                    {
                        "id": m.id,
                        "server": m.server,
                        "state": state,
                        "next_due": st.due,
                        "last_cycle": st.last_cycle_at,
                        "last_success": st.last_success_at,
                        "last_error": st.last_error_text,
                        "last_error_kind": st.last_error,
                        "failures": st.failures,
                        "backoff_until": st.backoff_until,
                        "in_use": st.in_use_count,
                        "shard": shard,
                        # this process polls it: it owns the shard (group ownership) or all of them
                        "owned": (not self.exactly_once) or (shard in self.workers and shard not in self._revoking),
                        "owner": self.identity,
                    }
                )
        return out

    def next_poll(self, m: MailboxConfig, r: CycleResult, now: float) -> float:
        """When to poll ``m`` next, given its cycle result ``r`` that arrived at ``now``; the
        scheduler is updated with it.

        The mailbox's schedule (connector/runtime/schedule.py) decides first: the next slot of
        its interval or cron plus its jitter; at once when a cycle stopped at a bound and made
        progress (mail it had to leave must not become a hot loop); after a failure, its
        backoff (long for authentication failures, short for [IN-USE]).

        RFC 2449 §6.8 LOGIN-DELAY: the server accepts a login only that many seconds after the
        last successful one, so no login starts earlier. The login of a cycle happened before
        its result arrived, so counting from the arrival is never early (at most late by the
        cycle's own length). A ``[LOGIN-DELAY]`` refusal (§8.1.2) waits the whole advertised
        delay from now, as the login it counts from may not be ours; without an advertised
        delay it is retried after poll_interval_seconds.
        """
        again = r.ok and r.more_pending and (r.deleted > 0 or r.published > 0)
        due = self.scheduler.next_due(m.id, now, ok=r.ok, repoll=again, error=error_kind(r.error))
        self.scheduler.states[m.id].last_error_text = None if r.error is None else error_text(r.error)
        if isinstance(r.error, Pop3LoginDelayError):
            # Refused for logging in too soon: never retried before one interval.
            due = max(due, now + m.schedule.interval_seconds)
        if r.policy is not None:
            advertised = r.policy.login_delay_seconds
            if advertised is None:
                self._login_delay.pop(m.id, None)
            else:
                self._login_delay[m.id] = min(float(advertised), MAX_LOGIN_DELAY_SECONDS)
                self._note_login_delay(m, advertised)
        if r.logged_in:
            self._last_login[m.id] = now
        delay = self._login_delay.get(m.id)
        if delay:
            if isinstance(r.error, Pop3LoginDelayError):
                due = max(due, now + delay)
            last = self._last_login.get(m.id)
            if last is not None:
                due = max(due, last + delay)
        self.scheduler.states[m.id].due = due
        return due

    def _note_login_delay(self, m: MailboxConfig, advertised: int) -> None:
        """INFO, once per mailbox and value, when the server's delay overrides the interval."""
        if advertised <= m.poll_interval_seconds or (m.id, advertised) in self._delay_noted:
            return
        self._delay_noted.add((m.id, advertised))
        wait = min(float(advertised), MAX_LOGIN_DELAY_SECONDS)
        log.info(
            "the server allows a login only every %d s (RFC 2449 LOGIN-DELAY), more than poll_interval_seconds=%g: "
            "polling every %.0f s",
            advertised,
            m.poll_interval_seconds,
            wait,
            extra={"mailbox": m.id},
        )

    def _work(
        self,
        work: Callable[[list[MailboxConfig], ThreadPoolExecutor], list[CycleResult]] | None,
        due: list[MailboxConfig],
        sessions: ThreadPoolExecutor,
    ) -> list[CycleResult]:
        # The shard's worker was bound when the round was submitted: a revocation while it
        # waited for a thread cannot make it look up a worker that is gone.
        if work is not None:
            return work(due, sessions)
        return [run_cycle(self.ctx, due[0])]

    def _results(self, f: Future[list[CycleResult]], due: list[MailboxConfig]) -> list[CycleResult]:
        """A unit's results; a unit that raised (a bug, or its shard's producer gone) gives a
        failed result per mailbox, so the loop goes on and their state is not left running."""
        try:
            return f.result()
        except Exception as exc:
            log.exception("internal error in a unit of work (%d mailbox(es)); they are retried", len(due))
            return [CycleResult(mailbox=m.id, cycle_id="-", error=exc) for m in due]

    def _runnable(self, mailbox_id: str) -> bool:
        """Whether this process may poll the mailbox now (group ownership: its shard is ours)."""
        if not self.exactly_once or self.membership is None:
            return True
        shard = shard_of(mailbox_id, self.shards)
        return shard in self.workers and shard not in self._revoking

    def _no_way_forward(self) -> bool:
        if self.exactly_once:
            with self._control:
                workers = list(self.workers.values())
            if self.membership is None and workers and all(w.dead is not None for w in workers):
                log.error("every shard of this process is fenced or failed fatally; stopping")
                return True
            return False
        if self.publisher.fatal is not None:
            # A fatal producer never recovers; exit so the orchestrator restarts us.
            log.error("Kafka producer is in a fatal state (%s); stopping", self.publisher.fatal)
            return True
        return False

    def _drain(self, pool: ThreadPoolExecutor, futures: list[Future[list[CycleResult]]]) -> None:
        grace = self.config.runtime.shutdown_grace_seconds
        if futures:
            log.info("shutting down: waiting up to %.0fs for %d unit(s) of work in flight", grace, len(futures))
            _, not_done = wait(futures, timeout=grace)
            if not_done:
                log.warning(
                    "%d unit(s) of work did not finish within the grace period; their POP3 connections "
                    "are dropped without QUIT, so nothing of theirs is deleted",
                    len(not_done),
                )
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._end_early()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        left = self.publisher.close(timeout=10.0)
        with self._control:
            workers = list(self.workers.values())
            self.workers.clear()
        for w in workers:
            w.flush_tombstones()
            w.producer.abort()
            left += w.producer.close(timeout=10.0)
        if left:
            log.warning("%d record(s) still unconfirmed at exit; their mail stays on the server", left)
