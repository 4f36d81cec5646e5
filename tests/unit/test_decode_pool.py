"""Decode worker processes (connector/runtime/decode_pool.py): records equal to the cycle
thread's, server order kept, every case the worker does not take decoded by the parent on its
own path, a dead or hung worker replaced by the parent, no orphan when the parent dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fakepop import Maildrop
from support.mailgen import SHAPES, make_mail

from connector.config import parse_config
from connector.config.model import Config
from connector.delivery.kafka import Publisher
from connector.errors import ConfigError
from connector.records import decode_single_object, mail_schema
from connector.runtime import decode_pool
from connector.runtime.cycle import CycleContext, encode_mail, placer_for, run_cycle
from connector.runtime.decode_pool import DecodePool, WorkerGone

MOCK = {"test.mock.num.brokers": 1}
REPO = Path(__file__).resolve().parents[2]


def make_config(mailboxes: int = 1, runtime: dict[str, Any] | None = None, **mailbox: Any) -> Config:
    boxes = []
    for i in range(mailboxes):
        m: dict[str, Any] = {"id": f"box{i}", "host": "pop.test", "username": "u", "password": {"env": "PW"}}
        m.update(mailbox)
        boxes.append(m)
    doc: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "mock:9092", "delivery_timeout_seconds": 5},
        "topics": {"mail": "mail"},
        "mailboxes": boxes,
    }
    if runtime is not None:
        doc["runtime"] = runtime
    return parse_config(doc, environ={"PW": "pw"})


@pytest.fixture
def pool_for() -> Iterator[Any]:
    """Start a pool for a configuration as the CLI does (decode_pool.start's module state);
    stopped and reaped after the test."""
    made: list[DecodePool] = []

    def make(config: Config, processes: int = 1) -> DecodePool:
        pool = DecodePool(config, processes)
        decode_pool._pool = pool  # what start() sets; start() itself refuses under pytest's threads
        made.append(pool)
        return pool

    yield make
    decode_pool._pool = None
    for p in made:
        p.close()
        for c in p._all:  # every worker reaped: no zombie, no orphan
            with pytest.raises(ChildProcessError):
                os.waitpid(c.pid, os.WNOHANG)


@pytest.fixture(scope="module")
def publisher() -> Publisher:
    return Publisher("mock:9092", MOCK, 5)


def body_of(config: Config, raw: bytes, uidl: str = "U1", fetched_at: int = 1_700_000_000_000) -> bytes:
    """The record the cycle thread makes of ``raw``, without its framing header."""
    m = config.mailboxes[0]
    import hashlib

    value = encode_mail(
        m,
        uidl,
        raw,
        fetched_at,
        mail_schema(),
        sha256=hashlib.sha256(raw).hexdigest(),
        placer=placer_for(config, m, lambda *a: pytest.fail("no chunk records expected"))(f"{m.id}:{uidl}"),
    )
    return value[len(mail_schema().header) :]


# ---------------------------------------------------------------------------- the channel


def test_worker_records_equal_the_cycle_threads_in_job_order(pool_for: Any) -> None:
    import hashlib

    config = make_config()
    pool = pool_for(config)
    [channel] = pool.checkout()
    raws = [make_mail(i, shape)[0] for i, shape in enumerate(SHAPES * 3)]
    for i, raw in enumerate(raws):
        channel.submit(0, f"U{i}", raw, 1_700_000_000_000, hashlib.sha256(raw).hexdigest())
    assert channel.waiting == len(raws)
    for i, raw in enumerate(raws):
        got = channel.take()
        assert got is not None, SHAPES[i % len(SHAPES)]
        assert got.body == body_of(config, raw, f"U{i}"), f"mail {i} differs from the in-thread record"
        assert got.signatures == ()
    assert channel.waiting == 0
    pool.checkin([channel])
    assert pool.checkout() == [channel]  # given back, usable again


def test_many_large_jobs_queued_without_reading_do_not_deadlock(pool_for: Any) -> None:
    """Jobs and replies far beyond both pipes' capacity: submit() never blocks, because the
    parent reads replies whenever the job pipe is full."""
    config = make_config()
    pool = pool_for(config)
    [channel] = pool.checkout()
    raw = make_mail(1, "attachments")[0]
    big = raw.replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"p" * 900 + b"\r\n\r\n", 1)
    n = 400  # ~400 x (1 KB + record) each way: several MB against 1 MiB pipes
    t0 = time.monotonic()
    for i in range(n):
        channel.submit(0, f"U{i}", big, 1, "00" * 32)
    assert time.monotonic() - t0 < 60
    results = [channel.take() for _ in range(n)]
    assert all(r is not None for r in results)
    assert len({r.body for r in results if r is not None}) == n  # each its own uidl/record id
    pool.checkin([channel])


class _Finalised:
    """Garbage only the cyclic collector frees (it refers to itself); says where it died."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.me = self

    def __del__(self) -> None:
        with self.path.open("a") as f:
            f.write(f"{os.getpid()}\n")


def test_a_worker_never_collects_the_parents_garbage(pool_for: Any, tmp_path: Path) -> None:
    """Objects the parent no longer uses but has not collected yet (a Kafka producer's, whose
    threads only exist in the parent, crashed a worker that collected one) are frozen for the
    worker's collector: finalised in the parent, never in a worker."""
    import gc

    where = tmp_path / "finalised"
    gc.collect()
    gc.disable()  # the garbage must still be there at the fork
    try:
        _Finalised(where)  # unreachable at once, freed only by a collection
        pool = pool_for(make_config())
    finally:
        gc.enable()
    [channel] = pool.checkout()
    raw = make_mail(1, "attachments")[0]
    for i in range(300):  # enough allocation in the worker for several collections
        channel.submit(0, f"U{i}", raw, 1, "00" * 32)
    assert all(channel.take() is not None for _ in range(300))
    pool.checkin([channel])
    assert not where.exists()  # no worker finalised it
    gc.collect()
    assert where.read_text().split() == [str(os.getpid())]


def test_undecodable_and_parent_only_mail_come_back_as_none(pool_for: Any) -> None:
    """The worker hands back what only the parent may do: content that needs chunk records
    (only the parent produces) and a mail that does not decode (the parent makes its dead
    letter); the worker goes on with the next mail."""
    config = make_config(attachments={"placement": "chunked", "inline_max_bytes": 1024}, decode_limits={"max_parts": 2})
    pool = pool_for(config)
    [channel] = pool.checkout()
    with_attachment = make_mail(2, "attachments")[0]
    plain = make_mail(0, "plain")[0]
    many_parts = make_mail(1, "alternative")[0]
    for i, raw in enumerate((with_attachment, plain)):
        channel.submit(0, f"U{i}", raw, 1, "00" * 32)
    assert channel.take() is None  # over the parts limit (and chunked placement): the parent does it
    assert channel.take() is not None  # the worker is still fine afterwards
    pool.checkin([channel])
    relaxed = make_config(attachments={"placement": "chunked", "inline_max_bytes": 1024})
    pool2 = pool_for(relaxed)
    [c2] = pool2.checkout()
    c2.submit(0, "U9", with_attachment, 1, "00" * 32)
    c2.submit(0, "U8", many_parts, 1, "00" * 32)
    assert c2.take() is None  # decodes, but its attachment needs chunk records
    assert c2.take() is not None
    pool2.checkin([c2])


def test_killed_worker_is_reported_and_never_used_again(pool_for: Any) -> None:
    config = make_config()
    pool = pool_for(config, processes=1)
    [channel] = pool.checkout()
    os.kill(channel.pid, signal.SIGKILL)
    os.waitpid(channel.pid, 0)
    raw = make_mail(0)[0]
    with pytest.raises(WorkerGone):
        channel.submit(0, "U0", raw, 1, "00" * 32)
        channel.take()
    pool.lost(channel, WorkerGone("test"))
    pool.checkin([channel])
    assert pool.checkout() == []  # a lost worker is not handed out again


def test_worker_that_does_not_answer_is_given_up(pool_for: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config()
    pool = pool_for(config)
    [channel] = pool.checkout()
    os.kill(channel.pid, signal.SIGSTOP)  # hung: alive, silent
    try:
        monkeypatch.setattr(decode_pool, "REPLY_TIMEOUT", 0.5)
        channel.submit(0, "U0", make_mail(0)[0], 1, "00" * 32)
        with pytest.raises(WorkerGone, match="no answer"):
            channel.take()
    finally:
        pool.lost(channel, WorkerGone("hung"))  # SIGKILL ends a stopped process too


def test_worker_dies_with_its_parent() -> None:
    """PR_SET_PDEATHSIG: a parent killed with SIGKILL (a crash, the OOM killer) leaves no
    decode worker behind."""
    code = textwrap.dedent(
        """
        import os, signal
        from connector.config import parse_config
        from connector.runtime import decode_pool

        cfg = parse_config(
            {
                "kafka": {"bootstrap_servers": "x:9092"},
                "topics": {"mail": "m"},
                "runtime": {"decode_processes": 2},
                "mailboxes": [{"id": "a", "host": "h", "username": "u", "password": {"env": "PW"}}],
            },
            environ={"PW": "pw"},
        )
        pool = decode_pool.start(cfg)
        print(" ".join(str(c.pid) for c in pool._all), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        time.sleep(0.05)
    assert not alive, f"decode workers {alive} outlived their parent"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


# ---------------------------------------------------------------------------- the cycle


def drop_of(n: int) -> Maildrop:
    drop = Maildrop()
    for i in range(n):
        drop.add(f"UID{i:04d}", make_mail(i)[0])
    return drop


def published(publisher: Publisher, config: Config, drop: Maildrop) -> tuple[Any, list[tuple[str, bytes]]]:
    sent: list[tuple[str, bytes]] = []
    real = publisher.send

    def spy(topic: str, key: bytes, value: bytes, headers: Any, **kw: Any) -> Any:
        sent.append((topic, value))
        return real(topic, key, value, headers, **kw)

    ctx = CycleContext(config=config, publisher=publisher, session_factory=drop.session)
    publisher.send = spy  # type: ignore[method-assign]
    try:
        res = run_cycle(ctx, config.mailboxes[0])
    finally:
        del publisher.send
    return res, sent


def test_cycle_with_a_worker_publishes_what_the_thread_would_in_server_order(
    pool_for: Any, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("connector.runtime.cycle.time.time_ns", lambda: 1_700_000_000_000_000_000)
    monkeypatch.setattr("connector.runtime.cycle.WORKER_QUEUE", 10_000)  # every mail to the worker
    config = make_config()
    serial_res, serial = published(publisher, config, drop_of(40))
    pool = pool_for(config)
    calls = []
    real_submit = decode_pool.Channel.submit
    monkeypatch.setattr(decode_pool.Channel, "submit", lambda self, *a: (calls.append(a[1]), real_submit(self, *a))[1])
    pooled_res, pooled = published(publisher, config, drop_of(40))
    assert serial_res.ok and pooled_res.ok
    assert (pooled_res.published, pooled_res.deleted) == (serial_res.published, serial_res.deleted) == (40, 40)
    assert len(calls) == 40  # every mail went to the worker
    assert [decode_single_object(v)["record_id"].split(":", 1)[1] for _, v in pooled] == [
        f"UID{i:04d}" for i in range(40)
    ]
    assert pooled == serial  # byte for byte
    assert pool.checkout() != []  # the worker went back to the pool


def test_cycle_thread_shares_the_decoding_when_the_worker_is_busy(
    pool_for: Any, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the worker's queue full the cycle thread decodes the next mail itself; the
    records are the same, in the same order, whoever decoded them."""
    monkeypatch.setattr("connector.runtime.cycle.time.time_ns", lambda: 1_700_000_000_000_000_000)
    # A short queue, so 40 mails read from memory surely fill it: the logic is the same at any depth.
    monkeypatch.setattr("connector.runtime.cycle.WORKER_QUEUE", 2)
    config = make_config()
    _, serial = published(publisher, config, drop_of(40))
    pool_for(config)
    calls: list[str] = []
    real_submit = decode_pool.Channel.submit

    def submit(self: Any, *a: Any) -> None:
        assert self.waiting < 2  # never more than WORKER_QUEUE mails wait for one worker
        calls.append(a[1])
        real_submit(self, *a)

    monkeypatch.setattr(decode_pool.Channel, "submit", submit)
    res, shared = published(publisher, config, drop_of(40))
    assert res.ok and (res.published, res.deleted) == (40, 40)
    assert 2 <= len(calls) < 40  # both decoded: the worker (the first two at least) and this thread
    assert shared == serial


def test_cycle_survives_a_worker_killed_mid_cycle(
    pool_for: Any, publisher: Publisher, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config()
    pool = pool_for(config)
    [victim] = pool._all
    real_submit = decode_pool.Channel.submit
    seen = []

    def submit(self: Any, *a: Any) -> None:
        seen.append(a[1])
        if len(seen) == 7:
            os.kill(victim.pid, signal.SIGKILL)
            os.waitpid(victim.pid, 0)
        real_submit(self, *a)

    monkeypatch.setattr(decode_pool.Channel, "submit", submit)
    res, sent = published(publisher, config, drop_of(30))
    assert res.ok and res.published == 30 and res.deleted == 30
    assert [decode_single_object(v)["record_id"].split(":", 1)[1] for _, v in sent] == [
        f"UID{i:04d}" for i in range(30)
    ]
    assert "decode worker process is gone" in caplog.text
    assert pool.checkout() == []


def test_mail_the_worker_hands_back_becomes_a_dead_letter_in_the_parent(pool_for: Any, publisher: Publisher) -> None:
    config = make_config(on_undecodable="dead_letter", decode_limits={"max_parts": 2})
    pool_for(config)
    drop = drop_of(6)  # shapes with more than two parts exceed the limit
    res, sent = published(publisher, config, drop)
    assert res.ok and res.published + res.dead_lettered == 6 and res.dead_lettered > 0
    topics = [t for t, _ in sent]
    assert topics.count(config.topics.dead_letter) == res.dead_lettered


def test_spooled_mail_is_decoded_in_the_cycle_thread(
    pool_for: Any, publisher: Publisher, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = make_config(runtime={"spool_threshold_bytes": 0, "spool_directory": str(tmp_path)})
    pool_for(config)
    calls = []
    monkeypatch.setattr(decode_pool.Channel, "submit", lambda self, *a: calls.append(a))
    res, _ = published(publisher, config, drop_of(5))
    assert res.ok and res.published == 5
    assert calls == []  # spooled: decoded in place from its file, never sent to a worker


def test_mail_over_the_inline_limit_is_not_sent_to_a_worker(
    pool_for: Any, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Content that may need chunk records is decoded in the cycle thread at once, not
    decoded by a worker only to be handed back."""
    monkeypatch.setattr("connector.runtime.cycle.WORKER_QUEUE", 10_000)
    config = make_config(attachments={"placement": "chunked", "inline_max_bytes": 2048})
    pool_for(config)
    drop = drop_of(12)
    small = {u for u, raw in drop.mails.items() if len(raw) <= 2048}
    assert small and len(small) < 12  # the mix has both
    sent: list[str] = []
    real_submit = decode_pool.Channel.submit
    monkeypatch.setattr(decode_pool.Channel, "submit", lambda self, *a: (sent.append(a[1]), real_submit(self, *a))[1])
    res, _ = published(publisher, config, drop)
    assert res.ok and res.published == 12
    assert set(sent) == small
    assert DecodePool.worth_sending(make_config(attachments={"placement": "none"}).mailboxes[0], 10**9)


def test_reloaded_mailbox_is_not_sent_to_workers_forked_with_the_old_one(pool_for: Any) -> None:
    old = make_config()
    pool = pool_for(old)
    new = make_config()  # the same file read again: new objects
    assert pool.takes(old.mailboxes[0])
    assert not pool.takes(new.mailboxes[0])
    assert decode_pool.current(new) is None


# ---------------------------------------------------------------------------- configuration


def test_processes_wanted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_pool, "usable_cpus", lambda: 8)
    assert decode_pool.wanted_processes(make_config()) == decode_pool.AUTO_MAX
    monkeypatch.setattr(decode_pool, "usable_cpus", lambda: 2)
    assert decode_pool.wanted_processes(make_config()) == 1
    monkeypatch.setattr(decode_pool, "usable_cpus", lambda: 1)
    assert decode_pool.wanted_processes(make_config()) == 0
    assert decode_pool.wanted_processes(make_config(runtime={"decode_processes": 3})) == 3
    assert decode_pool.wanted_processes(make_config(runtime={"decode_processes": 0})) == 0
    # raw passthrough everywhere: nothing to decode, no workers
    assert decode_pool.wanted_processes(make_config(mime_decoding=False, runtime={"decode_processes": 3})) == 0


@pytest.mark.parametrize("bad", [-1, 65, "two", 1.5])
def test_bad_decode_processes_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigError, match="decode_processes"):
        make_config(runtime={"decode_processes": bad})


def test_start_refuses_to_fork_beside_other_threads() -> None:
    import threading

    hold = threading.Event()
    t = threading.Thread(target=hold.wait)
    t.start()
    try:
        assert decode_pool.start(make_config(runtime={"decode_processes": 1})) is None
    finally:
        hold.set()
        t.join()


def test_usable_cpus_is_at_least_one() -> None:
    assert 1 <= decode_pool.usable_cpus() <= (os.cpu_count() or 1)
