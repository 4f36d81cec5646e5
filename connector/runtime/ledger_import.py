"""Cut-over: write another tool's "already fetched" UIDLs into the ledger as baseline entries.

Only UIDLs that are on the server now are recorded (the rest name mail that is gone, and
getmail's '/'->'-' rewriting can only be undone against the server's own list). The entries
go in one transaction of the mailbox's shard, after init_transactions() fenced any running
owner, so the import never races a live connector's writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from connector.config.model import Config, MailboxConfig
from connector.cutover.importers import SeenUidl
from connector.records.framing import SINGLE_OBJECT
from connector.records.ledger import LedgerEntry, shard_of
from connector.runtime.login import login
from connector.runtime.runner import Runner
from connector.runtime.sessions import end_without_deletes, open_session


@dataclass(frozen=True)
class ImportReport:
    recorded: int
    already_known: int
    not_on_server: int


def import_baseline(
    config: Config,
    mailbox: MailboxConfig,
    seen: Sequence[SeenUidl],
    *,
    uidl_form: Callable[[str], str] | None = None,
) -> ImportReport:
    # Only ledger entries are written (always single-object): no schema ids needed, so an
    # import works before the registry's subjects are filled.
    runner = Runner(config, framer=SINGLE_OBJECT)
    try:
        runner.prepare([mailbox])
        worker = runner.workers[shard_of(mailbox.id, runner.shards)]
        session = open_session(mailbox)
        try:
            login(session, mailbox)
            on_server = {(uidl_form(u) if uidl_form else u): (u, n) for n, u in session.uidl()}
            sizes = dict(session.list())
        finally:
            end_without_deletes(session, mailbox)
        known = worker.ledger.known(mailbox.id)
        now = time.time_ns() // 1_000_000
        entries: list[LedgerEntry] = []
        already = missing = 0
        for s in seen:
            hit = on_server.get(s.uidl)
            if hit is None:
                missing += 1
                continue
            uidl, msg_num = hit
            if uidl in known:
                already += 1
                continue
            entries.append(
                LedgerEntry(
                    mailbox.id,
                    uidl,
                    "baseline",
                    now,
                    list_size=sizes.get(msg_num),
                    first_seen_at=s.seen_at_millis or now,
                )
            )
        producer = worker.producer
        producer.begin()
        for e in entries:
            producer.send_in_transaction(config.ledger.topic, e.key, e.encode(), partition=worker.shard)
        producer.commit()
        for e in entries:
            worker.ledger.record(e)
        return ImportReport(recorded=len(entries), already_known=already, not_on_server=missing)
    finally:
        runner.close()
