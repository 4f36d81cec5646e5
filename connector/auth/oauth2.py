"""OAuth 2.0 access tokens for XOAUTH2/OAUTHBEARER logins (docs/pop3.md, "OAuth2 token sources").

A :class:`TokenSource` hands the login a bearer token. Three kinds:

* :class:`StaticTokenSource`: someone else obtains the token (a sidecar writes a file, or an
  environment variable holds it: ``oauth2_token``); read again at every login.
* :class:`ClientCredentialsSource`: the client credentials grant (RFC 6749 §4.4) with the
  client authenticated by ``client_secret_post`` (RFC 6749 §2.3.1): Microsoft Entra ID
  app-only access to Exchange Online.
* :class:`JwtBearerSource`: the JWT bearer grant (RFC 7523 §2.1) with an assertion signed
  RS256 (RFC 7518 §3.3) by a Google service-account key: Gmail with domain-wide delegation.

The two grant sources share :class:`_EndpointSource`:

* Caching: a token is reused until less than max(60 s, 10% of its lifetime) is left. The
  lifetime is the answer's ``expires_in``; RFC 6749 §5.1 only RECOMMENDS that field, so a
  missing (or unreadable) one counts as 3600 s, the lifetime Entra ID and Google issue.
  A source is shared by every mailbox with the same settings, so fifty shared mailboxes of
  one app registration cost one token request an hour.
* Threads: mailboxes log in concurrently. One lock per source serialises the requests, and
  a thread that waited for the lock while another thread's request failed gets that failure
  instead of asking again (no pile-up of timeouts against an endpoint that is down).
* Refresh failures: when the endpoint is unreachable but the cached token is still valid,
  the cached token is used (and a WARNING logged); a refusal (invalid_client...) is raised.
* :meth:`TokenSource.invalidate`: the login calls it when the POP3 server refuses a token
  (revoked, or expired early), so the next login asks for a new one.
* Errors (connector.errors): :class:`~connector.errors.OAuthTokenError` (a Pop3AuthError: the
  endpoint refused the credentials or sent no usable token: stop and fix) and
  :class:`~connector.errors.OAuthTokenUnavailableError` (a Pop3TempError: unreachable,
  timeout, HTTP 5xx/429: retry later). Messages read "OAuth2 token endpoint URL: ..." and
  never contain the client secret, the assertion, the private key or a token; text the
  endpoint sends back is scrubbed of those values before it is shown.

HTTP: stdlib ``urllib.request`` (:class:`UrllibPost`), TLS verified against ``ca_file`` or
the system trust store, ``HTTPS_PROXY``/``NO_PROXY`` honoured, redirects refused (a token
endpoint does not redirect; following one could carry the secret elsewhere). Plain http is
allowed only to a loopback address (:func:`token_url_problem`), for tests.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import math
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from connector import __version__
from connector.errors import ConfigError, OAuthError, OAuthTokenError, OAuthTokenUnavailableError

if TYPE_CHECKING:
    import urllib.request
    from email.message import Message

    from cryptography.hazmat.primitives.asymmetric import rsa

# urllib.request, http.client and cryptography are imported where a token is first asked for
# or a key loaded: together ~30 ms of every start, and most mailboxes log in with a password
# (bench/results/timeline.md, "imports").

__all__ = [
    "DEFAULT_EXPIRES_IN",
    "DEFAULT_TIMEOUT",
    "JWT_BEARER_GRANT",
    "ClientCredentialsSource",
    "HttpPost",
    "HttpReply",
    "JwtBearerSource",
    "SecretValue",
    "ServiceAccountKey",
    "StaticTokenSource",
    "TokenSource",
    "UrllibPost",
    "token_url_problem",
]

log = logging.getLogger("pop3kafka.oauth2")

#: RFC 7523 §2.1: the grant_type of the JWT bearer grant.
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: lifetime assumed when the answer has no usable ``expires_in`` (RFC 6749 §5.1: RECOMMENDED only).
DEFAULT_EXPIRES_IN = 3600.0
#: an endpoint claiming more than a day is not believed: the token is asked for again after a day.
MAX_EXPIRES_IN = 86400.0
#: refresh when less than max(MIN_REFRESH_MARGIN, REFRESH_FRACTION x lifetime) is left.
MIN_REFRESH_MARGIN = 60.0
REFRESH_FRACTION = 0.1
#: a cached token closer than this to its expiry is not used even when a refresh failed.
EXPIRY_SAFETY = 5.0
#: seconds to wait for the token endpoint (mailbox key oauth2.timeout_seconds).
DEFAULT_TIMEOUT = 10.0
#: Google accepts assertions valid for at most one hour.
ASSERTION_LIFETIME = 3600
#: a token answer is a few KB; anything much larger is not one.
MAX_RESPONSE_BYTES = 1 << 20
#: characters of endpoint-provided text (error_description) shown in a message.
MAX_DESCRIPTION = 500

_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})
# RFC 6750 §2.1 b64token: what a bearer token may contain (Dovecot checks the same).
_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_SHOWN_TYPE = re.compile(r"^[a-z_]{1,40}$")

_UNAVAILABLE_HINT = (
    "the token endpoint is unreachable or busy: check token_url, DNS, the firewall and HTTPS_PROXY/NO_PROXY; "
    "the login is tried again at the next cycle"
)
_ENDPOINT_HINT = "is token_url the OAuth2 token endpoint of the provider? (not a login page or a proxy)"
_HINTS: Mapping[str, str] = {
    "invalid_client": (
        "check oauth2.client_id and oauth2.client_secret (Entra ID: the secret's Value, not its Secret ID; "
        "an expired secret is invalid_client too) and the tenant in token_url"
    ),
    "unauthorized_client": (
        "the client may not use this grant: Google: authorise the service account's client ID for the scope "
        "under domain-wide delegation; Entra ID: check the app registration's permissions and admin consent"
    ),
    "invalid_grant": (
        "jwt_bearer: subject must be a user of the Workspace domain, the service-account key must be current "
        "(not deleted) and this host's clock right; client_credentials: check the tenant in token_url"
    ),
    "invalid_scope": (
        "check oauth2.scope (Exchange Online: https://outlook.office365.com/.default; Gmail: https://mail.google.com/)"
    ),
    "invalid_request": "check token_url is the OAuth2 token endpoint (Entra ID: the v2.0 endpoint)",
    "unsupported_grant_type": "check token_url and oauth2.grant: this endpoint does not offer that grant",
}


# ---------------------------------------------------------------------------- interfaces


class SecretValue(Protocol):
    """What a source needs of a secret: :class:`connector.config.model.Secret` fits."""

    def reveal(self) -> str: ...

    @property
    def source(self) -> str: ...


class TokenSource(Protocol):
    """Gives the login an OAuth 2.0 bearer token (RFC 6750) for XOAUTH2/OAUTHBEARER."""

    def token(self) -> str:
        """A token to use now; cached where the source can. Raises OAuthError."""
        ...

    def invalidate(self) -> None:
        """The server refused the last token: the next :meth:`token` must not return it."""
        ...

    def describe(self) -> str:
        """Where tokens come from, safe to print (no secret)."""
        ...

    def expires_at(self) -> float | None:
        """Unix time at which the cached token expires; None when none is cached or unknown."""
        ...


@dataclass(frozen=True)
class HttpReply:
    """An HTTP answer of any status. ``headers`` have lower-case names."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


