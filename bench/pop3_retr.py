#!/usr/bin/env python3
"""Benchmark: RETR of every mail over POP3S, stdlib poplib vs connector.protocol.Pop3Session.

Needs the local Dovecot (``eval "$(python deploy/local/localstack.py env --dir D)"``):
POP3_HOST, POP3S_PORT, POP3_CAFILE, DOVECOT_TEST_DIR. Puts N mails of SIZE bytes into
carol's maildir (tmp/ then rename into new/, owned like the maildir), times each client
RETRieving all of them (same process, median of ROUNDS, order alternating; nothing is
deleted: RSET + QUIT), removes the mails it created and writes bench/results/pop3_retr.md.

    python bench/pop3_retr.py [--n 2000] [--size 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import poplib
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from connector.protocol import Pop3Session, SpoolPolicy, make_tls_context

USER, PASSWORD = "carol", "carol-pw"
RESULTS = Path(__file__).resolve().parent / "results" / "pop3_retr.md"
SPOOL = SpoolPolicy(threshold=4 * 1024 * 1024, directory=tempfile.gettempdir())


def make_mail(i: int, size: int) -> bytes:
    """A plausible text mail of ~size bytes with LF endings (maildir), some dot lines."""
    head = (
        f"From: bench@example.com\nTo: {USER}@example.com\nSubject: bench {i}\nMessage-ID: <bench-{i}@example.com>\n\n"
    ).encode()
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tem\n"
    body = bytearray()
    n = 0
    while len(head) + len(body) < size:
        body += b".leading dot line\n" if n % 50 == 0 else line
        n += 1
    return head + bytes(body)


def put_mails(maildir: Path, n: int, size: int, tag: str) -> None:
    st = maildir.stat()
    for i in range(n):
        name = f"{time.time_ns()}.{tag}-{i}.bench"
        tmp = maildir / "tmp" / name
        tmp.write_bytes(make_mail(i, size))
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        tmp.rename(maildir / "new" / name)


def remove_mails(maildir: Path, tag: str) -> int:
    removed = 0
    for sub in ("new", "cur", "tmp"):
        for p in (maildir / sub).iterdir():
            if f".{tag}-" in p.name:
                p.unlink()
                removed += 1
    return removed


def run_poplib(host: str, port: int, ctx: ssl.SSLContext, n: int) -> int:
    pop = poplib.POP3_SSL(host, port, context=ctx, timeout=60)
    pop.user(USER)
    pop.pass_(PASSWORD)
    total = 0
    for i in range(1, n + 1):
        _, _lines, octets = pop.retr(i)
        total += octets
    pop.rset()
    pop.quit()
    return total


def run_ours(host: str, port: int, ctx: ssl.SSLContext, n: int) -> int:
    s = Pop3Session.connect(host, port, tls="implicit", ssl_context=ctx, timeout=60)
    s.login_user_pass(USER, PASSWORD)
    total = 0
    for i in range(1, n + 1):
        total += len(s.retr(i))
    s.abort()  # RSET + QUIT
    return total


def run_ours_pipelined(host: str, port: int, ctx: ssl.SSLContext, n: int) -> int:
    s = Pop3Session.connect(host, port, tls="implicit", ssl_context=ctx, timeout=60)
    s.login_user_pass(USER, PASSWORD)
    total = sum(mail.size for _, mail in s.retr_many(range(1, n + 1)))
    s.abort()
    return total


def run_ours_spooled(host: str, port: int, ctx: ssl.SSLContext, n: int) -> int:
    """Pipelined, hashed while received, spooled to a file above 4 MiB (what the cycle does)."""
    s = Pop3Session.connect(host, port, tls="implicit", ssl_context=ctx, timeout=60)
    s.login_user_pass(USER, PASSWORD)
    total = 0
    for _, mail in s.retr_many(range(1, n + 1), spool=SPOOL, max_line=1024 * 1024):
        with mail:
            assert mail.refused is None and len(mail.sha256) == 64
            total += mail.size
    s.abort()
    return total


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to clear_refs);
    returns the RSS in KiB that the next peak is measured from."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def run_raw(host: str, port: int, ctx: ssl.SSLContext, n: int) -> int:
    """The physical limit for this job: all RETRs pipelined, 1 MiB reads, count terminators, discard."""
    import socket

    raw = socket.create_connection((host, port), timeout=60)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock = ctx.wrap_socket(raw, server_hostname=host)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode())
    f.readline()
    f.readline()
    sock.sendall(b"".join(b"RETR %d\r\n" % i for i in range(1, n + 1)))
    buf = bytearray(1 << 20)
    seen = total = 0
    tail = b""
    while seen < n:
        k = sock.recv_into(buf)
        if not k:
            break
        chunk = tail + bytes(buf[:k])
        seen += chunk.count(b"\r\n.\r\n")
        tail = chunk[-4:]
        total += k
    sock.sendall(b"RSET\r\nQUIT\r\n")
    sock.close()
    return total


def bench_scenario(
    host: str, port: int, ctx: ssl.SSLContext, *, maildir: Path, n: int, size: int, rounds: int
) -> list[str]:
    """Run one (n, size) scenario; return its Markdown table rows. Always removes its mails."""
    tag = uuid.uuid4().hex[:10]
    clients: dict[str, Callable[[str, int, ssl.SSLContext, int], int]] = {
        "stdlib poplib (POP3_SSL.retr)": run_poplib,
        "Pop3Session.retr": run_ours,
        "Pop3Session.retr_many (pipelined)": run_ours_pipelined,
        "Pop3Session.retr_many (pipelined, hashed, spooled > 4 MiB)": run_ours_spooled,
        "raw pipelined TLS reader (limit)": run_raw,
    }
    wall: dict[str, list[float]] = {name: [] for name in clients}
    cpu: dict[str, list[float]] = {name: [] for name in clients}
    peak: dict[str, list[int]] = {name: [] for name in clients}  # VmHWM growth, KiB
    try:
        put_mails(maildir, n, size, tag)
        # Warm-up: Dovecot indexes the maildir (new/ -> cur/) and both byte-compare one mail.
        with Pop3Session.connect(host, port, tls="implicit", ssl_context=ctx, timeout=60) as s:
            s.login_user_pass(USER, PASSWORD)
            count, _ = s.stat()
            assert count == n, (count, n)
            ours = s.retr(1)
            s.rset()
        pop = poplib.POP3_SSL(host, port, context=ctx, timeout=60)
        pop.user(USER)
        pop.pass_(PASSWORD)
        theirs = b"\r\n".join(pop.retr(1)[1]) + b"\r\n"
        pop.quit()
        assert ours == theirs, "clients disagree on message 1"
        for r in range(rounds):
            order = list(clients) if r % 2 == 0 else list(reversed(clients))
            for name in order:
                gc.collect()
                rss0 = reset_peak_rss()
                t0, c0 = time.perf_counter(), time.process_time()
                clients[name](host, port, ctx, n)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                peak[name].append(_status_kb("VmHWM") - rss0)
                print(
                    f"{n}x{size} round {r + 1} {name}: {wall[name][-1]:.3f}s wall, {cpu[name][-1]:.3f}s CPU",
                    flush=True,
                )
    finally:
        removed = remove_mails(maildir, tag)
        print(f"removed {removed} bench mails from {maildir}")
    mb = n * size / 1e6
    base = statistics.median(wall["stdlib poplib (POP3_SSL.retr)"])
    base_cpu = statistics.median(cpu["stdlib poplib (POP3_SSL.retr)"])
    rows = []
    for name, ts in wall.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
        rows.append(
            f"| {n} x {size} B | {name} | {med:.3f} | {mb / med:.1f} | {n / med:.0f} | {base / med:.2f}x | "
            f"{med_cpu:.3f} | {base_cpu / med_cpu:.2f}x | {max(peak[name]) / 1024:.1f} | "
            f"{', '.join(f'{t:.3f}' for t in ts)} |"
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="N:SIZE",
        help="additional scenario, e.g. 10:5000000 for a few large mails (repeatable)",
    )
    args = ap.parse_args()
    host, port = os.environ["POP3_HOST"], int(os.environ["POP3S_PORT"])
    cafile = os.environ["POP3_CAFILE"]
    maildir = Path(os.environ["DOVECOT_TEST_DIR"]) / "mail" / USER / "Maildir"
    if any(next((maildir / sub).iterdir(), None) is not None for sub in ("new", "cur")):
        print(f"{maildir} is not empty; refusing to benchmark on someone else's mail", file=sys.stderr)
        return 2
    ctx = make_tls_context(cafile)
    scenarios = [(args.n, args.size)] + [tuple(int(x) for x in e.split(":")) for e in args.extra]
    rows: list[str] = []
    for n, size in scenarios:
        rows += bench_scenario(host, port, ctx, maildir=maildir, n=n, size=size, rounds=args.rounds)
    report = "\n".join(
        [
            "# POP3 RETR throughput: stdlib poplib vs Pop3Session",
            "",
            "Mails of SIZE bytes (LF on disk; sent as CRLF, dot-stuffed; a line starting with '.' every "
            f"50 lines) over POP3S to the local Dovecot on {host}, TLS verified against the test CA; "
            "RETR of every mail in one session, then RSET + QUIT (nothing deleted). Median of "
            f"{args.rounds} rounds, client order alternating, both clients in the same process. "
            "'client CPU' is this process's CPU time (Dovecot's is not included). 'peak RSS growth' is "
            "the whole process's VmHWM after the run minus its RSS before (VmHWM reset through "
            "/proc/self/clear_refs before each run; worst round). The spooled client hashes every mail "
            "(SHA-256) and writes mail over 4 MiB to an anonymous file in a temp directory.",
            "",
            "| mails | client | median wall s | MB/s | mails/s | wall speed-up | client CPU s "
            "| CPU speed-up | peak RSS growth MiB | rounds wall (s) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            *rows,
            "",
            f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}, {platform.machine()}, "
            f"{os.cpu_count()} CPUs; generated by `{' '.join(['bench/pop3_retr.py', *sys.argv[1:]])}` "
            f"on {time.strftime('%Y-%m-%d')}.",
            "",
        ]
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
