"""Logging in to a mailbox: pick the mechanism, run it (docs/pop3.md).

Choice, in this order:

1. ``auth_mechanisms`` configured: the strongest SASL mechanism in that list which the server
   offers in CAPA (RFC 2449 §6.3 ``SASL``); if none is offered, ``USER`` or ``APOP`` when the
   list names them; otherwise a Pop3AuthError that lists both sides.
2. Not configured: with an ``oauth2_token``, OAUTHBEARER or XOAUTH2 (whichever is offered);
   with a password, the strongest password mechanism offered (SCRAM, CRAM-MD5, PLAIN, LOGIN),
   else USER/PASS (RFC 1939 §7), which every server that does not list mechanisms is assumed
   to take.

Tokens and password files are re-read at each login (Secret.reveal), so a sidecar refreshing
a token or a rotated Kubernetes secret needs no restart.
"""

from __future__ import annotations

from typing import Protocol

from connector.config.model import MailboxConfig
from connector.errors import Pop3AuthError, Pop3UnsupportedError
from connector.protocol.sasl import Mechanism, choose, create

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
    token = mailbox.oauth2_token.reveal() if mailbox.oauth2_token is not None else None
    password = mailbox.password.reveal() if mailbox.password.source != "none" else None
    if mailbox.auth_mechanisms is not None:
        allowed = list(mailbox.auth_mechanisms)
    else:
        allowed = list(DEFAULT_TOKEN_MECHANISMS if token else DEFAULT_PASSWORD_MECHANISMS)
        if not token:
            allowed.append("USER")
    sasl_allowed = [a for a in allowed if a not in ("USER", "APOP")]
    if offered and sasl_allowed:
        try:
            name = choose(offered, sasl_allowed, have_token=token is not None)
        except Pop3AuthError:
            if not {"USER", "APOP"} & set(allowed):
                raise
        else:
            mech = create(
                name,
                username=mailbox.username,
                password=password,
                token=token,
                host=mailbox.host,
                port=mailbox.port,
            )
            session.login_sasl(mech, username=mailbox.username)
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
        f"[{' '.join(allowed)}]{'' if password or token else ' and has neither password nor oauth2_token'}"
    )
