"""POP3 sessions of a cycle: connect (TLS contexts re-used), log in, LIST + UIDL, and end
without deletes; and the sessions poll-once opens before anything else (:func:`open_first_wave`).

Kept apart from cycle.py, and light to import (configuration, protocol, login: no Kafka, no
Avro, no metrics), so that ``pop3-kafka poll-once`` connects to its servers, logs in and lists
their maildrops while the rest of the connector is still importing (connector/cli/main.py;
docs/decisions/0001, "Third round"). The cycle of either delivery mode (cycle.py,
exactly_once.py) and the runner build on these.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import ssl
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from connector.config.model import Config, MailboxConfig
from connector.errors import DeliveryError, Pop3ProtocolError, Pop3UnsupportedError
from connector.protocol import Pop3Session, Retrieved, ServerPolicy, SpoolPolicy, make_tls_context
from connector.protocol.transport import time_limit
from connector.runtime.login import LoginSession, login

if TYPE_CHECKING:
    from connector.records.ledger import LedgerEntry

# The cycle's logger: these steps are the cycle's, and operators filter on it.
log = logging.getLogger("pop3kafka.cycle")

#: Share of delivery.transaction_timeout_seconds a round's POP3 fetch phase may take; the
#: rest is for the delivery reports, the ledger entries and the commit. Config validation
#: keeps max_seconds_per_cycle (checked between mails) under 3/4 of it.
ROUND_FETCH_SHARE = 0.8
OPEN_LIMIT_WHAT = "the time limit of a session opened before its round (0.8 x delivery.transaction_timeout_seconds)"


def waves(mailboxes: Sequence[MailboxConfig], per_server: int) -> list[list[MailboxConfig]]:
    """Split ``mailboxes`` into consecutive groups with at most ``per_server`` of each server
    (host:port) in a group, keeping their order within a server."""
    out: list[list[MailboxConfig]] = []
    seen: dict[str, int] = defaultdict(int)
    for m in mailboxes:
        k = seen[m.server] // per_server
        seen[m.server] += 1
        while len(out) <= k:
            out.append([])
        out[k].append(m)
    return out


@dataclass
class CycleResult:
    """What one cycle did; ``error`` is None when the cycle succeeded."""

    mailbox: str
    cycle_id: str
    listed: int = 0
    fetched: int = 0
    published: int = 0
    deleted: int = 0
    #: mails that could not be decoded and whose original bytes Kafka confirmed on the
    #: dead-letter topic (committed, in exactly_once mode); deleted like published mail.
    dead_lettered: int = 0
    #: mails left on the server because they could not be decoded (mailbox on_undecodable: leave).
    undecodable: int = 0
    #: mails over max_message_bytes left on the server (oversized: skip); with oversized:
    #: dead_letter / delete they are counted in ``dead_lettered`` / ``deleted_unread`` instead.
    oversized: int = 0
    #: mails deleted without being read (oversized: delete).
    deleted_unread: int = 0
    #: (msg_num, uidl) of mail over max_message_bytes to delete unread (oversized: delete).
    delete_unread: list[tuple[int, str]] = field(default_factory=list)
    #: UIDLs of mail over max_message_bytes retrieved only to become dead letters.
    dead_letter_unread: set[str] = field(default_factory=set)
    #: mails left on the server because a line exceeds max_line_bytes.
    long_lines: int = 0
    #: mails left on the server because Kafka refuses a record that large (message.max.bytes).
    too_large: int = 0
    #: the cycle stopped at a count/byte bound or on shutdown with mail still waiting.
    more_pending: bool = False
    #: octets listed (LIST sizes) and retrieved (RETR) by the cycle.
    listed_bytes: int = 0
    fetched_bytes: int = 0
    #: UIDLs listed that the connector has not finished with (delete mode: every one listed;
    #: keep mode: those not in the ledger yet): the backlog whose oldest age is a metric.
    waiting: list[str] = field(default_factory=list)
    #: dead letters Kafka confirmed (committed), by the reason of their DecodeError.
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    #: Unix time at which the server's TLS certificate expires (None: no TLS or not known).
    tls_not_after: float | None = None
    error: BaseException | None = None
    duration_s: float = 0.0
    #: the login succeeded (RFC 2449 §6.8 LOGIN-DELAY counts from a successful login).
    logged_in: bool = False
    #: the server's EXPIRE / LOGIN-DELAY (RFC 2449 §6.7, §6.8): the user's values, read after the
    #: login; after a [LOGIN-DELAY] refusal, the values the server announced before it. None:
    #: not known (the cycle failed before that).
    policy: ServerPolicy | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def expire_days(self) -> int | None:
        """The server's EXPIRE in days (None: NEVER, not advertised, or not known)."""
        return self.policy.expire_days if self.policy is not None else None

    @property
    def login_delay_seconds(self) -> int | None:
        """The server's LOGIN-DELAY in seconds (None: not advertised or not known)."""
        return self.policy.login_delay_seconds if self.policy is not None else None


