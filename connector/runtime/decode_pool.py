"""Decoding in worker processes, side by side with retrieval and produce (issue 10).

Why processes: decoding a mail and encoding its Avro record is pure Python CPU work, and
threads share one interpreter lock, so in one process a mailbox's retrieval waits while its
mail decodes. A reader thread beside the cycle thread measured slower, not faster
(bench/results/compare.md, "Profile"). With one worker process the cycle thread reads the
next mails while the worker decodes this one; records come back in server order
(cycle.retrieve_encoded), so nothing about the delivery protocol changes.

How they are made: forked once, at start (``start``), before any other thread of this
process exists. fork() copies only the calling thread, so a lock held by another thread at
that moment (librdkafka's, the logging module's) would stay locked in the child forever;
forking first makes that impossible. The workers inherit the loaded configuration, S/MIME
private keys and trust stores included: those are never pickled or sent anywhere. A job
carries a mailbox id, the mail as received and its facts; the answer is the Avro body of
the record (the parent frames it) and the signature checks (the parent counts them).

How they talk: a pair of pipes per worker and length-prefixed frames, written and read by
the cycle thread itself. A process pool executor measured ~0.5 ms of parent CPU per mail
(its manager and feeder threads, pickling, lock hand-offs under the interpreter lock): more
than the decoding it moved away. Here a mail costs a few system calls and no pickling. The
parent never blocks writing a job while a reply waits unread (it reads replies whenever the
job pipe is full), so the two pipes cannot deadlock. A cycle thread takes a worker for its
whole retrieval (``checkout``); with more cycles at once than workers, the others decode in
their own thread, as without workers.

What stays in the parent: everything but the plain case. A mail that does not decode, one
whose content needs chunk records or the offload store (only the parent produces), a
spooled mail (decoded in place from its file), a worker that died, a configuration
reloaded since the fork: the worker answers None (or the parent sees the pool broken) and
the cycle thread decodes the mail itself through the one path it uses without workers, so
errors, dead letters, placement and their logs are the same either way.

A worker never outlives its parent: it asks the kernel for SIGKILL when the parent dies
(Linux PR_SET_PDEATHSIG), ends when its job pipe closes, and ignores SIGINT and SIGTERM,
which a terminal or a container runtime may send to the whole process group (the parent
decides how to stop).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import logging
import math
import os
import pickle
import select
import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from connector.config.model import Config, MailboxConfig
from connector.delivery.kafka import Delivery
from connector.records import mail_schema, record_id
from connector.records.framing import SINGLE_OBJECT
from connector.runtime.cycle import Encoded, encode_mail_checked, record_key
from connector.runtime.placement import INLINE_BUDGET, Placer

log = logging.getLogger("pop3kafka.decode")

#: ``runtime.decode_processes`` unset: one less than the CPUs this process may use (the
#: cycle threads need one), at most this many.
AUTO_MAX = 4
#: a reply not received within this many seconds: the worker is killed and the parent
#: decodes the mail itself (decoding has its own, shorter limits; this catches a hang).
REPLY_TIMEOUT = 300.0
#: pipe capacity asked for (Linux F_SETPIPE_SZ; capped by /proc/sys/fs/pipe-max-size):
#: fewer wake-ups per mail than the default 64 KiB.
PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031

#: frames: a 4-byte big-endian length, then the payload.
_LEN = struct.Struct("!I")
#: a job: mailbox index in config.mailboxes, UIDL length, fetched_at, SHA-256 (raw), then
#: the UIDL (UTF-8) and the mail.
_JOB = struct.Struct("!HHq32s")
#: a reply's first byte.
_PARENT, _BODY, _BODY_AND_CHECKS = 0, 1, 2

#: the configuration the workers were forked with (set in the parent just before the fork,
#: inherited by the children; never sent).
_config: Config | None = None
_pool: DecodePool | None = None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, cut by a cgroup v2 CPU quota (a
    Kubernetes CPU limit) when there is one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit readable: the affinity mask it is
    return max(1, cpus)


def wanted_processes(config: Config) -> int:
    """How many decode workers ``config`` asks for: none when no mailbox decodes MIME."""
    if not any(m.decode.mime_decoding for m in config.mailboxes):
        return 0
    n = config.runtime.decode_processes
    if n is None:
        n = min(AUTO_MAX, usable_cpus() - 1)
    return max(0, n)


class WorkerGone(Exception):  # noqa: N818 - a state, handled inside this module's callers
    """The worker died or hung; the parent decodes the mails it had."""


class Channel:
    """The parent's end of one worker: jobs out, replies back in the same order."""

    def __init__(self, pid: int, jobs: int, replies: int) -> None:
        self.pid = pid
        self._jobs = jobs
        self._replies = replies
        self._out = bytearray()
        self._in = bytearray()
        self._waiting = 0  # jobs sent (or queued in _out) whose reply was not taken
        self.broken = False
        os.set_blocking(jobs, False)
        os.set_blocking(replies, False)

    # -------------------------------------------------------------- parent side

    def submit(self, mailbox_index: int, uidl: str, raw: bytes, fetched_at: int, sha256: str) -> None:
        """Queue one mail for the worker and write what the pipe takes now."""
        u = uidl.encode()
        head = _JOB.pack(mailbox_index, len(u), fetched_at, bytes.fromhex(sha256))
        self._out += _LEN.pack(len(head) + len(u) + len(raw))
        self._out += head
        self._out += u
        self._out += raw
        self._waiting += 1
        self._pump(block=False)

    def ready(self) -> bool:
        """True when the oldest job's reply has arrived (never blocks)."""
        self._pump(block=False)
        return self._frame_complete()

    def take(self) -> Encoded | None:
        """The oldest job's reply: its record, or None when the parent must decode the mail.
        Raises WorkerGone when the worker died or did not answer in time."""
        deadline = time.monotonic() + REPLY_TIMEOUT
        while (frame := self._frame()) is None:
            if time.monotonic() > deadline:
                raise WorkerGone(f"no answer within {REPLY_TIMEOUT:.0f}s")
            self._pump(block=True, until=deadline)
        self._waiting -= 1
        kind = frame[0]
        if kind == _PARENT:
            return None
        if kind == _BODY:
            return Encoded(bytes(frame[1:]))
        (n,) = _LEN.unpack_from(frame, 1)
        body = bytes(frame[5 : 5 + n])
        return Encoded(body, pickle.loads(frame[5 + n :]))  # noqa: S301 - our own child's bytes

    @property
    def waiting(self) -> int:
        return self._waiting

    def _frame(self) -> memoryview | None:
        """The first complete reply frame in the input buffer, removed from it."""
        if not self._frame_complete():
            return None
        (n,) = _LEN.unpack_from(self._in)
        frame = memoryview(bytes(self._in[_LEN.size : _LEN.size + n]))
        del self._in[: _LEN.size + n]
        return frame

    def _pump(self, *, block: bool, until: float = 0.0) -> None:
        """Write queued jobs and read replies, as far as the pipes allow. Reading while a
        write would block is what keeps the pair of pipes from deadlocking."""
        if self.broken:
            raise WorkerGone("the worker is gone")
        while True:
            progressed = False
            if self._out:
                try:
                    n = os.write(self._jobs, self._out)
                except BlockingIOError:
                    n = 0
                except OSError as exc:  # EPIPE: the worker is gone
                    self.broken = True
                    raise WorkerGone(str(exc)) from None
                if n:
                    del self._out[:n]
                    progressed = True
            try:
                got = os.read(self._replies, PIPE_BYTES)
            except BlockingIOError:
                got = None
            except OSError as exc:
                self.broken = True
                raise WorkerGone(str(exc)) from None
            if got == b"":
                self.broken = True
                raise WorkerGone("the worker closed its pipe")
            if got:
                self._in += got
                progressed = True
            if not block or self._frame_complete():
                return
            if not progressed:
                left = until - time.monotonic()
                if left <= 0:
                    return
                select.select([self._replies], [self._jobs] if self._out else [], [], min(left, 1.0))

    def _frame_complete(self) -> bool:
        if len(self._in) < _LEN.size:
            return False
        n: int = _LEN.unpack_from(self._in)[0]
        return len(self._in) >= _LEN.size + n

    def close(self) -> None:
        for fd in (self._jobs, self._replies):
            with contextlib.suppress(OSError):
                os.close(fd)


