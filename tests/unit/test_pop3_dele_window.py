"""Pipelined DELE (RFC 2449 §6.6): dele_many keeps up to DELE_WINDOW commands in flight,
refills when half of them are answered, never exceeds the window, and stays in step after an
``-ERR`` in the middle. The server here answers only when the client has stopped writing, so
it sees exactly how many commands the client dares to leave unanswered."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from connector.errors import Pop3CommandError
from connector.protocol import Pop3Session
from connector.protocol.session import DELE_WINDOW

#: how long the client must stay silent before the server takes it as waiting for answers
QUIET = 0.15


@dataclass
class LazyServer:
    """POP3 over plain TCP: logs in anyone, answers DELE in batches (half the outstanding
    ones, or all of them once the client is quiet), ``-ERR`` for message ``refuse``."""

    pipelining: bool
    refuse: int | None = None
    max_in_flight: int = 0
    #: times the client went quiet with commands unanswered (it waited for answers)
    waits: int = 0
    deles: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    got_quit: bool = False

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._listener.settimeout(10)
        try:
            conn, _ = self._listener.accept()
        except OSError as exc:
            self.errors.append(f"no connection: {exc}")
            return
        finally:
            self._listener.close()
        with conn:
            try:
                self._serve(conn)
            except (OSError, ValueError) as exc:
                self.errors.append(f"server failed: {exc!r}")

    def _serve(self, conn: socket.socket) -> None:
        conn.sendall(b"+OK ready\r\n")
        buf = b""
        unanswered: list[int] = []
        while True:
            conn.settimeout(QUIET if unanswered else 10)
            try:
                more = conn.recv(65536)
            except TimeoutError:
                more = None
            if more == b"":
                return
            if more is not None:
                buf += more
            lines = buf.split(b"\r\n")
            buf = lines.pop()
            for line in lines:
                verb, _, arg = line.partition(b" ")
                if verb == b"DELE":
                    self.deles.append(int(arg))
                    unanswered.append(int(arg))
                    self.max_in_flight = max(self.max_in_flight, len(unanswered))
                    continue
                if unanswered:
                    self.errors.append(f"{line!r} before the answers to {len(unanswered)} DELEs")
                    return
                if verb == b"CAPA":
                    caps = b"USER\r\nPIPELINING\r\n" if self.pipelining else b"USER\r\n"
                    conn.sendall(b"+OK\r\n" + caps + b".\r\n")
                elif verb == b"QUIT":
                    self.got_quit = True
                    conn.sendall(b"+OK bye\r\n")
                    return
                else:  # USER, PASS
                    conn.sendall(b"+OK\r\n")
            if not unanswered:
                continue
            if more is None:
                self.waits += 1  # quiet: answer everything outstanding
                take = len(unanswered)
            elif len(unanswered) >= 2:
                take = len(unanswered) // 2  # the client is still writing: answer half
            else:
                continue
            answers = [b"-ERR no such message\r\n" if n == self.refuse else b"+OK\r\n" for n in unanswered[:take]]
            del unanswered[:take]
            conn.sendall(b"".join(answers))

    def join(self) -> None:
        self._thread.join(15)
        assert not self._thread.is_alive(), "server did not finish"


@pytest.fixture
def servers() -> Iterator[list[LazyServer]]:
    made: list[LazyServer] = []
    yield made
    for server in made:
        server.join()
        assert server.errors == []


def session(server: LazyServer, transcript: list[tuple[str, str]] | None = None) -> Pop3Session:
    s = Pop3Session.connect(
        "127.0.0.1",
        server.port,
        tls="none",
        timeout=5.0,
        allow_plaintext_auth=True,
        transcript=(lambda side, line: transcript.append((side, line))) if transcript is not None else None,
    )
    s.login_user_pass("alice", "alice-pw")
    return s


def test_pipelined_dele_fills_the_window_refills_at_half_and_never_exceeds_it(servers: list[LazyServer]) -> None:
    server = LazyServer(pipelining=True)
    servers.append(server)
    nums = list(range(1, 4 * DELE_WINDOW + 1))
    with contextlib.closing(session(server)) as s:
        s.dele_many(nums)
        s.quit()
    server.join()
    assert server.deles == nums
    assert server.max_in_flight == DELE_WINDOW
    # The client waits for answers once, at the end, when nothing is left to send (one more
    # allowed for a scheduling hiccup on a loaded machine): the refill at half keeps commands
    # queued at the server. Batches answered whole would wait once per window (4 here).
    assert server.waits <= 2
    assert server.got_quit


def test_without_pipelining_one_dele_at_a_time(servers: list[LazyServer]) -> None:
    server = LazyServer(pipelining=False)
    servers.append(server)
    with contextlib.closing(session(server)) as s:
        s.dele_many([1, 2, 3])
        s.quit()
    server.join()
    assert server.deles == [1, 2, 3]
    assert server.max_in_flight == 1


def test_an_err_in_the_middle_is_raised_after_every_answer_is_read(servers: list[LazyServer]) -> None:
    server = LazyServer(pipelining=True, refuse=300)
    servers.append(server)
    nums = list(range(1, 601))
    lines: list[tuple[str, str]] = []
    with contextlib.closing(session(server, lines)) as s:
        with pytest.raises(Pop3CommandError) as info:
            s.dele_many(nums)
        assert info.value.command == "DELE 300"
        s.quit()  # in step: QUIT's answer is QUIT's, not a DELE's
    server.join()
    assert server.deles == nums and server.got_quit
    # The transcript shows every pipelined command, as sent.
    assert [line for side, line in lines if side == "C" and line.startswith("DELE")] == [f"DELE {n}" for n in nums]