class MailboxSession(LoginSession, Protocol):
    """What a cycle needs from a POP3 session (connection already made, greeting read)."""

    def login_user_pass(self, username: str, password: str) -> None: ...
    def uidl(self) -> list[tuple[int, str]]: ...
    def list(self) -> list[tuple[int, int]]: ...
    def retr_many(
        self,
        msg_nums: Sequence[int],
        *,
        limit: int | None = None,
        spool: SpoolPolicy | None = None,
        max_line: int | None = None,
    ) -> Generator[tuple[int, Retrieved], None, None]: ...
    def dele_many(self, msg_nums: Sequence[int]) -> None: ...
    def top(self, msg_num: int, lines: int = 0) -> bytes: ...
    def server_policy(self) -> ServerPolicy: ...
    def dele(self, msg_num: int) -> None: ...
    def quit(self) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


#: A TLS context is re-used by a mailbox's sessions: building one costs ~24 ms of CPU with the
#: system trust store (0.5 ms with a small tls_ca_file; bench/tls_context.py), three times an
#: empty cycle. It is rebuilt when anything it was built from changes (a setting on reload;
#: the CA bundle, client certificate or key file; the key password) and at least this often,
#: so that a system trust store updated in place is picked up without a restart.
TLS_CONTEXT_MAX_AGE_S = 3600.0
_tls_contexts: dict[str, tuple[tuple[object, ...], float, ssl.SSLContext]] = {}
_tls_lock = threading.Lock()


def file_stamp(path: str | None) -> tuple[int, int, int]:
    """What tells a changed file: inode (a Secret or ConfigMap swaps a symlink; stat follows
    it), mtime, size; (0, 0, 0) for no path or a missing file (whoever reads it reports that)."""
    if path is None:
        return (0, 0, 0)
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def tls_context(mailbox: MailboxConfig) -> ssl.SSLContext:
    """The mailbox's TLS context, built once and re-used while nothing it depends on changed."""
    password = mailbox.tls_client_key_password
    secret = password.reveal() if password is not None else None
    key = (
        mailbox.tls_ca_file,
        file_stamp(mailbox.tls_ca_file),
        mailbox.tls_verify,
        mailbox.tls_min_version,
        mailbox.tls_server_name,
        mailbox.tls_fingerprint_sha256,
        mailbox.tls_client_cert,
        file_stamp(mailbox.tls_client_cert),
        mailbox.tls_client_key,
        file_stamp(mailbox.tls_client_key),
        # a digest, so the cache key never holds the password itself
        None if secret is None else hashlib.sha256(secret.encode()).digest(),
        mailbox.tls_legacy,
    )
    now = time.monotonic()
    with _tls_lock:
        hit = _tls_contexts.get(mailbox.id)
        if hit is not None and hit[0] == key and now - hit[1] < TLS_CONTEXT_MAX_AGE_S:
            return hit[2]
    ctx = make_tls_context(
        mailbox.tls_ca_file,
        verify=mailbox.tls_verify,
        min_version=mailbox.tls_min_version,
        server_name=mailbox.tls_server_name,
        fingerprint_sha256=mailbox.tls_fingerprint_sha256,
        client_cert=mailbox.tls_client_cert,
        client_key=mailbox.tls_client_key,
        client_key_password=secret,
        legacy=mailbox.tls_legacy,
        mailbox=mailbox.id,
    )
    with _tls_lock:
        _tls_contexts[mailbox.id] = (key, now, ctx)
    return ctx


def open_session(mailbox: MailboxConfig) -> MailboxSession:
    """Connect (implicit TLS, STLS or plain, as configured) and read the greeting.

    The TLS context comes from :func:`tls_context`: re-used across sessions, rebuilt when a
    rotated CA bundle, client certificate, key or key password file shows up (a tls_legacy
    mailbox logs its WARNING at each build: at its first session, after a change, hourly).
    """
    ssl_ctx = tls_context(mailbox) if mailbox.tls != "none" else None
    return Pop3Session.connect(
        mailbox.host,
        mailbox.port,
        tls=mailbox.tls,
        ssl_context=ssl_ctx,
        timeout=mailbox.timeout_seconds,
        allow_plaintext_auth=mailbox.allow_plaintext_auth,
    )


