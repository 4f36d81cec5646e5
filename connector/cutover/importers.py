"""Readers for the "already seen" state of fetchmail and getmail, for a cut-over without republishing.

A user who has left mail on the server with fetchmail (``keep``) or getmail (``delete = false``)
has years of mail there that the old tool already delivered. pop3-kafka would publish all of it
on its first cycle. These readers return the UIDLs the old tool recorded for one POP3 account, so
the ledger can mark them ``baseline`` (seen, never published) before pop3-kafka's first cycle.

Both formats were checked against the tools' source and against files the real tools wrote
(tests/fixtures/cutover/README.md):

* fetchmail ``.fetchids`` (fetchmail 6.x, ``uid.c``): one line per UIDL,
  ``<remotename>@<queryname> <uidl>\\n``. No quoting, no escaping, no time stamp. ``remotename`` is
  the configured ``user`` (it may hold spaces and ``@``); ``queryname`` is the ``via`` name if set,
  else the ``poll`` name, spelled as in the rc file. One file holds every account of the rc file,
  and fetchmail compares both parts case-insensitively.
* getmail ``oldmail-<server>-<port>-<username>`` (getmail 4-6): one file per POP3 account, one
  line per UIDL, ``<uidl>\\0<unix seconds>\\n``, in no particular order. getmail6 stores a POP3
  UIDL with every ``/`` replaced by ``-`` (see :func:`getmail_uidl_form`); lines whose id holds
  ``/`` come from an IMAP retriever (``<uidvalidity>/<uid>``).

Both readers are strict where the tools are lenient: a line the tool would silently skip is an
error here, because importing a partial list means republishing mail, and a wrong file (the other
tool's format, an IMAP state file) must not be imported as an empty or partial baseline.
Messages name the file, the line and the fix; they never quote a line, since it holds UIDLs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from connector.errors import ConfigError

__all__ = [
    "SeenUidl",
    "find_getmail_oldmail",
    "getmail_oldmail_name",
    "getmail_uidl_form",
    "read_fetchids",
    "read_getmail_oldmail",
]

# RFC 1939 §7: a unique-id is 1 to 70 characters in 0x21-0x7E. The same rule as
# connector.protocol.core.validate_uidl: an entry outside it could never match a UIDL that
# pop3-kafka accepts from a server, so it points at a corrupt or wrong file.
_UIDL = re.compile(r"[\x21-\x7e]{1,70}")
_DIGITS = re.compile(r"[0-9]+")
# getmail6 (_retrieverbases.STRIP_CHAR_RE): runs of these characters in the oldmail file name
# become one "-". Inside the class "\:" is just ":"; a backslash is NOT stripped.
_GETMAIL_STRIP = re.compile(r"[/:;<>|]+")
# How many account names an error lists before "and N more": enough to spot a typo, short
# enough for one log line.
_MAX_ACCOUNTS_SHOWN = 10


@dataclass(frozen=True)
class SeenUidl:
    """One UIDL the previous tool has seen for the account.

    ``seen_at_millis`` is when the tool first recorded it (epoch milliseconds), or None when
    the format has no time (fetchmail).
    """

    uidl: str
    seen_at_millis: int | None


# ---------------------------------------------------------------- shared helpers


def _read_lines(path: Path, what: str, fix: str) -> list[tuple[int, str]]:
    """The file's non-blank lines as (1-based line number, text without the line end).

    Bytes are read and decoded per line so that a bad byte is reported with its line number.
    Both tools write "\\n"; a "\\r" before it (a file copied through Windows) is dropped.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        # strerror only: the exception text would repeat the path, and nothing here is secret.
        raise ConfigError(f"{what} {path}: cannot read it ({exc.strerror or exc}); {fix}") from exc
    lines: list[tuple[int, str]] = []
    for number, chunk in enumerate(data.split(b"\n"), start=1):
        raw = chunk.rstrip(b"\r")
        if not raw.strip():
            continue  # blank lines (and the empty tail after the final "\n") carry nothing
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{what} {path}: line {number} is not UTF-8 text; is this the right file? {fix}") from exc
        lines.append((number, text))
    return lines


def _accounts_text(accounts: list[str]) -> str:
    shown = ", ".join(accounts[:_MAX_ACCOUNTS_SHOWN])
    more = len(accounts) - _MAX_ACCOUNTS_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


# ---------------------------------------------------------------- fetchmail


_FETCHIDS_FIX = (
    "fetchmail writes one 'user@server UIDL' line per mail; remove or correct the line, "
    "or pass the .fetchids file fetchmail itself uses (--idfile, default ~/.fetchids)"
)


@dataclass
class _Account:
    """The lines of one user@server in a .fetchids file, in file order."""

    user: str
    server: str
    uidls: list[tuple[int, str]]  # (line number, UIDL)

    @property
    def name(self) -> str:
        return f"{self.user}@{self.server}"


