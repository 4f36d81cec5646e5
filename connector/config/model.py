"""The configuration: typed, validated at load, secrets wrapped so they never print.

The YAML layout is documented in docs/configuration.md; every key is declared once here,
in the schema below, and the typed dataclasses are built from the validated data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from connector.config.schema import Field, validate
from connector.errors import ConfigError

TlsMode = Literal["implicit", "starttls", "none"]
KeyMode = Literal["mailbox", "record_id"]

# A mailbox id is a short label used in record ids, Kafka keys, metrics and logs:
# never an address. ':' is excluded so "<mailbox>:<uidl>" splits unambiguously.
MAILBOX_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")
TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class Secret:
    """A secret value (password, token); repr/str never show it. Call ``reveal()`` to use it."""

    __slots__ = ("_source", "_value")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self._source = source

    def reveal(self) -> str:
        return self._value

    @property
    def source(self) -> str:
        """Where the secret came from (``env:NAME`` or ``file:PATH``), safe to print."""
        return self._source

    def __repr__(self) -> str:
        return f"Secret({self._source}, ***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._source)


@dataclass(frozen=True)
class MailboxConfig:
    id: str
    host: str
    port: int
    tls: TlsMode
    username: str
    password: Secret
    tls_ca_file: str | None = None
    tls_verify: bool = True
    allow_plaintext_auth: bool = False
    poll_interval_seconds: float = 60.0
    timeout_seconds: float = 30.0
    max_messages_per_cycle: int = 500
    max_bytes_per_cycle: int = 256 * 1024 * 1024
    max_message_bytes: int = 32 * 1024 * 1024

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str
    #: librdkafka settings passed through untouched (security.protocol, sasl.*, ssl.*...).
    client: Mapping[str, Any] = field(default_factory=dict)
    delivery_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class TopicsConfig:
    mail: str
    #: create missing topics at start (needs the Create ACL); else a missing topic is an error.
    create: bool = True
    partitions: int = 3
    #: -1 = the broker's default.replication.factor
    replication_factor: int = -1


@dataclass(frozen=True)
class RecordConfig:
    key: KeyMode = "mailbox"


@dataclass(frozen=True)
class RuntimeConfig:
    max_concurrent_sessions: int = 8
    shutdown_grace_seconds: float = 30.0


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig
    topics: TopicsConfig
    record: RecordConfig
    runtime: RuntimeConfig
    mailboxes: tuple[MailboxConfig, ...]
    source: str = "<memory>"

    def mailbox(self, mailbox_id: str) -> MailboxConfig:
        for m in self.mailboxes:
            if m.id == mailbox_id:
                return m
        known = ", ".join(m.id for m in self.mailboxes)
        raise ConfigError(f"--mailbox {mailbox_id!r}: no such mailbox in {self.source} (configured: {known})")


# ------------------------------------------------------------------------------ schema


def _check_mailbox_id(value: Any, path: str) -> None:
    if not MAILBOX_ID_RE.match(value):
        raise ConfigError(
            f"{path}: {value!r} is not a valid mailbox id; use 1-63 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit (a short label, not an e-mail address)"
        )


def _check_topic(value: Any, path: str) -> None:
    if not TOPIC_RE.match(value) or value in (".", ".."):
        raise ConfigError(
            f"{path}: {value!r} is not a valid Kafka topic name (1-249 characters of A-Z, a-z, 0-9, '.', '_', '-')"
        )


def _check_client(value: Any, path: str) -> None:
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, (str, int, float, bool)):
            raise ConfigError(f"{path}.{key}: librdkafka settings must be scalars, got {type(item).__name__}")
        if key in _MANAGED_CLIENT_KEYS:
            raise ConfigError(
                f"{path}.{key}: set by the connector to keep its delivery guarantee; remove it "
                f"(managed keys: {', '.join(sorted(_MANAGED_CLIENT_KEYS))})"
            )


_MANAGED_CLIENT_KEYS = frozenset(
    {
        "bootstrap.servers",
        "enable.idempotence",
        "acks",
        "transactional.id",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "on_delivery",
        "isolation.level",
    }
)

SECRET_SCHEMA: dict[str, Field] = {
    "env": Field("str", secret=True, help="name of an environment variable holding the secret"),
    "file": Field("str", secret=True, help="path of a file holding the secret (trailing newline stripped)"),
}

MAILBOX_SCHEMA: dict[str, Field] = {
    "id": Field("str", required=True, check=_check_mailbox_id, help="a short label such as 'orders'"),
    "host": Field("str", required=True),
    "port": Field("int", minimum=1, maximum=65535, help="default 995 for implicit TLS, else 110"),
    "tls": Field("str", default="implicit", choices=("implicit", "starttls", "none")),
    "tls_ca_file": Field("str"),
    "tls_verify": Field("bool", default=True),
    "allow_plaintext_auth": Field("bool", default=False),
    "username": Field("str", required=True),
    "password": Field(
        "map",
        required=True,
        schema=SECRET_SCHEMA,
        secret=True,
        help="{env: VAR} or {file: /path}; inline passwords are refused",
    ),
    "poll_interval_seconds": Field("float", default=60.0, minimum=1, maximum=30 * 86400),
    "timeout_seconds": Field("float", default=30.0, minimum=1, maximum=3600),
    "max_messages_per_cycle": Field("int", default=500, minimum=1, maximum=100_000),
    "max_bytes_per_cycle": Field("int", default=256 * 1024 * 1024, minimum=1024),
    "max_message_bytes": Field("int", default=32 * 1024 * 1024, minimum=1024),
}

ROOT_SCHEMA: dict[str, Field] = {
    "kafka": Field(
        "map",
        required=True,
        schema={
            "bootstrap_servers": Field("str", required=True),
            "client": Field("map", free_form=True, default=dict, check=_check_client),
            "delivery_timeout_seconds": Field("float", default=30.0, minimum=1, maximum=3600),
        },
    ),
    "topics": Field(
        "map",
        required=True,
        schema={
            "mail": Field("str", required=True, check=_check_topic),
            "create": Field("bool", default=True),
            "partitions": Field("int", default=3, minimum=1, maximum=10_000),
            "replication_factor": Field("int", default=-1, minimum=-1, maximum=100),
        },
    ),
    "record": Field(
        "map",
        default=dict,
        schema={
            "key": Field("str", default="mailbox", choices=("mailbox", "record_id")),
        },
    ),
    "runtime": Field(
        "map",
        default=dict,
        schema={
            "max_concurrent_sessions": Field("int", default=8, minimum=1, maximum=1024),
            "shutdown_grace_seconds": Field("float", default=30.0, minimum=0, maximum=3600),
        },
    ),
    "mailboxes": Field("list", required=True, schema=MAILBOX_SCHEMA),
}


# ------------------------------------------------------------------------------ loading


def _resolve_secret(spec: Mapping[str, Any], path: str, base: Path, environ: Mapping[str, str]) -> Secret:
    env, file = spec.get("env"), spec.get("file")
    if (env is None) == (file is None):
        raise ConfigError(f"{path}: give exactly one of 'env' or 'file'")
    if env is not None:
        if env not in environ:
            # Echo the name only when it looks like one: a password pasted here must not print.
            shown = repr(env) if ENV_NAME_RE.match(env) else "(name hidden: it does not look like a variable name)"
            raise ConfigError(f"{path}.env: environment variable {shown} is not set; export it or use 'file:'")
        return Secret(environ[env], f"env:{env}")
    assert isinstance(file, str)
    p = Path(file) if Path(file).is_absolute() else base / file
    try:
        value = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}.file: cannot read {str(p)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}.file: {str(p)!r} is not UTF-8 text") from None
    # A secret file written by an editor or `echo` ends in a newline that is not part of it.
    return Secret(value.rstrip("\r\n"), f"file:{p}")


def parse_config(
    data: Any, *, source: str = "<memory>", base: Path | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Validate raw (YAML-decoded) data and build the typed config, or raise ConfigError."""
    env = os.environ if environ is None else environ
    base = base or Path.cwd()
    v = validate(data, ROOT_SCHEMA, "")
    if not v["mailboxes"]:
        raise ConfigError("mailboxes: the list is empty; configure at least one mailbox")
    mailboxes: list[MailboxConfig] = []
    seen: set[str] = set()
    for i, m in enumerate(v["mailboxes"]):
        path = f"mailboxes[{i}]"
        if m["id"] in seen:
            raise ConfigError(f"{path}.id: {m['id']!r} is used by two mailboxes; ids must be unique")
        seen.add(m["id"])
        port = m["port"] if m["port"] is not None else (995 if m["tls"] == "implicit" else 110)
        if m["tls"] == "none" and not m["allow_plaintext_auth"]:
            raise ConfigError(
                f"{path}.tls: 'none' would send the password unencrypted; use 'implicit' or 'starttls', "
                "or set allow_plaintext_auth: true if you accept that"
            )
        if m["tls_ca_file"] is not None:
            ca = Path(m["tls_ca_file"]) if Path(m["tls_ca_file"]).is_absolute() else base / m["tls_ca_file"]
            if not ca.is_file():
                raise ConfigError(f"{path}.tls_ca_file: {str(ca)!r} does not exist or is not a file")
            m["tls_ca_file"] = str(ca)
        mailboxes.append(
            MailboxConfig(
                id=m["id"],
                host=m["host"],
                port=port,
                tls=m["tls"],
                username=m["username"],
                password=_resolve_secret(m["password"], f"{path}.password", base, env),
                tls_ca_file=m["tls_ca_file"],
                tls_verify=m["tls_verify"],
                allow_plaintext_auth=m["allow_plaintext_auth"],
                poll_interval_seconds=m["poll_interval_seconds"],
                timeout_seconds=m["timeout_seconds"],
                max_messages_per_cycle=m["max_messages_per_cycle"],
                max_bytes_per_cycle=m["max_bytes_per_cycle"],
                max_message_bytes=m["max_message_bytes"],
            )
        )
    k = v["kafka"]
    return Config(
        kafka=KafkaConfig(
            bootstrap_servers=k["bootstrap_servers"],
            client=k["client"],
            delivery_timeout_seconds=k["delivery_timeout_seconds"],
        ),
        topics=TopicsConfig(**v["topics"]),
        record=RecordConfig(key=v["record"]["key"]),
        runtime=RuntimeConfig(**v["runtime"]),
        mailboxes=tuple(mailboxes),
        source=source,
    )


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file; every problem is a ConfigError naming the key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None
    return parse_config(data, source=str(p), base=p.resolve().parent, environ=environ)
