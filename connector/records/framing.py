"""Wire framing of the records consumers read (``record.framing``; docs/record.md, "Framing").

* ``single_object`` (the default): ``C3 01`` | 8-byte CRC-64-AVRO fingerprint | Avro body
  (connector/records/avro.py). A consumer needs only the schema files.
* ``schema_registry``: ``00`` | 4-byte big-endian schema id | Avro body: the Confluent Schema
  Registry wire format, which Confluent's deserializers (Java and Python),
  ``connector.consumer.decode_value(registry=...)`` and anything that follows that format read.

The body is the same Avro binary in both (one encoding path, ``avro.encode_with_header``). A
registry :class:`Framer` holds schema ids resolved once when the process starts
(connector/delivery/registry.py): encoding a record never calls the registry, so a registry
outage cannot fail a cycle mid-transaction. Mail records, dead letters and chunk records go
through a framer; ledger entries are the connector's internal state and stay single-object.

This module is plain data: no HTTP, no Kafka.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from connector.records.avro import Schema, encode_with_header

#: first byte of the Confluent wire format (then the schema id, big-endian, 4 bytes).
REGISTRY_MAGIC = b"\x00"
#: the wire format's id is a signed 32-bit int; registries hand out positive ones.
MAX_SCHEMA_ID = 2**31 - 1

FramingName = Literal["single_object", "schema_registry"]


def registry_header(schema_id: int) -> bytes:
    """``00`` + the schema id, big-endian."""
    if not 0 <= schema_id <= MAX_SCHEMA_ID:
        raise ValueError(f"schema id {schema_id} does not fit the registry wire format (0..{MAX_SCHEMA_ID})")
    return REGISTRY_MAGIC + schema_id.to_bytes(4, "big")


@dataclass(frozen=True)
class Framer:
    """Frames records per ``record.framing``. ``ids``: registry framing only, the schema id of
    every schema this framer encodes, keyed by the schema's fingerprint."""

    framing: FramingName = "single_object"
    ids: Mapping[bytes, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.framing == "schema_registry":
            for sid in self.ids.values():
                registry_header(sid)  # out-of-range ids are refused when the framer is built

    def header(self, schema: Schema) -> bytes:
        if self.framing == "single_object":
            return schema.header
        sid = self.ids.get(schema.fingerprint)
        if sid is None:
            # A programming error (the framer was resolved without this schema), never a
            # property of a mail: it must not be mistaken for a decoding failure.
            raise LookupError(
                f"no schema registry id for {schema.name} (fingerprint {schema.fingerprint.hex()}); the framer "
                "was built without it"
            )
        return registry_header(sid)

    def encode(self, schema: Schema, record: dict[str, Any]) -> bytes:
        """``record`` framed; DecodeError when it does not fit ``schema`` (avro.encode_with_header)."""
        return encode_with_header(self.header(schema), schema, record)


#: the default framing, and the ledger's always.
SINGLE_OBJECT = Framer()


def registry_framer(ids: Iterable[tuple[Schema, int]]) -> Framer:
    """A registry framer from (schema, id) pairs."""
    return Framer("schema_registry", {schema.fingerprint: sid for schema, sid in ids})
