"""A small OpenID Connect provider for the demo, on loopback only.

It is NOT a real identity provider: anyone who types an email at the demo
domain signs in, without a password. Every page says so. It implements just
enough of OpenID Connect Core 1.0 for the guard: discovery, JWKS, the
authorization endpoint (a form), the token endpoint with PKCE S256 and
client_secret_basic, and userinfo.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from html import escape
from typing import Any
from urllib.parse import urlencode

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

BANNER = "DEMO PROVIDER: for trying moko_guard on this computer only. No passwords are checked."


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    email: str
    nonce: str | None
    challenge: str
    expires_at: float


@dataclass
class DemoProvider:
    issuer: str
    client_id: str
    client_secret: str
    redirect_uri: str
    email_domain: str = "example.com"
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    kid: str = field(default_factory=lambda: secrets.token_hex(8))
    _codes: dict[str, _Grant] = field(default_factory=dict)
    _tokens: dict[str, tuple[str, float]] = field(default_factory=dict)

    @staticmethod
    def subject_of(email: str) -> str:
        """Return the ``sub`` this provider gives an email address."""
        return "demo-" + email

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/.well-known/openid-configuration", self.discovery),
            Route("/jwks", self.jwks),
            Route("/authorize", self.authorize, methods=["GET", "POST"]),
            Route("/token", self.token, methods=["POST"]),
            Route("/userinfo", self.userinfo),
        ])

    async def discovery(self, _request: Request) -> Response:
        return JSONResponse({
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "userinfo_endpoint": f"{self.issuer}/userinfo",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
        })

    async def jwks(self, _request: Request) -> Response:
        public = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        return JSONResponse({"keys": [{**public, "kid": self.kid, "use": "sig", "alg": "RS256"}]})

    def _form(self, params: dict[str, str], error: str = "") -> HTMLResponse:
        hidden = "".join(
            f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in params.items()
        )
        message = f'<p class="error">{escape(error)}</p>' if error else ""
        html = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="color-scheme" content="light dark"><title>Demo provider sign-in</title>
<style>body{{font:16px system-ui,sans-serif;max-width:420px;margin:10vh auto;padding:0 16px}}
.banner{{background:#ffe58a;color:#3d3000;padding:10px;border-radius:6px;font-weight:600}}
.error{{color:#b00020}} input[type=email]{{width:100%;padding:8px;font-size:1rem}}
button{{margin-top:12px;padding:10px 16px;font-size:1rem}}</style></head><body>
<p class="banner">{escape(BANNER)}</p>
<h1>Demo provider</h1>{message}
<form method="post" action="/authorize">{hidden}
<label for="email">Email at {escape(self.email_domain)}</label>
<input id="email" type="email" name="email" required value="alice@{escape(self.email_domain)}">
<button type="submit">Sign in to the demo</button></form></body></html>"""
        return HTMLResponse(html, status_code=400 if error else 200)

    async def authorize(self, request: Request) -> Response:
        source = dict(await request.form()) if request.method == "POST" else dict(request.query_params)
        params = {k: str(v) for k, v in source.items()}
        if params.get("client_id") != self.client_id or params.get("redirect_uri") != self.redirect_uri:
            return HTMLResponse(f"<p>{escape(BANNER)}</p><p>Unknown client or redirect URI.</p>",
                                status_code=400)
        if params.get("response_type") != "code" or params.get("code_challenge_method") != "S256":
            return HTMLResponse(f"<p>{escape(BANNER)}</p><p>Only the code flow with PKCE S256.</p>",
                                status_code=400)
        request_params = {k: v for k, v in params.items() if k != "email"}
        if request.method == "GET":
            return self._form(request_params)
        email = params.get("email", "").strip().lower()
        if not email.endswith("@" + self.email_domain) or email.count("@") != 1:
            return self._form(request_params, f"Use an email at {self.email_domain}.")
        code = secrets.token_urlsafe(24)
        self._codes[code] = _Grant(self.client_id, self.redirect_uri, email, params.get("nonce"),
                                   params.get("code_challenge", ""), time.time() + 60)
        query = urlencode({"code": code, "state": params.get("state", ""), "iss": self.issuer})
        return RedirectResponse(f"{self.redirect_uri}?{query}", status_code=302)

    def _client_ok(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(header[6:]).decode()
        except (ValueError, UnicodeDecodeError):
            return False
        expected = f"{self.client_id}:{self.client_secret}"
        return hmac.compare_digest(decoded.encode(), expected.encode())

    async def token(self, request: Request) -> Response:
        if not self._client_ok(request):
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        form = await request.form()
        grant = self._codes.pop(str(form.get("code", "")), None)
        verifier = str(form.get("code_verifier", ""))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
        valid = (
            grant is not None and grant.expires_at > time.time()
            and form.get("redirect_uri") == grant.redirect_uri
            and hmac.compare_digest(challenge.decode(), grant.challenge)
        )
        if grant is None or not valid:
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": self.client_id, "sub": self.subject_of(grant.email),
            "email": grant.email, "email_verified": True, "name": grant.email.split("@")[0].title(),
            "preferred_username": grant.email.split("@")[0], "iat": now, "exp": now + 300,
        }
        if grant.nonce:
            claims["nonce"] = grant.nonce
        id_token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})
        access_token = secrets.token_urlsafe(24)
        self._tokens[access_token] = (grant.email, now + 300)
        return JSONResponse({"access_token": access_token, "token_type": "Bearer",
                             "expires_in": 300, "id_token": id_token})

    async def userinfo(self, request: Request) -> Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        entry = self._tokens.get(token)
        if entry is None or entry[1] < time.time():
            return JSONResponse({"error": "invalid_token"}, status_code=401)
        email = entry[0]
        return JSONResponse({"sub": self.subject_of(email), "email": email, "email_verified": True})
