#!/usr/bin/env python3
"""Child process of bench/large_mail.py: one ``pop3-kafka poll-once`` in a fresh interpreter,
with the memory it took.

    python bench/_rss_child.py CONFIG

1. imports the connector, every module poll-once loads (lazily or not) included, so the
   baseline holds the code and only the work is measured (``main(as_cli=True)``, bench/compare.py:
   the CLI imports as it goes, as the console script does, and the baseline is taken once its
   last eager import is done);
2. resets VmHWM to the current RSS (``/proc/self/clear_refs`` 5) and reads VmRSS: the baseline;
3. runs ``connector.cli.main.main(["poll-once", "--config", CONFIG])`` as the console script would;
4. reads VmHWM (the whole process's peak RSS: Python, librdkafka, OpenSSL, mappings) and VmRSS
   and prints one line ``RSS-CHILD {json}`` last on stdout: baseline_rss_kb, hwm_kb,
   rss_end_kb, exit, wall_s, and RssAnon/RssFile at the baseline.

With ``POP3K_BENCH_DIAGNOSE=1`` (a diagnosis: it slows the run and adds its own memory) it also
reports where memory went: ``py_traced_peak_kb``, the peak of Python's traced heap from the
baseline on (tracemalloc: bytes objects, buffers, the decoder's structures; not librdkafka's or
OpenSSL's C heaps); ``rdkafka_max_outq``, the most records librdkafka held at once (queued or
awaiting their delivery report: ``len(producer)`` sampled every 10 ms) and
``rdkafka_max_msg_size_kb``, the most bytes its statistics reported queued (``msg_size``, once
a second); and ``baseline_smaps``, the RSS of the child's mappings by kind (see
:func:`smaps_by_kind`) at the baseline, which the parent compares with the peak.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: what poll-once imports, eagerly or lazily (connector/cli/main.py imports inside functions).
MODULES = (
    "confluent_kafka",
    "fastavro",
    "yaml",
    "connector.cli.main",
    "connector.config",
    "connector.runtime.runner",
    "connector.runtime.cycle",
    "connector.runtime.exactly_once",
    "connector.runtime.placement",
    "connector.delivery.kafka",
    "connector.delivery.transactional",
    "connector.delivery.admin",
    "connector.delivery.offload",
    "connector.decoding",
    "connector.decoding.stream",
    "connector.records",
    "connector.observability.logging",
)
MARKER = "RSS-CHILD "


def status_kb(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def mapping_kind(path: str) -> str:
    """What a mapping of /proc/PID/smaps is, by its path."""
    if not path:
        return "anonymous mmap (large mallocs, glibc thread arenas, thread stacks)"
    if path == "[heap]":
        return "[heap] (brk: glibc main arena)"
    if path.startswith("["):
        return "other [special] mappings"
    if "pop3k-spool" in path or path.endswith("(deleted)"):
        return "spool file mapping (mmap of the spooled mail)"
    name = path.rsplit("/", 1)[-1]
    if "librdkafka" in name:
        return "librdkafka .so"
    if name.startswith(("libcrypto", "libssl")):
        return "OpenSSL .so"
    if name.startswith(("python", "libpython")):
        return "python binary"
    if ".so" in name:
        return "other .so (extension modules, libc, zstd...)"
    return "other files"


def smaps_by_kind(pid: int | str = "self") -> dict[str, dict[str, int]]:
    """RSS and anonymous KiB of every mapping of ``pid``, summed by :func:`mapping_kind`."""
    out: dict[str, dict[str, int]] = {}
    kind = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                fields = line.split(None, 5)
                kind = mapping_kind(fields[5].strip() if len(fields) > 5 else "")
            elif first in ("Rss:", "Anonymous:"):
                slot = out.setdefault(kind, {"rss": 0, "anon": 0})
                slot["rss" if first == "Rss:" else "anon"] += int(line.split()[1])
    return out


class RdkafkaWatch:
    """Diagnosis: wraps connector.delivery.kafka's Producer to see how much librdkafka holds."""

    def __init__(self) -> None:
        self.producers: list[Any] = []
        self.max_outq = 0
        self.max_msg_size = 0
        self.done = threading.Event()

    def install(self) -> None:
        import confluent_kafka

        from connector.delivery import kafka

        watch = self

        class WatchedProducer(confluent_kafka.Producer):
            def __init__(self, conf: dict[str, Any]) -> None:
                conf = {**conf, "statistics.interval.ms": 1000, "stats_cb": watch.on_stats}
                super().__init__(conf)
                watch.producers.append(self)

        vars(kafka)["Producer"] = WatchedProducer  # what Publisher._get() instantiates
        threading.Thread(target=self.sample, daemon=True).start()

    def on_stats(self, text: str) -> None:
        self.max_msg_size = max(self.max_msg_size, int(json.loads(text).get("msg_size", 0)))

    def sample(self) -> None:
        while not self.done.wait(0.01):
            for p in list(self.producers):
                self.max_outq = max(self.max_outq, len(p))