class DecodePool:
    """The decode workers of one configuration (see the module docstring)."""

    def __init__(self, config: Config, processes: int) -> None:
        self.config = config
        self.processes = processes
        self._index = {m.id: i for i, m in enumerate(config.mailboxes)}
        self._free: deque[Channel] = deque()
        self._all: list[Channel] = []
        self._lock = threading.Lock()
        self._warned = False
        global _config  # noqa: PLW0603 - what the workers forked below inherit
        _config = config
        # The decoder is imported on first use (connector/decoding/__init__.py): imported here,
        # before the fork, the workers share its pages with this process instead of each
        # importing its own after it.
        import connector.decoding.mime  # noqa: F401, PLC0415

        for _ in range(processes):
            self._all.append(_fork_worker([fd for c in self._all for fd in (c._jobs, c._replies)]))
        self._free.extend(self._all)

    def takes(self, mailbox: MailboxConfig) -> bool:
        """True when this mailbox's mail may go to the workers: they were forked with this
        very mailbox object (a reload makes new ones) and it decodes MIME."""
        index = self._index.get(mailbox.id)
        return mailbox.decode.mime_decoding and index is not None and self.config.mailboxes[index] is mailbox

    @staticmethod
    def worth_sending(mailbox: MailboxConfig, size: int) -> bool:
        """False for a mail whose content may need chunk records or the offload store: a
        worker would decode it only to hand it back (measured: 1 MB mails took 7 % longer
        with workers before this check). A decoded attachment is never larger than its
        encoded mail (S/MIME compressed content can be: the worker hands such a mail back),
        so a mail within the inline limits keeps everything inline."""
        policy = mailbox.attachments
        return policy.placement == "none" or size <= min(policy.inline_max_bytes, INLINE_BUDGET)

    def checkout(self) -> list[Channel]:
        """Workers for one cycle thread: its share of the free ones (all of them when the
        configuration has one mailbox; one each when it has as many mailboxes as the cycles
        that may run at once); none when all are taken or gone."""
        cycles = max(1, min(len(self.config.mailboxes), self.config.runtime.max_concurrent_sessions))
        share = max(1, self.processes // cycles)
        with self._lock:
            return [self._free.popleft() for _ in range(min(share, len(self._free)))]

    def checkin(self, channels: Sequence[Channel]) -> None:
        """Give workers back. One with replies still unread (a cycle stopped early) is
        drained first, so the next cycle's first reply is its own."""
        for channel in channels:
            try:
                while channel.waiting and not channel.broken:
                    channel.take()
            except WorkerGone as exc:
                self.lost(channel, exc)
                continue
            if channel.broken:
                continue
            with self._lock:
                self._free.append(channel)

    def lost(self, channel: Channel, exc: BaseException) -> None:
        """A worker died or hung: killed, and never used again (forking anew is not safe
        once threads run); its mails are decoded in the cycle thread."""
        channel.broken = True
        with contextlib.suppress(OSError):
            os.kill(channel.pid, signal.SIGKILL)
        if not self._warned:
            self._warned = True
            log.warning("a decode worker process is gone (%s); its mail is decoded in the cycle threads", exc)

    def index(self, mailbox: MailboxConfig) -> int:
        return self._index[mailbox.id]

    def close(self, timeout: float = 5.0) -> None:
        """End every worker: close its job pipe (it exits at end of file), reap it."""
        for c in self._all:
            c.close()
        deadline = time.monotonic() + timeout
        for c in self._all:
            while True:
                try:
                    pid, _ = os.waitpid(c.pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid or time.monotonic() > deadline:
                    if not pid:
                        with contextlib.suppress(OSError):
                            os.kill(c.pid, signal.SIGKILL)
                        with contextlib.suppress(ChildProcessError):
                            os.waitpid(c.pid, 0)
                    break
                time.sleep(0.01)


def start(config: Config) -> DecodePool | None:
    """Fork the decode workers ``config`` asks for (``runtime.decode_processes``); call it
    before anything starts a thread. None when it asks for none, or when another thread
    already runs (then forking is not safe: mail is decoded in the cycle threads)."""
    global _pool  # noqa: PLW0603 - one pool per process
    n = wanted_processes(config)
    if n == 0:
        return None
    if threading.active_count() > 1:
        log.info("decode workers not started: other threads already run (forking is not safe then)")
        return None
    _pool = DecodePool(config, n)
    log.debug("%d decode worker process(es) started", n)
    return _pool


def current(config: Config) -> DecodePool | None:
    """The pool forked with ``config`` (the same object), if any."""
    pool = _pool
    return pool if pool is not None and pool.config is config else None


def stop() -> None:
    """Shut the workers down (at exit of the command that started them)."""
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.close()


# ---------------------------------------------------------------------------- worker side

#: prctl(2) option: the signal the kernel sends this process when its parent dies.
_PR_SET_PDEATHSIG = 1


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # Linux only; the default size works too
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_BYTES)
    return r, w


def _fork_worker(inherited: Sequence[int]) -> Channel:
    jobs_r, jobs_w = _pipe()
    replies_r, replies_w = _pipe()
    parent = os.getpid()
    # Everything the worker inherits is frozen for its garbage collector: it never collects
    # (so never finalises) the parent's objects, some of which own native state that only
    # lives in the parent (a Kafka producer's threads: collected in a fork, one crashed the
    # worker in the tests, which fork later than the CLI does), and its collections do not
    # write to the pages it shares with the parent (gc.freeze's documented use before fork).
    gc.freeze()
    try:
        pid = os.fork()
    finally:
        if os.getpid() == parent:
            gc.unfreeze()  # the parent collects its own objects as before
    if pid == 0:  # the worker: never returns into the parent's code
        code = 1
        try:
            os.close(jobs_w)
            os.close(replies_r)
            for fd in inherited:  # other workers' parent ends: their EOF must not wait for us
                with contextlib.suppress(OSError):
                    os.close(fd)
            _worker_init(parent)
            _serve(jobs_r, replies_w)
            code = 0
        finally:
            os._exit(code)
    os.close(jobs_r)
    os.close(replies_w)
    return Channel(pid, jobs_w, replies_r)


def _worker_init(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the job pipe's end of file ends the worker instead
    if os.getppid() != parent:  # the parent died between the fork and the prctl
        os._exit(1)


def _read_exact(fd: int, n: int) -> bytes | None:
    parts = []
    while n:
        got = os.read(fd, min(n, PIPE_BYTES))
        if not got:
            return None
        parts.append(got)
        n -= len(got)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        view = view[n:]


def _serve(jobs: int, replies: int) -> None:
    """The worker's loop: one job in, one reply out, until the job pipe closes."""
    while True:
        head = _read_exact(jobs, _LEN.size)
        if head is None:
            return
        (n,) = _LEN.unpack(head)
        payload = _read_exact(jobs, n)
        if payload is None:
            return
        index, ulen, fetched_at, digest = _JOB.unpack_from(payload)
        at = _JOB.size
        uidl = payload[at : at + ulen].decode()
        raw = payload[at + ulen :]
        got = _encode(index, uidl, raw, fetched_at, digest.hex())
        if got is None:
            reply = bytes([_PARENT])
        elif not got.signatures:
            reply = bytes([_BODY]) + got.body
        else:
            reply = bytes([_BODY_AND_CHECKS]) + _LEN.pack(len(got.body)) + got.body + pickle.dumps(got.signatures)
        _write_all(replies, _LEN.pack(len(reply)) + reply)


class _ParentOnly(Exception):  # noqa: N818 - control flow inside the worker
    """The mail's content needs the parent (chunk records or the offload store)."""


def _send_in_parent(_topic: str, _key: bytes, _value: bytes, _headers: Sequence[tuple[str, bytes]]) -> Delivery:
    raise _ParentOnly


def _encode(index: int, uidl: str, raw: bytes, fetched_at: int, sha256: str) -> Encoded | None:
    """One mail's record, decoded here; None: the parent decodes it (see module docstring)."""
    config = _config
    if config is None:
        return None
    try:
        mailbox = config.mailboxes[index]
        rid = record_id(mailbox.id, uidl)
        # No send and no store: content that would need them raises, and the parent does it.
        placer = Placer(config, mailbox, rid, record_key(config, mailbox, rid), _send_in_parent, None, SINGLE_OBJECT)
        schema = mail_schema()
        value, signatures = encode_mail_checked(
            mailbox, uidl, raw, fetched_at, schema, sha256=sha256, placer=placer, framer=SINGLE_OBJECT
        )
    except Exception:  # noqa: BLE001 - every failure is the parent's to handle, on its path
        return None
    return Encoded(value[len(schema.header) :], signatures)
