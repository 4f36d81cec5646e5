#!/usr/bin/env python3
"""Benchmark: CPU of the scheduling loop of `run` with thousands of mailboxes.

The loop of connector/runtime/runner.py with scripted empty POP3 sessions (login, UIDL of
nothing, QUIT: no network), exactly_once with librdkafka's mock cluster, N mailboxes on 20 s intervals, for
SECONDS after the first polls are spread out. Reports process CPU per second (loop + cycles)
and the schedule lag p50/p99, for the loop as it is and for a baseline in the same process
that recomputes the mailbox -> unit grouping (a SHA-256 per mailbox) on every turn, as the
loop did before it was cached. Writes bench/results/scheduler_loop.md.

    python bench/scheduler_loop.py [--mailboxes 500 5000] [--seconds 40] [--interval 20]
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from connector.config import parse_config
from connector.delivery.kafka import Publisher
from connector.delivery.transactional import ShardProducer
from connector.protocol import ServerPolicy
from connector.records import ledger
from connector.records.ledger import ShardLedger
from connector.runtime import runner as runner_mod
from connector.runtime.exactly_once import ShardWorker
from connector.runtime.runner import LinkedEvent, Runner

RESULTS = Path(__file__).resolve().parent / "results" / "scheduler_loop.md"
MOCK = {"test.mock.num.brokers": 1}
SHARDS = 8


class EmptySession:
    """A mailbox with no mail: what most cycles of a large deployment find."""

    def capabilities(self, *, refresh: bool = False) -> dict[str, list[str]]:
        return {"UIDL": [], "USER": []}

    def server_policy(self) -> ServerPolicy:
        return ServerPolicy()

    def login_user_pass(self, username: str, password: str) -> None:
        pass

    def uidl(self) -> list[tuple[int, str]]:
        return []

    def list(self) -> list[tuple[int, int]]:
        return []

    def retr_many(self, msg_nums: Sequence[int], **_: Any) -> Generator[tuple[int, Any], None, None]:
        yield from ()

    def dele_many(self, msg_nums: Sequence[int]) -> None:
        pass

    def quit(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(n: int, seconds: float, interval: float, *, baseline: bool) -> tuple[float, float, float, int]:
    boxes = [
        {
            "id": f"box-{i}",
            "host": f"pop{i % 20}.example.test",
            "username": "u",
            "password": {"env": "PW"},
            "poll_interval_seconds": interval,
        }
        for i in range(n)
    ]
    config = parse_config(
        {
            "kafka": {"bootstrap_servers": "mock:9092"},
            "topics": {"mail": "mail"},
            "ledger": {"topic": "ledger", "shards": SHARDS},
            "runtime": {"max_concurrent_sessions": 32, "max_sessions_per_server": 8},
            "mailboxes": boxes,
        },
        environ={"PW": "x"},
    )
    runner = Runner(config, session_factory=lambda m: EmptySession())  # type: ignore[arg-type, return-value]
    runner.publisher = Publisher("mock:9092", MOCK, 5)
    runner.ctx.publisher = runner.publisher
    # exactly_once as in production, each shard's transactional producer on the mock cluster
    # (prepare() would ask the mock for the ledger topic's configs, which it does not serve).
    runner.shards = SHARDS
    for shard in range(SHARDS):
        producer = ShardProducer("mock:9092", MOCK, 5, prefix="bench", shard=shard, transaction_timeout_s=60)
        producer.init()
        runner.workers[shard] = ShardWorker(
            config,
            shard,
            producer,
            ShardLedger(shard),
            stop=LinkedEvent(runner.stop),
            session_factory=runner.session_factory,
        )
    runner.prepare = lambda *a, **k: None  # type: ignore[method-assign]
    if baseline:
        real_units = Runner._units
        uncached = ledger.shard_of.__wrapped__

        def units_every_turn(self: Runner) -> dict[object, list[Any]]:
            self._plan_for = None  # recompute on every call, as before
            return real_units(self)

        runner._units = units_every_turn.__get__(runner)  # type: ignore[method-assign]
        runner_mod.shard_of = uncached  # type: ignore[assignment]
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        time.sleep(12)  # first polls are spread over 10 s; measure the steady state after
        runner.lags.clear()
        c0, t0 = cpu(), time.monotonic()
        time.sleep(seconds)
        used = (cpu() - c0) / (time.monotonic() - t0)
        lags = sorted(runner.lags)
        cycles = len(lags)
    finally:
        runner.stop.set()
        runner._wake.set()
        thread.join(60)
        runner.close()
        runner_mod.shard_of = ledger.shard_of
    p50 = statistics.median(lags) if lags else float("nan")
    p99 = lags[int(0.99 * (len(lags) - 1))] if lags else float("nan")
    return used, p50, p99, cycles


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mailboxes", type=int, nargs="+", default=[500, 5000])
    ap.add_argument("--seconds", type=float, default=40)
    ap.add_argument("--interval", type=float, default=20, help="poll_interval_seconds of every mailbox")
    args = ap.parse_args()
    rows = []
    for n in args.mailboxes:
        for baseline in (True, False):
            used, p50, p99, cycles = measure(n, args.seconds, args.interval, baseline=baseline)
            label = "baseline: grouping per turn" if baseline else "now: grouping cached"
            rows.append((n, label, used, p50, p99, cycles))
            print(rows[-1], flush=True)
    lines = [
        "# Scheduling loop CPU with many mailboxes",
        "",
        f"`python bench/scheduler_loop.py --mailboxes {' '.join(map(str, args.mailboxes))} --seconds {args.seconds:g} "
        f"--interval {args.interval:g}`:",
        f"empty scripted sessions (no network), librdkafka mock cluster, exactly_once ({SHARDS} shards), "
        f"{args.interval:g} s intervals,",
        f"measured for {args.seconds:g} s after the first polls; {platform.python_implementation()} "
        f"{platform.python_version()}. CPU is the whole process (loop and cycles), in % of one core.",
        "",
        "| mailboxes | loop | CPU | cycles measured | schedule lag p50 | p99 |",
        "|---|---|---|---|---|---|",
    ]
    for n, label, used, p50, p99, cycles in rows:
        lines.append(f"| {n} | {label} | {used * 100:.1f} % | {cycles} | {p50:.3f} s | {p99:.3f} s |")
    lines.append("")
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
