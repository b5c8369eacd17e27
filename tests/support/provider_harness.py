"""Helpers for provider sign-in tests: a fake token endpoint and a guarded app.

A provider fake (Google, Microsoft, ...) returns its provider's documented
responses and uses :class:`FakeTokenEndpoint` for the parts every OpenID
Connect provider shares: the signing key, the JWKS and the token response. Requests only
reach respx routes through ``httpx.MockTransport``, never the network.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import respx
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.types import ASGIApp

from moko_guard import Guard, GuardMiddleware, Settings
from moko_guard.store import AuditFilter, AuditRecord
from support.fake_idp import new_rsa_key, public_jwk

PUBLIC_URL = "https://crm.example.com"
ID_TOKEN_LIFETIME = 3600


def authorize_params(authorize_url: str) -> dict[str, str]:
    """Return the query parameters of an authorization URL, one value each."""
    return {k: v[0] for k, v in parse_qs(urlsplit(authorize_url).query).items()}


@dataclass
class FakeTokenEndpoint:
    """A provider's token endpoint and JWKS, issuing ID tokens from ``claims``.

    ``claims`` contains the ID token claims except ``iat``, ``exp`` and
    ``nonce``, which each token response fills in. ``failure`` replaces the
    token response with another response (an error status or a body that is
    not JSON) or is raised as an exception (a timeout).
    """

    claims: dict[str, Any]
    token_fields: dict[str, Any]
    key: rsa.RSAPrivateKey = field(default_factory=new_rsa_key)
    kid: str = "key-1"
    # Fields added to the public JWK; a None value removes the field.
    jwk_fields: dict[str, Any] = field(default_factory=dict)
    with_not_before: bool = False
    failure: httpx.Response | Exception | None = None
    last_nonce: str | None = None
    token_requests: list[httpx.Request] = field(default_factory=list)

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def id_token_claims(self) -> dict[str, Any]:
        now = int(time.time())
        times = {"iat": now, "exp": now + ID_TOKEN_LIFETIME}
        if self.with_not_before:
            times["nbf"] = now
        return {**self.claims, **times, "nonce": self.last_nonce}

    def jwks(self, _request: httpx.Request) -> httpx.Response:
        jwk = {**public_jwk(self.key, self.kid), **self.jwk_fields}
        return httpx.Response(200, json={"keys": [{k: v for k, v in jwk.items() if v is not None}]})

    def token(self, request: httpx.Request) -> httpx.Response:
        self.token_requests.append(request)
        if isinstance(self.failure, Exception):
            raise self.failure
        if self.failure is not None:
            return self.failure
        id_token = self.sign(self.id_token_claims())
        return httpx.Response(200, json={**self.token_fields, "id_token": id_token})

    def remember_nonce(self, authorize_url: str) -> dict[str, str]:
        params = authorize_params(authorize_url)
        self.last_nonce = params.get("nonce")
        return params


class NonceSink(Protocol):
    def remember_nonce(self, authorize_url: str) -> dict[str, str]: ...


class ProviderHarness:
    """A guarded app in front of an echo app, with helpers to sign in through it."""

    def __init__(self, guard: Guard, client: httpx.AsyncClient) -> None:
        self.guard = guard
        self.client = client

    async def start_login(self, provider_id: str, rd: str = "/deals") -> httpx.Response:
        response = await self.client.get("/oauth2/start", params={"provider": provider_id, "rd": rd})
        assert response.status_code == 302, response.text
        return response

    async def sign_in(self, provider_id: str, fake: NonceSink, rd: str = "/deals") -> httpx.Response:
        """Start a login, let ``fake`` see the authorization URL, and return the callback response."""
        start = await self.start_login(provider_id, rd)
        params = fake.remember_nonce(start.headers["location"])
        return await self.client.get(
            "/oauth2/callback", params={"code": "auth-code-1", "state": params["state"]}
        )

    async def sign_in_again(self, provider_id: str, fake: NonceSink) -> httpx.Response:
        """Sign in from a fresh browser: the session cookie of an earlier sign-in is dropped."""
        self.client.cookies.clear()
        return await self.sign_in(provider_id, fake)

    async def upstream_headers(self, path: str = "/deals") -> dict[str, str]:
        """Return the request headers the upstream app received for ``path``."""
        response = await self.client.get(path)
        assert response.status_code == 200, response.text
        headers: dict[str, str] = response.json()["headers"]
        return headers

    async def login_failures(self) -> list[AuditRecord]:
        records = await self.guard.store.list_audit(AuditFilter(event="login.failure", limit=100))
        return list(records)


@asynccontextmanager
async def guarded_app(
    settings: Settings, router: respx.Router, app: ASGIApp
) -> AsyncIterator[ProviderHarness]:
    """Run ``app`` behind a guard whose outbound HTTP goes to ``router`` only."""
    http = httpx.AsyncClient(transport=httpx.MockTransport(router.handler))
    guard = Guard(settings, http_client=http)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=GuardMiddleware(app, guard=guard),
                                      client=("127.0.0.1", 40000)),
        base_url=PUBLIC_URL,
    )
    try:
        yield ProviderHarness(guard, client)
    finally:
        await client.aclose()
        await guard.shutdown()
        await http.aclose()
