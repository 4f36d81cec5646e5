"""deploy/local/ntlm_helper.py, the test Dovecot's stand-in for Samba's ntlm_auth, on its own:
the squid-2.5-ntlmssp answers Dovecot's mech-winbind expects, with our NTLM client on the
other side. The same helper behind the real Dovecot: tests/integration/test_ntlm_dovecot.py.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from ntlm_helper import Helper

from connector.protocol.sasl import Ntlm


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Helper:
    users = tmp_path / "ntlm-users"
    users.write_text("POP3K:ntlmuser:right-pw\n", encoding="utf-8")
    monkeypatch.setenv("NTLM_USER_FILE", str(users))
    monkeypatch.setenv("LM_COMPAT_LEVEL", "5")  # what main() sets: NTLMv2 only
    return Helper(str(users))


def exchange(helper: Helper, mech: Ntlm) -> str:
    tt = helper.handle("YR " + base64.b64encode(mech.respond(b"")).decode())
    assert tt.startswith("TT ")
    return helper.handle("KK " + base64.b64encode(mech.respond(base64.b64decode(tt[3:]))).decode())


def test_success_names_the_account_as_stored(helper: Helper) -> None:
    assert exchange(helper, Ntlm("NTLMUSER", "right-pw", domain="pop3k")) == "AF ntlmuser"


@pytest.mark.parametrize(
    ("user", "domain", "pw"),
    [("ntlmuser", "POP3K", "wrong"), ("ntlmuser", "OTHER", "right-pw"), ("nobody", "POP3K", "right-pw")],
)
def test_refusals_are_na(helper: Helper, user: str, domain: str, pw: str) -> None:
    assert exchange(helper, Ntlm(user, pw, domain=domain)).startswith("NA NT_STATUS_LOGON_FAILURE")


def test_ntlmv1_response_is_refused(helper: Helper, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LM_COMPAT_LEVEL", "1")  # the client side sends NTLMv1 at this level
    mech = Ntlm("ntlmuser", "right-pw", domain="POP3K")
    monkeypatch.setenv("LM_COMPAT_LEVEL", "5")
    assert exchange(helper, mech).startswith("NA ")


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        ("KK AAAA", "BH "),  # no handshake in progress
        ("YR not*base64", "BH "),
        ("YR AAAA", "NA NT_STATUS_INVALID_PARAMETER"),  # base64, but no NEGOTIATE message
        ("XX", "BH "),
        ("", "BH "),
    ],
)
def test_broken_requests(helper: Helper, line: str, answer: str) -> None:
    # mech-winbind needs an argument after every code but BH
    reply = helper.handle(line)
    assert reply.startswith(answer) and len(reply.split()) == 2
