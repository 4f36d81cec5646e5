"""Cut-over importers: fetchmail .fetchids and getmail oldmail files.

The fixtures under tests/fixtures/cutover/ were written by the real tools (fetchmail 6.4.37,
getmail6 6.20.2) against a Dovecot server; their README says how. The true UIDL lists below are
what the server answered to UIDL at that time, so the readers are checked against the server,
not against our reading of the formats.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.cutover import (
    SeenUidl,
    find_getmail_oldmail,
    getmail_oldmail_name,
    getmail_uidl_form,
    read_fetchids,
    read_getmail_oldmail,
)
from connector.errors import ConfigError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cutover"
FETCHIDS = FIXTURES / "fetchmail-6.4.37.fetchids"
GETMAIL_DIR = FIXTURES / "getmail6-6.20.2"
GETMAIL_PORT = 45115  # the POP3S port of that test run; getmail puts it in the file name

# The server's UIDL answers (poplib) when the fixtures were made (tests/fixtures/cutover/README.md).
TRUE_T10 = ["000000016b085aac", "000000026b085aac", "000000036b085aac", "000000046b085aac"]
TRUE_T11 = ["000000016b085aac", "000000026b085aac"]
# getmail's time stamps: mails 1-3 came in the first run, mail 4 in the second.
FIRST_RUN_MS = 1795709618 * 1000
SECOND_RUN_MS = 1795709622 * 1000


def write(tmp_path: Path, data: bytes, name: str = "state") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_no_uidl(message: str, *uidls: str) -> None:
    """Error messages must not carry UIDLs (they are per-user data and can be long lists)."""
    for uidl in uidls:
        assert uidl not in message


# ---------------------------------------------------------------- fetchmail, real file


def test_fetchids_real_file_gives_the_servers_uidls_per_account() -> None:
    t10 = read_fetchids(FETCHIDS, server="127.0.0.1", user="t10")
    t11 = read_fetchids(FETCHIDS, server="127.0.0.1", user="t11")
    assert [s.uidl for s in t10] == TRUE_T10
    assert [s.uidl for s in t11] == TRUE_T11
    assert all(s.seen_at_millis is None for s in t10 + t11)  # fetchmail stores no time


def test_fetchids_user_alone_selects_when_unambiguous_and_matching_ignores_case() -> None:
    assert [s.uidl for s in read_fetchids(FETCHIDS, user="T10")] == TRUE_T10
    assert [s.uidl for s in read_fetchids(FETCHIDS, user="t11", server="127.0.0.1")] == TRUE_T11


def test_fetchids_several_accounts_without_filter_lists_them() -> None:
    with pytest.raises(ConfigError) as err:
        read_fetchids(FETCHIDS)
    msg = str(err.value)
    assert str(FETCHIDS) in msg
    assert "t10@127.0.0.1" in msg
    assert "t11@127.0.0.1" in msg
    assert_no_uidl(msg, *TRUE_T10)


def test_fetchids_server_alone_is_too_loose_when_both_accounts_share_it() -> None:
    with pytest.raises(ConfigError, match="several accounts"):
        read_fetchids(FETCHIDS, server="127.0.0.1")


def test_fetchids_filter_matching_nothing_is_an_error_not_an_empty_baseline() -> None:
    with pytest.raises(ConfigError) as err:
        read_fetchids(FETCHIDS, server="pop.example.com", user="t10")
    msg = str(err.value)
    assert "t10@pop.example.com" in msg
    assert "t10@127.0.0.1, t11@127.0.0.1" in msg
    assert "via" in msg  # the fix: fetchmail writes the via name
    assert_no_uidl(msg, *TRUE_T10)


def test_fetchids_reader_refuses_a_getmail_file_and_says_so() -> None:
    with pytest.raises(ConfigError, match=r"line 1 holds a NUL byte.*--getmail-oldmail") as err:
        read_fetchids(GETMAIL_DIR / "oldmail-127.0.0.1-45115-t10")
    assert_no_uidl(str(err.value), *TRUE_T10)


# ---------------------------------------------------------------- fetchmail, format details


def test_fetchids_empty_and_blank_files_hold_nothing(tmp_path: Path) -> None:
    assert read_fetchids(write(tmp_path, b"")) == []
    assert read_fetchids(write(tmp_path, b"\n \n\t\n"), server="x", user="y") == []


def test_fetchids_single_account_needs_no_filter(tmp_path: Path) -> None:
    path = write(tmp_path, b"me@pop.example.com UID1\nme@pop.example.com UID2\n")
    assert read_fetchids(path) == [SeenUidl("UID1", None), SeenUidl("UID2", None)]


def test_fetchids_user_with_at_sign_and_spaces_uidl_with_at_sign(tmp_path: Path) -> None:
    # fetchmail writes "%s@%s %s": the user may hold "@" (a full address) and spaces (Lotus
    # Notes), the UIDL may hold "@" (InterMail); the server is what follows the last "@".
    path = write(
        tmp_path,
        b"me@example.com@pop.example.com <a@b>\nJohn Q Doe@notes.example.com 1a2b@c\n",
    )
    assert [s.uidl for s in read_fetchids(path, user="ME@EXAMPLE.COM")] == ["<a@b>"]
    assert [s.uidl for s in read_fetchids(path, server="notes.example.com")] == ["1a2b@c"]
    assert [s.uidl for s in read_fetchids(path, user="John Q Doe", server="NOTES.example.com")] == ["1a2b@c"]


def test_fetchids_accepts_crlf_tabs_missing_final_newline_and_drops_duplicates(tmp_path: Path) -> None:
    path = write(tmp_path, b"  u@h\tA\r\nu@h   B\r\n\r\nu@h A\nu@h C")
    assert [s.uidl for s in read_fetchids(path)] == ["A", "B", "C"]


def test_fetchids_account_spelling_differs_only_in_case_is_one_account(tmp_path: Path) -> None:
    path = write(tmp_path, b"T10@Pop.Example.com A\nt10@pop.example.com B\n")
    assert [s.uidl for s in read_fetchids(path)] == ["A", "B"]


@pytest.mark.parametrize(
    ("data", "line", "what"),
    [
        (b"u@h A\nno-at-sign UID\n", 2, "does not start with 'user@server'"),
        (b"u@h A\nu@h\n", 2, "no 'user@server UIDL' pair"),
        (b"lonely\n", 1, "no 'user@server UIDL' pair"),
        (b"u@ A\n", 1, "does not start with 'user@server'"),
        (b"@h A\n", 1, "does not start with 'user@server'"),
        (b"u@h A\nu@h x B\n", 2, "does not start with 'user@server'"),  # junk: server would hold a space
        (b"u@h A\nu@h \xff\xfe\n", 2, "not UTF-8"),
    ],
)
def test_fetchids_malformed_lines_name_file_line_and_fix(tmp_path: Path, data: bytes, line: int, what: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        read_fetchids(path, server="h", user="u")
    msg = str(err.value)
    assert str(path) in msg
    assert f"line {line} " in msg
    assert what in msg
    assert "remove or correct the line" in msg or "right file" in msg


def test_fetchids_bad_uidl_is_checked_in_the_selected_account_only(tmp_path: Path) -> None:
    long_uidl = "X" * 71  # RFC 1939 allows 1-70 characters
    path = write(tmp_path, f"a@h OK\nb@h {long_uidl}\nb@h é\n".encode())
    assert [s.uidl for s in read_fetchids(path, user="a")] == ["OK"]
    with pytest.raises(ConfigError, match="line 2: the UIDL is not RFC 1939") as err:
        read_fetchids(path, user="b")
    assert_no_uidl(str(err.value), long_uidl)


def test_fetchids_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        read_fetchids(tmp_path / "missing")
    with pytest.raises(ConfigError, match="cannot read it"):
        read_fetchids(tmp_path)  # a directory


def test_fetchids_many_accounts_are_listed_briefly(tmp_path: Path) -> None:
    path = write(tmp_path, b"".join(b"user%d@h U\n" % i for i in range(25)))
    with pytest.raises(ConfigError, match=r"user9@h and 15 more"):
        read_fetchids(path)


_user = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20).filter(
    lambda s: s.strip() == s
)
_server = st.text(st.sampled_from("abcxyz.-0123"), min_size=1, max_size=12)
_uidl = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=70)


@given(accounts=st.dictionaries(st.tuples(_user, _server), st.lists(_uidl, max_size=5, unique=True), max_size=4))
def test_fetchids_reads_back_what_fetchmail_writes(accounts: dict[tuple[str, str], list[str]]) -> None:
    """Round trip through fetchmail's own writer format: fprintf("%s@%s %s\\n", user, server, uidl)."""
    lines = [f"{user}@{server} {uidl}\n" for (user, server), uidls in accounts.items() for uidl in uidls]
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), "".join(lines).encode())
        present = {(u.lower(), s.lower()) for (u, s), uidls in accounts.items() if uidls}
        for (user, server), uidls in accounts.items():
            same_key = [v for (u, s), v in accounts.items() if (u.lower(), s.lower()) == (user.lower(), server.lower())]
            if not uidls or len(same_key) > 1:
                continue  # accounts differing only in case merge, as in fetchmail
            got = read_fetchids(path, server=server, user=user)
            assert [s.uidl for s in got] == uidls
        if len(present) > 1:
            with pytest.raises(ConfigError):
                read_fetchids(path)


