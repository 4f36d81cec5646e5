"""The Schema Registry, client side: schema ids at start, ``pop3-kafka schemas register``, doctor.

Speaks Confluent's REST API through ``confluent_kafka.schema_registry.SchemaRegistryClient``
(Confluent's registry, or Apicurio's ``/apis/ccompat/v7``). Three uses, none per record:

* :func:`resolve_framer`: when the process starts with ``record.framing: schema_registry``, the
  schema id of each current schema under its subject (connector/records/subjects.py), by
  ``lookup_schema``. A schema not registered there stops the start with a ConfigError naming the
  subject and ``pop3-kafka schemas register`` (``auto_register: false``, the default), or is
  registered now (``auto_register: true``). The ids go into a Framer and nothing calls the
  registry again, so a registry outage later cannot fail a cycle.
* :func:`register_schemas`: per subject, set the compatibility level first (default
  FULL_TRANSITIVE), then register every version in schemas/history/ in order and the current
  one. Idempotent: a version already there is reported, not registered again.
* :func:`check_registry`: doctor's findings (reachable, subjects registered, compatibility).

Errors: unreachable or failing registry -> DeliveryError (exit 1); a missing schema, refused
credentials or an incompatible schema -> ConfigError (exit 2): the fix is the operator's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from connector.config.model import Config, SchemaRegistryConfig
from connector.delivery.doctor import Finding
from connector.errors import ConfigError, DeliveryError
from connector.records.framing import SINGLE_OBJECT, Framer, registry_framer
from connector.records.subjects import SchemaVersion, SubjectPlan, subject_plan

log = logging.getLogger("pop3kafka.registry")

#: the fix named wherever a subject lacks a schema.
REGISTER_COMMAND = "pop3-kafka schemas register --config"


def open_client(settings: SchemaRegistryConfig) -> Any:
    """A SchemaRegistryClient for ``settings`` (``mock://`` gives confluent-kafka's in-process mock)."""
    from confluent_kafka.schema_registry import SchemaRegistryClient  # noqa: PLC0415 - the extra's imports are slow

    conf: dict[str, Any] = {"url": settings.url, "timeout": settings.timeout_seconds}
    if settings.basic_auth is not None:
        conf["basic.auth.user.info"] = settings.basic_auth.reveal()
    if settings.ca_file is not None:
        conf["ssl.ca.location"] = settings.ca_file
    try:
        return SchemaRegistryClient.new_client(conf)
    except OSError as exc:  # the CA bundle is read here (ssl.SSLError is an OSError)
        raise ConfigError(f"schema_registry.ca_file: {settings.ca_file!r} is not a usable PEM bundle: {exc}") from None
    except (ValueError, TypeError) as exc:
        # The message may quote a setting; never the secret (the client does not echo it).
        raise ConfigError(f"schema_registry: the client refused the settings: {exc}") from None


def close_client(client: Any) -> None:
    with contextlib.suppress(Exception):  # closing an HTTP pool must never mask the real outcome
        client.close()


def _avro(version: SchemaVersion) -> Any:
    from confluent_kafka.schema_registry import Schema  # noqa: PLC0415

    return Schema(version.text, "AVRO")


def _is_registry_error(exc: BaseException) -> bool:
    from confluent_kafka.schema_registry.error import SchemaRegistryError  # noqa: PLC0415

    return isinstance(exc, SchemaRegistryError)


def _failure(settings: SchemaRegistryConfig, what: str, exc: Exception) -> DeliveryError | ConfigError:
    """A registry call's exception as ours: refused credentials are the operator's to fix."""
    status = getattr(exc, "http_status_code", None)
    if status in (401, 403):
        return ConfigError(
            f"schema_registry: {what}: the registry at {settings.url} refused the credentials (HTTP {status}); "
            "check schema_registry.basic_auth"
        )
    if _is_registry_error(exc):
        return DeliveryError(f"schema registry {settings.url}: {what} failed: {exc}")
    return DeliveryError(f"schema registry {settings.url} not reachable ({what}): {type(exc).__name__}: {exc}")


def _lookup(client: Any, settings: SchemaRegistryConfig, subject: str, version: SchemaVersion) -> Any | None:
    """The RegisteredSchema of ``version`` under ``subject``, or None when it is not there."""
    try:
        return client.lookup_schema(subject, _avro(version))
    except Exception as exc:  # SchemaRegistryError, or the HTTP client's transport errors
        if getattr(exc, "http_status_code", None) == 404:  # 40401 no such subject, 40403 not in it
            return None
        raise _failure(settings, f"looking up {version.file} under subject {subject!r}", exc) from exc


def _register(client: Any, settings: SchemaRegistryConfig, subject: str, version: SchemaVersion) -> int:
    try:
        return int(client.register_schema(subject, _avro(version)))
    except Exception as exc:
        if getattr(exc, "http_status_code", None) in (409, 422):
            # 409: incompatible with the subject's level; 422: invalid schema. Either way the
            # registry's message says which field.
            raise ConfigError(
                f"schema_registry: the registry refused {version.file} (version {version.version}) under subject "
                f"{subject!r}: {getattr(exc, 'error_message', exc)}"
            ) from exc
        raise _failure(settings, f"registering {version.file} under subject {subject!r}", exc) from exc


# ------------------------------------------------------------------------------- at start


def resolve_framer(config: Config, client: Any | None = None) -> Framer:
    """The framer of ``record.framing``: single-object, or registry framing with the ids of the
    current schemas (looked up once, registered first with ``auto_register: true``)."""
    if config.record.framing != "schema_registry":
        return SINGLE_OBJECT
    settings = config.schema_registry
    assert settings is not None  # parse_config refuses the framing without the section
    own = client is None
    client = open_client(settings) if client is None else client
    try:
        ids = []
        for plan in subject_plan(config):
            cur = plan.current
            found = _lookup(client, settings, plan.subject, cur)
            if found is not None:
                sid = int(found.schema_id)
            elif settings.auto_register:
                sid = _register(client, settings, plan.subject, cur)
                log.warning(
                    "schema registry: registered %s (version %d) under subject %s as id %d (auto_register: true)",
                    cur.file,
                    cur.version,
                    plan.subject,
                    sid,
                )
            else:
                raise ConfigError(
                    f"schema_registry: subject {plan.subject!r} does not hold the current {cur.schema.name} schema "
                    f"({cur.file}, version {cur.version}) and auto_register is false: register it with "
                    f"`{REGISTER_COMMAND} {config.source}` (it sets the subject's compatibility and registers "
                    "every version), or set schema_registry.auto_register: true"
                )
            ids.append((cur.schema, sid))
            log.info("schema registry: %s -> subject %s, schema id %d", plan.role, plan.subject, sid)
        return registry_framer(ids)
    finally:
        if own:
            close_client(client)


# ------------------------------------------------------------------------------- register


Outcome = Literal["registered", "already registered", "would register"]


@dataclass(frozen=True)
class Registration:
    """One schema version's fate under one subject."""

    subject: str
    file: str
    #: our version number (history/<stem>.v<N>.avsc, current = newest + 1).
    version: int
    outcome: Outcome
    #: the registry's version number and schema id (None: not registered, dry run).
    registry_version: int | None = None
    schema_id: int | None = None

    def line(self) -> str:
        where = (
            f"version {self.registry_version}, id {self.schema_id}" if self.schema_id is not None else "not registered"
        )
        return f"{self.subject}: {self.file} (v{self.version}): {self.outcome} ({where})"


def register_schemas(
    config: Config,
    *,
    dry_run: bool = False,
    client: Any | None = None,
    report: Callable[[str], None] = lambda _line: None,
) -> list[Registration]:
    """Per subject: set its compatibility (schema_registry.compatibility), then register every
    version of its schema in order (schemas/history/, then the current file). ``dry_run``:
    only look up and report. Each outcome is also passed to ``report`` as a line."""
    settings = config.schema_registry
    if settings is None:
        raise ConfigError(
            "schema_registry: `schemas register` needs a schema_registry: section (url: the registry's "
            "Confluent-compatible base URL)"
        )
    own = client is None
    client = open_client(settings) if client is None else client
    out: list[Registration] = []
    try:
        for plan in subject_plan(config):
            _set_compatibility(client, settings, plan, dry_run, report)
            for version in plan.versions:
                found = _lookup(client, settings, plan.subject, version)
                if found is None and not dry_run:
                    _register(client, settings, plan.subject, version)
                    # The registry's version number comes with the lookup, not the registration.
                    found = _lookup(client, settings, plan.subject, version)
                    outcome: Outcome = "registered"
                else:
                    outcome = "already registered" if found is not None else "would register"
                reg = Registration(
                    plan.subject,
                    version.file,
                    version.version,
                    outcome,
                    registry_version=int(found.version) if found is not None and found.version is not None else None,
                    schema_id=int(found.schema_id) if found is not None else None,
                )
                out.append(reg)
                report(reg.line())
        return out
    finally:
        if own:
            close_client(client)


def _set_compatibility(
    client: Any, settings: SchemaRegistryConfig, plan: SubjectPlan, dry_run: bool, report: Callable[[str], None]
) -> None:
    """Before any registration: a subject's first version is checked against nothing, and every
    later one must meet the level we want, not the registry's default (Apicurio's is NONE)."""
    level = settings.compatibility
    if dry_run:
        now = _compatibility(client, settings, plan.subject)
        report(f"{plan.subject}: compatibility {now[0]}{' (global default)' if now[1] else ''}, would set {level}")
        return
    try:
        client.set_compatibility(plan.subject, level)
    except Exception as exc:
        raise _failure(settings, f"setting compatibility {level} on subject {plan.subject!r}", exc) from exc
    report(f"{plan.subject}: compatibility {level}")


def _compatibility(client: Any, settings: SchemaRegistryConfig, subject: str) -> tuple[str, bool]:
    """(level, from the global default) of ``subject``."""
    try:
        return str(client.get_compatibility(subject)), False
    except Exception as exc:
        if getattr(exc, "http_status_code", None) != 404:  # 40401/40408: no subject-level setting
            raise _failure(settings, f"reading the compatibility of subject {subject!r}", exc) from exc
    try:
        return str(client.get_compatibility()), True
    except Exception as exc:
        raise _failure(settings, "reading the global compatibility", exc) from exc


# ------------------------------------------------------------------------------- doctor


def check_registry(config: Config, client: Any | None = None) -> list[Finding]:
    """Doctor: the registry answers; each subject holds the current schema; its compatibility
    level is the configured one. Read-only."""
    settings = config.schema_registry
    if settings is None:
        return []
    used = config.record.framing == "schema_registry"
    own = client is None
    try:
        client = open_client(settings) if client is None else client
    except ConfigError as exc:
        return [Finding("schema_registry.client", False, str(exc), "fix the schema_registry settings")]
    fix = f"{REGISTER_COMMAND} {config.source}"
    out: list[Finding] = []
    try:
        try:
            subjects = client.get_subjects()
        except Exception as exc:  # noqa: BLE001 - any failure to answer is this finding's FAIL
            err = _failure(settings, "listing subjects", exc)
            out.append(
                Finding(
                    "schema_registry.reachable",
                    False,
                    str(err),
                    "check schema_registry.url (Apicurio: .../apis/ccompat/v7), basic_auth and ca_file",
                )
            )
            return out
        out.append(Finding("schema_registry.reachable", True, f"{settings.url}: {len(subjects)} subject(s)"))
        for plan in subject_plan(config):
            out.append(_subject_finding(client, settings, plan, used, fix))
        return out
    finally:
        if own:
            close_client(client)


def _subject_finding(client: Any, settings: SchemaRegistryConfig, plan: SubjectPlan, used: bool, fix: str) -> Finding:
    name = f"schema_registry.subject[{plan.role}]"
    cur = plan.current
    try:
        found = _lookup(client, settings, plan.subject, cur)
        level, is_global = _compatibility(client, settings, plan.subject)
    except (DeliveryError, ConfigError) as exc:
        return Finding(name, False, str(exc), "check the registry")
    level_text = f"compatibility {level}{' (global default)' if is_global else ''}"
    if found is None:
        detail = f"{plan.subject}: the current {cur.schema.name} ({cur.file}, v{cur.version}) is not registered"
        if used and not settings.auto_register:
            return Finding(name, False, f"{detail}; the connector will not start", fix)
        why = "registered at start (auto_register: true)" if used else "needed before record.framing: schema_registry"
        return Finding(name, True, f"{detail} ({why}); {level_text}", fix, warning=True)
    detail = f"{plan.subject}: {cur.file} (v{cur.version}) is registry version {found.version}, id {found.schema_id}"
    if level != settings.compatibility or is_global:
        return Finding(
            name,
            True,
            f"{detail}; {level_text}, configured {settings.compatibility}",
            f"{fix} (sets the subject's compatibility)",
            warning=True,
        )
    return Finding(name, True, f"{detail}; {level_text}")
