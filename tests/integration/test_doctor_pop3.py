"""`pop3-kafka doctor` end to end: every POP3 check against the real Dovecot, and failures with fixes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.configs import mailbox, write_config

pytestmark = pytest.mark.integration


def doctor(cfg: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector.cli.main", "doctor", "--config", str(cfg), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_doctor_all_green_then_each_failure_named(services, topic: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services.dovecot.clear("t9")
    good = mailbox("doc", "t9", services.dovecot.pop3s_port, services.cafile)
    cfg = write_config(tmp_path / "ok.yaml", services.bootstrap, topic, [good])
    proc = doctor(cfg, env={"PW_DOC": "t9-pw"})
    out = proc.stdout
    for check in ("dns", "tcp", "tls", "capa", "mechanisms", "login", "uidl", "mailbox"):
        assert f"ok   pop3[doc].{check}" in out, out
    assert "subject commonName=localhost" in out and "SANs localhost, 127.0.0.1" in out and "days)" in out
    assert "logged in with CRAM-MD5" in out

    bad_pw = doctor(cfg, "--mailbox", "doc", env={"PW_DOC": "wrong-password"})
    assert bad_pw.returncode == 1 and "FAIL pop3[doc].login" in bad_pw.stdout
    assert "wrong-password" not in bad_pw.stdout + bad_pw.stderr

    other_ca = tmp_path / "other-ca.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(tmp_path / "k"),
            "-out",
            str(other_ca),
            "-subj",
            "/CN=other",
            "-days",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    untrusted = mailbox("untrusted", "t9", services.dovecot.pop3s_port, str(other_ca))
    cfg2 = write_config(tmp_path / "ca.yaml", services.bootstrap, topic, [untrusted])
    proc = doctor(cfg2, env={"PW_UNTRUSTED": "t9-pw"})
    assert proc.returncode == 1 and "FAIL pop3[untrusted].tls: certificate not verified" in proc.stdout
    assert "fix: set tls_ca_file" in proc.stdout
