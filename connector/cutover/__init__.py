"""Cut-over from other POP3 retrievers: read what fetchmail or getmail has already seen.

pop3-kafka records those UIDLs in its ledger as ``baseline`` (seen, never published), so a
user switching tools does not republish mail the old tool already delivered. See
docs/cutover.md.
"""

from __future__ import annotations

from connector.cutover.importers import (
    SeenUidl,
    find_getmail_oldmail,
    getmail_oldmail_name,
    getmail_uidl_form,
    read_fetchids,
    read_getmail_oldmail,
)

__all__ = [
    "SeenUidl",
    "find_getmail_oldmail",
    "getmail_oldmail_name",
    "getmail_uidl_form",
    "read_fetchids",
    "read_getmail_oldmail",
]
