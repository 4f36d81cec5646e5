#!/usr/bin/env python3
"""Local S3-compatible object store: a real SeaweedFS server (``weed mini``) on 127.0.0.1.

For the claim-check (offload) tests: large attachments go to an S3 bucket and the Kafka record
carries a reference. Tests talk to a real server process over HTTP with SigV4-signed requests,
never to an in-process mock.

    python deploy/local/objectstore.py up    [--dir D]   # build if needed, start, print env
    python deploy/local/objectstore.py down  [--dir D]
    python deploy/local/objectstore.py env   [--dir D]   # shell exports for a running store
    python deploy/local/objectstore.py status [--dir D]
    python deploy/local/objectstore.py fetch              # only build/cache the binary (CI warm-up)

SeaweedFS (Apache-2.0) has no release binary we can reach, and its go.mod carries a ``replace``
directive, so ``go install github.com/seaweedfs/seaweedfs/weed@<version>`` refuses it. The small
module in ``seaweedfs/`` beside this file requires it at a pinned version (and repeats that replace
directive); ``go build`` from a copy of it, with GOPATH/GOCACHE under ``$POP3K_CACHE/go``
(default ``~/.cache/pop3-kafka/go``), gives ``$POP3K_CACHE/weed-<version>-<hash of go.mod>``.
A cold build takes minutes on 2 cores; later calls reuse the cached binary.

``weed mini`` runs master, volume server, filer, S3 gateway and an admin server in one process.
Every port is a free port on 127.0.0.1 picked at the first start and kept in
``<dir>/objectstore.json`` (a restart comes back on the same endpoint); WebDAV, the Iceberg and
Lance catalogs, the admin UI and telemetry are off. S3 requests must be signed with the access
key of ``<dir>/etc/s3.json`` (random per state directory; anonymous requests are refused).
Readiness is a signed ListBuckets answered 200 plus a volume server registered with the master,
never a fixed sleep. See docs/local-infrastructure.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import string
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from localstack import CACHE, STATE_ROOT, StackError, free_port, pid_alive, pid_is, port_open, stop_pid

HERE = Path(__file__).resolve().parent
WEED_MODULE = HERE / "seaweedfs"
WEED_PACKAGE = "github.com/seaweedfs/seaweedfs/weed"
DEFAULT_DIR = Path(os.environ.get("POP3K_OBJECTSTORE_DIR", STATE_ROOT / "objectstore"))
GO_ROOT = CACHE / "go"
REGION = "us-east-1"
# Environment variables the server would read as configuration (WEED_* overrides viper keys,
# AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY become fallback admin credentials, S3_BUCKET makes
# buckets at start): none of the caller's may leak into the test server.
_SCRUBBED_ENV = re.compile(r"^(WEED_|AWS_|S3_)")
_PORT_FIELDS = (
    "s3_port",
    "s3_grpc_port",
    "master_port",
    "master_grpc_port",
    "volume_port",
    "volume_grpc_port",
    "filer_port",
    "filer_grpc_port",
    "admin_port",
    "admin_grpc_port",
)


# --------------------------------------------------------------------------- building weed


def weed_version(gomod: Path = WEED_MODULE / "go.mod") -> str:
    """The pinned SeaweedFS module version (a pseudo-version: its tags are not semver)."""
    m = re.search(r"^\s*(?:require\s+)?github\.com/seaweedfs/seaweedfs\s+(v\S+)", gomod.read_text(), re.M)
    if not m:
        raise StackError(f"{gomod} does not require github.com/seaweedfs/seaweedfs")
    return m.group(1)


def weed_binary_path(module: Path = WEED_MODULE) -> Path:
    digest = hashlib.sha256((module / "go.mod").read_bytes()).hexdigest()[:12]
    return CACHE / f"weed-{weed_version(module / 'go.mod')}-{digest}"


def find_go() -> str:
    for cand in (os.environ.get("GO"), shutil.which("go"), "/usr/local/go/bin/go"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    raise StackError("no Go toolchain found (set GO=/path/to/go); SeaweedFS needs Go >= the version in its go.mod")


def go_env() -> dict[str, str]:
    """Toolchain environment: caches under $POP3K_CACHE/go so CI machines reuse them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(
        GOPATH=str(GO_ROOT),
        GOMODCACHE=str(GO_ROOT / "pkg" / "mod"),
        GOCACHE=str(GO_ROOT / "cache"),
        GOFLAGS="-mod=mod",
        GOTOOLCHAIN="local",  # never download another toolchain behind our back
        CGO_ENABLED="0",
    )
    for keep in ("GOPROXY", "GONOSUMDB", "GOPRIVATE", "GONOPROXY", "GOSUMDB"):
        if keep in os.environ:
            env[keep] = os.environ[keep]
    return env


