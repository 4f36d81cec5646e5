"""Configuration: YAML in, validated typed dataclasses out (see docs/configuration.md)."""

from connector.config.model import (
    Config,
    DeliveryConfig,
    KafkaConfig,
    LedgerConfig,
    MailboxConfig,
    RecordConfig,
    RuntimeConfig,
    Secret,
    TopicsConfig,
    load_config,
    parse_config,
)

__all__ = [
    "Config",
    "DeliveryConfig",
    "KafkaConfig",
    "LedgerConfig",
    "MailboxConfig",
    "RecordConfig",
    "RuntimeConfig",
    "Secret",
    "TopicsConfig",
    "load_config",
    "parse_config",
]