#: ``post(url, form_body, timeout) -> HttpReply`` for any HTTP status; raises OSError
#: (TimeoutError, ssl.SSLError, ConnectionRefusedError...) or http.client.HTTPException when
#: no answer arrived. Tests inject their own.
HttpPost = Callable[[str, bytes, float], HttpReply]


def _opener(ctx: ssl.SSLContext) -> urllib.request.OpenerDirector:
    """An opener that verifies TLS with ``ctx`` and refuses redirects."""
    import urllib.request  # noqa: PLC0415 - see the note at the imports

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *_args: object, **_kwargs: object) -> urllib.request.Request | None:
            return None  # urllib then raises HTTPError(3xx), which becomes an HttpReply

    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect())


def _http_exception() -> type[Exception]:
    """http.client's base exception, for an ``except`` clause (evaluated only when matching)."""
    import http.client  # noqa: PLC0415 - loaded with urllib.request already

    return http.client.HTTPException


class UrllibPost:
    """The production :data:`HttpPost`: urllib, TLS verified, redirects refused."""

    def __init__(self, ca_file: str | None = None) -> None:
        # ca_file None: the system trust store. Verification and host name checks are on.
        ctx = ssl.create_default_context(cafile=ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._opener = _opener(ctx)

    def __call__(self, url: str, body: bytes, timeout: float) -> HttpReply:
        import urllib.error  # noqa: PLC0415 - loaded by _opener() already
        import urllib.request  # noqa: PLC0415 - loaded by _opener() already

        request = urllib.request.Request(  # noqa: S310 - the scheme is checked at config load
            url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
                "User-Agent": f"pop3-kafka/{__version__}",
            },
        )
        try:
            with self._opener.open(request, timeout=timeout) as resp:
                return HttpReply(resp.status, resp.read(MAX_RESPONSE_BYTES + 1), _lower(resp.headers))
        except urllib.error.HTTPError as exc:  # 4xx/5xx (and refused 3xx) still carry an answer
            try:
                return HttpReply(exc.code, exc.read(MAX_RESPONSE_BYTES + 1), _lower(exc.headers))
            finally:
                exc.close()
        except urllib.error.URLError as exc:
            # urllib wraps connect-time failures; hand the caller the underlying OSError.
            if isinstance(exc.reason, OSError):
                raise exc.reason from None
            raise OSError(str(exc.reason)) from None


