"""Credentials obtained at run time: OAuth 2.0 access tokens for XOAUTH2/OAUTHBEARER logins.

Below :mod:`connector.config` in the layering (the config builds these objects), so nothing
here imports the config package.
"""

from __future__ import annotations

from connector.auth.oauth2 import (
    DEFAULT_EXPIRES_IN,
    DEFAULT_TIMEOUT,
    ClientCredentialsSource,
    HttpPost,
    HttpReply,
    JwtBearerSource,
    ServiceAccountKey,
    StaticTokenSource,
    TokenSource,
    UrllibPost,
    token_url_problem,
)

__all__ = [
    "DEFAULT_EXPIRES_IN",
    "DEFAULT_TIMEOUT",
    "ClientCredentialsSource",
    "HttpPost",
    "HttpReply",
    "JwtBearerSource",
    "ServiceAccountKey",
    "StaticTokenSource",
    "TokenSource",
    "UrllibPost",
    "token_url_problem",
]