def read_fetchids(path: Path, *, server: str | None = None, user: str | None = None) -> list[SeenUidl]:
    """UIDLs fetchmail recorded in ``path`` (a ``.fetchids`` file) for one account.

    ``server`` and ``user`` select the account and are compared case-insensitively, as
    fetchmail does. ``server`` must be the name fetchmail connected to: the ``via`` name if the
    rc file has one, else the ``poll`` name. With no filter the file must hold one account.

    Returns the UIDLs in file order without duplicates; ``seen_at_millis`` is None (fetchmail
    stores no time). An empty file gives ``[]``.

    Raises ConfigError for an unreadable file, a malformed line, a UIDL outside RFC 1939
    syntax in the selected account, several accounts and no (or too loose a) filter, or a
    filter that matches none of the accounts in a non-empty file. The last is an error, not
    ``[]``: an empty baseline would republish every mail on the server.
    """
    what = "fetchmail id file"
    accounts: dict[tuple[str, str], _Account] = {}
    for number, text in _read_lines(path, what, _FETCHIDS_FIX):
        if "\0" in text:
            raise ConfigError(
                f"{what} {path}: line {number} holds a NUL byte, as getmail's oldmail files do; "
                "pass it as a getmail oldmail file (--getmail-oldmail) instead"
            )
        # fetchmail writes "%s@%s %s\n" (remotename, queryname, UIDL). The UIDL never holds
        # white space and the server name never holds "@" or white space, while the user may
        # hold both (fetchmail's comments name Lotus Notes user names with spaces). So: the
        # UIDL is the last field, and the server is what follows the last "@" before it.
        fields = text.strip(" \t").rsplit(None, 1)
        if len(fields) != 2:
            raise ConfigError(f"{what} {path}: line {number} has no 'user@server UIDL' pair; {_FETCHIDS_FIX}")
        account_text, uidl = fields
        line_user, at, line_server = account_text.rstrip(" \t").rpartition("@")
        if not at or not line_user or not line_server or any(c.isspace() for c in line_server):
            raise ConfigError(f"{what} {path}: line {number} does not start with 'user@server'; {_FETCHIDS_FIX}")
        # fetchmail matches accounts with strcasecmp (ASCII case-insensitive): group the same way,
        # keeping the first spelling for messages.
        key = (line_user.lower(), line_server.lower())
        account = accounts.get(key)
        if account is None:
            account = accounts[key] = _Account(line_user, line_server, [])
        account.uidls.append((number, uidl))

    if not accounts:
        return []  # fetchmail deletes the file when nothing is left to remember; empty means none

    chosen = [
        a
        for a in accounts.values()
        if (server is None or a.server.lower() == server.lower()) and (user is None or a.user.lower() == user.lower())
    ]
    found = _accounts_text([a.name for a in accounts.values()])
    if not chosen:
        wanted = f"{user or '*'}@{server or '*'}"
        raise ConfigError(
            f"{what} {path}: no account matches {wanted}; the file holds {found}. "
            "Give the user and server exactly as fetchmail wrote them (server: the 'via' name if "
            "the fetchmailrc has one, else the 'poll' name)"
        )
    if len(chosen) > 1:
        names = _accounts_text([a.name for a in chosen])
        raise ConfigError(
            f"{what} {path}: holds UIDLs of several accounts ({names}); name one with both the server and the user"
        )

    result: list[SeenUidl] = []
    seen: set[str] = set()
    for number, uidl in chosen[0].uidls:
        if not _UIDL.fullmatch(uidl):
            raise ConfigError(
                f"{what} {path}: line {number}: the UIDL is not RFC 1939 syntax (1-70 characters "
                "0x21-0x7E), so no server pop3-kafka accepts can send it; remove the line"
            )
        if uidl not in seen:  # fetchmail keeps a set; a repeated line adds nothing
            seen.add(uidl)
            result.append(SeenUidl(uidl, None))
    return result


# ---------------------------------------------------------------- getmail


_OLDMAIL_FIX = (
    "getmail writes one '<UIDL>\\0<unix time>' line per mail; remove or correct the line, "
    "or pass the POP3 retriever's oldmail-<server>-<port>-<username> file from the getmail directory"
)


def getmail_uidl_form(uidl: str) -> str:
    """How getmail6 stores a server's POP3 UIDL in its oldmail file: every ``/`` becomes ``-``.

    getmail6 reserves ``/`` for IMAP ids (``_retrieverbases.POP3RetrieverBase._getmsglist``), so
    an oldmail entry is not always the server's UIDL. To match server UIDLs against
    :func:`read_getmail_oldmail`'s result, compare ``getmail_uidl_form(server_uidl)``.
    """
    return uidl.replace("/", "-")


