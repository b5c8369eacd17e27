"""Google sign-in: OpenID Connect through Google's discovery document.

With ``hosted_domain`` set, only Google Workspace accounts of that domain may
sign in. The ``hd`` parameter in the authorization request only preselects
accounts at Google, and a user can remove it from the URL, so the decision uses
the ``hd`` claim of the validated ID token. A consumer account (gmail.com, or a
Google account registered with a company address) has no ``hd`` claim and is
rejected.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import httpx
import jwt

from ..config import ProviderSettings
from ..errors import ConfigError, LoginError
from ..identity import Identity
from .oidc import OidcProvider, identity_from_claims

GOOGLE_ISSUER = "https://accounts.google.com"
# Google's ID token documentation lists both forms of the issuer as valid.
GOOGLE_ISSUER_WITHOUT_SCHEME = "accounts.google.com"

_ID_TOKEN_ONLY_CLAIMS = frozenset({"email", "email_verified", "hd"})
_DOMAIN_RE = re.compile(r"([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")
# Settings that only other provider types read: setting them for Google would do nothing.
_UNUSED_SETTINGS = (
    "tenant", "allowed_tenants", "insecure_email_from_username", "role_mapping",
    "authorize_url", "token_url", "userinfo_url", "api_base_url",
    "graph_version", "allowed_organizations", "allowed_teams", "claims",
)


def _check_settings(settings: ProviderSettings) -> str | None:
    """Raise ConfigError for unusable Google settings; return the hosted domain, lower-cased."""
    problems: list[str] = []
    for key in _UNUSED_SETTINGS:
        if key in settings.model_fields_set:
            problems.append(
                f"providers \"{settings.id}\": {key} is not used by type \"google\": remove it"
            )
    hosted_domain = None
    if settings.hosted_domain is not None:
        hosted_domain = settings.hosted_domain.strip().lower()
        if not _DOMAIN_RE.fullmatch(hosted_domain):
            problems.append(
                f"providers \"{settings.id}\": hosted_domain \"{settings.hosted_domain}\" is not "
                "a domain: set it to your Google Workspace primary domain, like \"example.com\""
            )
    if problems:
        raise ConfigError(problems)
    return hosted_domain


def _unverified_issuer(id_token: str) -> str | None:
    """Return the token's ``iss`` without checking anything, or None when unreadable."""
    # PyJWT raises UnicodeEncodeError on a lone surrogate, which a JSON string can carry.
    if not id_token.isascii():
        return None
    try:
        claims = jwt.decode(id_token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    issuer = claims.get("iss") if isinstance(claims, dict) else None
    return issuer if isinstance(issuer, str) else None


class GoogleProvider(OidcProvider):
    """Google accounts, optionally restricted to one Workspace domain."""

    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient) -> None:
        self.hosted_domain = _check_settings(settings)
        super().__init__(settings, client)

    @property
    def issuer(self) -> str:
        return self.settings.issuer or GOOGLE_ISSUER

    async def authorization_url(
        self, *, state: str, nonce: str, code_challenge: str, redirect_uri: str
    ) -> str:
        url = await super().authorization_url(
            state=state, nonce=nonce, code_challenge=code_challenge, redirect_uri=redirect_uri
        )
        if self.hosted_domain is None:
            return url
        # A hint for Google's account chooser only: complete() enforces the domain.
        return f"{url}&hd={quote(self.hosted_domain, safe='')}"

    def _expected_issuer(self, id_token: str) -> str:
        if self.issuer == GOOGLE_ISSUER and _unverified_issuer(id_token) == GOOGLE_ISSUER_WITHOUT_SCHEME:
            return GOOGLE_ISSUER_WITHOUT_SCHEME
        return self.issuer

    def _check_hosted_domain(self, claims: dict[str, Any]) -> None:
        if self.hosted_domain is None:
            return
        hd = claims.get("hd")
        if isinstance(hd, str) and hd.lower() == self.hosted_domain:
            return
        found = hd if isinstance(hd, str) and hd else "missing"
        raise LoginError(
            "hosted_domain_mismatch",
            f"{self.id}: ID token hd={found[:253]} is not {self.hosted_domain} sub={claims['sub']}",
        )

    async def complete(
        self, *, code: str, redirect_uri: str, code_verifier: str, nonce: str
    ) -> Identity:
        metadata = await self.metadata()
        tokens = await self._exchange_code(metadata, code, redirect_uri, code_verifier)
        claims = await self._id_token_claims(tokens, nonce)
        self._check_hosted_domain(claims)

        access_token = tokens.get("access_token")
        userinfo = await self._fetch_userinfo(
            metadata, access_token if isinstance(access_token, str) else "", claims["sub"]
        )
        # The userinfo response fills in profile fields only: the email and
        # its verification come from the signed ID token alone.
        profile = {k: v for k, v in userinfo.items() if k not in _ID_TOKEN_ONLY_CLAIMS}
        return identity_from_claims(self.id, {**profile, **claims})
