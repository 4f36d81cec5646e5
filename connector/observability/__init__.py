"""Observability: structured logs now; Prometheus metrics and health endpoints come next."""
