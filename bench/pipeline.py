#!/usr/bin/env python3
"""Where the time of a cycle goes, and what threads buy: the numbers behind docs/decisions/0001.

On the real local stack (started here unless KAFKA_BOOTSTRAP/DOVECOT_TEST_DIR are set), with the
realistic ~24 KB mix of bench/parsers.py, all in one process so ratios are meaningful:

  retrieve   Pop3Session UIDL + RETR of every mail, nothing else (the POP3 floor)
  retrieve+dele  the same plus LIST, DELE of every mail and QUIT (the POP3 floor of delete mode)
  decode     decode_mail + Avro encode of the same bytes, in memory (the CPU floor)
  e2e-1      one poll-once cycle of one mailbox: retrieve, decode, produce, wait, DELE, QUIT
  e2e-4x1    4 mailboxes, max_concurrent_sessions=1 (sequential)
  e2e-4x4    4 mailboxes, max_concurrent_sessions=4 (one thread per mailbox)

    python bench/pipeline.py [--mails 2000] [--runs 5]     # results in bench/results/pipeline.md
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy" / "local"))
sys.path.insert(0, str(REPO / "tests"))

from localstack import DovecotServer, Stack  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from parsers import build_mail  # noqa: E402  (the ~24 KB realistic mix of the parser benchmark)

from connector.config import parse_config  # noqa: E402
from connector.decoding import decode_mail  # noqa: E402
from connector.delivery.admin import ensure_topic  # noqa: E402
from connector.protocol import Pop3Session, make_tls_context  # noqa: E402
from connector.records import Provenance, build_mail_record, encode_single_object, mail_schema  # noqa: E402
from connector.runtime.runner import Runner  # noqa: E402


def fill(dove: DovecotServer, user: str, raws: list[bytes]) -> None:
    dove.clear(user)
    for r in raws:
        dove.put(user, r)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mails", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pipeline.md")
    args = ap.parse_args()

    stack: Stack | None = None
    if os.environ.get("KAFKA_BOOTSTRAP") and os.environ.get("DOVECOT_TEST_DIR"):
        bootstrap = os.environ["KAFKA_BOOTSTRAP"]
        dove = DovecotServer(
            Path(os.environ["DOVECOT_TEST_DIR"]),
            pop3_port=int(os.environ["POP3_PORT"]),
            pop3s_port=int(os.environ["POP3S_PORT"]),
        )
    else:
        d = Path(tempfile.mkdtemp(prefix="pop3k-bench-"))
        d.chmod(0o755)
        stack = Stack.at(d)
        stack.up()
        bootstrap, dove = stack.kafka.bootstrap, stack.dovecot

    n = args.mails
    rng = random.Random(99)
    raws = [build_mail(rng, i) for i in range(n)]
    total_mb = sum(len(r) for r in raws) / 1e6
    users = ["t9", "t10", "t11", "t12"]
    os.environ.update({f"PW_{u.upper()}": f"{u}-pw" for u in users})

    def cfg(mboxes: list[str], sessions: int, topic: str):  # type: ignore[no-untyped-def]
        return parse_config(
            {
                "kafka": {"bootstrap_servers": bootstrap},
                "topics": {"mail": topic, "partitions": 4},
                "runtime": {"max_concurrent_sessions": sessions},
                "mailboxes": [
                    {
                        "id": u,
                        "host": "127.0.0.1",
                        "port": dove.pop3s_port,
                        "tls": "implicit",
                        "tls_ca_file": str(dove.cafile),
                        "username": u,
                        "password": {"env": f"PW_{u.upper()}"},
                        "max_messages_per_cycle": 100_000,
                    }
                    for u in mboxes
                ],
            }
        )

    def retrieve_only() -> None:
        s = Pop3Session.connect(
            "127.0.0.1", dove.pop3s_port, tls="implicit", ssl_context=make_tls_context(str(dove.cafile)), timeout=30
        )
        s.login_user_pass("t9", "t9-pw")
        for num, _ in s.uidl():
            s.retr(num)
        s.abort()

    def retrieve_and_delete() -> None:
        s = Pop3Session.connect(
            "127.0.0.1", dove.pop3s_port, tls="implicit", ssl_context=make_tls_context(str(dove.cafile)), timeout=30
        )
        s.login_user_pass("t9", "t9-pw")
        nums = [num for num, _ in s.uidl()]
        s.list()
        for num in nums:
            s.retr(num)
        for num in nums:
            s.dele(num)
        s.quit()

    schema = mail_schema()

    def decode_only() -> None:
        for i, r in enumerate(raws):
            prov = Provenance("b", str(i), "x:1", 0, len(r), hashlib.sha256(r).hexdigest())
            encode_single_object(schema, build_mail_record(decode_mail(r), prov))

    def e2e(mboxes: list[str], sessions: int) -> Callable[[], None]:
        def go() -> None:
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            c = cfg(mboxes, sessions, topic)
            ensure_topic(bootstrap, {}, topic, create=True, partitions=4, replication_factor=1)
            runner = Runner(c)
            try:
                results = runner.poll_once()
            finally:
                runner.close()
            assert all(r.ok for r in results), [r.error for r in results]
            assert sum(r.deleted for r in results) == n, [r.deleted for r in results]

        return go

    per = n // 4
    scenarios: dict[str, tuple[Callable[[], None], Callable[[], object]]] = {
        "retrieve": (lambda: fill(dove, "t9", raws), retrieve_only),
        "retrieve+dele": (lambda: fill(dove, "t9", raws), retrieve_and_delete),
        "decode": (lambda: None, decode_only),
        "e2e-1": (lambda: fill(dove, "t9", raws), e2e(["t9"], 1)),
        "e2e-4x1": (lambda: [fill(dove, u, raws[i * per : (i + 1) * per]) for i, u in enumerate(users)], e2e(users, 1)),
        "e2e-4x4": (lambda: [fill(dove, u, raws[i * per : (i + 1) * per]) for i, u in enumerate(users)], e2e(users, 4)),
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in scenarios}
    try:
        for run in range(args.runs):
            for name, (prepare, body) in scenarios.items():
                prepare()
                results[name].append(timed(body))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    finally:
        for u in users:
            dove.clear(u)
        if stack is not None:
            stack.down()
            shutil.rmtree(stack.dir, ignore_errors=True)

    med = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    lines = [
        f"# Pipeline breakdown: {n} mails, {total_mb:.1f} MB (the ~24 KB mix of bench/parsers.py), "
        f"POP3S, median of {args.runs}",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores with `python bench/pipeline.py "
        f"--mails {n} --runs {args.runs}`.",
        "",
        "| scenario | wall s (median) | min | max | mails/s | CPU s | ratio to e2e-1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, v in results.items():
        walls = [w for w, _ in v]
        cpu = statistics.median(c for _, c in v)
        lines.append(
            f"| {k} | {med[k]:.3f} | {min(walls):.3f} | {max(walls):.3f} | {n / med[k]:.0f} | "
            f"{cpu:.2f} | {med['e2e-1'] / med[k]:.2f}x |"
        )
    lines += ["", "CPU s is this process's CPU time (decoding, TLS, librdkafka threads); Dovecot's is not counted."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