def _lower(headers: Message | None) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()} if headers is not None else {}


def token_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a token endpoint, or None. https is required: the request
    carries the client secret or a signed assertion (RFC 6749 §2.3.1 and §3.2 require TLS).
    Plain http is accepted for a loopback host only, where nothing crosses a network."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "give an https:// URL with a host name"
    if parts.username is not None or parts.password is not None:
        return "remove the user:password@ part (client credentials go in client_id/client_secret)"
    if parts.fragment:
        return "remove the #fragment (RFC 6749 §3.2 forbids one)"
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        return (
            "http:// would send the credentials unencrypted; use https:// "
            "(plain http is accepted only for a loopback host such as 127.0.0.1)"
        )
    return None


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _shown_url(url: str) -> str:
    """scheme://host[:port]/path: what messages name (no user:password@, no query string)."""
    try:
        p = urllib.parse.urlsplit(url)
        port = p.port
    except ValueError:
        return "?"
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, "", ""))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# ---------------------------------------------------------------------------- static token


class StaticTokenSource:
    """``oauth2_token``: a token someone else obtains; re-read at every login (Secret.reveal)."""

    def __init__(self, secret: SecretValue) -> None:
        self._secret = secret

    def token(self) -> str:
        value = self._secret.reveal().strip()
        if not value:
            where = self._secret.source
            if where.startswith("file:"):
                # A token sidecar that has not written its file yet: try again later.
                raise OAuthTokenUnavailableError(
                    f"oauth2_token ({where}) is empty", hint="check the process that writes the token file"
                )
            raise OAuthTokenError(f"oauth2_token ({where}) is empty", hint="set the variable to the token")
        return value

    def invalidate(self) -> None:
        """Nothing to drop: the file or variable is read again at the next login anyway."""

    def describe(self) -> str:
        return f"oauth2_token ({self._secret.source})"

    def expires_at(self) -> float | None:
        return None  # a token from a file or the environment: its lifetime is not ours to know

    def __repr__(self) -> str:
        return f"StaticTokenSource({self._secret.source})"


# ---------------------------------------------------------------------------- token endpoints


@dataclass
class _Cached:
    value: str = field(repr=False)
    #: clock time at which a new token is asked for, and at which this one expires.
    refresh_at: float
    expires_at: float
    lifetime: float


