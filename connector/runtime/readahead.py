"""Read-ahead: a cycle's retrieval runs in its own thread while the cycle decodes and produces.

For large mail the cycle thread was busy with one mail at a time: RETR into the spool (TLS
reads, unstuffing, SHA-256, file writes), then decoding it in place and producing its chunk
records, then the next RETR. Most of a retrieval's CPU (the TLS decryption, the hashing, the
spool writes) runs without the GIL, so a second thread receiving mail N+1 while the cycle
thread decodes mail N overlaps the two on a machine with a second CPU (measured in
docs/decisions/0001, "Fifth round"). Small mail gains nothing from it: there the decode workers
overlap the decoding, and handing every mail between threads costs more than it saves.

The POP3 session stays single-threaded: while a :class:`ReadAhead` is open, only its thread
iterates the session's RETR generator, and :meth:`ReadAhead.close` returns only once that
thread has closed the generator (which reads the answers still in flight, so the session is
in step for DELE) and ended. The thread runs in a copy of the caller's context, so the
caller's time limit (connector.protocol.transport.time_limit) bounds its reads too.

When the caller stops early (shutdown, the cycle's time limit), the mail being received ahead
is received to its end and dropped, like the RETRs still in flight that closing the RETR
generator drains anyway: with PIPELINING that is no more than before; without it, one mail
more. Close from the thread that iterates; an interrupt (KeyboardInterrupt) inside close()
leaves the reader running, so the session must not be used after one.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Final

from connector.protocol import Retrieved

__all__ = ["ReadAhead"]

log = logging.getLogger("pop3kafka.cycle")

Item = tuple[int, Retrieved]
#: how often a waiting reader looks at the stop flag (seconds).
_WAKE: Final = 0.05


class ReadAhead(Iterator[Item]):
    """Iterate ``source`` (``(msg_num, Retrieved)`` pairs, e.g. ``retr_many``) in a thread of
    its own, at most ``depth`` mails ahead of the consumer: while the consumer holds mail N,
    mail N+1 is being received (up to ``depth`` of them received and waiting). Items come out
    in order; an exception the source raises comes out, as raised, where the next item would
    have. Close it (or exhaust it) before using the session again."""

    def __init__(self, source: Iterator[Item], *, depth: int = 1, name: str = "read-ahead") -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._source = source
        self._ready: queue.SimpleQueue[tuple[str, Item | BaseException | None]] = queue.SimpleQueue()
        # A slot per mail the reader may receive before the consumer takes it.
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._finished = False  # the consumer saw the end or an error
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                while not self._slots.acquire(timeout=_WAKE):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                try:
                    item = next(self._source)
                except StopIteration:
                    self._ready.put(("end", None))
                    return
                self._ready.put(("item", item))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._ready.put(("error", exc))
        finally:
            # Here, in the thread that iterated it: the generator reads (and drops) the
            # answers still in flight, so the session stays in step.
            close = getattr(self._source, "close", None)
            if close is not None:
                try:
                    close()
                except BaseException as exc:  # noqa: BLE001 - the consumer meets it next
                    self._ready.put(("error", exc))

    def __next__(self) -> Item:
        if self._finished:
            raise StopIteration
        kind, value = self._ready.get()
        if kind == "item":
            self._slots.release()
            assert isinstance(value, tuple)
            return value
        self._finished = True
        self._thread.join()
        if kind == "error":
            assert isinstance(value, BaseException)
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop reading ahead: mails received but not taken are closed (their spool files
        removed; they stay on the server), the source is closed in the reader's thread, and
        this returns once that thread has ended. Idempotent."""
        self._stop.set()
        self._slots.release()  # a reader waiting for a slot wakes at once
        self._thread.join()
        self._finished = True
        while True:
            try:
                kind, value = self._ready.get_nowait()
            except queue.Empty:
                return
            if kind == "item":
                assert isinstance(value, tuple)
                value[1].close()
            elif kind == "error":
                # The consumer stopped before it reached this (a failure while draining the
                # RETRs in flight, say): the session is closed by then, nothing else to do.
                log.debug("read-ahead: error after the consumer stopped: %r", value)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
