"""Spooling retrieved mail (connector/protocol/spool.py) and the line-length limit of the
multi-line reader: memory below the threshold, an anonymous 0600 file above it, hashing while
receiving, size and line refusals that keep the session in step."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pop3_session import GREETING, LOGIN, ScriptedServer, expect, send, serve  # noqa: F401

from connector.protocol import BodySink, MultilineReader, Pop3Session, Retrieved, SpoolPolicy, dot_stuff


def feed(sink: BodySink, data: bytes, step: int = 1000) -> None:
    for i in range(0, len(data), step):
        sink(data[i : i + step])


def test_small_mail_stays_in_memory_and_is_hashed(tmp_path: Path) -> None:
    data = b"Subject: hi\r\n\r\nbody\r\n" * 10
    sink = BodySink(policy=SpoolPolicy(threshold=len(data), directory=str(tmp_path)))
    feed(sink, data, 7)
    mail = sink.finish()
    assert not mail.spooled and mail.refused is None
    assert mail.size == len(data) and mail.read() == data
    assert mail.sha256 == hashlib.sha256(data).hexdigest()
    assert mail.open().read() == data


def test_large_mail_goes_to_an_anonymous_0600_spool_file(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    sink = BodySink(policy=SpoolPolicy(threshold=64 * 1024, directory=str(tmp_path)))
    feed(sink, data, 16 * 1024)
    with sink.finish() as mail:
        assert mail.spooled and mail.size == len(data)
        assert mail.sha256 == hashlib.sha256(data).hexdigest()
        assert mail.read() == data
        assert mail.open().read() == data  # open() rewinds
        # Nothing with a name in the spool directory: a crash leaves nothing to sweep.
        assert list(tmp_path.iterdir()) == []
        f = mail.open()
        st_mode = os.fstat(f.fileno()).st_mode
        assert stat.S_IMODE(st_mode) == 0o600
        assert os.fstat(f.fileno()).st_nlink == 0
    assert f.closed  # closing the Retrieved released the file


def test_over_the_size_limit_is_refused_and_released(tmp_path: Path) -> None:
    data = b"x" * 200_000
    sink = BodySink(limit=100_000, policy=SpoolPolicy(threshold=10_000, directory=str(tmp_path)))
    feed(sink, data)
    mail = sink.finish()
    assert mail.refused == "size" and mail.size == len(data) and not mail.spooled
    with pytest.raises(ValueError, match="refused"):
        mail.read()


def test_spool_directory_that_does_not_exist_fails_the_receive_with_a_typed_error(tmp_path: Path) -> None:
    from connector.errors import SpoolError

    sink = BodySink(policy=SpoolPolicy(threshold=10, directory=str(tmp_path / "missing")))
    with pytest.raises(SpoolError, match=r"missing.*runtime.spool_directory.*nothing was deleted"):
        feed(sink, b"y" * 100)


def test_threshold_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        SpoolPolicy(threshold=-1)


def test_retrieved_from_bytes_and_repr() -> None:
    mail = Retrieved.from_bytes(b"abc\r\n")
    assert mail.size == 5 and "memory" in repr(mail)
    assert mail.sha256 == hashlib.sha256(b"abc\r\n").hexdigest()


# ------------------------------------------------------------------ line-length limit


def wire_of(lines: list[bytes]) -> bytes:
    return dot_stuff(b"".join(line + b"\r\n" for line in lines))


def expected_too_long(wire: bytes, limit: int) -> bool:
    """The oracle: any line of the stuffed body (CRLF included) longer than the limit."""
    body = wire[: -len(b".\r\n")]
    return any(len(line) + 1 > limit for line in body.split(b"\n")[:-1])


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")), max_size=30),
    limit=st.integers(min_value=3, max_value=400),
    step=st.integers(min_value=1, max_value=700),
    next_line=st.integers(min_value=0, max_value=2000),
)
def test_line_limit_matches_the_oracle_for_any_chunking(
    lines: list[bytes], limit: int, step: int, next_line: int
) -> None:
    wire = wire_of(lines)
    # A pipelined next response follows; its long line must not count against this mail.
    stream = wire + b"+OK\r\n" + b"z" * next_line + b"\r\n.\r\n"
    reader = MultilineReader(limit)
    out = b"".join(reader.feed_all(stream[i : i + step] for i in range(0, len(stream), step)))
    assert out == b"".join(line + b"\r\n" for line in lines)
    assert (reader.line_too_long is not None) == expected_too_long(wire, limit)
    if reader.line_too_long is not None:
        assert reader.line_too_long > limit


def test_line_limit_across_a_large_chunk() -> None:
    # One chunk bigger than the limit holding an over-long line between short ones.
    wire = wire_of([b"a" * 10, b"b" * 5000, b"c" * 10])
    reader = MultilineReader(1000)
    list(reader.feed_all([wire]))
    assert reader.line_too_long == 5002
    ok = MultilineReader(5002)
    list(ok.feed_all([wire]))
    assert ok.line_too_long is None


def test_max_line_must_allow_a_line() -> None:
    with pytest.raises(ValueError):
        MultilineReader(2)


# ------------------------------------------------------------------ over a socket


def plain(server: ScriptedServer) -> Pop3Session:
    return Pop3Session.connect("127.0.0.1", server.port, tls="none", timeout=5, allow_plaintext_auth=True)


def test_retr_many_refuses_a_long_line_and_stays_in_step(serve: list[ScriptedServer], tmp_path: Path) -> None:  # noqa: F811
    long_body = b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n"
    big_body = b"Subject: big\r\n\r\n" + b"y" * 998 + b"\r\n"
    big_body = big_body * 200
    server = ScriptedServer(
        [
            GREETING,
            *LOGIN,
            expect("RETR 1"),
            send(b"+OK\r\n" + long_body + b"."),
            expect("RETR 2"),
            send(b"+OK\r\n" + big_body + b"."),
            expect("NOOP"),
            send("+OK"),
        ]
    )
    serve.append(server)
    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    got = list(
        s.retr_many([1, 2], window=1, max_line=1000, spool=SpoolPolicy(threshold=50_000, directory=str(tmp_path)))
    )
    (n1, m1), (n2, m2) = got
    assert (n1, m1.refused, m1.size) == (1, "line", len(long_body))
    assert m1.longest_line is not None and 1000 < m1.longest_line <= 5002
    assert m1.read() == long_body  # kept: such mail goes to the dead-letter topic as received
    assert n2 == 2 and m2.refused is None and m2.spooled and m2.read() == big_body
    assert m2.sha256 == hashlib.sha256(big_body).hexdigest()
    m2.close()
    s.noop()  # the session is still in step
    s.close()


def test_retr_spooled_over_the_size_limit(serve: list[ScriptedServer]) -> None:  # noqa: F811
    body = b"Subject: big\r\n\r\n" + b"z" * 4000 + b"\r\n"
    server = ScriptedServer(
        [GREETING, *LOGIN, expect("RETR 1"), send(b"+OK\r\n" + body + b"."), expect("NOOP"), send("+OK")]
    )
    serve.append(server)
    s = plain(server)
    s.login_user_pass("alice", "alice-pw")
    mail = s.retr_spooled(1, limit=1024)
    assert mail.refused == "size" and mail.size == len(body)
    s.noop()
    s.close()


# ------------------------------------------------------------------ configuration


def spool_config(runtime: dict[str, object], **mailbox: object) -> object:
    from connector.config import parse_config

    return parse_config(
        {
            "kafka": {"bootstrap_servers": "k:9092"},
            "topics": {"mail": "mail"},
            "runtime": runtime,
            "mailboxes": [{"id": "a", "host": "pop.test", "username": "u", "password": {"env": "PW"}, **mailbox}],
        },
        environ={"PW": "pw"},
        base=Path("/"),
    )


def test_spool_settings_and_defaults(tmp_path: Path) -> None:
    cfg = spool_config({})
    assert cfg.runtime.spool_threshold_bytes == 4 * 1024 * 1024 and cfg.runtime.spool_directory is None  # type: ignore[attr-defined]
    assert cfg.mailboxes[0].max_line_bytes == 1024 * 1024  # type: ignore[attr-defined]
    cfg = spool_config({"spool_directory": str(tmp_path), "spool_threshold_bytes": 0}, max_line_bytes=1000)
    assert cfg.runtime.spool_directory == str(tmp_path)  # type: ignore[attr-defined]
    assert cfg.mailboxes[0].max_line_bytes == 1000  # type: ignore[attr-defined]


def test_spool_directory_must_be_a_writable_directory(tmp_path: Path) -> None:
    from connector.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"runtime.spool_directory: .*missing.* is not a writable directory; create it"
    ):
        spool_config({"spool_directory": str(tmp_path / "missing")})
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a writable directory"):
        spool_config({"spool_directory": str(a_file)})


def test_max_line_bytes_below_the_rfc_minimum_is_refused() -> None:
    from connector.errors import ConfigError

    with pytest.raises(ConfigError, match="max_line_bytes"):
        spool_config({}, max_line_bytes=100)


def test_sweep_removes_only_spool_files_left_by_a_crash(tmp_path: Path) -> None:
    from connector.protocol.spool import SPOOL_PREFIX, sweep

    (tmp_path / f"{SPOOL_PREFIX}abc123").write_bytes(b"half a mail")
    (tmp_path / f"{SPOOL_PREFIX}def456").write_bytes(b"")
    (tmp_path / "someone-elses.txt").write_text("keep")
    (tmp_path / f"{SPOOL_PREFIX}dir").mkdir()
    assert sweep(str(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{SPOOL_PREFIX}dir", "someone-elses.txt"]
    assert sweep(str(tmp_path / "missing")) == 0


def test_runner_sweeps_the_spool_directory_at_start(tmp_path: Path) -> None:
    from connector.config import parse_config
    from connector.protocol.spool import SPOOL_PREFIX
    from connector.runtime.runner import Runner

    left = tmp_path / f"{SPOOL_PREFIX}crash"
    left.write_bytes(b"x")
    cfg = parse_config(
        {
            "kafka": {"bootstrap_servers": "127.0.0.1:1"},
            "topics": {"mail": "m"},
            "runtime": {"spool_directory": str(tmp_path)},
            "mailboxes": [{"id": "a", "host": "h", "username": "u", "password": {"env": "PW"}}],
        },
        environ={"PW": "x"},
    )
    Runner(cfg).close()
    assert not left.exists()
