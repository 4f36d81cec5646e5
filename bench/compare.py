#!/usr/bin/env python3
"""Issue 10: the connector side by side with the limits and with its peers, in one run.

For every workload, every tool below does the same job on the same mail, each tool in a process
of its own, interleaved: run r takes the tools in round-robin order starting at tool r, so noise
on the machine spreads over all of them. Before every run of a POP3 tool the workload's mail is
put into the mailbox(es) again (every run deletes it).

  raw            the retrieval limit: one pipelined RETR of every mail over TLS to /dev/null, then
                 pipelined DELE + QUIT (bench/peers.py raw; bench/pop3_retr.py's technique)
  produce-idem   the broker's produce limit: an idempotent producer (the connector's client
                 settings: linger.ms 5, zstd, acks=all) sends the same bytes as the mail (values of
                 at most 512 KiB, the chunk size) to a fresh topic and waits for every ack
  produce-txn    the same in one transaction (init_transactions, begin, produce, commit)
  poplib         stdlib poplib: POP3_SSL, RETR + DELE of each mail in turn, QUIT
  getmail6       getmail6 from PyPI (its own venv, ~/.cache/pop3-kafka/bench-venv):
                 SimplePOP3SSLRetriever verifying the test CA, delete = true, into a Maildir
  fetchmail      Debian's fetchmail: ssl + sslcertck against the test CA, nokeep, fetchall, each
                 mail appended to a BSMTP file (no MTA involved), a private HOME for its files;
                 `auth password` (USER/PASS: its default tries AUTH NTLM first, which this Dovecot
                 answers through a Python helper, a second per mailbox that is not fetchmail's)
  eos-decode     `pop3-kafka poll-once`: exactly-once, full decode (the default)
  alo-decode     the same with delivery.mode at_least_once
  eos-raw        exactly-once with mime_decoding: false (raw passthrough)
  alo-raw        at-least-once raw passthrough
  decode-only    decode_mail + record + Avro encoding of the same bytes in memory, the connector's
                 CPU floor for the mix (bench/pipeline.py's "decode", with the mailbox's options)

Measured from outside, the same for every tool: wall time from spawn to exit; user+sys CPU from
os.wait4() (the tool's reaped children included); peak RSS as ru_maxrss seen by GNU time, which
forks the tool from its own small image (a child of this Python process would inherit its
high-water RSS through exec). The Python children also report their in-process time (the job
without interpreter start and imports) and their VmHWM growth: VmHWM at the end minus VmRSS after
their imports (VmHWM reset there through /proc/self/clear_refs); for the connector that is
bench/_rss_child.py's measure (issue 6), run as the console script runs poll-once (it imports as it
goes and opens its first POP3 sessions before the Kafka side is imported; the baseline is taken
once its eager imports are done). Each run records a fingerprint of connector/**/*.py, and
the report says when the code under test changed during the measurement.

Every run is verified or the benchmark fails (exit 1, nothing written): the mailboxes are empty
after each POP3 tool; raw/poplib retrieved N mails; getmail6 wrote N files into its Maildir;
fetchmail wrote N messages into its BSMTP file; the connector printed N published and N deleted,
N committed records with N distinct record ids are on the mail topic (read_committed), the
dead-letter topic is empty, and on S/MIME mail every record says it was decrypted; the producers
had every record acknowledged and the topic's offsets hold them; decode-only encoded N records.

Workloads (``--workload``, repeatable; default all; ``--scale`` shrinks the counts):

  small20k  2,000 mails of the ~24 KB realistic mix of bench/parsers.py (build_mail)
  mb1       200 mails of ~1 MB (a text body and a base64 attachment)
  mb50      5 mails of 50 MB (bench/large_mail.py's big_mail)
  many      500 mailboxes x 10 mails of the mix; raw uses 4 sessions at once (the connector's
            default max_sessions_per_server); poplib one session after another; getmail6 one
            invocation with 500 --rcfile; fetchmail one invocation with a 500-poll rc file
  smime     200 mails of the mix, S/MIME-encrypted (openssl cms, AES-256) to a key the
            connector (and decode-only) are given; the peers just retrieve them

Kafka: KAFKA_BOOTSTRAP's broker, or one started here. Dovecot: always a private instance in a
temporary directory (localstack's DovecotServer, as bench/many_mailboxes.py does), because the
users needed (cmp1, mm1..mm500) are not the fixed test users; topics are created before each
connector run (deployments have them) and deleted after its verification.

    python bench/compare.py                                  # everything, 5 runs (results in bench/results)
    python bench/compare.py --workload small20k --runs 1 --scale 0.01 --results-dir /tmp/x
    python bench/compare.py --runs 5                       # `make bench`, ~35 min
    python bench/compare.py --render bench/results/compare.json   # the report again, no measuring
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import email.policy
import functools
import hashlib
import json
import math
import os
import platform
import pwd
import random
import re
import shlex
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path[:0] = [str(REPO), str(REPO / "deploy" / "local"), str(BENCH), str(REPO / "tests")]

import confluent_kafka  # noqa: E402
from confluent_kafka import Consumer, KafkaError, TopicPartition  # noqa: E402
from large_mail import _version, big_mail, delete_topics  # noqa: E402
from localstack import CACHE, DOVECOT_BIN, DovecotServer, KafkaNode  # noqa: E402
from parsers import build_mail, paragraph_text  # noqa: E402

import connector  # noqa: E402
from connector.config import load_config  # noqa: E402
from connector.delivery.admin import ensure_ledger_topic, ensure_topic  # noqa: E402
from connector.records import decode_single_object  # noqa: E402

RESULTS = BENCH / "results"
PEERS = BENCH / "peers.py"
MB = 1_000_000
MIB = 1 << 20
PASSWORD = "cmp-pw"
CHUNK_BYTES = 512 * 1024  # topics.chunk_bytes' default: the produce limit's largest value
RSS_TARGET_MB = 64.0  # issue 10: VmHWM growth, MB = 10^6 bytes (stricter than MiB)
CHILD_TIMEOUT = 1800.0
GNU_TIME = os.environ.get("GNU_TIME", "/usr/bin/time")  # Debian's package "time"
BENCH_VENV = Path(os.environ.get("POP3K_BENCH_VENV", CACHE / "bench-venv"))

#: name -> what it is (the order of the tables)
TOOLS: dict[str, str] = {
    "raw": "retrieval limit: pipelined RETR + DELE over TLS, to /dev/null",
    "produce-idem": "produce limit: idempotent producer, same bytes",
    "produce-txn": "produce limit: transactional producer, same bytes",
    "poplib": "stdlib poplib RETR + DELE",
    "getmail6": "getmail6 into a Maildir, delete",
    "fetchmail": "fetchmail into a BSMTP file, nokeep, auth password",
    "eos-decode": "connector exactly-once, full decode",
    "eos-decode-1p": "the same, decoding in the cycle thread (runtime.decode_processes: 0)",
    "alo-decode": "connector at-least-once, full decode",
    "eos-raw": "connector exactly-once, raw passthrough",
    "alo-raw": "connector at-least-once, raw passthrough",
    "decode-only": "decode + record + Avro in memory",
}
POP3_TOOLS = (
    "raw",
    "poplib",
    "getmail6",
    "fetchmail",
    "eos-decode",
    "eos-decode-1p",
    "alo-decode",
    "eos-raw",
    "alo-raw",
)
CONNECTOR_TOOLS = ("eos-decode", "eos-decode-1p", "alo-decode", "eos-raw", "alo-raw")
PEER_TOOLS = ("poplib", "getmail6", "fetchmail")
WORKLOADS = ("small20k", "mb1", "mb50", "many", "smime")


class BenchError(RuntimeError):
    """A run that did not do the whole job, or could not be measured: the benchmark fails."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the mail