def list_identities(session: MailboxSession, mailbox: MailboxConfig, sizes: dict[int, int]) -> list[tuple[int, str]]:
    """(msg_num, identity) for every message: the UIDL, or the opt-in header fallback.

    Fallback (``identity: headers``) for servers without UIDL (RFC 1939 §7 makes it optional)
    or with duplicate UIDLs: ``h<sha256 of TOP n 0, 24 hex>-<LIST size>``, and ``.<k>`` for the
    k-th repeat of the same value in one listing. Limits (docs/delivery.md): a TOP per message
    and cycle; mail whose headers and size are identical is told apart only by its position;
    a server that rewrites headers between sessions makes old mail look new.
    """
    if mailbox.identity == "uidl":
        return session.uidl()
    seen: dict[str, int] = {}
    out: list[tuple[int, str]] = []
    for msg_num in sorted(sizes):
        base = f"h{hashlib.sha256(session.top(msg_num, 0)).hexdigest()[:24]}-{sizes[msg_num]}"
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.append((msg_num, base if k == 0 else f"{base}.{k}"))
    return out


def end_without_deletes(session: MailboxSession, mailbox: MailboxConfig) -> None:
    """End a session so that nothing is deleted, the way this provider needs (never raises).

    RFC 1939 §6: RSET unmarks, and QUIT then applies nothing (``rset_quit``, the default,
    which also frees the maildrop lock at once). Some providers treat a clean QUIT itself as
    "downloaded" (Gmail marks RETRieved mail as popped), so ``disconnect`` just closes the
    connection: a session that ends without QUIT never enters the UPDATE state.
    """
    if mailbox.abort_with == "disconnect":
        session.close()
    else:
        session.abort()


# Policy warnings are logged once per process, mailbox and text: every cycle would repeat them.
_said: set[tuple[str, str]] = set()
_said_lock = threading.Lock()


def first_time(mailbox_id: str, text: str) -> bool:
    with _said_lock:
        if (mailbox_id, text) in _said:
            return False
        _said.add((mailbox_id, text))
        return True


def expire_conflict(mailbox: MailboxConfig, policy: ServerPolicy) -> str | None:
    """Why the server's EXPIRE (RFC 2449 §6.7) undoes keep mode for ``mailbox``, or None.

    EXPIRE is the minimum number of days the server keeps mail after it was retrieved; after
    that the server may delete it on its own, and ``EXPIRE 0`` means it deletes retrieved mail
    at once. Delete mode does not care; keep mode (``delete: false``) wants the mail kept until
    ``delete_after_days`` (forever when unset).
    """
    days = policy.expire_days
    if mailbox.delete or days is None:
        return None
    either_way = "The mail is in Kafka either way"
    if days == 0:
        return (
            "the server advertises EXPIRE 0: it deletes mail once it has been retrieved (RFC 2449 §6.7), so keep "
            f"mode (delete: false) cannot keep it on the server. {either_way}; ask the server's operator to change "
            "EXPIRE, or use delete: true"
        )
    keep = mailbox.delete_after_days
    if keep is not None and days >= keep:
        return None
    wanted = "forever (no delete_after_days)" if keep is None else f"for delete_after_days={keep:g}"
    return (
        f"the server advertises EXPIRE {days}: it may delete retrieved mail after {days} day(s) (RFC 2449 §6.7), "
        f"while keep mode (delete: false) means to keep it {wanted}. {either_way}; set delete_after_days to at "
        f"most {days}, or ask the server's operator to change EXPIRE"
    )


def after_login(session: MailboxSession, mailbox: MailboxConfig, res: CycleResult, extra: dict[str, str]) -> None:
    """Right after a successful login: note it and the user's EXPIRE / LOGIN-DELAY in ``res``
    (RFC 2449 §5: read after login, where per-user values are announced), and say once per
    process when that policy defeats keep mode or CAPA had to be read leniently."""
    res.logged_in = True
    policy = session.server_policy()
    res.policy = policy
    if policy.notes and first_time(mailbox.id, "|".join(policy.notes)):
        log.info("server CAPA: %s", "; ".join(policy.notes), extra=extra)
    conflict = expire_conflict(mailbox, policy)
    if conflict is not None and first_time(mailbox.id, conflict):
        log.warning("%s", conflict, extra=extra)


def note_session(session: MailboxSession, res: CycleResult) -> None:
    """Right after connecting: the server certificate's expiry, for the metric (sessions that
    are not TLS, and scripted test sessions, have none)."""
    res.tls_not_after = getattr(session, "certificate_not_after", None)


def list_mailbox(session: MailboxSession, mailbox: MailboxConfig) -> tuple[list[tuple[int, str]], dict[int, int]]:
    """LIST + UIDL (or the header identity), with the checks both delivery modes need."""
    sizes = dict(session.list())
    uidls = list_identities(session, mailbox, sizes)
    seen: set[str] = set()
    for msg_num, uidl in uidls:
        if uidl in seen:
            raise Pop3UnsupportedError(
                f"the server reports UIDL {uidl!r} for two messages; UIDLs must be unique (RFC 1939 §7) for "
                "de-duplication. Ask the server's operator, or opt into identity: headers (docs/delivery.md)"
            )
        if msg_num not in sizes:
            raise Pop3ProtocolError(
                f"UIDL lists message {msg_num} but LIST does not; the maildrop changed during the session or the "
                "server is broken"
            )
        seen.add(uidl)
    return uidls, sizes