def read_getmail_oldmail(path: Path) -> list[SeenUidl]:
    """UIDLs getmail recorded in ``path``, an ``oldmail-<server>-<port>-<username>`` file.

    The file belongs to one POP3 account (see :func:`find_getmail_oldmail`), so there is no
    filter. Returns the entries in file order (getmail writes them in no particular order)
    without duplicates, ``seen_at_millis`` being getmail's time stamp (the run that first
    delivered the mail) in milliseconds. UIDLs are as getmail stored them: see
    :func:`getmail_uidl_form`. An empty file gives ``[]``.

    Raises ConfigError for an unreadable file, a malformed line, a bad time stamp, a UIDL
    outside RFC 1939 syntax, or an IMAP id (``uidvalidity/uid``): that file belongs to an IMAP
    folder, not to a POP3 account.
    """
    what = "getmail oldmail file"
    by_uidl: dict[str, int] = {}
    for number, text in _read_lines(path, what, _OLDMAIL_FIX):
        # getmail strips each line (white space includes a Windows "\r") before splitting at the
        # first NUL; neither field can hold white space, so stripping loses nothing.
        uidl, nul, stamp = text.strip().partition("\0")
        if not nul:
            hint = (
                "it looks like a fetchmail .fetchids line; pass the file with --fetchids instead"
                if "@" in text and " " in text.strip()
                else _OLDMAIL_FIX
            )
            raise ConfigError(f"{what} {path}: line {number} has no NUL between UIDL and time; {hint}")
        if "/" in uidl:
            raise ConfigError(
                f"{what} {path}: line {number} holds an IMAP id (uidvalidity/uid), not a POP3 UIDL: "
                "getmail never stores '/' in a POP3 UIDL, so this file belongs to an IMAP retriever; "
                "pass the POP3 account's oldmail-<server>-<port>-<username> file"
            )
        if not _UIDL.fullmatch(uidl):
            raise ConfigError(
                f"{what} {path}: line {number}: the UIDL is not RFC 1939 syntax (1-70 characters "
                "0x21-0x7E), so no server pop3-kafka accepts can send it; remove the line"
            )
        if not _DIGITS.fullmatch(stamp):
            raise ConfigError(
                f"{what} {path}: line {number}: the time after the NUL is not a whole number of "
                f"seconds since 1970; {_OLDMAIL_FIX}"
            )
        seconds = int(stamp)
        # getmail's own reader lets a later line win; getmail never writes one UIDL twice, so
        # this only matters for hand-merged files, where the earliest time is the "first seen".
        previous = by_uidl.get(uidl)
        by_uidl[uidl] = seconds if previous is None else min(previous, seconds)
    return [SeenUidl(uidl, seconds * 1000) for uidl, seconds in by_uidl.items()]


def getmail_oldmail_name(server: str, port: int, user: str) -> str:
    """The oldmail file name getmail6 uses for a POP3 account.

    ``oldmail-<server>-<port>-<username>`` with the values as written in the getmailrc
    (``port`` as a decimal number, the retriever's default 110 or 995 if the rc has none),
    and every run of ``/ : ; < > |`` replaced by one ``-``.
    """
    return _GETMAIL_STRIP.sub("-", f"oldmail-{server}-{int(port)}-{user}")


def _getmail_legacy_name(server: str, port: int, user: str) -> str:
    # getmail 4 and 5 replaced only "/" and ":", one character at a time. Users coming from an
    # old installation have files named that way; for ordinary names both rules agree.
    return f"oldmail-{server}-{int(port)}-{user}".replace("/", "-").replace(":", "-")


def find_getmail_oldmail(getmail_dir: Path, server: str, port: int, user: str) -> Path | None:
    """The oldmail file of one POP3 account in getmail's directory, or None if it has none.

    ``getmail_dir`` is getmail's ``--getmaildir`` (default ``~/.getmail``); ``server``,
    ``port`` and ``user`` are the retriever's ``server``, ``port`` and ``username``. Names are
    tried exactly as getmail6 and getmail 4/5 build them; failing that, a single file whose
    name differs only in letter case is accepted (host names are case-insensitive, and the
    mailbox config may spell them differently from the getmailrc). IMAP retrievers' files
    (the same name plus ``-<folder>``) never match.

    Raises ConfigError if ``getmail_dir`` is not a readable directory, or if several files
    differ from the name only in case.
    """
    candidates = [getmail_oldmail_name(server, port, user), _getmail_legacy_name(server, port, user)]
    for name in candidates:
        path = getmail_dir / name
        if path.is_file():
            return path
    try:
        entries = [p for p in getmail_dir.iterdir() if p.is_file()]
    except OSError as exc:
        raise ConfigError(
            f"getmail directory {getmail_dir}: cannot list it ({exc.strerror or exc}); pass the "
            "directory getmail keeps its oldmail-* files in (--getmaildir, default ~/.getmail)"
        ) from exc
    folded = {c.lower() for c in candidates}
    matches = sorted(p for p in entries if p.name.lower() in folded)
    if len(matches) > 1:
        names = _accounts_text([p.name for p in matches])
        raise ConfigError(
            f"getmail directory {getmail_dir}: several oldmail files differ only in letter case ({names}); "
            "pass the right one as a file"
        )
    return matches[0] if matches else None
