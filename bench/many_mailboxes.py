#!/usr/bin/env python3
"""Benchmark (issue 7): one process, many mailboxes, the real scheduling loop.

ONE process runs :class:`connector.runtime.runner.Runner` (``run()``, the loop of
``pop3-kafka run``) in a thread over N Dovecot users (bench1..benchN) over POP3S, polled every
``--interval`` seconds with the connector's default jitter (or ``--jitter``), exactly-once
delivery (``--shards`` ledger shards, a fresh mail topic). A feeder thread drops ``--rate`` mails
per second into random mailboxes for ``--minutes`` minutes, each with a unique Message-ID. Then:

* **drain**: feeding stops; wait until everything sent was published and every maildir is
  empty (bounded by ``--drain-timeout``);
* **quiet**: ``--quiet-intervals`` more intervals with no mail at all: every cycle is empty, and
  the CPU per empty cycle is measured there;
* **idle**: every mailbox paused (``Runner.pause``, the on-call control), so nothing is due:
  ``--idle-seconds`` of the loop, the shard producers and librdkafka idling (idle CPU %);
* stop the runner, read VmHWM (peak RSS), consume the mail topic read_committed and check every
  recorded Message-ID is there exactly once (and the dead-letter topic is empty, and every
  maildir too).

Measured in this process all along: a sampler thread reads getrusage() (CPU of the whole process,
librdkafka's threads included; the bench's own sampler and feeder threads subtracted) and
/proc/self/task/*/stat (CPU per thread group: loop, shard rounds, POP3 sessions, librdkafka,
bench) every ``--sample`` seconds. A window between two samples is *idle* when no shard round
ran at either end and none started in between; idle CPU % is reported for the idle phase and
for the run's own idle windows (few when the jitter spreads polls over the whole interval).

Schedule lag: ``runner.lags`` (one value per cycle started, seconds after its jittered due time);
each mailbox's first cycle (the start-up burst, which also waits for init_transactions() and the
ledger load of every shard) is reported apart from the steady state. To say why a cycle was late,
each ShardWorker's round(), _fetch(), _settle() and its producer's begin()/commit() are timed by
replacing them on the instances after Runner.prepare() (connector code is unchanged), and every
wait is split into: all max_sessions_per_server slots held / its own shard running a round / the
rest (the loop). ``--profile FILE``: cProfile in thread CPU time of the loop and of the round and
session threads.

Kafka: the broker named by KAFKA_BOOTSTRAP, or one started in a temporary directory
(deploy/local/localstack.py). Dovecot: always a separate instance in a temporary directory with
its own passwd-file of N users, written by localstack's DovecotServer (``users=``): its config
already raises default_process_limit (1000), default_client_limit (4000) and
mail_max_userip_connections (200); the limits in effect (doveconf -a) go into the report. Dovecot
and Kafka share the machine with this process: their CPU is reported, not counted. Everything
started here is stopped at the end. Writes bench/results/many_mailboxes.md (``--out``).

    python bench/many_mailboxes.py                               # 500 mailboxes, 5 min of mail, ~9 min
    python bench/many_mailboxes.py --mailboxes 50 --minutes 2    # reduced, ~5 min
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import logging
import math
import os
import platform
import pstats
import random
import resource
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deploy" / "local"))

import confluent_kafka  # noqa: E402
from confluent_kafka import Consumer, KafkaError, TopicPartition  # noqa: E402
from localstack import DOVECOT_BIN, DovecotServer, KafkaNode  # noqa: E402

from connector.config import load_config  # noqa: E402
from connector.config.model import Config, MailboxConfig  # noqa: E402
from connector.delivery.admin import DEAD_LETTER_TOPIC_CONFIG, ensure_topic  # noqa: E402
from connector.observability.logging import JsonFormatter  # noqa: E402
from connector.records import decode_single_object  # noqa: E402
from connector.records.ledger import shard_of  # noqa: E402
from connector.runtime.cycle import CycleResult, MailboxSession, open_session  # noqa: E402
from connector.runtime.exactly_once import Prepared, ShardWorker  # noqa: E402
from connector.runtime.runner import Runner  # noqa: E402

RESULTS = REPO / "bench" / "results" / "many_mailboxes.md"
LAG_TARGET_S = 2.0
IDLE_TARGET_PCT = 10.0
RSS_TARGET_MB = 300.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- /proc helpers


def status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def process_cpu() -> float:
    """User + system CPU seconds of this whole process (every thread, librdkafka's included)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def thread_ticks() -> dict[int, tuple[str, int]]:
    """tid -> (kernel thread name, utime + stime in clock ticks) for every thread of this process."""
    out: dict[int, tuple[str, int]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        out[int(task.name)] = (comm, int(fields[11]) + int(fields[12]))
    return out


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat's cpu line. Its first eight
    fields only: guest and guest_nice are already counted in user and nice (proc(5))."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def pid_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its reaped children (0 when gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    f = text[text.rindex(")") + 2 :].split()
    return (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / CLK_TCK


def _version(v: object) -> str:
    return str(v[0]) if isinstance(v, tuple) else str(v)


def machine_facts() -> list[str]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    dovecot = subprocess.run([DOVECOT_BIN, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    ram_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**30
    return [
        f"{os.cpu_count()} CPUs ({model or platform.machine()}), {ram_gib} GiB RAM, Linux {platform.release()}",
        f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}",
        f"confluent-kafka {_version(confluent_kafka.version())}, librdkafka {_version(confluent_kafka.libversion())}",
        f"Dovecot {dovecot}, Kafka 4.4 (deploy/local/kafka/pom.xml), all on 127.0.0.1",
    ]


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


# --------------------------------------------------------------------------- the mail


def make_mail(tag: str, seq: int, user: str, rng: random.Random) -> tuple[str, bytes]:
    """A small plain-text mail (~1-3 KB, LF line ends as a maildir holds them) with a unique Message-ID."""
    mid = f"<mm-{tag}-{seq}@bench.example>"
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    body = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(rng.randint(10, 40)))
    raw = (
        f"From: Feeder <feeder@bench.example>\nTo: {user}@bench.example\nSubject: bench mail {seq}\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\nMessage-ID: {mid}\n"
        f"MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n{body}\n"
    )
    return mid, raw.encode()


class Feeder(threading.Thread):
    """Puts ``rate`` mails per second into random mailboxes (tmp/ then rename into new/) until stopped."""

    def __init__(self, dovecot: DovecotServer, users: list[str], rate: float, tag: str, seed: int) -> None:
        super().__init__(name="bench-feeder", daemon=True)
        self.dovecot, self.users, self.rate, self.tag = dovecot, users, rate, tag
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        #: Message-ID -> mailbox
        self.sent: dict[str, str] = {}
        #: this thread's own CPU seconds (subtracted from the process's)
        self.cpu = 0.0
        self.behind_max = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            t0 = time.monotonic()
            seq = 0
            while not self.halt.is_set():
                due = t0 + seq / self.rate
                wait = due - time.monotonic()
                if wait > 0 and self.halt.wait(wait):
                    break
                self.behind_max = max(self.behind_max, -wait)
                user = self.rng.choice(self.users)
                mid, raw = make_mail(self.tag, seq, user, self.rng)
                self.dovecot.put(user, raw)
                self.sent[mid] = user
                seq += 1
                self.cpu = time.thread_time()
        except BaseException as exc:
            self.error = exc


# --------------------------------------------------------------------------- the runner, instrumented


@dataclass
class Round:
    """One unit of work: one shard round (one Kafka transaction for the shard's due mailboxes)."""

    shard: int
    start: float  # wall clock (time.time(), the runner's clock)
    end: float
    mailboxes: int
    fetched: int
    published: int
    failed: int
    #: producer.begin() / producer.commit() seconds (unit thread)
    begin_s: float = 0.0
    commit_s: float = 0.0
    #: fetch phase: round start -> last session's fetch end (sessions wait for a free pool thread)
    fetch_span_s: float = 0.0
    #: the longest single fetch (connect, TLS, login, UIDL/LIST, RETR, produce)
    fetch_max_s: float = 0.0
    #: the latest a fetch started after the round began (waiting for one of the shared session threads)
    pool_wait_max_s: float = 0.0
    #: settle phase (DELE + QUIT of every session, after the commit)
    settle_span_s: float = 0.0

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class CycleLag:
    mailbox: str
    shard: int
    due: float
    start: float  # when its round began (wrap of Runner._work: a few ms after the loop took it)
    first: bool  # the mailbox's first cycle

    @property
    def lag(self) -> float:
        return self.start - self.due


class Instrument:
    """Times the runner from outside (connector code unchanged): each ShardWorker's round() (one
    call = one unit of work = one Kafka transaction), _fetch/_settle and its producer's
    begin()/commit() (instance attributes replaced after Runner.prepare()), and the session factory
    (connect + TLS + greeting). Also keeps the timeline of sessions held by running rounds (the
    loop's per-server count) to tell why a cycle started late."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.lock = threading.Lock()
        self.active = 0
        self.started = 0
        self.inflight = 0
        #: (time, mailboxes held by running rounds) after every change
        self.timeline: list[tuple[float, int]] = []
        self.rounds: list[Round] = []
        self.results: list[tuple[float, CycleResult]] = []
        self.cycle_lags: list[CycleLag] = []
        self.seen: set[str] = set()
        self.connect_s: list[float] = []
        self.errors: Counter[str] = Counter()
        #: round id -> [(start, end)] of its fetches / settles
        self._fetches: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._settles: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._tl = threading.local()
        #: --profile: one cProfile per round/session thread, timed in thread CPU seconds
        self.profiling = False
        self.profiles: list[cProfile.Profile] = []

    @contextlib.contextmanager
    def profiled(self) -> Iterator[None]:
        if not self.profiling:
            yield
            return
        prof: cProfile.Profile | None = getattr(self._tl, "prof", None)
        if prof is None:
            prof = cProfile.Profile(time.thread_time)
            self._tl.prof = prof
            with self.lock:
                self.profiles.append(prof)
        prof.enable()
        try:
            yield
        finally:
            prof.disable()

    def patch_workers(self) -> None:
        for w in self.runner.workers.values():
            self._patch(w)

    def _patch(self, w: ShardWorker) -> None:
        rnd, fetch, settle = w.round, w._fetch, w._settle
        begin, commit = w.producer.begin, w.producer.commit

        def timed_round(mailboxes: Sequence[MailboxConfig], sessions: ThreadPoolExecutor) -> list[CycleResult]:
            return self._round(w.shard, rnd, mailboxes, sessions)

        def timed_fetch(p: Prepared) -> None:
            t0 = time.time()
            try:
                with self.profiled():
                    fetch(p)
            finally:
                with self.lock:
                    self._fetches[p.result.cycle_id].append((t0, time.time()))

        def timed_settle(p: Prepared) -> None:
            t0 = time.time()
            try:
                with self.profiled():
                    settle(p)
            finally:
                with self.lock:
                    self._settles[p.result.cycle_id].append((t0, time.time()))

        def timed_begin() -> None:
            t0 = time.perf_counter()
            try:
                begin()
            finally:
                self._tl.begin = time.perf_counter() - t0

        def timed_commit() -> None:
            t0 = time.perf_counter()
            try:
                commit()
            finally:
                self._tl.commit = time.perf_counter() - t0

        w.round = timed_round  # type: ignore[method-assign]
        w._fetch = timed_fetch  # type: ignore[method-assign]
        w._settle = timed_settle  # type: ignore[method-assign]
        w.producer.begin = timed_begin  # type: ignore[method-assign]
        w.producer.commit = timed_commit  # type: ignore[method-assign]

    def session_factory(self, m: MailboxConfig) -> MailboxSession:
        t0 = time.perf_counter()
        s = open_session(m)  # TCP connect + TLS handshake + greeting
        dt = time.perf_counter() - t0
        with self.lock:
            self.connect_s.append(dt)
        return s

    def _round(
        self,
        shard: int,
        rnd: Callable[[Sequence[MailboxConfig], ThreadPoolExecutor], list[CycleResult]],
        due: Sequence[MailboxConfig],
        sessions: ThreadPoolExecutor,
    ) -> list[CycleResult]:
        start = time.time()
        self._tl.begin = self._tl.commit = 0.0
        with self.lock:
            self.active += 1
            self.started += 1
            self.inflight += len(due)
            self.timeline.append((start, self.inflight))
            for m in due:
                first = m.id not in self.seen
                self.seen.add(m.id)
                self.cycle_lags.append(CycleLag(m.id, shard, self.runner.scheduler.states[m.id].due, start, first))
        results: list[CycleResult] = []
        try:
            with self.profiled():
                results = rnd(due, sessions)
            return results
        finally:
            end = time.time()
            rid = results[0].cycle_id if results else ""
            with self.lock:
                self.active -= 1
                self.inflight -= len(due)
                self.timeline.append((end, self.inflight))
                fetches = self._fetches.pop(rid, [])
                settles = self._settles.pop(rid, [])
                commit_end = min((a for a, _ in settles), default=end)
                self.rounds.append(
                    Round(
                        shard=shard,
                        start=start,
                        end=end,
                        mailboxes=len(due),
                        fetched=sum(r.fetched for r in results),
                        published=sum(r.published for r in results),
                        failed=sum(not r.ok for r in results),
                        begin_s=self._tl.begin,
                        commit_s=self._tl.commit,
                        fetch_span_s=max((b for _, b in fetches), default=start) - start,
                        fetch_max_s=max((b - a for a, b in fetches), default=0.0),
                        pool_wait_max_s=max((a for a, _ in fetches), default=start) - start - self._tl.begin,
                        settle_span_s=max((b for _, b in settles), default=commit_end) - commit_end,
                    )
                )
                for r in results:
                    self.results.append((end, r))
                    if not r.ok:
                        self.errors[type(r.error).__name__] += 1

    def published(self) -> int:
        with self.lock:
            return sum(r.published for _, r in self.results)

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.active, self.started


# --------------------------------------------------------------------------- why late


def _overlap(intervals: Sequence[tuple[float, float]], a: float, b: float) -> float:
    return sum(max(0.0, min(e, b) - max(s, a)) for s, e in intervals)


@dataclass
class LagCause:
    cap_full: float = 0.0  # every session slot (max_sessions_per_server) held by running rounds
    shard_busy: float = 0.0  # its own shard ran a round (slots free)
    other: float = 0.0  # neither: the loop's own latency


def lag_causes(
    lags: Sequence[CycleLag], rounds: Sequence[Round], timeline: Sequence[tuple[float, int]], cap: int
) -> list[LagCause]:
    """For each cycle, split [due, start] into: session cap full / own shard busy / the rest."""
    tl = sorted(timeline)
    full: list[tuple[float, float]] = []
    since: float | None = None
    for t, n in tl:
        if n >= cap and since is None:
            since = t
        elif n < cap and since is not None:
            full.append((since, t))
            since = None
    if since is not None:
        full.append((since, math.inf))
    by_shard: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for r in rounds:
        by_shard[r.shard].append((r.start, r.end))
    out = []
    for c in lags:
        a, b = c.due, c.start
        if b <= a:
            out.append(LagCause())
            continue
        shard = by_shard.get(c.shard, [])
        busy = [(s, e) for s, e in shard if s < b and e > a]
        cap_full = _overlap(full, a, b)
        both = sum(_overlap(full, max(s, a), min(e, b)) for s, e in busy)
        shard_busy = _overlap(busy, a, b) - both
        out.append(LagCause(cap_full, shard_busy, max(0.0, (b - a) - cap_full - shard_busy)))
    return out


def dovecot_cpu_s(d: DovecotServer) -> float:
    """CPU seconds of the bench Dovecot: its master with every reaped child (login, pop3 processes)
    plus the processes of the instance still alive."""
    master = d.master_pid()
    total = pid_cpu_s(master) if master else 0.0
    prefix = f"dovecot-{d.instance}/".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "cmdline").read_bytes().startswith(prefix):
                continue
            f = (proc / "stat").read_text()
        except OSError:
            continue
        fields = f[f.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


# --------------------------------------------------------------------------- sampling


@dataclass
class Window:
    """One sampling interval."""

    phase: str
    wall: float
    cpu: float  # process CPU minus the bench's own sampler and feeder threads
    idle: bool
    by_group: dict[str, float] = field(default_factory=dict)  # CPU seconds per thread group (tick based)
    busy_jiffies: int = 0
    total_jiffies: int = 0


def thread_group(name: str, comm: str) -> str:
    if name == "bench-runner":
        return "scheduling loop"
    if name.startswith("unit"):
        return "shard rounds (unit threads)"
    if name.startswith("cycle"):
        return "POP3 sessions (cycle threads)"
    if name.startswith("bench-") or name == "MainThread":
        return "bench (sampler, feeder, main)"
    if comm.startswith("rdk:"):
        return "librdkafka threads"
    return f"other ({comm})"


class Sampler(threading.Thread):
    def __init__(self, inst: Instrument, feeder_cpu: Callable[[], float], every: float) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.inst, self.feeder_cpu, self.every = inst, feeder_cpu, every
        self.halt = threading.Event()
        self.phase = "start-up"
        self.windows: list[Window] = []

    def run(self) -> None:
        prev_t = time.monotonic()
        prev_cpu = process_cpu()
        prev_own = time.thread_time() + self.feeder_cpu()
        prev_act = self.inst.snapshot()
        prev_ticks = thread_ticks()
        prev_busy, prev_total = machine_busy()
        while not self.halt.wait(self.every):
            t, cpu = time.monotonic(), process_cpu()
            act = self.inst.snapshot()
            ticks = thread_ticks()
            busy, total = machine_busy()
            names = {th.native_id: th.name for th in threading.enumerate() if th.native_id is not None}
            groups: dict[str, float] = defaultdict(float)
            for tid, (comm, n) in ticks.items():
                before = prev_ticks.get(tid)
                if before is not None and n > before[1]:
                    groups[thread_group(names.get(tid, ""), comm)] += (n - before[1]) / CLK_TCK
            own = time.thread_time() + self.feeder_cpu()
            idle = prev_act[0] == 0 and act[0] == 0 and act[1] == prev_act[1]
            self.windows.append(
                Window(
                    phase=self.phase,
                    wall=t - prev_t,
                    cpu=(cpu - prev_cpu) - (own - prev_own),
                    idle=idle,
                    by_group=dict(groups),
                    busy_jiffies=busy - prev_busy,
                    total_jiffies=total - prev_total,
                )
            )
            prev_t, prev_cpu, prev_own, prev_act, prev_ticks = t, cpu, own, act, ticks
            prev_busy, prev_total = busy, total
            # the sampler's own CPU after the sample: counted in the next window's "own"


@dataclass
class PhaseStats:
    wall: float = 0.0
    cpu: float = 0.0
    idle_wall: float = 0.0
    idle_cpu: float = 0.0
    idle_windows: int = 0
    machine_pct: float = 0.0
    by_group: dict[str, float] = field(default_factory=dict)
    idle_by_group: dict[str, float] = field(default_factory=dict)
    #: windows in which rounds ran: whole machine busy % (both cores = 100 %), mean and p90
    busy_machine_pct: float = 0.0
    busy_machine_p90: float = 0.0
    #: ... and this process's CPU, % of one core, mean and p90
    busy_proc_pct: float = 0.0
    busy_proc_p90: float = 0.0

    @property
    def idle_pct(self) -> float:
        return 100 * self.idle_cpu / self.idle_wall if self.idle_wall else 0.0


def phase_stats(windows: Sequence[Window], phases: Sequence[str]) -> PhaseStats:
    ws = [w for w in windows if w.phase in phases]
    st = PhaseStats()
    busy = total = 0
    by: dict[str, float] = defaultdict(float)
    idle_by: dict[str, float] = defaultdict(float)
    for w in ws:
        st.wall += w.wall
        st.cpu += w.cpu
        busy += w.busy_jiffies
        total += w.total_jiffies
        for g, v in w.by_group.items():
            by[g] += v
            if w.idle:
                idle_by[g] += v
        if w.idle:
            st.idle_wall += w.wall
            st.idle_cpu += w.cpu
            st.idle_windows += 1
    st.machine_pct = 100 * busy / total if total else 0.0
    st.by_group, st.idle_by_group = dict(by), dict(idle_by)
    active = [w for w in ws if not w.idle and w.total_jiffies and w.wall]
    if active:
        mach = [100 * w.busy_jiffies / w.total_jiffies for w in active]
        proc = [100 * w.cpu / w.wall for w in active]
        st.busy_machine_pct = 100 * sum(w.busy_jiffies for w in active) / sum(w.total_jiffies for w in active)
        st.busy_machine_p90 = pct(mach, 90)
        st.busy_proc_pct = 100 * sum(w.cpu for w in active) / sum(w.wall for w in active)
        st.busy_proc_p90 = pct(proc, 90)
    return st


# --------------------------------------------------------------------------- Kafka read-back


def consume_ids(bootstrap: str, topic: str, *, timeout: float = 120.0) -> tuple[Counter[str], int]:
    """(Message-ID -> times seen, records) of every committed record of ``topic`` (read_committed, to the end)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-mm-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
    )
    seen: Counter[str] = Counter()
    records = 0
    try:
        md = c.list_topics(topic, timeout=15)
        tmd = md.topics.get(topic)
        if tmd is None or tmd.error is not None:
            return seen, 0
        parts = sorted(tmd.partitions)
        c.assign([TopicPartition(topic, p, -2) for p in parts])
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(parts):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{topic}: not read to the end within {timeout:.0f}s")
            msg = c.poll(0.5)
            if msg is None:
                continue
            err, part = msg.error(), msg.partition() or 0
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(part)
                    continue
                raise RuntimeError(f"{topic}: {err}")
            at_end.discard(part)
            records += 1
            value = msg.value()
            if value is None:
                continue
            try:
                mid = decode_single_object(value).get("message_id")
            except Exception:
                mid = None
            seen[str(mid)] += 1
    finally:
        c.close()
    return seen, records


# --------------------------------------------------------------------------- the run


@dataclass
class Outcome:
    args: argparse.Namespace
    mailboxes: int
    shards_used: int
    sent: int = 0
    sent_ids: dict[str, str] = field(default_factory=dict)
    delivered_unique: int = 0
    duplicates: int = 0
    missing: int = 0
    unexpected: int = 0
    dlq_records: int = 0
    left_on_server: int = 0
    cycles: int = 0
    empty_cycles: int = 0
    failed_cycles: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lags_all: list[float] = field(default_factory=list)
    lags_steady: list[float] = field(default_factory=list)
    lags_first: list[float] = field(default_factory=list)
    lag_split: list[CycleLag] = field(default_factory=list)
    causes: list[LagCause] = field(default_factory=list)
    dovecot_cpu: dict[str, float] = field(default_factory=dict)
    jitter_s: float = 0.0
    rounds: list[Round] = field(default_factory=list)
    connect_s: list[float] = field(default_factory=list)
    phases: dict[str, PhaseStats] = field(default_factory=dict)
    quiet_cycles: int = 0
    quiet_nonempty: int = 0
    run_cycles_empty: int = 0
    baseline_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    end_rss_mb: float = 0.0
    threads_max: int = 0
    drain_s: float = 0.0
    drained: bool = False
    startup_s: float = 0.0
    prepare_s: float = 0.0
    feeder_behind_max: float = 0.0
    feeder_cpu: float = 0.0
    kafka_cpu_s: float | None = None
    warnings_logged: int = 0
    limits: str = ""
    load_before: str = ""
    load_after: str = ""
    facts: list[str] = field(default_factory=list)
    profile: str = ""
    command: str = ""


class CountingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:300])


