#!/usr/bin/env python3
"""The limits and the peers of bench/compare.py, each one a process of its own.

bench/compare.py starts every tool as a child process and measures it from outside (wall time
from spawn to exit, user+sys CPU and ru_maxrss from ``os.wait4``). The Python tools live here,
one sub-command each, reading their job from a JSON spec file written by compare.py:

    python bench/peers.py raw SPEC        # the retrieval limit: pipelined RETR over TLS to /dev/null
    python bench/peers.py poplib SPEC     # stdlib poplib: RETR + DELE of every mail, one at a time
    python bench/peers.py produce SPEC    # the broker's produce limit for the same bytes
    python bench/peers.py decode SPEC     # decode_mail + record + Avro of the same bytes, in memory
    python bench/peers.py connector CONFIG  # `pop3-kafka poll-once` through bench/_rss_child.py

Each prints one line ``PEER-RESULT {json}`` last on stdout: what it did (mails, bytes) and
``work_s``, its own wall time from the first connection (or the first mail) to the end of the job,
without the interpreter's start and imports, plus ``baseline_rss_kb``/``hwm_kb``: VmRSS after its
imports (VmHWM reset there through /proc/self/clear_refs) and VmHWM at the end.

``raw`` and ``poplib`` import nothing but the standard library, so their process times are not
inflated by imports. The raw reader is the technique of bench/pop3_retr.py's ``run_raw`` (every
RETR sent at once, 1 MiB ``recv_into``, responses found by their terminator and thrown away),
extended to check every status line and to DELE everything (pipelined) before QUIT, since every
tool in the comparison deletes. It is not imported from there because that module imports the
connector (+0.15 s and +20 MB in a process meant to show the floor).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MARKER = "PEER-RESULT "


# --------------------------------------------------------------------------- memory


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_hwm() -> int:
    """VmHWM := VmRSS (Linux >= 4.0: write 5 to clear_refs); the RSS in KiB the peak grows from."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return status_kb("VmRSS")


def finish(out: dict[str, Any], baseline_kb: int, t0: float) -> int:
    out.update(work_s=round(time.perf_counter() - t0, 6), baseline_rss_kb=baseline_kb, hwm_kb=status_kb("VmHWM"))
    sys.stdout.flush()
    print(MARKER + json.dumps(out), flush=True)
    return 0


class PeerError(RuntimeError):
    """The tool did not do the whole job: the run must fail the benchmark."""


# --------------------------------------------------------------------------- raw limit


