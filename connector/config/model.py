"""The configuration: typed, validated at load, secrets wrapped so they never print.

The YAML layout is documented in docs/configuration.md; every key is declared once here,
in the schema below, and the typed dataclasses are built from the validated data.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from connector.auth.oauth2 import (
    DEFAULT_TIMEOUT,
    ClientCredentialsSource,
    JwtBearerSource,
    StaticTokenSource,
    TokenSource,
    token_url_problem,
)
from connector.config.offload import OffloadSettings
from connector.config.schema import Field, validate
from connector.decoding.options import DEFAULT_OPTIONS, BodySelection, DecodeLimits, DecodeOptions
from connector.errors import ConfigError

TlsMode = Literal["implicit", "starttls", "none"]
KeyMode = Literal["mailbox", "record_id"]
DeliveryMode = Literal["exactly_once", "at_least_once"]
StartFrom = Literal["all", "now"]
OnUndecodable = Literal["dead_letter", "leave"]
Framing = Literal["single_object", "schema_registry"]
SubjectNaming = Literal["topic", "record", "topic_record"]
#: the compatibility levels of Confluent's API (Apicurio's ccompat API accepts the same).
COMPATIBILITY_LEVELS = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)
#: "TLSv1" only results from tls_legacy: true without an explicit tls_min_version.
TlsVersion = Literal["TLSv1", "TLSv1.2", "TLSv1.3"]

# A mailbox id is a short label used in record ids, Kafka keys, metrics and logs:
# never an address. ':' is excluded so "<mailbox>:<uidl>" splits unambiguously.
MAILBOX_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")
TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
FINGERPRINT_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}\.?$){_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?$")
#: attachment parts larger than this (encoded) are decoded piece by piece, never held whole.
#: Low on purpose: a mail of many medium-sized parts (60 photos of 800 KB) must not be held
#: part by part either; the price is a second transfer-decoding pass over such parts.
STREAM_ABOVE = 64 * 1024
#: room a record keeps under message.max.bytes for bodies and headers besides inline content.
INLINE_HEADROOM = 64 * 1024
#: bytes a chunk record may take beyond its data: Avro fields (ids, sizes, sha256), the
#: single-object header, Kafka record headers and batch framing. Generous on purpose.
CHUNK_RECORD_OVERHEAD = 4096
#: topics.attachments defaults to topics.mail plus this.
ATTACHMENTS_SUFFIX = ".attachments"
#: topics.dead_letter defaults to topics.mail plus this.
DEAD_LETTER_SUFFIX = ".dlq"


class Secret:
    """A secret value (password, token); repr/str never show it. Call ``reveal()`` to use it."""

    __slots__ = ("_mtime", "_path", "_source", "_value")

    def __init__(self, value: str, source: str, path: Path | None = None) -> None:
        self._value = value
        self._source = source
        self._path = path
        self._mtime = path.stat().st_mtime_ns if path is not None else 0

    def reveal(self) -> str:
        """The value; a secret from a file is re-read when the file changed (Kubernetes
        rotates mounted secrets in place; a token sidecar rewrites its file)."""
        if self._path is not None:
            try:
                mtime = self._path.stat().st_mtime_ns
                if mtime != self._mtime:
                    self._value = self._path.read_text(encoding="utf-8").rstrip("\r\n")
                    self._mtime = mtime
            except (OSError, UnicodeDecodeError):
                pass  # keep the last good value; the login that uses it reports any failure
        return self._value

    @property
    def source(self) -> str:
        """Where the secret came from (``env:NAME`` or ``file:PATH``), safe to print."""
        return self._source

    def __repr__(self) -> str:
        return f"Secret({self._source}, ***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        # A file secret is the same secret when it is the same file (it re-reads itself when the
        # file is rotated): a reload must not see every rotated secret as a changed setting.
        if not isinstance(other, Secret):
            return False
        if self._path is not None or other._path is not None:
            return self._source == other._source
        return other._value == self._value

    def __hash__(self) -> int:
        return hash(self._source)


@dataclass(frozen=True)
class ScheduleSpec:
    """A mailbox's schedule (config: ``schedule:``, or ``poll_interval_seconds`` alone)."""

    interval_seconds: float = 60.0
    #: 5-field cron expression; when set, it replaces the interval.
    cron: str | None = None
    #: IANA time zone the cron expression is read in.
    timezone: str = "UTC"
    #: spread: each mailbox polls at a stable offset in [0, jitter_seconds) from its plan.
    jitter_seconds: float = 0.0
    backoff_initial_seconds: float = 10.0
    backoff_max_seconds: float = 900.0
    auth_backoff_seconds: float = 900.0
    in_use_retry_seconds: float = 60.0


def validate_cron(expr: str) -> str | None:
    """None when ``expr`` is a valid 5-field cron expression, else why not."""
    from croniter import croniter  # noqa: PLC0415

    if len(expr.split()) != 5:
        return "a cron expression has 5 fields: minute hour day-of-month month day-of-week"
    if not croniter.is_valid(expr):
        return "not a valid cron expression"
    return None