@dataclass
class Prepared:
    """A mailbox session after its fetch phase, waiting for the shard's commit."""

    mailbox: MailboxConfig
    result: CycleResult
    session: MailboxSession | None = None
    #: (msg_num, uidl) to DELE once the transaction has committed.
    to_delete: list[tuple[int, str]] = field(default_factory=list)
    #: ledger entries written into the open transaction.
    entries: list[LedgerEntry] = field(default_factory=list)
    #: entries removed from the ledger in this transaction (tombstones written).
    forgotten: list[str] = field(default_factory=list)
    kafka_error: DeliveryError | None = None
    t0: float = 0.0
    #: time.monotonic() by which its POP3 fetch phase must end (the round's time limit).
    fetch_until: float = float("inf")
    #: the reasons of the dead letters among its ledger entries.
    dead_reasons: list[str | None] = field(default_factory=list)
    #: where the fetch phase is (connect, login, uidl, retr, produce): an error's context.
    step: str = "connect"
    #: LIST sizes and (msg_num, UIDL) pairs, once the session has listed the maildrop.
    listing: tuple[list[tuple[int, str]], dict[int, int]] | None = None
    #: open_listed() running in another thread since before the round (Runner.open_early):
    #: the fetch phase waits for it instead of opening a session of its own.
    early: Future[None] | None = None


def open_listed(p: Prepared, session_factory: Callable[[MailboxConfig], MailboxSession], extra: dict[str, str]) -> None:
    """Connect, log in, LIST + UIDL: fills ``p.session``, ``p.listing`` and ``p.result``'s
    login facts, and keeps ``p.step`` on the step in progress; raises what that step raised
    (the session, if one was opened, stays in ``p.session`` for the caller to end)."""
    m, res = p.mailbox, p.result
    p.step = "connect"
    session = session_factory(m)
    p.session = session
    note_session(session, res)
    p.step = "login"
    login(session, m)
    after_login(session, m, res, extra)
    p.step = "uidl"
    p.listing = list_mailbox(session, m)


def open_early(p: Prepared, session_factory: Callable[[MailboxConfig], MailboxSession], config: Config) -> None:
    """open_listed() before the round exists (poll-once opens the sessions while the shards
    start), within a time limit of its own: the round's has not begun."""
    extra = {"mailbox": p.mailbox.id, "cycle": p.result.cycle_id}
    with time_limit(ROUND_FETCH_SHARE * config.delivery.transaction_timeout_seconds, OPEN_LIMIT_WHAT):
        open_listed(p, session_factory, extra)


def end_unused(p: Prepared) -> None:
    """End ``p``'s session, if it has one, without deletes (RFC 1939 §6); first wait for its
    early open, if it has one (what that raised no longer matters: the session is dropped)."""
    if p.early is not None:
        with contextlib.suppress(BaseException):
            p.early.result()
    if p.session is not None:
        end_without_deletes(p.session, p.mailbox)
        p.session = None


def open_first_wave(
    config: Config,
    mailboxes: Sequence[MailboxConfig],
    session_factory: Callable[[MailboxConfig], MailboxSession] | None = None,
) -> dict[str, Prepared]:
    """exactly_once poll-once: connect, log in and LIST + UIDL the first wave's mailboxes now,
    each in a thread of its own, so that this runs beside the rest of the start (imports,
    topic checks, init_transactions, the ledger load) instead of after it. Nothing is fetched
    before the round's transaction begins: the round takes the sessions over
    (ShardWorker.round's ``early``), and Runner.close() ends those no round took, without
    deletes. On 2,000 new mails the first command that needs the maildrop's state took
    Dovecot 0.11 s to answer (bench/results/timeline.md). Only when the whole first wave fits
    runtime.max_concurrent_sessions: a session waiting for its round must not make one more
    than that limit allows. Returns the sessions by mailbox id (empty: none opened).
    ``session_factory``: default open_session."""
    if config.delivery.mode != "exactly_once":
        return {}
    first = waves(list(mailboxes), config.runtime.max_sessions_per_server)[:1]
    if not first or len(first[0]) > config.runtime.max_concurrent_sessions:
        return {}
    cycle_id = uuid.uuid4().hex[:12]
    pool = ThreadPoolExecutor(max_workers=len(first[0]), thread_name_prefix="open")
    early: dict[str, Prepared] = {}
    for m in first[0]:
        p = Prepared(m, CycleResult(mailbox=m.id, cycle_id=cycle_id), t0=time.monotonic())
        p.early = pool.submit(open_early, p, session_factory or open_session, config)
        early[m.id] = p
    pool.shutdown(wait=False)  # its threads end with their job
    return early
