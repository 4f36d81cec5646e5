"""Exactly-once delivery: one Kafka transaction per shard round, the UIDL ledger, DELE after commit.

A *shard round* serves several mailboxes of one shard at once (group commit,
docs/decisions/0002):

    begin_transaction
      + tombstones for the mail the previous round deleted
      + for each due mailbox, concurrently (one POP3 session each):
            UIDL/LIST -> UIDLs in the ledger: nothing to fetch (delete them, in delete mode)
                      -> new UIDLs: RETR -> record -> produce; after the delivery reports,
                         one ledger entry per record (topic, partition, offset, sha256...);
                         undecodable mail: its dead letter instead of the record, and an
                         entry in state dead_lettered
    commit_transaction                  <- the only point where mail becomes visible
    then, per session: DELE (the ledger says it is in Kafka) -> QUIT

A crash before the commit: the broker aborts the transaction (or init_transactions() of the
next owner does); nothing was deleted; the mail is fetched again. A crash after the commit:
the ledger has the UIDLs, so the next round only deletes them. Consumers reading
read_committed see every mail once.

A POP3 failure in one session does not spoil the round: whatever that session produced
goes in with its ledger entries, and its mail is deleted by a later round. A Kafka failure
(a failed delivery, a commit that needs an abort) aborts the whole round and every session
ends without applying deletes. A fenced or fatal producer stops the shard for good.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from connector import faults
from connector.config.model import Config, MailboxConfig
from connector.delivery.kafka import Delivery
from connector.delivery.transactional import ShardFencedError, ShardProducer
from connector.errors import (
    ConnectorError,
    DeliveryError,
    DeliveryFatalError,
    Pop3Error,
    UidlResetError,
)
from connector.observability import metrics
from connector.protocol.transport import time_limit
from connector.records import record_id
from connector.records.framing import SINGLE_OBJECT, Framer
from connector.records.ledger import LedgerEntry, ShardLedger
from connector.runtime import decode_pool
from connector.runtime.cycle import (
    SETTLE_LIMIT_WHAT,
    CycleHooks,
    count_reasons,
    failure_level,
    note_listing,
    placer_for,
    policy_after_refusal,
    policy_text,
    retrieve_encoded,
    select_for_retrieval,
    send_record,
    settle_time_limit,
    spool_policy,
)
from connector.runtime.sessions import (
    ROUND_FETCH_SHARE,
    CycleResult,
    MailboxSession,
    Prepared,
    end_unused,
    end_without_deletes,
    open_listed,
    open_session,
)

log = logging.getLogger("pop3kafka.eos")

#: RFC 1939 sizes are the server's estimate; RETR of a mail without a final CRLF is 2 bytes
#: longer. A known UIDL whose LIST size moved more than this is checked with TOP.
SIZE_SLACK = 2
#: UIDL reset check: at most this many TOP commands per cycle to compare headers.
RESET_SAMPLE = 5
DAY_MS = 86_400_000
FETCH_LIMIT_WHAT = "the shard round's time limit (0.8 x delivery.transaction_timeout_seconds)"
BASELINE_MARKER = ""  # ledger uidl "" = "start_from: now was applied to this mailbox"


@dataclass
class _Produced:
    msg_num: int
    uidl: str
    delivery: Delivery
    raw_sha256: str
    list_size: int
    header_sha256: str
    fetched_at: int
    #: the record is the mail's dead letter (topics.dead_letter), not its mail record.
    dead: bool = False
    #: its chunk records, in the same transaction.
    chunks: tuple[Delivery, ...] = ()
    #: a dead letter's reason (DecodeError.reason).
    reason: str | None = None


class ShardWorker:
    """Owns one shard: its transactional producer and its ledger view. One round at a time."""

    def __init__(
        self,
        config: Config,
        shard: int,
        producer: ShardProducer,
        ledger: ShardLedger,
        *,
        stop: threading.Event,
        session_factory: Callable[[MailboxConfig], MailboxSession] = open_session,
        hooks: CycleHooks | None = None,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        framer: Framer = SINGLE_OBJECT,
    ) -> None:
        self.config = config
        #: record.framing, schema ids resolved at start (fixed for the process: see Runner).
        self.framer = framer
        self.shard = shard
        self.producer = producer
        self.ledger = ledger
        self.stop = stop
        self.session_factory = session_factory
        self.hooks = hooks or CycleHooks()
        self.clock_ms = clock_ms
        #: set when the producer was fenced or failed fatally: the shard is no longer ours.
        self.dead: ConnectorError | None = None
        self._tombstones: list[tuple[str, str]] = []
        self._absent_since: dict[tuple[str, str], int] = {}
        metrics.SHARD_OWNED.labels(str(shard)).set(1)
        metrics.LEDGER_ENTRIES.labels(str(shard)).set(len(ledger))
        self._lock = threading.Lock()  # one round at a time
        self._state_lock = threading.Lock()  # tombstones and ledger view, touched by settle threads

    # ------------------------------------------------------------------ the round

    def _die(self, exc: DeliveryFatalError) -> None:
        """The shard is no longer ours (fenced) or its producer is broken: stop it, loudly."""
        self.dead = exc
        shard = str(self.shard)
        if isinstance(exc, ShardFencedError):
            metrics.FENCING_EVENTS.labels(shard).inc()
        else:
            metrics.PRODUCER_FATAL.labels(shard).inc()
        metrics.SHARD_OWNED.labels(shard).set(0)
        log.critical("shard %d stopped: %s", self.shard, exc)

    def round(
        self,
        mailboxes: Sequence[MailboxConfig],
        sessions: ThreadPoolExecutor,
        early: dict[str, Prepared] | None = None,
    ) -> list[CycleResult]:
        """One transaction for ``mailboxes`` (all of this shard); results in the same order.
        ``early``: sessions of some of them opened beforehand (open_early), by mailbox id."""
        with self._lock:
            return self._round(mailboxes, sessions, early or {})

    def _fail_all(self, preps: Sequence[Prepared], err: ConnectorError, step: str) -> list[CycleResult]:
        for p in preps:
            end_unused(p)  # an early session too, once its open is done
            if p.result.error is None:
                p.result.error = err.with_context(mailbox=p.mailbox.id, step=step)
            p.result.deleted = 0
            p.result.published = 0
            p.result.dead_lettered = 0
            p.result.dead_letter_reasons = {}
            p.result.duration_s = time.monotonic() - p.t0
        return [p.result for p in preps]

    def _round(
        self, mailboxes: Sequence[MailboxConfig], sessions: ThreadPoolExecutor, early: dict[str, Prepared]
    ) -> list[CycleResult]:
        # Sessions opened early were logged under the cycle id they were opened with (one per
        # poll-once): the round keeps it, so one id names the whole cycle in the logs.
        round_id = next((p.result.cycle_id for p in early.values()), None) or uuid.uuid4().hex[:12]
        preps = [
            early.get(m.id) or Prepared(m, CycleResult(mailbox=m.id, cycle_id=round_id), t0=time.monotonic())
            for m in mailboxes
        ]
        if self.dead is not None:
            return self._fail_all(preps, self.dead, "produce")
        try:
            self.producer.begin()
        except (ShardFencedError, DeliveryFatalError) as exc:
            self._die(exc)
            return self._fail_all(preps, exc, "produce")
        except DeliveryError as exc:
            return self._fail_all(preps, exc, "produce")
        began = time.monotonic()
        # The broker aborts a transaction left open past transaction.timeout.ms, and with it
        # every mailbox of the round: a server that trickles bytes (never idle long enough for
        # its inactivity timeout) must not get there. Its session is dropped at this limit and
        # the round commits what the others fetched (docs/delivery.md, "Slow servers").
        fetch_until = time.monotonic() + ROUND_FETCH_SHARE * self.config.delivery.transaction_timeout_seconds
        for p in preps:
            p.fetch_until = fetch_until
        tombstones = list(self._tombstones)
        for mailbox_id, uidl in tombstones:
            key = record_id(mailbox_id, uidl).encode()
            self._ledger_write(key, None)

        list(sessions.map(self._fetch, preps))

        kafka_errors = [p.kafka_error for p in preps if p.kafka_error is not None]
        if kafka_errors:
            self.producer.abort()
            self._transaction_ended("aborted", began)
            if self.producer.fatal is not None:
                dead = self.producer.fatal_error()
                self._die(dead)
                return self._fail_all(preps, dead, "produce")
            return self._fail_all(preps, kafka_errors[0], "produce")

        faults.point("before_commit")
        try:
            with faults.during("during_commit"):
                self.producer.commit()
        except (ShardFencedError, DeliveryFatalError) as exc:
            self._transaction_ended("aborted", began)
            self._die(exc)
            return self._fail_all(preps, exc, "commit")
        except DeliveryError as exc:
            self._transaction_ended("aborted", began)
            return self._fail_all(preps, exc, "commit")
        self._transaction_ended("committed", began)
        faults.point("after_commit")

        # Committed: the ledger view follows what is now in Kafka.
        with self._state_lock:
            self._tombstones = self._tombstones[len(tombstones) :]
        for p in preps:
            for e in p.entries:
                self.ledger.record(e)
            for u in p.forgotten:
                self.ledger.forget(p.mailbox.id, u)
            p.result.published = sum(1 for e in p.entries if e.state == "delivered")
            p.result.dead_lettered = sum(1 for e in p.entries if e.state == "dead_lettered")
            p.result.dead_letter_reasons = count_reasons(p.dead_reasons)
            for e in p.entries:
                hook = {"delivered": self.hooks.on_published, "dead_lettered": self.hooks.on_dead_lettered}.get(e.state)
                if hook:
                    hook(e.uidl)
        # DELE + QUIT per session in parallel: each DELE is a round trip, and a slow server
        # must not delay the others' QUIT (their locks, their deletes).
        list(sessions.map(self._settle, preps))
        metrics.LEDGER_ENTRIES.labels(str(self.shard)).set(len(self.ledger))
        return [p.result for p in preps]

    def _transaction_ended(self, outcome: str, began: float) -> None:
        metrics.TRANSACTIONS.labels(str(self.shard), outcome).inc()
        metrics.TRANSACTION_DURATION.labels(str(self.shard)).observe(time.monotonic() - began)

    def _settle(self, p: Prepared) -> None:
        """After the commit: DELE what the ledger holds, then QUIT (RFC 1939 §6 UPDATE)."""
        res = p.result
        if p.session is None:
            res.duration_s = time.monotonic() - p.t0
            return
        step = "dele"
        try:
            with time_limit(settle_time_limit(p.mailbox), SETTLE_LIMIT_WHAT):
                p.session.dele_many([n for n, _ in p.to_delete])
                faults.point("after_dele")
                step = "quit"
                p.session.quit()
            p.session = None
            # As in at-least-once mode: ``deleted`` counts delivered mail, unread deletes apart.
            res.deleted_unread = len(res.delete_unread)
            res.deleted = len(p.to_delete) - res.deleted_unread
            with self._state_lock:  # settles run in parallel threads
                for _, uidl in p.to_delete:
                    self._tombstones.append((p.mailbox.id, uidl))
                    self.ledger.forget(p.mailbox.id, uidl)
            if self.hooks.on_deleted:
                for _, uidl in p.to_delete:
                    self.hooks.on_deleted(uidl)
        except ConnectorError as exc:
            # The mail is in Kafka and in the ledger: a later round deletes it. Nothing lost.
            res.error = exc.with_context(mailbox=p.mailbox.id, step=step)
            log.warning("%s (the mail is committed; it is deleted next cycle)", res.error.describe())
            if p.session is not None:
                p.session.close()  # never QUIT here: a half-done DELE list must not be applied
                p.session = None
        res.duration_s = time.monotonic() - p.t0
        if res.ok:
            log.info(
                "cycle done: listed=%d fetched=%d published=%d dead_lettered=%d deleted=%d in %.2fs%s",
                res.listed,
                res.fetched,
                res.published,
                res.dead_lettered,
                res.deleted,
                res.duration_s,
                policy_text(res),
                extra={"mailbox": p.mailbox.id, "cycle": res.cycle_id},
            )

    def flush_tombstones(self) -> None:
        """At shutdown: commit the tombstones of mail deleted in the last round, so the next
        owner's ledger does not list mail that is gone. A crash skips this; absence aging
        and the reset check's header comparison cover that case."""
        with self._lock:
            if not self._tombstones or self.dead is not None:
                return
            try:
                self.producer.begin()
                for mailbox_id, uidl in self._tombstones:
                    key = record_id(mailbox_id, uidl).encode()
                    self._ledger_write(key, None)
                self.producer.commit()
                self._tombstones.clear()
            except ConnectorError as exc:
                self.producer.abort()
                log.warning(
                    "shard %d: tombstones not written at shutdown (%s); they are aged out later", self.shard, exc
                )

    # ------------------------------------------------------------------ one mailbox

    def _ledger_write(self, key: bytes, value: bytes | None) -> None:
        """A ledger entry (``value`` None: a tombstone) into the open transaction, in this
        shard's partition; the commit confirms it (ShardProducer.send_in_transaction)."""
        self.producer.send_in_transaction(self.config.ledger.topic, key, value, partition=self.shard)

    def _send(self, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> Delivery:
        """Chunk records go into the shard's open transaction, partitioned by key."""
        return self.producer.send(topic, key, value, headers)

    def _fetch(self, p: Prepared) -> None:
        """Fetch phase of one mailbox inside the open transaction, within the round's time
        limit; never raises. A session that would start with less of the limit left than one
        server answer may take (the pool was busy) does not start: it is due again at once."""
        left = p.fetch_until - time.monotonic()
        if left < p.mailbox.timeout_seconds:
            end_unused(p)  # opened early, then the round had no time left for it
            p.result.more_pending = True
            log.info(
                "not started: %.1fs of the round's time limit left; polled again in the next round",
                max(0.0, left),
                extra={"mailbox": p.mailbox.id, "cycle": p.result.cycle_id},
            )
            return
        with time_limit(left, FETCH_LIMIT_WHAT):
            self._fetch_phase(p)

    def _fetch_phase(self, p: Prepared) -> None:
        m, res = p.mailbox, p.result
        extra = {"mailbox": m.id, "cycle": res.cycle_id}
        produced: list[_Produced] = []
        try:
            if p.early is not None:
                p.early.result()  # open_listed() in another thread: it raised, or p is listed
            else:
                open_listed(p, self.session_factory, extra)
            session = p.session
            assert session is not None and p.listing is not None
            uidls, sizes = p.listing
            known = self.ledger.known(m.id)
            # keep mode leaves published mail on the server on purpose: not backlog
            note_listing(res, uidls, sizes, known if not m.delete else None)
            now = self.clock_ms()
            if m.start_from == "now" and BASELINE_MARKER not in known:
                self._baseline(p, uidls, sizes, now)
                return
            present = {u for _, u in uidls}
            skip = self._check_reset(p, known, uidls, sizes, session)
            self._age_absent(p, known, present, now)
            new: list[tuple[int, str]] = []
            for msg_num, uidl in uidls:
                if uidl in skip:
                    continue
                entry = known.get(uidl)
                if entry is None:
                    new.append((msg_num, uidl))
                    continue
                aged = (
                    m.delete_after_days is not None
                    and entry.first_seen_at is not None
                    and now - entry.first_seen_at >= m.delete_after_days * DAY_MS
                )
                # Baseline entries (start_from: now, imports) name mail we never published:
                # delete mode leaves it alone; only delete_after_days removes it.
                if aged or (m.delete and entry.state != "baseline"):
                    p.to_delete.append((msg_num, uidl))
            chosen = select_for_retrieval(m, new, sizes, res, extra)
            # oversized: delete -> deleted unread after the commit, with the published mail.
            p.to_delete.extend(res.delete_unread)
            p.step = "retr"
            # closing(): the retrieval (a read-ahead thread with it) ends here on any exit,
            # before the handlers below use the session (end_without_deletes).
            with contextlib.closing(
                retrieve_encoded(
                    session,
                    m,
                    chosen,
                    stop=self.stop,
                    res=res,
                    hooks=self.hooks,
                    extra=extra,
                    clock_ms=self.clock_ms,
                    spool=spool_policy(self.config),
                    placer=placer_for(self.config, m, self._send, self.framer),
                    framer=self.framer,
                    pool=decode_pool.current(self.config),
                    sizes=sizes,
                )
            ) as mails:
                for got in mails:
                    p.step = "produce"
                    # A dead letter goes into the same transaction as a mail record would, and gets
                    # its ledger entry there too (state dead_lettered): both commit or neither.
                    d = send_record(
                        self.producer,
                        self.config,
                        m,
                        got.uidl,
                        got.value,
                        res=res,
                        extra=extra,
                        dead_letter=got.dead_letter,
                    )
                    if d is not None:
                        produced.append(
                            _Produced(
                                got.msg_num,
                                got.uidl,
                                d,
                                got.sha256,
                                sizes[got.msg_num],
                                got.header_sha256,
                                got.fetched_at,
                                dead=got.dead_letter is not None,
                                chunks=got.chunks,
                                reason=got.dead_letter.reason if got.dead_letter is not None else None,
                            )
                        )
                    p.step = "retr"
        except DeliveryError as exc:
            p.kafka_error = exc
        except ConnectorError as exc:
            res.error = exc.with_context(mailbox=m.id, step=p.step)
            log.log(failure_level(exc), "%s", res.error.describe(), extra=extra)
            policy_after_refusal(p.session, exc, res)
            if p.session is not None and isinstance(exc, Pop3Error):
                end_without_deletes(p.session, m)
                p.session = None
            p.to_delete.clear()
        except Exception as exc:  # a bug: this mailbox fails, the others go on
            res.error = exc
            log.exception("internal error in step %s", p.step, extra=extra)
            if p.session is not None:
                end_without_deletes(p.session, m)
                p.session = None
            p.to_delete.clear()
        # Whatever was produced gets its ledger entry in the same transaction, even when the
        # POP3 side failed: the records commit with their entries, and a later round deletes.
        self._write_entries(p, produced)

    def _write_entries(self, p: Prepared, produced: list[_Produced]) -> None:
        if not produced or p.kafka_error is not None:
            return
        deliveries = [d for x in produced for d in (*x.chunks, x.delivery)]
        self.producer.wait(deliveries, stop=self.stop, stop_grace=10.0)
        failure = self.producer.check(deliveries)
        if failure is not None:
            p.kafka_error = failure  # the whole transaction must abort
            return
        m = p.mailbox
        for x in produced:
            # dead_lettered: topic/partition/offset name the dead letter, which holds the
            # original bytes. For DELE it counts like delivered (the next round deletes a
            # known UIDL of either state), and it is never fetched again while it is known.
            entry = LedgerEntry(
                mailbox_id=m.id,
                uidl=x.uidl,
                state="dead_lettered" if x.dead else "delivered",
                recorded_at=self.clock_ms(),
                topic=x.delivery.topic,
                partition=x.delivery.partition,
                offset=x.delivery.offset,
                raw_sha256=x.raw_sha256,
                list_size=x.list_size,
                header_sha256=x.header_sha256,
                first_seen_at=x.fetched_at,
            )
            self._ledger_write(entry.key, entry.encode())
            p.entries.append(entry)
            if x.dead:
                p.dead_reasons.append(x.reason)
            if m.delete and p.session is not None:
                p.to_delete.append((x.msg_num, x.uidl))

    # ------------------------------------------------------------------ ledger rules

    def _baseline(self, p: Prepared, uidls: list[tuple[int, str]], sizes: dict[int, int], now: int) -> None:
        """start_from: now -> what is there now is recorded as seen, not published."""
        m = p.mailbox
        for msg_num, uidl in [*uidls, (0, BASELINE_MARKER)]:
            entry = LedgerEntry(
                mailbox_id=m.id,
                uidl=uidl,
                state="baseline",
                recorded_at=now,
                list_size=sizes.get(msg_num),
                first_seen_at=now,
            )
            self._ledger_write(entry.key, entry.encode())
            p.entries.append(entry)
        log.info(
            "start_from now: %d mail(s) already on the server recorded as seen, not published",
            len(uidls),
            extra={"mailbox": m.id},
        )

    def _check_reset(
        self,
        p: Prepared,
        known: dict[str, LedgerEntry],
        uidls: list[tuple[int, str]],
        sizes: dict[int, int],
        session: MailboxSession,
    ) -> set[str]:
        """Recognise a UIDL reset or a reused UIDL before anything is republished.

        Returns UIDLs this round must not fetch (rebaselined ones).
        """
        m = p.mailbox
        real = {u: e for u, e in known.items() if u != BASELINE_MARKER}
        present = {u for _, u in uidls}
        vanished = [u for u in real if u not in present]
        new = [(n, u) for n, u in uidls if u not in real]
        if vanished and new and self._same_mail_under_new_uidls(real, vanished, new, sizes, session):
            what = (
                f"{len(vanished)} of {len(real)} known UIDLs vanished and {len(new)} new ones appeared, and new UIDLs "
                "name mail the ledger already holds (same headers): the server reset its UIDLs (e.g. a lost "
                "Dovecot uidlist)"
            )
            if m.on_uidl_reset == "stop":
                raise UidlResetError(
                    f"{what}. Nothing was published. Decide with on_uidl_reset: republish (publish them all "
                    "again), or rebaseline (record them as seen without publishing)"
                )
            log.warning("%s; on_uidl_reset=%s", what, m.on_uidl_reset, extra={"mailbox": m.id})
            skip: set[str] = set()
            if m.on_uidl_reset == "rebaseline":
                now = self.clock_ms()
                for msg_num, uidl in new:
                    entry = LedgerEntry(m.id, uidl, "baseline", now, list_size=sizes[msg_num], first_seen_at=now)
                    self._ledger_write(entry.key, entry.encode())
                    p.entries.append(entry)
                    skip.add(uidl)
            return skip
        # A known UIDL whose size changed: TOP n 0 tells whether it is still the same mail.
        for msg_num, uidl in uidls:
            e = real.get(uidl)
            if e is None or e.list_size is None or e.header_sha256 is None:
                continue
            if abs(sizes[msg_num] - e.list_size) > SIZE_SLACK:
                head = session.top(msg_num, 0)
                if hashlib.sha256(head).hexdigest() != e.header_sha256:
                    raise UidlResetError(
                        f"UIDL {uidl!r} now names different mail (size {e.list_size} -> {sizes[msg_num]}, headers "
                        "differ): the server reused a UIDL. Nothing was published; see on_uidl_reset"
                    )
        return set()

    @staticmethod
    def _same_mail_under_new_uidls(
        real: dict[str, LedgerEntry],
        vanished: list[str],
        new: list[tuple[int, str]],
        sizes: dict[int, int],
        session: MailboxSession,
    ) -> bool:
        """Do some new UIDLs carry mail we already published under a vanished UIDL?

        Vanished UIDLs alone prove nothing (we or another client deleted the mail, or a crash
        came before our tombstones). The evidence of a reset is old mail under new UIDLs: a
        new UIDL whose LIST size matches a vanished entry's, and whose headers (TOP n 0)
        hash the same. At most RESET_SAMPLE TOP commands per cycle.
        """
        by_size: dict[int, set[str]] = {}
        for u in vanished:
            e = real[u]
            if e.list_size is not None and e.header_sha256 is not None:
                by_size.setdefault(e.list_size, set()).add(e.header_sha256)
        if not by_size:
            return False
        checked = 0
        for msg_num, _ in new:
            size = sizes[msg_num]
            hashes = set().union(*(by_size.get(s, set()) for s in range(size - SIZE_SLACK, size + SIZE_SLACK + 1)))
            if not hashes:
                continue
            if hashlib.sha256(session.top(msg_num, 0)).hexdigest() in hashes:
                return True
            checked += 1
            if checked >= RESET_SAMPLE:
                return False
        return False

    def _age_absent(self, p: Prepared, known: dict[str, LedgerEntry], present: set[str], now: int) -> None:
        """Tombstone entries absent longer than the grace period, never merely absent once:
        providers like Gmail show only part of the mailbox per session."""
        m = p.mailbox
        grace = m.absent_grace_days * DAY_MS
        for uidl in list(known):
            if uidl == BASELINE_MARKER:
                continue
            k = (m.id, uidl)
            if uidl in present:
                self._absent_since.pop(k, None)
                continue
            since = self._absent_since.setdefault(k, now)
            if now - since >= grace:
                key = record_id(m.id, uidl).encode()
                self._ledger_write(key, None)
                p.forgotten.append(uidl)
                self._absent_since.pop(k, None)
