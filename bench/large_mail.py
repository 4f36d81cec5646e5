#!/usr/bin/env python3
"""Benchmark (issue 6): peak RSS growth of one poll-once cycle for one large mail, per placement.

Target: peak RSS growth (VmHWM of the whole process, librdkafka included) <= 64 MB for a 50 MB
and a 200 MB mail, with attachments ``chunked`` (chunk records on the attachments topic,
exactly-once delivery) and ``offload`` (content-addressed objects in a directory store).

For each mode and each size (``--sizes``, MB = 10^6 bytes), one mail of that size (a text body,
two large base64 attachments, a quoted-printable one and a small inline one) is put into the
Dovecot mailbox of USER, and ``pop3-kafka poll-once`` runs in a FRESH child process
(bench/_rss_child.py): its baseline is VmRSS after importing the connector, its growth is
VmHWM - baseline. While the child runs, this process samples its /proc/PID/status (RssAnon,
RssFile, RssShmem) to say what the peak is made of. The smallest size of each mode is the
baseline run the others are compared with (machines are noisy: ratios and differences, never
absolute times). Every run is verified, or the bench fails: exit 0, "ok: 1 published", the
mailbox and the spool directory empty, the mail record (read_committed) referencing every large
attachment with the right size and SHA-256, and the content itself: for chunked, every chunk
record read back read_committed, in order, hashed; for offload, every object's size and SHA-256.

Uses the local stack when KAFKA_BOOTSTRAP and DOVECOT_TEST_DIR (with POP3S_PORT, POP3_CAFILE)
are set (``eval "$(python deploy/local/localstack.py up)"``); otherwise starts one in a temporary
directory and stops it at the end. Writes bench/results/large_mail.md and large_mail_rss.png
(matplotlib, a bench-only dependency).

    python bench/large_mail.py [--sizes "1 10 50 100 200"] [--modes "chunked offload"] [--repeat 3]
                               [--no-diagnose]

After the measured runs, runs that explain (not in the table): a diagnosis run per mode at the
smallest and the largest size (tracing costs time and memory) says where the growth is: Python's
heap (tracemalloc), librdkafka's queue, the child's mappings by kind (/proc/PID/smaps: anonymous,
heap, spool mapping, shared objects); and the largest size again with glibc's mmap threshold
fixed (MALLOC_MMAP_THRESHOLD_=131072) shows how much is the allocator keeping freed buffers.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deploy" / "local"))

import confluent_kafka  # noqa: E402
from confluent_kafka import Consumer, Message, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402
from localstack import DovecotServer, Stack  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from _rss_child import smaps_by_kind  # noqa: E402

from connector.config.model import AttachmentsConfig  # noqa: E402
from connector.records import decode_single_object  # noqa: E402
from connector.records.content import chunk_schema  # noqa: E402

#: a Dovecot test user no test of the large-mail file (t19, t20) or the crash matrix (t12) uses
USER = "t14"
MAILBOX_ID = "big"
MB = 1_000_000
TARGET_MB = 64.0
CHILD = REPO / "bench" / "_rss_child.py"
RESULTS = REPO / "bench" / "results" / "large_mail.md"
PLOT = REPO / "bench" / "results" / "large_mail_rss.png"
MARKER = "RSS-CHILD "
#: attachments larger than this travel by reference (the default attachments.inline_max_bytes)
INLINE_MAX = AttachmentsConfig().inline_max_bytes


# --------------------------------------------------------------------------- the mail


@dataclass(frozen=True)
class FileFact:
    size: int
    sha256: str


def big_mail(total_mb: int, seed: int) -> tuple[bytes, dict[str, FileFact]]:
    """A mail of about ``total_mb`` MB (LF line ends, as a maildir holds it), built like
    tests/integration/test_large_mail_e2e.py's: a text body, two large base64 attachments
    (55:38), a quoted-printable text attachment and a small one that stays inline. The QP one is
    scaled with the mail (at most 20,000 lines), and the base64 ones fill the rest, so the mail
    is within a few KB of the size asked for. Returns the mail and each attachment's size and
    SHA-256 (the bytes themselves are not kept)."""
    rnd = random.Random(seed)
    budget = total_mb * MB
    lines = max(100, min(20_000, budget // 24 // 20))
    notes = b"".join(
        rnd.choice([b"plain text line with some words\n", b"caf\xc3\xa9 = cr\xc3\xa8me\n"]) for _ in range(lines)
    )
    small = b"a,b,c\n1,2,3\n" * 100
    notes_qp = binascii.b2a_qp(notes, istext=False)
    # base64.encodebytes: 4/3, plus a newline per 76 characters.
    b64_budget = max(0, budget - len(notes_qp) - len(base64.encodebytes(small)) - 2000) / (4 / 3 * 77 / 76)
    files = {
        "scan.pdf": rnd.randbytes(int(b64_budget * 0.55 / 0.93)),
        "drawing.dwg": rnd.randbytes(int(b64_budget * 0.38 / 0.93)),
        "notes.txt": notes,
        "small.csv": small,
    }
    parts = [
        b"From: Sender <sender@example.com>\nTo: ops@example.com\nSubject: large "
        + str(total_mb).encode()
        + b" MB\nMessage-ID: <large-bench-"
        + str(seed).encode()
        + b'@example.com>\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="=_b"\n\n'
        b"--=_b\nContent-Type: text/plain; charset=utf-8\n\nPlease find the files attached.\n"
    ]
    for name, data in files.items():
        if name == "notes.txt":
            enc, cte = notes_qp, b"quoted-printable"
        else:
            enc, cte = base64.encodebytes(data), b"base64"
        parts.append(
            b'--=_b\nContent-Type: application/octet-stream\nContent-Disposition: attachment; filename="'
            + name.encode()
            + b'"\nContent-Transfer-Encoding: '
            + cte
            + b"\n\n"
            + enc
            + (b"" if enc.endswith(b"\n") else b"\n")
        )
    parts.append(b"--=_b--\n")
    facts = {name: FileFact(len(data), hashlib.sha256(data).hexdigest()) for name, data in files.items()}
    return b"".join(parts), facts


# --------------------------------------------------------------------------- the child


@dataclass
class Sampled:
    """What /proc/PID/status said while the child ran (sampled, so a short spike can be missed;
    VmHWM from the child itself is exact)."""

    samples: int = 0
    peak_rss_kb: int = 0
    #: RssAnon / RssFile / RssShmem at the sample with the highest VmRSS
    at_peak: dict[str, int] = field(default_factory=dict)
    max_anon_kb: int = 0
    max_file_kb: int = 0
    max_threads: int = 0
    #: diagnosis runs: /proc/PID/smaps by kind of mapping at the highest total RSS sampled
    smaps_peak: dict[str, dict[str, int]] = field(default_factory=dict)


def _read_status(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
            out[key] = int(rest.split()[0])
    return out if "VmRSS" in out else None


def sample(pid: int, done: threading.Event, into: Sampled, interval: float = 0.01) -> None:
    while not done.is_set():
        st = _read_status(pid)
        if st is not None:
            into.samples += 1
            into.max_anon_kb = max(into.max_anon_kb, st.get("RssAnon", 0))
            into.max_file_kb = max(into.max_file_kb, st.get("RssFile", 0))
            into.max_threads = max(into.max_threads, st.get("Threads", 0))
            if st["VmRSS"] > into.peak_rss_kb:
                into.peak_rss_kb = st["VmRSS"]
                into.at_peak = {k: st.get(k, 0) for k in ("RssAnon", "RssFile", "RssShmem")}
        done.wait(interval)


def sample_smaps(pid: int, done: threading.Event, into: Sampled, interval: float = 0.03) -> None:
    """Diagnosis: the child's mappings by kind, kept at the highest total RSS seen."""
    best = 0
    while not done.is_set():
        try:
            kinds = smaps_by_kind(pid)
        except OSError:
            kinds = {}
        total = sum(k["rss"] for k in kinds.values())
        if total > best:
            best, into.smaps_peak = total, kinds
        done.wait(interval)


