"""SASL client mechanisms (connector.protocol.sasl): RFC known-answer vectors, the POP3 AUTH
line framing (RFC 5034 §4), OAuth error paths, mechanism choice, secrecy, and an NTLM round
trip against pyspnego's own acceptor. No sockets."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import spnego
import spnego.exceptions
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.errors import ConfigError, Pop3AuthError, Pop3ProtocolError
from connector.protocol.sasl import (
    CANCEL,
    PLAINTEXT_MECHANISMS,
    STRENGTH,
    TOKEN_MECHANISMS,
    CramMd5,
    Login,
    Mechanism,
    Ntlm,
    OAuthBearer,
    Plain,
    SaslExchange,
    Scram,
    XOAuth2,
    apop_digest,
    choose,
    create,
    encode_initial_response,
    encode_response,
    extract_apop_timestamp,
    is_continuation,
    parse_continuation,
    saslprep,
)

SECRET = "hunter2-SECRET-pw"
TOKEN = "ya29.SECRETtoken-abc_DEF~ghi+jkl/mno=="


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def cont(data: bytes) -> bytes:
    """A server continuation line carrying ``data``."""
    return b"+ " + b64(data) + b"\r\n"


# ---------------------------------------------------------------------------- known answers


def test_cram_md5_rfc2195_example() -> None:
    # RFC 2195 §2 example, as a POP3 exchange.
    ex = SaslExchange(CramMd5("tim", "tanstaaftanstaaf"))
    assert ex.start() == b"AUTH CRAM-MD5\r\n"
    reply = ex.reply(b"+ PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n")
    assert reply == b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw\r\n"
    assert base64.b64decode(reply) == b"tim b913a602c7eda7a495b4e6e7334d3890"
    ex.succeeded()


def test_cram_md5_refuses_empty_or_second_challenge() -> None:
    with pytest.raises(Pop3ProtocolError):
        CramMd5("tim", "pw").respond(b"")
    mech = CramMd5("tim", "pw")
    mech.respond(b"<1@x>")
    with pytest.raises(Pop3ProtocolError):
        mech.respond(b"<2@x>")


def test_plain_rfc4616_examples() -> None:
    # RFC 4616 §4: "tim"/"tanstaaftanstaaf" without authzid; "Kurt" acting as "Ursel".
    assert Plain("tim", "tanstaaftanstaaf").initial_response() == b"\x00tim\x00tanstaaftanstaaf"
    assert Plain("Kurt", "xipj3plmq", authzid="Ursel").initial_response() == b"Ursel\x00Kurt\x00xipj3plmq"


def test_plain_rfc5034_example_line() -> None:
    # RFC 5034 §6 example: AUTH PLAIN with an initial response.
    ex = SaslExchange(Plain("test", "test", authzid="test"))
    assert ex.start() == b"AUTH PLAIN dGVzdAB0ZXN0AHRlc3Q=\r\n"
    assert ex.redacted_start() == "AUTH PLAIN ***"
    ex.succeeded()


def test_plain_utf8_and_nul_refused() -> None:
    assert Plain("jörg", "pässwörd").initial_response() == "\x00jörg\x00pässwörd".encode()
    with pytest.raises(ConfigError) as info:
        Plain("tim", "bad\x00" + SECRET)
    assert SECRET not in str(info.value)


def test_plain_unexpected_challenge_cancels() -> None:
    ex = SaslExchange(Plain("tim", "pw"))
    ex.start()
    assert ex.reply(cont(b"what?")) == CANCEL
    assert isinstance(ex.failure, Pop3ProtocolError)
    with pytest.raises(Pop3AuthError):
        ex.succeeded()  # +OK after a cancel is not a login we accept


def test_login_exchange() -> None:
    ex = SaslExchange(Login("tim", "tanstaaf"))
    assert ex.start() == b"AUTH LOGIN\r\n"
    assert ex.reply(b"+ VXNlcm5hbWU6\r\n") == b64(b"tim") + b"\r\n"  # "Username:"
    assert ex.reply(b"+ UGFzc3dvcmQ6\r\n") == b64(b"tanstaaf") + b"\r\n"  # "Password:"
    assert ex.reply(cont(b"more?")) == CANCEL


def test_login_follows_order_when_prompts_are_unusual() -> None:
    mech = Login("tim", "tanstaaf")
    assert mech.respond(b"") == b"tim"
    assert mech.respond(b"") == b"tanstaaf"


def test_xoauth2_google_example() -> None:
    # Google's "OAuth 2.0 Mechanism" page, initial client response example.
    mech = XOAuth2("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
    ex = SaslExchange(mech, max_line=None)
    assert ex.start() == (
        b"AUTH XOAUTH2 dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNS"
        b"bGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ==\r\n"
    )


def test_xoauth2_error_json_and_empty_reply() -> None:
    # Google's error example; the client must answer with an empty line, then the server sends -ERR.
    mech = XOAuth2("someuser@example.com", TOKEN)
    ex = SaslExchange(mech, max_line=None)
    ex.start()
    line = b"+ eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIG1hYyIsInNjb3BlIjoiaHR0cHM6Ly9tYWlsLmdvb2dsZS5jb20vIn0K\r\n"
    assert ex.reply(line) == b"\r\n"
    assert ex.error_json == {"status": "401", "schemes": "bearer mac", "scope": "https://mail.google.com/"}
    assert ex.failure is None


def test_xoauth2_dovecot_error_json() -> None:
    mech = XOAuth2("bob", TOKEN)
    mech.initial_response()
    error = {"status": "401", "schemes": "bearer", "scope": "mail"}
    assert mech.respond(json.dumps(error).encode()) == b""
    assert mech.error_json == error


def test_xoauth2_two_step_exchange_online() -> None:
    # Exchange Online: AUTH XOAUTH2, server "+ ", then the message.
    mech = create("XOAUTH2-TWO-STEP", username="user@contoso.com", token=TOKEN)
    assert isinstance(mech, XOAuth2) and mech.two_step and mech.name == "XOAUTH2"
    ex = SaslExchange(mech, max_line=None)
    assert ex.start() == b"AUTH XOAUTH2\r\n"
    assert ex.redacted_start() == "AUTH XOAUTH2"
    reply = ex.reply(b"+ \r\n")
    assert base64.b64decode(reply) == b"user=user@contoso.com\x01auth=Bearer " + TOKEN.encode() + b"\x01\x01"
    assert ex.reply(cont(b'{"status":"401"}')) == b"\r\n"
    assert ex.error_json == {"status": "401"}


def test_oauthbearer_rfc7628_example() -> None:
    # RFC 7628 §4.1 (successful bearer token exchange), initial client response.
    mech = OAuthBearer(
        "user@example.com", "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==", host="server.example.com", port=143
    )
    assert mech.initial_response() == (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=143"
        b"\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
    )
    assert encode_initial_response(mech.initial_response() or b"") == (
        "bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9MTQzAWF1dGg9QmVhcmVyI"
        "HZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
    )


def test_oauthbearer_without_host_and_port_escapes_saslname() -> None:
    mech = OAuthBearer("a=b,c", "tok")
    assert mech.initial_response() == b"n,a=a=3Db=2Cc,\x01auth=Bearer tok\x01\x01"


def test_oauthbearer_error_rfc7628_failure_example() -> None:
    # RFC 7628 §4.3: error JSON challenge, the client answers with the dummy %x01 ("AQ==").
    ex = SaslExchange(OAuthBearer("user@example.com", TOKEN, host="server.example.com", port=143), max_line=None)
    ex.start()
    line = (
        b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NvcGUiOiJleGFtcGxlX3Njb3BlIiwib3BlbmlkLWNvbmZpZ3VyYXRpb24i"
        b"OiJodHRwczovL2V4YW1wbGUuY29tLy53ZWxsLWtub3duL29wZW5pZC1jb25maWd1cmF0aW9uIn0=\r\n"
    )
    assert ex.reply(line) == b"AQ==\r\n"
    assert ex.error_json == {
        "status": "invalid_token",
        "scope": "example_scope",
        "openid-configuration": "https://example.com/.well-known/openid-configuration",
    }


def test_oauth_non_json_error_is_still_answered() -> None:
    mech = OAuthBearer("bob", TOKEN)
    mech.initial_response()
    assert mech.respond(b"not json") == b"\x01"
    assert mech.error_json == {"status": "unknown"}
    with pytest.raises(Pop3ProtocolError):
        mech.respond(b"again")


@pytest.mark.parametrize("bad", ["with space ", "Bearer ", "abc\n", "abc\x01", "tok=en", "ä"])
def test_bad_tokens_refused_without_echo(bad: str) -> None:
    for mechanism in (XOAuth2, OAuthBearer):
        with pytest.raises(ConfigError) as info:
            mechanism("bob", bad + SECRET)
        assert SECRET not in str(info.value)


def test_bad_token_is_config_error() -> None:
    with pytest.raises(ConfigError, match="RFC 6750"):
        XOAuth2("bob", TOKEN + "\n")
    with pytest.raises(ConfigError, match="RFC 6750"):
        OAuthBearer("bob", "Bearer " + TOKEN)


def test_scram_sha1_rfc5802_example() -> None:
    # RFC 5802 §5: user "user", password "pencil".
    mech = Scram("user", "pencil", name="SCRAM-SHA-1", nonce="fyko+d2lbbFgONRv9qkxdawL")
    ex = SaslExchange(mech)
    assert ex.start() == b"AUTH SCRAM-SHA-1 " + b64(b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL") + b"\r\n"
    reply = ex.reply(cont(b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"))
    assert base64.b64decode(reply) == (
        b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
    )
    assert ex.reply(cont(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")) == b"\r\n"
    ex.succeeded()


def _scram256_after_first() -> Scram:
    # RFC 7677 §3: user "user", password "pencil".
    mech = Scram("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert mech.initial_response() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = mech.respond(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    assert final == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    return mech


def test_scram_sha256_rfc7677_example() -> None:
    mech = _scram256_after_first()
    assert mech.respond(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=") == b""
    mech.check_complete()


def test_scram_wrong_server_signature_cancels() -> None:
    ex = SaslExchange(Scram("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO"))
    ex.start()
    ex.reply(cont(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"))
    assert ex.reply(cont(b"v=" + b64(b"\x00" * 32))) == CANCEL
    assert isinstance(ex.failure, Pop3AuthError)
    with pytest.raises(Pop3AuthError, match="server signature"):
        ex.succeeded()


def test_scram_ok_without_server_final_is_refused() -> None:
    mech = _scram256_after_first()
    with pytest.raises(Pop3AuthError, match="RFC 5802"):
        mech.check_complete()


def test_scram_server_error_attribute() -> None:
    mech = _scram256_after_first()
    with pytest.raises(Pop3AuthError, match="invalid-proof"):
        mech.respond(b"e=invalid-proof")


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=OTHERnonce,s=QSXCR+Q6sek8bf92,i=4096",  # does not extend our nonce
        b"r=abc,s=QSXCR+Q6sek8bf92,i=4096",  # equals our nonce (no server part)
        b"r=abcdef,s=QSXCR+Q6sek8bf92,i=0",
        b"r=abcdef,s=QSXCR+Q6sek8bf92,i=999999999",  # a hostile server making us spin
        b"r=abcdef,s=not-base64!,i=4096",
        b"r=abcdef,i=4096",
        b"m=ext,r=abcdef,s=QSXCR+Q6sek8bf92,i=4096",
        b"garbage",
        b"\xff\xfe",
    ],
)
def test_scram_malformed_server_first(server_first: bytes) -> None:
    mech = Scram("user", "pencil", nonce="abc")
    mech.initial_response()
    with pytest.raises(Pop3ProtocolError):
        mech.respond(server_first)


def test_scram_username_escaping_and_nonce() -> None:
    assert Scram("a=b,c", "pw", nonce="n").initial_response() == b"n,,n=a=3Db=2Cc,r=n"
    generated = Scram("user", "pw").initial_response() or b""
    assert re.fullmatch(rb"n,,n=user,r=[A-Za-z0-9_-]{32}", generated)
    with pytest.raises(ConfigError):
        Scram("user", "pw", nonce="a,b")
    with pytest.raises(ConfigError):
        Scram("user", "pw", name="SCRAM-MD5")


# ---------------------------------------------------------------------------- SASLprep


@pytest.mark.parametrize(
    ("raw", "prepared"),
    [
        ("I\u00adX", "IX"),  # RFC 4013 §3 examples: SOFT HYPHEN mapped to nothing
        ("user", "user"),
        ("USER", "USER"),
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),
        ("a\u00a0b", "a b"),  # non-ASCII space -> SPACE
    ],
)
def test_saslprep_rfc4013_examples(raw: str, prepared: str) -> None:
    assert saslprep(raw) == prepared


@pytest.mark.parametrize("raw", ["\u0007", "\u0627\u0031", "a\ufffdb"])
def test_saslprep_prohibited(raw: str) -> None:
    # RFC 4013 §3: "<U+0007>" is prohibited, "<U+0627><U+0031>" breaks the bidi rule.
    with pytest.raises(ConfigError) as info:
        saslprep(raw, what="password")
    assert "password" in str(info.value) and raw not in str(info.value)


# ---------------------------------------------------------------------------- APOP


def test_apop_rfc1939_example() -> None:
    greeting = "POP3 server ready <1896.697170952@dbc.mtview.ca.us>"
    timestamp = extract_apop_timestamp(greeting)
    assert timestamp == "<1896.697170952@dbc.mtview.ca.us>"
    assert apop_digest(timestamp, "tanstaaf") == "c4c9334bac560ecc979e58001b3e22fb"


@pytest.mark.parametrize(
    ("greeting", "expected"),
    [
        ("+OK Dovecot ready.", None),
        ("+OK ready <no-at-sign>", None),
        ("+OK <a@b> and <c@d>", "<a@b>"),
        ("+OK <x.y@host> trailing", "<x.y@host>"),
        ("+OK < spaced@host>", None),
    ],
)
def test_extract_apop_timestamp(greeting: str, expected: str | None) -> None:
    assert extract_apop_timestamp(greeting) == expected


# ---------------------------------------------------------------------------- framing (RFC 5034 §4)


def test_continuation_lines() -> None:
    assert is_continuation(b"+ \r\n") and is_continuation(b"+\r\n") and is_continuation(b"+ YWJj")
    assert not is_continuation(b"+OK\r\n") and not is_continuation(b"-ERR no\r\n")
    assert parse_continuation(b"+\r\n") == b""
    assert parse_continuation(b"+ \r\n") == b""
    assert parse_continuation(b"+ YWJj  \r\n") == b"abc"
    with pytest.raises(Pop3ProtocolError):
        parse_continuation(b"+OK\r\n")
    with pytest.raises(Pop3ProtocolError, match="base64"):
        parse_continuation(b"+ Username:\r\n")


@given(st.binary(max_size=300))
def test_response_roundtrip(data: bytes) -> None:
    line = encode_response(data)
    assert line.endswith(b"\r\n") and b" " not in line
    assert parse_continuation(b"+ " + line) == data


def test_empty_initial_response_is_equals_sign() -> None:
    class Empty:
        name = "EXTERNAL"
        plaintext = False
        error_json: dict[str, object] | None = None

        def initial_response(self) -> bytes | None:
            return b""

        def respond(self, challenge: bytes) -> bytes:
            raise Pop3ProtocolError("no")

        def check_complete(self) -> None:
            return None

    mech: Mechanism = Empty()
    assert SaslExchange(mech).start() == b"AUTH EXTERNAL =\r\n"
    assert encode_initial_response(b"") == "="
    assert encode_response(b"") == b"\r\n"


def test_long_initial_response_is_deferred_to_first_challenge() -> None:
    # RFC 5034 §4: AUTH line with initial response limited to 255 octets.
    jwt = "eyJ" + "a" * 1500
    ex = SaslExchange(XOAuth2("bob", jwt))
    assert ex.start() == b"AUTH XOAUTH2\r\n"
    assert ex.redacted_start() == "AUTH XOAUTH2"
    reply = ex.reply(b"+ \r\n")
    assert base64.b64decode(reply) == b"user=bob\x01auth=Bearer " + jwt.encode() + b"\x01\x01"
    assert ex.reply(cont(b'{"status":"401"}')) == b"\r\n"  # the error path still works afterwards
    assert ex.error_json == {"status": "401"}


def test_auth_line_limit_boundary() -> None:
    # "AUTH XOAUTH2 " (13) + base64 + CRLF (2) <= 255: 240 base64 chars = 180 raw bytes fit exactly;
    # the message is "user=u\x01auth=Bearer " (19) + token + "\x01\x01" (2).
    line = SaslExchange(XOAuth2("u", "t" * 159)).start()
    assert len(line) == 255 and line.startswith(b"AUTH XOAUTH2 ")
    assert SaslExchange(XOAuth2("u", "t" * 160)).start() == b"AUTH XOAUTH2\r\n"
    assert len(SaslExchange(XOAuth2("u", "t" * 160), max_line=None).start()) == 259


def test_deferred_initial_response_needs_empty_challenge() -> None:
    ex = SaslExchange(XOAuth2("bob", "eyJ" + "a" * 400))
    ex.start()
    assert ex.reply(cont(b"surprise")) == CANCEL
    assert isinstance(ex.failure, Pop3ProtocolError)
    with pytest.raises(Pop3ProtocolError, match="cancelled"):
        ex.reply(b"+ \r\n")


def test_exchange_misuse() -> None:
    ex = SaslExchange(Login("u", "p"))
    with pytest.raises(Pop3ProtocolError):
        ex.reply(b"+ \r\n")
    ex.start()
    with pytest.raises(Pop3ProtocolError):
        ex.start()


# ---------------------------------------------------------------------------- choice


def test_strength_order_documented() -> None:
    assert STRENGTH == (
        "OAUTHBEARER",
        "XOAUTH2",
        "XOAUTH2-TWO-STEP",
        "SCRAM-SHA-256",
        "SCRAM-SHA-1",
        "CRAM-MD5",
        "NTLM",
        "PLAIN",
        "LOGIN",
    )


def test_choose_strongest_offered_and_allowed() -> None:
    offered = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "XOAUTH2", "OAUTHBEARER"]
    everything = list(STRENGTH)
    assert choose(offered, everything, have_token=True) == "OAUTHBEARER"
    assert choose(offered, everything, have_token=False) == "SCRAM-SHA-256"
    assert choose(offered, ["LOGIN", "PLAIN"], have_token=False) == "PLAIN"  # order of allowed does not matter
    assert choose(["plain", "login"], ["login"], have_token=False) == "LOGIN"  # case-insensitive
    assert choose(["XOAUTH2", "PLAIN"], ["USER", "APOP", "XOAUTH2-TWO-STEP", "PLAIN"], True) == "XOAUTH2-TWO-STEP"
    assert choose(["XOAUTH2"], ["XOAUTH2-TWO-STEP", "XOAUTH2"], True) == "XOAUTH2"
    assert choose(["CRAM-MD5", "NTLM", "PLAIN"], ["ntlm", "plain", "cram-md5"], False) == "CRAM-MD5"


def test_choose_nothing_fits_names_both_sides() -> None:
    with pytest.raises(Pop3AuthError) as info:
        choose(["PLAIN", "LOGIN"], ["CRAM-MD5", "SCRAM-SHA-256"], have_token=False)
    message = str(info.value)
    assert "server offers [LOGIN PLAIN]" in message and "allowed [CRAM-MD5 SCRAM-SHA-256]" in message
    with pytest.raises(Pop3AuthError, match="need oauth2_token or an oauth2 token source"):
        choose(["XOAUTH2"], ["XOAUTH2"], have_token=False)
    with pytest.raises(Pop3AuthError, match=r"offers \[none\]"):
        choose([], ["PLAIN"], have_token=False)


def test_choose_unknown_allowed_is_config_error() -> None:
    with pytest.raises(ConfigError, match="DIGEST-MD5"):
        choose(["PLAIN"], ["DIGEST-MD5", "PLAIN"], have_token=False)


# ---------------------------------------------------------------------------- flags, factory, secrecy


def _all_mechanisms() -> list[Mechanism]:
    return [
        create(name, username="alice", password=SECRET, token=TOKEN, host="mail.example", port=995, domain="CORP")
        for name in STRENGTH
    ]


def test_plaintext_flags() -> None:
    flags = {m.name + ("-TWO-STEP" if getattr(m, "two_step", False) else ""): m.plaintext for m in _all_mechanisms()}
    assert flags == {
        "OAUTHBEARER": True,
        "XOAUTH2": True,
        "XOAUTH2-TWO-STEP": True,
        "SCRAM-SHA-256": False,
        "SCRAM-SHA-1": False,
        "CRAM-MD5": False,
        "NTLM": False,
        "PLAIN": True,
        "LOGIN": True,
    }
    assert {name for name, plain in flags.items() if plain} == PLAINTEXT_MECHANISMS
    assert TOKEN_MECHANISMS <= PLAINTEXT_MECHANISMS


def test_create_types_and_missing_credentials() -> None:
    kinds = [type(m) for m in _all_mechanisms()]
    assert kinds == [OAuthBearer, XOAuth2, XOAuth2, Scram, Scram, CramMd5, Ntlm, Plain, Login]
    with pytest.raises(ConfigError, match="token"):
        create("OAUTHBEARER", username="a", password="pw")
    with pytest.raises(ConfigError, match="password"):
        create("PLAIN", username="a", token=TOKEN)
    with pytest.raises(ConfigError, match="unknown"):
        create("GSSAPI", username="a", password="pw")


def test_secrets_never_in_repr() -> None:
    for mech in _all_mechanisms():
        for text in (repr(mech), str(mech), repr(SaslExchange(mech))):
            assert SECRET not in text and TOKEN not in text
            assert "alice" in text


def test_secrets_never_in_errors() -> None:
    errors: list[Exception] = []
    for build in (
        lambda: Plain("a", SECRET + "\x00"),
        lambda: CramMd5("a", SECRET + "\udcff"),
        lambda: Scram("a", SECRET + "\u0007"),
        lambda: XOAuth2("a", TOKEN + " "),
        lambda: OAuthBearer("a", "Bearer " + TOKEN),
    ):
        with pytest.raises(ConfigError) as info:
            build()
        errors.append(info.value)
    mech = Scram("a", SECRET, nonce="abc")
    mech.initial_response()
    mech.respond(b"r=abcdef,s=QSXCR+Q6sek8bf92,i=4096")
    with pytest.raises(Pop3AuthError) as auth_info:
        mech.respond(b"v=" + b64(b"x" * 32))
    errors.append(auth_info.value)
    for exc in errors:
        assert SECRET not in str(exc) and TOKEN not in str(exc)
        assert exc.__cause__ is None or SECRET not in str(exc.__cause__)


# ---------------------------------------------------------------------------- NTLM


@pytest.fixture
def ntlm_acceptor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> spnego.ContextProxy:
    """pyspnego's own NTLM acceptor with one local credential (CORP\\alice)."""
    store = tmp_path / "ntlm_users"
    store.write_text(f"CORP:alice:{SECRET}\n")
    monkeypatch.setenv("NTLM_USER_FILE", str(store))
    monkeypatch.delenv("LM_COMPAT_LEVEL", raising=False)
    monkeypatch.setenv("NETBIOS_COMPUTER_NAME", "TESTHOST")
    return spnego.server(protocol="ntlm", options=spnego.NegotiateOptions.use_ntlm)


