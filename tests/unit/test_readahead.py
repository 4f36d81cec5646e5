"""ReadAhead (connector/runtime/readahead.py): the retrieval runs in a thread of its own, at
most one mail ahead; order, errors, early close and the caller's time limit are as without it."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator

import pytest

from connector.errors import Pop3ConnectError, Pop3TimeoutError
from connector.protocol import Retrieved
from connector.protocol.spool import SpoolPolicy
from connector.protocol.transport import _left, time_limit
from connector.runtime.cycle import reads_ahead
from connector.runtime.readahead import ReadAhead


class Source:
    """A retr_many stand-in that records what it did, and in which thread."""

    def __init__(self, n: int, *, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.n, self.fail_at, self.delay = n, fail_at, delay
        self.produced = 0
        self.threads: set[str] = set()
        self.closed_in: str | None = None
        self.mails: list[Retrieved] = []
        self.limits: list[str | None] = []

    def gen(self) -> Generator[tuple[int, Retrieved], None, None]:
        try:
            for i in range(1, self.n + 1):
                self.threads.add(threading.current_thread().name)
                left = _left()
                self.limits.append(left[1] if left else None)
                time.sleep(self.delay)
                if i == self.fail_at:
                    raise Pop3ConnectError(f"connection lost at {i}")
                mail = Retrieved.from_bytes(b"Subject: %d\r\n\r\nbody\r\n" % i)
                self.mails.append(mail)
                self.produced += 1
                yield i, mail
        finally:
            self.closed_in = threading.current_thread().name


def test_items_come_in_order_from_another_thread_and_the_source_is_closed_there() -> None:
    src = Source(5)
    with ReadAhead(src.gen(), name="ra-test") as ahead:
        got = [n for n, _ in ahead]
    assert got == [1, 2, 3, 4, 5]
    assert src.threads == {"ra-test"}
    assert src.closed_in == "ra-test"


def test_at_most_one_mail_is_received_ahead_of_the_consumer() -> None:
    src = Source(10)
    ahead = ReadAhead(src.gen())
    try:
        first = next(ahead)
        assert first[0] == 1
        time.sleep(0.2)  # the reader has had time to run as far as it may
        # The consumer holds mail 1; mail 2 is received (its slot), mail 3 is not.
        assert src.produced == 2
        next(ahead)
        time.sleep(0.2)
        assert src.produced == 3
    finally:
        ahead.close()


def test_an_error_comes_out_where_the_next_item_would_have() -> None:
    src = Source(5, fail_at=3)
    ahead = ReadAhead(src.gen())
    got = [next(ahead)[0], next(ahead)[0]]
    with pytest.raises(Pop3ConnectError, match="connection lost at 3"):
        next(ahead)
    with pytest.raises(StopIteration):
        next(ahead)
    ahead.close()
    assert got == [1, 2]
    assert src.closed_in is not None and src.closed_in != threading.current_thread().name


def test_closing_early_closes_the_mail_received_ahead_and_the_source() -> None:
    src = Source(10)
    ahead = ReadAhead(src.gen())
    _, mail1 = next(ahead)
    time.sleep(0.2)
    ahead.close()
    ahead.close()  # idempotent
    assert src.produced == 2
    assert src.closed_in is not None  # closed in the reader's thread: in-flight RETRs drained
    # The one received ahead was never handed out: it is closed (a spool file would be gone);
    # the consumer's own mail is the consumer's to close.
    assert src.mails[1]._data is None
    assert mail1.read().startswith(b"Subject: 1")
    with pytest.raises(StopIteration):
        next(ahead)
    mail1.close()


def test_close_while_the_reader_is_receiving_waits_for_it() -> None:
    src = Source(3, delay=0.3)
    ahead = ReadAhead(src.gen())
    t0 = time.monotonic()
    ahead.close()  # the reader is inside mail 1 (0.3 s): close returns once it is done
    assert time.monotonic() - t0 >= 0.25
    assert src.closed_in is not None
    assert src.produced <= 1


def test_the_callers_time_limit_bounds_the_reader() -> None:
    src = Source(2)
    with time_limit(30.0, "the test's limit"), ReadAhead(src.gen()) as ahead:
        assert [n for n, _ in ahead] == [1, 2]
    assert src.limits == ["the test's limit", "the test's limit"]


def test_a_timeout_in_the_reader_reaches_the_consumer() -> None:
    def gen() -> Generator[tuple[int, Retrieved], None, None]:
        yield 1, Retrieved.from_bytes(b"a\r\n")
        raise Pop3TimeoutError("the fetch phase's limit")

    ahead = ReadAhead(gen())
    assert next(ahead)[0] == 1
    with pytest.raises(Pop3TimeoutError):
        next(ahead)
    ahead.close()


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth"):
        ReadAhead(iter([]), depth=0)


def test_only_cycles_with_several_large_mails_read_ahead() -> None:
    spool = SpoolPolicy(threshold=1000)
    sizes = {1: 5000, 2: 200, 3: 5000, 4: 1000}
    assert reads_ahead([1, 2, 3], sizes, spool)
    assert not reads_ahead([1, 2, 4], sizes, spool)  # one over the threshold (4 is at it)
    assert not reads_ahead([1, 3], sizes, None)  # nothing spooled: nothing to overlap
    assert not reads_ahead([1, 3], None, spool)