def weed_binary(*, quiet: bool = False) -> Path:
    """Build the pinned ``weed`` once and cache it; return the cached binary.

    Several callers (make objectstore, a pytest session) may race: a file lock serialises
    the build and the binary is renamed into place only when complete.
    """
    binary = weed_binary_path()
    if binary.is_file():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "weed-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():  # built by whoever held the lock before us
            return binary
        go = find_go()
        work = CACHE / "weed-build" / binary.name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for name in ("go.mod", "go.sum"):
            if (WEED_MODULE / name).exists():
                shutil.copy2(WEED_MODULE / name, work / name)
        tmp = work / "weed"
        cmd = [go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(tmp), WEED_PACKAGE]
        log_path = CACHE / "weed-build.log"
        if not quiet:
            print(
                f"objectstore: building SeaweedFS {weed_version()} with {go} (cold: several minutes on 2 cores; "
                f"log {log_path})",
                file=sys.stderr,
                flush=True,
            )
        t0 = time.monotonic()
        with open(log_path, "wb") as log:
            rc = subprocess.call(cmd, cwd=work, env=go_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if rc != 0 or not tmp.is_file():
            tail = log_path.read_text(errors="replace")[-3000:]
            raise StackError(f"building weed failed (exit {rc}); see {log_path}:\n{tail}")
        tmp.chmod(0o755)
        tmp.rename(binary)
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            work.parent.rmdir()
        if not quiet:
            print(f"objectstore: built {binary} in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    return binary


# --------------------------------------------------------------------------- SigV4 (stdlib)


def _sign(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signed_get(
    url: str, access_key: str, secret_key: str, region: str = REGION, timeout: float = 5.0
) -> tuple[int, bytes]:
    """One AWS Signature V4 signed GET (empty payload): enough for ListBuckets without boto3."""
    parsed = urllib.parse.urlsplit(url)
    now = dt.datetime.now(dt.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(b"").hexdigest()
    headers = {"host": parsed.netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [
            "GET",
            parsed.path or "/",
            parsed.query,
            "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
            signed,
            payload_hash,
        ]
    )
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _sign(_sign(_sign(_sign(f"AWS4{secret_key}".encode(), day), region), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    req = urllib.request.Request(url, method="GET")
    req.add_header("x-amz-content-sha256", payload_hash)
    req.add_header("x-amz-date", amz_date)
    req.add_header(
        "Authorization",
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature}",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


# --------------------------------------------------------------------------- the server


def _random_key(n: int, alphabet: str) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)


@dataclass
class ObjectStore:
    """One SeaweedFS ``weed mini`` process whose files all live under ``dir``."""

    dir: Path
    s3_port: int = 0
    s3_grpc_port: int = 0
    master_port: int = 0
    master_grpc_port: int = 0
    volume_port: int = 0
    volume_grpc_port: int = 0
    filer_port: int = 0
    filer_grpc_port: int = 0
    admin_port: int = 0
    admin_grpc_port: int = 0
    pid: int = 0
    access_key: str = ""
    secret_key: str = ""
    #: A second identity allowed only Read and List (for "write refused" tests).
    readonly_access_key: str = ""
    readonly_secret_key: str = ""
    region: str = REGION
    volume_size_limit_mb: int = 64

    def __post_init__(self) -> None:
        self.dir = Path(self.dir).resolve()
        state = self.state_file
        if state.exists():
            saved = json.loads(state.read_text())
            names = {f.name for f in fields(self)} - {"dir"}
            for k, v in saved.items():
                if k in names:
                    setattr(self, k, v)

    @classmethod
    def at(cls, d: Path) -> ObjectStore:
        return cls(Path(d))

    # ---- paths and addresses

    @property
    def state_file(self) -> Path:
        return self.dir / "objectstore.json"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def s3_config(self) -> Path:
        return self.dir / "etc" / "s3.json"

    @property
    def log_file(self) -> Path:
        return self.dir / "log" / "weed.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def master_url(self) -> str:
        return f"http://127.0.0.1:{self.master_port}"

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "dir"}
        _write_private(self.state_file, json.dumps(data, indent=2) + "\n")

    # ---- lifecycle

    def fetch(self) -> Path:
        """The ``weed`` binary: built on first use, then taken from the cache."""
        return weed_binary()

    def configure(self) -> None:
        """Directories, ports and credentials; kept across restarts of the same state dir."""
        for sub in ("data", "etc", "log", "home", "run"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if not all(getattr(self, f) for f in _PORT_FIELDS):
            taken: set[int] = set()
            for f in _PORT_FIELDS:
                port = free_port()
                while port in taken:
                    port = free_port()
                taken.add(port)
                setattr(self, f, port)
        if not self.access_key:
            upper = string.ascii_uppercase + string.digits
            self.access_key = "POP3K" + _random_key(15, upper)
            self.secret_key = secrets.token_urlsafe(30)
            self.readonly_access_key = "POP3KRO" + _random_key(13, upper)
            self.readonly_secret_key = secrets.token_urlsafe(30)
        identities = [
            {
                "name": "pop3kafka",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            {
                "name": "pop3kafka-readonly",
                "credentials": [{"accessKey": self.readonly_access_key, "secretKey": self.readonly_secret_key}],
                "actions": ["Read", "List"],
            },
        ]
        # No "anonymous" identity: unsigned requests are refused.
        _write_private(self.s3_config, json.dumps({"identities": identities}, indent=2) + "\n")
        self.save()

    def running(self) -> bool:
        return bool(self.pid) and pid_is(self.pid, "weed", " mini ", f"-dir={self.data_dir}")

    def command(self, binary: Path) -> list[str]:
        run = self.dir / "run"
        cmd = [
            str(binary),
            "-logtostderr",  # glog would otherwise also write weed.* files into /tmp
            f"-config_dir={self.dir / 'etc'}",
            "mini",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data_dir}",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_grpc_port}",
            "-master.telemetry=false",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_grpc_port}",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_grpc_port}",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={self.s3_grpc_port}",
            f"-s3.config={self.s3_config}",
            "-s3.iam=false",  # no IAM API: identities come from s3.json only
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={self.admin_port}",
            f"-admin.port.grpc={self.admin_grpc_port}",
            "-admin.port.legacy=0",
        ]
        # Unix sockets (local fast paths) default to /tmp/seaweedfs-<svc>-<port>.sock; keep them
        # here when the path fits in sun_path (108 bytes). The gRPC ones are always in /tmp.
        if len(str(run / "filer.sock")) < 100:
            cmd += [f"-filer.localSocket={run / 'filer.sock'}", f"-s3.localSocket={run / 's3.sock'}"]
        return cmd

    def start(self, timeout: float = 60.0) -> None:
        """Start (building the binary first if needed) and wait until S3 answers a signed request.

        ``timeout`` covers the server start only, not a cold build.
        """
        if self.running():
            self.wait_ready(timeout)
            return
        binary = self.fetch()
        self.configure()
        busy = [p for p in (getattr(self, f) for f in _PORT_FIELDS) if port_open(p)]
        if busy:
            # weed mini would silently move a busy port elsewhere; refuse instead.
            raise StackError(f"ports {busy} of {self.dir} are in use by another process; `down` it or use a new --dir")
        env = {k: v for k, v in os.environ.items() if not _SCRUBBED_ENV.match(k)}
        env["HOME"] = str(self.dir / "home")  # no ~/.seaweedfs/*.toml of the caller's
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                self.command(binary),
                cwd=self.dir,  # weed reads *.toml from the working directory too
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid = proc.pid
        self.save()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise

    def wait_ready(self, timeout: float) -> None:
        """Ready when a signed ListBuckets returns 200 and the master lists a volume server."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not pid_alive(self.pid):
                raise StackError(f"weed exited during start; see {self.log_file}")
            try:
                status, body = signed_get(
                    self.endpoint_url + "/", self.access_key, self.secret_key, self.region, timeout=2
                )
                if status == 200 and b"ListAllMyBucketsResult" in body:
                    if self._volume_servers() > 0:
                        return
                    last = "S3 answers, but no volume server has registered with the master yet"
                else:
                    last = f"ListBuckets answered {status}: {body[:300]!r}"
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        raise StackError(
            f"SeaweedFS not ready after {timeout:.0f}s at {self.endpoint_url}: {last}; see {self.log_file}"
        )

    def _volume_servers(self) -> int:
        with urllib.request.urlopen(self.master_url + "/dir/status", timeout=2) as resp:
            topo = json.load(resp).get("Topology", {})
        return sum(
            len(rack.get("DataNodes") or []) for dc in topo.get("DataCenters") or [] for rack in dc.get("Racks") or []
        )

    def stop(self) -> None:
        """SIGTERM (weed mini shuts down in ~3 s), SIGKILL after 30 s; then remove its sockets."""
        if self.running():
            stop_pid(self.pid)
        if self.pid and not pid_alive(self.pid):
            # The gRPC unix sockets are always under /tmp, named by port; a killed weed leaves them.
            for name in ("master", "volume", "filer", "s3", "admin"):
                port = getattr(self, f"{name}_grpc_port")
                with contextlib.suppress(OSError):
                    Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock").unlink()
        self.pid = 0
        if self.dir.exists():
            self.save()

    # ---- clients and environment

    def env(self) -> dict[str, str]:
        return {
            "S3_ENDPOINT_URL": self.endpoint_url,
            "S3_ACCESS_KEY_ID": self.access_key,
            "S3_SECRET_ACCESS_KEY": self.secret_key,
            "S3_REGION": self.region,
            "OBJECTSTORE_DIR": str(self.dir),
        }

    def client(self, *, access_key: str | None = None, secret_key: str | None = None, **config: Any) -> Any:
        """A boto3 S3 client for this server (path-style addressing); needs the ``s3`` extra."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key if access_key is None else access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}, **config),
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "env", "status", "fetch"])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state directory (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a started server")
    args = ap.parse_args(argv)
    try:
        if args.action == "fetch":
            print(weed_binary())
            return 0
        store = ObjectStore.at(args.dir)
        if args.action == "up":
            t0 = time.monotonic()
            store.start(args.timeout)
            print(f"# object store up in {time.monotonic() - t0:.1f}s (state in {store.dir})", file=sys.stderr)
        elif args.action == "down":
            store.stop()
            return 0
        elif args.action == "status":
            up = store.running()
            print(f"objectstore: {'running at ' + store.endpoint_url if up else 'stopped'}")
            return 0 if up else 1
        elif not store.running():
            print(f"objectstore: not running in {store.dir}", file=sys.stderr)
            return 1
    except StackError as exc:
        print(f"objectstore: {exc}", file=sys.stderr)
        return 1
    for k, v in store.env().items():
        print(f"export {k}='{v}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
