#!/usr/bin/env python3
"""What exactly-once costs, and what group commit buys (docs/decisions/0002).

Real stack, 12 mailboxes x N mails of the ~24 KB mix, one shard, median of R runs:

  alo            at_least_once: one idempotent producer, 12 independent cycles (no transactions)
  eos-group      exactly_once: ONE shard round = one transaction for all 12 mailboxes (group commit)
  eos-serial     exactly_once: 12 rounds of one mailbox each = 12 transactions, one after another
                 (what "one open transaction per producer" would force without group commit)

    python bench/eos.py [--mails 40] [--runs 5]          # results in bench/results/eos.md
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "deploy" / "local"), str(REPO / "bench")]

from localstack import Stack  # noqa: E402
from parsers import build_mail  # noqa: E402

from connector.config import parse_config  # noqa: E402
from connector.config.model import Config  # noqa: E402
from connector.delivery.admin import ensure_topic  # noqa: E402
from connector.runtime.runner import Runner  # noqa: E402

USERS = [f"t{i}" for i in range(1, 13)]


def config(bootstrap: str, port: int, cafile: str, mode: str, tag: str) -> Config:
    return parse_config(
        {
            "kafka": {"bootstrap_servers": bootstrap},
            "topics": {"mail": f"eos-{tag}", "partitions": 4},
            "ledger": {"topic": f"eos-ledger-{tag}", "shards": 1},
            "delivery": {"mode": mode, "transactional_id_prefix": f"eos-{tag}"},
            "runtime": {"max_concurrent_sessions": 12},
            "mailboxes": [
                {
                    "id": u,
                    "host": "127.0.0.1",
                    "port": port,
                    "tls_ca_file": cafile,
                    "username": u,
                    "password": {"env": f"PW_{u.upper()}"},
                    "max_messages_per_cycle": 10_000,
                }
                for u in USERS
            ],
        }
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mails", type=int, default=40)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--label", default="", help="suffix for the results file name")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="delay per server->client chunk (a slow link)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "eos.md")
    args = ap.parse_args()
    os.environ.update({f"PW_{u.upper()}": f"{u}-pw" for u in USERS})
    d = Path(tempfile.mkdtemp(prefix="pop3k-eos-"))
    d.chmod(0o755)
    stack = Stack.at(d)
    stack.up()
    port = stack.dovecot.pop3s_port
    proxy = None
    if args.latency_ms:
        sys.path.insert(0, str(REPO / "tests"))
        from support.tcpproxy import TcpProxy

        proxy = TcpProxy(port)
        proxy.delay = args.latency_ms / 1000
        port = proxy.port
    rng = random.Random(5)
    mails = [build_mail(rng, i) for i in range(args.mails)]
    times: dict[str, list[float]] = {"alo": [], "eos-group": [], "eos-serial": []}
    try:
        for _ in range(args.runs):
            for name in list(times):
                for u in USERS:
                    stack.dovecot.clear(u)
                    for raw in mails:
                        stack.dovecot.put(u, raw)
                tag = uuid.uuid4().hex[:8]
                mode = "at_least_once" if name == "alo" else "exactly_once"
                cfg = config(stack.kafka.bootstrap, port, str(stack.dovecot.cafile), mode, tag)
                ensure_topic(
                    stack.kafka.bootstrap, {}, cfg.topics.mail, create=True, partitions=4, replication_factor=1
                )
                runner = Runner(cfg)
                try:
                    runner.prepare()  # init_transactions + ledger load are start-up costs, not per cycle
                    t0 = time.perf_counter()
                    if name == "eos-serial":
                        (worker,) = runner.workers.values()
                        with ThreadPoolExecutor(12) as pool:
                            results = [r for m in cfg.mailboxes for r in worker.round([m], pool)]
                    else:
                        results = runner.poll_once()
                    times[name].append(time.perf_counter() - t0)
                finally:
                    runner.close()
                assert all(r.ok for r in results), [r.error for r in results if not r.ok]
                assert sum(r.deleted for r in results) == len(USERS) * args.mails
    finally:
        if proxy is not None:
            proxy.close()
        for u in USERS:
            stack.dovecot.clear(u)
        stack.down()
        shutil.rmtree(d, ignore_errors=True)
    n = len(USERS) * args.mails
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        f"# Exactly-once cost and group commit: {len(USERS)} mailboxes x {args.mails} mails (~24 KB), "
        f"one shard, median of {args.runs}",
        "",
        f"`python bench/eos.py --mails {args.mails} --runs {args.runs}`, {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, real Kafka 4.4 + Dovecot over POP3S"
        + (f", through a proxy adding {args.latency_ms:g} ms per server->client chunk." if args.latency_ms else "."),
        "",
        "| mode | wall s (median) | min | max | mails/s | vs at-least-once |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, v in times.items():
        lines.append(
            f"| {k} | {med[k]:.2f} | {min(v):.2f} | {max(v):.2f} | {n / med[k]:.0f} | {med['alo'] / med[k]:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    out = args.out.with_name(args.out.stem + (f"-{args.label}" if args.label else "") + args.out.suffix)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
