#!/usr/bin/env python3
"""A second real POP3 server for the tests: GNU Mailutils pop3d (Debian ``mailutils-pop3d``).

It differs from the Dovecot peer in ways the connector must cope with:

* no SASL at all (``AUTH`` answers ``-ERR Not implemented``): USER/PASS and APOP only;
* users log in as ``NAME@test.example`` (the ``virtdomain`` authorization module);
* the UIDL is ``<md5 hex>.<uidvalidity>.<uid>`` and is stored by *adding an* ``X-UIDL:``
  *header* to the message, so RETR returns more octets than LIST announced, and the file is
  rewritten on QUIT;
* a second session gets ``-ERR [IN-USE] Mailbox in use`` at once (Dovecot waits ~10 s);
* maildir files must use LF line endings: pop3d lists a CRLF file as 2 octets and truncates
  it on rewrite (the mail is lost), so :meth:`GnuPop3d.put` converts to LF, as an MDA would;
* multi-line responses are slow (~44 ms each, Nagle on the server plus delayed ACK on the
  client) unless the client sets TCP_QUICKACK.

    python deploy/local/mailutils.py up   [--dir D]   # configure + start, print env
    python deploy/local/mailutils.py down [--dir D]

Everything listens on 127.0.0.1 only and lives under one state directory, which must be
reachable by other users (0755 parents) because pop3d switches to the mail user.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from localstack import STATE_ROOT, DovecotServer, StackError, free_port, pid_alive, pid_is  # noqa: E402

POP3D_BIN = os.environ.get("GNU_POP3D_BIN", "/usr/sbin/pop3d")
POPAUTH_BIN = os.environ.get("GNU_POPAUTH_BIN", "/usr/bin/popauth")
APT_PACKAGE = "mailutils-pop3d"
DEFAULT_DIR = STATE_ROOT / "gnu-pop3d"
DOMAIN = "test.example"

# Static test fixtures, not secrets. Log in as f"{name}@{DOMAIN}".
GNU_TEST_USERS: dict[str, str] = {
    "g1": "g1-pw",
    "g2": "g2-pw",
    # one mailbox per integration test, so tests never see each other's mail
    **{f"g{i}": f"g{i}-pw" for i in range(3, 9)},
}


def ensure_installed() -> None:
    """Install mailutils-pop3d with apt when missing, without letting apt start its service.

    The package enables ``mailutils-pop3d.service`` (pop3d on *:110); a temporary
    ``/usr/sbin/policy-rc.d`` that exits 101 forbids the start, and is removed afterwards
    unless it was there before (as in the Makefile's ``deps`` target).
    """
    if Path(POP3D_BIN).exists() and Path(POPAUTH_BIN).exists():
        return
    if shutil.which("apt-get") is None:
        raise StackError(f"{POP3D_BIN} not found and no apt-get: install GNU Mailutils pop3d ({APT_PACKAGE})")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    policy = Path("/usr/sbin/policy-rc.d")
    guard = False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if not policy.exists():
            subprocess.run(
                [*sudo, "sh", "-c", f"printf '#!/bin/sh\\nexit 101\\n' > {policy} && chmod 755 {policy}"], check=True
            )
            guard = True
        cmd = [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", APT_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:  # stale package lists: update once and retry
            subprocess.run([*sudo, "apt-get", "update", "-qq"], capture_output=True, env=env, check=False)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise StackError(f"apt-get install {APT_PACKAGE} failed: {proc.stderr[-2000:]}")
    finally:
        if guard:
            subprocess.run([*sudo, "rm", "-f", str(policy)], check=False)


@dataclass
class GnuPop3d:
    """One GNU pop3d with an STLS listener and a POP3S listener, maildir storage."""

    dir: Path
    pop3_port: int = 0
    pop3s_port: int = 0
    pid: int = 0
    domain: str = DOMAIN
    users: dict[str, str] = field(default_factory=lambda: dict(GNU_TEST_USERS))
    #: RFC 2449 §6.8: minimum seconds between two logins of a user (0 = off; pop3d ``login-delay``)
    login_delay: int = 0
    #: RFC 2449 §6.7: days pop3d keeps retrieved mail (None = NEVER; pop3d ``expire``, which
    #: deletes retrieved mail older than that when the session ends)
    expire: int | None = None

    # ---- paths and names

    @property
    def conf(self) -> Path:
        return self.dir / "etc" / "pop3d.conf"

    @property
    def cafile(self) -> Path:
        return self.dir / "tls" / "ca.pem"

    @property
    def log_file(self) -> Path:
        return self.dir / "log" / "pop3d.log"

    @property
    def pid_file(self) -> Path:
        return self.dir / "pop3d.pid"

    def login_name(self, user: str) -> str:
        """The name to log in with: pop3d's virtdomain module wants ``user@domain``."""
        return f"{user}@{self.domain}"

    def maildir(self, user: str) -> Path:
        # virtdomain: the passwd home is the user's directory, INBOX inside it the maildir
        return self.dir / "mail" / user / "INBOX"

    def _ids(self) -> tuple[int, int]:
        if os.geteuid() == 0:
            mail = pwd.getpwnam(os.environ.get("GNU_POP3D_MAIL_USER", "mail"))
            return mail.pw_uid, mail.pw_gid
        return os.getuid(), os.getgid()

    # ---- set-up

    def configure(self) -> None:
        ensure_installed()
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            for parent in self.dir.resolve().parents:
                if not parent.stat().st_mode & 0o001:
                    raise StackError(
                        f"{parent} is not searchable by other users (mode {parent.stat().st_mode & 0o777:o}); "
                        "pop3d runs sessions as the mail user. Use a state directory under a 0755 path."
                    )
        for sub in ("etc/virt", "mail", "log", "lock", "tls"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.pop3_port = self.pop3_port or free_port()
        self.pop3s_port = self.pop3s_port or free_port()
        if not (self.dir / "tls" / "server.pem").exists():
            # the same throw-away CA + leaf (SAN localhost, 127.0.0.1, ::1) as the Dovecot peer
            DovecotServer._gen_certs(self)  # type: ignore[arg-type]  # only uses self.dir
        uid, gid = self._ids()
        passwd, apop = [], []
        for name, pw in self.users.items():
            if ":" in pw or "\n" in pw:
                raise StackError(f"test password of {name!r} may not contain ':' or a newline")
            crypted = subprocess.run(
                ["openssl", "passwd", "-6", "-stdin"], input=pw, capture_output=True, text=True, check=True
            ).stdout.strip()
            home = self.dir / "mail" / name
            for sub in ("cur", "new", "tmp"):
                (self.maildir(name) / sub).mkdir(parents=True, exist_ok=True)
            passwd.append(f"{name}:{crypted}:{uid}:{gid}::{home}:/bin/false\n")
            apop.append(f"{self.login_name(name)} {pw}\n")
        virt = self.dir / "etc" / "virt" / self.domain
        virt.write_text("".join(passwd))
        os.chmod(virt, 0o644)
        # APOP secrets: a DBM file built by popauth (which wants an absolute output path)
        apop_txt, apop_db = self.dir / "etc" / "apop.txt", self.dir / "etc" / "apop.db"
        apop_txt.write_text("".join(apop))
        os.chmod(apop_txt, 0o600)
        apop_db.unlink(missing_ok=True)
        proc = subprocess.run(
            [POPAUTH_BIN, "-c", "-f", str(apop_txt), "-o", str(apop_db.resolve())],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise StackError(f"popauth failed: {proc.stderr[-2000:]}")
        if os.geteuid() == 0:
            for root, dirs, files in os.walk(self.dir / "mail"):
                for n in dirs + files:
                    os.chown(os.path.join(root, n), uid, gid)
            os.chown(self.dir / "mail", uid, gid)
            os.chown(self.dir / "lock", uid, gid)
        d = self.dir.resolve()
        policy = ""
        if self.expire is not None:
            policy += f"expire {self.expire};\n"
        if self.login_delay:
            # pop3d keeps the last login per user in a GDBM file that it refuses to use unless it
            # is owned by pop3d's own user and readable by nobody else, yet creates it mode 0660:
            # an empty file made here with mode 0600 passes the check, and GDBM fills it in.
            stat_file = self.dir / "lock" / "logins"
            stat_file.unlink(missing_ok=True)
            stat_file.touch(mode=0o600)
            stat_file.chmod(0o600)
            policy += f'login-delay {self.login_delay};\nstat-file "{d}/lock/logins";\n'
        self.conf.write_text(f"""\
# Generated by deploy/local/mailutils.py: a self-contained GNU pop3d for the tests.
logging {{ syslog false; print-severity true; }};
mailbox {{ mailbox-type maildir; }};
auth {{
  authorization virtdomain;
  authentication generic;
}};
virtdomain {{ passwd-dir "{d}/etc/virt"; }};
apop-database-file "{d}/etc/apop.db";
apop-database-safety none;
# A missing lock directory makes every login fail with "[IN-USE] Mailbox in use".
mandatory-locking {{
  enable true;
  lock-directory "{d}/lock";
}};
tls-file-checks {{ key-file none; cert-file none; ca-file none; }};
tls {{
  ssl-certificate-file "{d}/tls/server.pem";
  ssl-key-file "{d}/tls/server.key";
}};
server 127.0.0.1:{self.pop3_port} {{
  tls-mode stls;
  transcript yes;
}};
server 127.0.0.1:{self.pop3s_port} {{
  tls-mode connection;
  transcript yes;
}};
{policy}""")
        proc = subprocess.run(
            [POP3D_BIN, f"--config-file={self.conf}", "--config-lint"], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise StackError(f"pop3d config check failed: {proc.stdout[-1000:]}{proc.stderr[-1000:]}")

    # ---- life cycle

    def running_pid(self) -> int:
        """Pid of our pop3d master, or 0 (a reused pid of another program is ignored)."""
        pid = self.pid
        if not pid:
            with contextlib.suppress(OSError, ValueError):
                pid = int(self.pid_file.read_text().strip())
        return pid if pid and pid_is(pid, "pop3d", f"--config-file={self.conf}") else 0

    def start(self, timeout: float = 15.0) -> None:
        if self.running_pid():
            return
        self.configure()
        # --foreground keeps the pid we started; never hand the daemon a pipe for stdout.
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                [POP3D_BIN, f"--config-file={self.conf}", "--daemon", "--foreground"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.pid = proc.pid
        self.pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while not (self._greets(self.pop3_port) and self._greets(self.pop3s_port, tls=True)):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StackError(f"pop3d did not become ready; see {self.log_file}:\n{self._log_tail()}")
            time.sleep(0.02)

    def _greets(self, port: int, *, tls: bool = False) -> bool:
        """The listener answers with a ``+OK`` greeting (over TLS with our CA for POP3S), so
        pop3d really serves, rather than only having bound the port."""
        try:
            with contextlib.ExitStack() as stack:
                s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=1.0))
                if tls:
                    ctx = ssl.create_default_context(cafile=str(self.cafile))
                    s = stack.enter_context(ctx.wrap_socket(s, server_hostname="127.0.0.1"))
                ok = s.recv(512).startswith(b"+OK")
                with contextlib.suppress(OSError):
                    s.sendall(b"QUIT\r\n")
                    s.recv(512)
                return ok
        except (OSError, ssl.SSLError):
            return False

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _children(self, pid: int) -> list[int]:
        """Session processes forked by our master (same command line, parent ``pid``)."""
        out = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            if ppid == pid and pid_is(int(proc.name), "pop3d", f"--config-file={self.conf}"):
                out.append(int(proc.name))
        return out

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM our master and any session it forked (checked by command line), then wait."""
        pid = self.running_pid()
        if pid:
            victims = [pid, *self._children(pid)]
            for p in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while any(pid_alive(p) for p in victims) and time.monotonic() < deadline:
                time.sleep(0.02)
            for p in victims:
                if pid_is(p, "pop3d", f"--config-file={self.conf}"):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.02)
        self.pid = 0
        self.pid_file.unlink(missing_ok=True)

    # ---- mail helpers

    def put(self, user: str, raw: bytes) -> str:
        """Drop one mail into the user's maildir (tmp/, then rename into new/); returns its name.

        Line endings become LF: GNU pop3d mangles maildir files with CRLF line endings.
        """
        md = self.maildir(user)
        name = f"{time.time_ns()}.{uuid.uuid4().hex}.pop3kafka"
        tmp = md / "tmp" / name
        tmp.write_bytes(raw.replace(b"\r\n", b"\n"))
        if os.geteuid() == 0:
            st = md.stat()
            os.chown(tmp, st.st_uid, st.st_gid)
        tmp.rename(md / "new" / name)
        return name

    def count(self, user: str) -> int:
        md = self.maildir(user)
        return sum(1 for sub in ("new", "cur") for p in (md / sub).iterdir() if p.is_file())

    def clear(self, user: str) -> None:
        md = self.maildir(user)
        for sub in ("new", "cur", "tmp"):
            for p in (md / sub).iterdir():
                p.unlink()

    def env(self) -> dict[str, str]:
        return {
            "GNU_POP3_HOST": "127.0.0.1",
            "GNU_POP3_PORT": str(self.pop3_port),
            "GNU_POP3S_PORT": str(self.pop3s_port),
            "GNU_POP3_CAFILE": str(self.cafile),
            "GNU_POP3D_TEST_DIR": str(self.dir),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "env"])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory (default: %(default)s)")
    args = ap.parse_args(argv)
    d = args.dir.resolve()
    state = d / "gnu-pop3d.json"
    server = GnuPop3d(d)
    if state.exists():
        for k, v in json.loads(state.read_text()).items():
            setattr(server, k, v)
    try:
        if args.action == "up":
            t0 = time.monotonic()
            server.start()
            print(f"# GNU pop3d up in {time.monotonic() - t0:.1f}s (state in {d})", file=sys.stderr)
        elif args.action == "down":
            server.stop()
            return 0
    except StackError as exc:
        print(f"mailutils: {exc}", file=sys.stderr)
        return 1
    state.write_text(json.dumps({"pop3_port": server.pop3_port, "pop3s_port": server.pop3s_port}))
    for k, v in server.env().items():
        print(f"export {k}='{v}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