@dataclass(frozen=True)
class AttachmentsConfig:
    """Per mailbox: what happens to attachment bytes (and raw mail, and large dead letters).

    ``none``: metadata only (size, sha256), as in record version 2. Otherwise content up to
    ``inline_max_bytes`` travels in the record; larger content goes as chunk records on
    topics.attachments (``chunked``) or to the offload store (``offload``).
    """

    placement: Literal["none", "chunked", "offload"] = "chunked"
    inline_max_bytes: int = 256 * 1024


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
    #: lowest TLS version accepted; "TLSv1" only with tls_legacy.
    tls_min_version: TlsVersion = "TLSv1.2"
    #: SHA-256 pin of the server's leaf certificate, normalised to "AB:CD:..." (None = no pin).
    tls_fingerprint_sha256: str | None = None
    #: client certificate (PEM; may hold the key too) for servers that require one.
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    tls_client_key_password: Secret | None = None
    #: name to verify the certificate against (and send as SNI) instead of host.
    tls_server_name: str | None = None
    #: opt-in for old servers: TLS 1.0/1.1 and weak ciphers (a WARNING per connection).
    tls_legacy: bool = False
    allow_plaintext_auth: bool = False
    poll_interval_seconds: float = 60.0
    timeout_seconds: float = 30.0
    max_messages_per_cycle: int = 500
    max_bytes_per_cycle: int = 256 * 1024 * 1024
    max_message_bytes: int = 32 * 1024 * 1024
    #: longest line accepted in a mail, CRLF included (docs/pop3.md, limits); longer: refused.
    max_line_bytes: int = 1024 * 1024
    max_seconds_per_cycle: float = 60.0
    #: false = keep mode: mail stays on the server, the ledger prevents re-publishing.
    delete: bool = True
    #: keep mode only: delete mail this many days after we first saw it (None = never).
    delete_after_days: float | None = None
    #: "now": on the first cycle, record the mail already there in the ledger without publishing.
    start_from: StartFrom = "all"
    #: what to do when the server's UIDLs look reset: stop (report), republish, rebaseline.
    on_uidl_reset: Literal["stop", "republish", "rebaseline"] = "stop"
    #: tombstone a ledger entry whose mail has been absent this long (providers that show only
    #: part of the mailbox per session, like Gmail, need this to be long).
    absent_grace_days: float = 7.0
    #: how a session ends without applying deletes: RSET+QUIT, or disconnect (Gmail).
    abort_with: Literal["rset_quit", "disconnect"] = "rset_quit"
    #: login mechanisms allowed, strongest first when the server offers several; None = every
    #: one we support that the credentials allow (USER/PASS, APOP, SASL; docs/pop3.md).
    auth_mechanisms: tuple[str, ...] | None = None
    #: how mail is decoded: limits, body selection, S/MIME (docs/configuration.md).
    decode: DecodeOptions = DEFAULT_OPTIONS
    #: OAuth2 bearer token for XOAUTH2/OAUTHBEARER; a file is re-read at every login.
    oauth2_token: Secret | None = None
    #: ``oauth2:``: the connector fetches tokens itself (client credentials or JWT bearer grant,
    #: connector/auth/oauth2.py); exclusive with oauth2_token. Shared by mailboxes with the
    #: same settings, stateful (its cache), hence not compared.
    oauth2: TokenSource | None = field(default=None, compare=False)
    #: "uidl" (RFC 1939 unique-id) or the opt-in fallback "headers" for servers without UIDL
    #: or with duplicate UIDLs: identity = hash of TOP n 0 + LIST size (docs/delivery.md, limits).
    identity: Literal["uidl", "headers"] = "uidl"
    #: mail that cannot be decoded: "dead_letter" (its original bytes go to topics.dead_letter,
    #: then it is deleted like delivered mail) or "leave" (left on the server, counted, logged).
    on_undecodable: OnUndecodable = "dead_letter"
    #: where attachment bytes go (docs/configuration.md, "Large mail").
    attachments: AttachmentsConfig = field(default_factory=AttachmentsConfig)
    #: when it is polled: interval or cron, jitter, backoff (connector/runtime/schedule.py).
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    #: "include": the raw mail travels too (inline, chunked or offloaded like an attachment).
    raw_mail: Literal["none", "include"] = "none"
    #: mail over max_message_bytes (by LIST): "skip" (left, counted, logged once per UIDL),
    #: "dead_letter" (retrieved into the spool, its raw bytes chunked or offloaded with a dead
    #: letter, then deleted like delivered mail) or "delete" (deleted unread).
    oversized: Literal["skip", "dead_letter", "delete"] = "skip"

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def token_source(self) -> TokenSource | None:
        """Where XOAUTH2/OAUTHBEARER logins get their token: ``oauth2``, else ``oauth2_token``."""
        if self.oauth2 is not None:
            return self.oauth2
        if self.oauth2_token is not None:
            return StaticTokenSource(self.oauth2_token)
        return None


#: librdkafka settings of every client of ours, unless kafka.client sets them.
CLIENT_DEFAULTS: Mapping[str, Any] = {
    # A new client learns the brokers from its bootstrap connection, drops that connection and
    # connects again by broker id only after reconnect.backoff.ms (100 by default): its first
    # request took 55 ms against the local broker instead of 16 ms with 25. Each client a
    # poll-once starts (topic checks, each shard's producer) waited that (docs/decisions/0001,
    # "Third round"). The backoff still doubles per failed attempt up to reconnect.backoff.max.ms.
    "reconnect.backoff.ms": 25,
}


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str
    #: librdkafka settings passed through untouched (security.protocol, sasl.*, ssl.*...).
    client: Mapping[str, Any] = field(default_factory=dict)
    delivery_timeout_seconds: float = 30.0
    #: librdkafka settings whose values are secrets (sasl.password, ssl.key.password...),
    #: read from env or files; merged in by client_conf() only, so they never print.
    client_secrets: Mapping[str, Secret] = field(default_factory=dict)

    def client_conf(self) -> dict[str, Any]:
        """The librdkafka settings to hand to a client: our defaults (CLIENT_DEFAULTS), then the
        pass-through keys, then the revealed secrets."""
        conf = {**CLIENT_DEFAULTS, **self.client}
        conf.update({k: s.reveal() for k, s in self.client_secrets.items()})
        return conf


@dataclass(frozen=True)
class TopicsConfig:
    mail: str
    #: create missing topics at start (needs the Create ACL); else a missing topic is an error.
    create: bool = True
    partitions: int = 3
    #: -1 = the broker's default.replication.factor
    replication_factor: int = -1
    #: where mail that cannot be decoded goes (schemas/dead_letter.avsc); "" = "<mail>.dlq".
    dead_letter: str = ""
    #: chunk records of large content (schemas/attachment_chunk.avsc); "" = "<mail>.attachments".
    attachments: str = ""
    #: bytes of content per chunk record; with the record's framing it must fit the topic's
    #: max.message.bytes and the producer's message.max.bytes (checked by doctor).
    chunk_bytes: int = 512 * 1024

    def __post_init__(self) -> None:
        if not self.dead_letter:
            object.__setattr__(self, "dead_letter", f"{self.mail}{DEAD_LETTER_SUFFIX}")
        if not self.attachments:
            object.__setattr__(self, "attachments", f"{self.mail}{ATTACHMENTS_SUFFIX}")


@dataclass(frozen=True)
class RecordConfig:
    key: KeyMode = "mailbox"
    #: wire framing of mail records, dead letters and chunk records (docs/record.md, "Framing"):
    #: Avro single-object encoding, or the Confluent Schema Registry wire format (needs
    #: ``schema_registry:``). The ledger topic is internal state and stays single-object.
    framing: Framing = "single_object"


@dataclass(frozen=True)
class SchemaRegistryConfig:
    """``schema_registry:``: a Confluent-compatible registry (Confluent, Apicurio's ccompat API)."""

    url: str
    #: subjects: ``topic`` = "<topic>-value", ``record`` = "<namespace>.<name>",
    #: ``topic_record`` = "<topic>-<namespace>.<name>" (Confluent's three naming strategies).
    subject_naming: SubjectNaming = "topic"
    #: register a missing schema at start; off: `pop3-kafka schemas register` is the only writer.
    auto_register: bool = False
    #: what `pop3-kafka schemas register` sets on each subject before registering.
    compatibility: str = "FULL_TRANSITIVE"
    #: "user:password" for HTTP basic authentication.
    basic_auth: Secret | None = None
    #: PEM bundle for an https:// registry; default: the system trust store.
    ca_file: str | None = None
    timeout_seconds: float = 10.0


@dataclass(frozen=True)
class DeliveryConfig:
    mode: DeliveryMode = "exactly_once"
    transactional_id_prefix: str = "pop3-kafka"
    transaction_timeout_seconds: float = 120.0


@dataclass(frozen=True)
class LedgerConfig:
    topic: str = "pop3-kafka.ledger"
    #: None = whatever the ledger topic has (8 when the connector creates it).
    shards: int | None = None
    create: bool = True