# ---------------------------------------------------------------- getmail, real files


def test_getmail_real_files_give_the_servers_uidls_and_run_times() -> None:
    t10 = read_getmail_oldmail(GETMAIL_DIR / "oldmail-127.0.0.1-45115-t10")
    t11 = read_getmail_oldmail(GETMAIL_DIR / "oldmail-127.0.0.1-45115-t11")
    assert sorted(s.uidl for s in t10) == TRUE_T10  # getmail writes in no particular order
    assert sorted(s.uidl for s in t11) == TRUE_T11
    times = {s.uidl: s.seen_at_millis for s in t10}
    assert times == {
        TRUE_T10[0]: FIRST_RUN_MS,
        TRUE_T10[1]: FIRST_RUN_MS,
        TRUE_T10[2]: FIRST_RUN_MS,
        TRUE_T10[3]: SECOND_RUN_MS,
    }
    assert {s.seen_at_millis for s in t11} == {FIRST_RUN_MS}


def test_getmail_reader_refuses_a_fetchids_file_and_says_so() -> None:
    with pytest.raises(ConfigError, match=r"line 1 has no NUL.*--fetchids") as err:
        read_getmail_oldmail(FETCHIDS)
    assert_no_uidl(str(err.value), *TRUE_T10)


def test_find_getmail_oldmail_in_the_real_directory() -> None:
    assert find_getmail_oldmail(GETMAIL_DIR, "127.0.0.1", GETMAIL_PORT, "t10") == (
        GETMAIL_DIR / "oldmail-127.0.0.1-45115-t10"
    )
    assert find_getmail_oldmail(GETMAIL_DIR, "127.0.0.1", GETMAIL_PORT, "t11") == (
        GETMAIL_DIR / "oldmail-127.0.0.1-45115-t11"
    )
    assert find_getmail_oldmail(GETMAIL_DIR, "127.0.0.1", 995, "t10") is None
    assert find_getmail_oldmail(GETMAIL_DIR, "127.0.0.1", GETMAIL_PORT, "t1") is None


