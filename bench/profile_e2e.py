#!/usr/bin/env python3
"""Where one exactly-once poll-once spends its time: a py-spy profile of every thread.

Seeds N mails of the ~24 KB mix (bench/parsers.py) into a Dovecot user of the local stack
(started here unless KAFKA_BOOTSTRAP and DOVECOT_TEST_DIR point at one), then runs
``pop3-kafka poll-once`` in a child under ``py-spy record`` (all threads and the decode worker
processes, native frames off) and
writes the hottest functions, by own and by total samples, to bench/results/profile_e2e_<mode>.txt.

    python bench/profile_e2e.py [--mails 2000] [--mode raw|decode] [--delivery exactly_once|at_least_once]

py-spy is a sampling profiler (it reads the child's memory; nothing is added to its code), and
waiting threads are not sampled: the figures are shares of the busy samples, not exact times.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy" / "local"))
sys.path.insert(0, str(REPO / "bench"))

from localstack import DovecotServer, Stack  # noqa: E402
from parsers import build_mail  # noqa: E402

USER = "t20"


def stack_env() -> tuple[str, DovecotServer, Stack | None]:
    if os.environ.get("KAFKA_BOOTSTRAP") and os.environ.get("DOVECOT_TEST_DIR"):
        dove = DovecotServer(
            Path(os.environ["DOVECOT_TEST_DIR"]),
            pop3_port=int(os.environ["POP3_PORT"]),
            pop3s_port=int(os.environ["POP3S_PORT"]),
        )
        return os.environ["KAFKA_BOOTSTRAP"], dove, None
    d = Path(tempfile.mkdtemp(prefix="pop3k-prof-"))
    d.chmod(0o755)  # Dovecot's unprivileged processes traverse it
    stack = Stack.at(d)
    stack.up()
    return stack.kafka.bootstrap, stack.dovecot, stack


def config(bootstrap: str, dove: DovecotServer, mode: str, delivery: str, d: Path) -> Path:
    topic = f"prof-{mode}-{int(time.time())}"
    doc = {
        "kafka": {"bootstrap_servers": bootstrap, "delivery_timeout_seconds": 120},
        "topics": {"mail": topic, "partitions": 3, "dead_letter": f"{topic}.dlq", "attachments": f"{topic}.att"},
        "ledger": {"topic": f"{topic}.ledger"},
        "delivery": {"mode": delivery, "transactional_id_prefix": topic, "transaction_timeout_seconds": 600},
        "mailboxes": [
            {
                "id": USER,
                "host": "127.0.0.1",
                "port": dove.pop3s_port,
                "tls": "implicit",
                "tls_ca_file": str(dove.cafile),
                "username": USER,
                "password": {"env": "PROF_PW"},
                "mime_decoding": mode == "decode",
                "max_messages_per_cycle": 100_000,
                "max_bytes_per_cycle": 4 << 30,
                "max_seconds_per_cycle": 300,
                "timeout_seconds": 120,
            }
        ],
    }
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def summarise(raw_file: Path, out: Path, header: str) -> None:
    """py-spy's raw format: one line per distinct stack, frames ';'-joined, then a count."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = in_round = 0
    round_own: collections.Counter[str] = collections.Counter()
    for line in raw_file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
        if any(
            f.startswith(("ShardWorker._fetch", "ShardWorker._settle", "ShardWorker._round", "run_cycle"))
            for f in frames
        ):
            in_round += n
            round_own[frames[-1]] += n
    lines = [header, f"samples: {samples}", "", "own samples (where the time is spent):"]
    lines += [f"{n / samples:6.1%}  {f}" for f, n in own.most_common(40)]
    lines += ["", "total samples (the function or anything it called):"]
    lines += [f"{n / samples:6.1%}  {f}" for f, n in total.most_common(60)]
    in_workers = sum(n for f, n in total.items() if f.startswith("_serve (connector/runtime/decode_pool.py"))
    lines += ["", f"in the decode worker processes (stacks through decode_pool._serve): {in_workers} samples"]
    lines += [
        "",
        f"inside the round's work (stacks through ShardWorker._fetch/_settle/_round or run_cycle): {in_round} samples",
    ]
    lines += [f"{n / max(1, in_round):6.1%}  {f}" for f, n in round_own.most_common(40)]
    out.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mails", type=int, default=2000)
    ap.add_argument("--mode", choices=("raw", "decode"), default="decode")
    ap.add_argument("--delivery", choices=("exactly_once", "at_least_once"), default="exactly_once")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    bootstrap, dove, stack = stack_env()
    try:
        rng = random.Random(10)
        dove.clear(USER)
        for i in range(args.mails):
            dove.put(USER, build_mail(rng, i))
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            cfg = config(bootstrap, dove, args.mode, args.delivery, d)
            raw = d / "profile.txt"
            env = {**os.environ, "PROF_PW": f"{USER}-pw"}
            cmd = [
                str(REPO / ".venv" / "bin" / "py-spy"), "record", "--rate", "250", "--format", "raw",
                "--output", str(raw), "--threads", "--subprocesses", "--",
                sys.executable, "-m", "connector.cli.main", "--log-level", "warning", "poll-once", "--config", str(cfg),
            ]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout + proc.stderr)
                return 1
            left = dove.count(USER)
            out = args.out or REPO / "bench" / "results" / f"profile_e2e_{args.mode}.txt"
            header = (
                f"py-spy profile of `pop3-kafka poll-once`: {args.mails} mails of the ~24 KB mix, "
                f"mime_decoding {'on' if args.mode == 'decode' else 'off'}, {args.delivery}, one mailbox over POP3S; "
                f"wall {wall:.2f} s under the profiler (250 Hz, all threads, waiting threads not sampled); "
                f"mails left on the server: {left}. "
                f"`python bench/profile_e2e.py --mails {args.mails} --mode {args.mode}`"
            )
            summarise(raw, out, header)
            print(out.read_text()[:6000])
    finally:
        if stack is not None:
            stack.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
