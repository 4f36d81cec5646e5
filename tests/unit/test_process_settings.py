"""connector/runtime/process.py: the malloc arena cap of poll-once and run (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from connector.runtime import process

#: Eight threads allocate at once; then count the non-main malloc arenas: glibc maps each
#: arena's heap 64 MiB aligned (HEAP_MAX_SIZE on 64-bit), without a file.
COUNT_ARENAS = textwrap.dedent(
    """
    import sys, threading
    if sys.argv[1] == "cap":
        from connector.runtime.process import limit_malloc_arenas
        print("capped" if limit_malloc_arenas() else "not capped")
    go = threading.Barrier(8)
    hold = []
    def work():
        go.wait()
        hold.append([bytearray(1000) for _ in range(3000)])
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    arenas = 0
    for line in open("/proc/self/maps"):
        f = line.split()
        lo = int(f[0].split("-")[0], 16)
        arenas += len(f) == 5 and lo % (64 << 20) == 0 and f[1] == "rw-p"
    print(arenas)
    """
)


def arenas(mode: str, **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run(
        [sys.executable, "-c", COUNT_ARENAS, mode], env={**base, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.splitlines()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc arenas are Linux-only")
def test_the_cap_keeps_threads_to_one_extra_arena() -> None:
    assert arenas("cap") == ["capped", "1"]  # the main arena and one more: ARENA_MAX == 2
    uncapped = arenas("nocap")
    assert int(uncapped[0]) >= 4, uncapped  # what the cap prevents: an arena per allocating thread


def test_the_operators_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert process.limit_malloc_arenas() is False
    out = arenas("cap", MALLOC_ARENA_MAX="8")
    assert out[0] == "not capped"