#: the module the CLI imports last before its work starts (it imports the Kafka side of the
#: connector, and the decode workers are forked right after): ``as_cli``'s baseline point.
LAST_EAGER_IMPORT = "connector.runtime.decode_pool"


class AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``then(module, started)`` once ``name`` has been imported (its module code has
    run); ``started``: time.perf_counter() when its import began. Removes itself on first use.
    Also bench/_timeline_child.py's way to wrap what the CLI imports late."""

    def __init__(self, name: str, then: Callable[[ModuleType, float], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        started = time.perf_counter()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            self.then(module, started)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def main(argv: list[str], *, as_cli: bool = False, at_baseline: tuple[str, ...] = ()) -> int:
    """``as_cli``: run poll-once as the console script does, importing as it goes (the CLI opens
    its first POP3 sessions before it imports the Kafka side), and take the baseline when the
    CLI's last eager import is done; else import MODULES first. Either way the modules in
    ``at_baseline`` (the S/MIME ones, which the CLI imports at the first S/MIME mail) are
    imported just before the baseline, so the growth measured is the work's, not code's."""
    if len(argv) != 1:
        print("usage: _rss_child.py CONFIG", file=sys.stderr)
        return 2
    diagnose = os.environ.get("POP3K_BENCH_DIAGNOSE") == "1"
    out: dict[str, Any] = {}

    def baseline(*_: object) -> None:
        for name in at_baseline:
            importlib.import_module(name)
        watch = RdkafkaWatch() if diagnose else None
        if watch is not None:
            watch.install()
            watches.append(watch)
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
            hwm_reset = True
        except OSError:
            hwm_reset = False
        out.update(
            baseline_rss_kb=status_kb("VmRSS"),
            baseline_anon_kb=status_kb("RssAnon"),
            baseline_file_kb=status_kb("RssFile"),
            hwm_reset=hwm_reset,
        )
        if diagnose:
            import tracemalloc

            out["baseline_smaps"] = smaps_by_kind()
            tracemalloc.start()

    watches: list[RdkafkaWatch] = []
    if as_cli:
        sys.meta_path.insert(0, AfterImport(LAST_EAGER_IMPORT, baseline))
    else:
        for name in MODULES:
            importlib.import_module(name)
        baseline()
    from connector.cli.main import main as cli_main

    t0 = time.perf_counter()
    try:
        code = cli_main(["poll-once", "--config", argv[0]])
    except SystemExit as exc:  # argparse and friends
        code = exc.code if isinstance(exc.code, int) else 1
    wall = time.perf_counter() - t0
    if "baseline_rss_kb" not in out:  # as_cli, and the CLI never imported LAST_EAGER_IMPORT
        print(f"_rss_child: {LAST_EAGER_IMPORT} was not imported: no baseline taken", file=sys.stderr)
        return 1
    out.update(hwm_kb=status_kb("VmHWM"), rss_end_kb=status_kb("VmRSS"), exit=code, wall_s=round(wall, 4))
    # Decode workers (connector/runtime/decode_pool.py) are this process's children, reaped
    # before poll-once returns: the largest one's peak RSS (a fork: shared pages included).
    out["children_maxrss_kb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if diagnose:
        import tracemalloc

        out["py_traced_peak_kb"] = tracemalloc.get_traced_memory()[1] // 1024
        out["end_smaps"] = smaps_by_kind()
        out["threads_at_end"] = threading.active_count()
        tracemalloc.stop()
    for watch in watches:
        watch.done.set()
        out["rdkafka_max_outq"] = watch.max_outq
        out["rdkafka_max_msg_size_kb"] = watch.max_msg_size // 1024
    sys.stdout.flush()
    print(MARKER + json.dumps(out), flush=True)
    if as_cli:  # and the process ends as the console script's does (cli.entry_point)
        import logging

        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
