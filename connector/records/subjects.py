"""Schema Registry subjects of our record types, and the schema versions each one holds.

Three subjects, one per record type consumers read (the ledger is internal and has none):

| record type | schema file | topic naming the subject |
| --- | --- | --- |
| mail record | schemas/mail_record.avsc | topics.mail |
| dead letter | schemas/dead_letter.avsc | topics.dead_letter |
| attachment chunk | schemas/attachment_chunk.avsc | topics.attachments |

``schema_registry.subject_naming`` follows Confluent's strategies: ``topic`` (TopicNameStrategy,
``<topic>-value``), ``record`` (RecordNameStrategy, ``<namespace>.<name>``) and ``topic_record``
(TopicRecordNameStrategy, ``<topic>-<namespace>.<name>``).

Chunk records of a large dead letter's raw mail travel on the dead-letter topic, yet carry the
chunk subject's schema id: a subject holds one record type (any compatibility level other than
NONE refuses a second type under ``<dead-letter topic>-value``), and a schema id is global, so a
consumer resolves it whatever topic the record came from.

A subject's versions are the files ``schemas/history/<stem>.v<N>.avsc`` in version order, then
the current ``schemas/<stem>.avsc``: whatever files exist, so a new version needs no code change.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Literal

from connector.config.model import Config, SubjectNaming
from connector.records.avro import MAIL_SCHEMA_FILE, Schema, _schema_dir, load_schema
from connector.records.content import ATTACHMENT_CHUNK_SCHEMA_FILE
from connector.records.dead_letter import DEAD_LETTER_SCHEMA_FILE

Role = Literal["mail", "dead_letter", "chunk"]
ROLES: tuple[Role, ...] = ("mail", "dead_letter", "chunk")
SCHEMA_FILES: dict[Role, str] = {
    "mail": MAIL_SCHEMA_FILE,
    "dead_letter": DEAD_LETTER_SCHEMA_FILE,
    "chunk": ATTACHMENT_CHUNK_SCHEMA_FILE,
}


def subject_name(naming: SubjectNaming, topic: str, record_name: str) -> str:
    """The subject of ``record_name`` (full Avro name) on ``topic`` under ``naming``."""
    if naming == "topic":
        return f"{topic}-value"
    if naming == "record":
        return record_name
    if naming == "topic_record":
        return f"{topic}-{record_name}"
    raise ValueError(f"unknown subject naming {naming!r}")


@dataclass(frozen=True)
class SchemaVersion:
    """One version of one of our schemas, as registered."""

    version: int
    #: path below schemas/, e.g. ``history/mail_record.v1.avsc`` or ``mail_record.avsc``.
    file: str
    schema: Schema
    #: the schema text sent to the registry: the file's JSON without its whitespace, so the same
    #: file always registers as the same text (a registry compares texts to find a version).
    text: str


@dataclass(frozen=True)
class SubjectPlan:
    """One subject: its record type, the topic that names it, and its versions in order."""

    role: Role
    topic: str
    subject: str
    #: history, oldest first, then the current schema (the last one).
    versions: tuple[SchemaVersion, ...]

    @property
    def current(self) -> SchemaVersion:
        return self.versions[-1]


def registry_text(file: str) -> str:
    """The text registered for ``file`` (below schemas/): compact JSON, keys in file order."""
    raw = json.loads((_schema_dir() / file).read_text(encoding="utf-8"))
    return json.dumps(raw, separators=(",", ":"), ensure_ascii=False)


@cache
def schema_versions(current_file: str) -> tuple[SchemaVersion, ...]:
    """Every version of the schema whose current file is ``current_file``: the history files
    (``<stem>.v<N>.avsc``) in version order, then the current file, numbered one past the newest
    history version. A current file with the same JSON as its newest history file (copied there
    while the next version is being written) is that version, not a new one."""
    stem = current_file.removesuffix(".avsc")
    pattern = re.compile(rf"{re.escape(stem)}\.v(\d+)\.avsc")
    found: list[tuple[int, str]] = []
    history = _schema_dir() / "history"
    if history.is_dir():
        for path in history.iterdir():
            m = pattern.fullmatch(path.name)
            if m:
                found.append((int(m[1]), f"history/{path.name}"))
    found.sort()
    numbers = [n for n, _ in found]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"schemas/history/ has two files of one version of {stem}: {[f for _, f in found]}")
    out = [SchemaVersion(n, f, load_schema(f), registry_text(f)) for n, f in found]
    text = registry_text(current_file)
    if not out or out[-1].text != text:
        out.append(SchemaVersion((out[-1].version if out else 0) + 1, current_file, load_schema(current_file), text))
    return tuple(out)


def subject_plan(config: Config) -> list[SubjectPlan]:
    """The three subjects of ``config`` (mail, dead letter, chunk), each with its versions."""
    naming: SubjectNaming = config.schema_registry.subject_naming if config.schema_registry else "topic"
    topics: dict[Role, str] = {
        "mail": config.topics.mail,
        "dead_letter": config.topics.dead_letter,
        "chunk": config.topics.attachments,
    }
    plans = []
    for role in ROLES:
        versions = schema_versions(SCHEMA_FILES[role])
        name = subject_name(naming, topics[role], versions[-1].schema.name)
        plans.append(SubjectPlan(role, topics[role], name, versions))
    return plans