def dovecot_limits(d: DovecotServer) -> str:
    """The process/client limits Dovecot actually runs with (doveconf -a of the bench instance)."""
    out = subprocess.run(
        ["doveconf", "-c", str(d.conf), "-a"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    keep: dict[str, str] = {}
    section: list[str] = []
    for line in out:
        s = line.strip()
        if s.endswith("{"):
            section.append(s[:-1].strip())
            continue
        if s == "}":
            if section:
                section.pop()
            continue
        key, _, value = s.partition(" = ")
        where = " ".join(section)
        if not section and key in ("default_process_limit", "default_client_limit", "mail_max_userip_connections"):
            keep[key] = value
        elif where in ("service pop3-login", "service pop3", "service auth") and key in (
            "process_limit",
            "client_limit",
            "service_count",
        ):
            # 0 = inherit default_process_limit / default_client_limit
            keep[f"{where.split()[1]}.{key}"] = "default" if value == "0" and key != "service_count" else value
    return ", ".join(f"{k} = {v}" for k, v in keep.items())


def write_config(
    path: Path, *, bootstrap: str, dovecot: DovecotServer, users: list[str], args: argparse.Namespace, tag: str
) -> Config:
    doc: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap},
        "topics": {"mail": f"bench-mm-{tag}", "partitions": 3},
        "ledger": {"topic": f"bench-mm-{tag}.ledger", "shards": args.shards},
        "delivery": {"mode": "exactly_once", "transactional_id_prefix": f"bench-mm-{tag}"},
        "runtime": {"max_concurrent_sessions": args.sessions, "max_sessions_per_server": args.per_server},
        "mailboxes": [
            {
                "id": u,
                "host": "127.0.0.1",
                "port": dovecot.pop3s_port,
                "tls": "implicit",
                "tls_ca_file": str(dovecot.cafile),
                "username": u,
                "password": {"env": f"BENCH_MM_PW_{u.upper()}"},
                "poll_interval_seconds": args.interval,
                **({"schedule": {"jitter_seconds": args.jitter}} if args.jitter is not None else {}),
            }
            for u in users
        ],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_config(path)


def ensure_topics(cfg: Config) -> None:
    """What `pop3-kafka run` creates before its loop: mail, dead-letter and attachments topics."""
    t = cfg.topics
    for topic, conf in ((t.mail, None), (t.dead_letter, DEAD_LETTER_TOPIC_CONFIG), (t.attachments, None)):
        ensure_topic(
            cfg.kafka.bootstrap_servers,
            cfg.kafka.client_conf(),
            topic,
            create=True,
            partitions=t.partitions,
            replication_factor=t.replication_factor,
            config=conf,
        )


@contextlib.contextmanager
def kafka_broker(state: Path) -> Iterator[tuple[str, KafkaNode | None]]:
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"], None
        return
    node = KafkaNode(state / "kafka")
    node.start()
    try:
        yield node.bootstrap, node
    finally:
        node.stop()


def run_bench(args: argparse.Namespace, state: Path) -> Outcome:
    users = [f"bench{i}" for i in range(1, args.mailboxes + 1)]
    tag = uuid.uuid4().hex[:8]
    out = Outcome(args=args, mailboxes=len(users), shards_used=0)
    out.facts = machine_facts()
    out.load_before = Path("/proc/loadavg").read_text().split(" 1")[0].strip()
    log_file = state / "connector.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(JsonFormatter())
    counting = CountingHandler()
    root = logging.getLogger()
    root.handlers[:] = [handler, counting]
    root.setLevel(logging.INFO)
    for u in users:
        os.environ[f"BENCH_MM_PW_{u.upper()}"] = f"{u}-pw"

    with kafka_broker(state) as (bootstrap, node):
        dovecot = DovecotServer(state / "dovecot", users={u: f"{u}-pw" for u in users})
        t0 = time.monotonic()
        dovecot.start()
        try:
            print(f"Dovecot with {len(users)} users up in {time.monotonic() - t0:.1f}s on :{dovecot.pop3s_port}")
            out.limits = dovecot_limits(dovecot)
            print(f"Dovecot limits: {out.limits}")
            cfg = write_config(
                state / "config.yaml", bootstrap=bootstrap, dovecot=dovecot, users=users, args=args, tag=tag
            )
            ensure_topics(cfg)
            kafka_cpu0 = pid_cpu_s(node.pid) if node is not None else 0.0
            out.baseline_rss_mb = status_kb("VmRSS") / 1024
            _run_phases(args, cfg=cfg, dovecot=dovecot, users=users, tag=tag, out=out)
            if node is not None:
                out.kafka_cpu_s = pid_cpu_s(node.pid) - kafka_cpu0
            # -------- verify
            seen, _ = consume_ids(bootstrap, cfg.topics.mail)
            sent = out.sent_ids
            out.delivered_unique = sum(1 for mid in seen if mid in sent)
            out.duplicates = sum(n - 1 for mid, n in seen.items() if mid in sent and n > 1)
            out.missing = sum(1 for mid in sent if mid not in seen)
            out.unexpected = sum(n for mid, n in seen.items() if mid not in sent)
            _, out.dlq_records = consume_ids(bootstrap, cfg.topics.dead_letter)
            out.left_on_server = sum(dovecot.count(u) for u in users)
        finally:
            dovecot.stop()
    out.warnings_logged = counting.count
    if counting.first:
        print("first warnings/errors logged by the connector:\n  " + "\n  ".join(counting.first))
    out.load_after = Path("/proc/loadavg").read_text().split(" 1")[0].strip()
    return out


def _run_phases(
    args: argparse.Namespace, *, cfg: Config, dovecot: DovecotServer, users: list[str], tag: str, out: Outcome
) -> None:
    inst_holder: list[Instrument] = []

    def factory(m: MailboxConfig) -> MailboxSession:
        return inst_holder[0].session_factory(m)

    runner = Runner(cfg, session_factory=factory)
    inst = Instrument(runner)
    inst_holder.append(inst)
    out.shards_used = len({shard_of(u, args.shards) for u in users})
    feeder = Feeder(dovecot, users, args.rate, tag, args.seed)
    sampler = Sampler(inst, lambda: feeder.cpu, args.sample)
    # thread CPU time, not wall time: where the CPU goes, not where threads wait
    prof = cProfile.Profile(time.thread_time) if args.profile else None
    inst.profiling = prof is not None
    crashed: list[BaseException] = []

    def loop() -> None:
        try:
            # run() calls prepare() too (a no-op for shards already fenced in and loaded); done here
            # first so that the workers exist when their round()/_fetch()/commit() get timed.
            t0 = time.monotonic()
            runner.prepare()
            out.prepare_s = time.monotonic() - t0
            inst.patch_workers()
            if prof is not None:
                prof.runcall(runner.run)
            else:
                runner.run()
        except BaseException as exc:
            crashed.append(exc)
            runner.stop.set()

    dovecot_marks: list[tuple[str, float]] = []

    def phase(name: str) -> None:
        """Switch the sampler's phase; note the Dovecot CPU used so far (per-phase Dovecot CPU)."""
        sampler.phase = name
        dovecot_marks.append((name, dovecot_cpu_s(dovecot)))

    thread = threading.Thread(target=loop, name="bench-runner")
    t_start = time.monotonic()
    dovecot_marks.append(("start-up", dovecot_cpu_s(dovecot)))
    sampler.start()
    thread.start()
    threads_max = 0
    quiet_from = 0
    try:
        # start-up: init_transactions() per shard, ledger load, then the first cycles
        while not runner.lags and not crashed:
            time.sleep(0.05)
        out.startup_s = time.monotonic() - t_start
        print(f"runner up: first cycle {out.startup_s:.1f}s after start ({len(runner.workers)} shard producers)")
        phase("feed")
        feeder.start()
        feed_end = time.monotonic() + args.minutes * 60
        next_report = time.monotonic() + 30
        while time.monotonic() < feed_end and not crashed:
            time.sleep(0.5)
            threads_max = max(threads_max, threading.active_count())
            if time.monotonic() >= next_report:
                next_report += 30
                print(
                    f"  t={time.monotonic() - t_start:5.0f}s sent={len(feeder.sent)} published={inst.published()} "
                    f"cycles={len(inst.results)} rounds={len(inst.rounds)} rss={status_kb('VmRSS') / 1024:.0f}MB",
                    flush=True,
                )
        feeder.halt.set()
        feeder.join()
        if feeder.error is not None:
            raise RuntimeError(f"feeder failed: {feeder.error!r}")
        out.sent_ids = dict(feeder.sent)
        out.sent = len(feeder.sent)
        out.feeder_behind_max = feeder.behind_max
        out.feeder_cpu = feeder.cpu
        # -------- drain: everything published and every maildir empty, bounded
        phase("drain")
        t_drain = time.monotonic()
        bound = t_drain + args.drain_timeout
        while time.monotonic() < bound and not crashed:
            time.sleep(1.0)
            published_all = inst.published() >= out.sent and inst.snapshot()[0] == 0
            if published_all and sum(dovecot.count(u) for u in set(feeder.sent.values())) == 0:
                out.drained = True
                break
        out.drain_s = time.monotonic() - t_drain
        print(f"drain: {'done' if out.drained else 'NOT done'} after {out.drain_s:.1f}s")
        # -------- quiet: no mail; every cycle is empty
        phase("quiet")
        quiet_from = len(inst.results)
        time.sleep(args.quiet_intervals * args.interval)
        with inst.lock:
            quiet = inst.results[quiet_from:]
        out.quiet_cycles = len(quiet)
        out.quiet_nonempty = sum(1 for _, r in quiet if r.fetched or not r.ok)
        # -------- idle: every mailbox paused (the on-call control), so nothing is due at all
        phase("pause")
        for u in users:
            runner.pause(u)
        while inst.snapshot()[0] and not crashed:
            time.sleep(0.1)
        time.sleep(2 * args.sample)
        phase("idle")
        time.sleep(args.idle_seconds)
        phase("stop")
    finally:
        feeder.halt.set()
        runner.stop.set()
        with contextlib.suppress(AttributeError):
            runner._wake.set()  # cut the loop's idle wait short
        thread.join(timeout=cfg.runtime.shutdown_grace_seconds + 30)
        sampler.halt.set()
        sampler.join()
        out.peak_rss_mb = status_kb("VmHWM") / 1024
        out.end_rss_mb = status_kb("VmRSS") / 1024
        runner.close()
    if crashed:
        raise RuntimeError(f"runner.run() failed: {crashed[0]!r}")
    out.threads_max = threads_max
    out.dovecot_cpu = {name: dovecot_marks[i + 1][1] - cpu for i, (name, cpu) in enumerate(dovecot_marks[:-1])}
    out.jitter_s = cfg.mailboxes[0].schedule.jitter_seconds
    out.lags_all = list(runner.lags)
    n = len(users)
    out.lags_first, out.lags_steady = out.lags_all[:n], out.lags_all[n:]
    out.lag_split = list(inst.cycle_lags)
    out.rounds = list(inst.rounds)
    out.causes = lag_causes(out.lag_split, out.rounds, inst.timeline, args.per_server)
    out.connect_s = list(inst.connect_s)
    out.cycles = len(inst.results)
    out.empty_cycles = sum(1 for _, r in inst.results if r.ok and r.fetched == 0)
    out.failed_cycles = sum(1 for _, r in inst.results if not r.ok)
    out.errors = dict(inst.errors)
    out.run_cycles_empty = sum(1 for _, r in inst.results[:quiet_from] if r.ok and r.fetched == 0)
    for name, phases in (
        ("start-up", ["start-up"]),
        ("feed", ["feed"]),
        ("drain", ["drain"]),
        ("quiet", ["quiet"]),
        ("idle", ["idle"]),
        ("feed+drain", ["feed", "drain"]),
        ("all", ["start-up", "feed", "drain", "quiet"]),
    ):
        out.phases[name] = phase_stats(sampler.windows, phases)
    if prof is not None:
        prof.dump_stats(str(args.profile))
        buf = _Buf()
        buf.write("### scheduling loop thread (Runner.run), top 20 by own CPU time\n")
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(20)  # type: ignore[arg-type]
        if inst.profiles:
            work = pstats.Stats(inst.profiles[0], stream=buf)  # type: ignore[arg-type]
            for extra in inst.profiles[1:]:
                work.add(extra)
            work.dump_stats(str(args.profile) + ".rounds")
            buf.write("### shard rounds and POP3 sessions (unit + cycle threads), top 30 by own CPU time\n")
            work.strip_dirs().sort_stats("tottime").print_stats(30)
            buf.write("### the same, top 30 by cumulative CPU time\n")
            work.sort_stats("cumulative").print_stats(30)
        out.profile = buf.text


class _Buf:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


# --------------------------------------------------------------------------- report


def core_pct(st: PhaseStats) -> float:
    return 100 * st.cpu / st.wall if st.wall else 0.0


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def _stats_row(name: str, v: Sequence[float]) -> str:
    return f"| {name} | {len(v)} | {pct(v, 50):.3f} | {pct(v, 90):.3f} | {pct(v, 99):.3f} | {max(v, default=0):.3f} |"


def round_rows(o: Outcome) -> list[str]:
    rows = []
    for name, rs in (
        ("all rounds", o.rounds),
        ("rounds that fetched mail", [r for r in o.rounds if r.fetched]),
        ("rounds that fetched nothing", [r for r in o.rounds if not r.fetched]),
    ):
        if not rs:
            continue

        def col(f: Callable[[Round], float], rs: list[Round] = rs) -> str:
            v = [f(r) for r in rs]
            return f"{pct(v, 50):.3f} / {pct(v, 99):.3f}"

        rows.append(
            f"| {name} | {len(rs)} | {pct([r.mailboxes for r in rs], 50):.0f} / {max(r.mailboxes for r in rs)} "
            f"| {col(lambda r: r.duration)} | {col(lambda r: r.begin_s)} | {col(lambda r: r.pool_wait_max_s)} "
            f"| {col(lambda r: r.fetch_max_s)} | {col(lambda r: r.fetch_span_s)} | {col(lambda r: r.commit_s)} "
            f"| {col(lambda r: r.settle_span_s)} |"
        )
    return rows


def report(o: Outcome) -> str:
    a = o.args
    q, fd, al, idle = o.phases["quiet"], o.phases["feed+drain"], o.phases["all"], o.phases["idle"]
    exactly_once = o.sent > 0 and o.missing == 0 and o.duplicates == 0 and o.unexpected == 0 and o.dlq_records == 0
    lag_p99 = pct(o.lags_steady, 99)
    cpu_per_empty_quiet = q.cpu / o.quiet_cycles if o.quiet_cycles else float("nan")
    idle_rate = idle.cpu / idle.wall if idle.wall else 0.0  # CPU s per s with nothing due
    marginal = (q.cpu - idle_rate * q.wall) / o.quiet_cycles if o.quiet_cycles else float("nan")
    naive = fd.cpu / o.run_cycles_empty if o.run_cycles_empty else float("nan")
    per_cycle_fd = fd.cpu / max(1, o.cycles - o.quiet_cycles)
    jitter_note = "the connector's default" if a.jitter is None else "set by --jitter"
    steady = [(c, k) for c, k in zip(o.lag_split, o.causes, strict=True) if not c.first]
    late = [(c, k) for c, k in steady if c.lag > LAG_TARGET_S]
    late_total = sum(c.lag for c, _ in late)

    def share(f: Callable[[LagCause], float]) -> str:
        return f"{100 * sum(f(k) for _, k in late) / late_total:.0f} %" if late_total else "-"

    def dominant(k: LagCause) -> str:
        return max((k.cap_full, "cap"), (k.shard_busy, "shard"), (k.other, "other"))[1]

    dom = Counter(dominant(k) for _, k in late)
    t0 = min((c.due for c, _ in steady), default=0.0)
    by_interval: dict[int, list[float]] = defaultdict(list)
    for c, _ in steady:
        by_interval[int((c.due - t0) // a.interval)].append(c.lag)
    dv = o.dovecot_cpu
    dv_run = sum(v for k, v in dv.items() if k in ("feed", "drain"))
    lines = [
        f"# Many mailboxes in one process: {o.mailboxes} mailboxes, {a.interval:g} s interval (issue 7)",
        "",
        f"ONE process runs `Runner.run()` (the loop of `pop3-kafka run`) in a thread: {o.mailboxes} Dovecot users over "
        f"POP3S (implicit TLS, verified), every {a.interval:g} s with a jitter of {o.jitter_s:g} s ({jitter_note}; "
        f"stable per mailbox), exactly-once delivery with {a.shards} ledger shards ({o.shards_used} in use), "
        f"runtime.max_concurrent_sessions = {a.sessions}, max_sessions_per_server = {a.per_server}. A feeder thread "
        f"put {a.rate:g} mails/s (1-3 KB, unique Message-ID) into random mailboxes for {a.minutes:g} min; then a drain "
        f"(feeding stopped, until everything was published and deleted), {a.quiet_intervals} quiet interval(s) "
        f"with no mail at all and {a.idle_seconds:g} s with every mailbox paused (nothing due). Then the mail topic "
        "was read back read_committed. Dovecot and Kafka run on the same "
        "machine (their CPU is not in the process figures; see Details).",
        "",
        "## Results",
        "",
        "| measure | value | target | verdict |",
        "| --- | ---: | --- | --- |",
        f"| mails sent | {o.sent} | | |",
        f"| delivered (distinct Message-IDs read back) | {o.delivered_unique} | = sent | |",
        f"| duplicates / missing / unexpected / dead letters | {o.duplicates} / {o.missing} / {o.unexpected} / "
        f"{o.dlq_records} | 0 / 0 / 0 / 0 | {verdict(exactly_once)} |",
        f"| mails left on the server at the end | {o.left_on_server} | 0 | {verdict(o.left_on_server == 0)} |",
        f"| cycles (empty / failed) | {o.cycles} ({o.empty_cycles} / {o.failed_cycles}) | no failures | "
        f"{verdict(o.failed_cycles == 0)} |",
        f"| schedule lag, steady state p50 / p90 / p99 / max (s) | {pct(o.lags_steady, 50):.3f} / "
        f"{pct(o.lags_steady, 90):.3f} / {lag_p99:.3f} / {max(o.lags_steady, default=0):.3f} "
        f"| p99 < {LAG_TARGET_S:g} s | {verdict(bool(o.lags_steady) and lag_p99 < LAG_TARGET_S)} |",
        f"| schedule lag, first cycle of each mailbox (start-up) p50 / p99 / max (s) | {pct(o.lags_first, 50):.3f} / "
        f"{pct(o.lags_first, 99):.3f} / {max(o.lags_first, default=0):.3f} | (reported) | |",
        f"| CPU s per empty cycle (quiet interval: process CPU / cycles) | {cpu_per_empty_quiet:.4f} | (reported) | |",
        f"| idle CPU, % of one core, nothing due (idle phase: all {o.mailboxes} mailboxes paused, "
        f"{idle.wall:.0f} s) | {core_pct(idle):.2f} % | < {IDLE_TARGET_PCT:g} % "
        f"| {verdict(idle.wall > 0 and core_pct(idle) < IDLE_TARGET_PCT)} |",
        f"| idle CPU, % of one core, in the run's windows where no round ran ({al.idle_windows} windows of "
        f"{a.sample:g} s) | {al.idle_pct:.2f} % | < {IDLE_TARGET_PCT:g} % "
        f"| {verdict(al.idle_wall == 0 or al.idle_pct < IDLE_TARGET_PCT)} |",
        f"| peak RSS (VmHWM, whole process) | {o.peak_rss_mb:.0f} MB | < {RSS_TARGET_MB:g} MB "
        f"| {verdict(o.peak_rss_mb < RSS_TARGET_MB)} |",
        "",
        "## Why cycles start late",
        "",
        "Each steady-state cycle's wait, from its jittered due time to the start of its shard round, is split by "
        f"what held it: **session cap full** (all max_sessions_per_server = {a.per_server} slots held by running "
        "rounds; a round holds its slots until its commit and every QUIT are done), **own shard busy** (slots "
        "free, but its shard was running a round: one round, one transaction, at a time per shard), **other** (the "
        "loop's own latency).",
        "",
        "| | value |",
        "| --- | --- |",
        f"| steady-state cycles / later than {LAG_TARGET_S:g} s | {len(steady)} / {len(late)} |",
        f"| their late seconds: session cap full / own shard busy / other | {share(lambda k: k.cap_full)} / "
        f"{share(lambda k: k.shard_busy)} / {share(lambda k: k.other)} |",
        f"| late cycles by dominant cause: cap / shard / other | {dom['cap']} / {dom['shard']} / {dom['other']} |",
        f"| all steady-state cycles, p99 of each part: cap / shard / other (s) | "
        f"{pct([k.cap_full for _, k in steady], 99):.3f} / {pct([k.shard_busy for _, k in steady], 99):.3f} / "
        f"{pct([k.other for _, k in steady], 99):.3f} |",
        f"| steady-state lag p99 per interval (by due time), s | "
        f"{', '.join(f'{pct(v, 99):.2f}' for _, v in sorted(by_interval.items()))} |",
        "",
        "Shard rounds (seconds, p50 / p99; *pool wait*: the latest a session of the round started after "
        f"begin(), waiting for one of the {a.sessions} session threads all shards share; *fetch*: connect, TLS, "
        "login, UIDL/LIST, RETR and produce of one session; *fetch phase*: round start to the last fetch end; "
        "*settle*: DELE + QUIT of all sessions after the commit):",
        "",
        "| rounds | n | mailboxes p50 / max | duration | begin | pool wait | fetch (longest) | fetch phase "
        "| commit | settle |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *round_rows(o),
        "",
        f"POP3S connect + TLS handshake + greeting, per session: p50 {pct(o.connect_s, 50):.3f} s, p90 "
        f"{pct(o.connect_s, 90):.3f} s, p99 {pct(o.connect_s, 99):.3f} s. In windows where rounds ran, the whole "
        f"machine was {fd.busy_machine_pct:.0f} % busy on average (p90 {fd.busy_machine_p90:.0f} %; both cores = "
        f"100 %) and this process used {fd.busy_proc_pct:.0f} % of one core (p90 {fd.busy_proc_p90:.0f} %).",
        "",
        "## Details",
        "",
        "| | |",
        "| --- | --- |",
        "| start-up: Runner.prepare() (per shard, one after another: init_transactions, ledger load) / "
        f"thread start to the first cycle | {o.prepare_s:.1f} s / {o.startup_s:.1f} s |",
        f"| drain after feeding stopped | {o.drain_s:.1f} s ({'complete' if o.drained else 'NOT complete'}) |",
        f"| quiet interval(s): cycles (non-empty or failed) | {o.quiet_cycles} ({o.quiet_nonempty}) |",
        "| CPU s per empty cycle, marginal (quiet CPU minus the idle phase's rate x wall, / cycles) "
        f"| {marginal:.4f} |",
        f"| CPU s per empty cycle as asked literally (feed+drain CPU / empty cycles of the whole run) | {naive:.4f} |",
        f"| CPU s per cycle, feed+drain (all cycles) | {per_cycle_fd:.4f} |",
        f"| process CPU, % of one core: feed+drain / quiet / whole run | {core_pct(fd):.1f} % / "
        f"{core_pct(q):.1f} % / {core_pct(al):.1f} % |",
        f"| idle CPU % by phase: feed+drain / quiet ({fd.idle_windows} / {q.idle_windows} idle windows of "
        f"{a.sample:g} s) | {fd.idle_pct:.2f} % / {q.idle_pct:.2f} % |",
        f"| Dovecot CPU (master + reaped login/pop3 processes): feed+drain / quiet; per cycle in quiet "
        f"| {dv_run:.1f} s / {dv.get('quiet', 0):.1f} s; "
        f"{dv.get('quiet', 0) / o.quiet_cycles if o.quiet_cycles else 0:.4f} s |",
        "| Kafka broker CPU, whole run | "
        + (f"{o.kafka_cpu_s:.1f} s |" if o.kafka_cpu_s is not None else "(external broker) |"),
        f"| machine CPU busy (all processes, both cores = 100 %): feed+drain / quiet | {fd.machine_pct:.0f} % / "
        f"{q.machine_pct:.0f} % |",
        f"| RSS after imports (before the runner) / at the end | {o.baseline_rss_mb:.0f} MB / {o.end_rss_mb:.0f} MB |",
        f"| threads (max) | {o.threads_max} Python threads |",
        f"| feeder: most behind its schedule / its own CPU (subtracted) | {o.feeder_behind_max:.3f} s / "
        f"{o.feeder_cpu:.2f} s |",
        f"| connector WARNING+ log lines | {o.warnings_logged} |",
        f"| cycle failures by error class | {o.errors or 'none'} |",
        f"| load average before / after | {o.load_before} / {o.load_after} |",
        f"| Dovecot limits (doveconf -a of the bench instance) | {o.limits} |",
        "",
        "CPU by thread group (seconds, from /proc/self/task/*/stat in clock ticks of "
        f"{1000 // CLK_TCK} ms, so rounded; the tables above use getrusage):",
        "",
        f"| thread group | feed+drain ({fd.wall:.0f} s) | quiet ({q.wall:.0f} s) | idle phase ({idle.wall:.0f} s) "
        "| in the run's idle windows |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    groups = sorted(
        set(fd.by_group) | set(q.by_group) | set(idle.by_group) | set(al.idle_by_group),
        key=lambda g: -al.by_group.get(g, 0),
    )
    for g in groups:
        lines.append(
            f"| {g} | {fd.by_group.get(g, 0):.2f} | {q.by_group.get(g, 0):.2f} | {idle.by_group.get(g, 0):.2f} "
            f"| {al.idle_by_group.get(g, 0):.2f} |"
        )
    lines += [
        "",
        "Schedule lag distributions (seconds; runner.lags):",
        "",
        "| cycles | n | p50 | p90 | p99 | max |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        _stats_row("steady state (all but each mailbox's first)", o.lags_steady),
        _stats_row("first cycle of each mailbox (start-up burst)", o.lags_first),
        _stats_row("all", o.lags_all),
        "",
    ]
    if o.profile:
        lines += [
            "cProfile (timer: thread CPU time; profiling overhead inflates every CPU figure of this run):",
            "",
            "```",
            o.profile.strip(),
            "```",
            "",
        ]
    lines += [
        "Machine: " + "; ".join(o.facts) + ".",
        "",
        f"Command: `{o.command}` ({time.strftime('%Y-%m-%d')}).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mailboxes", type=int, default=500)
    ap.add_argument("--minutes", type=float, default=5.0, help="how long mail arrives")
    ap.add_argument("--interval", type=float, default=60.0, help="poll_interval_seconds of every mailbox")
    ap.add_argument("--rate", type=float, default=2.0, help="mails per second, into random mailboxes")
    ap.add_argument("--shards", type=int, default=8, help="ledger shards")
    ap.add_argument("--sessions", type=int, default=32, help="runtime.max_concurrent_sessions")
    ap.add_argument("--per-server", type=int, default=32, help="runtime.max_sessions_per_server")
    ap.add_argument("--jitter", type=float, help="schedule.jitter_seconds of every mailbox (default: the connector's)")
    ap.add_argument(
        "--idle-seconds", type=float, default=30.0, help="at the end: every mailbox paused, idle CPU measured"
    )
    ap.add_argument("--quiet-intervals", type=int, default=1, help="intervals with no mail after the drain")
    ap.add_argument("--drain-timeout", type=float, default=0.0, help="default: 2 intervals + 60 s")
    ap.add_argument("--sample", type=float, default=1.0, help="CPU sampling period, seconds")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--profile",
        type=Path,
        help="cProfile (thread CPU time) the scheduling loop into this file, rounds and sessions into FILE.rounds",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--append",
        metavar="TITLE",
        help="append this run's report to --out as a section with this title (a comparison run)",
    )
    args = ap.parse_args()
    if not args.drain_timeout:
        args.drain_timeout = 2 * args.interval + 60
    command = shlex.join(["python", "bench/many_mailboxes.py", *sys.argv[1:]])

    def on_term(signum: int, _frame: FrameType | None) -> None:
        # once: a second signal must not interrupt the clean-up (stopping Dovecot and Kafka)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # Under /tmp with mode 0755: Dovecot's unprivileged processes must traverse every parent.
    state = Path(tempfile.mkdtemp(prefix="pop3k-many-"))
    state.chmod(0o755)
    try:
        outcome = run_bench(args, state)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    outcome.command = command
    text = report(outcome)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and args.out.exists():
        # a comparison run below the main one: its title becomes a section heading
        body = text.partition("\n")[2].replace("\n## ", "\n### ")
        args.out.write_text(args.out.read_text().rstrip("\n") + f"\n\n---\n\n## {args.append}\n{body}")
    else:
        args.out.write_text(text)
    print(text)
    ok = (
        outcome.missing == 0
        and outcome.duplicates == 0
        and outcome.sent > 0
        and outcome.unexpected == 0
        and outcome.failed_cycles == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
