"""`make bench` in miniature: bench/compare.py on the session's broker at 0.5 % of its sizes
(10 mails of the ~24 KB mix, 2 mailboxes x 10 mails), one run, into a temporary results directory.

Every tool must have run, done the whole job (compare.py verifies each run and fails otherwise)
and produced positive numbers, and the report must hold the targets, the tables and the plot.
getmail6, fetchmail and GNU time come from `make bench-deps`; without them compare.py exits 1 and
this test fails: it never skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from connector.runtime import decode_pool

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = {"small20k": 10, "many": 20}

#: what each tool's verification recorded, checked against the mail count
VERIFIED = {
    "raw": "retrieved",
    "poplib": "retrieved",
    "getmail6": "maildir_files",
    "fetchmail": "bsmtp_messages",
    "eos-decode": "committed_records",
    "eos-decode-1p": "committed_records",
    "alo-decode": "committed_records",
    "eos-raw": "committed_records",
    "alo-raw": "committed_records",
    "produce-idem": "records_acked",
    "produce-txn": "records_acked",
    "decode-only": "encoded_records",
}
TOOLS = list(VERIFIED)
CONNECTOR = ("eos-decode", "eos-decode-1p", "alo-decode", "eos-raw", "alo-raw")


def test_compare_smoke(services, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "bench" / "compare.py"), "--runs", "1", "--scale", "0.005"]
    cmd += [arg for w in WORKLOADS for arg in ("--workload", w)] + ["--results-dir", str(out)]
    env = {**os.environ, "KAFKA_BOOTSTRAP": services.bootstrap}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]

    data = json.loads((out / "compare.json").read_text())
    assert set(data["workloads"]) == set(WORKLOADS)
    for name, mails in WORKLOADS.items():
        w = data["workloads"][name]
        assert w["mails"] == mails
        assert set(w["rows"]) == set(TOOLS), name
        for tool, row in w["rows"].items():
            for key in ("wall_s_median", "mails_per_s", "mb_per_s", "cpu_s_per_mail", "peak_rss_mib_median"):
                assert row[key] > 0, (name, tool, key, row[key])
            assert row["runs"] == 1
            assert row["ratios"]["raw"]["throughput"] > 0
            for peer in ("poplib", "getmail6", "fetchmail"):
                assert row["ratios"][peer]["throughput"] > 0, (name, tool, peer)
        for tool in CONNECTOR:
            assert w["rows"][tool]["rss_growth_mb_worst"] > 0
            assert w["rows"][tool]["in_process_s_median"] > 0
        # every run was verified: the job was done completely
        assert sorted(r["tool"] for r in w["runs"]) == sorted(TOOLS)
        for run in w["runs"]:
            v = run["verified"]
            assert v[VERIFIED[run["tool"]]] >= mails, run
            if run["tool"] not in ("produce-idem", "produce-txn", "decode-only"):
                assert v["left_on_server"] == 0, run
            if run["tool"] in CONNECTOR:
                assert v["published"] == v["deleted"] == v["record_ids"] == mails, run
                assert v["dead_letters"] == 0, run
                # decode workers ran where decoding is on and allowed (this machine: >= 2 CPUs)
                forked = v["decode_worker_peak_rss_kb"] > 0
                assert forked == (run["tool"] in ("eos-decode", "alo-decode") and decode_pool.usable_cpus() > 1), run

    verdicts = [v for _, v, _ in data["targets"]]
    assert len(verdicts) == 6
    assert all(v.split()[0] in ("PASS", "FAIL", "not") for v in verdicts), verdicts

    md = (out / "compare.md").read_text()
    assert md.index("## Targets") < md.index("## small20k") < md.index("## many")
    for tool in TOOLS:
        assert f"| {tool} |" in md
    for what in ("getmail6", "fetchmail", "OpenSSL", "Apache Kafka"):
        assert what in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
