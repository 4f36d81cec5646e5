"""Records: the Avro contract with downstream consumers (schemas/) and its wire framing."""

from connector.records.avro import (
    HEADER_MAILBOX,
    HEADER_RECORD_ID,
    Provenance,
    Schema,
    UnknownSchemaError,
    build_mail_record,
    decode_single_object,
    encode_passthrough,
    encode_single_object,
    mail_schema,
    record_id,
)

__all__ = [
    "HEADER_MAILBOX",
    "HEADER_RECORD_ID",
    "Provenance",
    "Schema",
    "UnknownSchemaError",
    "build_mail_record",
    "decode_single_object",
    "encode_passthrough",
    "encode_single_object",
    "mail_schema",
    "record_id",
]
