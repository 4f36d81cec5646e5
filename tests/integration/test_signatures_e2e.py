"""Signature verification end to end on the real broker and Dovecot.

First run (one poll-once, two mailboxes, raw_mail: include so each record carries the bytes
POP3 delivered):

* ``sig``: every mail of the signed-mail catalogue (tests/support/smimesign.py: valid detached
  and opaque, tampered, unknown CA, expired, signed-then-encrypted, triple wrapped...) with
  smime.keys and smime.verify (root and intermediate). Each record's smime.signatures equals
  the unit expectations, and `openssl cms -verify` on the record's raw bytes (or on the
  decrypted entity, for an inner layer) agrees, except the listed deliberate differences;
* ``pkits``: the 224 signed PKITS mails, trust store = the PKITS anchor (DER). Each verdict
  equals openssl's on the record's raw bytes (PKITS oracle flags), except the mails listed in
  tests/fixtures/pkits_differences.txt, which differ as listed.

The connector validates at the fetch time, not a fixed moment: every certificate of the
catalogue is valid from 2020 to 2050 except the expired / not-yet-valid ones, and the PKITS
certificates until 2030, so the verdicts are the unit tests', and openssl runs at "now" too.

Second run (require_valid_signature: true): the valid mails are published; the tampered, the
unknown-CA, the unsigned mail and the signed-then-encrypted mail with a tampered inner
signature are dead letters (signature_invalid / not_signed) holding the original bytes (still
encrypted for the last), and the decrypted text of that mail is nowhere: not in any topic, not
in the logs or output, not in the spool.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from support.cli import run_cli
from support.configs import mailbox, write_config
from support.kafkautil import all_values, consume_all
from support.leaks import assert_no_leak
from support.smime import openssl
from support.smimesign import (
    PKITS_ANCHOR,
    PKITS_ORACLE_FLAGS,
    Case,
    SignPki,
    build_cases,
    crlf,
    make_sign_pki,
    openssl_verdict,
    pkits_differences,
    pkits_mails,
    plain_mail,
)

from connector.consumer import decode_value
from connector.records.dead_letter import decode_dead_letter

pytestmark = pytest.mark.integration

# Dovecot users reserved for this module (deploy/local/localstack.py TEST_USERS).
SIG_USER, PKITS_USER = "sig1", "sig2"


def mail_record(value: bytes) -> dict[str, Any]:
    decoded = decode_value(value)
    assert decoded.kind == "mail", decoded.kind
    return {**decoded.record, "_schema_version": decoded.schema_version}


def layers(record: dict[str, Any]) -> list[tuple[str, str, str, str | None]]:
    smime = record["smime"]
    assert smime is not None, record["message_id"]
    return [(s["layer"], s["type"], s["verdict"], s["reason"]) for s in smime["signatures"]]


def poll_once(cfg: Path, env: dict[str, str]) -> tuple[str, str]:
    proc = run_cli("--log-level", "debug", "--log-format", "json", "poll-once", "--config", str(cfg), env=env,
                   timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, proc.stderr


def summary_counts(stdout: str, mailbox_id: str) -> tuple[int, int, int, int]:
    """(published, dead-lettered, deleted, listed) from poll-once's line for the mailbox."""
    line = re.search(rf"^{mailbox_id}: ok: (\d+) published(?:, (\d+) dead-lettered)?, (\d+) deleted of (\d+) listed",
                     stdout, re.MULTILINE)  # fmt: skip
    assert line is not None, stdout
    pub, dead, deleted, listed = line.groups()
    return int(pub), int(dead or 0), int(deleted), int(listed)