def run_child(
    cfg: Path, env: dict[str, str], workdir: Path, timeout: float, *, diagnose: bool = False
) -> tuple[dict[str, Any], Sampled, str]:
    """poll-once in a fresh ``python bench/_rss_child.py``; (its JSON line, the samples, stdout)."""
    out_path, err_path = workdir / "child.out", workdir / "child.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(cfg)], stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL
        )
        done = threading.Event()
        sampled = Sampled()
        threads = [threading.Thread(target=sample, args=(proc.pid, done, sampled), daemon=True)]
        if diagnose:
            threads.append(threading.Thread(target=sample_smaps, args=(proc.pid, done, sampled), daemon=True))
        for t in threads:
            t.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise BenchError(f"poll-once did not finish in {timeout:.0f}s") from None
        finally:
            done.set()
            for t in threads:
                t.join()
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    lines = [ln for ln in stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise BenchError(f"child exited {proc.returncode} without a result; stderr: {stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len(MARKER) :])
    if result["exit"] != 0:
        raise BenchError(f"poll-once exited {result['exit']}: {stderr[-3000:]}")
    return result, sampled, stdout


class BenchError(RuntimeError):
    """A run that did not deliver (or could not be measured): the bench fails, no data point."""


# --------------------------------------------------------------------------- verification


def _consumer(bootstrap: str, topic: str) -> Consumer:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    md = c.list_topics(topic, timeout=15)
    tmd = md.topics.get(topic)
    if tmd is None or tmd.error is not None:
        c.close()
        raise BenchError(f"topic {topic!r} does not exist")
    c.assign([TopicPartition(topic, p, -2) for p in sorted(tmd.partitions)])
    return c


def _value(m: Message) -> bytes:
    v = m.value()
    if v is None:
        raise BenchError(f"a tombstone at {m.topic()}/{m.partition()}@{m.offset()}")
    return v


def read_mail_record(bootstrap: str, topic: str, timeout: float = 60.0) -> tuple[bytes | None, dict[str, Any]]:
    """The one committed mail record on ``topic`` (and no second one within 2 s)."""
    c = _consumer(bootstrap, topic)
    try:
        got: list[tuple[bytes | None, dict[str, Any]]] = []
        deadline, settle = time.monotonic() + timeout, None
        while time.monotonic() < deadline and (settle is None or time.monotonic() < settle):
            m = c.poll(0.2)
            if m is None or m.error():
                continue
            got.append((m.key(), decode_single_object(_value(m))))
            settle = settle or time.monotonic() + 2.0
    finally:
        c.close()
    if len(got) != 1:
        raise BenchError(f"{len(got)} committed mail records on {topic!r}, expected 1")
    return got[0]


def check_refs(record: dict[str, Any], files: dict[str, FileFact], mode: str) -> dict[str, dict[str, Any]]:
    """The record's attachments: all there with the right size and SHA-256; those over
    ``attachments.inline_max_bytes`` by a ``mode`` reference, the others inline."""
    atts = {a["filename"]: a for a in record["attachments"]}
    if set(atts) != set(files):
        raise BenchError(f"attachments {sorted(atts)} in the record, expected {sorted(files)}")
    refs: dict[str, dict[str, Any]] = {}
    for name, fact in files.items():
        a, ref = atts[name], atts[name]["ref"]
        if a["size"] != fact.size or a["sha256"] != fact.sha256:
            raise BenchError(f"{name}: the record says {a['size']} bytes sha256 {a['sha256']}, expected {fact}")
        if fact.size <= INLINE_MAX:
            if ref is not None or a["data"] is None or hashlib.sha256(a["data"]).hexdigest() != fact.sha256:
                raise BenchError(f"{name} ({fact.size} bytes) should travel inline")
            continue
        if ref is None or ref["placement"] != mode:
            raise BenchError(f"{name}: expected a {mode} reference, got {ref!r}")
        if ref["size"] != fact.size or ref["sha256"] != fact.sha256:
            raise BenchError(f"{name}: reference {ref!r} does not match the attachment")
        refs[name] = ref
    if not refs:
        raise BenchError("no attachment travelled by reference: the mail is too small to test anything")
    return refs


def verify_chunks(
    bootstrap: str, topic: str, key: bytes | None, refs: dict[str, dict[str, Any]], timeout: float = 300.0
) -> int:
    """Read every committed chunk record of ``topic`` (one partition: in order), hash each
    content as it streams by, and check it against its reference. Returns the chunk count."""
    schema = chunk_schema()
    by_id = {ref["id"]: ref for ref in refs.values()}
    expected = sum(int(ref["chunks"]) for ref in by_id.values())
    state: dict[str, tuple[Any, int, int]] = {}  # content id -> (sha256 object, next index, bytes)
    seen = 0
    c = _consumer(bootstrap, topic)
    try:
        deadline, settle = time.monotonic() + timeout, None
        while time.monotonic() < deadline and (settle is None or time.monotonic() < settle):
            m = c.poll(0.2)
            if m is None or m.error():
                continue
            rec = decode_single_object(_value(m), {schema.fingerprint: schema})
            cid = rec["content_id"]
            if cid not in by_id:
                raise BenchError(f"chunk of unknown content {cid!r} on {topic!r}")
            if m.key() != key:
                raise BenchError(f"chunk of {cid!r} has key {m.key()!r}, the mail record {key!r}")
            h, nxt, size = state.get(cid, (hashlib.sha256(), 0, 0))
            if rec["index"] != nxt or rec["offset"] != size:
                raise BenchError(f"{cid!r}: chunk {rec['index']} at {rec['offset']}, expected {nxt} at {size}")
            h.update(rec["data"])
            state[cid] = (h, nxt + 1, size + len(rec["data"]))
            seen += 1
            if seen == expected:
                settle = time.monotonic() + 2.0  # duplicates beyond the expected count show up too
    finally:
        c.close()
    if seen != expected:
        raise BenchError(f"{seen} committed chunk records on {topic!r}, expected {expected}")
    for cid, ref in by_id.items():
        h, count, size = state.get(cid, (hashlib.sha256(), 0, 0))
        if count != ref["chunks"] or size != ref["size"] or h.hexdigest() != ref["sha256"]:
            raise BenchError(f"{cid!r}: {count} chunks / {size} bytes do not rebuild {ref!r}")
    return seen


def verify_objects(objects: Path, refs: dict[str, dict[str, Any]]) -> int:
    """Every offloaded object exists at its URI with the reference's size and SHA-256."""
    for name, ref in refs.items():
        path = objects / "sha256" / ref["sha256"]
        if ref["uri"] != path.as_uri() or not path.is_file():
            raise BenchError(f"{name}: object {ref['uri']} missing (expected {path})")
        h = hashlib.sha256()
        with path.open("rb") as f:
            while piece := f.read(1 << 20):
                h.update(piece)
        if path.stat().st_size != ref["size"] or h.hexdigest() != ref["sha256"]:
            raise BenchError(f"{name}: object {path} has the wrong size or content")
    return len(refs)


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    mode: str
    size_mb: int
    mail_bytes: int
    baseline_kb: int
    hwm_kb: int
    rss_end_kb: int
    wall_s: float
    sampled: Sampled
    delivered: str  # e.g. "417 chunks" / "3 objects"
    baseline_anon_kb: int = 0
    baseline_file_kb: int = 0
    #: diagnosis runs only: the child's JSON (tracemalloc peak, librdkafka queue, baseline smaps)
    diag: dict[str, Any] | None = None

    @property
    def growth_kb(self) -> int:
        return self.hwm_kb - self.baseline_kb

    @property
    def mb_per_s(self) -> float:
        return self.mail_bytes / MB / self.wall_s


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Best effort: the chunk records of a 200 MB mail need not stay on the broker's disk."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 4})
    existing = set(admin.list_topics(timeout=15).topics)
    doomed = [t for t in topics if t in existing]
    for fut in admin.delete_topics(doomed, operation_timeout=30).values() if doomed else []:
        try:
            fut.result(timeout=60)
        except Exception as exc:
            print(f"  (could not delete a topic: {exc})", file=sys.stderr)


def one_run(
    *,
    mode: str,
    size_mb: int,
    seed: int,
    bootstrap: str,
    dove: DovecotServer,
    cafile: str,
    tag: str,
    diagnose: bool = False,
    client: dict[str, str] | None = None,
    child_env: dict[str, str] | None = None,
) -> Run:
    if dove.count(USER):
        raise BenchError(f"the mailbox of {USER} is not empty before the run")
    raw, files = big_mail(size_mb, seed)
    mail_bytes = len(raw)
    dove.put(USER, raw)
    del raw
    topic = f"bench-large-{tag}-{mode}-{size_mb}-{seed}"
    work = Path(tempfile.mkdtemp(prefix="pop3k-bench-large-"))
    try:
        spool, objects = work / "spool", work / "objects"
        spool.mkdir()
        objects.mkdir()
        mailbox: dict[str, Any] = {
            "id": MAILBOX_ID,
            "host": "127.0.0.1",
            "port": dove.pop3s_port,
            "tls": "implicit",
            "tls_ca_file": cafile,
            "username": USER,
            "password": {"env": "PW_BIG"},
            "poll_interval_seconds": 1,
            "attachments": {"placement": mode},
            "max_message_bytes": max(400 * MB, 2 * mail_bytes),
            "max_bytes_per_cycle": max(512 * MB, 3 * mail_bytes),
            "max_seconds_per_cycle": 60,
        }
        doc: dict[str, Any] = {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "delivery_timeout_seconds": 60,
                **({"client": client} if client else {}),
            },
            "topics": {"mail": topic, "partitions": 1},
            "ledger": {"topic": f"bench-large-{tag}.ledger"},
            "delivery": {"mode": "exactly_once", "transactional_id_prefix": f"bench-large-{tag}"},
            "runtime": {"spool_directory": str(spool)},
            "mailboxes": [mailbox],
        }
        if mode == "offload":
            doc["offload"] = {"kind": "filesystem", "directory": str(objects)}
        cfg = work / "config.yaml"
        cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
        env = {**os.environ, **(child_env or {}), "PW_BIG": f"{USER}-pw"}
        env.pop("POP3K_FAULT", None)
        if diagnose:
            env["POP3K_BENCH_DIAGNOSE"] = "1"
        result, sampled, stdout = run_child(cfg, env, work, timeout=900, diagnose=diagnose)

        # Delivered, or this run is a failure of the bench.
        if f"{MAILBOX_ID}: ok: 1 published" not in stdout:
            raise BenchError(f"poll-once did not publish the mail: {stdout[-2000:]}")
        if dove.count(USER) != 0:
            raise BenchError(f"the mail is still in {USER}'s mailbox after poll-once")
        if any(spool.iterdir()):
            raise BenchError(f"spool directory {spool} not empty")
        key, record = read_mail_record(bootstrap, topic)
        refs = check_refs(record, files, mode)
        if mode == "chunked":
            delivered = f"{verify_chunks(bootstrap, f'{topic}.attachments', key, refs)} chunks"
        else:
            delivered = f"{verify_objects(objects, refs)} objects"
        return Run(
            mode=mode,
            size_mb=size_mb,
            mail_bytes=mail_bytes,
            baseline_kb=result["baseline_rss_kb"],
            hwm_kb=result["hwm_kb"],
            rss_end_kb=result["rss_end_kb"],
            wall_s=result["wall_s"],
            sampled=sampled,
            delivered=delivered,
            baseline_anon_kb=result["baseline_anon_kb"],
            baseline_file_kb=result["baseline_file_kb"],
            diag=result if diagnose else None,
        )
    finally:
        dove.clear(USER)
        shutil.rmtree(work, ignore_errors=True)
        delete_topics(bootstrap, [topic, f"{topic}.attachments", f"{topic}.dlq"])


# --------------------------------------------------------------------------- report


def mb(kb: float) -> float:
    """KiB (as /proc reports them) to MB (10^6 bytes, the unit of the target)."""
    return kb * 1024 / MB


@dataclass
class Row:
    mode: str
    size_mb: int
    runs: list[Run]

    @property
    def worst(self) -> Run:
        return max(self.runs, key=lambda r: r.growth_kb)

    @property
    def wall(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def mail_bytes(self) -> int:
        return self.runs[0].mail_bytes


def build_rows(runs: list[Run]) -> list[Row]:
    rows: dict[tuple[str, int], Row] = {}
    for r in runs:
        rows.setdefault((r.mode, r.size_mb), Row(r.mode, r.size_mb, [])).runs.append(r)
    return list(rows.values())


def machine_facts() -> str:
    return (
        f"{os.cpu_count()} CPUs ({platform.machine()}, Linux {platform.release()}), Python "
        f"{platform.python_version()}, confluent-kafka {_version(confluent_kafka.version())}, "
        f"librdkafka {_version(confluent_kafka.libversion())}"
    )


def _version(v: object) -> str:
    """confluent_kafka's version()/libversion(): a (str, int) pair, or a str in some releases."""
    return str(v[0]) if isinstance(v, tuple) else str(v)


def report(rows: list[Row], diag: list[Run], malloc: list[Row], command: str) -> str:
    base: dict[str, Row] = {}
    for row in rows:
        if row.mode not in base or row.size_mb < base[row.mode].size_mb:
            base[row.mode] = row
    table = [
        "| mode | mail MB | mail bytes | wall s | MB/s | baseline RSS MB | peak RSS MB | growth MB "
        "| growth over the smallest run MB | sampled peak: anon / file growth MB | threads "
        "| delivered (verified) | <= 64 MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        w = row.worst
        b = base[row.mode].worst
        over = "(baseline)" if row is base[row.mode] else f"{mb(w.growth_kb - b.growth_kb):+.1f}"
        ap = w.sampled.at_peak
        growths = ", ".join(f"{mb(r.growth_kb):.1f}" for r in row.runs)
        table.append(
            f"| {row.mode} | {row.size_mb} | {row.mail_bytes:,} | {row.wall:.2f} | {row.mail_bytes / MB / row.wall:.1f}"
            " "
            f"| {mb(w.baseline_kb):.1f} | {mb(w.hwm_kb):.1f} | **{mb(w.growth_kb):.1f}**"
            + (f" ({growths})" if len(row.runs) > 1 else "")
            + f" | {over} | {mb(ap.get('RssAnon', 0) - w.baseline_anon_kb):+.1f} / "
            f"{mb(ap.get('RssFile', 0) - w.baseline_file_kb):+.1f} "
            f"| {w.sampled.max_threads} | {w.delivered} | {'pass' if mb(w.growth_kb) <= TARGET_MB else 'FAIL'} |"
        )
    target_rows = [r for r in rows if r.size_mb in (50, 200)]
    if not target_rows:
        verdict = "No 50 or 200 MB run: the target was not tested"
    else:
        verdict = (
            "**Target met**: "
            if all(mb(r.worst.growth_kb) <= TARGET_MB for r in target_rows)
            else "**Target NOT met**: "
        ) + ", ".join(f"{r.mode} {r.size_mb} MB: {mb(r.worst.growth_kb):.1f} MB" for r in target_rows)
    lines = [
        "# Large mail: peak RSS of one poll-once cycle (issue 6)",
        "",
        "One mail of each size (MB = 10^6 bytes; a text body, two random base64 attachments 55:38, a "
        "quoted-printable text attachment, a 1.2 KB CSV that stays inline) in a Dovecot mailbox, "
        "fetched over POP3S by `pop3-kafka poll-once` with delivery exactly_once, in a fresh child process "
        "(bench/_rss_child.py). **baseline RSS**: the child's VmRSS after importing the connector "
        "(VmHWM reset there); **peak RSS**: its VmHWM when poll-once returned (the whole process: "
        "Python, librdkafka, OpenSSL, mapped spool pages); **growth** = peak - baseline, compared "
        f"with the target of {TARGET_MB:.0f} MB (10^6 bytes, stricter than MiB); with several repeats "
        "the worst one counts (all listed). **growth over the smallest run**: minus the growth of the "
        "same mode's smallest mail, i.e. what the size adds. **sampled peak**: RssAnon and RssFile "
        "minus their baseline values, at the highest VmRSS that the parent sampled from "
        "/proc/PID/status every 10 ms (a short spike can be missed; VmHWM is exact). **wall s**: the "
        "child's poll-once call (connect, topic checks, init_transactions, ledger load, RETR, decode, "
        "produce or offload, commit, DELE; median of repeats), and MB/s of mail over it, so the fixed "
        "cost dominates small mails. Every run is verified before it counts: exit 0, the mailbox and "
        "the spool directory empty, the mail record (read_committed) with every attachment's size and "
        "SHA-256, those over 256 KiB by reference (the 1 MB mail's QP part stays inline), and the "
        "content: chunked, every chunk record read back read_committed, in order, hashed against the "
        "reference; offload, every object's size and SHA-256 in the directory store.",
        "",
        *table,
        "",
        verdict + ".",
        "",
        f"![peak RSS growth by mail size]({PLOT.name})",
        "",
    ]
    if diag:
        lines += diagnosis(diag)
    if malloc:
        lines += allocator_check(rows, malloc)
    lines += [
        f"Machine: {machine_facts()}. Producer queue: `queue.buffering.max.kbytes` "
        f"{_queue_kbytes()} KiB (connector/delivery/kafka.py), chunk records of "
        f"{_chunk_bytes() // 1024} KiB.",
        "",
        f"Command: `{command}` (on {time.strftime('%Y-%m-%d')}).",
        "",
    ]
    return "\n".join(lines)


def diagnosis(runs: list[Run]) -> list[str]:
    """Where the growth is, from the diagnosis runs (tracemalloc, librdkafka queue, smaps)."""
    out = [
        "## Where the memory goes (diagnosis runs)",
        "",
        "One more run per mode at the smallest and the largest size with POP3K_BENCH_DIAGNOSE=1: "
        "tracemalloc on in the "
        "child, librdkafka's queue watched (`len(producer)` every 10 ms, statistics `msg_size` every "
        "second), and /proc/PID/smaps read by the parent every 30 ms, summed by kind of mapping; the "
        "table compares the smaps sample with the highest RSS with the child's own smaps at the "
        "baseline. Tracing costs time and memory of its own, so these runs are not in the table above.",
        "",
    ]
    for r in runs:
        d = r.diag or {}
        base_smaps: dict[str, dict[str, int]] = d.get("baseline_smaps", {})
        peak_smaps = r.sampled.smaps_peak
        kinds = sorted(
            set(base_smaps) | set(peak_smaps),
            key=lambda k: -(peak_smaps.get(k, {}).get("rss", 0) - base_smaps.get(k, {}).get("rss", 0)),
        )
        total_b = sum(v["rss"] for v in base_smaps.values())
        total_p = sum(v["rss"] for v in peak_smaps.values())
        out += [
            f"**{r.mode}, {r.size_mb} MB** ({r.delivered}): VmHWM growth {mb(r.growth_kb):.1f} MB; Python "
            f"heap peak (tracemalloc) {mb(d.get('py_traced_peak_kb', 0)):.1f} MB; librdkafka held at most "
            f"{d.get('rdkafka_max_outq', 0)} records at once (its statistics, once a second: at most "
            f"{mb(d.get('rdkafka_max_msg_size_kb', 0)):.1f} MB queued).",
            "",
            "| mapping kind | RSS at baseline MB | RSS at sampled peak MB | growth MB | of which anonymous MB |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for k in kinds:
            b, p = base_smaps.get(k, {"rss": 0, "anon": 0}), peak_smaps.get(k, {"rss": 0, "anon": 0})
            if max(b["rss"], p["rss"]) < 100:
                continue
            out.append(
                f"| {k} | {mb(b['rss']):.1f} | {mb(p['rss']):.1f} | {mb(p['rss'] - b['rss']):+.1f} "
                f"| {mb(p['anon'] - b['anon']):+.1f} |"
            )
        out += [f"| total | {mb(total_b):.1f} | {mb(total_p):.1f} | {mb(total_p - total_b):+.1f} | |", ""]
    return out


def allocator_check(rows: list[Row], malloc: list[Row]) -> list[str]:
    """The same runs with glibc's mmap threshold fixed: how much of the growth is the allocator
    keeping freed buffers rather than live data."""
    out = [
        "## Allocator check",
        "",
        "The largest size again with `MALLOC_MMAP_THRESHOLD_=131072` in the child's environment. glibc "
        "raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), so after the "
        "first 512 KiB chunk buffer is freed the later ones come from the thread arenas, whose freed "
        "space stays resident; a fixed threshold keeps every block of 128 KiB or more in its own "
        "mapping, unmapped when freed. The difference is memory glibc holds for reuse, not live data.",
        "",
        "| mode | mail MB | growth MB, default | growth MB, MALLOC_MMAP_THRESHOLD_=131072 | difference MB |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    default = {(r.mode, r.size_mb): r for r in rows}
    for m in malloc:
        d = default.get((m.mode, m.size_mb))
        if d is None:
            continue
        dg, mg = mb(d.worst.growth_kb), mb(m.worst.growth_kb)
        out.append(
            f"| {m.mode} | {m.size_mb} | {dg:.1f} ({', '.join(f'{mb(r.growth_kb):.1f}' for r in d.runs)}) "
            f"| {mg:.1f} ({', '.join(f'{mb(r.growth_kb):.1f}' for r in m.runs)}) | {mg - dg:+.1f} |"
        )
    return [*out, ""]


def _queue_kbytes() -> int:
    from connector.delivery.kafka import QUEUE_KBYTES

    return QUEUE_KBYTES


def _chunk_bytes() -> int:
    from connector.config.model import TopicsConfig

    return TopicsConfig(mail="x").chunk_bytes


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for mode, marker in (("chunked", "o"), ("offload", "s")):
        pts = sorted((r.size_mb, mb(r.worst.growth_kb)) for r in rows if r.mode == mode)
        if not pts:
            continue
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{mode} (worst run)")
        every = [(r.size_mb, mb(run.growth_kb)) for r in rows if r.mode == mode for run in r.runs]
        if len(every) > len(pts):
            ax.scatter([p[0] for p in every], [p[1] for p in every], marker=marker, color=line.get_color(), alpha=0.3)
    ax.axhline(TARGET_MB, linestyle="--", color="red", label=f"target {TARGET_MB:.0f} MB")
    ax.set_xlabel("mail size (MB)")
    ax.set_ylabel("peak RSS growth (MB, VmHWM - baseline)")
    ax.set_title("pop3-kafka poll-once: peak RSS growth for one large mail")
    ax.set_ylim(bottom=0, top=max([TARGET_MB * 1.25] + [mb(r.worst.growth_kb) * 1.1 for r in rows]))
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, machine_facts(), fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", default="1 10 50 100 200", help="mail sizes in MB (10^6 bytes), smallest = baseline")
    ap.add_argument("--modes", default="chunked offload")
    ap.add_argument("--repeat", type=int, default=3, help="runs per mode and size; the worst growth counts")
    ap.add_argument(
        "--no-diagnose",
        action="store_true",
        help="skip the explaining runs (tracemalloc + smaps at the smallest and largest size; allocator check)",
    )
    ap.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="experiments: a librdkafka setting for kafka.client, e.g. compression.type=none (repeatable)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--plot", type=Path, default=PLOT)
    args = ap.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split()})
    modes = args.modes.split()
    if not set(modes) <= {"chunked", "offload"} or not sizes or args.repeat < 1:
        ap.error("--modes: chunked and/or offload; --sizes: at least one; --repeat >= 1")
    try:  # before minutes of runs, not after
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is missing (a bench-only dependency): .venv/bin/pip install matplotlib", file=sys.stderr)
        return 2

    stack: Stack | None = None
    if os.environ.get("KAFKA_BOOTSTRAP") and os.environ.get("DOVECOT_TEST_DIR"):
        bootstrap = os.environ["KAFKA_BOOTSTRAP"]
        dove = DovecotServer(
            Path(os.environ["DOVECOT_TEST_DIR"]),
            pop3_port=int(os.environ["POP3_PORT"]),
            pop3s_port=int(os.environ["POP3S_PORT"]),
        )
        cafile = os.environ.get("POP3_CAFILE") or str(dove.cafile)
    else:
        d = Path(tempfile.mkdtemp(prefix="pop3k-bench-"))
        d.chmod(0o755)
        stack = Stack.at(d)
        print(f"starting a local stack in {d}", flush=True)
        stack.up()
        bootstrap, dove, cafile = stack.kafka.bootstrap, stack.dovecot, str(stack.dovecot.cafile)
    tag = uuid.uuid4().hex[:8]
    runs: list[Run] = []
    diag: list[Run] = []
    malloc: list[Run] = []
    try:
        if dove.count(USER):
            print(f"{dove.maildir(USER)} is not empty; refusing to benchmark on someone else's mail", file=sys.stderr)
            return 2
        # (mode, size, repeat, kind): "measure" rows the table; "diagnose" and "malloc" only explain.
        plan = [(m, s, rep, "measure") for m in modes for s in sizes for rep in range(args.repeat)]
        if not args.no_diagnose:
            plan += [(m, s, args.repeat, "diagnose") for m in modes for s in sorted({sizes[0], sizes[-1]})]
            plan += [(m, sizes[-1], rep, "malloc") for m in modes for rep in range(args.repeat)]
        for mode, size, rep, kind in plan:
            r = one_run(
                mode=mode,
                size_mb=size,
                seed=size * 100 + rep,
                bootstrap=bootstrap,
                dove=dove,
                cafile=cafile,
                tag=tag,
                diagnose=kind == "diagnose",
                client=dict(kv.split("=", 1) for kv in args.client),
                child_env={"MALLOC_MMAP_THRESHOLD_": "131072"} if kind == "malloc" else None,
            )
            {"measure": runs, "diagnose": diag, "malloc": malloc}[kind].append(r)
            ap_ = r.sampled.at_peak
            print(
                f"{mode:8} {size:4} MB {kind if kind != 'measure' else f'#{rep + 1}':8}: {r.wall_s:6.2f} s "
                f"{r.mb_per_s:6.1f} MB/s  baseline {mb(r.baseline_kb):5.1f} MB  peak {mb(r.hwm_kb):6.1f} MB  "
                f"growth {mb(r.growth_kb):6.1f} MB  (sampled peak anon {mb(ap_.get('RssAnon', 0)):.1f} / file "
                f"{mb(ap_.get('RssFile', 0)):.1f} MB, {r.sampled.samples} samples)  {r.delivered}",
                flush=True,
            )
        delete_topics(bootstrap, [f"bench-large-{tag}.ledger"])
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if stack is not None:
            stack.down()
            shutil.rmtree(stack.dir, ignore_errors=True)
    rows = build_rows(runs)
    command = " ".join(["python", "bench/large_mail.py", *sys.argv[1:]])
    text = report(rows, diag, build_rows(malloc), command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    plot(rows, args.plot)
    print(text)
    print(f"wrote {args.out} and {args.plot}")
    return 0 if all(mb(r.worst.growth_kb) <= TARGET_MB for r in rows if r.size_mb in (50, 200)) else 1


if __name__ == "__main__":
    sys.exit(main())
