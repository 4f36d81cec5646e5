"""poll-once's start: the first POP3 sessions open before the Kafka side of the connector is
imported (connector/runtime/sessions.py, connector/cli/main.py), unless decode workers are
to be forked first; and sessions opened that early are ended without deletes when the start
fails after them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.fakepop import Maildrop
from support.mailgen import make_mail

from connector.cli import main as cli
from connector.runtime import sessions

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter (this one has imported everything already): open_first_wave is
# replaced by a probe that notes what is imported at that moment, and whether the decode
# workers' fork was attempted by then, and stops the command there.
PROBE = """
import json, sys
from connector.runtime import sessions

class Stop(Exception):
    pass

def probe(config, mailboxes, session_factory=None):
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("confluent_kafka", "fastavro", "prometheus_client")
                   or m in ("connector.runtime.cycle", "connector.delivery.kafka"))
    pool = sys.modules.get("connector.runtime.decode_pool")
    print("PROBE " + json.dumps({"heavy": heavy, "forked": pool is not None and pool._pool is not None,
                                 "cpus": pool.usable_cpus() if pool is not None else None,
                                 "decoder": "connector.decoding.mime" in sys.modules}))
    raise Stop

sessions.open_first_wave = probe
import connector.cli.main as cli
try:
    cli.main(["poll-once", "--config", sys.argv[1]])
except Stop:
    pass
"""


def write_config(tmp_path: Path, runtime: dict[str, Any] | None = None, **mailbox: Any) -> Path:
    doc = {
        "kafka": {"bootstrap_servers": "127.0.0.1:1", "delivery_timeout_seconds": 1},
        "topics": {"mail": "mail"},
        "delivery": {"mode": "exactly_once"},
        "runtime": runtime or {},
        "mailboxes": [
            {"id": "a", "host": "127.0.0.1", "port": 1, "username": "u", "password": {"env": "PW_A"}, **mailbox}
        ],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def probe(config: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(config)],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "PW_A": "pw"},
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    return dict(json.loads(line.removeprefix("PROBE ")))


def test_raw_passthrough_opens_its_sessions_before_kafka_and_avro_are_imported(tmp_path: Path) -> None:
    got = probe(write_config(tmp_path, mime_decoding=False))
    assert got["heavy"] == [] and got["forked"] is False
    assert got["decoder"] is False  # the configuration's decode options do not import the decoder


def test_decode_processes_zero_opens_before_the_imports_too(tmp_path: Path) -> None:
    got = probe(write_config(tmp_path, runtime={"decode_processes": 0}))
    assert got["heavy"] == [] and got["forked"] is False


def test_with_decode_workers_to_fork_the_sessions_open_after_the_fork(tmp_path: Path) -> None:
    """Forking with a thread running is unsafe (decode_pool.start refuses): the sessions then
    open from Runner.open_early, once the workers exist."""
    got = probe(write_config(tmp_path, runtime={"decode_processes": 1}))
    assert got["forked"] is True and "confluent_kafka" in {m.split(".")[0] for m in got["heavy"]}
    assert got["decoder"] is True  # imported before the fork: the workers share it


LAZY = """
import sys
import connector.cli.main, connector.runtime.runner, connector.runtime.exactly_once, connector.runtime.cycle
assert "connector.decoding.mime" not in sys.modules, "the Kafka side imported the decoder"
import connector.decoding as d
from connector.decoding import DecodedMail, decode_mail
from connector.decoding.mime import decode_mail as real
from connector.decoding.model import DecodedMail as real_model
assert decode_mail is real and DecodedMail is real_model and d.decode_mail is real
try:
    d.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise AssertionError("no AttributeError")
print("LAZY ok")
"""


def test_raw_passthrough_never_imports_the_decoder_and_its_names_load_on_first_use() -> None:
    """connector.decoding loads decode_mail and the model on first use (PEP 562): a raw
    passthrough poll-once, which imports everything but never decodes, starts ~20 ms sooner."""
    proc = subprocess.run(
        [sys.executable, "-c", LAZY], check=False, capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "LAZY ok"


def test_sessions_opened_before_a_failed_start_are_ended_without_deletes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PW_A", "pw")
    drop = Maildrop({f"U{i}": make_mail(i)[0] for i in range(3)})
    monkeypatch.setattr(sessions, "open_session", lambda m: drop.session())

    class Broken:
        def __init__(self, *a: Any, **k: Any) -> None:
            raise RuntimeError("injected: the runner cannot start")

    from connector.runtime import runner

    monkeypatch.setattr(runner, "Runner", Broken)
    with pytest.raises(RuntimeError, match="injected"):
        cli.main(["poll-once", "--config", str(write_config(tmp_path, mime_decoding=False))])
    assert "UIDL" in drop.log  # it was opened and listed before the start failed
    assert not any(x.startswith("DELE") for x in drop.log) and len(drop.mails) == 3
    assert drop.log[-1] == "ABORT"  # ended the default way, RSET + QUIT (applies nothing)
