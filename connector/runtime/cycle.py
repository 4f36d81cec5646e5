"""One poll cycle of one mailbox: the delivery protocol of docs/decisions/0001 in code.

    connect -> (STLS) -> login -> UIDL + LIST -> for each new mail, bounded by count and bytes:
        RETR (hashed while received, spooled when large) -> decode -> Avro record -> produce
    -> wait for every delivery report -> DELE only the confirmed mails -> QUIT

RFC 1939 §6: deletions take effect only at QUIT, and a dropped connection deletes nothing. So
any failure before the DELEs ends the session with abort() (RSET + QUIT), and nothing that
Kafka has not confirmed is ever deleted. A record that Kafka confirmed is deleted even when
another record of the same cycle failed: leaving it would only duplicate it next cycle.

Guarantee of this version: at-least-once (a crash between the broker's ack and QUIT
re-publishes those mails next cycle, with the same record id). Transactions and the UIDL
ledger that make it exactly-once come in the next issue and plug in at "produce" and "DELE".
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import logging
import mmap
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from connector import faults
from connector.config.model import Config, MailboxConfig
from connector.delivery.kafka import Delivery, Publisher
from connector.delivery.offload import ContentStore, OffloadSettings, open_store
from connector.errors import (
    ConnectorError,
    DecodeError,
    DeliveryError,
    DeliveryFatalError,
    MailTooLargeError,
    Pop3LoginDelayError,
    Pop3MailboxBusyError,
    RecordTooLargeError,
)
from connector.observability import metrics
from connector.protocol import Retrieved, SpoolPolicy
from connector.protocol.transport import time_limit
from connector.records import (
    HEADER_MAILBOX,
    HEADER_RECORD_ID,
    Provenance,
    Schema,
    build_mail_record,
    encode_passthrough,
    mail_schema,
    record_id,
)
from connector.records.dead_letter import DeadLetter
from connector.records.framing import SINGLE_OBJECT, Framer
from connector.records.ledger import header_sha256
from connector.runtime.login import login
from connector.runtime.placement import Placer, Send
from connector.runtime.readahead import ReadAhead
from connector.runtime.sessions import (
    CycleResult,
    MailboxSession,
    after_login,
    end_without_deletes,
    first_time,
    list_mailbox,
    note_session,
    open_session,
)

if TYPE_CHECKING:
    from connector.decoding.fastmime import SpoolMap
    from connector.decoding.signature import SignatureCheck
    from connector.runtime.decode_pool import Channel, DecodePool

log = logging.getLogger("pop3kafka.cycle")

#: RFC 1939 §11: LIST sizes may be estimates. A mail chosen by its LIST size may arrive a little
#: larger (no final CRLF: +2; GNU pop3d adds an X-UIDL header; some servers count LF line ends in
#: LIST and send CRLF): RETR may bring max(1 KiB, 1/16 of the limit) more before it counts as
#: "grew past the limit".
RETR_SLACK = 1024

#: Time limits on a session's POP3 I/O (connector.protocol.transport.time_limit), on top of the
#: per-operation inactivity timeout, which a server sending a byte now and then never trips.
#: at_least_once fetch phase: max_seconds_per_cycle (checked between mails) plus this many
#: inactivity timeouts for the mail in flight and the RETRs drained after it; exactly_once
#: rounds use their transaction's limit instead (sessions.ROUND_FETCH_SHARE).
CYCLE_LIMIT_TIMEOUTS = 4
CYCLE_LIMIT_WHAT = "the cycle's time limit (max_seconds_per_cycle + 4 x timeout_seconds)"
#: DELE + QUIT after a commit: one pipelined batch and one answer.
SETTLE_LIMIT_TIMEOUTS = 4
SETTLE_LIMIT_WHAT = "the time limit for DELE and QUIT (4 x timeout_seconds)"


def cycle_time_limit(mailbox: MailboxConfig) -> float:
    return mailbox.max_seconds_per_cycle + CYCLE_LIMIT_TIMEOUTS * mailbox.timeout_seconds


def settle_time_limit(mailbox: MailboxConfig) -> float:
    return SETTLE_LIMIT_TIMEOUTS * mailbox.timeout_seconds


@dataclass
class CycleHooks:
    """Optional callbacks for tests and metrics; called on the cycle's thread."""

    on_retrieved: Callable[[str, int], None] | None = None  # (uidl, size)
    on_published: Callable[[str], None] | None = None  # (uidl) after the broker confirmed it
    on_dead_lettered: Callable[[str], None] | None = None  # (uidl) after its dead letter was confirmed
    on_deleted: Callable[[str], None] | None = None  # (uidl) after DELE was acknowledged


def note_listing(
    res: CycleResult, uidls: Sequence[tuple[int, str]], sizes: dict[int, int], known: Iterable[str] | None = None
) -> None:
    """After UIDL/LIST: the backlog as metrics see it. ``known``: UIDLs the ledger holds, which
    keep mode leaves on the server on purpose (then not waiting)."""
    res.listed = len(uidls)
    res.listed_bytes = sum(sizes.values())
    done = set(known) if known is not None else set()
    res.waiting = [u for _, u in uidls if u not in done]


