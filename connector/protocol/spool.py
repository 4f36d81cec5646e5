"""Where a retrieved mail goes while it arrives: memory when small, a spool file when large.

A mail is received as a stream of unstuffed pieces (:class:`~connector.protocol.core.MultilineReader`).
:class:`BodySink` takes those pieces and

* hashes them (SHA-256) as they arrive, so nothing re-reads the mail to fingerprint it;
* keeps them in memory up to :attr:`SpoolPolicy.threshold` bytes, then moves them to an
  anonymous temporary file and appends the rest there, so a 50 MB or 200 MB mail costs a
  bounded amount of memory while it is received;
* enforces the message-size limit by counting and dropping (the session must read the body
  to its terminator anyway to stay in step, RFC 1939 §3), so an oversized mail never fills
  memory or disk.

Why an anonymous file (``tempfile.TemporaryFile``: ``O_TMPFILE`` on Linux, otherwise created
and unlinked at once): the spool holds mail content, possibly decrypted later; a file without
a name is created with mode 0600, cannot be opened by another process by path, and disappears
when it is closed or the process dies — a crash leaves nothing behind to sweep.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from typing import IO, Literal

from connector.errors import SpoolError

#: Why a retrieved mail was not kept: over the message-size limit, or a line over the limit.
Refusal = Literal["size", "line"]


@dataclass(frozen=True)
class SpoolPolicy:
    """Spool a mail to a temporary file once it exceeds ``threshold`` bytes."""

    threshold: int = 4 * 1024 * 1024
    #: directory for spool files (an emptyDir in Kubernetes); None = the system temp directory.
    directory: str | None = None

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError("spool threshold must be >= 0")


#: name prefix of spool files; only ever visible where O_TMPFILE is unsupported (see sweep).
SPOOL_PREFIX = "pop3k-spool-"


def sweep(directory: str | None) -> int:
    """Remove spool files a crashed process may have left in ``directory`` (None: the
    system temp directory); returns how many. Called once at start.

    Spool files are anonymous (O_TMPFILE: no name, gone with the process). Only on a file
    system without O_TMPFILE does ``tempfile.TemporaryFile`` create a named file and unlink it
    at once; a crash in between leaves ``pop3k-spool-*``. Such a file is never in use by a live
    process for longer than that instant, so removing every match is safe.
    """
    where = directory or tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(where)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(SPOOL_PREFIX):
            continue
        path = os.path.join(where, name)
        try:
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                removed += 1
        except OSError:
            continue  # not ours to remove (permissions): left for the operator
    return removed


class Retrieved:
    """One retrieved mail: its size and SHA-256 (of the unstuffed bytes, CRLF line endings as
    received), and its content in memory or in a spool file. ``refused`` says why the mail may
    not be decoded: "size" (over the limit: the content was not kept; the size still counts
    every byte received) or "line" (a line over the line-length limit: the content is kept,
    so the mail can go to the dead-letter topic as it was received).

    Close it (or use it as a context manager) to release a spool file promptly.
    """

    __slots__ = ("_data", "_digest", "_file", "longest_line", "refused", "size")

    def __init__(
        self,
        size: int,
        digest: bytes,
        *,
        data: bytes | None = None,
        file: IO[bytes] | None = None,
        refused: Refusal | None = None,
        longest_line: int | None = None,
    ) -> None:
        self.size = size
        self._digest = digest
        self._data = data
        self._file = file
        self.refused: Refusal | None = refused
        #: for a "line" refusal: the length of the first over-long line seen.
        self.longest_line = longest_line

    @classmethod
    def from_bytes(cls, data: bytes) -> Retrieved:
        """A retrieved mail held in memory (scripted sessions, tests)."""
        return cls(len(data), hashlib.sha256(data).digest(), data=data)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the received mail (meaningful only when not refused)."""
        return self._digest.hex()

    @property
    def spooled(self) -> bool:
        return self._file is not None

    def read(self) -> bytes:
        """The whole mail as bytes (reads the spool file back when spooled)."""
        if self.refused == "size":
            raise ValueError(f"the mail was refused ({self.refused}); its content was not kept")
        if self._file is not None:
            self._file.seek(0)
            return self._file.read()
        assert self._data is not None
        return self._data

    def fileno(self) -> int | None:
        """The spool file's descriptor (to map it: large mail is decoded in place), None when
        the mail is held in memory (then :meth:`read` is cheap)."""
        if self.refused == "size":
            raise ValueError(f"the mail was refused ({self.refused}); its content was not kept")
        return self._file.fileno() if self._file is not None else None

    def open(self) -> IO[bytes]:
        """A binary stream over the mail from its start (for streaming consumers)."""
        if self.refused == "size":
            raise ValueError(f"the mail was refused ({self.refused}); its content was not kept")
        if self._file is not None:
            self._file.seek(0)
            return self._file
        assert self._data is not None
        return io.BytesIO(self._data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._data = None

    def __enter__(self) -> Retrieved:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "refused:" + self.refused if self.refused else ("spooled" if self.spooled else "memory")
        return f"Retrieved({self.size} bytes, {where})"


class BodySink:
    """Consumes the pieces of one mail body; :meth:`finish` returns the :class:`Retrieved`.

    ``limit`` is the message-size limit in bytes (None: none). Past it, pieces are counted but
    dropped and any spool file is released at once.
    """

    __slots__ = ("_file", "_hash", "_limit", "_over", "_pieces", "_policy", "_size")

    def __init__(self, limit: int | None = None, policy: SpoolPolicy | None = None) -> None:
        self._limit = limit
        self._policy = policy
        self._hash = hashlib.sha256()
        self._pieces: list[bytes] = []
        self._file: IO[bytes] | None = None
        self._size = 0
        self._over = False

    def __call__(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._over:
            return
        if self._limit is not None and self._size > self._limit:
            self._over = True
            self._release()
            return
        self._hash.update(piece)
        try:
            if self._file is not None:
                self._file.write(piece)
                return
            self._pieces.append(piece)
            if self._policy is not None and self._size > self._policy.threshold:
                # Past the threshold: everything so far goes to the file, and so does the rest.
                # The file outlives this call: Retrieved.close() (or finish/abandon) closes it.
                self._file = tempfile.TemporaryFile(prefix=SPOOL_PREFIX, dir=self._policy.directory)  # noqa: SIM115
                self._file.writelines(self._pieces)
                self._pieces = []
        except OSError as exc:
            self._release()
            where = self._policy.directory if self._policy and self._policy.directory else tempfile.gettempdir()
            raise SpoolError(
                f"cannot spool a retrieved mail in {where!r} (runtime.spool_directory): {exc.strerror or exc}; "
                "free space or fix the directory (the cycle is retried, nothing was deleted)"
            ) from None

    def _release(self) -> None:
        self._pieces = []
        if self._file is not None:
            self._file.close()
            self._file = None

    def abandon(self) -> None:
        """The body was not received completely (error): drop what was kept."""
        self._release()

    def finish(self, *, line_too_long: int | None = None) -> Retrieved:
        if self._over:
            return Retrieved(self._size, b"", refused="size")
        refused: Refusal | None = "line" if line_too_long is not None else None
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._release()
                raise SpoolError(f"cannot spool a retrieved mail: {exc.strerror or exc}; free space") from None
            return Retrieved(
                self._size, self._hash.digest(), file=self._file, refused=refused, longest_line=line_too_long
            )
        return Retrieved(
            self._size, self._hash.digest(), data=b"".join(self._pieces), refused=refused, longest_line=line_too_long
        )
