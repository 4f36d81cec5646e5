#!/usr/bin/env python3
"""Test stand-in for Samba's ``ntlm_auth --helper-protocol=squid-2.5-ntlmssp``.

Dovecot 2.3 (Debian's 2.3.19) has no NTLM code of its own: with ``auth_use_winbind = yes``
its ``NTLM`` mechanism is mech-winbind (src/auth/mech-winbind.c), which starts
``auth_winbind_helper_path`` once per auth process with the single argument
``--helper-protocol=squid-2.5-ntlmssp`` and exchanges one line per NTLM message over the
helper's stdin/stdout:

    Dovecot -> helper   YR <base64 NEGOTIATE>      the first client message of a login
    helper  -> Dovecot  TT <base64 CHALLENGE>      relayed to the client as "+ <base64>"
    Dovecot -> helper   KK <base64 AUTHENTICATE>
    helper  -> Dovecot  AF <user>                  logged in; Dovecot rewrites "DOMAIN\\user"
                                                   to "user@DOMAIN", then looks the user up in
                                                   the userdb (no passdb: passdb_need NOTHING)
                        NA <reason>                refused; Dovecot logs the first word
                        BH <reason>                broken request; Dovecot drops this helper
                                                   (we see EOF and exit) and starts a new one

In production that path is Samba's ntlm_auth, which has winbindd (a domain member) check the
response. Here pyspnego's acceptor checks it against the accounts in ``NTLM_USER_FILE``
(``DOMAIN:USER:PASSWORD`` lines, written by deploy/local/localstack.py), so the connector's
NTLM client is verified by an independent NTLM implementation behind a real Dovecot.

* Only NTLMv2 responses are accepted (LM_COMPAT_LEVEL 5, the Windows LmCompatibilityLevel
  semantics pyspnego follows): a client that fell back to LM or NTLMv1 is refused.
* AF carries the bare account name as spelled in the file, not ``DOMAIN\\user``: the test
  userdb (a passwd-file) is keyed by bare names, and mech-winbind accepts either form.
* One handshake at a time: the protocol has no request ids and Dovecot blocks on each answer,
  so a second login's YR arriving between the first login's TT and KK replaces the first
  handshake and the first login is refused. The tests log in one at a time.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
import sys

import spnego
import spnego.exceptions

PROTOCOL = "--helper-protocol=squid-2.5-ntlmssp"
# What pyspnego's message parser lets escape on malformed input besides its own errors.
_PARSE_ERRORS = (ValueError, KeyError, IndexError, OverflowError, struct.error)


class Helper:
    def __init__(self, user_file: str) -> None:
        self.user_file = user_file
        self._pending: spnego.ContextProxy | None = None

    def handle(self, line: str) -> str:
        """One request line in, one answer line out (no newline)."""
        code, _, arg = line.strip().partition(" ")
        if code == "YR":
            self._pending = None  # a new login abandons any unfinished one
            token = _b64(arg)
            if not token:
                return "BH NEGOTIATE-not-base64"
            ctx = spnego.server(protocol="ntlm", options=spnego.NegotiateOptions.use_ntlm)
            try:
                challenge = ctx.step(token)
            except (spnego.exceptions.SpnegoError, *_PARSE_ERRORS) as exc:
                return f"NA NT_STATUS_INVALID_PARAMETER({type(exc).__name__})"
            if not challenge:
                return "NA NT_STATUS_INVALID_PARAMETER(no-challenge)"
            self._pending = ctx
            return "TT " + base64.b64encode(challenge).decode("ascii")
        if code == "KK":
            pending, self._pending = self._pending, None
            if pending is None:
                return "BH KK-without-YR"
            token = _b64(arg)
            if not token:
                return "BH AUTHENTICATE-not-base64"
            try:
                pending.step(token)
            except spnego.exceptions.SpnegoError as exc:
                # wrong password, unknown account, NTLMv1/LM response, bad MIC
                return f"NA NT_STATUS_LOGON_FAILURE({type(exc).__name__})"
            except _PARSE_ERRORS as exc:
                return f"NA NT_STATUS_INVALID_PARAMETER({type(exc).__name__})"
            user = self._account(pending.client_principal) if pending.complete else None
            if user is None:
                return "NA NT_STATUS_LOGON_FAILURE(no-account)"
            return f"AF {user}"
        return f"BH unknown-request-{code[:10] or 'empty'}"

    def _account(self, principal: str | None) -> str | None:
        """The account name as the file spells it (pyspnego matched it case-insensitively)."""
        if not principal:
            return None
        domain, _, user = principal.rpartition("\\")
        with open(self.user_file, encoding="utf-8") as f:
            for entry in f:
                parts = entry.rstrip("\n").split(":")
                if len(parts) == 3 and (parts[0].upper(), parts[1].upper()) == (domain.upper(), user.upper()):
                    return parts[1]
        return None


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True) or None
    except (binascii.Error, ValueError):
        return None


def main(argv: list[str]) -> int:
    if PROTOCOL not in argv[1:]:
        # e.g. GSS-SPNEGO (--helper-protocol=gss-spnego) answers in three fields: not ours.
        print(f"ntlm_helper: only {PROTOCOL} is implemented, got {argv[1:]}", file=sys.stderr)
        return 2
    user_file = os.environ.get("NTLM_USER_FILE", "")
    if not os.path.isfile(user_file):
        print("ntlm_helper: NTLM_USER_FILE does not name a file", file=sys.stderr)
        return 2
    # pyspnego reads the level each time it builds a context; 5 = accept NTLMv2 responses only.
    os.environ["LM_COMPAT_LEVEL"] = "5"
    helper = Helper(user_file)
    out = sys.stdout.buffer
    for raw in sys.stdin.buffer:
        out.write(helper.handle(raw.decode("ascii", "replace")).encode("utf-8") + b"\n")
        out.flush()  # Dovecot blocks until it reads the whole answer line
    return 0  # EOF: Dovecot closed the pipe (auth process ended, or it dropped us after BH)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