@dataclass
class Workload:
    name: str
    title: str
    #: mail as a maildir holds it (LF line ends), and its mailbox
    mails: list[bytes]
    boxes: list[str]
    #: S/MIME: the PEM key + certificate the connector decrypts with
    smime_key: Path | None = None

    @property
    def users(self) -> list[str]:
        return list(dict.fromkeys(self.boxes))

    @property
    def n(self) -> int:
        return len(self.mails)

    @functools.cached_property
    def wire_bytes(self) -> int:
        """Bytes as POP3 delivers them (CRLF line ends, unstuffed): MB/s is counted in these."""
        return sum(len(m) + m.count(b"\n") for m in self.mails)

    @functools.cached_property
    def largest_wire(self) -> int:
        return max(len(m) + m.count(b"\n") for m in self.mails)


def lf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


def crlf(raw: bytes) -> bytes:
    return lf(raw).replace(b"\n", b"\r\n")


def mb1_mail(rng: random.Random, n: int, size: int = MB) -> bytes:
    """~1 MB: a short text body and one base64 attachment of random bytes (LF line ends)."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = "Scanner <scanner@example.net>"
    msg["To"] = "Archive <archive@example.org>"
    msg["Subject"] = f"Scan {n}"
    msg["Date"] = "Thu, 26 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = f"<mb1-{n}.{rng.getrandbits(40):x}@example.net>"
    msg.set_content(paragraph_text(rng, 2000), cte="quoted-printable")
    # base64: 4/3 of the bytes plus a line end every 76 characters
    payload = int((size - 4000) * 3 / 4 * 76 / 77)
    msg.add_attachment(rng.randbytes(payload), maintype="application", subtype="pdf", filename=f"scan-{n}.pdf")
    return lf(msg.as_bytes())


def smime_mail(pki: Any, raw: bytes) -> bytes:
    """``raw`` (a mail of the mix) with its MIME body encrypted to ``alice``: the content headers
    and the body go inside (openssl cms -encrypt, AES-256, S/MIME output), the rest stays outside."""
    head, _, body = crlf(raw).partition(b"\r\n\r\n")
    fields = re.split(rb"\r\n(?![ \t])", head)
    inner = [f for f in fields if f.lower().startswith((b"content-type:", b"content-transfer-encoding:"))]
    outer = [f for f in fields if f not in inner and not f.lower().startswith(b"mime-version:")]
    entity = b"\r\n".join(inner) + b"\r\n\r\n" + body
    wrapped = pki.encrypt(entity, "alice", outform="SMIME")
    return lf(b"\r\n".join(outer) + b"\r\n" + crlf(wrapped))


def build_workload(name: str, scale: float, work: Path) -> Workload:
    def count(full: int, least: int) -> int:
        return max(least, round(full * scale))

    if name == "small20k":
        rng = random.Random(2026_11_27)
        mails = [lf(build_mail(rng, i)) for i in range(count(2000, 4))]
        return Workload(name, "~24 KB realistic mix", mails, ["cmp1"] * len(mails))
    if name == "mb1":
        rng = random.Random(1_000_000)
        mails = [mb1_mail(rng, i) for i in range(count(200, 2))]
        return Workload(name, "~1 MB (text + base64 attachment)", mails, ["cmp1"] * len(mails))
    if name == "mb50":
        mails = [big_mail(50, seed=500 + i)[0] for i in range(count(5, 1))]
        return Workload(name, "50 MB (bench/large_mail.py's big_mail)", mails, ["cmp1"] * len(mails))
    if name == "many":
        rng = random.Random(500)
        boxes = [f"mm{i}" for i in range(1, count(500, 2) + 1) for _ in range(10)]
        mails = [lf(build_mail(rng, i)) for i in range(len(boxes))]
        return Workload(name, f"{len(boxes) // 10} mailboxes x 10 mails of the mix", mails, boxes)
    if name == "smime":
        from support.smime import make_pki  # tests/support: the openssl-made S/MIME material

        pki_dir = work / "smime-pki"
        pki_dir.mkdir(exist_ok=True)
        pki = make_pki(pki_dir)
        rng = random.Random(8551)
        mails = [smime_mail(pki, build_mail(rng, i)) for i in range(count(200, 4))]
        key = pki.pem_file("alice", key_first=True)
        return Workload(name, "the mix, S/MIME-encrypted (AES-256)", mails, ["cmp1"] * len(mails), smime_key=key)
    raise ValueError(name)


def write_pack(w: Workload, path: Path) -> None:
    """The mails as POP3 delivers them, back to back, and an index (see bench/peers.py read_pack)."""
    lengths = []
    with path.open("wb") as f:
        for m in w.mails:
            wire = crlf(m)
            lengths.append(len(wire))
            f.write(wire)
    Path(str(path) + ".json").write_text(json.dumps({"lengths": lengths, "mailboxes": w.boxes}))


def size_facts(w: Workload) -> str:
    sizes = sorted(len(m) + m.count(b"\n") for m in w.mails)
    return (
        f"{w.n} mails in {len(w.users)} mailbox(es), {w.wire_bytes / MB:.1f} MB; per mail min "
        f"{sizes[0] / 1000:.1f} KB, median {statistics.median(sizes) / 1000:.1f} KB, max {sizes[-1] / 1000:.1f} KB"
    )


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    rc: int
    wall_s: float
    cpu_s: float
    maxrss_kb: int
    stdout: str
    stderr: str


def spawn(cmd: list[str], *, env: dict[str, str], workdir: Path, timeout: float = CHILD_TIMEOUT) -> Proc:
    """Run ``cmd``: wall from spawn to exit; CPU (user+sys, the tool's reaped children included)
    from wait4(); peak RSS from GNU time's %M, i.e. wait4() in a small process.

    Not ru_maxrss from our own wait4(): a child forked (or vforked) from this ~50 MB Python
    process carries this process's high-water RSS through its exec, so every tool would show at
    least that. GNU time forks the tool from its own ~2 MB image instead.
    """
    out_path, err_path, time_path = workdir / "stdout", workdir / "stderr", workdir / "time.out"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [GNU_TIME, "-o", str(time_path), "-f", "%M %x", *cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=workdir,
            start_new_session=True,
        )
        killer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
        killer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: leave no tool running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
            raise
        finally:
            killer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    if wall >= timeout:
        raise BenchError(f"{cmd[:3]} killed after {timeout:.0f}s")
    last = time_path.read_text().strip().splitlines()[-1:] if time_path.exists() else []
    if not last or not re.fullmatch(r"\d+ -?\d+", last[0]):
        raise BenchError(f"{cmd[:3]}: no measure from {GNU_TIME} ({last}); stderr: {stderr[-1000:]}")
    maxrss_kb, code = (int(x) for x in last[0].split())
    return Proc(code, wall, ru.ru_utime + ru.ru_stime, maxrss_kb, stdout, stderr)


def marker_json(stdout: str, marker: str) -> dict[str, Any]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith(marker)]
    if not lines:
        raise BenchError(f"no {marker.strip()} line in the child's output: {stdout[-1500:]}")
    result: dict[str, Any] = json.loads(lines[-1][len(marker) :])
    return result


# --------------------------------------------------------------------------- Kafka helpers


def committed_records(bootstrap: str, topic: str, *, decode: bool = False) -> tuple[int, set[bytes], list[Any]]:
    """(committed records, distinct pop3kafka.record_id headers, decoded values if asked) of ``topic``."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"cmp-verify-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        md = c.list_topics(topic, timeout=15).topics.get(topic)
        if md is None or md.error is not None:
            raise BenchError(f"topic {topic} missing")
        c.assign([TopicPartition(topic, p, -2) for p in md.partitions])
        open_parts = set(md.partitions)
        count, ids, values = 0, set(), []
        deadline = time.monotonic() + 300
        while open_parts and time.monotonic() < deadline:
            for m in c.consume(1000, 1.0):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        open_parts.discard(m.partition())
                        continue
                    raise BenchError(f"reading {topic}: {m.error()}")
                count += 1
                ids.update(v for k, v in (m.headers() or []) if k == "pop3kafka.record_id" and v)
                if decode:
                    values.append(decode_single_object(m.value()))
        if open_parts:
            raise BenchError(f"reading {topic}: no end of partitions {sorted(open_parts)} within 300 s")
        return count, ids, values
    finally:
        c.close()


def wait_for_leaders(bootstrap: str, topics: list[str], timeout: float = 30.0) -> None:
    """Until every partition of ``topics`` has a leader: a tool's first produce must not wait for
    the broker to finish creating the topic (which deployments never see)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(timeout=10).topics
        ready = all(
            t in md
            and md[t].error is None
            and md[t].partitions
            and all(p.leader >= 0 for p in md[t].partitions.values())
            for t in topics
        )
        if ready:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"topics {topics} have no leaders after {timeout:.0f}s")
        time.sleep(0.05)


def high_watermarks(bootstrap: str, topic: str) -> list[int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"cmp-wm-{uuid.uuid4().hex[:8]}"})
    try:
        md = c.list_topics(topic, timeout=15).topics.get(topic)
        if md is None or md.error is not None:
            return []
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1] for p in sorted(md.partitions)]
    finally:
        c.close()


# --------------------------------------------------------------------------- the tools


@dataclass
class Env:
    bootstrap: str
    dove: DovecotServer
    work: Path
    getmail: str
    fetchmail: str

    @property
    def cafile(self) -> str:
        return str(self.dove.cafile)


@dataclass
class Run:
    tool: str
    run: int
    wall_s: float
    cpu_s: float
    maxrss_kb: int
    #: the child's own time for the job (Python children), else None
    work_s: float | None = None
    #: VmHWM growth over VmRSS after imports (Python children), KiB
    growth_kb: int | None = None
    verified: dict[str, Any] = field(default_factory=dict)
    #: fingerprint of connector/ when the run started (the code under test may change meanwhile)
    code: str = ""


def seed(env: Env, w: Workload) -> None:
    for u in w.users:
        env.dove.clear(u)
    for raw, u in zip(w.mails, w.boxes, strict=True):
        env.dove.put(u, raw)


def left_on_server(env: Env, w: Workload) -> int:
    return sum(env.dove.count(u) for u in w.users)


def check_empty(env: Env, w: Workload, tool: str) -> None:
    left = left_on_server(env, w)
    if left:
        raise BenchError(f"{tool}: {left} of {w.n} mails still on the server after the run")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POP3K_FAULT")}
    env.update(extra)
    return env


def run_peer_py(env: Env, w: Workload, tool: str, spec: dict[str, Any], d: Path) -> tuple[Proc, dict[str, Any]]:
    (d / "spec.json").write_text(json.dumps(spec))
    p = spawn([sys.executable, str(PEERS), tool, str(d / "spec.json")], env=child_env(), workdir=d)
    if p.rc != 0:
        raise BenchError(f"{tool} exited {p.rc}: {p.stderr[-2000:]}")
    return p, marker_json(p.stdout, "PEER-RESULT ")


def tool_pop3_py(env: Env, w: Workload, tool: str, d: Path) -> Run:
    seed(env, w)
    spec = {
        "host": "127.0.0.1",
        "port": env.dove.pop3s_port,
        "cafile": env.cafile,
        "accounts": [[u, PASSWORD] for u in w.users],
        "sessions": min(4, len(w.users)),
    }
    p, res = run_peer_py(env, w, tool, spec, d)
    if res["mails"] != w.n:
        raise BenchError(f"{tool}: retrieved {res['mails']} of {w.n} mails")
    check_empty(env, w, tool)
    return Run(
        tool, 0, p.wall_s, p.cpu_s, p.maxrss_kb, res["work_s"], res["hwm_kb"] - res["baseline_rss_kb"],
        {"retrieved": res["mails"], "bytes": res["bytes"], "left_on_server": 0},
    )  # fmt: skip


def tool_getmail(env: Env, w: Workload, d: Path) -> Run:
    seed(env, w)
    gdir, maildir = d / "getmail", d / "Maildir"
    gdir.mkdir()
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    # getmail's Maildir delivery forks a child per mail and refuses to write as root: as root,
    # it delivers as "nobody" (the owner of the Maildir here).
    as_user = ""
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        as_user = "user = nobody\n"
        for p in (maildir, *(maildir / sub for sub in ("cur", "new", "tmp"))):
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    rcfiles = []
    for u in w.users:
        rc = gdir / f"getmailrc-{u}"
        rc.write_text(
            "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = 127.0.0.1\n"
            f"port = {env.dove.pop3s_port}\nusername = {u}\npassword = {PASSWORD}\n"
            f"ca_certs = {env.cafile}\nssl_cert_hostname = localhost\n\n"
            f"[destination]\ntype = Maildir\npath = {maildir}/\n{as_user}\n"
            "[options]\ndelete = true\nread_all = true\nverbose = 0\nmessage_log_syslog = false\n"
        )
        rc.chmod(0o600)
        rcfiles.append(f"--rcfile={rc}")
    p = spawn([env.getmail, f"--getmaildir={gdir}", *rcfiles], env=child_env(HOME=str(d)), workdir=d)
    if p.rc != 0:
        raise BenchError(f"getmail exited {p.rc}: {(p.stdout + p.stderr)[-2000:]}")
    written = sum(1 for _ in (maildir / "new").iterdir()) + sum(1 for _ in (maildir / "cur").iterdir())
    if written != w.n:
        raise BenchError(f"getmail6: {written} of {w.n} mails in its Maildir")
    check_empty(env, w, "getmail6")
    return Run("getmail6", 0, p.wall_s, p.cpu_s, p.maxrss_kb, verified={"maildir_files": written, "left_on_server": 0})


def tool_fetchmail(env: Env, w: Workload, d: Path) -> Run:
    seed(env, w)
    home, bsmtp = d / "home", d / "mail.bsmtp"
    home.mkdir()
    rc = home / ".fetchmailrc"
    polls = "".join(
        f"poll 127.0.0.1 protocol POP3 port {env.dove.pop3s_port} auth password\n"
        f'  user "{u}" password "{PASSWORD}"\n'
        f'  ssl sslcertck sslcertfile "{env.cafile}" sslcommonname "localhost"\n'
        f'  nokeep fetchall bsmtp "{bsmtp}"\n'
        for u in w.users
    )
    fd = os.open(rc, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("set no bouncemail\nset no syslog\n" + polls)
    cmd = [env.fetchmail, "-f", str(rc), "-N", "--nosyslog", "--pidfile", str(home / "pid"), "-i", str(home / "ids")]
    p = spawn(cmd, env=child_env(HOME=str(home), FETCHMAILHOME=str(home)), workdir=d)
    if p.rc != 0:  # 0: mail was retrieved; 1: there was none
        raise BenchError(f"fetchmail exited {p.rc}: {(p.stdout + p.stderr)[-2000:]}")
    text = bsmtp.read_bytes() if bsmtp.exists() else b""
    messages = len(re.findall(rb"^MAIL FROM:", text, re.M))
    ends = len(re.findall(rb"^\.\r?$", text, re.M))
    if messages != w.n or ends != w.n:
        raise BenchError(f"fetchmail: {messages} MAIL FROM and {ends} end lines in its BSMTP file, expected {w.n}")
    check_empty(env, w, "fetchmail")
    return Run(
        "fetchmail", 0, p.wall_s, p.cpu_s, p.maxrss_kb, verified={"bsmtp_messages": messages, "left_on_server": 0}
    )


def connector_config(env: Env, w: Workload, tool: str, d: Path, tag: str) -> tuple[Path, dict[str, Any]]:
    mode = "exactly_once" if tool.startswith("eos") else "at_least_once"
    topic = f"cmp-{w.name}-{tool}-{tag}"
    spool = d / "spool"
    spool.mkdir(exist_ok=True)
    largest = w.largest_wire
    mailbox_extra: dict[str, Any] = {
        "mime_decoding": "decode" in tool,
        "max_messages_per_cycle": 100_000,
        "max_bytes_per_cycle": 4 * 1024 * MIB,
        "max_seconds_per_cycle": 300,
        "max_message_bytes": max(32 * MIB, 2 * largest),
        "timeout_seconds": 120,
    }
    if w.smime_key is not None:
        mailbox_extra["smime"] = {"keys": [{"file": str(w.smime_key), "label": "bench"}]}
    doc: dict[str, Any] = {
        "kafka": {"bootstrap_servers": env.bootstrap, "delivery_timeout_seconds": 120},
        "topics": {"mail": topic, "partitions": 3, "dead_letter": f"{topic}.dlq", "attachments": f"{topic}.att"},
        "ledger": {"topic": f"{topic}.ledger"},
        "delivery": {"mode": mode, "transactional_id_prefix": topic, "transaction_timeout_seconds": 600},
        "runtime": {"spool_directory": str(spool), **({"decode_processes": 0} if tool.endswith("-1p") else {})},
        "mailboxes": [
            {
                "id": u,
                "host": "127.0.0.1",
                "port": env.dove.pop3s_port,
                "tls": "implicit",
                "tls_ca_file": env.cafile,
                "username": u,
                "password": {"env": "CMP_PW"},
                **mailbox_extra,
            }
            for u in w.users
        ],
    }
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, doc


def create_topics(env: Env, cfg_path: Path, eos: bool) -> list[str]:
    """What poll-once would create at its start, made beforehand (deployments have their topics)."""
    from connector.cli.main import _ensure_topics

    cfg = load_config(cfg_path, environ={"CMP_PW": PASSWORD})
    _ensure_topics(cfg)
    t = cfg.topics
    topics = [t.mail, t.dead_letter, t.attachments]
    if eos:
        ensure_ledger_topic(
            env.bootstrap, {}, cfg.ledger.topic, shards=None, create=True, replication_factor=t.replication_factor
        )
        topics.append(cfg.ledger.topic)
    wait_for_leaders(env.bootstrap, topics)
    return topics


SUMMARY = re.compile(r"^(\S+): ok: (\d+) published(?:, (\d+) dead-lettered)?, (\d+) deleted of (\d+) listed(.*)$")


def tool_connector(env: Env, w: Workload, tool: str, d: Path) -> Run:
    tag = uuid.uuid4().hex[:8]
    cfg_path, doc = connector_config(env, w, tool, d, tag)
    topics = create_topics(env, cfg_path, tool.startswith("eos"))
    try:
        seed(env, w)
        p = spawn([sys.executable, str(PEERS), "connector", str(cfg_path)], env=child_env(CMP_PW=PASSWORD), workdir=d)
        if p.rc != 0:
            raise BenchError(f"{tool}: child exited {p.rc}: {p.stderr[-2000:]}")
        res = marker_json(p.stdout, "RSS-CHILD ")
        if os.environ.get("POP3K_BENCH_DIAGNOSE") == "1":  # bench/_rss_child.py's memory diagnosis
            log(f"{tool} diagnosis: {json.dumps(res)}")
        if res["exit"] != 0:
            raise BenchError(f"{tool}: poll-once exited {res['exit']}: {p.stderr[-2000:]}")
        published = deleted = boxes = 0
        for line in p.stdout.splitlines():
            if m := SUMMARY.match(line):
                if m.group(3) or m.group(6):
                    raise BenchError(f"{tool}: {line}")
                published += int(m.group(2))
                deleted += int(m.group(4))
                boxes += 1
        if published != w.n or deleted != w.n or boxes != len(w.users):
            raise BenchError(
                f"{tool}: poll-once published {published} and deleted {deleted} of {w.n} in {boxes} mailboxes"
            )
        check_empty(env, w, tool)
        mail_topic = doc["topics"]["mail"]
        decode = w.smime_key is not None and "decode" in tool
        count, ids, values = committed_records(env.bootstrap, mail_topic, decode=decode)
        if count != w.n or len(ids) != w.n:
            raise BenchError(f"{tool}: {count} committed records, {len(ids)} record ids on {mail_topic}; {w.n} mails")
        if decode and not all((v.get("smime") or {}).get("decrypted") for v in values):
            raise BenchError(f"{tool}: not every S/MIME mail was decrypted")
        dlq = sum(high_watermarks(env.bootstrap, doc["topics"]["dead_letter"]))
        if dlq:
            raise BenchError(f"{tool}: {dlq} offsets on the dead-letter topic")
        verified = {"published": published, "deleted": deleted, "committed_records": count, "record_ids": len(ids)}
        verified |= {"dead_letters": 0, "left_on_server": 0, **({"decrypted": len(values)} if decode else {})}
        verified["decode_worker_peak_rss_kb"] = res.get("children_maxrss_kb", 0)
        return Run(
            tool, 0, p.wall_s, p.cpu_s, p.maxrss_kb, res["wall_s"], res["hwm_kb"] - res["baseline_rss_kb"], verified
        )
    finally:
        delete_topics(env.bootstrap, topics)


def tool_produce(env: Env, w: Workload, tool: str, d: Path, pack: Path) -> Run:
    topic = f"cmp-{w.name}-{tool}-{uuid.uuid4().hex[:8]}"
    ensure_topic(env.bootstrap, {}, topic, create=True, partitions=3, replication_factor=-1)
    wait_for_leaders(env.bootstrap, [topic])
    try:
        spec = {
            "bootstrap": env.bootstrap,
            "topic": topic,
            "mode": "transactional" if tool == "produce-txn" else "idempotent",
            "transactional_id": topic,
            "pack": str(pack),
            "chunk_bytes": CHUNK_BYTES,
        }
        p, res = run_peer_py(env, w, "produce", spec, d)
        highs = high_watermarks(env.bootstrap, topic)
        # a transaction's commit marker takes one offset in each partition it wrote to
        markers = sum(1 for h in highs if h) if tool == "produce-txn" else 0
        if res["mails"] != w.n or res["acked"] != res["records"] or sum(highs) - markers != res["records"]:
            raise BenchError(f"{tool}: {res} but offsets {highs} on {topic}")
        verified = {"records_acked": res["acked"], "offsets": sum(highs), "commit_markers": markers}
        return Run(
            tool, 0, p.wall_s, p.cpu_s, p.maxrss_kb, res["work_s"], res["hwm_kb"] - res["baseline_rss_kb"], verified
        )
    finally:
        delete_topics(env.bootstrap, [topic])


def tool_decode(env: Env, w: Workload, d: Path, pack: Path) -> Run:
    # the decode options of the connector's full-decode mailbox (S/MIME keys included)
    cfg_path, _ = connector_config(env, w, "eos-decode", d, "decode")
    spec = {"pack": str(pack), "config": str(cfg_path)}
    p, res = run_peer_py(env, w, "decode", spec, d)
    if res["mails"] != w.n:
        raise BenchError(f"decode-only: {res['mails']} of {w.n} mails")
    return Run(
        "decode-only", 0, p.wall_s, p.cpu_s, p.maxrss_kb, res["work_s"], res["hwm_kb"] - res["baseline_rss_kb"],
        {"encoded_records": res["mails"], "encoded_bytes": res["encoded_bytes"]},
    )  # fmt: skip


def compile_bytecode() -> None:
    """Byte-compile connector/ before the runs, as an installed connector has it: pip compiles a
    wheel's modules when it installs them (the container image's too, deploy/Dockerfile). From a
    checkout with PYTHONDONTWRITEBYTECODE set (CI, these machines, the image) every run would
    compile its ~40 modules from source again: ~0.1 s of each poll-once, measured 2026-11-27, a
    cost no deployment pays. The .pyc files go to connector/**/__pycache__ (git-ignored)."""
    import compileall

    if not compileall.compile_dir(str(REPO / "connector"), quiet=1):
        raise BenchError("byte-compiling connector/ failed (see the output above)")


def code_fingerprint() -> str:
    """SHA-256 (12 hex digits) of connector/**/*.py, names and contents: which code a run used."""
    h = hashlib.sha256()
    for path in sorted((REPO / "connector").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def run_tool(env: Env, w: Workload, tool: str, run: int, pack: Path) -> Run:
    code = code_fingerprint()
    d = Path(tempfile.mkdtemp(prefix=f"{tool}-", dir=env.work))
    d.chmod(0o755)
    try:
        if tool in ("raw", "poplib"):
            r = tool_pop3_py(env, w, tool, d)
        elif tool == "getmail6":
            r = tool_getmail(env, w, d)
        elif tool == "fetchmail":
            r = tool_fetchmail(env, w, d)
        elif tool in CONNECTOR_TOOLS:
            r = tool_connector(env, w, tool, d)
        elif tool in ("produce-idem", "produce-txn"):
            r = tool_produce(env, w, tool, d, pack)
        elif tool == "decode-only":
            r = tool_decode(env, w, d, pack)
        else:
            raise ValueError(tool)
    finally:
        for u in w.users:
            env.dove.clear(u)
        shutil.rmtree(d, ignore_errors=True)
    r.run = run
    r.code = code
    return r


# --------------------------------------------------------------------------- summary


@dataclass
class Row:
    tool: str
    runs: list[Run]
    n: int
    wire_bytes: int

    @property
    def wall(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def work(self) -> float | None:
        ws = [r.work_s for r in self.runs if r.work_s is not None]
        return statistics.median(ws) if ws else None

    @property
    def mails_s(self) -> float:
        return self.n / self.wall

    @property
    def mb_s(self) -> float:
        return self.wire_bytes / MB / self.wall

    @property
    def cpu_per_mail(self) -> float:
        return statistics.median(r.cpu_s for r in self.runs) / self.n

    @property
    def rss_mib(self) -> float:
        return statistics.median(r.maxrss_kb for r in self.runs) / 1024

    @property
    def growth_worst_mb(self) -> float | None:
        gs = [r.growth_kb for r in self.runs if r.growth_kb is not None]
        return max(gs) * 1024 / MB if gs else None

    def summary(self) -> dict[str, Any]:
        walls = [r.wall_s for r in self.runs]
        return {
            "tool": self.tool,
            "what": TOOLS[self.tool],
            "runs": len(self.runs),
            "wall_s_median": self.wall,
            "wall_s_min": min(walls),
            "wall_s_max": max(walls),
            "in_process_s_median": self.work,
            "mails_per_s": self.mails_s,
            "mb_per_s": self.mb_s,
            "cpu_s_per_mail": self.cpu_per_mail,
            "peak_rss_mib_median": self.rss_mib,
            "rss_growth_mb_worst": self.growth_worst_mb,
            "decode_worker_peak_rss_mib_worst": max(
                (r.verified.get("decode_worker_peak_rss_kb", 0) / 1024 for r in self.runs), default=0.0
            ),
        }


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def workload_summary(w: Workload, runs: list[Run], tools: list[str]) -> dict[str, Any]:
    rows = {t: Row(t, [r for r in runs if r.tool == t], w.n, w.wire_bytes) for t in tools}
    out: dict[str, Any] = {"workload": w.name, "title": w.title, "mails": w.n, "mailboxes": len(w.users)}
    out["mb"] = w.wire_bytes / MB
    out["sizes"] = size_facts(w)
    out["rows"] = {}
    refs = [t for t in ("raw", *PEER_TOOLS) if t in rows]
    for t, row in rows.items():
        s = row.summary()
        s["ratios"] = {
            ref: {
                "throughput": ratio(row.mails_s, rows[ref].mails_s),
                "cpu_per_mail": ratio(row.cpu_per_mail, rows[ref].cpu_per_mail),
                "peak_rss": ratio(row.rss_mib, rows[ref].rss_mib),
            }
            for ref in refs
        }
        out["rows"][t] = s
    out["runs"] = [asdict(r) for r in runs]
    return out


# --------------------------------------------------------------------------- targets


def targets(summary: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(target, verdict, evidence) of each issue-10 target, from the measured numbers."""
    out: list[tuple[str, str, str]] = []

    def row(w: str, t: str) -> dict[str, Any] | None:
        return summary.get(w, {}).get("rows", {}).get(t)

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def inproc(a: dict[str, Any], b: dict[str, Any]) -> str:
        """The same ratio on other bases: both in-process, and the connector's process wall
        against the reference's in-process time (the strictest reading)."""
        if a["in_process_s_median"] and b["in_process_s_median"]:
            both = b["in_process_s_median"] / a["in_process_s_median"]
            strict = b["in_process_s_median"] / a["wall_s_median"]
            return f"; both in-process: {both:.2f}x; process vs reference in-process: {strict:.2f}x"
        return ""

    eos_raw, raw, fm = row("small20k", "eos-raw"), row("small20k", "raw"), row("small20k", "fetchmail")
    name = "raw passthrough, exactly-once, ~20 KB mail: >= 0.5x the raw retrieval limit"
    if eos_raw and raw:
        r = eos_raw["mails_per_s"] / raw["mails_per_s"]
        ev = f"{eos_raw['mails_per_s']:.0f} vs {raw['mails_per_s']:.0f} mails/s = {r:.2f}x" + inproc(eos_raw, raw)
        out.append((name, verdict(r >= 0.5), ev))
    else:
        out.append((name, "not measured", "needs small20k with eos-raw and raw"))
    name = "raw passthrough, exactly-once, ~20 KB mail: faster than fetchmail to a BSMTP file"
    if eos_raw and fm:
        ev = f"{eos_raw['wall_s_median']:.2f} s vs fetchmail {fm['wall_s_median']:.2f} s"
        out.append((name, verdict(eos_raw["wall_s_median"] < fm["wall_s_median"]), ev))
    else:
        out.append((name, "not measured", "needs small20k with eos-raw and fetchmail"))
    eos_dec, dec = row("small20k", "eos-decode"), row("small20k", "decode-only")
    name = "full decode, exactly-once: >= 0.75x the decode-only throughput of the same mix"
    if eos_dec and dec:
        r = eos_dec["mails_per_s"] / dec["mails_per_s"]
        ev = f"{eos_dec['mails_per_s']:.0f} vs decode-only {dec['mails_per_s']:.0f} mails/s = {r:.2f}x"
        ev += inproc(eos_dec, dec)
        out.append((name, verdict(r >= 0.75), ev))
    else:
        out.append((name, "not measured", "needs small20k with eos-decode and decode-only"))
    name = "full decode, exactly-once: faster than getmail6 on every workload"
    pairs = [(w, row(w, "eos-decode"), row(w, "getmail6")) for w in summary]
    pairs = [(w, a, b) for w, a, b in pairs if a and b]
    if pairs:
        ok = all(a["wall_s_median"] < b["wall_s_median"] for _, a, b in pairs)
        ev = "; ".join(f"{w}: {a['wall_s_median']:.2f} s vs {b['wall_s_median']:.2f} s" for w, a, b in pairs)
        missing = [w for w in WORKLOADS if w not in summary]
        out.append((name, verdict(ok) + (f" (not measured: {', '.join(missing)})" if missing else ""), ev))
    else:
        out.append((name, "not measured", "needs eos-decode and getmail6"))
    big, big_raw = row("mb50", "eos-decode"), row("mb50", "raw")
    name = "50 MB mail end to end (exactly-once, full decode): >= 0.4x the raw retrieval limit (stretch 0.6x)"
    if big and big_raw:
        r = big["mb_per_s"] / big_raw["mb_per_s"]
        ev = f"{big['mb_per_s']:.1f} vs {big_raw['mb_per_s']:.1f} MB/s = {r:.2f}x" + inproc(big, big_raw)
        out.append((name, verdict(r >= 0.4) + ("; stretch PASS" if r >= 0.6 else "; stretch FAIL"), ev))
    else:
        out.append((name, "not measured", "needs mb50 with eos-decode and raw"))
    name = f"peak RSS growth (VmHWM, whole process) <= {RSS_TARGET_MB:.0f} MB on every workload, every connector mode"
    growths = [
        (w, t, s["rows"][t]["rss_growth_mb_worst"])
        for w, s in summary.items()
        for t in CONNECTOR_TOOLS
        if t in s["rows"]
    ]
    if growths:
        worst = max(growths, key=lambda g: g[2])
        ok = all(g <= RSS_TARGET_MB for _, _, g in growths)
        ev = f"worst {worst[2]:.1f} MB ({worst[0]}, {worst[1]}); per workload: " + ", ".join(
            f"{w} {max(g for ww, _, g in growths if ww == w):.1f}"
            for w in summary
            if any(ww == w for ww, _, _ in growths)
        )
        workers = [
            s["rows"][t].get("decode_worker_peak_rss_mib_worst", 0.0)
            for s in summary.values()
            for t in CONNECTOR_TOOLS
            if t in s["rows"]
        ]
        if any(workers):
            ev += (
                f"; the decode worker processes (forks of the connector after start-up, their pages shared until "
                f"written) peaked at {max(workers):.0f} MiB RSS each at most"
            )
        out.append((name, verdict(ok), ev))
    else:
        out.append((name, "not measured", "needs a connector mode"))
    return out


