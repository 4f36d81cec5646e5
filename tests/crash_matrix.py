#!/usr/bin/env python3
"""The crash matrix: kill -9 the connector at every named point, and at random moments,
then prove that a read_committed consumer sees every mail exactly once.

Real broker, real Dovecot, the real CLI in a child process. Each run: new mail arrives,
`pop3-kafka poll-once` is killed (SIGKILL, via POP3K_FAULT or by this script), then an
unfaulted poll-once recovers. At the end: read_committed shows each mail once, none missing,
the mailbox is empty; read_uncommitted shows that aborted copies exist (the guarantee is the
transaction's doing, not luck).

    python tests/crash_matrix.py --runs-per-point 10 --random-kills 200 [--seed N]   # make crash-matrix
    (tests/integration/test_crash_matrix.py runs a reduced matrix in CI)

Writes a summary table (points x runs, lost, duplicated, seed) to --out.
"""

from __future__ import annotations

import argparse
import os
import poplib
import random
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy" / "local"))
sys.path.insert(0, str(REPO / "tests"))

import yaml  # noqa: E402
from confluent_kafka import Consumer, TopicPartition  # noqa: E402
from localstack import DovecotServer, Stack  # noqa: E402
from support.mailgen import make_mail  # noqa: E402

from connector.faults import POINTS  # noqa: E402
from connector.records import decode_single_object  # noqa: E402

OK_LINE = re.compile(r"(?P<mb>\S+): ok: (?P<pub>\d+) published, (?P<del>\d+) deleted")


@dataclass
class PointStats:
    runs: int = 0
    killed: int = 0
    not_reached: int = 0
    recovered: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


@dataclass
class Summary:
    seed: int
    points: dict[str, PointStats]
    random_kills: int
    random_killed: int
    mails: int
    committed_records: int
    uncommitted_records: int
    lost: list[str]
    duplicated: list[str]
    left_on_server: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.lost and not self.duplicated and self.left_on_server == 0

    def table(self) -> str:
        rows = [
            "| point | runs | killed there | recovered | outcomes |",
            "|---|---:|---:|---:|---|",
        ]
        for name, st in self.points.items():
            out = ", ".join(f"{k}: {v}" for k, v in sorted(st.outcomes.items())) or "-"
            rows.append(f"| {name} | {st.runs} | {st.killed} | {st.recovered} | {out} |")
        rows.append(
            f"| random kill -9 | {self.random_kills} | {self.random_killed} | {self.random_kills} | "
            "killed mid-flight / tries |"
        )
        return "\n".join(
            [
                *rows,
                "",
                f"seed {self.seed}; {self.mails} mails delivered to the mailbox; read_committed saw "
                f"{self.committed_records} records: lost {len(self.lost)}, duplicated {len(self.duplicated)}; "
                f"read_uncommitted saw {self.uncommitted_records} (aborted copies: "
                f"{self.uncommitted_records - self.committed_records}); left on the server {self.left_on_server}; "
                f"{self.seconds:.0f} s.",
            ]
        )


