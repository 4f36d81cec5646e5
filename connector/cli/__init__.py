"""Command line interface (pop3-kafka)."""
