"""A scripted POP3 maildrop for fast tests of the delivery rules (no sockets).

Sessions follow RFC 1939's rules that matter here: message numbers per session, DELE only
marks, QUIT applies the marks, abort()/close() apply nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from connector.errors import Pop3ConnectError
from connector.protocol import BodySink, MultilineReader, ServerPolicy, SpoolPolicy, dot_stuff, parse_server_policy
from support.mailgen import make_mail


@dataclass
class Maildrop:
    """uidl -> raw mail, in server order."""

    mails: dict[str, bytes] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    #: called with (command, msg_num) before it runs; may raise to inject failures
    fail: Callable[[str, int], None] | None = None

    def add(self, uidl: str, raw: bytes) -> None:
        self.mails[uidl] = raw

    def session(self, _mailbox: Any = None) -> MaildropSession:
        return MaildropSession(self)


class FakeSessionBase:
    """What every scripted session shares: a server without CAPA (so the connector logs in
    with USER/PASS), and the batch commands expressed through the subclass's retr/dele."""

    def retr(self, msg_num: int) -> bytes:
        raise NotImplementedError

    def dele(self, msg_num: int) -> None:
        raise NotImplementedError

    def capabilities(self, *, refresh: bool = False) -> dict[str, list[str]]:
        return {}

    def server_policy(self) -> ServerPolicy:
        """EXPIRE / LOGIN-DELAY from :meth:`capabilities` (override that to advertise them)."""
        return parse_server_policy(self.capabilities())

    def login_apop(self, username: str, secret: str) -> None:
        raise AssertionError("not used")

    def login_sasl(self, mechanism: Any, *, username: str) -> None:
        raise AssertionError("not used")

    def retr_many(
        self,
        msg_nums: Any,
        *,
        limit: int | None = None,
        spool: SpoolPolicy | None = None,
        max_line: int | None = None,
    ) -> Any:
        # The real reader and sink, fed the mail as the server would send it, in pieces.
        for n in msg_nums:
            wire = dot_stuff(self.retr(n))
            reader, sink = MultilineReader(max_line), BodySink(limit, spool)
            for piece in reader.feed_all(wire[i : i + 1000] for i in range(0, len(wire), 1000)):
                sink(piece)
            yield n, sink.finish(line_too_long=reader.line_too_long)

    def dele_many(self, msg_nums: Any) -> None:
        for n in msg_nums:
            self.dele(n)

    def retr_into(self, msg_num: int, sink: Callable[[bytes], None]) -> int:
        data = self.retr(msg_num)
        for i in range(0, len(data), 1000):  # arrives in pieces, as from the socket
            sink(data[i : i + 1000])
        return len(data)


class MaildropSession(FakeSessionBase):
    def __init__(self, drop: Maildrop) -> None:
        self.drop = drop
        self.order = list(drop.mails)  # message numbers are fixed for the session
        self.marked: set[int] = set()
        self.open = True

    def _check(self, cmd: str, n: int = 0) -> None:
        self.drop.log.append(f"{cmd} {n}" if n else cmd)
        if not self.open:
            raise Pop3ConnectError("session closed")
        if self.drop.fail is not None:
            self.drop.fail(cmd, n)

    def login_user_pass(self, username: str, password: str) -> None:
        self._check("LOGIN")

    def uidl(self) -> list[tuple[int, str]]:
        self._check("UIDL")
        return [(i + 1, u) for i, u in enumerate(self.order)]

    def list(self) -> list[tuple[int, int]]:
        return [(i + 1, len(self.drop.mails[u])) for i, u in enumerate(self.order)]

    def retr(self, msg_num: int) -> bytes:
        self._check("RETR", msg_num)
        return self.drop.mails[self.order[msg_num - 1]]

    def top(self, msg_num: int, lines: int = 0) -> bytes:
        self._check("TOP", msg_num)
        raw = self.drop.mails[self.order[msg_num - 1]]
        end = raw.find(b"\r\n\r\n")
        return raw if end < 0 else raw[: end + 4]

    def dele(self, msg_num: int) -> None:
        self._check("DELE", msg_num)
        self.marked.add(msg_num)

    def quit(self) -> None:
        self._check("QUIT")
        for n in self.marked:  # RFC 1939 §6: the UPDATE state applies the marks
            self.drop.mails.pop(self.order[n - 1], None)
        self.open = False

    def abort(self) -> None:
        self.drop.log.append("ABORT")
        self.open = False

    def close(self) -> None:
        self.drop.log.append("CLOSE")
        self.open = False


class RefillingSession(FakeSessionBase):
    """A maildrop that refills: every cycle finds two new mails; ``slow`` holds the login."""

    slow = 0.0

    def __init__(self, tag: str) -> None:
        self.mails = {f"{tag}-{time.monotonic_ns()}-{i}": make_mail(i)[0] for i in range(2)}

    def login_user_pass(self, username: str, password: str) -> None:
        time.sleep(RefillingSession.slow)

    def uidl(self) -> list[tuple[int, str]]:
        return [(i + 1, u) for i, u in enumerate(self.mails)]

    def list(self) -> list[tuple[int, int]]:
        return [(i + 1, len(m)) for i, m in enumerate(self.mails.values())]

    def retr(self, msg_num: int) -> bytes:
        return list(self.mails.values())[msg_num - 1]

    def dele(self, msg_num: int) -> None:
        pass

    def quit(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def top(self, msg_num: int, lines: int = 0) -> bytes:
        return b""
