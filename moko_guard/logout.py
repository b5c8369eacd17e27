"""OpenID Connect Back-Channel Logout 1.0: the provider tells the guard a session ended.

The provider POSTs a signed logout token (section 2.4) to
``<prefix>/backchannel_logout/<provider id>``. It is checked like an ID token
(signature from the provider's JWKS, allowed algorithm, exact ``iss``, ``aud``,
``iat``/``exp`` with leeway) and further (section 2.6): the ``events`` claim
holds the back-channel logout event, ``sub`` or ``sid`` is present, there is no
``nonce``, and its ``jti`` has not been seen before. A valid token revokes the
matching sessions; the answer is 200, or 400 with an error code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

from .errors import LoginError
from .tokens import (
    DEFAULT_LEEWAY,
    JwksCache,
    _check_algorithm,
    _check_audience,
    _check_issuer,
    _numeric_claim,
    _verify_signature,
)

LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
_SEEN_JTI_LIMIT = 10_000


@dataclass(frozen=True)
class LogoutRequest:
    subject: str | None
    provider_session: str | None


class ReplayCache:
    """``jti`` values already used, kept for the token lifetime (bounded in size)."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def check_and_add(self, jti: str, expires_at: float, now: float) -> bool:
        for key in [k for k, exp in self._seen.items() if exp < now]:
            del self._seen[key]
        if jti in self._seen:
            return False
        if len(self._seen) >= _SEEN_JTI_LIMIT:
            self._seen.pop(next(iter(self._seen)))
        self._seen[jti] = expires_at
        return True


def _check_logout_claims(claims: dict[str, Any]) -> LogoutRequest:
    events = claims.get("events")
    if not isinstance(events, dict) or not isinstance(events.get(LOGOUT_EVENT), dict):
        raise LoginError("token_invalid", "logout token has no back-channel logout event")
    if "nonce" in claims:
        raise LoginError("token_invalid", "logout token must not carry a nonce")
    subject = claims.get("sub")
    sid = claims.get("sid")
    subject = subject if isinstance(subject, str) and subject else None
    sid = sid if isinstance(sid, str) and sid else None
    if subject is None and sid is None:
        raise LoginError("token_invalid", "logout token has neither sub nor sid")
    if not isinstance(claims.get("jti"), str) or not claims["jti"]:
        raise LoginError("token_invalid", "logout token has no jti")
    return LogoutRequest(subject, sid)


async def validate_logout_token(
    token: str, *, issuer: str, client_id: str, algorithms: list[str], jwks: JwksCache,
    replays: ReplayCache, now: float | None = None,
) -> LogoutRequest:
    """Return who to sign out, or raise ``LoginError("token_invalid")``."""
    if not isinstance(token, str) or not token.isascii() or token.count(".") != 2:
        raise LoginError("token_invalid", "logout token is not a compact JWS")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise LoginError("token_invalid", "logout token header cannot be decoded") from None
    typ = header.get("typ")
    if typ is not None and str(typ).lower() not in ("logout+jwt", "application/logout+jwt", "jwt"):
        raise LoginError("token_invalid", f"logout token typ {typ!r} is not logout+jwt")

    alg = _check_algorithm(header, algorithms)
    claims = await _verify_signature(token, header, alg, jwks)
    _check_issuer(claims, issuer)
    _check_audience(claims, client_id)

    current = time.time() if now is None else now
    issued = _numeric_claim(claims, "iat", required=True) or 0.0
    expires = _numeric_claim(claims, "exp", required=False)
    if issued > current + DEFAULT_LEEWAY:
        raise LoginError("token_invalid", "logout token iat is in the future")
    if expires is not None and current > expires + DEFAULT_LEEWAY:
        raise LoginError("token_invalid", "logout token has expired")
    request = _check_logout_claims(claims)

    horizon = (expires if expires is not None else issued + 600) + DEFAULT_LEEWAY
    if not replays.check_and_add(str(claims["jti"]), horizon, current):
        raise LoginError("token_invalid", "logout token was already used (jti)")
    return request
