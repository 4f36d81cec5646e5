"""Process-wide settings made once at the start of ``poll-once`` and ``run``."""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("pop3kafka.runtime")

#: glibc mallopt(3) parameter: the most malloc arenas the process may create.
_M_ARENA_MAX = -8
#: arenas allowed when the environment does not say (MALLOC_ARENA_MAX).
ARENA_MAX = 2


def limit_malloc_arenas() -> bool:
    """Cap glibc's malloc arenas at ARENA_MAX unless MALLOC_ARENA_MAX is set; call it before
    any thread starts. True when the cap was set.

    glibc gives each thread that allocates its own arena, up to 8 per CPU, and an arena keeps
    what it once held. The cycle and round threads and every shard producer's librdkafka
    threads allocate, so 500 mailboxes over 8 shards grew the process by 67 MB, 57 MB of it in
    arenas; with two arenas it grew by 41 MB at the same speed (bench/results/compare.md, the
    "many" workload; docs/operations.md, "Memory")."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False  # the operator's choice, applied by glibc itself
    try:
        # The symbols already loaded into this process: ctypes.util.find_library would run
        # ldconfig in a child process at every start.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no arenas to cap)
    ok = bool(mallopt(_M_ARENA_MAX, ARENA_MAX))
    if not ok:
        log.debug("mallopt(M_ARENA_MAX) refused; malloc arenas are not capped")
    return ok