class _EndpointSource:
    """A token endpoint client with a cache; subclasses say what to POST."""

    grant = ""

    def __init__(
        self,
        token_url: str,
        *,
        timeout: float,
        ca_file: str | None,
        post: HttpPost | None,
        clock: Callable[[], float],
    ) -> None:
        self._token_url = token_url
        self._timeout = timeout
        self._post: HttpPost = post if post is not None else UrllibPost(ca_file)
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: _Cached | None = None
        self._attempts = 0
        self._last_error: OAuthError | None = None
        #: token requests sent so far (tests and doctor read it).
        self.requests = 0

    # -- subclass hooks (called with the lock held)

    def _form(self, now: float) -> tuple[dict[str, str], list[str]]:
        """The form fields to POST and which of their values are secret."""
        raise NotImplementedError

    def _before(self) -> None:
        """Called under the lock before the cache is consulted (key file reload)."""

    @property
    def token_url(self) -> str:
        return self._token_url

    def expires_at(self) -> float | None:
        cached = self._cached
        return cached.expires_at if cached is not None else None

    # -- TokenSource

    def token(self) -> str:
        seen = self._attempts  # read outside the lock: did a request finish while we waited?
        with self._lock:
            self._before()
            now = self._clock()
            cached = self._cached
            if cached is not None and now < cached.refresh_at:
                return cached.value
            if self._attempts != seen and self._last_error is not None:
                # Another thread's request failed while we waited: share its outcome rather
                # than queue one more timeout against an endpoint that is down.
                error, own = self._last_error, False
            else:
                try:
                    value, lifetime = self._request(now)
                except OAuthError as exc:
                    error, own = exc, True
                    self._last_error = exc
                else:
                    self._last_error = None
                    margin = max(MIN_REFRESH_MARGIN, REFRESH_FRACTION * lifetime)
                    self._cached = _Cached(value, now + lifetime - margin, now + lifetime, lifetime)
                    log.info("OAuth2 token obtained: %s, valid for %.0f s", self.describe(), lifetime)
                    return value
                finally:
                    self._attempts += 1
            if (
                isinstance(error, OAuthTokenUnavailableError)
                and cached is not None
                and now < cached.expires_at - EXPIRY_SAFETY
            ):
                if own:
                    log.warning("%s; using the cached token, valid for %.0f s more", error, cached.expires_at - now)
                return cached.value
            self._cached = None
            raise error if own else error.copy()

    def invalidate(self) -> None:
        with self._lock:
            self._cached = None

    def describe(self) -> str:
        raise NotImplementedError

    @property
    def lifetime(self) -> float | None:
        """Lifetime of the cached token in seconds (None when nothing is cached)."""
        cached = self._cached
        return cached.lifetime if cached is not None else None

    # -- the request

    @property
    def _where(self) -> str:
        return f"OAuth2 token endpoint {_shown_url(self._token_url)}"

    def _request(self, now: float) -> tuple[str, float]:
        form, secrets = self._form(now)
        body = urllib.parse.urlencode(form).encode("ascii")
        self.requests += 1
        try:
            reply = self._post(self._token_url, body, self._timeout)
        except TimeoutError:
            raise OAuthTokenUnavailableError(
                f"{self._where}: no answer within {self._timeout:g} s", hint=_UNAVAILABLE_HINT
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise OAuthTokenError(
                f"{self._where}: certificate not verified: {exc.verify_message or exc.reason}",
                hint="set oauth2.ca_file to the CA that signed the endpoint's certificate "
                "(or the one of a TLS-inspecting proxy), or fix token_url's host name",
            ) from None
        except (OSError, _http_exception()) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise OAuthTokenUnavailableError(
                f"{self._where}: cannot connect: {_clean(reason, secrets)}", hint=_UNAVAILABLE_HINT
            ) from None
        return self._parse(reply, secrets)

    def _parse(self, reply: HttpReply, secrets: list[str]) -> tuple[str, float]:
        where, status = self._where, reply.status
        if len(reply.body) > MAX_RESPONSE_BYTES:
            raise OAuthTokenError(
                f"{where}: HTTP {status} with an answer over {MAX_RESPONSE_BYTES} bytes", hint=_ENDPOINT_HINT
            )
        data = _json_object(reply.body)
        code = data.get("error") if data is not None else None
        code = _clean(code, secrets, 60) if isinstance(code, str) and code else None
        desc = data.get("error_description") if data is not None else None
        said = f"{code}: {_clean(desc, secrets)}" if code and isinstance(desc, str) and desc else code
        if status == 200 and data is not None and "access_token" in data:
            return self._token_of(data, secrets)
        if status in (408, 429) or status >= 500 or code in ("temporarily_unavailable", "server_error"):
            retry = reply.headers.get("retry-after")
            after = f" (Retry-After: {_clean(retry, secrets, 40)})" if retry else ""
            raise OAuthTokenUnavailableError(
                f"{where}: HTTP {status}{': ' + said if said else ''}{after}", oauth_error=code, hint=_UNAVAILABLE_HINT
            )
        if 300 <= status < 400:
            target = _shown_url(reply.headers.get("location", "")) or "?"
            raise OAuthTokenError(
                f"{where}: HTTP {status} redirect to {_clean(target, secrets, 200)}",
                hint="set token_url to the token endpoint itself (redirects are not followed)",
            )
        if code is not None:
            hint = _HINTS.get(code, "check the oauth2 settings against the provider's app registration")
            raise OAuthTokenError(f"{where}: {said} (HTTP {status})", oauth_error=code, hint=hint)
        if status == 200:
            if data is None:
                kind = _clean(reply.headers.get("content-type", "none"), secrets, 80)
                raise OAuthTokenError(
                    f"{where}: HTTP 200 but the answer is not a JSON object (Content-Type {kind})",
                    hint="is token_url the token endpoint? (not the authorize endpoint or a login page)",
                )
            raise OAuthTokenError(
                f"{where}: the answer has no access_token",
                hint="is token_url the token endpoint? (RFC 6749 §5.1 answers carry access_token)",
            )
        raise OAuthTokenError(
            f"{where}: HTTP {status} without an OAuth2 error code",
            hint="check token_url (HTTP 404: wrong path or tenant; 401/403: a proxy or firewall refused)",
        )

    def _token_of(self, data: Mapping[str, object], secrets: list[str]) -> tuple[str, float]:
        where = self._where
        value = data.get("access_token")
        if not isinstance(value, str) or not value:
            raise OAuthTokenError(f"{where}: access_token is empty or not a string", hint=_ENDPOINT_HINT)
        if not _B64TOKEN.match(value):
            # never show it: it may be a valid token with one stray character
            raise OAuthTokenError(
                f"{where}: access_token has characters a bearer token cannot have (RFC 6750 §2.1)",
                hint=_ENDPOINT_HINT,
            )
        kind = data.get("token_type")
        if isinstance(kind, str) and kind.lower() != "bearer":
            # RFC 6749 §7.1: a client must not use a token type it does not understand.
            raise OAuthTokenError(
                f"{where}: token_type {_clean(kind, [*secrets, value], 40)!r} is not Bearer (RFC 6750)",
                hint="XOAUTH2 and OAUTHBEARER need a bearer token; check the endpoint",
            )
        return value, _lifetime(data.get("expires_in"))


def _json_object(body: bytes) -> dict[str, object] | None:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _lifetime(value: object) -> float:
    """``expires_in`` in seconds (RFC 6749 §5.1); numeric strings too (Entra's v1 endpoint
    sent "3599"). Missing or unreadable: :data:`DEFAULT_EXPIRES_IN`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return DEFAULT_EXPIRES_IN
    try:
        seconds = float(value)
    except ValueError:
        return DEFAULT_EXPIRES_IN
    if not math.isfinite(seconds):
        return DEFAULT_EXPIRES_IN
    return min(max(seconds, 0.0), MAX_EXPIRES_IN)


def _clean(text: object, secrets: list[str], limit: int = MAX_DESCRIPTION) -> str:
    """Endpoint-provided text made safe to show: our secrets replaced (an endpoint might echo
    the request), control characters flattened, length bounded."""
    out = str(text)
    for s in secrets:
        if len(s) >= 4:
            out = out.replace(s, "***")
    out = _CONTROL.sub(" ", out).strip()
    return out if len(out) <= limit else out[: limit - 3] + "..."


class ClientCredentialsSource(_EndpointSource):
    """RFC 6749 §4.4 client credentials grant, client_secret_post (§2.3.1).

    Microsoft Entra ID / Exchange Online app-only: token_url
    ``https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token``, scope
    ``https://outlook.office365.com/.default``. RFC 6749 prefers HTTP Basic for the client
    secret, but Entra documents the form body, and every server must accept one of the two.
    """

    grant = "client_credentials"

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: SecretValue,
        scope: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        ca_file: str | None = None,
        post: HttpPost | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(token_url, timeout=timeout, ca_file=ca_file, post=post, clock=clock)
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope

    def _form(self, now: float) -> tuple[dict[str, str], list[str]]:
        secret = self._secret.reveal()  # re-read: a rotated secret file needs no restart
        form = {"grant_type": "client_credentials", "client_id": self.client_id, "client_secret": secret}
        if self.scope:
            form["scope"] = self.scope
        return form, [secret]

    def describe(self) -> str:
        return f"client_credentials grant for client_id {self.client_id} at {_shown_url(self._token_url)}"

    def __repr__(self) -> str:
        return f"ClientCredentialsSource({_shown_url(self._token_url)}, client_id={self.client_id}, secret=***)"


# ---------------------------------------------------------------------------- JWT bearer


@dataclass(frozen=True)
class ServiceAccountKey:
    """The parts of a Google service-account JSON key that the JWT bearer grant uses."""

    client_email: str
    private_key_id: str
    token_uri: str | None
    private_key: rsa.RSAPrivateKey = field(repr=False, compare=False)

    @classmethod
    def load(cls, path: Path) -> ServiceAccountKey:
        """Read and check a key file. ConfigError messages name the file and the problem,
        never its content (it holds a private key)."""
        shown = repr(str(path))
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {shown}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{shown} is not UTF-8 text (expected a service-account JSON key)") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{shown} is not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                "expected the service-account key as Google downloads it"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{shown} is not a JSON object; expected a service-account key")
        kind = data.get("type")
        if kind is not None and kind != "service_account":
            what = repr(kind) if isinstance(kind, str) and _SHOWN_TYPE.match(kind) else "another kind"
            raise ConfigError(
                f"{shown} holds a {what} credential, not a service-account key "
                "(Google Cloud console: IAM > Service accounts > Keys > Add key > JSON)"
            )
        fields = ("client_email", "private_key", "private_key_id")
        missing = [f for f in fields if not isinstance(data.get(f), str) or not data[f]]
        if missing:
            raise ConfigError(f"{shown} is not a service-account key: missing {', '.join(missing)}")
        token_uri = data.get("token_uri")
        if token_uri is not None and not isinstance(token_uri, str):
            raise ConfigError(f"{shown}: token_uri is not a string")
        from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415 - see the imports
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

        try:
            key = serialization.load_pem_private_key(str(data["private_key"]).encode("utf-8"), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ConfigError(f"{shown}: private_key is not an unencrypted PEM private key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"{shown}: private_key is not an RSA key (RS256 needs one)")
        return cls(str(data["client_email"]), str(data["private_key_id"]), token_uri or None, key)


class JwtBearerSource(_EndpointSource):
    """RFC 7523 §2.1 JWT bearer grant with a Google service-account key (domain-wide delegation).

    The assertion (RFC 7523 §3) is a JWT signed RS256 (RFC 7518 §3.3), header ``kid`` = the
    key's private_key_id, claims iss = client_email, sub = the user to act as, aud = the
    token endpoint, scope (Google's extension), iat and exp = iat + 1 h. The key file is read
    again when it changes (Kubernetes rotates mounted secrets in place); the cached token is
    then dropped, since the new key may belong to another service account.
    """

    grant = "jwt_bearer"

    def __init__(
        self,
        key_file: Path,
        subject: str,
        scope: str,
        token_url: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        ca_file: str | None = None,
        post: HttpPost | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key_file = key_file
        self._key_stamp = self._stamp()
        self._key = ServiceAccountKey.load(key_file)
        url = token_url or self._key.token_uri
        if url is None:
            raise ConfigError(f"{str(key_file)!r} has no token_uri; set oauth2.token_url")
        problem = token_url_problem(url)
        if problem is not None:
            raise ConfigError(f"token_uri of {str(key_file)!r}: {problem}")
        super().__init__(url, timeout=timeout, ca_file=ca_file, post=post, clock=clock)
        self._fixed_url = token_url is not None
        self.subject = subject
        self.scope = scope

    @property
    def client_email(self) -> str:
        return self._key.client_email

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self._key_file.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _before(self) -> None:
        stamp = self._stamp()
        if stamp is None or stamp == self._key_stamp:
            return
        self._key_stamp = stamp
        try:
            key = ServiceAccountKey.load(self._key_file)
            url = self._token_url if self._fixed_url else (key.token_uri or self._token_url)
            problem = token_url_problem(url)
            if problem is not None:
                raise ConfigError(f"token_uri: {problem}")
        except ConfigError as exc:
            # Half-written during a rotation, or broken: keep signing with the last good key.
            log.warning("service-account key file changed but cannot be used (%s); keeping the previous key", exc)
            return
        self._key, self._token_url = key, url
        self._cached = None
        log.info("service-account key %s reloaded (client_email %s)", self._key_file, key.client_email)

    def _form(self, now: float) -> tuple[dict[str, str], list[str]]:
        assertion = self.assertion(now)
        return {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}, [assertion]

    def assertion(self, now: float) -> str:
        """The signed JWT (RFC 7523 §3) for a request made at ``now``."""
        iat = int(now)
        header = {"alg": "RS256", "typ": "JWT", "kid": self._key.private_key_id}
        claims = {
            "iss": self._key.client_email,
            "sub": self.subject,
            "scope": self.scope,
            "aud": self._token_url,
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME,
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        from cryptography.hazmat.primitives import hashes  # noqa: PLC0415 - see the imports
        from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415

        signature = self._key.private_key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def describe(self) -> str:
        return (
            f"jwt_bearer grant for {self._key.client_email} acting as {self.subject} at {_shown_url(self._token_url)}"
        )

    def __repr__(self) -> str:
        return f"JwtBearerSource({self._key_file}, subject={self.subject})"
