"""``pop3-kafka`` command line.

Exit codes: 0 success; 1 a mailbox cycle (or Kafka) failed; 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from connector import __version__
from connector.config import Config, load_config
from connector.config.model import MailboxConfig
from connector.errors import ConfigError, ConnectorError

if TYPE_CHECKING:
    from connector.runtime.sessions import Prepared

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
log = logging.getLogger("pop3kafka.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pop3-kafka", description="Move e-mail from POP3 mailboxes into Kafka.")
    p.add_argument("--version", action="version", version=f"pop3-kafka {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "text"],
        help="json lines, or text; auto = text on a terminal",
    )
    sub = p.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="configuration commands")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    val = cfg_sub.add_parser("validate", help="check a config file; exit 2 with the key at fault")
    val.add_argument("file")
    cfg_sub.add_parser("schema", help="print the configuration's JSON Schema (what helm's values.schema.json embeds)")

    once = sub.add_parser("poll-once", help="one cycle per mailbox, then exit (0 = every mailbox succeeded)")
    once.add_argument("--config", "-c", required=True)
    once.add_argument("--mailbox", "-m", action="append", default=None, help="only this mailbox id (repeatable)")

    run = sub.add_parser("run", help="poll every mailbox on its interval until SIGTERM/SIGINT")
    run.add_argument("--config", "-c", required=True)

    doctor = sub.add_parser(
        "doctor", help="check every mailbox (DNS, TCP, TLS, CAPA, login, UIDL) and Kafka, with the fix for each failure"
    )
    doctor.add_argument("--config", "-c", required=True)
    doctor.add_argument("--mailbox", "-m", action="append", default=None, help="only this mailbox (repeatable)")
    doctor.add_argument("--kafka-only", action="store_true", help="only the Kafka checks")

    ledger = sub.add_parser("ledger", help="UIDL ledger commands")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    imp = ledger_sub.add_parser(
        "import",
        help="record the mail another tool already fetched as seen (baseline), so it is never published",
    )
    imp.add_argument("--config", "-c", required=True)
    imp.add_argument("--mailbox", "-m", required=True)
    src = imp.add_mutually_exclusive_group(required=True)
    src.add_argument("--fetchids", type=Path, help="fetchmail's .fetchids file")
    src.add_argument("--getmail-oldmail", type=Path, help="getmail's oldmail-<server>-<port>-<user> file")
    imp.add_argument("--account", help="fetchmail account user@server, when the file holds several")

    show = ledger_sub.add_parser(
        "show", help="where did this mail go: its ledger history (topic, partition, offset, when, deleted or not)"
    )
    show.add_argument("--config", "-c", required=True)
    show.add_argument("--mailbox", "-m", required=True)
    show.add_argument("--uidl", "-u", required=True)

    adm = sub.add_parser("admin", help="talk to a running `pop3-kafka run` through its admin endpoint (admin.bind)")
    adm.add_argument("action", choices=("list", "poll", "pause", "resume"))
    adm.add_argument("--config", "-c", required=True)
    adm.add_argument("--mailbox", "-m", help="the mailbox (poll, pause, resume)")
    adm.add_argument("--wait", type=float, default=60.0, help="poll: seconds to wait for the cycle's outcome")

    dlq = sub.add_parser("dlq", help="dead-letter topic commands")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    replay = dlq_sub.add_parser(
        "replay",
        help="decode dead letters again and publish those that now succeed, exactly once (progress kept in Kafka)",
    )
    replay.add_argument("--config", "-c", required=True)
    replay.add_argument(
        "--since",
        help="pass over, for good in this progress group, dead letters written before: ISO 8601 or an age (7d, 12h)",
    )
    replay.add_argument("--dry-run", action="store_true", help="decode and report; publish and record nothing")
    replay.add_argument("--group", help="progress group (default '<transactional_id_prefix>-dlq-replay')")
    replay.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds (rerun resumes)")
    replay.add_argument("--batch", type=int, default=200, help="dead letters per transaction")

    schemas = sub.add_parser("schemas", help="the records' Avro schemas and the schema registry")
    schemas_sub = schemas.add_subparsers(dest="schemas_command", required=True)
    reg = schemas_sub.add_parser(
        "register",
        help="per subject (mail, dead letter, chunk): set schema_registry.compatibility, then register every "
        "version of schemas/history/ in order and the current schema; idempotent",
    )
    reg.add_argument("--config", "-c", required=True)
    reg.add_argument("--dry-run", action="store_true", help="look up and report; change nothing")
    schemas_sub.add_parser("list", help="every schema this package knows: file, name, version, fingerprint")

    tail = sub.add_parser("tail", help="print decoded records from the mail topic as JSON lines")
    tail.add_argument("--config", "-c", required=True)
    tail.add_argument("--from-beginning", action="store_true", help="start at the earliest offset")
    tail.add_argument("--max", type=int, default=None, help="stop after this many records")
    tail.add_argument(
        "--idle-timeout", type=float, default=None, help="stop after this many seconds without a new record"
    )
    tail.add_argument("--bodies", action="store_true", help="include text/html bodies (off: lengths only)")
    tail.add_argument(
        "--format",
        choices=["json", "summary"],
        default="json",
        help="json: one decoded record per line; summary: one short line per record",
    )
    tail.add_argument(
        "--attachments",
        metavar="DIR",
        default=None,
        help="also read topics.attachments (read_committed), reassemble chunked and fetch offloaded content, "
        "and write each printed mail's attachments into DIR (safe file names, mode 0600)",
    )
    return p


def parse_since(text: str, now: float | None = None) -> int:
    """--since as epoch milliseconds: ISO 8601 (a naive time is UTC) or an age like 7d/12h/30m."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([dhms])", text.strip())
    if m:
        seconds = float(m[1]) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[m[2]]
        return int((now - seconds) * 1000)
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since: {text!r} is neither an ISO 8601 time nor an age such as 7d, 12h, 30m") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if when.timestamp() > now:
        raise ConfigError(f"--since: {text!r} is in the future; it would pass over every dead letter")
    return int(when.timestamp() * 1000)


