"""The POP3 half of ``pop3-kafka doctor``: every step from DNS to UIDL, with a fix for each failure.

Read-only: the session ends with RSET + QUIT (nothing is deleted); no mail is retrieved.
Secrets never appear in findings.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import socket
import ssl
from typing import Any

from connector.auth.oauth2 import ClientCredentialsSource, TokenSource
from connector.config.model import MailboxConfig
from connector.delivery.doctor import Finding
from connector.errors import ConnectorError, OAuthError, Pop3AuthError, Pop3TlsError
from connector.protocol import Pop3Session, make_tls_context
from connector.protocol.sasl import choose
from connector.runtime.login import DEFAULT_PASSWORD_MECHANISMS, DEFAULT_TOKEN_MECHANISMS, login
from connector.runtime.sessions import end_without_deletes, open_session


def _name(mb: MailboxConfig, check: str) -> str:
    return f"pop3[{mb.id}].{check}"


def _cert_facts(cert: dict[str, Any]) -> str:
    subject = ", ".join("=".join(x) for rdn in cert.get("subject", ()) for x in rdn)
    sans = ", ".join(v for _, v in cert.get("subjectAltName", ()))
    not_after = cert.get("notAfter")
    days = ""
    if not_after:
        expiry = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), tz=dt.UTC)
        days = f"; expires {expiry:%Y-%m-%d} ({(expiry - dt.datetime.now(dt.UTC)).days} days)"
    return f"subject {subject or '-'}; SANs {sans or '-'}{days}"


#: Exchange Online's application permission for POP3 (app-only tokens carry it in ``roles``).
EXCHANGE_POP_ROLE = "POP.AccessAsApp"


def _jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT access token, or {} when the token is opaque. Only for naming a
    few non-secret claims (aud, roles, scp); the signature is not checked (not our token)."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def _token_finding(mb: MailboxConfig, source: TokenSource) -> Finding:
    """Fetch a token as its own check, so a token endpoint problem is told apart from a POP3 one."""
    try:
        token = source.token()
    except OAuthError as exc:
        return Finding(_name(mb, "oauth2"), False, str(exc), exc.hint or "check the mailbox's oauth2 settings")
    claims = _jwt_claims(token)
    facts = []
    for claim in ("aud", "roles", "scp"):
        value = claims.get(claim)
        if isinstance(value, list):
            value = " ".join(str(v) for v in value)
        if isinstance(value, str) and value:
            facts.append(f"{claim} {value[:200]}")
    lifetime = getattr(source, "lifetime", None)
    if isinstance(lifetime, float):
        facts.append(f"valid for {lifetime:.0f} s")
    detail = f"{source.describe()}: got a token" + (f" ({'; '.join(facts)})" if facts else "")
    roles = claims.get("roles")
    if (
        isinstance(source, ClientCredentialsSource)
        and "outlook.office365.com" in str(claims.get("aud", ""))
        and not (isinstance(roles, list) and EXCHANGE_POP_ROLE in roles)
    ):
        # Exchange Online refuses an app-only POP3 login unless the token carries the role.
        return Finding(
            _name(mb, "oauth2"),
            False,
            f"{detail}, but without the role {EXCHANGE_POP_ROLE}",
            "in Entra ID, add the API permission Office 365 Exchange Online > Application permissions > "
            f"{EXCHANGE_POP_ROLE} to the app and grant admin consent (docs/pop3.md, Exchange Online)",
        )
    return Finding(_name(mb, "oauth2"), True, detail)


def check_mailbox(mb: MailboxConfig, *, timeout: float = 10.0) -> list[Finding]:
    out: list[Finding] = []
    where = f"{mb.host}:{mb.port}"
    source = mb.token_source
    if source is not None:
        out.append(_token_finding(mb, source))
    try:
        addrs = socket.getaddrinfo(mb.host, mb.port, type=socket.SOCK_STREAM)
        out.append(Finding(_name(mb, "dns"), True, f"{mb.host} -> {', '.join(sorted({str(a[4][0]) for a in addrs}))}"))
    except OSError as exc:
        out.append(Finding(_name(mb, "dns"), False, f"{mb.host}: {exc}", "check the mailbox's host"))
        return out
    try:
        with socket.create_connection((mb.host, mb.port), timeout=timeout):
            pass
        out.append(Finding(_name(mb, "tcp"), True, f"{where} accepts connections"))
    except OSError as exc:
        out.append(
            Finding(_name(mb, "tcp"), False, f"{where}: {exc}", "check port, firewall, and that the server runs")
        )
        return out
    if mb.tls == "implicit":
        # An independent handshake, to report the certificate whatever verification says.
        try:
            ctx = make_tls_context(mb.tls_ca_file, verify=mb.tls_verify)
            with (
                socket.create_connection((mb.host, mb.port), timeout=timeout) as raw,
                ctx.wrap_socket(raw, server_hostname=mb.host) as tls,
            ):
                cert = tls.getpeercert() or {}
                out.append(Finding(_name(mb, "tls"), True, f"{tls.version()}, verified; {_cert_facts(cert)}"))
        except ssl.SSLCertVerificationError as exc:
            out.append(
                Finding(
                    _name(mb, "tls"),
                    False,
                    f"certificate not verified: {exc.verify_message}",
                    "set tls_ca_file to the CA that signed the server's certificate, or fix the host name",
                )
            )
            return out
        except (ssl.SSLError, OSError, ConnectorError) as exc:
            out.append(Finding(_name(mb, "tls"), False, f"TLS handshake failed: {exc}", "check tls and port"))
            return out
    try:
        session = open_session(mb)
    except Pop3TlsError as exc:
        out.append(Finding(_name(mb, "tls"), False, str(exc), "set tls_ca_file, or check tls: starttls/implicit"))
        return out
    except ConnectorError as exc:
        out.append(Finding(_name(mb, "connect"), False, exc.describe(), "check host, port and tls"))
        return out
    try:
        if mb.tls == "starttls":
            out.append(Finding(_name(mb, "tls"), True, "STLS upgrade verified (RFC 2595)"))
        caps = session.capabilities()
        out.append(Finding(_name(mb, "capa"), True, " ".join(sorted(caps)) or "the server does not answer CAPA"))
        out.append(_mechanism_finding(mb, caps))
        try:
            used = login(session, mb)
            out.append(Finding(_name(mb, "login"), True, f"logged in with {used}"))
        except OAuthError as exc:
            out.append(Finding(_name(mb, "login"), False, str(exc), exc.hint or "check the mailbox's oauth2 settings"))
            return out
        except Pop3AuthError as exc:
            out.append(Finding(_name(mb, "login"), False, str(exc), "check username, password/token and mechanisms"))
            return out
        assert isinstance(session, Pop3Session)
        try:
            uidls = session.uidl()
            dup = len(uidls) - len({u for _, u in uidls})
            if dup:
                out.append(
                    Finding(
                        _name(mb, "uidl"),
                        False,
                        f"{dup} duplicate UIDL(s) among {len(uidls)} messages",
                        "exactly-once needs unique UIDLs; or opt into identity: headers (docs/delivery.md)",
                    )
                )
            else:
                out.append(Finding(_name(mb, "uidl"), True, f"UIDL supported, {len(uidls)} unique"))
        except ConnectorError as exc:
            out.append(
                Finding(_name(mb, "uidl"), False, str(exc), "the server has no UIDL: opt into identity: headers")
            )
        count, size = session.stat()
        out.append(Finding(_name(mb, "mailbox"), True, f"{count} message(s), {size} octets"))
    except ConnectorError as exc:
        out.append(Finding(_name(mb, "session"), False, exc.describe(), None))
    finally:
        end_without_deletes(session, mb)
    return out


def _mechanism_finding(mb: MailboxConfig, caps: dict[str, list[str]]) -> Finding:
    offered = caps.get("SASL", [])
    has_token = mb.token_source is not None
    allowed = list(mb.auth_mechanisms or (DEFAULT_TOKEN_MECHANISMS if has_token else DEFAULT_PASSWORD_MECHANISMS))
    try:
        best = choose(offered, [a for a in allowed if a not in ("USER", "APOP")], has_token) if offered else None
    except ConnectorError:
        best = None
    fallback = [m for m in ("USER", "APOP") if (mb.auth_mechanisms is None and m == "USER") or m in allowed]
    if best is None and not (fallback and not has_token):
        return Finding(
            _name(mb, "mechanisms"),
            False,
            f"server offers SASL [{' '.join(offered) or '-'}], allowed [{' '.join(allowed)}]: nothing in common",
            "adjust auth_mechanisms",
        )
    detail = f"server offers SASL [{' '.join(offered) or '-'}]; will use {best or fallback[0]}"
    return Finding(_name(mb, "mechanisms"), True, detail)
