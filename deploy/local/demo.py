#!/usr/bin/env python3
"""The demo: local Kafka + Dovecot, a few sample mails, one connector cycle, the records.

    make demo          # installs what it needs, then runs this
    make demo-down     # stops the demo's Kafka and Dovecot (python deploy/local/demo.py --down)

Steps: bring up the stack in .stack/demo; drop sample mails into two mailboxes; write a
connector config; run `pop3-kafka poll-once`; run `pop3-kafka tail` to show the decoded records.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from localstack import STATE_ROOT, Stack  # noqa: E402
from support.mailgen import SHAPES, make_mail  # noqa: E402

DEMO_DIR = Path(os.environ.get("POP3K_DEMO_DIR", STATE_ROOT / "demo"))


def main() -> int:
    if sys.argv[1:] == ["--down"]:
        Stack.at(DEMO_DIR).down()
        print(f"demo stack in {DEMO_DIR} stopped")
        return 0
    state = DEMO_DIR
    stack = Stack.at(state)
    print(f"==> starting Kafka and Dovecot (state in {state})", flush=True)
    stack.up()
    for user in ("orders", "invoices"):
        stack.dovecot.clear(user)
    for i, shape in enumerate(SHAPES):
        raw, _ = make_mail(i, shape=shape, seed=42)
        stack.dovecot.put("orders" if i % 2 == 0 else "invoices", raw)
    print(f"==> seeded {len(SHAPES)} sample mails into mailboxes 'orders' and 'invoices'", flush=True)
    (state / "secrets").mkdir(exist_ok=True)
    for user in ("orders", "invoices"):
        p = state / "secrets" / f"{user}.pw"
        p.write_text(f"{user}-pw\n")
        p.chmod(0o600)
    config = {
        "kafka": {"bootstrap_servers": stack.kafka.bootstrap},
        "topics": {"mail": "demo.mail", "partitions": 3},
        "mailboxes": [
            {
                "id": user,
                "host": "127.0.0.1",
                "port": stack.dovecot.pop3s_port,
                "tls": "implicit",
                "tls_ca_file": str(stack.dovecot.cafile),
                "username": user,
                "password": {"file": f"secrets/{user}.pw"},
                "poll_interval_seconds": 30,
            }
            for user in ("orders", "invoices")
        ],
    }
    cfg = state / "config.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = [sys.executable, "-m", "connector.cli.main", "--log-format", "text"]
    print(f"==> pop3-kafka poll-once --config {cfg}", flush=True)
    rc = subprocess.call([*cli, "poll-once", "--config", str(cfg)])
    if rc != 0:
        return rc
    print("==> pop3-kafka tail --from-beginning --format summary", flush=True)
    rc = subprocess.call(
        [*cli, "tail", "--config", str(cfg), "--from-beginning", "--idle-timeout", "5", "--format", "summary"]
    )
    if rc == 0:
        print("==> one whole record: pop3-kafka tail --from-beginning --max 1 --bodies", flush=True)
        rc = subprocess.call(
            [*cli, "tail", "--config", str(cfg), "--from-beginning", "--max", "1", "--idle-timeout", "5", "--bodies"]
        )
    print(
        f"\nThe stack keeps running: try `pop3-kafka run --config {cfg}` and drop mail into "
        f"{stack.dovecot.maildir('orders')}/new. Stop it with `make demo-down`."
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