# --------------------------------------------------------------------------- report


def versions(env: Env) -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
        except OSError as exc:
            return f"unavailable ({exc})"
        text = (p.stdout or p.stderr).strip()
        return text.splitlines()[0] if text else "?"

    pom = (REPO / "deploy" / "local" / "kafka" / "pom.xml").read_text()
    kafka = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in ln
            ),
            "",
        )
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return {
        "machine": f"{os.cpu_count()} CPUs ({cpu or platform.machine()}), {ram:.0f} GiB RAM, "
        f"Linux {platform.release()}",
        "python": platform.python_version(),
        "pop3-kafka": connector.__version__,
        "getmail6": first_line([env.getmail, "--version"]),
        "fetchmail": first_line([env.fetchmail, "--version"]).removeprefix("This is "),
        "openssl": f"{ssl.OPENSSL_VERSION} (Python); {first_line(['openssl', 'version'])} (binary)",
        "kafka": f"Apache Kafka {kafka.group(1) if kafka else '?'} (deploy/local/kafka/pom.xml), one KRaft node",
        "confluent-kafka": (
            f"{_version(confluent_kafka.version())}, librdkafka {_version(confluent_kafka.libversion())}"
        ),
        "dovecot": first_line([DOVECOT_BIN, "--version"]),
    }


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def fmt_ratio(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


def code_note(data: dict[str, Any]) -> str:
    """Which connector code the runs used: one fingerprint, or where it changed during the run."""
    seen: dict[str, list[str]] = {}
    for name, w in data["workloads"].items():
        for r in w["runs"]:
            if r.get("code"):
                seen.setdefault(r["code"], []).append(f"{name} run {r['run']} {r['tool']}")
    if len(seen) <= 1:
        return f"- connector/ code: one version throughout (sha256 of connector/**/*.py: {next(iter(seen), '?')})"
    parts = [f"{code} from {runs[0]} to {runs[-1]} ({len(runs)} tool runs)" for code, runs in seen.items()]
    return "- **connector/ changed during the measurement** (sha256 of connector/**/*.py): " + "; ".join(parts)


def render_md(data: dict[str, Any]) -> str:
    s = data["workloads"]
    lines = [
        "# pop3-kafka vs the limits and its peers (issue 10)",
        "",
        f"Generated by `{data['command']}` on {data['date']}, total {data['total_s'] / 60:.1f} min. "
        "Numbers are computed by bench/compare.py; this file is its output (bench/results/compare.json "
        "holds every run).",
        "",
        "## Targets",
        "",
        "Evaluated on median process wall times (each tool from spawn to exit, the connector's "
        "interpreter start, imports, producer start and init_transactions included: what "
        "`pop3-kafka poll-once` costs). Where both sides have one, the same ratio follows on in-process "
        "times (each child's own measure of its job, without start-up), and the strictest reading: the "
        "connector's process wall time against the reference's in-process time.",
        "",
        *(
            [
                f"**Scaled run (--scale {data['scale']:g}): not the issue's workloads; the verdicts only show "
                "that the evaluation works.**",
                "",
            ]
            if data["scale"] != 1
            else []
        ),
        "| target | verdict | measured |",
        "|---|---|---|",
        *(f"| {t} | **{v}** | {e} |" for t, v, e in data["targets"]),
        "",
        "![mails/s relative to the raw retrieval limit](compare.png)",
        "",
        "## Set-up",
        "",
        *(f"- {k}: {v}" for k, v in data["versions"].items()),
        f"- runs: {', '.join(f'{w} {n}' for w, n in data['runs'].items())} (median; min and max of the wall "
        "time shown); in each run the tools go in round-robin order (run r starts with tool r)",
        *(
            [
                f"- fewer runs for {', '.join(w for w, n in data['runs'].items() if n < max(data['runs'].values()))} "
                f"than for the others, to keep the whole measurement under ~40 minutes"
            ]
            if len(set(data["runs"].values())) > 1
            else []
        ),
        code_note(data),
        "- everything on 127.0.0.1 on the same machine: Dovecot's and Kafka's CPU are not in the tools' CPU",
        *(
            [
                f"- load average (1, 5, 15 min) at the start {data['load_average']['start']}, at the end "
                f"{data['load_average']['end']} (other work on the machine slows all tools of a run alike)"
            ]
            if "load_average" in data
            else []
        ),
        "",
        "Columns: **wall s**: median process wall time (spawn to exit) with min and max; **in-process s**: "
        "the child's own time for the job (Python tools: from its first connection or first mail to the "
        "end; the connector: its poll-once call as the console script makes it, imports of the Kafka side "
        "included, bench/_rss_child.py); **mails/s** and **MB/s** (10^6 bytes "
        "as POP3 delivers them, CRLF) over the median wall time; **CPU ms/mail**: user+sys CPU of the "
        "process (wait4) per mail; **peak RSS**: ru_maxrss of the process (MiB, median); **RSS growth**: "
        "VmHWM at the end minus VmRSS after imports (MB = 10^6 bytes, worst run; the connector's issue-6 "
        "measure, its baseline once the CLI's eager imports are done). **vs limit**: mails/s ÷ the raw "
        "limit's, CPU per mail ÷ its, peak RSS ÷ its. "
        "Peer ratios read the same way (throughput > 1: faster than the peer; CPU and RSS < 1: less than "
        "the peer).",
        "",
    ]
    for name, w in s.items():
        rows = w["rows"]
        lines += [
            f"## {name}: {w['title']}",
            "",
            w["sizes"] + ".",
            "",
            "| tool | wall s | min | max | in-process s | mails/s | MB/s | CPU ms/mail | peak RSS MiB | RSS growth MB "
            "| vs limit: mails/s | CPU/mail | RSS |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t, r in rows.items():
            lim = r["ratios"].get("raw", {})
            inproc = f"{r['in_process_s_median']:.3f}" if r["in_process_s_median"] is not None else "-"
            growth = f"{r['rss_growth_mb_worst']:.1f}" if r["rss_growth_mb_worst"] is not None else "-"
            lines.append(
                f"| {t} | {r['wall_s_median']:.3f} | {r['wall_s_min']:.3f} | {r['wall_s_max']:.3f} | {inproc} | "
                f"{fmt_rate(r['mails_per_s'])} | {fmt_rate(r['mb_per_s'])} | {r['cpu_s_per_mail'] * 1000:.3f} | "
                f"{r['peak_rss_mib_median']:.1f} | {growth} | {fmt_ratio(lim.get('throughput', float('nan')))} | "
                f"{fmt_ratio(lim.get('cpu_per_mail', float('nan')))} | {fmt_ratio(lim.get('peak_rss', float('nan')))} |"
            )
        peers = [p for p in PEER_TOOLS if p in rows]
        if peers:
            lines += [
                "",
                "Ratios to each peer (mails/s ÷ peer's · CPU per mail ÷ peer's · peak RSS ÷ peer's):",
                "",
                "| tool | " + " | ".join(f"vs {p}" for p in peers) + " |",
                "|---|" + "---:|" * len(peers),
            ]
            for t, r in rows.items():
                cells = []
                for p in peers:
                    q = r["ratios"][p]
                    cells.append(
                        f"{fmt_ratio(q['throughput'])} · {fmt_ratio(q['cpu_per_mail'])} · {fmt_ratio(q['peak_rss'])}"
                    )
                lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## What each tool does",
        "",
        *(f"- **{t}**: {d}" for t, d in TOOLS.items()),
        "",
        "The produce limits include the producer's start: librdkafka's idempotent producer waits about "
        "0.5 s for its producer id before the first batch leaves (it dominates small workloads); the "
        "transactional one does that inside init_transactions(). The connector's wall time includes the "
        "interpreter's start, its imports, the producer's start and, exactly-once, init_transactions() and "
        "the ledger load: one `poll-once` as a cron job would run it, from byte-compiled modules as pip "
        "installs them (compiled before the runs). The producers and decode-only read "
        "the whole workload into memory before they start (the mail as POP3 delivers it): their peak RSS "
        "holds it, their RSS growth does not. Authentication: raw, poplib, getmail6 and fetchmail log in "
        "with USER/PASS; the connector picks CRAM-MD5 from Dovecot's SASL list (its default order).",
        "",
        "Every run is verified before it counts, else the benchmark fails: mailboxes empty after every "
        "POP3 tool; raw/poplib retrieved N mails; getmail6 wrote N files to its Maildir; fetchmail N "
        "messages to its BSMTP file; the connector printed N published and N deleted, the mail topic "
        "holds N committed records (read_committed) with N distinct record ids, the dead-letter topic "
        "none, S/MIME records say decrypted; the producers had N records acknowledged and the topic's "
        "offsets agree; decode-only encoded N records. Topics are created before each connector run "
        "(as a deployment has them) and deleted after its check. The many-mailbox workload: raw uses 4 "
        "sessions at once (the connector's default max_sessions_per_server), poplib one after another, "
        "getmail6 one invocation with one --rcfile per mailbox, fetchmail one invocation with one poll "
        "entry per mailbox (both sequential).",
        "",
    ]
    return "\n".join(lines)


def render_png(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    workloads = list(data["workloads"])
    tools = [t for t in TOOLS if any(t in data["workloads"][w]["rows"] for w in workloads)]
    fig, ax = plt.subplots(figsize=(max(8.0, 2.6 * len(workloads) + 3), 5.2))
    width = 0.8 / len(tools)
    colours = {
        "raw": "#1f4e79", "produce-idem": "#5b9bd5", "produce-txn": "#9dc3e6", "poplib": "#7f7f7f",
        "getmail6": "#548235", "fetchmail": "#a9d18e", "eos-decode": "#c00000", "eos-decode-1p": "#e06666",
        "alo-decode": "#ff8f8f",
        "eos-raw": "#7030a0", "alo-raw": "#c5b0e0", "decode-only": "#ed7d31",
    }  # fmt: skip
    for i, t in enumerate(tools):
        xs, ys = [], []
        for j, w in enumerate(workloads):
            r = data["workloads"][w]["rows"].get(t)
            if r and "raw" in r["ratios"]:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(r["ratios"]["raw"]["throughput"])
        ax.bar(xs, ys, width, label=f"{t}", color=colours[t], edgecolor="black", linewidth=0.3)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.5, color="grey", linewidth=0.6, linestyle="--")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _pos: f"{y:g}"))
    ax.text(len(workloads) - 0.5, 0.5, "0.5", va="bottom", ha="right", fontsize=8, color="grey")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([f"{w}\n({data['workloads'][w]['mails']} mails)" for w in workloads])
    ax.set_ylabel("mails/s ÷ raw retrieval limit (log)")
    ax.set_title(f"pop3-kafka vs limits and peers, median of runs ({data['date'][:10]})")
    ax.legend(ncol=1, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def kafka_broker(state: Path) -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"]
        return
    node = KafkaNode(state / "kafka")
    log("starting Kafka (no KAFKA_BOOTSTRAP)")
    node.start()
    try:
        yield node.bootstrap
    finally:
        node.stop()


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def find_tools(wanted: list[str]) -> tuple[str, str]:
    getmail = os.environ.get("GETMAIL") or str(BENCH_VENV / "bin" / "getmail")
    fetchmail = os.environ.get("FETCHMAIL") or shutil.which("fetchmail") or "/usr/bin/fetchmail"
    missing = [] if os.access(GNU_TIME, os.X_OK) else [f"GNU time ({GNU_TIME}; `make bench-deps`)"]
    if "getmail6" in wanted and not os.access(getmail, os.X_OK):
        missing.append(f"getmail6 ({getmail}; `make bench-deps`)")
    if "fetchmail" in wanted and not os.access(fetchmail, os.X_OK):
        missing.append(f"fetchmail ({fetchmail}; `make bench-deps`)")
    if missing:
        raise BenchError("missing peers: " + ", ".join(missing))
    return getmail, fetchmail


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", action="append", choices=WORKLOADS, help="repeatable; default: all")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--runs-for", action="append", default=[], metavar="WORKLOAD=N", help="runs of one workload")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply mail (and mailbox) counts, e.g. 0.01")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of: " + ", ".join(TOOLS))
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--render", type=Path, metavar="JSON", help="only write the report again from a compare.json")
    args = ap.parse_args(argv)
    args.workload = args.workload or list(WORKLOADS)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in args.tools if t not in TOOLS]
    if unknown or "raw" not in args.tools:
        ap.error(f"--tools: unknown {unknown}" if unknown else "--tools must include raw (the reference)")
    per = {}
    for item in args.runs_for:
        name, _, n = item.partition("=")
        if name not in WORKLOADS or not n.isdigit() or int(n) < 1:
            ap.error(f"--runs-for {item!r}: WORKLOAD=N")
        per[name] = int(n)
    args.runs_of = {w: per.get(w, args.runs) for w in args.workload}
    return args


