"""HS256 JWTs that Dovecot's oauth2 passdb validates locally (introspection_mode = local).

Dovecot requires the header's typ and alg and the claims sub and exp; sub must equal the login.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def make_jwt(key_file: Path, sub: str, lifetime: int = 600, **claims: Any) -> str:
    key = base64.b64decode(key_file.read_text().strip())
    now = int(time.time())
    body = {"sub": sub, "iat": now, "nbf": now, "exp": now + lifetime, **claims}
    head = {"alg": "HS256", "typ": "JWT"}
    signing_input = (
        _b64(json.dumps(head, separators=(",", ":")).encode())
        + b"."
        + _b64(json.dumps(body, separators=(",", ":")).encode())
    )
    sig = _b64(hmac.new(key, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + sig).decode()