class Matrix:
    def __init__(self, bootstrap: str, dovecot: DovecotServer, user: str, workdir: Path, seed: int) -> None:
        self.bootstrap = bootstrap
        self.dovecot = dovecot
        self.user = user
        self.seed = seed
        self.rng = random.Random(seed)
        tag = uuid.uuid4().hex[:8]
        self.topic = f"crash-mail-{tag}"
        self.ledger = f"crash-ledger-{tag}"
        self.expected: set[str] = set()
        self.n = 0
        self.config = workdir / "crash.yaml"
        doc = {
            "kafka": {"bootstrap_servers": bootstrap, "delivery_timeout_seconds": 20},
            "topics": {"mail": self.topic, "partitions": 1},
            "ledger": {"topic": self.ledger, "shards": 1},
            "delivery": {"transactional_id_prefix": f"crash-{tag}", "transaction_timeout_seconds": 60},
            "mailboxes": [
                {
                    "id": "crash",
                    "host": "127.0.0.1",
                    "port": dovecot.pop3s_port,
                    "tls_ca_file": str(dovecot.cafile),
                    "username": user,
                    "password": {"env": "PW_CRASH"},
                    "max_seconds_per_cycle": 25,
                }
            ],
        }
        self.config.write_text(yaml.safe_dump(doc))
        self.env = {**os.environ, "PW_CRASH": f"{user}-pw"}
        for k in ("POP3K_FAULT", "POP3K_FAULT_SEED"):
            self.env.pop(k, None)
        dovecot.clear(user)

    def deliver(self, k: int) -> None:
        for _ in range(k):
            raw, exp = make_mail(self.n, seed=self.seed)
            self.n += 1
            self.dovecot.put(self.user, raw)
            self.expected.add(exp.message_id)

    def _cmd(self) -> list[str]:
        return [sys.executable, "-m", "connector.cli.main", "--log-format", "json", "poll-once", "-c", str(self.config)]

    def poll(self, fault: str | None = None, fault_seed: int | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if fault:
            env["POP3K_FAULT"] = fault
            env["POP3K_FAULT_SEED"] = str(fault_seed or 0)
        return subprocess.run(self._cmd(), env=env, capture_output=True, text=True, timeout=120, check=False)

    def recover(self) -> tuple[int, int]:
        """An unfaulted poll-once; returns (published, deleted). Retries once on failure."""
        for _ in range(3):
            proc = self.poll()
            m = OK_LINE.search(proc.stdout)
            if proc.returncode == 0 and m:
                return int(m["pub"]), int(m["del"])
            time.sleep(1)
        raise AssertionError(f"recovery failed: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")

    def point_runs(self, point: str, runs: int) -> PointStats:
        st = PointStats()
        for i in range(runs):
            self.deliver(3)
            proc = self.poll(fault=point, fault_seed=self.seed * 1000 + i)
            st.runs += 1
            if proc.returncode == -signal.SIGKILL:
                st.killed += 1
            else:
                st.not_reached += 1
                st.outcomes["not reached"] += 1
            published, _ = self.recover()
            st.recovered += 1
            if point == "during_commit" and proc.returncode == -signal.SIGKILL:
                # committed before the kill -> recovery publishes nothing new, only deletes
                st.outcomes["committed" if published == 0 else "aborted"] += 1
        return st

    def random_runs(self, kills: int) -> tuple[int, int]:
        """Until ``kills`` processes were really killed mid-flight (at most 3x as many tries):
        start poll-once, SIGKILL it after a seeded random delay within its usual run time."""
        t = time.monotonic()
        self.recover()
        typical = max(0.5, time.monotonic() - t)
        tries = killed = 0
        while killed < kills and tries < 3 * kills:
            tries += 1
            self.deliver(self.rng.randint(1, 12))
            proc = subprocess.Popen(self._cmd(), env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(self.rng.uniform(0.05, 1.2 * typical))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
            proc.wait(timeout=60)
            self.recover()
        return tries, killed

    def read_back(self, isolation: str) -> Counter[str]:
        c = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"crash-check-{uuid.uuid4().hex[:6]}",
                "isolation.level": isolation,
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
        seen: Counter[str] = Counter()
        try:
            c.assign([TopicPartition(self.topic, 0, -2)])
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                msg = c.poll(1.0)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == -191:  # _PARTITION_EOF
                        break
                    continue
                seen[decode_single_object(msg.value() or b"")["message_id"]] += 1
        finally:
            c.close()
        return seen

    def server_count(self) -> int:
        ctx = ssl.create_default_context(cafile=str(self.dovecot.cafile))
        pop = poplib.POP3_SSL("127.0.0.1", self.dovecot.pop3s_port, context=ctx, timeout=30)
        try:
            pop.user(self.user)
            pop.pass_(f"{self.user}-pw")
            return int(pop.stat()[0])
        finally:
            pop.quit()


def run_matrix(
    bootstrap: str, dovecot: DovecotServer, user: str, *, runs_per_point: int, random_kills: int, seed: int
) -> Summary:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        mx = Matrix(bootstrap, dovecot, user, Path(work), seed)
        stats = {p: mx.point_runs(p, runs_per_point) for p in POINTS}
        rk, rkilled = mx.random_runs(random_kills)
        mx.recover()  # drain whatever is left
        committed = mx.read_back("read_committed")
        uncommitted = mx.read_back("read_uncommitted")
        lost = sorted(mx.expected - set(committed))
        dup = sorted(k for k, v in committed.items() if v > 1)
        return Summary(
            seed=seed,
            points=stats,
            random_kills=rk,
            random_killed=rkilled,
            mails=len(mx.expected),
            committed_records=sum(committed.values()),
            uncommitted_records=sum(uncommitted.values()),
            lost=lost,
            duplicated=dup,
            left_on_server=mx.server_count(),
            seconds=time.monotonic() - t0,
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-per-point", type=int, default=10)
    ap.add_argument("--random-kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "crash-matrix.md")
    args = ap.parse_args()
    # SIGTERM (a CI timeout, Ctrl-C from make) still runs the finally below: no orphaned servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"crash matrix seed {seed}", flush=True)
    d = Path(tempfile.mkdtemp(prefix="pop3k-crash-"))
    d.chmod(0o755)
    stack = Stack.at(d)
    try:
        stack.up()
        s = run_matrix(
            stack.kafka.bootstrap,
            stack.dovecot,
            "t12",
            runs_per_point=args.runs_per_point,
            random_kills=args.random_kills,
            seed=seed,
        )
    finally:
        stack.down()
        shutil.rmtree(d, ignore_errors=True)
    text = (
        f"# Crash matrix ({time.strftime('%Y-%m-%d')})\n\n"
        f"`python tests/crash_matrix.py --runs-per-point {args.runs_per_point} --random-kills {args.random_kills} "
        f"--seed {seed}` (make crash-matrix), real Kafka 4.4 + Dovecot, exactly-once mode.\n\n{s.table()}\n\n"
        f"Verdict: {'PASS' if s.ok else 'FAIL'}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0 if s.ok else 1


if __name__ == "__main__":
    sys.exit(main())