def by_sha(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {r["provenance"]["raw_sha256"]: r for r in records}
    assert len(out) == len(records), "a mail was published twice"
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SignPki:
    return make_sign_pki(tmp_path_factory.mktemp("sig-e2e-pki"))


@pytest.fixture(scope="module")
def cases(pki: SignPki) -> dict[str, Case]:
    return build_cases(pki)


def test_verdicts_in_the_records_match_openssl(  # type: ignore[no-untyped-def]
    services, topic: str, tmp_path: Path, pki: SignPki, cases: dict[str, Case]
) -> None:
    pkits = pkits_mails()
    for user in (SIG_USER, PKITS_USER):
        services.dovecot.clear(user)
    for case in cases.values():
        services.dovecot.put(SIG_USER, case.raw)
    for raw in pkits.values():
        services.dovecot.put(PKITS_USER, raw)
    key_file = pki.key_file("alice")
    common = {"raw_mail": "include", "max_messages_per_cycle": 1000}
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox("sig", SIG_USER, services.dovecot.pop3s_port, services.cafile, **common, smime={
                "keys": [{"file": str(key_file), "label": "alice"}],
                "verify": {"trust_store": [str(pki.root)], "intermediates": [str(pki.intermediate)]},
            }),
            mailbox("pkits", PKITS_USER, services.dovecot.pop3s_port, services.cafile, **common, smime={
                "verify": {"trust_store": [str(PKITS_ANCHOR)]},
            }),
        ],
        runtime={"spool_threshold_bytes": 0, "spool_directory": str(tmp_path / "spool")},
        delivery={"transactional_id_prefix": f"sig-{topic}"},
        ledger={"topic": f"{topic}.ledger"},
    )  # fmt: skip
    (tmp_path / "spool").mkdir()
    stdout, _ = poll_once(cfg, {"PW_SIG": f"{SIG_USER}-pw", "PW_PKITS": f"{PKITS_USER}-pw"})
    total = len(cases) + len(pkits)
    assert summary_counts(stdout, "sig") == (len(cases), 0, len(cases), len(cases))
    assert summary_counts(stdout, "pkits") == (len(pkits), 0, len(pkits), len(pkits))
    records = by_sha([c.record for c in consume_all(services.bootstrap, topic, expect=total, decode=mail_record)])
    assert len(records) == total
    assert services.dovecot.count(SIG_USER) == services.dovecot.count(PKITS_USER) == 0

    # -- the catalogue: the unit expectations, and openssl on what the record carries
    oracle_jobs: list[tuple[str, str, bytes, bool]] = []
    for case in cases.values():
        record = records[hashlib.sha256(case.raw).hexdigest()]
        assert record["_schema_version"] == 4
        assert record["raw"] == case.raw, f"{case.name}: the raw mail is the bytes POP3 delivered"
        assert layers(record) == [(x.path, x.type, x.verdict, x.reason) for x in case.layers], case.name
        assert case.marker in (record["text_body"] or ""), case.name
        for check, layer in zip(record["smime"]["signatures"], case.layers, strict=True):
            assert len(check["signers"]) == len(layer.signers), case.name
            if layer.verdict == "valid":
                want = {pki[s].cert.fingerprint(hashes.SHA256()).hex() for s, _ in layer.signers}
                assert {s["sha256"] for s in check["signers"]} == want, case.name
            if layer.oracle is not None:
                judged = record["raw"] if layer.path == "" else layer.oracle
                oracle_jobs.append((case.name, layer.path, judged, layer.openssl_expected))
    with ThreadPoolExecutor(max_workers=8) as ex:
        said = list(ex.map(lambda job: openssl_verdict(job[2], pki.root, at=None), oracle_jobs))
    wrong = [(name, path, want) for (name, path, _, want), got in zip(oracle_jobs, said, strict=True) if got != want]
    assert not wrong, f"openssl disagrees (case, layer, expected openssl verdict): {wrong}"

    # -- PKITS: openssl on each record's raw bytes, at the time of the test
    anchor = tmp_path / "anchor.pem"
    openssl("x509", "-inform", "DER", "-in", PKITS_ANCHOR, "-out", anchor)
    listed = pkits_differences()
    pk_records = {name: records[hashlib.sha256(raw).hexdigest()] for name, raw in pkits.items()}

    def check_raw(record: dict[str, Any]) -> bool:
        return openssl_verdict(record["raw"], anchor, *PKITS_ORACLE_FLAGS, at=None)

    with ThreadPoolExecutor(max_workers=8) as ex:
        theirs = dict(zip(pk_records, ex.map(check_raw, pk_records.values()), strict=True))
    mismatched = []
    for name, record in pk_records.items():
        assert record["raw"] == pkits[name]
        ((layer, kind, verdict, reason),) = layers(record)
        assert (layer, kind) == ("", "detached")
        ours = verdict if reason is None else f"{verdict}/{reason}"
        if name in listed:
            if (ours, "valid" if theirs[name] else "invalid") != (listed[name].ours, listed[name].openssl):
                mismatched.append((name, ours, theirs[name], "listed"))
        elif (verdict == "valid") != theirs[name]:
            mismatched.append((name, ours, theirs[name], "unlisted"))
    assert not mismatched, mismatched
    assert sum(theirs.values()) == 148  # as in the unit test: the bytes and the oracle are the same
    valid_ones = {n for n, r in pk_records.items() if layers(r)[0][2] == "valid"}
    assert "SignedValidSignaturesTest1.eml" in valid_ones
    assert len(valid_ones) == 148 - sum(d.openssl == "valid" for d in listed.values()) + sum(
        d.ours == "valid" for d in listed.values()
    )


