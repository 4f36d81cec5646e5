"""The connector end to end under bubblewrap (Debian package) with a read-only root file system
and only its spool directory writable: what the Helm chart's security context demands
(readOnlyRootFilesystem with an emptyDir spool). No Docker engine here, so this is how the
container's constraint is proven (issue 8)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.configs import mailbox, write_config
from support.kafkautil import consume_all
from support.mailgen import make_mail
from test_end_to_end import server_uidls

pytestmark = pytest.mark.integration


def bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        pytest.fail("bubblewrap (bwrap) is not installed: `make deps` installs it")
    return path


def test_poll_once_then_run_with_a_read_only_root_and_only_the_spool_writable(
    services, topic: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t8")
    expected = set()
    for i in range(3):
        raw, exp = make_mail(i, seed=97)
        services.dovecot.put("t8", raw)
        expected.add(exp.message_id)
    # one mail over the spool threshold, so the spool (the only writable place) is really used
    big = b"Subject: big\r\nMessage-ID: <big-ro@test>\r\nFrom: a@example.com\r\n\r\n" + (b"x" * 999 + b"\r\n") * 300
    services.dovecot.put("t8", big)
    expected.add("<big-ro@test>")
    spool = tmp_path / "spool"
    spool.mkdir()
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [mailbox("ro", "t8", services.dovecot.pop3s_port, services.cafile)],
        ledger={"topic": f"{topic}.ledger"},
        runtime={"spool_directory": str(spool), "spool_threshold_bytes": 65536},
    )
    env = {
        "PATH": os.environ["PATH"],
        "PW_RO": "t8-pw",
        "HOME": "/nonexistent",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    cmd = [
        bwrap(),
        "--ro-bind", "/", "/",  # everything read-only ...
        "--bind", str(spool), str(spool),  # ... but the spool
        "--dev", "/dev",
        "--proc", "/proc",
        "--die-with-parent",
        "--clearenv",
        *[a for k, v in env.items() for a in ("--setenv", k, v)],
        sys.executable, "-m", "connector.cli.main", "--log-format", "json", "poll-once", "--config", str(cfg),
    ]  # fmt: skip
    # First show the sandbox really is read-only outside the spool (else the test proves nothing).
    probe = subprocess.run(
        [*cmd[: cmd.index(sys.executable)], "sh", "-c", f"touch /tmp/x-{os.getpid()} ; touch {spool}/ok && echo done"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "Read-only file system" in probe.stderr and probe.stdout.strip() == "done", probe
    (spool / "ok").unlink()

    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Read-only file system" not in done.stderr
    assert "ro: ok: 4 published, 4 deleted of 4 listed" in done.stdout, done.stdout
    got = consume_all(services.bootstrap, topic, expect=4, timeout=60)
    assert sorted(c.record["message_id"] for c in got) == sorted(expected)
    assert server_uidls(services, "t8") == []
    assert list(spool.iterdir()) == []  # spooled anonymously (O_TMPFILE), nothing left behind

    # `run`, as the container runs it (admin endpoint, threads, SIGTERM), in the same sandbox.
    raw, exp = make_mail(9, seed=98)
    services.dovecot.put("t8", raw)
    run_cmd = [*cmd[: cmd.index("poll-once")], "run", "--config", str(cfg)]
    proc = subprocess.Popen(run_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        got = consume_all(services.bootstrap, topic, expect=5, timeout=60, settle=0)
        assert exp.message_id in {c.record["message_id"] for c in got}
    finally:
        # bwrap does not forward signals: SIGTERM goes to the connector itself, its child
        # (as the kubelet's goes to the container's process).
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert children and proc.returncode == 0, err[-3000:]
    assert "Read-only file system" not in err and "stopped cleanly" in err
