"""A fake OpenID Connect provider at ``https://idp.test``, served through respx.

Tests shape each token answer (claims, header, signing key) to exercise one
rule of ID token validation; everything else behaves like a real provider.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import respx
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER = "https://idp.test"
CLIENT_ID = "crm-client"
CLIENT_SECRET = "crm-client-secret"


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig", "alg": "RS256"}


@dataclass
class FakeIdp:
    """State of the fake provider; tests change fields to shape its answers."""

    key: rsa.RSAPrivateKey = field(default_factory=new_rsa_key)
    kid: str = "key-1"
    subject: str = "alice-sub"
    email: str | None = "alice@example.com"
    email_verified: bool = True
    extra_claims: dict[str, Any] = field(default_factory=dict)
    nonce_override: str | None = None
    token_builder: Callable[[dict[str, Any]], str] | None = None
    token_status: int = 200
    token_body: dict[str, Any] | None = None
    userinfo: dict[str, Any] | None = None
    last_nonce: str | None = None
    nonces_by_code: dict[str, str] = field(default_factory=dict)
    token_requests: list[httpx.Request] = field(default_factory=list)
    jwks_requests: int = 0
    extra_jwks: list[dict[str, Any]] = field(default_factory=list)

    def claims(self, nonce: str | None) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER, "aud": CLIENT_ID, "sub": self.subject, "iat": now, "exp": now + 300,
            "nonce": self.nonce_override or nonce, "name": "Alice Example",
            "preferred_username": "alice",
        }
        if self.email is not None:
            claims["email"] = self.email
            claims["email_verified"] = self.email_verified
        claims.update(self.extra_claims)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid, **header})

    def install(self, router: respx.Router) -> None:
        router.get(f"{ISSUER}/.well-known/openid-configuration").mock(
            return_value=httpx.Response(200, json={
                "issuer": ISSUER,
                "authorization_endpoint": f"{ISSUER}/authorize",
                "token_endpoint": f"{ISSUER}/token",
                "userinfo_endpoint": f"{ISSUER}/userinfo",
                "jwks_uri": f"{ISSUER}/jwks",
                "id_token_signing_alg_values_supported": ["RS256"],
            })
        )
        router.get(f"{ISSUER}/jwks").mock(side_effect=self._jwks)
        router.post(f"{ISSUER}/token").mock(side_effect=self._token)
        router.get(f"{ISSUER}/userinfo").mock(side_effect=self._userinfo)

    def _jwks(self, _request: httpx.Request) -> httpx.Response:
        self.jwks_requests += 1
        return httpx.Response(200, json={"keys": [public_jwk(self.key, self.kid), *self.extra_jwks]})

    def _token(self, request: httpx.Request) -> httpx.Response:
        self.token_requests.append(request)
        if self.token_body is not None or self.token_status != 200:
            return httpx.Response(self.token_status, json=self.token_body or {})
        code = parse_qs(request.content.decode()).get("code", [""])[0]
        claims = self.claims(self.nonces_by_code.get(code, self.last_nonce))
        id_token = self.token_builder(claims) if self.token_builder else self.sign(claims)
        return httpx.Response(200, json={
            "access_token": "at-123", "token_type": "Bearer", "expires_in": 300, "id_token": id_token,
        })

    def _userinfo(self, _request: httpx.Request) -> httpx.Response:
        if self.userinfo is not None:
            return httpx.Response(200, json=self.userinfo)
        return httpx.Response(200, json={"sub": self.subject})

    def remember_nonce(self, authorize_url: str) -> dict[str, str]:
        """Read the parameters a guard put in its authorization URL."""
        params = {k: v[0] for k, v in parse_qs(urlsplit(authorize_url).query).items()}
        self.last_nonce = params.get("nonce")
        return params
