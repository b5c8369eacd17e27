"""API clients: ``Authorization: Bearer <JWT>`` in place of a session cookie.

The middleware calls :class:`BearerAuth` only when no session cookie admitted
the request and the path is not public. A token is accepted when it is a JWT
(an ID token, or an access token in JWT form) from a provider of type
``oidc`` whose ``iss`` equals the provider's issuer, signed by a key from the
provider's JWKS with an allowed algorithm, whose ``aud`` contains the client
id or one of the provider's ``api_audiences``, and whose ``exp``, ``iat`` and
``nbf`` hold (see ``tokens.validate_id_token``). Its identity then goes
through the same sign-in policy as a browser sign-in: a known, enabled user,
or a user provisioned or linked under the same rules. No cookie is set.

A validated token is cached by its SHA-256 hash, so repeated calls with one
token skip the signature check and the store. An entry lives until the token
expires, but at most ``session.revocation_poll_interval`` seconds, so a user
disabled in the store loses API access within the same bound as a revoked
session cookie on another replica.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import Scope, Send

from .audit import AuditEvent, EventName, escape_control
from .errors import LoginError, StoreError
from .guard import AccessResult, Guard
from .headers import header_value
from .identity import Principal
from .paths import is_public
from .providers.oidc import OidcProvider, identity_from_claims
from .tokens import JwksCache, TokenExpectations, validate_id_token

logger = logging.getLogger(__name__)

MAX_CACHED_TOKENS = 1024
# RFC 6750 section 2.1: "Bearer" 1*SP b64token, where b64token is token68.
_AUTHORIZATION_RE = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)\s*$")
MAX_TOKEN_LENGTH = 16 * 1024


def bearer_token(scope: Scope) -> str | None:
    """Return the token of an ``Authorization: Bearer`` header, or None without one."""
    value = header_value(scope.get("headers", []), b"authorization")
    if value is None or not value[:7].lower().startswith("bearer"):
        return None
    match = _AUTHORIZATION_RE.match(value)
    return match.group(1) if match else ""


class BearerRejected(Exception):
    """A bearer token that does not admit the request, with the response to send."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.status = status
        self.error = error
        self.description = description

    async def respond(self, scope: Scope, send: Send) -> None:
        """Send a JSON error (RFC 6750 section 3), or reject a websocket handshake."""
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4000 + self.status,
                        "reason": self.error})
            return
        body = json.dumps({"error": self.error, "message": self.description}).encode()
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store"),
                   (b"content-length", str(len(body)).encode())]
        if self.status == 401:
            challenge = (f'Bearer realm="moko-guard", error="invalid_token", '
                         f'error_description="{self.description}"')
            headers.append((b"www-authenticate", challenge.encode("latin-1")))
        if self.status == 503:
            headers.append((b"retry-after", b"30"))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _invalid(description: str) -> BearerRejected:
    return BearerRejected(401, "invalid_token", description)


@dataclass(frozen=True)
class _CachedPrincipal:
    principal: Principal
    valid_until: float