# ---------------------------------------------------------------- getmail, format details


def test_getmail_empty_file_and_blank_lines(tmp_path: Path) -> None:
    assert read_getmail_oldmail(write(tmp_path, b"")) == []
    path = write(tmp_path, b"\nA\x00100\r\n  \nB\x00200")  # CRLF and no final newline are fine too
    assert read_getmail_oldmail(path) == [SeenUidl("A", 100_000), SeenUidl("B", 200_000)]


def test_getmail_duplicate_keeps_the_first_seen_time(tmp_path: Path) -> None:
    path = write(tmp_path, b"A\x00300\nB\x001\nA\x00200\n")
    assert read_getmail_oldmail(path) == [SeenUidl("A", 200_000), SeenUidl("B", 1000)]


@pytest.mark.parametrize(
    ("data", "line", "what"),
    [
        (b"A\x00100\nB 100\n", 2, "no NUL between UIDL and time"),
        (b"A\x00100\nB\x00\n", 2, "not a whole number of seconds"),
        (b"A\x00-5\n", 1, "not a whole number of seconds"),
        (b"A\x001.5\n", 1, "not a whole number of seconds"),
        (b"A\x00100\x00200\n", 1, "not a whole number of seconds"),
        (b"\x00100\n", 1, "not RFC 1939 syntax"),
        (b"A\x00100\n\xc3\x28\x00100\n", 2, "not UTF-8"),
        (b"A\x00100\n1713450000/17\x00100\n", 2, "IMAP id"),
        (b"1713450000/INBOX/17\x00100\n", 1, "IMAP id"),  # pre-4.22 IMAP format
    ],
)
def test_getmail_malformed_lines_name_file_line_and_fix(tmp_path: Path, data: bytes, line: int, what: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        read_getmail_oldmail(path)
    msg = str(err.value)
    assert str(path) in msg
    assert f"line {line}" in msg
    assert what in msg


def test_getmail_too_long_uidl_is_refused_without_echoing_it(tmp_path: Path) -> None:
    uidl = "Y" * 71
    with pytest.raises(ConfigError, match="line 1: the UIDL is not RFC 1939") as err:
        read_getmail_oldmail(write(tmp_path, f"{uidl}\x00100\n".encode()))
    assert_no_uidl(str(err.value), uidl)


def test_getmail_uidl_form_matches_getmails_slash_rewrite() -> None:
    assert getmail_uidl_form("AAMk/AG+x=") == "AAMk-AG+x="
    assert getmail_uidl_form("000000016b085aac") == "000000016b085aac"


@pytest.mark.parametrize(
    ("server", "port", "user", "name"),
    [
        ("127.0.0.1", 45115, "t10", "oldmail-127.0.0.1-45115-t10"),
        ("pop.example.com", 995, "me@example.com", "oldmail-pop.example.com-995-me@example.com"),
        # getmail6: each run of / : ; < > | becomes one "-" (IPv6 literal, domain\user stays)
        ("::1", 995, "me", "oldmail--1-995-me"),
        ("h", 110, "dom/user;x", "oldmail-h-110-dom-user-x"),
        ("h", 110, "dom\\user", "oldmail-h-110-dom\\user"),
    ],
)
def test_getmail_oldmail_name(server: str, port: int, user: str, name: str) -> None:
    assert getmail_oldmail_name(server, port, user) == name


def test_find_getmail_oldmail_variants(tmp_path: Path) -> None:
    (tmp_path / "oldmail-pop.example.com-995-me-INBOX").write_bytes(b"")  # an IMAP folder's file
    assert find_getmail_oldmail(tmp_path, "pop.example.com", 995, "me") is None
    # getmail 4/5 replaced "/" and ":" one at a time, without collapsing runs
    legacy = tmp_path / "oldmail---1-995-me"
    legacy.write_bytes(b"")
    assert find_getmail_oldmail(tmp_path, "::1", 995, "me") == legacy
    # host names are case-insensitive; the mailbox config may spell them otherwise
    mixed = tmp_path / "oldmail-POP.Example.com-995-me"
    mixed.write_bytes(b"")
    assert find_getmail_oldmail(tmp_path, "pop.example.com", 995, "me") == mixed
    (tmp_path / "oldmail-pop.example.COM-995-me").write_bytes(b"")
    with pytest.raises(ConfigError, match="differ only in letter case"):
        find_getmail_oldmail(tmp_path, "pop.example.com", 995, "me")
    exact = tmp_path / "oldmail-pop.example.com-995-me"
    exact.write_bytes(b"")
    assert find_getmail_oldmail(tmp_path, "pop.example.com", 995, "me") == exact  # exact name wins


def test_find_getmail_oldmail_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--getmaildir"):
        find_getmail_oldmail(tmp_path / "nope", "h", 995, "u")