@dataclass(frozen=True)
class RuntimeConfig:
    max_concurrent_sessions: int = 8
    #: POP3 sessions open at once to one server (host:port); providers throttle per client.
    max_sessions_per_server: int = 4
    #: "all": this process owns every shard; "group": replicas share the shards through a
    #: consumer group on the ledger topic (docs/decisions/0005).
    ownership: Literal["all", "group"] = "all"
    #: static group membership (group.instance.id); default: $POD_NAME when set.
    instance_id: str | None = None
    #: how long the group waits for a replica that stopped heartbeating before its shards move.
    group_session_timeout_seconds: float = 45.0
    shutdown_grace_seconds: float = 30.0
    #: a mail larger than this is received into a spool file instead of memory.
    spool_threshold_bytes: int = 4 * 1024 * 1024
    #: where spool files go (anonymous 0600 files); None = the system temp directory.
    spool_directory: str | None = None
    #: worker processes that decode mail beside retrieval (connector/runtime/decode_pool.py);
    #: None: one less than the usable CPUs, at most 4; 0: decode in the cycle threads.
    decode_processes: int | None = None


@dataclass(frozen=True)
class AdminConfig:
    """``admin:``: the HTTP endpoint of ``run`` (connector/runtime/admin_server.py)."""

    host: str = "127.0.0.1"
    port: int = 9108
    token: Secret | None = None


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig
    topics: TopicsConfig
    record: RecordConfig
    runtime: RuntimeConfig
    mailboxes: tuple[MailboxConfig, ...]
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    source: str = "<memory>"
    #: the offload store (connector/delivery/offload.py), needed by ``placement: offload``.
    offload: OffloadSettings | None = None
    #: the admin endpoint of ``run``; None: off.
    admin: AdminConfig | None = None
    #: the schema registry (record.framing: schema_registry, `pop3-kafka schemas register`).
    schema_registry: SchemaRegistryConfig | None = None

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


AUTH_MECHANISMS = (
    "USER",
    "APOP",
    "PLAIN",
    "LOGIN",
    "CRAM-MD5",
    "SCRAM-SHA-1",
    "SCRAM-SHA-256",
    "NTLM",
    "XOAUTH2",
    "XOAUTH2-TWO-STEP",
    "OAUTHBEARER",
)


def _check_mechanisms(value: Any, path: str) -> None:
    for i, mech in enumerate(value):
        if mech.upper() not in AUTH_MECHANISMS:
            raise ConfigError(f"{path}[{i}]: {mech!r} is not supported; use some of: {', '.join(AUTH_MECHANISMS)}")


def _check_fingerprint(value: Any, path: str) -> None:
    if not FINGERPRINT_RE.match(value.strip().replace(":", "")):
        raise ConfigError(
            f"{path}: {value!r} is not a SHA-256 fingerprint; give 64 hex digits, colons allowed "
            "(openssl x509 -noout -fingerprint -sha256 -in CERT.pem)"
        )


def _check_server_name(value: Any, path: str) -> None:
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        if not HOSTNAME_RE.match(value):
            raise ConfigError(
                f"{path}: {value!r} is neither a host name nor an IP address (no port, scheme or wildcard)"
            ) from None


def _check_topic(value: Any, path: str) -> None:
    if not TOPIC_RE.match(value) or value in (".", ".."):
        raise ConfigError(
            f"{path}: {value!r} is not a valid Kafka topic name (1-249 characters of A-Z, a-z, 0-9, '.', '_', '-')"
        )


def _check_cron(value: Any, path: str) -> None:
    why = validate_cron(value)
    if why is not None:
        raise ConfigError(f"{path}: {value!r}: {why} (e.g. '*/15 * * * *' or '0 9 * * mon-fri')")


def _check_timezone(value: Any, path: str) -> None:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{path}: {value!r} is not an IANA time zone name (e.g. 'Europe/Berlin', 'UTC')") from None


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


def _check_token_url(value: Any, path: str) -> None:
    problem = token_url_problem(value)
    if problem is not None:
        # A URL with user:password@ is not echoed: that part may be a secret.
        shown = "(value hidden)" if "@" in value else repr(value)
        raise ConfigError(f"{path}: {shown}: {problem}")


OAUTH2_GRANTS = ("client_credentials", "jwt_bearer")
OAUTH2_SCHEMA: dict[str, Field] = {
    "grant": Field("str", required=True, choices=OAUTH2_GRANTS),
    "token_url": Field("str", check=_check_token_url, help="https:// URL of the token endpoint"),
    "client_id": Field("str", help="client_credentials: the application (client) ID"),
    "client_secret": Field(
        "map", schema=SECRET_SCHEMA, secret=True, help="{env: VAR} or {file: /path}; inline secrets are refused"
    ),
    "scope": Field("str"),
    "service_account_file": Field("str", help="jwt_bearer: the service-account JSON key"),
    "subject": Field("str", help="jwt_bearer: the user to act as; default: username"),
    "ca_file": Field("str", help="PEM bundle for the token endpoint's TLS; default: the system trust store"),
    "timeout_seconds": Field("float", default=DEFAULT_TIMEOUT, minimum=1, maximum=300),
}
# What each grant needs (besides grant) and what it must not be given; the help says why.
_OAUTH2_REQUIRED: dict[str, dict[str, str]] = {
    "client_credentials": {
        "token_url": "the token endpoint, e.g. https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token",
        "client_id": "the application (client) ID of the app registration",
        "client_secret": "{env: VAR} or {file: /path}",
    },
    "jwt_bearer": {
        "service_account_file": "the service-account JSON key",
        "scope": "e.g. https://mail.google.com/",
    },
}
_OAUTH2_ONLY_FOR = {
    "client_id": "client_credentials",
    "client_secret": "client_credentials",
    "service_account_file": "jwt_bearer",
    "subject": "jwt_bearer",
}
#: SASL mechanisms that need a bearer token (connector/protocol/sasl.py TOKEN_MECHANISMS).
_TOKEN_MECHANISMS = frozenset({"XOAUTH2", "XOAUTH2-TWO-STEP", "OAUTHBEARER"})


def _check_registry_url(value: Any, path: str) -> None:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("http", "https", "mock") or not rest or rest.startswith("/"):
        raise ConfigError(
            f"{path}: {value!r} is not an http(s):// URL (e.g. http://registry:8081 for Confluent, "
            "http://registry:8080/apis/ccompat/v7 for Apicurio)"
        )
    if "@" in rest.split("/", 1)[0]:
        # Credentials in the URL would print wherever the URL does.
        raise ConfigError(f"{path}: (value hidden) carries user:password@; put them in schema_registry.basic_auth")
    if "," in value:
        raise ConfigError(f"{path}: one URL only (a load balancer in front of several registries)")