def count_reasons(reasons: Iterable[str | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        key = r or "unknown"
        out[key] = out.get(key, 0) + 1
    return out


def policy_after_refusal(session: MailboxSession | None, exc: BaseException, res: CycleResult) -> None:
    """After a ``[LOGIN-DELAY]`` refusal (RFC 2449 §8.1.2): keep the LOGIN-DELAY the server
    announced before the login (normally already read: no I/O), so the scheduler can wait that
    long. Never raises."""
    if not isinstance(exc, Pop3LoginDelayError) or session is None or res.policy is not None:
        return
    with contextlib.suppress(ConnectorError):
        res.policy = session.server_policy()


def failure_level(exc: BaseException) -> int:
    """How loud a failed cycle is logged: [IN-USE] (RFC 2449 §8.1.1, another session holds the
    maildrop) is expected now and then and retried shortly, so INFO, not an alarm."""
    return logging.INFO if isinstance(exc, Pop3MailboxBusyError) else logging.ERROR


def policy_text(res: CycleResult) -> str:
    """`` server: EXPIRE=30 LOGIN-DELAY=900s`` for the cycle's log line, or ``""``."""
    shown = res.policy.describe() if res.policy is not None else ""
    return f" server: {shown}" if shown else ""


@dataclass
class _Pending:
    msg_num: int
    uidl: str
    delivery: Delivery
    #: the record is a dead letter (topics.dead_letter), not a mail record.
    dead: bool = False
    #: its chunk records (attachments, raw mail): all confirmed, or the mail is not deleted.
    chunks: tuple[Delivery, ...] = ()
    #: a dead letter's reason (DecodeError.reason).
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.delivery.ok and all(c.ok for c in self.chunks)


@dataclass
class CycleContext:
    """What a cycle needs besides its mailbox; shared by all cycles of a process."""

    config: Config
    publisher: Publisher
    stop: threading.Event = field(default_factory=threading.Event)
    hooks: CycleHooks = field(default_factory=CycleHooks)
    #: opens a POP3 session for a mailbox; tests substitute scripted sessions here.
    session_factory: Callable[[MailboxConfig], MailboxSession] = open_session
    #: record.framing, with registry schema ids resolved at start (connector/delivery/registry.py).
    framer: Framer = SINGLE_OBJECT


def provenance(
    mailbox: MailboxConfig, uidl: str, raw: bytes | mmap.mmap, fetched_at: int, sha256: str | None = None
) -> Provenance:
    """Where and when ``raw`` was fetched; ``sha256``: the digest computed while it was received."""
    return Provenance(
        mailbox_id=mailbox.id,
        uidl=uidl,
        server=mailbox.server,
        fetched_at_millis=fetched_at,
        raw_size=len(raw),
        raw_sha256=sha256 or hashlib.sha256(raw).hexdigest(),
    )


def encode_mail(
    mailbox: MailboxConfig,
    uidl: str,
    raw: bytes | SpoolMap,
    fetched_at: int,
    schema: Schema,
    *,
    sha256: str | None = None,
    placer: Placer | None = None,
    framer: Framer = SINGLE_OBJECT,
) -> bytes:
    """Decode one retrieved mail into its framed Avro record; DecodeError when it cannot be.
    ``sha256``: the digest computed while the mail was received, if known. ``placer``: puts
    attachment bytes (and the raw mail) inline, in chunk records or in the offload store, once
    the mail has decoded; None: metadata only (record version 2 behaviour)."""
    value, signatures = encode_mail_checked(
        mailbox, uidl, raw, fetched_at, schema, sha256=sha256, placer=placer, framer=framer
    )
    if signatures:
        metrics.signatures_checked(mailbox.id, signatures)
    return value


def encode_mail_checked(
    mailbox: MailboxConfig,
    uidl: str,
    raw: bytes | SpoolMap,
    fetched_at: int,
    schema: Schema,
    *,
    sha256: str | None = None,
    placer: Placer | None = None,
    framer: Framer = SINGLE_OBJECT,
) -> tuple[bytes, tuple[SignatureCheck, ...]]:
    """:func:`encode_mail` without touching metrics: the framed record and the S/MIME
    signature checks made on the way, for whoever counts them (a decode worker process hands
    them to its parent, connector/runtime/decode_pool.py)."""
    prov = provenance(mailbox, uidl, raw, fetched_at, sha256)
    if not mailbox.decode.mime_decoding:
        # Published as it came: the record is record_id, provenance and the raw mail. Inline,
        # it is written directly (avro.encode_passthrough): fastavro's work on the two dozen
        # empty fields was most of this mode's per-mail record cost (docs/decisions/0001).
        raw_placed = placer.raw(raw, prov.raw_sha256) if placer is not None else None
        data = bytes(raw) if raw_placed is None else raw_placed.data
        value = encode_passthrough(framer.header(schema), prov, data) if data is not None else None
        if value is not None:
            return value, ()
        # Imported here, not with this module: raw passthrough rarely decodes, and its
        # poll-once then starts ~20 ms sooner (connector/decoding/__init__.py). Decode workers
        # have it from before their fork (DecodePool); a statement per mail costs ~1 us.
        from connector.decoding.mime import decode_mail  # noqa: PLC0415

        mail = decode_mail(raw, options=mailbox.decode)
        placed = placer.attachments(mail.attachments) if placer is not None else None
        return framer.encode(schema, build_mail_record(mail, prov, placed, raw_placed)), ()
    from connector.decoding.mime import decode_mail  # noqa: PLC0415 - as above

    mail = decode_mail(raw, options=mailbox.decode)
    signatures = tuple(mail.smime.signatures) if mail.smime is not None else ()
    if placer is None:
        return framer.encode(schema, build_mail_record(mail, prov)), signatures
    placed = placer.attachments(mail.attachments)
    raw_placed = None
    if mailbox.raw_mail == "include" or mail.raw is not None:
        raw_placed = placer.raw(raw, prov.raw_sha256)
    return framer.encode(schema, build_mail_record(mail, prov, placed, raw_placed)), signatures


def record_key(config: Config, mailbox: MailboxConfig, rid: str) -> bytes:
    """Default key "mailbox": every mail of a mailbox lands in one partition, in server order,
    and its chunk records (same key) with it (docs/record.md). A dead letter has the key its
    mail record would have had."""
    return (mailbox.id if config.record.key == "mailbox" else rid).encode()


@functools.cache
def content_store(settings: OffloadSettings) -> ContentStore:
    """One store per offload settings per process (an S3 client is thread-safe and costly)."""
    return open_store(settings)


def placer_for(
    config: Config, mailbox: MailboxConfig, send: Send, framer: Framer = SINGLE_OBJECT
) -> Callable[[str], Placer]:
    """Placers for ``mailbox``'s mail, producing chunk records (framed by ``framer``) through ``send``."""
    store = content_store(config.offload) if config.offload is not None else None

    def make(rid: str) -> Placer:
        return Placer(config, mailbox, rid, record_key(config, mailbox, rid), send, store, framer)

    return make


@contextlib.contextmanager
def mapped(mail: Retrieved) -> Iterator[bytes | SpoolMap]:
    """The mail to decode: its bytes, or a read-only mapping of its spool file (decoded in
    place, pages handed back as they are read), unmapped on exit."""
    fd = mail.fileno()
    if fd is None:
        yield mail.read()
        return
    from connector.decoding.fastmime import SpoolMap  # noqa: PLC0415 - as decode_mail above

    view = SpoolMap(fd, 0, access=mmap.ACCESS_READ)
    try:
        yield view
    finally:
        view.close()


def spool_policy(config: Config) -> SpoolPolicy:
    return SpoolPolicy(config.runtime.spool_threshold_bytes, config.runtime.spool_directory)


def retrieve_encoded(
    session: MailboxSession,
    mailbox: MailboxConfig,
    chosen: list[tuple[int, str]],
    *,
    stop: threading.Event,
    res: CycleResult,
    hooks: CycleHooks,
    extra: dict[str, str],
    clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    spool: SpoolPolicy | None = None,
    placer: Callable[[str], Placer] | None = None,
    framer: Framer = SINGLE_OBJECT,
    pool: DecodePool | None = None,
    sizes: Mapping[int, int] | None = None,
) -> Generator[EncodedMail, None, None]:
    """Stream the chosen mails (pipelined RETR, spooled per ``spool``) and yield each decoded
    one as an :class:`EncodedMail` (decoded by ``pool``'s worker processes when it takes this
    mailbox's mail, else here). Stops at shutdown or max_seconds_per_cycle
    (``res.more_pending``); mail that must stay on the server is counted and skipped. Closing
    the generator drains RETRs still in flight, so the session stays in step for DELE.
    ``sizes`` (LIST, by message number): with several large mails among the chosen ones, the
    retrieval runs one mail ahead in a thread of its own (:func:`reads_ahead`)."""
    uidl_of = dict(chosen)
    deadline = time.monotonic() + mailbox.max_seconds_per_cycle
    to_fetch = [] if stop.is_set() else [n for n, _ in chosen]  # nothing is asked once shutdown began
    res.more_pending = res.more_pending or (bool(chosen) and not to_fetch)
    # Mail over max_message_bytes chosen to become a dead letter is received whole (into the
    # spool: bounded by disk, not memory), so then the in-flight limit is off for this batch.
    limit = (
        None if res.dead_letter_unread else mailbox.max_message_bytes + max(RETR_SLACK, mailbox.max_message_bytes // 16)
    )
    retrieval: Generator[tuple[int, Retrieved], None, None] | ReadAhead = session.retr_many(
        to_fetch,
        limit=limit,
        spool=spool,
        max_line=mailbox.max_line_bytes,
    )
    channels = pool.checkout() if pool is not None and pool.takes(mailbox) else []
    try:
        # Started inside the try: whatever happens from here, the finally below closes it
        # (its thread ended, the RETRs in flight drained) before the session is used again.
        if reads_ahead(to_fetch, sizes, spool):
            log.debug("large mail: receiving one mail ahead in a thread of its own", extra=extra)
            retrieval = ReadAhead(retrieval, name=f"read-ahead-{mailbox.id}")
        if not channels:
            for msg_num, mail in retrieval:
                with mail:  # releases a spool file whatever happens next
                    if stop.is_set() or time.monotonic() > deadline:
                        res.more_pending = True  # this one and the rest stay for the next cycle
                        return
                    got = encode_retrieved(
                        mailbox,
                        uidl_of[msg_num],
                        mail,
                        res=res,
                        hooks=hooks,
                        extra=extra,
                        clock_ms=clock_ms,
                        placer=placer,
                        framer=framer,
                    )
                if got is not None:
                    yield got._replace(msg_num=msg_num)
            return
        assert pool is not None
        yield from _retrieve_with_worker(
            retrieval,
            pool,
            channels,
            mailbox,
            uidl_of=uidl_of,
            deadline=deadline,
            stop=stop,
            res=res,
            hooks=hooks,
            extra=extra,
            clock_ms=clock_ms,
            placer=placer,
            framer=framer,
        )
    finally:
        retrieval.close()
        if channels:
            assert pool is not None
            pool.checkin(channels)


#: cycles with at least this many mails over the spool threshold read ahead (ReadAhead).
READ_AHEAD_LARGE_MAILS = 2


def reads_ahead(msg_nums: Sequence[int], sizes: Mapping[int, int] | None, spool: SpoolPolicy | None) -> bool:
    """Whether a cycle retrieves in a thread of its own (connector/runtime/readahead.py): when
    at least READ_AHEAD_LARGE_MAILS of its mails are over the spool threshold by their LIST
    size. Such mail is received into the spool and decoded here, in the cycle thread, so the
    next one can arrive meanwhile. Small mail is overlapped by the decode workers already, and
    a thread hand-off per mail would cost more than it saves. At most one mail is received
    ahead: one more in the spool (or, one under the threshold among them, in memory)."""
    if spool is None or sizes is None:
        return False
    large = sum(1 for n in msg_nums if sizes.get(n, 0) > spool.threshold)
    return large >= READ_AHEAD_LARGE_MAILS


def _retrieve_with_worker(
    retrieval: Iterator[tuple[int, Retrieved]],
    pool: DecodePool,
    channels: list[Channel],
    mailbox: MailboxConfig,
    *,
    uidl_of: dict[int, str],
    deadline: float,
    stop: threading.Event,
    res: CycleResult,
    hooks: CycleHooks,
    extra: dict[str, str],
    clock_ms: Callable[[], int],
    placer: Callable[[str], Placer] | None,
    framer: Framer,
) -> Generator[EncodedMail, None, None]:
    """retrieve_encoded's loop with decode workers: a mail goes to a worker as it arrives
    and the next one is read meanwhile; records are yielded in server order. When every
    worker already has WORKER_QUEUE mails waiting, this thread decodes the mail itself at
    once, so on few CPUs the cycle thread shares the decoding instead of waiting (measured:
    bench/results/timeline.md). At most AHEAD_MAILS mails / AHEAD_BYTES bytes wait to be
    yielded (memory stays bounded). Mail a worker does not take (spooled, refused, oversized
    for a dead letter) or hands back, and every mail once the workers are gone, is decoded
    here, on the same path as without workers."""
    from connector.runtime.decode_pool import WorkerGone  # noqa: PLC0415 - it imports this module

    ahead: collections.deque[_Ahead] = collections.deque()
    ahead_bytes = 0

    def encode(mail: Retrieved, msg_num: int, fetched_at: int, encoded: Encoded | None) -> EncodedMail | None:
        with mail:
            return encode_retrieved(
                mailbox,
                uidl_of[msg_num],
                mail,
                res=res,
                hooks=hooks,
                extra=extra,
                clock_ms=clock_ms,
                placer=placer,
                framer=framer,
                fetched_at=fetched_at,
                encoded=encoded,
            )

    def finish(a: _Ahead) -> EncodedMail | None:
        nonlocal ahead_bytes
        ahead_bytes -= a.size
        if a.channel is None:
            return a.done  # decoded in this thread when it arrived
        assert a.mail is not None  # kept until its worker answers
        encoded = None
        try:
            encoded = a.channel.take()
        except WorkerGone as exc:
            pool.lost(a.channel, exc)
        return encode(a.mail, a.msg_num, a.fetched_at, encoded)

    def ready(channel: Channel) -> bool:
        try:
            return channel.ready()
        except WorkerGone:
            return True  # finish() sees it, marks the worker lost and decodes here

    index = pool.index(mailbox)
    try:
        for msg_num, mail in retrieval:
            if stop.is_set() or time.monotonic() > deadline:
                mail.close()
                res.more_pending = True  # this one and the rest stay for the next cycle
                break
            fetched_at = clock_ms()
            uidl = uidl_of[msg_num]
            channel: Channel | None = None
            if (
                mail.refused is None
                and not mail.spooled
                and uidl not in res.dead_letter_unread
                and pool.worth_sending(mailbox, mail.size)
            ):
                # The least busy worker, unless all are busy enough: then this thread decodes.
                idle = [c for c in channels if not c.broken and c.waiting < WORKER_QUEUE]
                channel = min(idle, key=lambda c: c.waiting) if idle else None
            if channel is not None:
                try:
                    channel.submit(index, uidl, mail.read(), fetched_at, mail.sha256)
                except WorkerGone as exc:
                    pool.lost(channel, exc)
                    channel = None
            if channel is None:
                ahead.append(_Ahead(msg_num, None, fetched_at, None, 0, encode(mail, msg_num, fetched_at, None)))
            else:
                ahead.append(_Ahead(msg_num, mail, fetched_at, channel, mail.size))
                ahead_bytes += mail.size
            # The head goes as soon as its record is ready, or when too much waits.
            while ahead and (
                (head := ahead[0].channel) is None
                or head.broken
                or len(ahead) > AHEAD_MAILS
                or ahead_bytes > AHEAD_BYTES
                or ready(head)
            ):
                a = ahead.popleft()
                got = finish(a)
                if got is not None:
                    yield got._replace(msg_num=a.msg_num)
        # Retrieved before a stop or the end: published as the serial loop would have.
        while ahead:
            a = ahead.popleft()
            got = finish(a)
            if got is not None:
                yield got._replace(msg_num=a.msg_num)
    finally:
        for a in ahead:  # only when the consumer stopped early or something failed
            if a.mail is not None:
                a.mail.close()  # their replies are drained when the worker is checked in


#: how far retrieval may run ahead of the records handed out, with decode workers: mails and
#: bytes received but not yet yielded (each decoding in a worker or waiting its turn).
AHEAD_MAILS = 16
AHEAD_BYTES = 16 * 1024 * 1024
#: mails a worker may have waiting (one decoding, the rest queued) before the cycle thread
#: decodes the next mail itself. Deep enough that the worker still has work while the cycle
#: thread decodes one mail and reads the next: with 2, the worker ran dry meanwhile and the
#: cycle thread, which also retrieves and produces, decoded more mails than the worker did
#: (py-spy: 606 samples of decoding in the cycle thread, 503 in the worker). poll-once of
#: 2,000 x 24 KB with one worker on 2 CPUs, medians of 10: 2 -> 1.995 s, 6 -> 1.878, 8 -> 1.837,
#: 10 -> 1.871; never (the worker alone) 2.35 s.
WORKER_QUEUE = 8


class _Ahead(NamedTuple):
    msg_num: int
    #: None once decoded here (then ``done`` holds the result).
    mail: Retrieved | None
    fetched_at: int
    #: the worker decoding it; None: decoded in the cycle thread when it arrived.
    channel: Channel | None
    size: int
    done: EncodedMail | None = None


def select_for_retrieval(
    mailbox: MailboxConfig,
    candidates: list[tuple[int, str]],
    sizes: dict[int, int],
    res: CycleResult,
    extra: dict[str, str],
) -> list[tuple[int, str]]:
    """Apply the cycle's count and byte bounds (by LIST size) before any RETR is sent, so a
    pipelined retrieval never fetches more than the cycle may take. Mail over
    max_message_bytes is left on the server and counted; the first mail is always taken."""
    chosen: list[tuple[int, str]] = []
    budget = mailbox.max_bytes_per_cycle
    for msg_num, uidl in candidates:
        size = sizes[msg_num]
        if size > mailbox.max_message_bytes:
            if mailbox.oversized == "delete":
                # The operator chose to lose such mail; say so once, loudly, with its size.
                log.warning(
                    "mail of %d bytes (LIST) exceeds max_message_bytes (%d); deleted unread (oversized: delete)",
                    size,
                    mailbox.max_message_bytes,
                    extra={**extra, "uidl": uidl},
                )
                res.delete_unread.append((msg_num, uidl))
                continue
            if mailbox.oversized == "dead_letter":
                # Retrieved into the spool (no decoding) and kept whole as chunks or an object;
                # it takes its place in the cycle's bounds like any mail.
                if chosen and (len(chosen) >= mailbox.max_messages_per_cycle or size > budget):
                    res.more_pending = True
                    break
                budget -= size
                chosen.append((msg_num, uidl))
                res.dead_letter_unread.add(uidl)
                continue
            res.oversized += 1  # left on the server (oversized: skip)
            # Left there and seen again every cycle: reported once per mail at ERROR, then DEBUG.
            first = first_time(mailbox.id, f"oversized {uidl}")
            log.log(
                logging.ERROR if first else logging.DEBUG,
                "mail of %d bytes (LIST) exceeds max_message_bytes (%d); left on the server",
                size,
                mailbox.max_message_bytes,
                extra={**extra, "uidl": uidl},
            )
            continue
        if len(chosen) >= mailbox.max_messages_per_cycle or (chosen and size > budget):
            res.more_pending = True
            break
        budget -= size
        chosen.append((msg_num, uidl))
    return chosen


class Encoded(NamedTuple):
    """A mail record made by a decode worker: its Avro body (no framing header) and the
    S/MIME signature checks made on the way (counted by the parent)."""

    body: bytes
    signatures: tuple[SignatureCheck, ...] = ()


class EncodedMail(NamedTuple):
    """One retrieved mail, ready to produce: its mail record, or (``dead_letter`` set) the
    dead letter that replaces it when it could not be decoded."""

    msg_num: int
    uidl: str
    #: SHA-256 of the header section (the ledger's check for reset UIDLs).
    header_sha256: str
    sha256: str
    value: bytes
    fetched_at: int
    dead_letter: DeadLetter | None = None
    #: chunk records produced for this mail: confirmed with its record, or it is not deleted.
    chunks: tuple[Delivery, ...] = ()


def encode_retrieved(
    mailbox: MailboxConfig,
    uidl: str,
    mail: Retrieved,
    *,
    res: CycleResult,
    hooks: CycleHooks,
    extra: dict[str, str],
    clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    placer: Callable[[str], Placer] | None = None,
    framer: Framer = SINGLE_OBJECT,
    fetched_at: int | None = None,
    encoded: Encoded | None = None,
) -> EncodedMail | None:
    """The per-mail step both delivery modes share, after a (bounded) RETR: decode -> Avro.

    Returns the mail record (``value``), or, for mail that cannot be decoded in a mailbox with
    ``on_undecodable: dead_letter``, the framed dead letter (then also ``dead_letter``), with
    the chunk records placed for it (``chunks``); ``msg_num`` is left 0 for the caller. None
    when the mail has to stay on the server (over max_message_bytes or max_line_bytes,
    undecodable with ``on_undecodable: leave``), counted in ``res`` and logged with its UIDL.
    A spooled mail is decoded in place from a mapping of its spool file, never read whole.

    ``fetched_at``: when the mail was received (default: now). ``encoded``: the record a
    decode worker already made of it (connector/runtime/decode_pool.py), used instead of
    decoding here; everything else (counts, hooks, dead letters) is the same either way.
    """
    res.fetched += 1
    if mail.refused == "size":
        res.oversized += 1
        log.error(
            "mail grew past max_message_bytes (%d) during RETR; left on the server",
            mailbox.max_message_bytes,
            extra={**extra, "uidl": uidl},
        )
        return None
    with mapped(mail) as raw:
        if fetched_at is None:
            fetched_at = clock_ms()
        res.fetched_bytes += len(raw)
        faults.point("after_retr")
        log.debug("retrieved %d bytes", len(raw), extra={**extra, "uidl": uidl})
        if hooks.on_retrieved:
            hooks.on_retrieved(uidl, len(raw))
        head = header_sha256(raw)
        rid = record_id(mailbox.id, uidl)
        place = placer(rid) if placer is not None else None
        try:
            if uidl in res.dead_letter_unread:
                raise MailTooLargeError(
                    f"the mail ({len(raw)} bytes) exceeds max_message_bytes ({mailbox.max_message_bytes}); kept "
                    "whole as a dead letter (oversized: dead_letter)",
                    reason="max_message_bytes",
                )
            if mail.refused == "line":
                # A hostile-mail limit like the decoder's: the mail was read whole (the session
                # stayed in step) and is handled like any mail that cannot be decoded.
                raise MailTooLargeError(
                    f"a line of at least {mail.longest_line or 0} octets exceeds max_line_bytes "
                    f"({mailbox.max_line_bytes}); raise the limit if such mail is expected",
                    reason="max_line_bytes",
                )
            if encoded is not None:
                # Framed here: the worker framed nothing, so both framings share this path.
                value = framer.header(mail_schema()) + encoded.body
                if encoded.signatures:
                    metrics.signatures_checked(mailbox.id, encoded.signatures)
            else:
                value = encode_mail(
                    mailbox, uidl, raw, fetched_at, mail_schema(), sha256=mail.sha256, placer=place, framer=framer
                )
        except DecodeError as exc:
            # Never the body in a log line: DecodeError's message carries no mail content
            # (connector/errors.py), and stage/reason/class are codes.
            what = f"stage={exc.stage} reason={exc.reason} error={type(exc).__name__}"
            oversized = uidl in res.dead_letter_unread
            if mailbox.on_undecodable == "leave" and not oversized:
                # The mail stays on the server (nothing lost); the cycle goes on with the next one.
                if exc.reason == "max_line_bytes":
                    res.long_lines += 1
                else:
                    res.undecodable += 1
                # Tried again every cycle: reported once per mail at ERROR, then at DEBUG.
                level = logging.ERROR if first_time(mailbox.id, f"undecodable {uidl}") else logging.DEBUG
                log.log(
                    level,
                    "mail could not be decoded (%s), left on the server (on_undecodable: leave): %s",
                    what,
                    exc,
                    extra={**extra, "uidl": uidl},
                )
                return None
            # ``raw`` is the mail as RETR gave it (an S/MIME mail still encrypted), never what a
            # decoder made of it; too large for a record, it goes as chunks or an offloaded
            # object like an attachment. Its DELE waits for Kafka, like a mail record's.
            if place is not None:
                kept = place.raw(raw, mail.sha256, force_ref=oversized, dead_letter=True)
                raw_bytes, raw_ref = kept.data or b"", kept.ref
            else:
                raw_bytes, raw_ref = bytes(raw), None
            prov = provenance(mailbox, uidl, raw, fetched_at, mail.sha256)
            dead = DeadLetter.of(exc, prov, raw_bytes, clock_ms(), raw_ref=raw_ref)
            log.error(
                "mail could not be decoded (%s): %s; its original bytes go to the dead-letter topic",
                what,
                exc,
                extra={**extra, "uidl": uidl},
            )
            return EncodedMail(
                0,
                uidl,
                head,
                mail.sha256,
                dead.encode(framer),
                fetched_at,
                dead,
                tuple(place.deliveries if place else ()),
            )
        if place is not None and place.stored:
            log.debug("offloaded %d object(s)", len(place.stored), extra={**extra, "uidl": uidl})
        chunks = tuple(place.deliveries) if place is not None else ()
        return EncodedMail(0, uidl, head, mail.sha256, value, fetched_at, None, chunks)


def send_record(
    sender: Publisher,
    config: Config,
    mailbox: MailboxConfig,
    uidl: str,
    value: bytes,
    *,
    res: CycleResult,
    extra: dict[str, str],
    dead_letter: DeadLetter | None = None,
) -> Delivery | None:
    """Produce one mail record (or, with ``dead_letter``, that dead letter to the dead-letter
    topic) with its key and headers; None (counted) when Kafka refuses its size."""
    rid = record_id(mailbox.id, uidl)
    key = record_key(config, mailbox, rid)
    if dead_letter is not None:
        topic, headers = config.topics.dead_letter, dead_letter.headers()
    else:
        topic, headers = config.topics.mail, [(HEADER_RECORD_ID, rid.encode()), (HEADER_MAILBOX, mailbox.id.encode())]
    try:
        return sender.send(topic, key, value, headers)
    except RecordTooLargeError as exc:
        res.too_large += 1
        if dead_letter is not None:
            # Only with attachments.placement none: otherwise raw mail over inline_max_bytes
            # travels as chunks or an offloaded object and the dead letter stays small.
            log.error(
                "dead letter too large for Kafka, mail left on the server: %s", exc, extra={**extra, "uidl": uidl}
            )
        else:
            log.error("record too large for Kafka, mail left on the server: %s", exc, extra={**extra, "uidl": uidl})
        return None


def run_cycle(ctx: CycleContext, mailbox: MailboxConfig) -> CycleResult:
    """Run one cycle; never raises for expected failures (they are in ``result.error``).

    Two phases. Fetch: RETR, decode and produce each new mail; mail that cannot be decoded is
    produced as a dead letter instead (or left, with ``on_undecodable: leave``); a problem with
    one mail (too large for Kafka, over max_message_bytes) leaves that mail on the server and
    goes on with the next. Settle: wait for the delivery reports, DELE exactly the
    confirmed mails, QUIT. A POP3 failure (the session is then unusable) skips the settle
    phase: abort() drops pending deletes (RFC 1939 §6); what was already queued still reaches
    Kafka and is published again next cycle with the same record id (at-least-once).
    """
    from connector.runtime import decode_pool  # noqa: PLC0415 - it imports this module

    res = CycleResult(mailbox=mailbox.id, cycle_id=uuid.uuid4().hex[:12])
    t0 = time.monotonic()
    extra = {"mailbox": mailbox.id, "cycle": res.cycle_id}
    step = "connect"
    session: MailboxSession | None = None
    pending: list[_Pending] = []
    #: a Kafka-side failure after which the session is still healthy enough to settle.
    failure: ConnectorError | None = None
    grace = ctx.config.runtime.shutdown_grace_seconds
    limit = contextlib.ExitStack()
    try:
        fatal = ctx.publisher.fatal
        if fatal is not None:
            step = "produce"
            raise DeliveryFatalError(
                f"the Kafka producer is in a fatal state ({fatal}); not polling until the process is restarted"
            )
        # The fetch phase's time limit (see cycle_time_limit); settling has its own.
        limit.enter_context(time_limit(cycle_time_limit(mailbox), CYCLE_LIMIT_WHAT))
        session = ctx.session_factory(mailbox)
        note_session(session, res)
        step = "login"
        login(session, mailbox)
        after_login(session, mailbox, res, extra)
        step = "uidl"
        uidls, sizes = list_mailbox(session, mailbox)
        note_listing(res, uidls, sizes)
        chosen = select_for_retrieval(mailbox, uidls, sizes, res, extra)
        step = "retr"
        # closing(): a break must drain the RETRs in flight now, before DELE, not at some GC.
        with contextlib.closing(
            retrieve_encoded(
                session,
                mailbox,
                chosen,
                stop=ctx.stop,
                res=res,
                hooks=ctx.hooks,
                extra=extra,
                spool=spool_policy(ctx.config),
                placer=placer_for(ctx.config, mailbox, ctx.publisher.send, ctx.framer),
                framer=ctx.framer,
                pool=decode_pool.current(ctx.config),
                sizes=sizes,
            )
        ) as mails:
            while True:
                try:
                    got = next(mails)
                except StopIteration:
                    break
                except DeliveryError as exc:
                    # Placing a mail's content failed (a chunk refused, the store down): stop
                    # fetching, but settle what is already queued, like a failed produce below.
                    failure = exc
                    res.more_pending = True
                    break
                step = "produce"
                if got.chunks:
                    # Its chunk records first: a mail record is only sent once every chunk it
                    # points at is confirmed, so no record ever refers to chunks that failed
                    # (at-least-once has no transaction to take them back).
                    chunks = list(got.chunks)
                    ctx.publisher.wait(chunks, stop=ctx.stop, stop_grace=grace / 2)
                    bad = ctx.publisher.check(chunks)
                    if bad is not None:
                        failure = bad
                        res.more_pending = True
                        break
                try:
                    d = send_record(
                        ctx.publisher,
                        ctx.config,
                        mailbox,
                        got.uidl,
                        got.value,
                        res=res,
                        extra=extra,
                        dead_letter=got.dead_letter,
                    )
                except DeliveryError as exc:
                    failure = exc  # stop fetching, but settle what is already queued
                    res.more_pending = True
                    break
                if d is not None:
                    pending.append(
                        _Pending(
                            got.msg_num,
                            got.uidl,
                            d,
                            dead=got.dead_letter is not None,
                            chunks=got.chunks,
                            reason=got.dead_letter.reason if got.dead_letter is not None else None,
                        )
                    )
                step = "retr"

        limit.close()
        # Settle: the session is healthy, so delete exactly what Kafka confirmed, then QUIT.
        step = "produce"
        deliveries = [d for p in pending for d in (*p.chunks, p.delivery)]
        ctx.publisher.wait(deliveries, stop=ctx.stop, stop_grace=grace / 2)
        failure = failure or ctx.publisher.check(deliveries)
        res.published = sum(1 for p in pending if p.ok and not p.dead)
        # A confirmed dead letter counts as delivered for the DELE rule: Kafka holds the
        # original bytes, so the server copy may go (docs/delivery.md, "Dead letters").
        res.dead_lettered = sum(1 for p in pending if p.ok and p.dead)
        res.dead_letter_reasons = count_reasons(p.reason for p in pending if p.ok and p.dead)
        for p in pending:
            hook = ctx.hooks.on_dead_lettered if p.dead else ctx.hooks.on_published
            if hook and p.ok:
                hook(p.uidl)
        step = "dele"
        confirmed = [p for p in pending if p.ok]
        faults.point("after_commit")  # at-least-once: confirmed by the broker, not yet deleted
        with time_limit(settle_time_limit(mailbox), SETTLE_LIMIT_WHAT):
            session.dele_many([p.msg_num for p in confirmed] + [n for n, _ in res.delete_unread])
            faults.point("after_dele")
            step = "quit"
            session.quit()  # RFC 1939 §6: the DELEs take effect here, in the UPDATE state
        session = None
        res.deleted = len(confirmed)
        res.deleted_unread = len(res.delete_unread)
        if ctx.hooks.on_deleted:
            for p in confirmed:
                ctx.hooks.on_deleted(p.uidl)
        if failure is not None:
            step = "produce"
            raise failure
    except ConnectorError as exc:
        res.error = exc.with_context(mailbox=mailbox.id, step=step)
        log.log(failure_level(exc), "%s", res.error.describe(), extra=extra)
        policy_after_refusal(session, exc, res)
    except Exception as exc:  # a bug: keep the mail, say so loudly, let other mailboxes go on
        res.error = exc
        log.exception("internal error in step %s", step, extra=extra)
    finally:
        limit.close()
        if session is not None:
            # Failure before QUIT: drop pending deletes (RSET + QUIT); never raises.
            end_without_deletes(session, mailbox)
            if pending:
                # Records already queued still reach Kafka; their mails stay on the server and
                # will be published again next cycle with the same record id (at-least-once).
                ctx.publisher.wait([d for p in pending for d in (*p.chunks, p.delivery)], timeout=5.0)
        res.duration_s = time.monotonic() - t0
    if res.ok:
        log.info(
            "cycle done: listed=%d fetched=%d published=%d dead_lettered=%d deleted=%d left: undecodable=%d "
            "oversized=%d too_large=%d in %.2fs%s",
            res.listed,
            res.fetched,
            res.published,
            res.dead_lettered,
            res.deleted,
            res.undecodable,
            res.oversized,
            res.too_large,
            res.duration_s,
            policy_text(res),
            extra=extra,
        )
    return res
