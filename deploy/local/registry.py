#!/usr/bin/env python3
"""Local Schema Registry: a real Apicurio Registry (Apache-2.0) on 127.0.0.1, in memory.

For the tests of ``record.framing: schema_registry`` and ``pop3-kafka schemas register``: they
talk to a real registry over HTTP (its Confluent-compatible API), never only to an in-process mock.

    python deploy/local/registry.py up     [--dir D]   # fetch if needed, start, print env
    python deploy/local/registry.py down   [--dir D]
    python deploy/local/registry.py env    [--dir D]   # shell exports for a running registry
    python deploy/local/registry.py status [--dir D]
    python deploy/local/registry.py fetch               # only fetch and unpack (CI cache warm-up)

Why Apicurio: Confluent's Schema Registry is not on Maven Central and Karapace is neither on
PyPI nor runnable without Kafka as its store; Apicurio's server is on Maven Central as a Quarkus
application tarball (``io.apicurio:apicurio-registry-app:<v>:tar.gz:all``) and keeps its data in
an in-memory H2 database by default (docs/decisions/0006, section 2). ``mvn dependency:get``
puts the tarball into ~/.m2 (like Kafka's jars); it is unpacked once under ``$POP3K_CACHE``
(default ``~/.cache/pop3-kafka``).

Version 3.3.3 needs Java 21+: it runs on the Temurin JDK of these machines
(``/usr/lib/jvm/temurin-25-jdk-amd64``) or whatever ``JAVA_HOME`` names if that is new enough.
Without such a JDK, 2.6.13.Final runs on the Debian Java 17 instead. Both serve the Confluent
API at ``http://127.0.0.1:<port>/apis/ccompat/v7``.

The HTTP port and Quarkus's management port are free ports on 127.0.0.1 only; OpenTelemetry stays
off; temporary and snapshot files go to the state directory. Readiness is ``GET /subjects``
answered 200, never a fixed sleep; a stop waits for the JVM to exit and kills it after a grace
period, and only ever signals the process whose command line names this state directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from localstack import CACHE, STATE_ROOT, StackError, free_port, pid_alive, pid_is, stop_pid

GROUP, ARTIFACT = "io.apicurio", "apicurio-registry-app"
#: the version we test with, and the Java it needs.
PRIMARY, PRIMARY_JAVA = "3.3.3", 21
#: runs on the Debian Java 17 when no Java 21+ is installed (an older line; same ccompat API).
FALLBACK, FALLBACK_JAVA = "2.6.13.Final", 17
TEMURIN_HOME = Path("/usr/lib/jvm/temurin-25-jdk-amd64")
DEFAULT_DIR = Path(os.environ.get("POP3K_REGISTRY_DIR", STATE_ROOT / "registry"))
CCOMPAT = "/apis/ccompat/v7"
#: the JVM's command line carries this property, so a saved pid is only ever ours.
MARKER_PROPERTY = "pop3k.registry.dir"


# --------------------------------------------------------------------------- Java


def java_major(java_home: Path) -> int:
    """The major version of a JDK/JRE home (from its ``release`` file), 0 when unknown."""
    try:
        text = (java_home / "release").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    m = re.search(r'^JAVA_VERSION="(\d+)(?:\.(\d+))?', text, re.M)
    if not m:
        return 0
    major = int(m[1])
    return int(m[2] or 0) if major == 1 else major  # "1.8.0" style


def _java_homes() -> list[Path]:
    """Candidates, preferred first: JAVA_HOME, the Temurin JDK, then every JVM installed."""
    out: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        out.append(Path(os.environ["JAVA_HOME"]))
    out.append(TEMURIN_HOME)
    jvm = Path("/usr/lib/jvm")
    if jvm.is_dir():
        out += sorted((p for p in jvm.iterdir() if p.is_dir() and not p.is_symlink()), reverse=True)
    return [p for p in dict.fromkeys(out) if (p / "bin" / "java").is_file()]


def choose_runtime() -> tuple[str, Path]:
    """(registry version, JAVA_HOME): 3.3.3 on a Java 21+, else 2.6.13.Final on a Java 17+.
    ``POP3K_REGISTRY_VERSION`` (3.3.3 or 2.6.13.Final) forces one, to check the fallback."""
    homes = _java_homes()
    forced = os.environ.get("POP3K_REGISTRY_VERSION")
    if forced:
        need = {PRIMARY: PRIMARY_JAVA, FALLBACK: FALLBACK_JAVA}.get(forced)
        if need is None:
            raise StackError(f"POP3K_REGISTRY_VERSION={forced!r}: use {PRIMARY} or {FALLBACK}")
        for home in homes:
            if java_major(home) >= need:
                return forced, home
        raise StackError(f"POP3K_REGISTRY_VERSION={forced}: needs Java {need}+, none found")
    for home in homes:
        if java_major(home) >= PRIMARY_JAVA:
            return PRIMARY, home
    for home in homes:
        if java_major(home) >= FALLBACK_JAVA:
            return FALLBACK, home
    raise StackError(
        f"no Java {FALLBACK_JAVA}+ found (JAVA_HOME, {TEMURIN_HOME}, /usr/lib/jvm): install one "
        "(apt-get install openjdk-17-jre-headless) to run the schema registry"
    )


# --------------------------------------------------------------------------- fetching


def _m2_tarball(version: str) -> Path:
    repo = Path(os.environ.get("POP3K_M2_REPO", Path.home() / ".m2" / "repository"))
    return repo / GROUP.replace(".", "/") / ARTIFACT / version / f"{ARTIFACT}-{version}-all.tar.gz"


def registry_home(version: str) -> Path:
    """Fetch (mvn dependency:get) and unpack a registry version once; its directory in the cache."""
    home = CACHE / f"apicurio-registry-{version}"
    marker = home / ".complete"
    if marker.exists():
        return home
    tarball = _m2_tarball(version)
    if not tarball.is_file():
        if shutil.which("mvn") is None:
            raise StackError("mvn not found: install Maven (apt-get install maven) to fetch the schema registry")
        # The tarball is self-contained (a Quarkus application with its lib/), so only it is
        # fetched: resolving the pom's dependencies as well asks for modules Maven Central
        # does not serve (apicurio-registry-schema-util-provider 3.3.3) and fails the fetch.
        cmd = [
            "mvn",
            "-q",
            "-B",
            "dependency:get",
            f"-Dartifact={GROUP}:{ARTIFACT}:{version}:tar.gz:all",
            "-Dtransitive=false",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not tarball.is_file():
            raise StackError(
                f"Maven could not fetch Apicurio Registry {version}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
    tmp = home.with_name(home.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(tarball) as tar:
            # The "data" filter refuses absolute paths, links out of the tree and device files.
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StackError(f"cannot unpack {tarball}: {exc}") from exc
    shutil.rmtree(home, ignore_errors=True)
    tmp.rename(home)
    marker.write_text("ok\n")
    return home


def fetch() -> Path:
    """What ``fetch`` (and CI's warm-up through localstack.py fetch) prepares: the version this
    machine's Java runs."""
    version, _ = choose_runtime()
    return registry_home(version)


def _launch_jar(home: Path, version: str) -> Path:
    # 2.x: a Quarkus uber-runner jar beside lib/; 3.x: the Quarkus fast-jar layout.
    jar = home / f"{ARTIFACT}-{version}-runner.jar" if version.startswith("2.") else home / "quarkus-run.jar"
    if not jar.is_file():
        raise StackError(f"{jar} is missing: the cached registry is damaged; remove {home} and fetch again")
    return jar


# --------------------------------------------------------------------------- the server


@dataclass
class Registry:
    """One Apicurio Registry process with its state under ``dir``."""

    dir: Path
    port: int = 0
    management_port: int = 0
    pid: int = 0
    version: str = ""
    java_home: str = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The Confluent-compatible base URL (``schema_registry.url`` of a connector config)."""
        return self.base + CCOMPAT

    @property
    def log(self) -> Path:
        return self.dir / "registry.log"

    @classmethod
    def at(cls, d: Path) -> Registry:
        reg = cls(d.resolve())
        state = reg.dir / "registry.json"
        if state.exists():
            saved = json.loads(state.read_text())
            for f in fields(cls):
                if f.name != "dir" and f.name in saved:
                    setattr(reg, f.name, saved[f.name])
        return reg

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "dir"}
        (self.dir / "registry.json").write_text(json.dumps(data, indent=2))

    def running(self) -> bool:
        return bool(self.pid) and pid_is(self.pid, f"-D{MARKER_PROPERTY}={self.dir}")

    def start(self, timeout: float = 90.0) -> None:
        if self.running():
            return
        version, java_home = choose_runtime()
        home = registry_home(version)
        jar = _launch_jar(home, version)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "tmp"
        tmp.mkdir(exist_ok=True)
        self.version, self.java_home = version, str(java_home)
        # New ports at every start: the in-memory registry has no state to come back to.
        self.port, self.management_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("QUARKUS_", "APICURIO_", "REGISTRY_"))}
        env.update(
            JAVA_HOME=str(java_home),
            QUARKUS_HTTP_HOST="127.0.0.1",
            QUARKUS_HTTP_PORT=str(self.port),
            # Health and metrics have their own listener in 3.x (default *:9000): loopback, free port.
            QUARKUS_MANAGEMENT_HOST="127.0.0.1",
            QUARKUS_MANAGEMENT_PORT=str(self.management_port),
            QUARKUS_OTEL_SDK_DISABLED="true",
            QUARKUS_HTTP_ACCESS_LOG_ENABLED="false",
            APICURIO_STORAGE_SNAPSHOT_LOCATION=str(tmp),
            APICURIO_IMPORT_WORK_DIR=str(tmp),
        )
        cmd = [
            str(java_home / "bin" / "java"),
            f"-D{MARKER_PROPERTY}={self.dir}",
            "-Xmx512m",
            "-XX:+UseSerialGC",  # one small heap: the parallel collectors' threads buy nothing here
            "-Djava.awt.headless=true",
            f"-Djava.io.tmpdir={tmp}",
            f"-Dvertx.cacheDirBase={tmp / 'vertx'}",
            "-jar",
            str(jar),
        ]
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the caller does not reach it half-way
            )
        self.pid = proc.pid
        self.save()
        try:
            self.wait_ready(timeout, proc)
        except BaseException:
            self.stop()  # never leave a half-started JVM behind
            raise

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/subjects", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not self.answers():
            if (proc is not None and proc.poll() is not None) or not pid_alive(self.pid):
                raise StackError(
                    f"Apicurio Registry {self.version} exited during start; last log lines:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"Apicurio Registry {self.version} did not answer {self.url}/subjects within {timeout:.0f} s; "
                    f"last log lines:\n{self._log_tail()}"
                )
            time.sleep(0.2)

    def _log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after ``grace``; returns once the JVM is gone."""
        if self.pid and pid_is(self.pid, f"-D{MARKER_PROPERTY}={self.dir}"):
            stop_pid(self.pid, grace)
        self.pid = 0
        if self.dir.exists():
            self.save()

    def env(self) -> dict[str, str]:
        return {"SCHEMA_REGISTRY_URL": self.url, "SCHEMA_REGISTRY_DIR": str(self.dir)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "env", "status", "fetch"])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        if args.action == "fetch":
            print(fetch())
            return 0
        reg = Registry.at(args.dir)
        if args.action == "up":
            t0 = time.monotonic()
            reg.start()
            print(
                f"# Apicurio Registry {reg.version} up in {time.monotonic() - t0:.1f}s on {reg.url} "
                f"(Java {java_major(Path(reg.java_home))}; state in {reg.dir})",
                file=sys.stderr,
            )
        elif args.action == "down":
            reg.stop()
            return 0
        elif args.action == "status":
            up = reg.running() and reg.answers()
            print(f"registry: {'running on ' + reg.url if up else 'stopped'}")
            return 0 if up else 1
        elif not reg.running():
            print(f"registry: not running in {reg.dir}", file=sys.stderr)
            return 1
    except StackError as exc:
        print(f"registry: {exc}", file=sys.stderr)
        return 1
    for k, v in reg.env().items():
        print(f"export {k}='{v}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