def _check_content_type(value: Any, path: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+", value):
        raise ConfigError(f"{path}: {value!r} is not a content type such as text/plain")


MAILBOX_SCHEMA: dict[str, Field] = {
    "id": Field("str", required=True, check=_check_mailbox_id, help="a short label such as 'orders'"),
    "host": Field("str", required=True),
    "port": Field("int", minimum=1, maximum=65535, help="default 995 for implicit TLS, else 110"),
    "tls": Field("str", default="implicit", choices=("implicit", "starttls", "none")),
    "tls_ca_file": Field("str"),
    "tls_verify": Field("bool", default=True),
    "tls_min_version": Field("str", choices=("TLSv1.2", "TLSv1.3"), help="default TLSv1.2"),
    "tls_fingerprint_sha256": Field("str", check=_check_fingerprint, help="64 hex digits, colons allowed"),
    "tls_client_cert": Field("str", help="PEM file; relative to the config file"),
    "tls_client_key": Field("str", help="PEM file; relative to the config file"),
    "tls_client_key_password": Field(
        "map", schema=SECRET_SCHEMA, secret=True, help="{env: VAR} or {file: /path}; inline passwords are refused"
    ),
    "tls_server_name": Field("str", check=_check_server_name, help="default: host"),
    "tls_legacy": Field("bool", default=False),
    "allow_plaintext_auth": Field("bool", default=False),
    "username": Field("str", required=True),
    "password": Field(
        "map",
        schema=SECRET_SCHEMA,
        secret=True,
        help="{env: VAR} or {file: /path}; inline passwords are refused",
    ),
    "poll_interval_seconds": Field("float", default=60.0, minimum=1, maximum=30 * 86400),
    "timeout_seconds": Field("float", default=30.0, minimum=1, maximum=3600),
    "max_messages_per_cycle": Field("int", default=500, minimum=1, maximum=100_000),
    "max_bytes_per_cycle": Field("int", default=256 * 1024 * 1024, minimum=1024),
    "max_message_bytes": Field("int", default=32 * 1024 * 1024, minimum=1024),
    "max_line_bytes": Field(
        "int", default=1024 * 1024, minimum=1000, help="octets per line, CRLF included; RFC 5322 allows 1000"
    ),
    "max_seconds_per_cycle": Field("float", default=60.0, minimum=1, maximum=3600),
    "delete": Field("bool", default=True, help="false = keep mode"),
    "delete_after_days": Field("float", minimum=0, maximum=36500),
    "start_from": Field("str", default="all", choices=("all", "now")),
    "on_uidl_reset": Field("str", default="stop", choices=("stop", "republish", "rebaseline")),
    "absent_grace_days": Field("float", default=7.0, minimum=0, maximum=36500),
    "abort_with": Field("str", default="rset_quit", choices=("rset_quit", "disconnect")),
    "identity": Field("str", default="uidl", choices=("uidl", "headers")),
    "on_undecodable": Field("str", default="dead_letter", choices=("dead_letter", "leave")),
    "schedule": Field(
        "map",
        default=dict,
        schema={
            "interval_seconds": Field(
                "float", minimum=1, maximum=30 * 86400, help="default: poll_interval_seconds; exclusive with cron"
            ),
            "cron": Field("str", check=_check_cron, help="5 fields, e.g. '*/15 * * * *'"),
            "timezone": Field("str", default="UTC", check=_check_timezone, help="IANA name the cron is read in"),
            "jitter_seconds": Field(
                "float", minimum=0, maximum=86400, help="default: the interval, at most 300 s (cron: 0)"
            ),
            "backoff_initial_seconds": Field("float", default=10.0, minimum=1, maximum=86400),
            "backoff_max_seconds": Field("float", default=900.0, minimum=1, maximum=7 * 86400),
            "auth_backoff_seconds": Field("float", default=900.0, minimum=60, maximum=86400),
            "in_use_retry_seconds": Field("float", default=60.0, minimum=1, maximum=86400),
        },
    ),
    "attachments": Field(
        "map",
        default=dict,
        schema={
            "placement": Field("str", default="chunked", choices=("none", "chunked", "offload")),
            "inline_max_bytes": Field("int", default=256 * 1024, minimum=0, maximum=64 * 1024 * 1024),
        },
    ),
    "raw_mail": Field("str", default="none", choices=("none", "include")),
    "oversized": Field("str", default="skip", choices=("skip", "dead_letter", "delete")),
    "auth_mechanisms": Field("list", items="str", check=_check_mechanisms),
    "oauth2_token": Field(
        "map", schema=SECRET_SCHEMA, secret=True, help="{file: PATH} (re-read at each login) or {env: NAME}"
    ),
    "oauth2": Field("map", schema=OAUTH2_SCHEMA, help="grant: client_credentials or jwt_bearer, and its settings"),
    "mime_decoding": Field("bool", default=True, help="false: publish the raw mail with provenance only"),
    "body_part": Field(
        "map",
        schema={
            "index": Field("int", default=0, minimum=0, maximum=10_000, help="0-based, leaf parts in document order"),
            "content_type": Field("str", check=_check_content_type, help="e.g. text/plain"),
            "on_missing": Field("str", default="dead_letter", choices=("dead_letter", "first_text")),
        },
    ),
    "smime": Field(
        "map",
        schema={
            "mode": Field("str", default="decrypt", choices=("decrypt", "passthrough")),
            "keys": Field(
                "list",
                default=list,
                schema={
                    "file": Field("str", required=True, help="PEM (key and certificate) or PKCS#12 (.p12/.pfx)"),
                    "password": Field(
                        "map", schema=SECRET_SCHEMA, secret=True, help="{env: VAR} or {file: /path}; for PKCS#12"
                    ),
                    "label": Field("str", help="name shown in records and logs; default: the file name"),
                },
            ),
            "verify": Field(
                "map",
                help="signature chains: without it signatures are checked for integrity only (verdict unchecked)",
                schema={
                    "trust_store": Field(
                        "list", items="str", required=True, help="PEM (or DER) files of the CAs whose signers you trust"
                    ),
                    "intermediates": Field("list", items="str", default=list, help="extra intermediate CA files"),
                    "allow_sha1": Field("bool", default=False, help="accept SHA-1 digests and certificates (legacy)"),
                },
            ),
            "require_valid_signature": Field(
                "bool", default=False, help="true: unsigned mail or mail without a valid signature is a dead letter"
            ),
        },
    ),
    "decode_limits": Field(
        "map",
        default=dict,
        schema={
            "max_depth": Field("int", default=32, minimum=1, maximum=400),
            "max_parts": Field("int", default=2000, minimum=1, maximum=100_000),
            "max_headers": Field("int", default=1000, minimum=10, maximum=100_000),
            "max_header_bytes": Field("int", default=64 * 1024, minimum=1000),
            "max_decoded_bytes": Field("int", default=512 * 1024 * 1024, minimum=1024),
            "max_decode_seconds": Field("float", default=10.0, minimum=0.1, maximum=3600),
        },
    ),
}

ROOT_SCHEMA: dict[str, Field] = {
    "kafka": Field(
        "map",
        required=True,
        schema={
            "bootstrap_servers": Field("str", required=True),
            "client": Field("map", free_form=True, default=dict, check=_check_client),
            "client_secrets": Field("map", free_form=True, default=dict, secret=True),
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
            "dead_letter": Field("str", check=_check_topic, help="default: '<mail>.dlq'"),
            "attachments": Field("str", check=_check_topic, help="default: '<mail>.attachments'"),
            "chunk_bytes": Field("int", default=512 * 1024, minimum=64 * 1024, maximum=16 * 1024 * 1024),
        },
    ),
    "offload": Field(
        "map",
        schema={
            "kind": Field("str", required=True, choices=("filesystem", "s3")),
            "directory": Field("str", help="filesystem: where sha256/<hex> objects go"),
            "bucket": Field("str", help="s3: the bucket"),
            "prefix": Field("str", default="", help="s3: key prefix, e.g. 'pop3-kafka/'"),
            "endpoint_url": Field("str", help="s3-compatible server; default: AWS"),
            "region": Field("str"),
            "access_key_id_file": Field("str", help="default: boto3's credential chain (env, IRSA, profile)"),
            "secret_access_key_file": Field("str"),
            "server_side_encryption": Field("str", choices=("AES256", "aws:kms")),
            "sse_kms_key_id": Field("str"),
            "part_bytes": Field(
                "int",
                default=8 * 1024 * 1024,
                minimum=5 * 1024 * 1024,
                maximum=64 * 1024 * 1024,
                help="S3 multipart part size; one part is held in memory per upload",
            ),
            "ca_bundle": Field("str"),
            "timeout_seconds": Field("float", default=30.0, minimum=1, maximum=600),
        },
    ),
    "record": Field(
        "map",
        default=dict,
        schema={
            "key": Field("str", default="mailbox", choices=("mailbox", "record_id")),
            "framing": Field(
                "str",
                default="single_object",
                choices=("single_object", "schema_registry"),
                help="schema_registry needs a schema_registry: section",
            ),
        },
    ),
    "schema_registry": Field(
        "map",
        schema={
            "url": Field(
                "str",
                required=True,
                check=_check_registry_url,
                help="Confluent-compatible base URL, e.g. http://registry:8080/apis/ccompat/v7 for Apicurio",
            ),
            "subject_naming": Field("str", default="topic", choices=("topic", "record", "topic_record")),
            "auto_register": Field("bool", default=False, help="true: register missing schemas at start"),
            "compatibility": Field(
                "str",
                default="FULL_TRANSITIVE",
                choices=COMPATIBILITY_LEVELS,
                help="set on each subject by `pop3-kafka schemas register`",
            ),
            "basic_auth": Field(
                "map", schema=SECRET_SCHEMA, secret=True, help="{env: VAR} or {file: /path} holding 'user:password'"
            ),
            "ca_file": Field("str", help="PEM bundle for an https:// registry; default: the system trust store"),
            "timeout_seconds": Field("float", default=10.0, minimum=1, maximum=300),
        },
    ),
    "delivery": Field(
        "map",
        default=dict,
        schema={
            "mode": Field("str", default="exactly_once", choices=("exactly_once", "at_least_once")),
            "transactional_id_prefix": Field("str", default="pop3-kafka", check=_check_topic),
            "transaction_timeout_seconds": Field("float", default=120.0, minimum=10, maximum=900),
        },
    ),
    "ledger": Field(
        "map",
        default=dict,
        schema={
            "topic": Field("str", default="pop3-kafka.ledger", check=_check_topic),
            "shards": Field("int", minimum=1, maximum=10_000),
            "create": Field("bool", default=True),
        },
    ),
    "admin": Field(
        "map",
        schema={
            "bind": Field("str", default="127.0.0.1:9108", help="host:port the admin endpoint listens on"),
            "token": Field(
                "map", schema=SECRET_SCHEMA, secret=True, help="{env: VAR} or {file: /path}: bearer token required"
            ),
        },
    ),
    "runtime": Field(
        "map",
        default=dict,
        schema={
            "max_concurrent_sessions": Field("int", default=8, minimum=1, maximum=1024),
            "max_sessions_per_server": Field(
                "int", default=4, minimum=1, maximum=1024, help="sessions open at once to one host:port"
            ),
            "ownership": Field("str", default="all", choices=("all", "group"), help="group: replicas share shards"),
            "instance_id": Field("str", help="static group membership id; default $POD_NAME"),
            "group_session_timeout_seconds": Field("float", default=45.0, minimum=6, maximum=1800),
            "shutdown_grace_seconds": Field("float", default=30.0, minimum=0, maximum=3600),
            "spool_threshold_bytes": Field("int", default=4 * 1024 * 1024, minimum=0),
            "spool_directory": Field("str", help="a writable directory (an emptyDir in Kubernetes)"),
            "decode_processes": Field(
                "int",
                minimum=0,
                maximum=64,
                help="worker processes decoding mail beside retrieval; default: usable CPUs - 1 (at most 4); 0: none",
            ),
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
    return Secret(value.rstrip("\r\n"), f"file:{p}", p)


def _client_secrets(raw: Mapping[str, Any], base: Path, environ: Mapping[str, str]) -> dict[str, Secret]:
    out: dict[str, Secret] = {}
    for key, spec in raw.items():
        path = f"kafka.client_secrets.{key}"
        if not isinstance(spec, dict):
            raise ConfigError(
                f"{path}: expected {{env: NAME}} or {{file: PATH}}, got {type(spec).__name__} (value hidden)"
            )
        checked = validate(spec, SECRET_SCHEMA, path)
        if key in _MANAGED_CLIENT_KEYS:
            raise ConfigError(f"{path}: set by the connector; remove it")
        out[key] = _resolve_secret(checked, path, base, environ)
    return out


def _mailbox_password(m: dict[str, Any], path: str, base: Path, environ: Mapping[str, str]) -> Secret:
    if m["password"] is not None:
        return _resolve_secret(m["password"], f"{path}.password", base, environ)
    if m["oauth2_token"] is None and m["oauth2"] is None:
        raise ConfigError(
            f"{path}.password: required key is missing ({{env: VAR}} or {{file: /path}}; "
            "or give oauth2 or oauth2_token for XOAUTH2/OAUTHBEARER)"
        )
    return Secret("", "none")


#: one source per distinct oauth2 setting, so mailboxes of one app registration share a token.
_SourceKey = tuple[object, ...]


def _oauth2_source(
    m: dict[str, Any],
    path: str,
    base: Path,
    environ: Mapping[str, str],
    shared: dict[_SourceKey, TokenSource],
) -> TokenSource | None:
    """Build the mailbox's ``oauth2`` token source (None without one), checking the keys
    its grant needs and the ones it must not be given."""
    mechs = {x.upper() for x in m["auth_mechanisms"] or ()}
    if m["oauth2"] is None:
        if mechs and mechs <= _TOKEN_MECHANISMS and m["oauth2_token"] is None:
            raise ConfigError(
                f"{path}.auth_mechanisms: {', '.join(sorted(mechs))} need an OAuth2 token; add oauth2 "
                "(the connector fetches tokens) or oauth2_token (a token you provide)"
            )
        return None
    if m["oauth2_token"] is not None:
        raise ConfigError(
            f"{path}.oauth2: give either oauth2 (the connector fetches tokens) or oauth2_token "
            "(a token you provide), not both"
        )
    o, where = m["oauth2"], f"{path}.oauth2"
    grant = o["grant"]
    for name, what in _OAUTH2_REQUIRED[grant].items():
        if o[name] is None:
            raise ConfigError(f"{where}.{name}: required with grant: {grant} ({what})")
    for name, only in _OAUTH2_ONLY_FOR.items():
        if o[name] is not None and only != grant:
            raise ConfigError(f"{where}.{name}: only for grant: {only}; remove it (grant is {grant})")
    ca_file = _existing_file(o["ca_file"], "ca_file", where, base) if o["ca_file"] is not None else None
    timeout = o["timeout_seconds"]
    if grant == "client_credentials":
        secret = _resolve_secret(o["client_secret"], f"{where}.client_secret", base, environ)
        key: _SourceKey = (grant, o["token_url"], o["client_id"], secret.source, o["scope"], ca_file, timeout)
        if key not in shared:
            shared[key] = ClientCredentialsSource(
                o["token_url"], o["client_id"], secret, o["scope"], timeout=timeout, ca_file=ca_file
            )
        return shared[key]
    key_file = Path(o["service_account_file"])
    key_file = key_file if key_file.is_absolute() else base / key_file
    subject = o["subject"] or m["username"]
    key = (grant, str(key_file), subject, o["scope"], o["token_url"], ca_file, timeout)
    if key not in shared:
        try:
            shared[key] = JwtBearerSource(
                key_file, subject, o["scope"], o["token_url"], timeout=timeout, ca_file=ca_file
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}.service_account_file: {exc}") from None
    return shared[key]


def _runtime(r: dict[str, Any], base: Path, environ: Mapping[str, str] | None = None) -> RuntimeConfig:
    if r.get("instance_id") is None and environ is not None and environ.get("POD_NAME"):
        # A StatefulSet pod's stable name: static membership survives its restarts.
        r = {**r, "instance_id": environ["POD_NAME"]}
    spool = r.get("spool_directory")
    if spool is not None:
        p = Path(spool) if Path(spool).is_absolute() else base / spool
        if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(
                f"runtime.spool_directory: {str(p)!r} is not a writable directory; create it (an emptyDir "
                "volume in Kubernetes) or remove the key to use the system temp directory"
            )
        r = {**r, "spool_directory": str(p)}
    return RuntimeConfig(**r)


def _decode_options(
    m: dict[str, Any], path: str, base: Path, environ: Mapping[str, str], spool_directory: str | None = None
) -> DecodeOptions:
    body = m["body_part"]
    smime = m["smime"] or {"mode": "decrypt", "keys": [], "verify": None, "require_valid_signature": False}
    keys = None
    if smime["keys"]:
        if smime["mode"] == "passthrough":
            raise ConfigError(f"{path}.smime.keys: passthrough never decrypts; remove the keys or use mode: decrypt")
        from connector.decoding.smime import load_keys  # noqa: PLC0415 - asn1crypto only when keys are set

        specs = []
        for i, k in enumerate(smime["keys"]):
            kpath = f"{path}.smime.keys[{i}]"
            file = _existing_file(k["file"], "file", kpath, base)
            password = _resolve_secret(k["password"], f"{kpath}.password", base, environ) if k["password"] else None
            specs.append((file, password.reveal() if password else None, k["label"] or Path(file).name))
        keys = load_keys(specs)
    trust = None
    if smime.get("verify"):
        verify = smime["verify"]
        if smime["mode"] == "passthrough":
            raise ConfigError(
                f"{path}.smime.verify: passthrough publishes encrypted mail unopened, so signatures inside "
                "cannot be checked; remove verify or use mode: decrypt"
            )
        from connector.decoding.signature import load_trust_store  # noqa: PLC0415 - only when configured

        roots = [
            _existing_file(f, f"trust_store[{i}]", f"{path}.smime.verify", base)
            for i, f in enumerate(verify["trust_store"])
        ]
        extra = [
            _existing_file(f, f"intermediates[{i}]", f"{path}.smime.verify", base)
            for i, f in enumerate(verify["intermediates"])
        ]
        if not roots:
            raise ConfigError(f"{path}.smime.verify.trust_store: empty; list the PEM files of the CAs you trust")
        try:
            trust = load_trust_store(roots, extra, allow_sha1=verify["allow_sha1"])
        except ConfigError as exc:
            raise ConfigError(f"{path}.smime.verify: {exc}") from None
    require = bool(smime.get("require_valid_signature"))
    if require and trust is None and smime["mode"] != "passthrough" and m["mime_decoding"]:
        raise ConfigError(
            f"{path}.smime.require_valid_signature: needs smime.verify.trust_store (without it no signature "
            "can be valid, so every mail would be a dead letter); add the CAs you trust"
        )
    if require and (smime["mode"] == "passthrough" or not m["mime_decoding"]):
        raise ConfigError(
            f"{path}.smime.require_valid_signature: needs the mail decoded (mime_decoding: true, smime.mode: "
            "decrypt) to find and check signatures; remove it or enable decoding"
        )
    return DecodeOptions(
        limits=DecodeLimits(**m["decode_limits"]),
        body_part=(
            BodySelection(index=body["index"], content_type=body["content_type"], on_missing=body["on_missing"])
            if body
            else None
        ),
        mime_decoding=m["mime_decoding"],
        smime=smime["mode"],
        keys=keys,
        trust=trust,
        require_valid_signature=require,
        stream_above=STREAM_ABOVE,
        spool_directory=spool_directory,
    )


def _existing_file(value: str, key: str, path: str, base: Path) -> str:
    p = Path(value) if Path(value).is_absolute() else base / value
    if not p.is_file():
        raise ConfigError(f"{path}.{key}: {str(p)!r} does not exist or is not a file")
    return str(p)


_TLS_ONLY_KEYS = (
    "tls_min_version",
    "tls_fingerprint_sha256",
    "tls_client_cert",
    "tls_client_key",
    "tls_client_key_password",
    "tls_server_name",
)


class _TlsOptions(TypedDict):
    tls_min_version: TlsVersion
    tls_fingerprint_sha256: str | None
    tls_client_cert: str | None
    tls_client_key: str | None
    tls_client_key_password: Secret | None
    tls_server_name: str | None
    tls_legacy: bool


def _tls_options(m: dict[str, Any], path: str, base: Path, environ: Mapping[str, str]) -> _TlsOptions:
    """The tls_* keys beyond tls/tls_ca_file/tls_verify, checked together; MailboxConfig kwargs."""
    if m["tls"] == "none":
        for key in (*_TLS_ONLY_KEYS, "tls_legacy"):
            if m[key]:
                raise ConfigError(
                    f"{path}.{key}: has no effect with tls: none; remove it or use tls: implicit or starttls"
                )
    if m["tls_legacy"] and m["tls_min_version"] == "TLSv1.3":
        raise ConfigError(
            f"{path}.tls_legacy: contradicts tls_min_version: TLSv1.3 (legacy servers need TLS 1.0-1.2); "
            "drop one of them"
        )
    if m["tls_client_cert"] is None:
        for key in ("tls_client_key", "tls_client_key_password"):
            if m[key] is not None:
                raise ConfigError(f"{path}.{key}: needs tls_client_cert (the client certificate, PEM)")
    fingerprint = m["tls_fingerprint_sha256"]
    return {
        "tls_min_version": m["tls_min_version"] or ("TLSv1" if m["tls_legacy"] else "TLSv1.2"),
        "tls_fingerprint_sha256": (
            bytes.fromhex(fingerprint.strip().replace(":", "")).hex(":").upper() if fingerprint else None
        ),
        "tls_client_cert": (
            _existing_file(m["tls_client_cert"], "tls_client_cert", path, base) if m["tls_client_cert"] else None
        ),
        "tls_client_key": (
            _existing_file(m["tls_client_key"], "tls_client_key", path, base) if m["tls_client_key"] else None
        ),
        "tls_client_key_password": (
            _resolve_secret(m["tls_client_key_password"], f"{path}.tls_client_key_password", base, environ)
            if m["tls_client_key_password"] is not None
            else None
        ),
        "tls_server_name": m["tls_server_name"],
        "tls_legacy": m["tls_legacy"],
    }


def _check_delivery_options(m: dict[str, Any], path: str, delivery: DeliveryConfig) -> None:
    """Cross-key rules: what needs the ledger, and cycles that fit inside a transaction."""
    if delivery.mode == "at_least_once":
        if not m["delete"]:
            raise ConfigError(
                f"{path}.delete: keep mode needs the UIDL ledger, which needs delivery.mode: exactly_once"
            )
        if m["start_from"] != "all":
            raise ConfigError(f"{path}.start_from: 'now' needs the UIDL ledger (delivery.mode: exactly_once)")
    # A cycle must end well inside transaction.timeout.ms, or the broker aborts it under us.
    limit = delivery.transaction_timeout_seconds / 2
    if m["max_seconds_per_cycle"] > limit:
        raise ConfigError(
            f"{path}.max_seconds_per_cycle: {m['max_seconds_per_cycle']:g} is more than half of "
            f"delivery.transaction_timeout_seconds ({delivery.transaction_timeout_seconds:g}); lower it or raise the "
            "transaction timeout"
        )
    # The cycle checks its deadline between mails, so one mail's decode time can come on top.
    decode_s = (m["decode_limits"] or {}).get("max_decode_seconds", 10.0)
    if m["max_seconds_per_cycle"] + decode_s > delivery.transaction_timeout_seconds * 0.75:
        raise ConfigError(
            f"{path}.decode_limits.max_decode_seconds: {decode_s:g} plus max_seconds_per_cycle "
            f"({m['max_seconds_per_cycle']:g}) is more than 3/4 of delivery.transaction_timeout_seconds "
            f"({delivery.transaction_timeout_seconds:g}); lower them or raise the transaction timeout"
        )


def _topics(t: dict[str, Any], ledger: LedgerConfig, delivery: DeliveryConfig) -> TopicsConfig:
    """topics.*, with the dead-letter topic's default and the clashes that would mix records."""
    topics = TopicsConfig(**{**t, "dead_letter": t["dead_letter"] or "", "attachments": t["attachments"] or ""})
    dlq = topics.dead_letter
    if t["dead_letter"] is None and not TOPIC_RE.match(dlq):
        raise ConfigError(
            f"topics.dead_letter: the default {dlq!r} (topics.mail + {DEAD_LETTER_SUFFIX!r}) is longer than Kafka's "
            "249 characters; set topics.dead_letter"
        )
    if dlq == topics.mail:
        raise ConfigError(
            f"topics.dead_letter: {dlq!r} is also topics.mail; dead letters need their own topic (default: "
            f"'<mail>{DEAD_LETTER_SUFFIX}')"
        )
    if delivery.mode == "exactly_once" and dlq == ledger.topic:
        raise ConfigError(f"topics.dead_letter: {dlq!r} is also ledger.topic; give it a topic of its own")
    att = topics.attachments
    if t["attachments"] is None and not TOPIC_RE.match(att):
        raise ConfigError(
            f"topics.attachments: the default {att!r} (topics.mail + {ATTACHMENTS_SUFFIX!r}) is longer than Kafka's "
            "249 characters; set topics.attachments"
        )
    if att in (topics.mail, dlq, ledger.topic):
        raise ConfigError(
            f"topics.attachments: {att!r} is also the mail, dead-letter or ledger topic; chunk records need a topic "
            f"of their own (default: '<mail>{ATTACHMENTS_SUFFIX}')"
        )
    return topics


def k_client_value(client: Mapping[str, Any], key: str, default: int) -> Any:
    """A librdkafka setting from kafka.client, or librdkafka's default."""
    value = client.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"kafka.client.{key}: {value!r} is not a number") from None


def _admin(a: dict[str, Any] | None, base: Path, environ: Mapping[str, str]) -> AdminConfig | None:
    if a is None:
        return None
    host, sep, port = a["bind"].rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"admin.bind: {a['bind']!r} is not host:port (e.g. 127.0.0.1:9108, 0.0.0.0:9108)")
    token = _resolve_secret(a["token"], "admin.token", base, environ) if a["token"] else None
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if token is None and not loopback:
        raise ConfigError(
            f"admin.bind: {a['bind']!r} is reachable from other hosts; set admin.token (pause, resume and poll "
            "must not be open to the network), or bind to 127.0.0.1"
        )
    if token is not None and len(token.reveal()) < 16:
        raise ConfigError("admin.token: at least 16 characters (it is the only thing between the network and pause)")
    return AdminConfig(host=host, port=int(port), token=token)


def _schedule(m: dict[str, Any], path: str) -> ScheduleSpec:
    s = m["schedule"]
    if s["cron"] is not None and s["interval_seconds"] is not None:
        raise ConfigError(f"{path}.schedule: give interval_seconds or cron, not both")
    interval = s["interval_seconds"] if s["interval_seconds"] is not None else m["poll_interval_seconds"]
    if s["backoff_max_seconds"] < s["backoff_initial_seconds"]:
        raise ConfigError(f"{path}.schedule.backoff_max_seconds: below backoff_initial_seconds")
    jitter = s["jitter_seconds"]
    if jitter is None:
        # Default spread: the whole interval (at most 5 min), so many mailboxes on one interval
        # poll evenly over it (bench/results/many_mailboxes.md: a 6 s spread made 500 mailboxes
        # queue behind their shards' rounds). Cron schedules run on the minute asked.
        jitter = 0.0 if s["cron"] is not None else min(300.0, interval)
    return ScheduleSpec(
        interval_seconds=interval,
        cron=s["cron"],
        timezone=s["timezone"],
        jitter_seconds=jitter,
        backoff_initial_seconds=s["backoff_initial_seconds"],
        backoff_max_seconds=s["backoff_max_seconds"],
        auth_backoff_seconds=s["auth_backoff_seconds"],
        in_use_retry_seconds=s["in_use_retry_seconds"],
    )


def _offload(o: dict[str, Any] | None, base: Path) -> OffloadSettings | None:
    """offload: the claim-check store; paths resolved against the config file's directory."""
    if o is None:
        return None
    if o["kind"] == "filesystem":
        if not o["directory"]:
            raise ConfigError("offload.directory: required with kind: filesystem")
        d = Path(o["directory"]) if Path(o["directory"]).is_absolute() else base / o["directory"]
        if not d.is_dir() or not os.access(d, os.W_OK | os.X_OK):
            raise ConfigError(f"offload.directory: {str(d)!r} is not a writable directory; create it or fix the path")
        o = {**o, "directory": str(d)}
    else:
        if not o["bucket"]:
            raise ConfigError("offload.bucket: required with kind: s3")
        if (o["access_key_id_file"] is None) != (o["secret_access_key_file"] is None):
            raise ConfigError(
                "offload: give both access_key_id_file and secret_access_key_file, or neither (boto3's chain)"
            )
        for key in ("access_key_id_file", "secret_access_key_file", "ca_bundle"):
            if o[key] is not None:
                o = {**o, key: _existing_file(o[key], key, "offload", base)}
        if o["sse_kms_key_id"] is not None and o["server_side_encryption"] != "aws:kms":
            raise ConfigError("offload.sse_kms_key_id: only with server_side_encryption: aws:kms")
    return OffloadSettings(**o)


def _schema_registry(
    r: dict[str, Any] | None, framing: str, base: Path, environ: Mapping[str, str]
) -> SchemaRegistryConfig | None:
    """schema_registry:, and the framing that needs it. The section without the framing is
    allowed: `pop3-kafka schemas register` runs before a switch of framing."""
    if r is None:
        if framing == "schema_registry":
            raise ConfigError(
                "record.framing: 'schema_registry' needs a schema_registry: section with at least url (the "
                "registry's Confluent-compatible base URL, e.g. http://registry:8081 or, for Apicurio, "
                "http://registry:8080/apis/ccompat/v7); or use framing: single_object"
            )
        return None
    auth = _resolve_secret(r["basic_auth"], "schema_registry.basic_auth", base, environ) if r["basic_auth"] else None
    if auth is not None and ":" not in auth.reveal():
        raise ConfigError(f"schema_registry.basic_auth: the secret ({auth.source}) must be 'user:password'")
    ca_file = _existing_file(r["ca_file"], "ca_file", "schema_registry", base) if r["ca_file"] else None
    return SchemaRegistryConfig(
        url=r["url"].rstrip("/"),
        subject_naming=r["subject_naming"],
        auto_register=r["auto_register"],
        compatibility=r["compatibility"],
        basic_auth=auth,
        ca_file=ca_file,
        timeout_seconds=r["timeout_seconds"],
    )


def _check_placement(m: MailboxConfig, path: str, offload: OffloadSettings | None) -> None:
    if m.attachments.placement == "offload" and offload is None:
        raise ConfigError(
            f"{path}.attachments.placement: 'offload' needs an offload: section (a directory or an S3 bucket)"
        )
    if m.oversized == "dead_letter" and m.attachments.placement == "none":
        raise ConfigError(
            f"{path}.oversized: 'dead_letter' carries the raw mail as chunks or an offloaded object; set "
            "attachments.placement to chunked or offload"
        )


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
    token_sources: dict[_SourceKey, TokenSource] = {}
    delivery = DeliveryConfig(**v["delivery"])
    if (
        delivery.mode == "exactly_once"
        and v["kafka"]["delivery_timeout_seconds"] > delivery.transaction_timeout_seconds
    ):
        # librdkafka refuses message.timeout.ms > transaction.timeout.ms for a transactional producer.
        raise ConfigError(
            f"kafka.delivery_timeout_seconds: {v['kafka']['delivery_timeout_seconds']:g} is longer than "
            f"delivery.transaction_timeout_seconds ({delivery.transaction_timeout_seconds:g}); lower it or raise "
            "the transaction timeout"
        )
    runtime = _runtime(v["runtime"], base, env)
    if runtime.ownership == "group" and delivery.mode != "exactly_once":
        raise ConfigError(
            "runtime.ownership: 'group' shares the ledger's shards between replicas; it needs delivery.mode: "
            "exactly_once (at-least-once replicas would poll the same mailboxes)"
        )
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
            m["tls_ca_file"] = _existing_file(m["tls_ca_file"], "tls_ca_file", path, base)
        tls_options = _tls_options(m, path, base, env)
        _check_delivery_options(m, path, delivery)
        oauth2 = _oauth2_source(m, path, base, env, token_sources)
        mailboxes.append(
            MailboxConfig(
                id=m["id"],
                host=m["host"],
                port=port,
                tls=m["tls"],
                username=m["username"],
                password=_mailbox_password(m, path, base, env),
                auth_mechanisms=tuple(x.upper() for x in m["auth_mechanisms"]) if m["auth_mechanisms"] else None,
                oauth2_token=(
                    _resolve_secret(m["oauth2_token"], f"{path}.oauth2_token", base, env) if m["oauth2_token"] else None
                ),
                oauth2=oauth2,
                tls_ca_file=m["tls_ca_file"],
                tls_verify=m["tls_verify"],
                **tls_options,
                allow_plaintext_auth=m["allow_plaintext_auth"],
                poll_interval_seconds=m["poll_interval_seconds"],
                timeout_seconds=m["timeout_seconds"],
                max_messages_per_cycle=m["max_messages_per_cycle"],
                max_bytes_per_cycle=m["max_bytes_per_cycle"],
                max_message_bytes=m["max_message_bytes"],
                max_line_bytes=m["max_line_bytes"],
                max_seconds_per_cycle=m["max_seconds_per_cycle"],
                delete=m["delete"],
                delete_after_days=m["delete_after_days"],
                start_from=m["start_from"],
                on_uidl_reset=m["on_uidl_reset"],
                absent_grace_days=m["absent_grace_days"],
                abort_with=m["abort_with"],
                identity=m["identity"],
                on_undecodable=m["on_undecodable"],
                decode=_decode_options(m, path, base, env, runtime.spool_directory),
                attachments=AttachmentsConfig(**m["attachments"]),
                schedule=_schedule(m, path),
                raw_mail=m["raw_mail"],
                oversized=m["oversized"],
            )
        )
    k = v["kafka"]
    ledger = LedgerConfig(**v["ledger"])
    topics = _topics(v["topics"], ledger, delivery)
    offload = _offload(v["offload"], base)
    # The producer refuses a record over its message.max.bytes before it reaches the broker.
    producer_max = int(k_client_value(v["kafka"]["client"], "message.max.bytes", 1_000_000))
    for i, m in enumerate(v["mailboxes"]):
        inline = m["attachments"]["inline_max_bytes"]
        if m["attachments"]["placement"] != "none" and inline > producer_max - INLINE_HEADROOM:
            raise ConfigError(
                f"mailboxes[{i}].attachments.inline_max_bytes: {inline} leaves no room in a record under the "
                f"producer's message.max.bytes ({producer_max}, kafka.client) for bodies and headers; keep it "
                f"below {producer_max - INLINE_HEADROOM} (content above it goes by reference anyway)"
            )
    if any(m["attachments"]["placement"] == "chunked" for m in v["mailboxes"]) and (
        producer_max < topics.chunk_bytes + CHUNK_RECORD_OVERHEAD
    ):
        raise ConfigError(
            f"topics.chunk_bytes: {topics.chunk_bytes} plus a chunk record's framing ({CHUNK_RECORD_OVERHEAD}) "
            f"exceeds the producer's message.max.bytes ({producer_max}, kafka.client); lower chunk_bytes or raise "
            "message.max.bytes"
        )
    for i, mb in enumerate(mailboxes):
        _check_placement(mb, f"mailboxes[{i}]", offload)
    return Config(
        kafka=KafkaConfig(
            bootstrap_servers=k["bootstrap_servers"],
            client=k["client"],
            delivery_timeout_seconds=k["delivery_timeout_seconds"],
            client_secrets=_client_secrets(k["client_secrets"], base, env),
        ),
        topics=topics,
        record=RecordConfig(key=v["record"]["key"], framing=v["record"]["framing"]),
        runtime=runtime,
        mailboxes=tuple(mailboxes),
        delivery=delivery,
        ledger=ledger,
        source=source,
        offload=offload,
        admin=_admin(v["admin"], base, env),
        schema_registry=_schema_registry(v["schema_registry"], v["record"]["framing"], base, env),
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
