"""Logging in to a mailbox: pick the mechanism, run it (docs/pop3.md).

Choice, in this order:

1. ``auth_mechanisms`` configured: the strongest SASL mechanism in that list which the server
   offers in CAPA (RFC 2449 §6.3 ``SASL``); if none is offered, ``USER`` or ``APOP`` when the
   list names them; otherwise a Pop3AuthError that lists both sides.
2. Not configured: with a token source (``oauth2`` or ``oauth2_token``), OAUTHBEARER or
   XOAUTH2 (whichever is offered); with a password, the strongest password mechanism offered
   (SCRAM, CRAM-MD5, PLAIN, LOGIN), else USER/PASS (RFC 1939 §7), which every server that
   does not list mechanisms is assumed to take.

The token is asked for only once a token mechanism has been chosen, so a password login never
waits on a token endpoint. ``oauth2_token`` and password files are re-read at each login
(Secret.reveal), so a sidecar refreshing a token or a rotated Kubernetes secret needs no
restart; ``oauth2`` tokens come from the source's cache (connector/auth/oauth2.py), which the
login empties when the server refuses a token, so the next login fetches a fresh one.
Token endpoint failures are OAuthTokenError (stop: fix the credentials) or
OAuthTokenUnavailableError (retry later).
"""

from __future__ import annotations

from typing import Protocol

from connector.config.model import MailboxConfig
from connector.errors import Pop3AuthError, Pop3UnsupportedError
from connector.protocol.sasl import TOKEN_MECHANISMS, Mechanism, choose, create

#: used when the mailbox does not configure auth_mechanisms (NTLM needs a domain: opt-in only)
DEFAULT_PASSWORD_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN")
DEFAULT_TOKEN_MECHANISMS = ("OAUTHBEARER", "XOAUTH2")


class LoginSession(Protocol):
    def capabilities(self, *, refresh: bool = False) -> dict[str, list[str]]: ...
    def login_user_pass(self, username: str, password: str) -> None: ...
    def login_apop(self, username: str, secret: str) -> None: ...
    def login_sasl(self, mechanism: Mechanism, *, username: str) -> None: ...


def login(session: LoginSession, mailbox: MailboxConfig) -> str:
    """Log in; returns the method used (for logs and metrics, never a secret)."""
    caps = session.capabilities()
    offered = caps.get("SASL", [])
    source = mailbox.token_source
    password = mailbox.password.reveal() if mailbox.password.source != "none" else None
    if mailbox.auth_mechanisms is not None:
        allowed = list(mailbox.auth_mechanisms)
    else:
        allowed = list(DEFAULT_TOKEN_MECHANISMS if source is not None else DEFAULT_PASSWORD_MECHANISMS)
        if source is None:
            allowed.append("USER")
    sasl_allowed = [a for a in allowed if a not in ("USER", "APOP")]
    if offered and sasl_allowed:
        try:
            name = choose(offered, sasl_allowed, have_token=source is not None)
        except Pop3AuthError:
            if not {"USER", "APOP"} & set(allowed):
                raise
        else:
            token = source.token() if source is not None and name in TOKEN_MECHANISMS else None
            mech = create(
                name,
                username=mailbox.username,
                password=password,
                token=token,
                host=mailbox.host,
                port=mailbox.port,
            )
            try:
                session.login_sasl(mech, username=mailbox.username)
            except Pop3AuthError:
                if token is not None and source is not None:
                    source.invalidate()  # revoked or expired early: the next login asks for a new one
                raise
            return name
    if password is not None:
        for method in allowed:  # the non-SASL methods, in the configured order
            if method == "APOP":
                try:
                    session.login_apop(mailbox.username, password)
                except Pop3UnsupportedError:
                    continue  # no timestamp in the greeting: the server does not do APOP
                return "APOP"
            if method == "USER":
                session.login_user_pass(mailbox.username, password)
                return "USER"
    raise Pop3AuthError(
        f"no usable login: the server offers SASL [{' '.join(offered) or '-'}], the mailbox allows "
        f"[{' '.join(allowed)}]{'' if password or source else ' and has neither password nor oauth2 / oauth2_token'}"
    )
