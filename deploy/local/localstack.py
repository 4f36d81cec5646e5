#!/usr/bin/env python3
"""Local test infrastructure: a real Apache Kafka 4.x broker and a real Dovecot POP3 server.

Used by the pytest fixtures, by .ci/run and by ``make demo``. Everything listens on
127.0.0.1 only and lives under one state directory, so several stacks can coexist
(the tests pick free ports; the demo uses its own directory).

    python deploy/local/localstack.py up     [--dir D]   # fetch, configure, start both, print env
    python deploy/local/localstack.py down   [--dir D]
    python deploy/local/localstack.py env    [--dir D]   # shell exports for a running stack
    python deploy/local/localstack.py fetch               # only resolve the Kafka jars and fetch the schema
                                                          # registry (CI cache warm-up; registry.py)

Kafka comes from Maven Central jars (no release tarball is reachable from our machines):
``pom.xml`` beside this file lists kafka_2.13 plus a log4j2 binding, and
``mvn dependency:copy-dependencies`` assembles a runnable classpath that is cached
under ``$POP3K_CACHE`` (default ``~/.cache/pop3-kafka``). Readiness is decided by the
AdminClient answering, never by a fixed sleep.

Dovecot comes from Debian packages (dovecot-core, dovecot-pop3d, dovecot-lmtpd) and runs
from a self-contained configuration written here; see docs/local-infrastructure.md for the
gotchas (auth penalty, stdout inheritance, root vs. rootless mode).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KAFKA_POM = HERE / "kafka" / "pom.xml"
CACHE = Path(os.environ.get("POP3K_CACHE", Path.home() / ".cache" / "pop3-kafka"))
# Under /var/tmp rather than the checkout: as root, Dovecot's unprivileged processes must
# traverse every parent directory, and a clone under /root (mode 0700) would not allow that.
STATE_ROOT = Path(os.environ.get("POP3K_STATE_ROOT", f"/var/tmp/pop3-kafka-{os.getuid()}"))
DEFAULT_DIR = Path(os.environ.get("POP3K_STACK_DIR", STATE_ROOT / "stack"))
DOVECOT_BIN = os.environ.get("DOVECOT_BIN", "/usr/sbin/dovecot")
DOVECOT_LDA = "/usr/lib/dovecot/dovecot-lda"
# Dovecot's NTLM goes through a winbind helper; ours checks the exchange with pyspnego.
NTLM_HELPER = HERE / "ntlm_helper.py"
NTLM_DOMAIN = "POP3K"

# Static test fixtures, not secrets. 'nolock' may open concurrent sessions.
TEST_USERS: dict[str, str] = {
    "alice": "alice-pw",
    "bob": "bob-pw",
    "carol": "carol-pw",
    "dave": "p@ss wörd ünïcode",
    "empty": "empty-pw",
    "nolock": "nolock-pw",
    # NTLM logins (every user is also an NTLM account in NTLM_DOMAIN; see deploy/local/ntlm_helper.py)
    "ntlmuser": "ntlmuser-pw",
    # demo mailboxes (make demo)
    "orders": "orders-pw",
    "invoices": "invoices-pw",
    # one mailbox per integration test, so tests never see each other's mail
    **{f"t{i}": f"t{i}-pw" for i in range(1, 21)},
    # tests/integration/test_schema_registry.py
    "registry1": "registry1-pw",
    "registry2": "registry2-pw",
    # tests/integration/test_signatures_e2e.py
    "sig1": "sig1-pw",
    "sig2": "sig2-pw",
}


class StackError(RuntimeError):
    """A local service could not be fetched, configured or started."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def pid_is(pid: int, *needles: str) -> bool:
    """True when ``pid`` runs and its command line contains every needle.

    Saved pids outlive reboots and get reused; never signal a process that is not ours.
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return all(n in cmdline for n in needles) and pid_alive(pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def stop_pid(pid: int, grace: float = 30.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL."""
    if not pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.05)


# --------------------------------------------------------------------------- Kafka


