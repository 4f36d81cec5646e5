"""Delivery: getting records into Kafka with a confirmed report before anything is deleted."""

from connector.delivery.kafka import Delivery, Publisher, producer_config

__all__ = ["Delivery", "Publisher", "producer_config"]
