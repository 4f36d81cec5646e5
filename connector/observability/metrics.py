"""Prometheus metrics (prometheus-client). Only runtime code records them; domain layers never
import this module. The HTTP /metrics endpoint comes with the operations work; the registry is
already what it will serve.

Naming: Prometheus conventions (``_total`` counters, base units); labels are the shard number
and outcome, never an address.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)

TRANSACTIONS = Counter(
    "pop3kafka_transactions",
    "Shard transactions by outcome (committed, aborted).",
    ["shard", "outcome"],
    registry=REGISTRY,
)
FENCING_EVENTS = Counter(
    "pop3kafka_fencing_events",
    "Times a shard's producer was fenced by a newer owner (another process took the shard).",
    ["shard"],
    registry=REGISTRY,
)
PRODUCER_FATAL = Counter(
    "pop3kafka_producer_fatal_errors",
    "Fatal producer errors other than fencing; the shard stops.",
    ["shard"],
    registry=REGISTRY,
)
SHARD_OWNED = Gauge(
    "pop3kafka_shard_owned",
    "1 while this process owns and polls the shard, 0 after it was fenced or failed fatally.",
    ["shard"],
    registry=REGISTRY,
)


def value(name: str, labels: dict[str, str]) -> float:
    """Current value of a sample (tests and diagnostics)."""
    got = REGISTRY.get_sample_value(name, labels)
    return 0.0 if got is None else got