def test_require_valid_signature_dead_letters_keep_the_original_and_leak_nothing(  # type: ignore[no-untyped-def]
    services, topic: str, tmp_path: Path, pki: SignPki, cases: dict[str, Case]
) -> None:
    services.dovecot.clear(SIG_USER)
    secret = cases["tampered_then_encrypted"].marker
    expired_marker = cases["triple_wrapped_inner_expired"].marker
    unsigned = plain_mail("unsigned", f"unsigned.{uuid.uuid4().hex[:6]}", "not signed at all")
    seeded = {
        "rsa_detached": (cases["rsa_detached"].raw, None),
        "rsa_opaque_stream": (cases["rsa_opaque_stream"].raw, None),
        "signed_then_encrypted": (cases["signed_then_encrypted"].raw, None),
        "triple_wrapped": (cases["triple_wrapped"].raw, None),
        "tampered_body": (cases["tampered_body"].raw, "signature_invalid"),
        "unknown_ca": (cases["unknown_ca"].raw, "signature_invalid"),
        "tampered_then_encrypted": (cases["tampered_then_encrypted"].raw, "signature_invalid"),
        "triple_wrapped_inner_expired": (cases["triple_wrapped_inner_expired"].raw, "signature_invalid"),
        "unsigned": (crlf(unsigned), "not_signed"),
    }
    for raw, _ in seeded.values():
        services.dovecot.put(SIG_USER, raw)
    for needle in (secret, expired_marker, pki["expired"].email):  # only ever sent encrypted
        assert_no_leak(needle, *(raw for raw, _ in seeded.values()))
    spool = tmp_path / "spool"
    spool.mkdir()
    cfg = write_config(
        tmp_path / "c.yaml",
        services.bootstrap,
        topic,
        [
            mailbox("strict", SIG_USER, services.dovecot.pop3s_port, services.cafile, smime={
                "keys": [{"file": str(pki.key_file("alice")), "label": "alice"}],
                "verify": {"trust_store": [str(pki.root)]},
                "require_valid_signature": True,
            }),
        ],
        runtime={"spool_threshold_bytes": 0, "spool_directory": str(spool)},
        delivery={"transactional_id_prefix": f"sigstrict-{topic}"},
        ledger={"topic": f"{topic}.ledger"},
    )  # fmt: skip
    stdout, stderr = poll_once(cfg, {"PW_STRICT": f"{SIG_USER}-pw"})
    good = [n for n, (_, reason) in seeded.items() if reason is None]
    bad = [n for n, (_, reason) in seeded.items() if reason is not None]
    assert summary_counts(stdout, "strict") == (len(good), len(bad), len(seeded), len(seeded))

    published = by_sha([c.record for c in consume_all(services.bootstrap, topic, expect=len(good), decode=mail_record)])
    assert set(published) == {hashlib.sha256(seeded[n][0]).hexdigest() for n in good}
    for name in good:
        record = published[hashlib.sha256(seeded[name][0]).hexdigest()]
        assert {s["verdict"] for s in record["smime"]["signatures"]} == {"valid"}, name
        assert record["smime"]["signatures"], name

    dead = by_sha([
        c.record for c in consume_all(services.bootstrap, f"{topic}.dlq", expect=len(bad), decode=decode_dead_letter)
    ])  # fmt: skip
    assert len(dead) == len(bad)
    for name in bad:
        raw, reason = seeded[name]
        d = dead[hashlib.sha256(raw).hexdigest()]
        assert (d["stage"], d["reason"]) == ("verify", reason), (name, d["reason"], d["error_message"])
        assert d["raw"] == raw, f"{name}: the dead letter holds the original bytes"
        if reason == "signature_invalid":  # names the layer and why, nothing else
            first_bad = next(x for x in cases[name].layers if x.verdict != "valid")
            where = f"part {first_bad.path}" if first_bad.path else "message"
            assert where in d["error_message"] and str(first_bad.reason) in d["error_message"], d["error_message"]
    inner = dead[hashlib.sha256(seeded["tampered_then_encrypted"][0]).hexdigest()]
    assert b"application/pkcs7-mime" in inner["raw"] and b"enveloped-data" in inner["raw"]  # still encrypted
    assert services.dovecot.count(SIG_USER) == 0

    # The decrypted text of the two mails whose inner signature failed, and who signed inside
    # the triple-wrapped one (the outer signer is a fact of the clear layer): nowhere.
    haystacks = [stdout.encode(), stderr.encode(), json.dumps(list(dead.values()), default=repr).encode()]
    for t in (topic, f"{topic}.dlq", f"{topic}.ledger"):
        haystacks += all_values(services.bootstrap, t)
    haystacks += [p.read_bytes() for p in spool.rglob("*") if p.is_file()]
    inner_signer = pki.facts("expired")
    for needle in (secret, expired_marker, inner_signer.sha256, pki["expired"].email, "Olga Old"):
        assert_no_leak(needle, *haystacks)
