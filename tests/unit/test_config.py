"""Configuration: validated at load, errors name the key, the value and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.config import load_config, parse_config
from connector.errors import ConfigError

ENV = {"PW": "s3cret-value"}


def base(**mailbox: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "id": "orders",
        "host": "pop.example.com",
        "username": "orders@example.com",
        "password": {"env": "PW"},
    }
    m.update(mailbox)
    return {"kafka": {"bootstrap_servers": "k:9092"}, "topics": {"mail": "mail"}, "mailboxes": [m]}


def error_of(data: Any) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, environ=ENV)
    return str(e.value)


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_config(base(), environ=ENV)
    m = cfg.mailboxes[0]
    assert (m.port, m.tls, m.tls_verify, m.poll_interval_seconds) == (995, "implicit", True, 60.0)
    assert m.password.reveal() == "s3cret-value"
    assert cfg.record.key == "mailbox" and cfg.topics.create is True
    assert parse_config(base(tls="starttls"), environ=ENV).mailboxes[0].port == 110


def test_secret_never_prints() -> None:
    m = parse_config(base(), environ=ENV).mailboxes[0]
    assert "s3cret" not in repr(m) and "s3cret" not in str(m.password)
    assert "env:PW" in repr(m.password)


def test_unknown_key_is_named_with_suggestion() -> None:
    msg = error_of(base(hots="x"))
    assert msg.startswith("mailboxes[0].hots: unknown key; did you mean 'host'?")


def test_wrong_choice_lists_allowed_values() -> None:
    msg = error_of(base(tls="tsl"))
    assert "mailboxes[0].tls: 'tsl' is not allowed; use one of: implicit, starttls, none" in msg


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"port": 70000}, "mailboxes[0].port: 70000 is above the maximum 65535"),
        ({"port": "995"}, "mailboxes[0].port: expected an integer, got a string '995'"),
        ({"id": "Orders@Example"}, "mailboxes[0].id: 'Orders@Example' is not a valid mailbox id"),
        ({"password": "inline"}, "mailboxes[0].password: expected a mapping"),
        ({"password": {"env": "NOPE"}}, "mailboxes[0].password.env: environment variable 'NOPE' is not set"),
        ({"password": {"env": "PW", "file": "/x"}}, "give exactly one of 'env' or 'file'"),
        ({"tls": "none"}, "mailboxes[0].tls: 'none' would send the password unencrypted"),
        ({"tls_verify": "yes"}, "mailboxes[0].tls_verify: expected true or false"),
        ({"tls_ca_file": "/does/not/exist.pem"}, "mailboxes[0].tls_ca_file: '/does/not/exist.pem' does not exist"),
        ({"poll_interval_seconds": 0}, "mailboxes[0].poll_interval_seconds: 0 is below the minimum 1"),
    ],
)
def test_bad_values(patch: dict[str, Any], fragment: str) -> None:
    assert fragment in error_of(base(**patch))


def test_missing_sections_and_duplicates() -> None:
    assert "kafka: required key is missing" in error_of({"topics": {"mail": "m"}, "mailboxes": []})
    data = base()
    data["mailboxes"].append(dict(data["mailboxes"][0]))
    assert "mailboxes[1].id: 'orders' is used by two mailboxes" in error_of(data)
    data = base()
    data["mailboxes"] = []
    assert "mailboxes: the list is empty" in error_of(data)
    data = base()
    data["topics"]["mail"] = "bad topic!"
    assert "topics.mail: 'bad topic!' is not a valid Kafka topic name" in error_of(data)


def test_managed_kafka_keys_are_refused() -> None:
    data = base()
    data["kafka"]["client"] = {"acks": "1", "security.protocol": "SSL"}
    assert "kafka.client.acks: set by the connector" in error_of(data)
    data["kafka"]["client"] = {"security.protocol": "SSL"}
    assert parse_config(data, environ=ENV).kafka.client == {"security.protocol": "SSL"}


def test_password_file_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "pw.txt").write_text("from-file\n")
    data = base(password={"file": "pw.txt"})
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data))
    assert load_config(f, environ=ENV).mailboxes[0].password.reveal() == "from-file"


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("kafka:\n  bootstrap_servers: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(f)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "connector.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
        timeout=60,
    )


def test_cli_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    data = base(hots="x")
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data))
    for args in (["config", "validate", str(f)], ["poll-once", "--config", str(f)], ["run", "--config", str(f)]):
        proc = run_cli(*args, env=ENV)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "mailboxes[0].hots: unknown key" in proc.stderr


def test_cli_validate_ok(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(base()))
    proc = run_cli("config", "validate", str(f), env=ENV)
    assert proc.returncode == 0 and "OK (1 mailbox(es): orders)" in proc.stdout
    assert run_cli("config", "validate", str(tmp_path / "missing.yaml")).returncode == 2


def test_cli_unknown_mailbox_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(base()))
    proc = run_cli("poll-once", "--config", str(f), "--mailbox", "nope", env=ENV)
    assert proc.returncode == 2 and "--mailbox 'nope': no such mailbox" in proc.stderr


def test_cli_unreachable_kafka_exits_1_with_the_fix(tmp_path: Path) -> None:
    data = base()
    data["kafka"]["bootstrap_servers"] = "127.0.0.1:1"
    data["kafka"]["delivery_timeout_seconds"] = 2
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data))
    proc = run_cli("poll-once", "--config", str(f), env=ENV)
    assert proc.returncode == 1
    assert "cannot reach Kafka at 127.0.0.1:1" in proc.stderr and "kafka.bootstrap_servers" in proc.stderr


@pytest.mark.parametrize(
    "password",
    [
        "hunter2-SECRET",
        ["hunter2-SECRET"],
        {"env": "hunter2-SECRET"},
        {"env": "X", "file": "hunter2-SECRET"},
        {"value": "hunter2-SECRET"},
    ],
)
def test_a_misplaced_password_is_never_echoed(password: Any) -> None:
    msg = error_of(base(password=password))
    assert "hunter2" not in msg and msg.startswith("mailboxes[0].password")


def test_non_finite_numbers_are_refused() -> None:
    data = base()
    data["kafka"]["delivery_timeout_seconds"] = float("nan")
    assert "kafka.delivery_timeout_seconds: nan is not a finite number" in error_of(data)


def test_config_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_bytes(b"kafka: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(f)


def test_cli_unknown_librdkafka_key_is_a_config_error(tmp_path: Path) -> None:
    data = base()
    data["kafka"]["client"] = {"no.such.setting": "1"}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data))
    for cmd in ("poll-once", "tail"):
        proc = run_cli(cmd, "--config", str(f), env=ENV)
        assert proc.returncode == 2, proc.stderr
        assert "kafka.client: librdkafka refused the settings" in proc.stderr and "no.such.setting" in proc.stderr


def test_kafka_client_secrets_from_files_never_print(tmp_path: Path) -> None:
    (tmp_path / "sasl.pw").write_text("kafka-s3cret\n")
    data = base()
    data["kafka"]["client"] = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}
    data["kafka"]["client_secrets"] = {"sasl.password": {"file": str(tmp_path / "sasl.pw")}}
    cfg = parse_config(data, environ=ENV)
    assert cfg.kafka.client_conf()["sasl.password"] == "kafka-s3cret"
    assert "kafka-s3cret" not in repr(cfg)
    data["kafka"]["client_secrets"] = {"sasl.password": "kafka-s3cret"}
    msg = error_of(data)
    assert "kafka.client_secrets.sasl.password" in msg and "kafka-s3cret" not in msg


def test_delivery_timeout_must_fit_the_transaction_timeout() -> None:
    data = base()
    data["kafka"]["delivery_timeout_seconds"] = 300
    assert "kafka.delivery_timeout_seconds: 300 is longer than delivery.transaction_timeout_seconds" in error_of(data)
    data["delivery"] = {"mode": "at_least_once"}
    assert parse_config(data, environ=ENV).kafka.delivery_timeout_seconds == 300


def test_keep_mode_needs_exactly_once() -> None:
    data = base(delete=False)
    data["delivery"] = {"mode": "at_least_once"}
    assert "mailboxes[0].delete: keep mode needs the UIDL ledger" in error_of(data)
    data = base(max_seconds_per_cycle=100)
    assert "max_seconds_per_cycle: 100 is more than half of delivery.transaction_timeout_seconds" in error_of(data)


# ------------------------------------------------------------------ large mail (issue 6)


def _large(mailbox: dict[str, Any] | None = None, **root: Any) -> Any:
    doc: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "k:9092"},
        "topics": {"mail": "mail"},
        "mailboxes": [{"id": "m", "host": "h", "username": "u", "password": {"env": "PW"}, **(mailbox or {})}],
    }
    for k, v in root.items():
        doc.setdefault(k, {}).update(v)
    return parse_config(doc, environ={"PW": "x"})


def test_large_mail_defaults() -> None:
    cfg = _large()
    m = cfg.mailboxes[0]
    assert (m.attachments.placement, m.attachments.inline_max_bytes, m.raw_mail, m.oversized) == (
        "chunked",
        256 * 1024,
        "none",
        "skip",
    )
    assert (cfg.topics.attachments, cfg.topics.chunk_bytes, cfg.offload) == ("mail.attachments", 512 * 1024, None)
    assert m.decode.stream_above == 64 * 1024


def test_offload_placement_needs_an_offload_section() -> None:
    with pytest.raises(ConfigError, match=r"mailboxes\[0\].attachments.placement: 'offload' needs an offload"):
        _large({"attachments": {"placement": "offload"}})


def test_oversized_dead_letter_needs_chunks_or_offload() -> None:
    with pytest.raises(ConfigError, match=r"oversized: 'dead_letter' carries the raw mail"):
        _large({"oversized": "dead_letter", "attachments": {"placement": "none"}})
    assert _large({"oversized": "dead_letter"}).mailboxes[0].oversized == "dead_letter"


def test_offload_sections_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"offload.directory: .* is not a writable directory"):
        _large(offload={"kind": "filesystem", "directory": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"offload.bucket: required"):
        _large(offload={"kind": "s3"})
    with pytest.raises(ConfigError, match="give both access_key_id_file and secret_access_key_file"):
        _large(offload={"kind": "s3", "bucket": "b", "access_key_id_file": str(tmp_path)})
    cfg = _large({"attachments": {"placement": "offload"}}, offload={"kind": "filesystem", "directory": str(tmp_path)})
    assert cfg.offload is not None and cfg.offload.directory == str(tmp_path)


def test_chunk_size_must_fit_the_producer_limit() -> None:
    with pytest.raises(ConfigError, match=r"topics.chunk_bytes: 1048576 plus a chunk record's framing"):
        _large(topics={"chunk_bytes": 1024 * 1024})
    cfg = _large(topics={"chunk_bytes": 1024 * 1024}, kafka={"client": {"message.max.bytes": 2_000_000}})
    assert cfg.topics.chunk_bytes == 1024 * 1024
    # no chunked mailbox: no constraint
    assert _large({"attachments": {"placement": "none"}}, topics={"chunk_bytes": 1024 * 1024}).topics.chunk_bytes


def test_attachments_topic_needs_its_own_name() -> None:
    with pytest.raises(ConfigError, match=r"topics.attachments: .mail. is also the mail, dead-letter or ledger topic"):
        _large(topics={"attachments": "mail"})


def test_inline_limit_must_leave_room_under_the_producer_limit() -> None:
    with pytest.raises(ConfigError, match=r"attachments.inline_max_bytes: 2097152 leaves no room"):
        _large({"attachments": {"inline_max_bytes": 2 * 1024 * 1024}})
    ok = _large(
        {"attachments": {"inline_max_bytes": 2 * 1024 * 1024}}, kafka={"client": {"message.max.bytes": 8_000_000}}
    )
    assert ok.mailboxes[0].attachments.inline_max_bytes == 2 * 1024 * 1024
    assert _large({"attachments": {"placement": "none", "inline_max_bytes": 2 * 1024 * 1024}})


def test_offload_part_size_is_bounded() -> None:
    with pytest.raises(ConfigError, match="part_bytes"):
        _large(offload={"kind": "s3", "bucket": "b", "part_bytes": 128 * 1024 * 1024})