def kafka_lib(version_pom: Path = KAFKA_POM) -> Path:
    """Resolve the broker classpath once and cache it (keyed by the pom's content)."""
    import hashlib

    digest = hashlib.sha256(version_pom.read_bytes()).hexdigest()[:12]
    lib = CACHE / f"kafka-{digest}" / "lib"
    marker = lib / ".complete"
    if marker.exists():
        return lib
    if shutil.which("mvn") is None:
        raise StackError("mvn not found: install Maven (apt-get install maven) to fetch the Kafka jars")
    tmp = lib.with_name("lib.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = ["mvn", "-q", "-B", "-f", str(version_pom), "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise StackError(f"Maven could not resolve Kafka: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    shutil.rmtree(lib, ignore_errors=True)
    tmp.rename(lib)
    marker.write_text("ok\n")
    return lib


LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
"""


# Secured mode (KafkaNode(secure=True)): the identities made for the connector's tests.
# "pop3kafka" gets the connector's ACLs; "pop3kafka-noacl" must be refused everything.
SECURE_SCRAM_USERS: tuple[str, ...] = ("pop3kafka", "pop3kafka-noacl")
SECURE_TLS_CLIENTS: tuple[str, ...] = ("pop3kafka-tls", "pop3kafka-tls-noacl")
_SECURE_FIELDS = ("secure", "sasl_port", "ssl_port", "scram_users", "tls_clients")


@dataclass
class KafkaNode:
    """One combined broker+controller in KRaft mode, with transactions at RF=1."""

    dir: Path
    port: int = 0
    controller_port: int = 0
    cluster_id: str = ""
    pid: int = 0
    heap: str = "512m"
    #: Opt-in production-like security (see docs/kafka-security.md): adds a SASL_SSL listener
    #: (SCRAM-SHA-512) and an SSL listener with required client certificates, and enables the
    #: StandardAuthorizer. The PLAINTEXT listener stays for the broker itself and test set-up; its
    #: principal, User:ANONYMOUS, is the only super user. Off: exactly the plain broker above.
    secure: bool = False
    sasl_port: int = 0
    ssl_port: int = 0
    #: SCRAM-SHA-512 users created when the storage is formatted (passwords: scram_password_file).
    scram_users: tuple[str, ...] = SECURE_SCRAM_USERS
    #: client certificates issued at configure time; the principal is User:<CN>.
    tls_clients: tuple[str, ...] = SECURE_TLS_CLIENTS

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- secured mode: endpoints and client files

    @property
    def sasl_bootstrap(self) -> str:
        """SASL_SSL listener (SCRAM-SHA-512, server certificate signed by :attr:`ca_file`)."""
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def ssl_bootstrap(self) -> str:
        """SSL listener that requires a client certificate signed by :attr:`ca_file` (mTLS)."""
        return f"127.0.0.1:{self.ssl_port}"

    @property
    def tls_dir(self) -> Path:
        return self.dir / "tls"

    @property
    def ca_file(self) -> Path:
        """The throw-away CA (PEM) that signed the broker's and the clients' certificates."""
        return self.tls_dir / "ca.pem"

    def client_cert_file(self, cn: str) -> Path:
        return self.tls_dir / "clients" / f"{cn}.pem"

    def client_key_file(self, cn: str) -> Path:
        """Unencrypted PEM private key of a client certificate (mode 0600)."""
        return self.tls_dir / "clients" / f"{cn}.key"

    def scram_password_file(self, user: str) -> Path:
        """File (mode 0600, no trailing newline) holding a SCRAM user's password."""
        return self.dir / "secrets" / f"{user}.scram-password"

    def sasl_client(self, user: str) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """(kafka.client, kafka.client_secrets) of a connector config for a SCRAM user."""
        client = {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": user,
            "ssl.ca.location": str(self.ca_file),
        }
        return client, {"sasl.password": {"file": str(self.scram_password_file(user))}}

    def mtls_client(self, cn: str) -> dict[str, str]:
        """kafka.client of a connector config for a client certificate (principal User:<cn>)."""
        return {
            "security.protocol": "SSL",
            "ssl.ca.location": str(self.ca_file),
            "ssl.certificate.location": str(self.client_cert_file(cn)),
            "ssl.key.location": str(self.client_key_file(cn)),
        }

    def configure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        if not self.controller_port:
            self.controller_port = free_port()
        if self.secure:
            self.sasl_port = self.sasl_port or free_port()
            self.ssl_port = self.ssl_port or free_port()
        data = self.dir / "data"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(data),
            # Transactions and groups on a single node: replication factor 1 everywhere.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Without these the first group join / init_transactions() creates 50
            # partitions each, which takes many seconds on a 2-core machine.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.num.partitions": "1",
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            # Large-mail tests send multi-MB records.
            "message.max.bytes": str(16 * 1024 * 1024),
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        if self.secure:
            props.update(self._secure_props())
        (self.dir / "server.properties").write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        if self.secure:
            os.chmod(self.dir / "server.properties", 0o600)  # holds the keystore password
        (self.dir / "log4j2.properties").write_text(LOG4J2.format(log=self.dir / "kafka.log"))
        if not (data / "meta.properties").exists():
            lib = kafka_lib()
            self.cluster_id = self.cluster_id or self._java(lib, ["kafka.tools.StorageTool", "random-uuid"]).strip()
            self._java(
                lib,
                [
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    "-t",
                    self.cluster_id,
                    "-c",
                    str(self.dir / "server.properties"),
                    *(self._scram_format_args() if self.secure else []),
                ],
            )

    # ---- secured mode: configuration

    def _secure_props(self) -> dict[str, str]:
        """Listeners, TLS stores, SCRAM and the authorizer on top of the plain properties."""
        self._gen_tls()
        t = self.tls_dir
        plain = f"PLAINTEXT://127.0.0.1:{self.port}"
        sasl = f"SASL_SSL://127.0.0.1:{self.sasl_port}"
        mtls = f"SSL://127.0.0.1:{self.ssl_port}"
        return {
            "listeners": f"{plain},{sasl},{mtls},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"{plain},{sasl},{mtls}",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL",
            # SASL_SSL: SCRAM-SHA-512 only; credentials live in the cluster metadata (StorageTool --add-scram).
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            # TLS for both secured listeners; the PEM truststore is just the CA certificate.
            "ssl.keystore.type": "PKCS12",
            "ssl.keystore.location": str(t / "broker.p12"),
            "ssl.keystore.password": (t / "broker.p12.password").read_text(),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_file),
            "ssl.enabled.protocols": "TLSv1.3,TLSv1.2",
            # mTLS: the SSL listener refuses clients without a certificate signed by our CA, and
            # a certificate with subject "CN=name,..." is the principal User:name.
            "listener.name.ssl.ssl.client.auth": "required",
            "ssl.principal.mapping.rules": "RULE:^CN=([^,]+).*$/$1/,DEFAULT",
            # Only the broker itself (PLAINTEXT and CONTROLLER listeners: User:ANONYMOUS) is a
            # super user; everything else needs ACLs, and no ACL means denied.
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:ANONYMOUS",
            "allow.everyone.if.no.acl.found": "false",
        }

    def _scram_format_args(self) -> list[str]:
        args: list[str] = []
        for user in self.scram_users:
            pw_file = self.scram_password_file(user)
            if not pw_file.exists():
                import secrets

                _write_secret(pw_file, secrets.token_hex(24))
            args += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={pw_file.read_text()}]"]
        return args

    def _gen_tls(self) -> None:
        """Throw-away CA, broker keystore (PKCS12) and one client certificate per tls_clients."""
        t = self.tls_dir
        (t / "clients").mkdir(parents=True, exist_ok=True)
        if not self.ca_file.exists():
            _make_ca(t / "ca.key", self.ca_file, "pop3-kafka test Kafka CA")
        if not (t / "broker.p12").exists():
            import secrets

            _issue_cert(
                self.ca_file,
                t / "ca.key",
                "localhost",
                cert=t / "broker.pem",
                key=t / "broker.key",
                ext="extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
            )
            password = secrets.token_hex(16)
            _write_secret(t / "broker.p12.password", password)
            _openssl(
                "pkcs12",
                "-export",
                "-in",
                str(t / "broker.pem"),
                "-inkey",
                str(t / "broker.key"),
                "-certfile",
                str(self.ca_file),
                "-name",
                "broker",
                "-out",
                str(t / "broker.p12"),
                "-passout",
                "env:POP3K_P12_PASSWORD",
                env={"POP3K_P12_PASSWORD": password},
            )
            os.chmod(t / "broker.p12", 0o600)
        for cn in self.tls_clients:
            self.issue_client_cert(cn)

    def issue_client_cert(self, cn: str) -> tuple[Path, Path]:
        """A client certificate (subject CN=cn, principal User:cn) signed by the CA; also after start."""
        cert, key = self.client_cert_file(cn), self.client_key_file(cn)
        if not cert.exists():
            _issue_cert(
                self.ca_file, self.tls_dir / "ca.key", cn, cert=cert, key=key, ext="extendedKeyUsage=clientAuth\n"
            )
        return cert, key

    def _java(self, lib: Path, args: list[str]) -> str:
        cmd = ["java", "-Dlog4j2.configurationFile=" + str(self.dir / "log4j2.properties"), "-cp", f"{lib}/*", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise StackError(f"{args[0]} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return proc.stdout

    def running(self) -> bool:
        return bool(self.pid) and pid_is(self.pid, "kafka.Kafka", str(self.dir / "server.properties"))

    def start(self, timeout: float = 90.0) -> None:
        if self.running():
            return
        self.configure()
        lib = kafka_lib()
        out = open(self.dir / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
        cmd = [
            "java",
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            "-Dlog4j2.configurationFile=" + str(self.dir / "log4j2.properties"),
            "-cp",
            f"{lib}/*",
            "kafka.Kafka",
            str(self.dir / "server.properties"),
        ]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        self.pid = proc.pid
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()  # never leave a half-started broker behind
            raise

    def wait_ready(self, timeout: float) -> None:
        """Ready when the AdminClient sees the broker and its controller (no fixed sleep)."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0, "logger": _null_logger()})
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not pid_alive(self.pid):
                raise StackError(f"Kafka exited during start; see {self.dir / 'stdout.log'} and kafka.log")
            try:
                md = admin.list_topics(timeout=2)
                if md.brokers:
                    cluster = admin.describe_cluster(request_timeout=2).result(timeout=3)
                    if cluster.controller is not None:
                        return
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                last = exc
            time.sleep(0.1)
        raise StackError(f"Kafka not ready after {timeout:.0f}s at {self.bootstrap}: {last}")

    def stop(self) -> None:
        if self.running():
            stop_pid(self.pid)
        self.pid = 0


def _write_secret(path: Path, value: str) -> None:
    """Write a secret file readable by its owner only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value)
    os.chmod(path, 0o600)


def _openssl(*args: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        ["openssl", *args], capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        raise StackError(f"openssl {args[0]} failed: {proc.stderr[-2000:]}")


def _make_ca(key: Path, cert: Path, cn: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
        "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    os.chmod(key, 0o600)


def _issue_cert(ca: Path, ca_key: Path, cn: str, *, cert: Path, key: Path, ext: str) -> None:
    """An RSA key (PKCS#8 PEM, unencrypted, 0600) and a certificate for it signed by the CA."""
    csr, extfile = cert.with_suffix(".csr"), cert.with_suffix(".ext")
    extfile.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" + ext
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}"
    )  # fmt: skip
    os.chmod(key, 0o600)
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "3650", "-sha256", "-extfile", str(extfile), "-out", str(cert),
    )  # fmt: skip
    csr.unlink()
    extfile.unlink()


def _null_logger() -> object:
    import logging

    lg = logging.getLogger("localstack.rdkafka")
    lg.addHandler(logging.NullHandler())
    lg.propagate = False
    return lg


# --------------------------------------------------------------------------- Dovecot


@dataclass
class DovecotServer:
    """Self-contained Dovecot 2.3 POP3 server; never touches /etc/dovecot."""

    dir: Path
    pop3_port: int = 0
    pop3s_port: int = 0
    lmtp_port: int = 0
    #: POP3 listener that expects a PROXY protocol header first (haproxy = yes, trusted from
    #: 127.0.0.0/8): a test proxy can place its client at any address, e.g. a remote one.
    proxied_port: int = 0
    users: dict[str, str] = field(default_factory=lambda: dict(TEST_USERS))

    @property
    def conf(self) -> Path:
        return self.dir / "etc" / "dovecot.conf"

    @property
    def instance(self) -> str:
        """Stable per state directory; Dovecot puts it in every process title."""
        import hashlib

        return "pop3-kafka-" + hashlib.sha256(str(self.dir.resolve()).encode()).hexdigest()[:10]

    @property
    def oauth_key_file(self) -> Path:
        """Base64 HS256 key Dovecot uses to validate bearer tokens (key id 'default')."""
        return self.dir / "oauth" / "keys" / "default" / "HS256" / "default"

    @property
    def cafile(self) -> Path:
        return self.dir / "tls" / "ca.pem"

    def _ids(self) -> tuple[int, int, str, str, str]:
        if os.geteuid() == 0:
            # Login processes refuse root and mail may not be uid 0: use Debian's users.
            mail = pwd.getpwnam(os.environ.get("DOVECOT_TEST_MAIL_USER", "mail"))
            return mail.pw_uid, mail.pw_gid, "dovecot", "dovecot", "dovenull"
        me = pwd.getpwuid(os.getuid())
        import grp

        group = grp.getgrgid(os.getgid()).gr_name
        return os.getuid(), os.getgid(), me.pw_name, group, me.pw_name

    def configure(self) -> None:
        if not Path(DOVECOT_BIN).exists():
            raise StackError("dovecot not found: apt-get install dovecot-core dovecot-pop3d dovecot-lmtpd")
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # Root mode: Dovecot's own users must traverse every parent directory.
            for parent in self.dir.resolve().parents:
                if not parent.stat().st_mode & 0o001:
                    raise StackError(
                        f"{parent} is not searchable by other users (mode "
                        f"{parent.stat().st_mode & 0o777:o}); Dovecot's unprivileged processes "
                        "cannot reach their files. Use a state directory under a 0755 path."
                    )
        for sub in ("etc", "run", "state", "log", "mail", "tls"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        os.chmod(self.dir / "mail", 0o755)
        for attr in ("pop3_port", "pop3s_port", "lmtp_port", "proxied_port"):
            if not getattr(self, attr):
                setattr(self, attr, free_port())
        if not (self.dir / "tls" / "server.pem").exists():
            self._gen_certs()
        key = self.oauth_key_file
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_text(base64.b64encode(os.urandom(32)).decode())
        (self.dir / "etc" / "dovecot-oauth2.conf.ext").write_text(
            f"introspection_mode = local\nlocal_validation_key_dict = fs:posix:prefix={self.dir}/oauth/keys/\n"
            "username_attribute = sub\n"
        )
        uid, gid, internal_user, internal_group, login_user = self._ids()
        lines = []
        for name, pw in self.users.items():
            extra = "userdb_pop3_lock_session=no" if name == "nolock" else ""
            home = self.dir / "mail" / name
            for d in ("cur", "new", "tmp"):
                (home / "Maildir" / d).mkdir(parents=True, exist_ok=True)
            lines.append(f"{name}:{{PLAIN}}{pw}:{uid}:{gid}::{home}::{extra}\n")
        (self.dir / "etc" / "users").write_text("".join(lines))
        os.chmod(self.dir / "etc" / "users", 0o644)
        self._write_ntlm_helper()
        if os.geteuid() == 0:
            for root, dirs, files in os.walk(self.dir / "mail"):
                for n in dirs + files:
                    os.chown(os.path.join(root, n), uid, gid)
            os.chown(self.dir / "mail", uid, gid)
        rootless = os.geteuid() != 0
        chroots = ""
        if rootless:
            chroots = "".join(
                f"service {s} {{\n  chroot =\n}}\n"
                for s in (
                    "pop3-login",
                    "imap-login",
                    "submission-login",
                    "imap-urlauth-login",
                    "ipc",
                    "old-stats",
                    "aggregator",
                    "director",
                )
            )
        # The NTLM helper runs as the auth process's user: `dovecot` by default as root, which
        # cannot execute a venv below /root (mode 0700). Rootless, auth already runs as the caller.
        auth_service = "" if rootless else "service auth {\n  user = root\n}\n"
        d = self.dir
        self.conf.write_text(f"""\
# Generated by deploy/local/localstack.py: a self-contained POP3 test server.
base_dir = {d}/run
state_dir = {d}/state
instance_name = {self.instance}
log_path = {d}/log/dovecot.log
info_log_path = {d}/log/dovecot.log
debug_log_path = {d}/log/dovecot.log
auth_verbose = yes
protocols = pop3 lmtp
listen = 127.0.0.1
hostname = localhost
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}
ssl = yes
ssl_cert = <{d}/tls/server.pem
ssl_key = <{d}/tls/server.key
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain login cram-md5 apop xoauth2 oauthbearer ntlm
# Dovecot 2.3.19 has no built-in NTLM; its NTLM is mech-winbind, which runs this helper
# (Samba's ntlm_auth in production) over the squid-2.5-ntlmssp protocol. Ours checks the
# exchange with pyspnego against etc/ntlm-users; see deploy/local/ntlm_helper.py.
auth_use_winbind = yes
auth_winbind_helper_path = {d}/etc/ntlm-helper
# Failed logins: no 2 s delay, and (service anvil below) no per-IP penalty that
# would slow every later login from 127.0.0.1 by 4-15 s.
auth_failure_delay = 0
mail_location = maildir:~/Maildir
mail_fsync = never
mail_max_userip_connections = 200
default_process_limit = 1000
default_client_limit = 4000
passdb {{
  driver = passwd-file
  mechanisms = plain login cram-md5 apop
  args = scheme=PLAIN username_format=%u {d}/etc/users
}}
# XOAUTH2 / OAUTHBEARER: HS256 JWTs validated locally (no identity provider); the key is
# oauth/keys/default/HS256/default, tests mint tokens with it (tests/support/jwt.py).
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {d}/etc/dovecot-oauth2.conf.ext
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {d}/etc/users
}}
protocol pop3 {{
  pop3_uidl_format = %08Xu%08Xv
  pop3_lock_session = yes
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {self.pop3s_port}
    ssl = yes
  }}
  inet_listener pop3-proxied {{
    address = 127.0.0.1
    port = {self.proxied_port}
    haproxy = yes
  }}
}}
haproxy_trusted_networks = 127.0.0.0/8
# Loopback clients count as secure, so plaintext logins from 127.0.0.1 always work. A client
# that a PROXY header places in 192.0.2.0/24 (TEST-NET-1) is remote: no plaintext login
# before STLS there (tests/integration/test_pop3_plaintext.py).
remote 192.0.2.0/24 {{
  disable_plaintext_auth = yes
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
service anvil {{
{"  chroot =" if rootless else ""}
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{chroots}{auth_service}""")
        proc = subprocess.run([DOVECOT_BIN, "-c", str(self.conf), "-n"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise StackError(f"dovecot config check failed: {proc.stderr[-2000:]}")

    def _write_ntlm_helper(self) -> None:
        """NTLM accounts (pyspnego's NTLM_USER_FILE: ``DOMAIN:USER:PASSWORD``) and the wrapper
        Dovecot runs as ``auth_winbind_helper_path``.

        Dovecot's auth process starts the helper with a scrubbed environment and only the
        ``--helper-protocol`` argument, so the wrapper names the interpreter by absolute path
        (this venv's, which has pyspnego) and sets the file itself.
        """
        accounts = []
        for name, pw in self.users.items():
            if ":" in name or ":" in pw or "\n" in pw:
                raise StackError(f"user {name!r}: ':' and newlines cannot be stored in NTLM_USER_FILE")
            accounts.append(f"{NTLM_DOMAIN}:{name}:{pw}\n")
        users = self.dir / "etc" / "ntlm-users"
        _write_secret(users, "".join(accounts))
        wrapper = self.dir / "etc" / "ntlm-helper"
        wrapper.write_text(
            "#!/bin/sh\n# Generated by deploy/local/localstack.py: Dovecot's winbind NTLM helper.\n"
            f"NTLM_USER_FILE={shlex.quote(str(users))}\nexport NTLM_USER_FILE\n"
            f'exec {shlex.quote(os.path.abspath(sys.executable))} {shlex.quote(str(NTLM_HELPER))} "$@"\n'
        )
        os.chmod(wrapper, 0o755)

    def _gen_certs(self) -> None:
        t = self.dir / "tls"

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True)

        run(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-days",
            "3650",
            "-keyout",
            str(t / "ca.key"),
            "-out",
            str(t / "ca.pem"),
            "-subj",
            "/CN=pop3-kafka test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-keyout",
            str(t / "server.key"),
            "-out",
            str(t / "server.csr"),
            "-subj",
            "/CN=localhost",
        )
        (t / "server.ext").write_text(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        )
        run(
            "x509",
            "-req",
            "-in",
            str(t / "server.csr"),
            "-CA",
            str(t / "ca.pem"),
            "-CAkey",
            str(t / "ca.key"),
            "-CAcreateserial",
            "-days",
            "3650",
            "-sha256",
            "-extfile",
            str(t / "server.ext"),
            "-out",
            str(t / "server.pem"),
        )
        os.chmod(t / "server.key", 0o600)
        os.chmod(t / "ca.key", 0o600)

    def master_pid(self) -> int:
        """Pid of our Dovecot master, or 0 (a stale pid file from before a reboot is ignored)."""
        try:
            pid = int((self.dir / "run" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return 0
        return pid if pid_is(pid, "dovecot", str(self.conf)) else 0

    def start(self, timeout: float = 20.0) -> None:
        if self.master_pid():
            return
        self.configure()
        # A stale penalty socket makes auth retry connect() for 5 s at every start.
        (self.dir / "run" / "anvil-auth-penalty").unlink(missing_ok=True)
        # The daemon keeps inherited stdout/stderr open: never hand it a pipe.
        with open(self.dir / "log" / "startup.log", "ab") as log:
            rc = subprocess.call([DOVECOT_BIN, "-c", str(self.conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if rc != 0:
            raise StackError(f"dovecot failed to start: {(self.dir / 'log' / 'startup.log').read_text()[-2000:]}")
        deadline = time.monotonic() + timeout
        while not all(port_open(p) for p in (self.pop3_port, self.pop3s_port, self.lmtp_port)):
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(f"dovecot ports did not open; see {self.dir / 'log' / 'dovecot.log'}")
            time.sleep(0.02)

    def stop(self, *, hard: bool = False) -> None:
        """Stop the master, then every process of this instance that outlived it.

        ``hard``: SIGKILL every process of the instance at once (a crash, or systemd's
        KillMode on a restart), so sessions die mid-response instead of finishing.

        Dovecot's master leaves running sessions (pop3 and the pop3-login that proxies their
        TLS) alive when it exits; systemd would kill the whole cgroup, and so do we, so a
        "restart" really ends sessions and tests never leak processes.
        """
        pid = self.master_pid()
        if pid and not hard:
            stop_pid(pid)
        prefix = f"dovecot-{self.instance}/"
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith(prefix):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(proc.name), signal.SIGKILL)
        if pid and hard:
            stop_pid(pid)

    # ---- mail delivery helpers (tests and demo)

    def maildir(self, user: str) -> Path:
        return self.dir / "mail" / user / "Maildir"

    def put(self, user: str, raw: bytes) -> None:
        """Drop one mail into the user's maildir (tmp/ then rename into new/, as an MDA does)."""
        md = self.maildir(user)
        name = f"{time.time_ns()}.{uuid.uuid4().hex}.pop3kafka"
        tmp = md / "tmp" / name
        tmp.write_bytes(raw)
        if os.geteuid() == 0:
            st = md.stat()
            os.chown(tmp, st.st_uid, st.st_gid)
        tmp.rename(md / "new" / name)

    def deliver_lmtp(self, user: str, raw: bytes, sender: str = "sender@example.com") -> None:
        import smtplib

        with smtplib.LMTP("127.0.0.1", self.lmtp_port) as lmtp:
            lmtp.sendmail(sender, [user], raw)

    def count(self, user: str) -> int:
        md = self.maildir(user)
        return sum(1 for sub in ("new", "cur") for p in (md / sub).iterdir() if p.is_file())

    def clear(self, user: str) -> None:
        md = self.maildir(user)
        for sub in ("new", "cur", "tmp"):
            for p in (md / sub).iterdir():
                p.unlink()


# --------------------------------------------------------------------------- stack


@dataclass
class Stack:
    dir: Path
    kafka: KafkaNode
    dovecot: DovecotServer

    @classmethod
    def at(cls, d: Path) -> Stack:
        d = d.resolve()
        state = d / "stack.json"
        kafka = KafkaNode(d / "kafka")
        dovecot = DovecotServer(d / "dovecot")
        if state.exists():
            saved = json.loads(state.read_text())
            for k, v in saved.get("kafka", {}).items():
                if k != "dir":
                    setattr(kafka, k, v)
            for k, v in saved.get("dovecot", {}).items():
                if k not in ("dir", "users"):
                    setattr(dovecot, k, v)
        return cls(d, kafka, dovecot)

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {
            "kafka": {
                k: v
                for k, v in asdict(self.kafka).items()
                if k != "dir" and (self.kafka.secure or k not in _SECURE_FIELDS)
            },
            "dovecot": {k: v for k, v in asdict(self.dovecot).items() if k not in ("dir", "users")},
        }
        (self.dir / "stack.json").write_text(json.dumps(data, indent=2, default=str))

    def up(self) -> None:
        try:
            self.dovecot.start()
            self.save()
            self.kafka.start()
            self.save()
        except BaseException:
            self.down()  # all or nothing: no orphaned servers after a failed start
            raise

    def down(self) -> None:
        self.kafka.stop()
        self.dovecot.stop()
        self.save()

    def env(self) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "POP3_HOST": "127.0.0.1",
            "POP3_PORT": str(self.dovecot.pop3_port),
            "POP3S_PORT": str(self.dovecot.pop3s_port),
            "POP3_CAFILE": str(self.dovecot.cafile),
            "LMTP_PORT": str(self.dovecot.lmtp_port),
            "POP3_PROXIED_PORT": str(self.dovecot.proxied_port),
            "DOVECOT_TEST_DIR": str(self.dovecot.dir),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "env", "fetch", "status"])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.action == "fetch":
        print(kafka_lib())
        # The schema registry of the registry-framing tests (deploy/local/registry.py), so CI's
        # warm-up step fetches it too; imported here only: registry.py imports this module.
        from registry import fetch as fetch_registry

        try:
            print(fetch_registry())
        except StackError as exc:
            print(f"localstack: {exc}", file=sys.stderr)
            return 1
        return 0
    stack = Stack.at(args.dir)
    try:
        if args.action == "up":
            t0 = time.monotonic()
            stack.up()
            print(f"# local stack up in {time.monotonic() - t0:.1f}s (state in {stack.dir})", file=sys.stderr)
        elif args.action == "down":
            stack.down()
            return 0
        elif args.action == "status":
            k = stack.kafka.running()
            d = bool(stack.dovecot.master_pid())
            print(f"kafka: {'running' if k else 'stopped'}  dovecot: {'running' if d else 'stopped'}")
            return 0 if k and d else 1
    except StackError as exc:
        print(f"localstack: {exc}", file=sys.stderr)
        return 1
    for k, v in stack.env().items():
        print(f"export {k}='{v}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