def _schemas_list() -> int:
    """Every schema file of this package (current and schemas/history/) with its version and
    single-object fingerprint (the 8 bytes after C3 01, hex)."""
    from connector.consumer import known_schemas

    rows = sorted(known_schemas(), key=lambda k: (k.name, k.version))
    width = max(len(k.file) for k in rows)
    for k in rows:
        current = "  current" if k.current else ""
        print(f"{k.file:<{width}}  {k.name}  v{k.version}  fingerprint {k.schema.fingerprint.hex()}{current}")
    return EXIT_OK


def _schemas_register(cfg: Config, *, dry_run: bool) -> int:
    from connector.delivery.registry import register_schemas

    done = register_schemas(cfg, dry_run=dry_run, report=lambda line: print(line, flush=True))
    new = sum(1 for r in done if r.outcome == "registered")
    verb = "would register" if dry_run else "registered"
    pending = sum(1 for r in done if r.outcome == "would register") if dry_run else new
    print(f"schemas register{' (dry run)' if dry_run else ''}: {len(done)} schema version(s), {pending} {verb}")
    return EXIT_OK


def _dlq_replay(cfg: Config, args: argparse.Namespace) -> int:
    from connector.runtime.dlq_replay import replay

    since = parse_since(args.since) if args.since else None
    last = [0.0]

    def report(s: Any) -> None:
        if time.monotonic() - last[0] >= 2.0:
            last[0] = time.monotonic()
            print(f"dlq replay: {s.line()}", file=sys.stderr, flush=True)

    if args.batch < 1:
        raise ConfigError("--batch: must be at least 1")
    summary = replay(
        cfg,
        since_millis=since,
        dry_run=args.dry_run,
        group=args.group,
        report=report,
        timeout_s=args.timeout,
        batch_size=args.batch,
    )
    print(f"dlq replay{' (dry run)' if args.dry_run else ''}: {summary.line()}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from connector.observability.logging import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        if args.command == "config" and args.config_command == "schema":
            from connector.config.export import json_schema

            print(json.dumps(json_schema(), indent=2, sort_keys=False))
            return EXIT_OK
        if args.command == "schemas" and args.schemas_command == "list":
            return _schemas_list()
        if args.command == "config":
            cfg = load_config(args.file)
            print(f"{args.file}: OK ({len(cfg.mailboxes)} mailbox(es): {', '.join(m.id for m in cfg.mailboxes)})")
            return EXIT_OK
        cfg = load_config(args.config)
        if args.command in ("poll-once", "run"):
            from connector.runtime.process import limit_malloc_arenas

            limit_malloc_arenas()  # before any thread: they would each get an arena
            targets: list[MailboxConfig] = []
            early: dict[str, Prepared] = {}
            if args.command == "poll-once":
                # dict.fromkeys: `--mailbox x --mailbox x` must not open two sessions on one maildrop.
                targets = [cfg.mailbox(m) for m in dict.fromkeys(args.mailbox)] if args.mailbox else list(cfg.mailboxes)
                if not _may_fork_decode_workers(cfg):
                    # exactly-once: the first sessions connect, log in and LIST + UIDL while the
                    # Kafka side of the connector is still importing (~0.08 s of a poll-once's
                    # start; connector/runtime/sessions.py). With decode workers to fork, they
                    # open after the fork instead (Runner.open_early): no thread may run before it.
                    from connector.runtime.sessions import open_first_wave

                    early = open_first_wave(cfg, targets)
            try:
                from connector.runtime import decode_pool

                # Forked now, while this is the only thread (connector/runtime/decode_pool.py).
                decode_pool.start(cfg)
            except BaseException:
                _end_sessions(early)
                raise
            try:
                return _poll_once(cfg, targets, early) if args.command == "poll-once" else _run(cfg)
            finally:
                decode_pool.stop()
        if args.command == "doctor":
            return _doctor(cfg, args.mailbox, kafka_only=args.kafka_only)
        if args.command == "ledger":
            if args.ledger_command == "show":
                return _ledger_show(cfg, args)
            return _ledger_import(cfg, args)
        if args.command == "dlq":
            return _dlq_replay(cfg, args)
        if args.command == "admin":
            return _admin(cfg, args)
        if args.command == "schemas":
            return _schemas_register(cfg, dry_run=args.dry_run)
        if args.command == "tail":
            try:
                return _tail(cfg, args)
            except KeyboardInterrupt:
                return EXIT_OK
    except ConfigError as exc:
        print(f"pop3-kafka: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConnectorError as exc:
        print(f"pop3-kafka: {exc.describe()}", file=sys.stderr)
        return EXIT_FAILED
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover


def _ensure_topics(cfg: Config) -> None:
    from connector.delivery.admin import DEAD_LETTER_TOPIC_CONFIG, TopicSpec, ensure_topics

    t = cfg.topics
    # The dead-letter topic may hold the only copy of a mail once the server copy is deleted,
    # so the connector creates it without time or size retention (docs/delivery.md).
    wanted = [TopicSpec(t.mail, t.partitions), TopicSpec(t.dead_letter, t.partitions, DEAD_LETTER_TOPIC_CONFIG)]
    if any(m.attachments.placement == "chunked" for m in cfg.mailboxes):
        # Same partition count as the mail topic (its real count: it may have been created by
        # someone else or grown): chunk records keep the mail record's key, so they land in
        # the partition with the same number (docs/record.md, "Large content").
        wanted.append(TopicSpec(t.attachments, t.partitions, partitions_like=t.mail))
    for topic in ensure_topics(
        cfg.kafka.bootstrap_servers,
        cfg.kafka.client_conf(),
        wanted,
        create=t.create,
        replication_factor=t.replication_factor,
        timeout=min(15.0, cfg.kafka.delivery_timeout_seconds),
    ):
        log.info("created topic %s", topic)


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM/SIGINT end the work gracefully: cycles finish or abort, nothing half-deleted."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing cycles in flight, starting no new ones", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _may_fork_decode_workers(cfg: Config) -> bool:
    """Whether decode_pool.start() may fork workers for ``cfg`` (decode_pool.wanted_processes
    decides; this errs towards yes and imports nothing heavy)."""
    return cfg.runtime.decode_processes != 0 and any(m.decode.mime_decoding for m in cfg.mailboxes)


def _end_sessions(early: dict[str, Prepared]) -> None:
    """End sessions opened before the start failed, without deletes."""
    from connector.runtime.sessions import end_unused

    for p in early.values():
        end_unused(p)


def _poll_once(cfg: Config, targets: list[MailboxConfig], early: dict[str, Prepared]) -> int:
    """``early``: the first sessions, opened already (open_first_wave); else they open here."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        from connector.runtime.runner import Runner

        runner = Runner(cfg)
    except BaseException:
        _end_sessions(early)
        raise
    runner.adopt_early(early)
    _stop_on_signals(runner.stop)
    try:
        # The topic check, the shards' start (ledger topic, init_transactions, ledger load)
        # and, exactly-once, the first sessions' login and LIST + UIDL are independent round
        # trips: side by side they cost the longest of the three before the first mail, not
        # the sum (bench/results/timeline.md).
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="topics") as pool:
            topics = pool.submit(_ensure_topics, cfg)
            publisher = pool.submit(runner.start_publisher)  # at-least-once: its producer id
            runner.open_early(targets)
            try:
                runner.prepare(targets)
            finally:
                topics.result()
                publisher.result()
        results = runner.poll_once(targets)
    finally:
        runner.close()
    failed = 0
    for r in results:
        if r.ok:
            left = {
                "undecodable": r.undecodable,
                "over max_message_bytes": r.oversized,
                "with a line over max_line_bytes": r.long_lines,
                "too large for Kafka": r.too_large,
            }
            note = "".join(f", {n} {what} left on server" for what, n in left.items() if n)
            note += ", more mail waiting" if r.more_pending else ""
            dead = f", {r.dead_lettered} dead-lettered" if r.dead_lettered else ""
            if r.deleted_unread:
                note += f", {r.deleted_unread} over max_message_bytes deleted unread (oversized: delete)"
            print(f"{r.mailbox}: ok: {r.published} published{dead}, {r.deleted} deleted of {r.listed} listed{note}")
        else:
            failed += 1
            err = r.error
            text = err.describe() if isinstance(err, ConnectorError) else f"internal error: {err!r}"
            print(f"{r.mailbox}: FAILED: {text}", file=sys.stderr)
    return EXIT_OK if failed == 0 else EXIT_FAILED


def _run(cfg: Config) -> int:
    from connector.runtime.runner import Runner

    runner = Runner(cfg)
    _stop_on_signals(runner.stop)
    # SIGHUP: reload the configuration (the mailbox list and mailbox settings; the file is also
    # watched for changes); Kafka-side settings need a restart.
    signal.signal(signal.SIGHUP, lambda _signum, _frame: runner.request_reload())
    _ensure_topics(cfg)
    admin = None
    if cfg.admin is not None:
        from connector.runtime.admin_server import AdminServer

        try:
            admin = AdminServer(runner, cfg.admin.host, cfg.admin.port, cfg.admin.token)
        except OSError as exc:
            where = f"{cfg.admin.host}:{cfg.admin.port}"
            raise ConfigError(f"admin.bind: cannot listen on {where}: {exc.strerror}") from None
        admin.start()
    log.info("pop3-kafka %s running %d mailbox(es)", __version__, len(cfg.mailboxes))
    try:
        runner.run()
    finally:
        if admin is not None:
            admin.close()
        runner.close()
    stragglers = [t for t in threading.enumerate() if t.name.startswith(("cycle", "round", "unit")) and t.is_alive()]
    if stragglers:
        log.error(
            "%d cycle(s) still running after the grace period; exiting without their QUIT "
            "(RFC 1939: nothing of theirs is deleted)",
            len(stragglers),
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_FAILED)
    if runner.fatal:
        return EXIT_FAILED
    log.info("stopped cleanly")
    return EXIT_OK


def _doctor(cfg: Config, only: list[str] | None, *, kafka_only: bool) -> int:
    from connector.delivery.doctor import check_kafka, check_offload
    from connector.delivery.registry import check_registry
    from connector.runtime.doctor import check_mailbox

    findings = []
    if not kafka_only:
        for mb in [cfg.mailbox(m) for m in dict.fromkeys(only)] if only else cfg.mailboxes:
            findings += check_mailbox(mb)
    findings += check_kafka(cfg)
    findings += check_offload(cfg)
    findings += check_registry(cfg)
    for f in findings:
        # WARN: works, but something deserves the operator's attention; does not fail doctor.
        line = f"{'FAIL' if not f.ok else 'WARN' if f.warning else 'ok  '} {f.check}: {f.detail}"
        if (not f.ok or f.warning) and f.fix:
            line += f"\n     fix: {f.fix}"
        print(line)
    failed = sum(1 for f in findings if not f.ok)
    warned = sum(1 for f in findings if f.ok and f.warning)
    also = f" ({warned} with a warning)" if warned else ""
    print(f"{len(findings) - failed} ok{also}, {failed} failed")
    return EXIT_OK if failed == 0 else EXIT_FAILED


def _admin(cfg: Config, args: argparse.Namespace) -> int:
    """HTTP client of the admin endpoint (the running process is the one that owns the
    schedule): prints the JSON answer; exit 0 on 2xx."""
    import json
    import urllib.error
    import urllib.request

    if cfg.admin is None:
        raise ConfigError("admin: no admin section in the configuration; the running process has no endpoint")
    if args.action != "list" and not args.mailbox:
        raise ConfigError(f"admin {args.action}: --mailbox is required")
    cfg.mailbox(args.mailbox) if args.mailbox else None  # unknown ids fail here, naming the known ones
    # A wildcard bind is reached on loopback from the same machine or pod.
    host = "127.0.0.1" if cfg.admin.host in ("0.0.0.0", "::", "") else cfg.admin.host  # noqa: S104
    host = f"[{host}]" if ":" in host else host
    base = f"http://{host}:{cfg.admin.port}"
    if args.action == "list":
        req = urllib.request.Request(f"{base}/mailboxes")  # noqa: S310 - http:// built here
    else:
        mid = urllib.parse.quote(args.mailbox, safe="")
        query = f"?wait={args.wait:g}" if args.action == "poll" else ""
        url = f"{base}/mailboxes/{mid}/{args.action}{query}"
        req = urllib.request.Request(url, method="POST", data=b"")  # noqa: S310 - http:// built here
    if cfg.admin.token is not None:
        req.add_header("Authorization", f"Bearer {cfg.admin.token.reveal()}")
    try:
        with urllib.request.urlopen(req, timeout=args.wait + 10) as resp:  # noqa: S310 - our own http URL
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"pop3-kafka: admin endpoint {base} not reachable ({reason}); is `pop3-kafka run` up?", file=sys.stderr)
        return EXIT_FAILED
    try:
        print(json.dumps(json.loads(body), indent=1))
    except ValueError:
        print(body.decode("utf-8", "replace"))
    return EXIT_OK if 200 <= status < 300 else EXIT_FAILED


def _ledger_show(cfg: Config, args: argparse.Namespace) -> int:
    from connector.runtime.ledger_show import describe, ledger_history

    history = ledger_history(cfg, args.mailbox, args.uidl)
    for line in describe(history):
        print(line)
    return EXIT_OK if history.events else EXIT_FAILED


def _ledger_import(cfg: Config, args: argparse.Namespace) -> int:
    from connector.cutover import importers
    from connector.runtime.ledger_import import import_baseline

    mb = cfg.mailbox(args.mailbox)
    if args.fetchids is not None:
        user, _, server = (args.account or "").rpartition("@")
        seen = importers.read_fetchids(args.fetchids, server=server or None, user=user or None)
        form = None
    else:
        seen = importers.read_getmail_oldmail(args.getmail_oldmail)
        form = importers.getmail_uidl_form  # getmail stores '/' in UIDLs as '-'
    report = import_baseline(cfg, mb, seen, uidl_form=form)
    print(
        f"{mb.id}: {report.recorded} recorded as seen (not published), {report.already_known} already in the "
        f"ledger, {report.not_on_server} from the file no longer on the server"
    )
    return EXIT_OK


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _summary(partition: int | None, offset: int | None, rec: dict[str, Any]) -> str:
    sender = ", ".join(a["address"] for a in rec.get("from", [])) or "-"
    atts = rec.get("attachments", [])
    names = ", ".join(f"{a['filename'] or a['content_type']} ({a['size']} B)" for a in atts)
    parts = [f"p{partition}@{offset}", rec["record_id"], f"from {sender}", repr(rec.get("subject") or "")]
    if names:
        parts.append(f"attachments: {names}")
    if rec.get("decode_warnings"):
        parts.append(f"warnings: {len(rec['decode_warnings'])}")
    return "  ".join(parts)


def _tail(cfg: Config, args: argparse.Namespace) -> int:
    import tempfile
    from collections import OrderedDict

    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    from connector import consumer as cons

    topic = cfg.topics.mail
    save_dir = Path(args.attachments) if args.attachments else None
    att_topic: str | None = None
    if save_dir is not None:
        att_topic = str(getattr(cfg.topics, "attachments", topic + ".attachments"))
    offload_settings = getattr(cfg, "offload", None)
    # Registry-framed records (record.framing: schema_registry) name their schema by id.
    registry = None
    if cfg.schema_registry is not None:
        from connector.delivery.registry import open_client

        registry = open_client(cfg.schema_registry)
    conf = cfg.kafka.client_conf()
    conf.update(
        {
            "bootstrap.servers": cfg.kafka.bootstrap_servers,
            "group.id": "pop3-kafka-tail",
            "logger": logging.getLogger("pop3kafka.rdkafka.tail"),
            "enable.auto.commit": False,
            # Chunks of an aborted transaction must never be reassembled, nor its mail shown.
            "isolation.level": "read_committed",
        }
    )
    try:
        consumer = Consumer(conf)
    except KafkaException as exc:
        from connector.delivery.kafka import client_config_error

        raise client_config_error(exc) from exc

    def elide(value: Any) -> Any:
        """JSON-safe: datetimes as ISO 8601, bytes (attachment data, raw mail) as their length."""
        if isinstance(value, bytes):
            return f"<{len(value)} bytes>"
        if isinstance(value, dict):
            return {k: elide(v) for k, v in value.items()}
        if isinstance(value, list):
            return [elide(v) for v in value]
        return _jsonable(value)

    def shown(text: str | None) -> str:
        """Untrusted text for a terminal: control and format characters (escape sequences,
        bidi overrides) escaped."""
        return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text or "-")

    def attachment_line(rec: dict[str, Any]) -> str:
        items = [
            f"{shown(a['filename'])} [{shown(a['content_type'])}, {a['size']} B, sha256 {a['sha256']}, "
            f"{a['placement']}]"
            for a in cons.attachment_summary(rec)
        ]
        return f"attachments: {', '.join(items)}" if items else ""

    start = -2 if args.from_beginning else -1  # OFFSET_BEGINNING / OFFSET_END
    tmp = tempfile.TemporaryDirectory(prefix="pop3-kafka-tail-") if save_dir is not None else None
    assembler = cons.ChunkAssembler(tmp.name, registry=registry) if tmp is not None else None
    #: mail records whose chunked attachments are not all assembled yet: record id -> (partition, offset, record)
    waiting: dict[str, tuple[int | None, int | None, dict[str, Any]]] = {}
    #: content completed before (or without) its mail record: deleted oldest first beyond a bound
    unclaimed: OrderedDict[str, None] = OrderedDict()
    try:
        assignment = []
        for name in [topic] if att_topic is None else [topic, att_topic]:
            try:
                md = consumer.list_topics(name, timeout=15)
            except KafkaException as exc:
                print(
                    f"pop3-kafka: cannot reach Kafka at {cfg.kafka.bootstrap_servers}: {exc.args[0].str()}",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            tmd = md.topics.get(name)
            if tmd is None or tmd.error is not None or not tmd.partitions:
                if name == att_topic:
                    print(
                        f"pop3-kafka: attachments topic {name!r} does not exist; chunked attachments cannot be "
                        "written (inline and offloaded ones can)",
                        file=sys.stderr,
                    )
                    att_topic = None
                    continue
                print(f"pop3-kafka: topic {name!r} does not exist", file=sys.stderr)
                return EXIT_FAILED
            assignment += [TopicPartition(name, p, start) for p in sorted(tmd.partitions)]
        # One consumer for both topics: a mail and its chunks share a key, hence a partition number.
        consumer.assign(assignment)

        def chunked_ids(rec: dict[str, Any]) -> list[str]:
            return [
                str(a["ref"]["id"])
                for a in rec.get("attachments") or []
                if a.get("data") is None and a.get("ref") is not None and a["ref"].get("placement") == "chunked"
            ]

        def save(partition: int | None, offset: int | None, rec: dict[str, Any]) -> None:
            assert save_dir is not None and assembler is not None
            try:
                written = cons.write_attachments(rec, save_dir, assembler=assembler, offload_settings=offload_settings)
            except OSError as exc:
                print(
                    f"pop3-kafka: cannot write attachments of {rec['record_id']} to {save_dir}: {exc}", file=sys.stderr
                )
                return
            for cid in chunked_ids(rec):  # written (hard link or copy): the assembled file is no longer needed
                done = assembler.completed(cid)
                if done is not None and done.path is not None:
                    done.path.unlink(missing_ok=True)
                assembler.discard(cid)
                unclaimed.pop(cid, None)
            if not written and not written.unavailable:
                return  # no attachments
            if args.format == "summary":
                parts = [f"p{partition}@{offset}", rec["record_id"]]
                parts.append("wrote " + (", ".join(str(w) for w in written) or "nothing"))
                if written.unavailable:
                    missing = [f"{shown(u.filename or f'#{u.index}')} ({u.reason})" for u in written.unavailable]
                    parts.append("not written: " + "; ".join(missing))
                print("  ".join(parts), flush=True)
                return
            out = {
                "partition": partition,
                "offset": offset,
                "record_id": rec["record_id"],
                "attachments_written": [str(w) for w in written],
                "attachments_unavailable": [
                    {"index": u.index, "filename": u.filename, "placement": u.placement, "reason": u.reason}
                    for u in written.unavailable
                ],
            }
            print(json.dumps(out, ensure_ascii=False), flush=True)

        def on_mail(partition: int | None, offset: int | None, rec: dict[str, Any]) -> None:
            assert assembler is not None
            missing = False
            for att in rec.get("attachments") or []:
                ref = att.get("ref")
                if att.get("data") is not None or ref is None or ref.get("placement") != "chunked":
                    continue
                unclaimed.pop(str(ref["id"]), None)
                try:
                    if assembler.expect(ref) is None:
                        missing = True
                except cons.IntegrityError as exc:
                    print(f"pop3-kafka: {rec['record_id']}: {exc}", file=sys.stderr)
            if missing and att_topic is not None:
                waiting[rec["record_id"]] = (partition, offset, rec)
            else:
                save(partition, offset, rec)

        def on_chunk(value: bytes) -> None:
            assert assembler is not None
            try:
                chunk = cons.decode_value(value, registry=registry)
                if chunk.kind != "chunk" or str(chunk.record["content_id"]).endswith("/raw"):
                    return  # the raw mail (raw_ref) is not an attachment
                done = assembler.add(chunk)
            except cons.ConsumerError as exc:
                print(f"pop3-kafka: attachments topic: {type(exc).__name__}: {exc}", file=sys.stderr)
                return
            if done is None:
                return
            owner = waiting.get(done.record_id)
            if owner is None:
                unclaimed[done.content_id] = None
                while len(unclaimed) > 256:
                    cid, _ = unclaimed.popitem(last=False)
                    old = assembler.completed(cid)
                    if old is not None and old.path is not None:
                        old.path.unlink(missing_ok=True)
                    assembler.discard(cid)
                return
            if all(assembler.completed(cid) is not None for cid in chunked_ids(owner[2])):
                del waiting[done.record_id]
                save(*owner)

        count = 0
        last = time.monotonic()
        drain_s = args.idle_timeout if args.idle_timeout is not None else 30.0
        while True:
            full = args.max is not None and count >= args.max
            if full and not waiting:
                break
            msg = consumer.poll(0.5)
            if msg is None:
                idle = time.monotonic() - last
                if args.idle_timeout is not None and idle > args.idle_timeout:
                    break
                if full and idle > drain_s:  # chunks that never came
                    break
                continue
            err = msg.error()
            if err is not None:
                print(f"pop3-kafka: consume error: {err.str()}", file=sys.stderr)
                if err.code() in (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED):
                    return EXIT_FAILED  # not transient: the principal lacks Read (docs/kafka-security.md)
                continue
            last = time.monotonic()
            if att_topic is not None and msg.topic() == att_topic:
                on_chunk(msg.value() or b"")
                continue
            if full:
                continue  # only waiting for the chunks of mail already shown
            count += 1
            try:
                decoded = cons.decode_value(msg.value(), registry=registry)
            except cons.ConsumerError as exc:
                err_out = {
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "error": str(exc),
                    "error_type": type(exc).__name__,
                }
                print(json.dumps(err_out))
                continue
            rec = decoded.record
            if decoded.kind == "chunk":  # not expected on the mail topic
                rec = {k: v for k, v in rec.items() if k != "data"}
            if not args.bodies:
                for k in ("text_body", "html_body"):
                    if rec.get(k) is not None:
                        rec[k] = f"<{len(rec[k])} characters; --bodies to show>"
            if args.format == "summary":
                if decoded.kind == "dead_letter":
                    line = (
                        f"p{msg.partition()}@{msg.offset()}  {rec['record_id']}  dead letter "
                        f"({rec['stage']}/{rec['reason']}): {rec['error_message'][:200]}"
                    )
                elif decoded.kind == "chunk":
                    line = (
                        f"p{msg.partition()}@{msg.offset()}  chunk {rec['index']}/{rec['count']} of {rec['content_id']}"
                    )
                else:
                    line = _summary(msg.partition(), msg.offset(), {**rec, "attachments": []})
                    if extra := attachment_line(rec):
                        line += "  " + extra
                print(line, flush=True)
            else:
                out = {
                    "partition": msg.partition(),
                    "offset": msg.offset(),
                    "kind": decoded.kind,
                    "schema_version": decoded.schema_version,
                    "record": elide(rec),
                }
                if decoded.kind == "mail":
                    out["attachment_summary"] = cons.attachment_summary(rec)
                print(json.dumps(out, ensure_ascii=False), flush=True)
            if decoded.kind == "mail" and save_dir is not None:
                on_mail(msg.partition(), msg.offset(), decoded.record)
        for partition, offset, rec in list(waiting.values()):  # write what is there; report the rest
            save(partition, offset, rec)
    finally:
        consumer.close()
        if assembler is not None:
            assembler.close()
        if tmp is not None:
            tmp.cleanup()
    return EXIT_OK


def entry_point() -> None:
    """The ``pop3-kafka`` command: :func:`main`, then the process ends at once with its exit
    code, once its output and logs are flushed. The interpreter's teardown (every module and
    object freed one by one) took ~35 ms of each poll-once and does nothing a finished command
    needs: the work is committed, the sessions ended, the producers flushed and closed, the
    decode workers reaped. mypy ends its runs the same way. An exception still leaves through
    the normal path (its traceback, the interpreter's cleanup)."""
    code = main()
    logging.shutdown()  # flushes every handler
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry_point()