def test_ntlm_round_trip_against_spnego_acceptor(ntlm_acceptor: spnego.ContextProxy) -> None:
    ex = SaslExchange(Ntlm("alice", SECRET, domain="CORP"))
    assert ex.start() == b"AUTH NTLM\r\n"  # [MS-POP3]: no initial response
    negotiate = base64.b64decode(ex.reply(b"+ \r\n"))
    assert negotiate[:12] == b"NTLMSSP\x00\x01\x00\x00\x00"  # [MS-NLMP] 2.2.1.1 NEGOTIATE_MESSAGE
    challenge = ntlm_acceptor.step(negotiate)
    assert challenge is not None and challenge[:12] == b"NTLMSSP\x00\x02\x00\x00\x00"
    authenticate = base64.b64decode(ex.reply(cont(challenge)))
    assert authenticate[:12] == b"NTLMSSP\x00\x03\x00\x00\x00"  # AUTHENTICATE_MESSAGE
    assert ntlm_acceptor.step(authenticate) is None
    assert ntlm_acceptor.complete
    assert ntlm_acceptor.client_principal == "CORP\\alice"
    ex.succeeded()
    assert ex.reply(cont(b"extra")) == CANCEL  # nothing is expected after AUTHENTICATE


def test_ntlm_wrong_password_is_rejected_by_acceptor(ntlm_acceptor: spnego.ContextProxy) -> None:
    mech = Ntlm("alice", "wrong-password", domain="CORP")
    challenge = ntlm_acceptor.step(mech.respond(b""))
    assert challenge is not None
    with pytest.raises(spnego.exceptions.SpnegoError):
        ntlm_acceptor.step(mech.respond(challenge))


def test_ntlm_bad_challenge_is_protocol_error() -> None:
    mech = Ntlm("alice", SECRET)
    with pytest.raises(Pop3ProtocolError):
        mech.respond(b"not empty")  # the first challenge must be empty
    mech = Ntlm("alice", SECRET)
    mech.respond(b"")
    with pytest.raises(Pop3ProtocolError, match="CHALLENGE") as info:
        mech.respond(b"NTLMSSP\x00\x02\x00\x00\x00garbage")
    assert SECRET not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_ntlm_garbage_challenge_never_leaks_library_errors(tail: bytes) -> None:
    # pyspnego raises ValueError, struct.error, KeyError, ... on malformed input; callers see only ours.
    mech = Ntlm("alice", SECRET)
    mech.respond(b"")
    try:
        out = mech.respond(b"NTLMSSP\x00\x02\x00\x00\x00" + tail)
    except Pop3ProtocolError as exc:
        assert SECRET not in str(exc)
    else:
        assert out.startswith(b"NTLMSSP\x00\x03\x00\x00\x00")
