"""The ``offload`` settings: where offloaded attachments go (docs/configuration.md, "offload").

Configuration, so it lives with the config layer; the stores themselves are in
connector/delivery/offload.py, which imports these (never the other way round).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from connector.errors import ConfigError

MiB = 1024 * 1024
#: S3's smallest part (all but the last part of a multipart upload must be at least this big).
S3_MIN_PART_BYTES = 5 * MiB
#: S3's largest part.
S3_MAX_PART_BYTES = 5 * 1024 * MiB
SSE_KINDS = ("AES256", "aws:kms")


class OffloadConfigError(ConfigError):
    """The offload settings cannot work: bucket or directory missing, not writable, boto3 not
    installed, a bad part size, unreadable credential files (stop; the message names the fix)."""


@dataclass(frozen=True)
class OffloadSettings:
    """Where offloaded attachments go; built by the config layer from the YAML ``offload`` block.

    Structural mistakes (a bucket-less s3 store, a part size S3 refuses, an unknown encryption)
    raise :class:`OffloadConfigError` at construction; whether the directory or bucket exists is
    checked by ``check()`` and on use.
    """

    kind: Literal["filesystem", "s3"]
    directory: str | None = None
    bucket: str | None = None
    #: S3 key prefix, used verbatim (include the trailing slash: "pop3-kafka/").
    prefix: str = ""
    #: an S3-compatible server; None = AWS.
    endpoint_url: str | None = None
    region: str | None = None
    #: credentials as files (Kubernetes secrets), whitespace stripped; None = boto3's default chain
    #: (environment, web identity/IRSA, instance profile).
    access_key_id_file: str | None = None
    secret_access_key_file: str | None = None
    #: None (the bucket's default), "AES256" or "aws:kms".
    server_side_encryption: str | None = None
    sse_kms_key_id: str | None = None
    #: multipart part size, and the memory one S3 upload holds.
    part_bytes: int = 8 * MiB
    #: CA bundle (PEM) for an endpoint with a private CA.
    ca_bundle: str | None = None
    timeout_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.kind not in ("filesystem", "s3"):
            raise OffloadConfigError(f"offload kind {self.kind!r} is not supported: use 'filesystem' or 's3'")
        if self.kind == "filesystem" and not self.directory:
            raise OffloadConfigError("offload kind 'filesystem' needs a directory (an absolute path on a volume)")
        if self.kind == "s3" and not self.bucket:
            raise OffloadConfigError("offload kind 's3' needs a bucket")
        if self.prefix.startswith("/"):
            raise OffloadConfigError(
                f"offload prefix {self.prefix!r} starts with '/': S3 keys have no leading slash; use e.g. 'pop3-kafka/'"
            )
        if not S3_MIN_PART_BYTES <= self.part_bytes <= S3_MAX_PART_BYTES:
            raise OffloadConfigError(
                f"offload part_bytes={self.part_bytes} is outside what S3 accepts "
                f"({S3_MIN_PART_BYTES} = 5 MiB .. {S3_MAX_PART_BYTES} = 5 GiB); the default is {8 * MiB}"
            )
        if self.server_side_encryption is not None and self.server_side_encryption not in SSE_KINDS:
            raise OffloadConfigError(
                f"offload server_side_encryption={self.server_side_encryption!r} is not supported: "
                "leave it unset (the bucket's default), or use 'AES256' or 'aws:kms'"
            )
        if self.sse_kms_key_id and self.server_side_encryption != "aws:kms":
            raise OffloadConfigError("offload sse_kms_key_id needs server_side_encryption: aws:kms")
        if (self.access_key_id_file is None) != (self.secret_access_key_file is None):
            raise OffloadConfigError(
                "offload access_key_id_file and secret_access_key_file go together: set both, "
                "or neither for boto3's default credential chain"
            )
        if not self.timeout_seconds > 0:
            raise OffloadConfigError(f"offload timeout_seconds={self.timeout_seconds} must be > 0")