class BearerAuth:
    """Validate bearer tokens against the configured OIDC providers, with a bounded cache."""

    def __init__(self, guard: Guard, *, max_entries: int = MAX_CACHED_TOKENS) -> None:
        self.guard = guard
        self.max_entries = max_entries
        self.recheck_interval = guard.settings.session.revocation_poll_interval
        self._cache: OrderedDict[bytes, _CachedPrincipal] = OrderedDict()
        self._jwks: dict[str, JwksCache] = {}

    def applies(self, scope: Scope, result: AccessResult) -> bool:
        """True when a bearer token is present and could change the decision."""
        if result.decision not in ("unauthenticated", "anonymous"):
            return False
        if result.path is None or is_public(result.path, self.guard.settings.access.public_paths):
            return False
        return bearer_token(scope) is not None

    async def authenticate(self, scope: Scope, result: AccessResult) -> AccessResult:
        """Return the decision for the token's user, or raise :class:`BearerRejected`."""
        token = bearer_token(scope)
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise await self._rejected(scope, _invalid("the Authorization header is malformed"))
        principal = self._cached(token)
        if principal is None:
            principal = await self._principal_for(scope, token)
            self._remember(token, principal)
        path = result.path or "/"
        denial = self.guard._role_denial(principal, path, str(scope.get("method", "GET")))
        if denial is not None:
            return AccessResult("forbidden", principal, denial, path)
        return AccessResult("allow", principal, path=path)

    # --- cache -----------------------------------------------------------------

    def _cached(self, token: str) -> Principal | None:
        key = hashlib.sha256(token.encode("ascii")).digest()
        entry = self._cache.get(key)
        if entry is None:
            return None
        if self.guard.clock() >= entry.valid_until:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry.principal

    def _remember(self, token: str, principal: Principal) -> None:
        key = hashlib.sha256(token.encode("ascii")).digest()
        valid_until = min(principal.expires_at, self.guard.clock() + self.recheck_interval)
        self._cache[key] = _CachedPrincipal(principal, valid_until)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    # --- validation --------------------------------------------------------------

    async def _principal_for(self, scope: Scope, token: str) -> Principal:
        try:
            provider_id, claims = await self._validate(token)
        except LoginError as exc:
            if exc.status == 503:
                raise await self._rejected(scope, BearerRejected(
                    503, "temporarily_unavailable", "the token issuer's keys cannot be loaded"),
                    detail=exc.detail) from None
            raise await self._rejected(scope, _invalid("the token is not valid"),
                                       detail=exc.detail) from None
        identity = identity_from_claims(provider_id, claims)
        try:
            resolution = await self.guard.policy.resolve(identity)
        except LoginError as exc:
            raise await self._rejected(
                scope, BearerRejected(403, exc.reason, "this identity may not use the application"),
                provider=provider_id, subject=identity.subject, detail=exc.detail) from None
        except (StoreError, SQLAlchemyError, OSError) as exc:
            logger.error("store_error during bearer check: %s", type(exc).__name__)
            raise BearerRejected(503, "temporarily_unavailable",
                                 "the service is busy, try again later") from None
        await self._audit_resolution(scope, resolution.provisioned, resolution.linked,
                                     provider_id, identity.subject, resolution.user.id,
                                     identity.email)
        user = resolution.user
        return Principal(
            session_id="bearer:" + hashlib.sha256(token.encode("ascii")).hexdigest()[:16],
            user_id=user.id, username=user.username, email=user.email, roles=user.roles,
            provider=provider_id, preferred_username=identity.username,
            issued_at=float(claims["iat"]), expires_at=float(claims["exp"]),
        )

    async def _validate(self, token: str) -> tuple[str, dict[str, Any]]:
        """Return the provider id and the claims of a valid token, or raise ``LoginError``."""
        unverified = _unverified_claims(token)
        for provider_id, provider in self.guard.providers.items():
            settings = self.guard.settings.provider(provider_id)
            if settings is None or settings.type != "oidc":
                continue
            if not isinstance(provider, OidcProvider) or provider.issuer != unverified.get("iss"):
                continue
            audience = _matching_audience(unverified, [settings.client_id,
                                                       *settings.api_audiences])
            if audience is None:
                raise LoginError("token_invalid", f"aud does not name provider {provider_id!r}")
            # NOTE: validate_id_token also applies the ID token rule for "azp": when present
            # it must equal the audience, so an access token whose azp names another client
            # (RFC 9068 allows that) is rejected.
            expected = TokenExpectations(issuer=provider.issuer, client_id=audience, nonce=None,
                                         algorithms=settings.id_token_algorithms)
            jwks = await self._jwks_for(provider_id, provider)
            claims = await validate_id_token(token, expected, jwks, now=self.guard.clock())
            return provider_id, claims
        raise LoginError("token_invalid", "iss is not the issuer of any oidc provider")

    async def _jwks_for(self, provider_id: str, provider: OidcProvider) -> JwksCache:
        jwks = self._jwks.get(provider_id)
        if jwks is None:
            metadata = await provider.metadata()
            jwks = JwksCache(metadata["jwks_uri"], self.guard.http)
            self._jwks[provider_id] = jwks
        return jwks

    # --- audit -------------------------------------------------------------------

    async def _rejected(self, scope: Scope, rejection: BearerRejected, *,
                        provider: str | None = None, subject: str | None = None,
                        detail: str | None = None) -> BearerRejected:
        """Record a rejected token in the audit log and the operator log, then return it."""
        reason = "token_invalid" if rejection.status == 401 else rejection.error
        logger.warning("bearer_rejected reason=%s provider=%s detail=%s", reason, provider,
                       escape_control(detail or rejection.description))
        await self.guard.audit_scope(scope, AuditEvent(
            "access.denied", "failure", reason=reason, provider=provider, subject=subject,
            detail=f"bearer token: {detail or rejection.description}",
        ))
        return rejection

    async def _audit_resolution(self, scope: Scope, provisioned: bool, linked: bool,
                                provider: str, subject: str, user_id: int,
                                email: str | None) -> None:
        events: list[tuple[EventName, bool]] = [("user.provisioned", provisioned),
                                                ("identity.linked", linked)]
        for event, happened in events:
            if happened:
                await self.guard.audit_scope(scope, AuditEvent(
                    event, "info", provider=provider, subject=subject, user_id=user_id,
                    email=email, detail="bearer token",
                ))


def _unverified_claims(token: str) -> dict[str, Any]:
    """Read the claims without checking them, only to pick the provider and audience."""
    if not token.isascii() or token.count(".") != 2:
        raise LoginError("token_invalid", "not a compact JWS")
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise LoginError("token_invalid", f"cannot be decoded: {type(exc).__name__}") from None
    if not isinstance(claims, dict):
        raise LoginError("token_invalid", "claims are not a JSON object")
    return claims


def _matching_audience(claims: dict[str, Any], accepted: list[str]) -> str | None:
    audience = claims.get("aud")
    audiences = [audience] if isinstance(audience, str) else audience
    if not isinstance(audiences, list):
        return None
    for candidate in accepted:
        if candidate in audiences:
            return candidate
    return None