def write_report(data: dict[str, Any], out: Path) -> str:
    data["targets"] = targets(data["workloads"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(data, indent=1) + "\n")
    text = render_md(data)
    (out / "compare.md").write_text(text)
    render_png(data, out / "compare.png")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(write_report(json.loads(args.render.read_text()), args.results_dir))
        return 0
    command = shlex.join(["python", "bench/compare.py", *(sys.argv[1:] if argv is None else argv)])
    t_start = time.monotonic()
    load_start = loadavg()

    def on_signal(signum: int, _frame: object) -> None:
        # once: the clean-up (stopping Dovecot, and Kafka if started here) must not be interrupted
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        getmail, fetchmail = find_tools(args.tools)
        compile_bytecode()
    except BenchError as exc:
        print(f"compare.py: {exc}", file=sys.stderr)
        return 1
    # Under /tmp with mode 0755: Dovecot's unprivileged processes must traverse every parent.
    state = Path(tempfile.mkdtemp(prefix="pop3k-compare-"))
    state.chmod(0o755)
    os.environ["CMP_PW"] = PASSWORD
    many = max(2, round(500 * args.scale)) if "many" in args.workload else 0
    users = {"cmp1": PASSWORD, **{f"mm{i}": PASSWORD for i in range(1, many + 1)}}
    summary: dict[str, Any] = {}
    try:
        with kafka_broker(state) as bootstrap:
            dove = DovecotServer(state / "dovecot", users=users)
            dove.start()
            try:
                env = Env(bootstrap, dove, state, getmail, fetchmail)
                facts = versions(env)
                for wname in args.workload:
                    t0 = time.monotonic()
                    w = build_workload(wname, args.scale, state)
                    pack = state / f"{wname}.pack"
                    write_pack(w, pack)
                    log(f"{wname}: {size_facts(w)} (built in {time.monotonic() - t0:.1f}s)")
                    runs: list[Run] = []
                    tools = list(args.tools)
                    for r in range(args.runs_of[wname]):
                        order = tools[r % len(tools) :] + tools[: r % len(tools)]
                        for tool in order:
                            res = run_tool(env, w, tool, r + 1, pack)
                            runs.append(res)
                            log(
                                f"{wname} run {r + 1}/{args.runs_of[wname]} {tool}: {res.wall_s:.3f}s wall, "
                                f"{res.cpu_s:.2f}s CPU, {res.maxrss_kb / 1024:.0f} MiB"
                            )
                    summary[wname] = workload_summary(w, runs, tools)
                    pack.unlink()
                    Path(str(pack) + ".json").unlink()
            finally:
                dove.stop()
    except BenchError as exc:
        print(f"compare.py: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(state, ignore_errors=True)
    data = {
        "command": command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "total_s": time.monotonic() - t_start,
        "runs": args.runs_of,
        "scale": args.scale,
        "versions": facts,
        "load_average": {"start": load_start, "end": loadavg()},
        "workloads": summary,
    }
    print(write_report(data, args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
