"""pop3-kafka: move e-mail from POP3 mailboxes into Apache Kafka, deleting only after Kafka has it."""

__version__ = "0.1.0"
