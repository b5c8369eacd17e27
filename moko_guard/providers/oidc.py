"""Generic OpenID Connect provider, configured from the issuer's discovery document."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx

from ..config import ProviderSettings
from ..errors import LoginError
from ..identity import Identity
from ..logout import LogoutRequest, ReplayCache, validate_logout_token
from ..tokens import JwksCache, TokenExpectations, validate_id_token
from .base import request_json, timeouts

logger = logging.getLogger(__name__)

DISCOVERY_RETRY_INTERVAL = 30.0


def _claim_text(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) and value else None


def _claim_bool(claims: dict[str, Any], name: str) -> bool:
    value = claims.get(name)
    # Some providers send "true" as a string; anything else is not verified.
    return value is True or value == "true"


# The claims identity_from_claims reads that userinfo may add. An ID token that carries all
# of them needs no userinfo call ("groups" is read too, but only the microsoft type uses it,
# and that type makes its own calls).
USERINFO_CLAIMS = frozenset({"email", "email_verified", "name", "preferred_username"})


def identity_from_claims(provider_id: str, claims: dict[str, Any]) -> Identity:
    groups = claims.get("groups")
    group_list = tuple(str(g) for g in groups) if isinstance(groups, list) else ()
    return Identity(
        provider=provider_id,
        subject=str(claims["sub"]),
        email=_claim_text(claims, "email"),
        email_verified=_claim_bool(claims, "email_verified"),
        name=_claim_text(claims, "name"),
        username=_claim_text(claims, "preferred_username"),
        groups=group_list,
        provider_session=_claim_text(claims, "sid"),
    )


class OidcProvider:
    """Authorization code flow with PKCE against one OpenID Connect provider."""

    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.id = settings.id
        self.name = settings.display_name
        self.client = client
        self.timeout = timeouts(settings.connect_timeout, settings.timeout)
        self._metadata: dict[str, Any] | None = None
        self._jwks: JwksCache | None = None
        self._last_attempt = 0.0
        self._lock = asyncio.Lock()

    @property
    def issuer(self) -> str:
        return self.settings.issuer or ""

    async def ready(self) -> bool:
        try:
            await self.metadata()
        except LoginError:
            return False
        return True

    async def metadata(self) -> dict[str, Any]:
        """Return the discovery document, loading it on first use.

        A failed load is retried at most every ``DISCOVERY_RETRY_INTERVAL``
        seconds; in between, callers get ``provider_unavailable`` at once
        instead of waiting on a provider that is down.
        """
        if self._metadata is not None:
            return self._metadata
        async with self._lock:
            if self._metadata is not None:
                return self._metadata
            now = time.monotonic()
            if self._last_attempt and now - self._last_attempt < DISCOVERY_RETRY_INTERVAL:
                raise LoginError(
                    "provider_unavailable", f"{self.id} discovery failed recently", status=503
                )
            self._last_attempt = now
            try:
                document = await self._load_metadata()
            except LoginError as exc:
                logger.error("provider_discovery_failed provider=%s reason=%s detail=%s",
                             self.id, exc.reason, exc.detail)
                raise LoginError("provider_unavailable", exc.detail, status=503) from None
            self._metadata = document
            self._jwks = JwksCache(document["jwks_uri"], self.client)
            return document

    async def _load_metadata(self) -> dict[str, Any]:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await request_json(
            self.client, "GET", url, provider_id=self.id, step="discovery", timeout=self.timeout
        )
        if document.get("issuer") != self.issuer:
            raise LoginError(
                "provider_error",
                f"{self.id} discovery: issuer {document.get('issuer')!r} is not {self.issuer!r}",
            )
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(document.get(key), str):
                raise LoginError("provider_error", f"{self.id} discovery: {key} is missing")
            scheme = urlsplit(document[key]).scheme
            if scheme != "https" and not self.settings.insecure_allow_http_issuer:
                raise LoginError("provider_error", f"{self.id} discovery: {key} is not https")
        return document

    async def authorization_url(
        self, *, state: str, nonce: str, code_challenge: str, redirect_uri: str
    ) -> str:
        metadata = await self.metadata()
        params = {
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(self.settings.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
        endpoint = metadata["authorization_endpoint"]
        separator = "&" if "?" in endpoint else "?"
        return f"{endpoint}{separator}{urlencode(params, quote_via=quote)}"

    def _client_auth(self, form: dict[str, str]) -> dict[str, str]:
        secret = self.settings.client_secret.get() if self.settings.client_secret else ""
        if self.settings.token_endpoint_auth_method == "client_secret_post":
            form["client_id"] = self.settings.client_id
            form["client_secret"] = secret
            return {}
        # RFC 6749 section 2.3.1: both parts are form-urlencoded before Basic encoding.
        pair = f"{quote(self.settings.client_id, safe='')}:{quote(secret, safe='')}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii")}

    async def _exchange_code(
        self, metadata: dict[str, Any], code: str, redirect_uri: str, code_verifier: str
    ) -> dict[str, Any]:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        headers = {"Accept": "application/json", **self._client_auth(form)}
        return await request_json(
            self.client, "POST", metadata["token_endpoint"], provider_id=self.id,
            step="token", timeout=self.timeout, data=form, headers=headers,
        )

    async def _fetch_userinfo(
        self, metadata: dict[str, Any], access_token: str, subject: str
    ) -> dict[str, Any]:
        endpoint = metadata.get("userinfo_endpoint")
        if not isinstance(endpoint, str) or not access_token:
            return {}
        userinfo = await request_json(
            self.client, "GET", endpoint, provider_id=self.id, step="userinfo",
            timeout=self.timeout,
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
        )
        # OpenID Connect Core 1.0 section 5.3.2: the userinfo sub must equal the ID token's.
        if userinfo.get("sub") != subject:
            raise LoginError("token_invalid", f"{self.id} userinfo sub differs from the ID token")
        return userinfo

    def _expected_issuer(self, id_token: str) -> str:
        """The ``iss`` an ID token must carry; subclasses derive it for multi-tenant providers."""
        return self.issuer

    async def _id_token_claims(self, tokens: dict[str, Any], nonce: str) -> dict[str, Any]:
        """Validate the token response's ID token and return its claims."""
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise LoginError("token_invalid", f"{self.id} token response has no id_token")
        if self._jwks is None:
            raise LoginError("provider_unavailable", f"{self.id} keys not loaded", status=503)
        expected = TokenExpectations(
            issuer=self._expected_issuer(id_token),
            client_id=self.settings.client_id,
            nonce=nonce,
            algorithms=self.settings.id_token_algorithms,
        )
        return await validate_id_token(id_token, expected, self._jwks)

    async def complete(
        self, *, code: str, redirect_uri: str, code_verifier: str, nonce: str
    ) -> Identity:
        metadata = await self.metadata()
        tokens = await self._exchange_code(metadata, code, redirect_uri, code_verifier)
        claims = await self._id_token_claims(tokens, nonce)

        present = {k: v for k, v in claims.items() if v is not None}
        if USERINFO_CLAIMS <= present.keys():
            # The ID token's claims win over userinfo's, so userinfo could add nothing used.
            return identity_from_claims(self.id, present)
        access_token = tokens.get("access_token")
        userinfo = await self._fetch_userinfo(
            metadata, access_token if isinstance(access_token, str) else "", claims["sub"]
        )
        return identity_from_claims(self.id, {**userinfo, **present})

    async def validate_logout_token(self, token: str, replays: ReplayCache) -> LogoutRequest:
        """Check a back-channel logout token from this provider."""
        await self.metadata()
        if self._jwks is None:
            raise LoginError("provider_unavailable", f"{self.id} keys not loaded", status=503)
        return await validate_logout_token(
            token, issuer=self.issuer, client_id=self.settings.client_id,
            algorithms=list(self.settings.id_token_algorithms), jwks=self._jwks, replays=replays,
        )

    async def end_session_url(self, post_logout_redirect_uri: str) -> str | None:
        """The provider's end_session_endpoint with this client's parameters, if it has one."""
        metadata = await self.metadata()
        endpoint = metadata.get("end_session_endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            return None
        params = {"client_id": self.settings.client_id,
                  "post_logout_redirect_uri": post_logout_redirect_uri}
        separator = "&" if "?" in endpoint else "?"
        return f"{endpoint}{separator}{urlencode(params, quote_via=quote)}"