class RawReader:
    """A minimal POP3 client over TLS: the floor of what any client can do for the job."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext) -> None:
        raw = socket.create_connection((host, port), timeout=120)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.chunk = bytearray(1 << 20)
        self.view = memoryview(self.chunk)
        self.buf = bytearray()
        self.pos = 0
        self.received = 0

    def fill(self) -> None:
        k = self.sock.recv_into(self.view)
        if not k:
            raise PeerError("server closed the connection")
        self.received += k
        if self.pos > (1 << 20):
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += self.view[:k]

    def line(self) -> bytes:
        while (j := self.buf.find(b"\r\n", self.pos)) < 0:
            self.fill()
        out = bytes(self.buf[self.pos : j])
        self.pos = j + 2
        return out

    def ok(self, what: str) -> bytes:
        got = self.line()
        if not got.startswith(b"+OK"):
            raise PeerError(f"{what}: {got[:80]!r}")
        return got

    def skip_body(self) -> None:
        """Discard a multi-line body up to and including its terminator line."""
        # The status line's CRLF is still in the buffer (pos - 2): an empty body is "\r\n.\r\n" too.
        self.pos -= 2
        while (k := self.buf.find(b"\r\n.\r\n", self.pos)) < 0:
            keep = max(self.pos, len(self.buf) - 4)
            del self.buf[:keep]
            self.pos = 0
            self.fill()
        self.pos = k + 5

    def job(self, user: str, password: str) -> tuple[int, int]:
        """Log in, RETR every mail (pipelined), DELE every mail (pipelined), QUIT.
        Returns (mails, bytes received in RETR responses)."""
        self.ok("greeting")
        self.sock.sendall(f"USER {user}\r\nPASS {password}\r\nSTAT\r\n".encode())
        self.ok("USER")
        self.ok("PASS")
        n = int(self.ok("STAT").split()[1])
        start = self.received - (len(self.buf) - self.pos)
        self.sock.sendall(b"".join(b"RETR %d\r\n" % i for i in range(1, n + 1)))
        for i in range(1, n + 1):
            self.ok(f"RETR {i}")
            self.skip_body()
        got = self.received - (len(self.buf) - self.pos) - start
        self.sock.sendall(b"".join(b"DELE %d\r\n" % i for i in range(1, n + 1)) + b"QUIT\r\n")
        for i in range(1, n + 1):
            self.ok(f"DELE {i}")
        self.ok("QUIT")
        self.sock.close()
        return n, got


def tls_context(cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def cmd_raw(spec: dict[str, Any]) -> int:
    ctx = tls_context(spec["cafile"])
    base = reset_hwm()
    t0 = time.perf_counter()

    def one(acct: list[str]) -> tuple[int, int]:
        return RawReader(spec["host"], spec["port"], ctx).job(acct[0], acct[1])

    with ThreadPoolExecutor(max(1, int(spec.get("sessions", 1)))) as pool:
        done = list(pool.map(one, spec["accounts"]))
    return finish({"mails": sum(m for m, _ in done), "bytes": sum(b for _, b in done)}, base, t0)


# --------------------------------------------------------------------------- stdlib poplib


def cmd_poplib(spec: dict[str, Any]) -> int:
    import poplib

    ctx = tls_context(spec["cafile"])
    base = reset_hwm()
    t0 = time.perf_counter()
    mails = octets_total = 0
    for user, password in spec["accounts"]:
        pop = poplib.POP3_SSL(spec["host"], spec["port"], context=ctx, timeout=120)
        pop.user(user)
        pop.pass_(password)
        n, _ = pop.stat()
        for i in range(1, n + 1):
            _, _lines, octets = pop.retr(i)
            octets_total += octets
            pop.dele(i)
        pop.quit()
        mails += n
    return finish({"mails": mails, "bytes": octets_total}, base, t0)


# --------------------------------------------------------------------------- mail packs


def read_pack(path: str) -> tuple[list[bytes], list[str]]:
    """The mails of a workload as delivered by POP3 (CRLF, unstuffed) and each one's mailbox.
    ``path`` holds them back to back; ``path``.json their lengths and mailboxes."""
    index = json.loads(Path(path + ".json").read_text())
    data = Path(path).read_bytes()
    mails, at = [], 0
    for n in index["lengths"]:
        mails.append(data[at : at + n])
        at += n
    if at != len(data):
        raise PeerError(f"pack {path}: {len(data)} bytes, the index says {at}")
    return mails, index["mailboxes"]


# --------------------------------------------------------------------------- produce limit


def cmd_produce(spec: dict[str, Any]) -> int:
    sys.path.insert(0, str(HERE.parent))
    from confluent_kafka import KafkaError, Producer

    from connector.delivery.kafka import producer_config

    mails, boxes = read_pack(spec["pack"])
    chunk = int(spec["chunk_bytes"])
    conf = producer_config(spec["bootstrap"], {}, 60.0)
    transactional = spec["mode"] == "transactional"
    if transactional:
        conf["transactional.id"] = spec["transactional_id"]
    acked = [0]
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            errors.append(err.str())
        else:
            acked[0] += 1

    base = reset_hwm()
    t0 = time.perf_counter()
    producer = Producer(conf)
    if transactional:
        producer.init_transactions(30)
        producer.begin_transaction()
    sent = 0
    for raw, box in zip(mails, boxes, strict=True):
        key = box.encode()
        # Records of at most chunk_bytes, as the connector's chunk records (a 50 MB mail does
        # not fit the broker's message.max.bytes in one).
        for at in range(0, max(1, len(raw)), chunk):
            while True:
                try:
                    producer.produce(spec["topic"], raw[at : at + chunk], key, on_delivery=on_delivery)
                    break
                except BufferError:
                    producer.poll(0.05)
            sent += 1
        producer.poll(0)
    if transactional:
        producer.commit_transaction(120)
    left = producer.flush(120)
    if left or errors or acked[0] != sent:
        raise PeerError(f"{left} records unflushed, {acked[0]}/{sent} acknowledged, errors: {errors[:3]}")
    done = {"mails": len(mails), "bytes": sum(map(len, mails)), "records": sent, "acked": acked[0]}
    return finish(done, base, t0)


# --------------------------------------------------------------------------- decode only


def cmd_decode(spec: dict[str, Any]) -> int:
    sys.path.insert(0, str(HERE.parent))
    import hashlib

    from connector.config import load_config
    from connector.decoding import decode_mail
    from connector.records import Provenance, build_mail_record, encode_single_object, mail_schema

    mails, boxes = read_pack(spec["pack"])
    options = load_config(spec["config"]).mailboxes[0].decode
    schema = mail_schema()
    base = reset_hwm()
    t0 = time.perf_counter()
    encoded = 0
    for i, (raw, box) in enumerate(zip(mails, boxes, strict=True)):
        prov = Provenance(box, str(i), "bench:995", 0, len(raw), hashlib.sha256(raw).hexdigest())
        encoded += len(encode_single_object(schema, build_mail_record(decode_mail(raw, options=options), prov)))
    return finish({"mails": len(mails), "bytes": sum(map(len, mails)), "encoded_bytes": encoded}, base, t0)


# --------------------------------------------------------------------------- the connector


def cmd_connector(config: str) -> int:
    """``pop3-kafka poll-once --config CONFIG`` in bench/_rss_child.py as the console script runs
    it (the CLI imports as it goes: its first POP3 sessions open before the Kafka side is
    imported), VmHWM reset once the CLI's eager imports are done; it prints ``RSS-CHILD
    {json}``. A configuration with S/MIME keys gets the S/MIME modules imported at that point
    too (the CLI would at the first S/MIME mail), so S/MIME mail measures the work, not the
    import of asn1crypto; other workloads never import them, as with the CLI."""
    sys.path.insert(0, str(HERE))
    import _rss_child
    import yaml

    doc = yaml.safe_load(Path(config).read_text())
    smime = any("smime" in m for m in doc.get("mailboxes", []))
    extra = ("connector.decoding.smime", "asn1crypto.cms") if smime else ()
    return _rss_child.main([config], as_cli=True, at_baseline=extra)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("raw", "poplib", "produce", "decode", "connector"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "connector":
        return cmd_connector(argv[1])
    spec = json.loads(Path(argv[1]).read_text())
    cmd = {"raw": cmd_raw, "poplib": cmd_poplib, "produce": cmd_produce, "decode": cmd_decode}[argv[0]]
    try:
        return cmd(spec)
    except PeerError as exc:
        print(f"peers.py {argv[0]}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
