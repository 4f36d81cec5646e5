"""cProfile of the full record path (decode_mail + build_mail_record + Avro) on bench/parsers.py's mix.

Prints the top functions by own time, as a markdown table, for bench/results/decode-profile.md.
``--splitter compat32`` profiles decode_mail with the stdlib's compat32 parser building the MIME
tree (how it was before connector.decoding.fastmime).

Run: .venv/bin/python bench/profile_decode.py [--splitter fast|compat32] [--mails 300] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import parsers  # noqa: E402

from connector.decoding import mime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splitter", choices=sorted(mime.SPLITTERS), default="fast")
    ap.add_argument("--mails", type=int, default=300)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()

    mime._PARSER = mime.SPLITTERS[args.splitter]
    rng = random.Random(20250303)
    mails = [parsers.build_mail(rng, n) for n in range(args.mails)]

    def run() -> None:
        for raw in mails:
            parsers.full_record(raw)

    run()  # warm-up: imports, caches
    start = time.perf_counter()
    run()
    plain = time.perf_counter() - start
    profile = cProfile.Profile()
    profile.runcall(run)
    stats = pstats.Stats(profile)
    total = stats.total_tt  # type: ignore[attr-defined]
    print(
        f"splitter {args.splitter}: {args.mails} mails, {plain / args.mails * 1e3:.3f} ms/mail unprofiled, "
        f"{total / args.mails * 1e3:.3f} ms/mail under cProfile\n"
    )
    print("| own time % | own ms/mail | cumulative ms/mail | calls/mail | function |")
    print("|---:|---:|---:|---:|---|")
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in rows[: args.top]:
        where = filename.replace(str(ROOT) + "/", "").replace(sys.prefix + "/", "")
        if "/lib/python3" in where:
            where = "stdlib " + where.split("/lib/python3.11/")[-1]
        label = f"{name} ({where}:{line})" if line else name
        print(
            f"| {tottime / total * 100:.1f} | {tottime / args.mails * 1e3:.4f} | {cumtime / args.mails * 1e3:.4f} "
            f"| {ncalls / args.mails:.1f} | `{label}` |"
        )


if __name__ == "__main__":
    main()
