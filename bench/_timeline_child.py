#!/usr/bin/env python3
"""Child of bench/timeline.py: one ``pop3-kafka poll-once`` with its phases timed.

Wraps the functions that make up a poll-once (the imports, the topic check, the shard's start,
the POP3 login and listing, the retrieval loop, the ledger entries, the commit, DELE + QUIT,
the close) with timers, runs ``connector.cli.main.main`` as the console script would and
prints one JSON line (after MARKER) with every phase's start and duration, seconds since the
interpreter started. Nothing in connector/ is changed: the wrappers only measure.

    python bench/_timeline_child.py CONFIG
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # first thing: the interpreter is up (its own start is not seen here)

import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Any  # noqa: E402

from _rss_child import AfterImport  # noqa: E402 - bench/ is the script's directory

MARKER = "TIMELINE "
events: list[dict[str, Any]] = []
lock = threading.Lock()


def now() -> float:
    return time.perf_counter() - T0


def record(label: str, start: float, **more: float) -> None:
    with lock:
        events.append({"phase": label, "start": round(start, 4), "seconds": round(now() - start, 4), **more})


def timed(owner: Any, name: str, label: str) -> None:
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = now()
        try:
            return inner(*args, **kwargs)
        finally:
            record(label, start)

    setattr(owner, name, wrapper)


def timed_generator(owner: Any, name: str, label: str) -> None:
    """A generator's whole life, its consumer's work between items included, with the CPU
    time of the thread that iterates it and of the whole process (librdkafka's threads, the
    decode workers' pipes) over the same span."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start, thread0, process0 = now(), time.thread_time(), time.process_time()
        try:
            yield from inner(*args, **kwargs)
        finally:
            thread_cpu, process_cpu = time.thread_time() - thread0, time.process_time() - process0
            record(label, start, thread_cpu=round(thread_cpu, 4), process_cpu=round(process_cpu, 4))

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> int:
    import connector.cli.main as cli
    from connector.runtime import sessions

    t_cli = now()
    events.append({"phase": "imports: CLI, configuration, POP3 sessions", "start": 0.0, "seconds": round(t_cli, 4)})
    timed(cli, "_ensure_topics", "topic check (metadata)")
    timed(sessions, "open_session", "POP3 connect + TLS + greeting")
    timed(sessions, "login", "POP3 login")
    timed(sessions, "list_mailbox", "LIST + UIDL")

    def runtime_imported(decode_pool: Any, started: float) -> None:
        # decode_pool imports the rest of the connector (Kafka, Avro, metrics, the cycle), and
        # _poll_once the runner right after the fork: imported here with it, to be wrapped.
        from connector.delivery import transactional
        from connector.runtime import exactly_once, runner

        record("imports: Kafka, Avro, metrics, runtime", started - T0)

        timed(decode_pool, "start", "decode workers forked")
        timed(runner, "ensure_ledger_topic", "ledger topic check")
        timed(transactional.ShardProducer, "init", "init_transactions (incl. first connection)")
        timed(runner, "load_shard_ledger", "ledger load")
        timed_generator(exactly_once, "retrieve_encoded", "retrieve + decode + produce (the per-mail loop)")
        timed(exactly_once.ShardWorker, "_write_entries", "delivery reports + ledger entries")
        timed(transactional.ShardProducer, "commit", "commit_transaction")
        timed(exactly_once.ShardWorker, "_settle", "DELE + QUIT")
        timed(runner.Runner, "close", "close (tombstones, producers)")

    # The CLI imports the Kafka side of the connector (with decode_pool) only once the first
    # POP3 sessions are opening: wrapping it beforehand would import it earlier.
    sys.meta_path.insert(0, AfterImport("connector.runtime.decode_pool", runtime_imported))
    code = cli.main(["poll-once", "--config", argv[0]])
    end = now()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {
        "exit": code,
        "end": round(end, 4),
        "events": events,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "worker_cpu_s": round(children.ru_utime + children.ru_stime, 3),
    }
    sys.stdout.flush()
    print(MARKER + json.dumps(out), flush=True)
    # The process ends as the console script's does (connector.cli.main.entry_point).
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0 if code == 0 else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
