"""ID token validation (OpenID Connect Core 1.0, section 3.1.3.7) and the JWKS cache.

Rules, each in its own function below: the ``alg`` header is on an allow-list of
asymmetric algorithms (never ``none``, never HMAC, so a public key can never be
used as an HMAC secret); the signature verifies with the provider's key named by
``kid``; ``iss`` equals the expected issuer exactly; ``aud`` contains the client
id, and ``azp``, when present or when there are several audiences, equals it;
``exp``, ``nbf`` and ``iat`` hold with a bounded leeway; ``nonce`` matches the one
sent, compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from jwt.algorithms import get_default_algorithms

from .errors import LoginError

logger = logging.getLogger(__name__)

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEFAULT_LEEWAY = 60.0
JWKS_MIN_REFRESH_INTERVAL = 60.0
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}

Clock = Callable[[], float]


class JwksFetchError(Exception):
    """The JWKS could not be fetched or parsed."""


@dataclass
class JwksCache:
    """The provider's signing keys, refetched on an unknown ``kid`` at most once a minute.

    A failed refetch keeps the keys already known, so a provider outage does
    not break tokens signed with keys seen before.
    """

    url: str
    client: httpx.AsyncClient
    clock: Clock = time.monotonic
    min_refresh_interval: float = JWKS_MIN_REFRESH_INTERVAL
    _keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    _anonymous: list[dict[str, Any]] = field(default_factory=list)
    _fetched_at: float | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def _fetch(self) -> None:
        try:
            response = await self.client.get(self.url, headers={"Accept": "application/json"})
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, json.JSONDecodeError, ValueError) as exc:
            raise JwksFetchError(f"{type(exc).__name__}") from None
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise JwksFetchError("document has no \"keys\" list")
        named: dict[str, dict[str, Any]] = {}
        anonymous: list[dict[str, Any]] = []
        for key in keys:
            if not isinstance(key, dict) or key.get("use", "sig") != "sig":
                continue
            if isinstance(key.get("kid"), str):
                named[key["kid"]] = key
            else:
                anonymous.append(key)
        self._keys, self._anonymous = named, anonymous
        logger.info("jwks_refreshed url=%s kids=%r unnamed=%d", self.url, sorted(named),
                    len(anonymous))

    async def _refresh(self) -> None:
        async with self._lock:
            now = self.clock()
            if self._fetched_at is not None and now - self._fetched_at < self.min_refresh_interval:
                return
            self._fetched_at = now
            try:
                await self._fetch()
            except JwksFetchError as exc:
                logger.warning("jwks_fetch_failed url=%s error=%s keeping=%d",
                               self.url, exc, len(self._keys) + len(self._anonymous))

    async def find(self, kid: str | None) -> list[dict[str, Any]]:
        """Return the candidate keys for ``kid`` (all unnamed keys when there is no ``kid``)."""
        if self._fetched_at is None:
            await self._refresh()
        candidates = self._lookup(kid)
        if not candidates:
            await self._refresh()
            candidates = self._lookup(kid)
        return candidates

    def _lookup(self, kid: str | None) -> list[dict[str, Any]]:
        if kid is not None:
            return [self._keys[kid]] if kid in self._keys else []
        return [*self._anonymous, *self._keys.values()]


@dataclass(frozen=True)
class TokenExpectations:
    issuer: str
    client_id: str
    nonce: str | None
    algorithms: Sequence[str]
    leeway: float = DEFAULT_LEEWAY


def _check_algorithm(header: dict[str, Any], algorithms: Sequence[str]) -> str:
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS or alg not in algorithms:
        raise LoginError("token_invalid", f"ID token algorithm {alg!r} is not allowed")
    return alg


def _key_matches(jwk: dict[str, Any], alg: str) -> bool:
    key_type = _KEY_TYPES.get(alg[:2])
    if jwk.get("kty") != key_type:
        return False
    declared = jwk.get("alg")
    return declared is None or declared == alg


async def _verify_signature(
    token: str, header: dict[str, Any], alg: str, jwks: JwksCache
) -> dict[str, Any]:
    kid = header.get("kid")
    # Both callers take the header from jwt.get_unverified_header, which already raises
    # on a non-string kid (checked with PyJWT 2.15). This guard is for a direct caller.
    if kid is not None and not isinstance(kid, str):  # pragma: no cover
        raise LoginError("token_invalid", "ID token kid is not a string")
    candidates = [key for key in await jwks.find(kid) if _key_matches(key, alg)]
    if not candidates:
        raise LoginError("token_invalid", f"no signing key for kid {kid!r} and alg {alg}")
    algorithm = get_default_algorithms()[alg]
    for jwk in candidates:
        try:
            key = algorithm.from_jwk(json.dumps(jwk))
        except (jwt.InvalidKeyError, ValueError, TypeError):
            # One malformed entry in the provider's JWKS must not block its other keys.
            logger.warning("jwks_key_invalid kid=%r kty=%r", jwk.get("kid"), jwk.get("kty"))
            continue
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,  # type: ignore[arg-type]
                algorithms=[alg],
                options={
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
            return claims
        except jwt.InvalidSignatureError:
            continue
        except (jwt.InvalidTokenError, ValueError, TypeError) as exc:
            raise LoginError("token_invalid", f"ID token cannot be decoded: {type(exc).__name__}") from None
    raise LoginError("token_invalid", "ID token signature does not verify")


def _check_issuer(claims: dict[str, Any], issuer: str) -> None:
    if claims.get("iss") != issuer:
        raise LoginError("token_invalid", f"ID token iss {claims.get('iss')!r} is not {issuer!r}")


def _check_audience(claims: dict[str, Any], client_id: str) -> None:
    audience = claims.get("aud")
    audiences = [audience] if isinstance(audience, str) else audience
    if not isinstance(audiences, list) or client_id not in audiences:
        raise LoginError("token_invalid", "ID token aud does not contain the client id")
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != client_id:
        raise LoginError("token_invalid", "ID token azp is not the client id")


def _numeric_claim(claims: dict[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LoginError("token_invalid", f"ID token {name} is missing or not a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise LoginError("token_invalid", f"ID token {name} is not a finite number")
    return number


def _check_times(claims: dict[str, Any], now: float, leeway: float) -> None:
    expires = _numeric_claim(claims, "exp", required=True) or 0.0
    issued = _numeric_claim(claims, "iat", required=True) or 0.0
    not_before = _numeric_claim(claims, "nbf", required=False)
    if now > expires + leeway:
        raise LoginError("token_invalid", "ID token has expired")
    if issued > now + leeway:
        raise LoginError("token_invalid", "ID token iat is in the future")
    if not_before is not None and not_before > now + leeway:
        raise LoginError("token_invalid", "ID token is not valid yet (nbf)")


def _check_nonce(claims: dict[str, Any], nonce: str | None) -> None:
    if nonce is None:
        return
    found = claims.get("nonce")
    if not isinstance(found, str) or not hmac.compare_digest(found.encode(), nonce.encode()):
        raise LoginError("token_invalid", "ID token nonce does not match the one sent")


def _check_subject(claims: dict[str, Any]) -> None:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject or len(subject) > 255:
        raise LoginError("token_invalid", "ID token sub is missing or invalid")


async def validate_id_token(
    token: str, expected: TokenExpectations, jwks: JwksCache, *, now: float | None = None
) -> dict[str, Any]:
    """Validate an ID token and return its claims, or raise ``LoginError("token_invalid")``."""
    # A compact JWS is ASCII only. Checking it here keeps PyJWT from raising
    # UnicodeEncodeError on a lone surrogate that a JSON token response can carry.
    if not isinstance(token, str) or not token.isascii() or token.count(".") != 2:
        raise LoginError("token_invalid", "ID token is not a compact JWS")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise LoginError("token_invalid", "ID token header cannot be decoded") from None

    alg = _check_algorithm(header, expected.algorithms)
    claims = await _verify_signature(token, header, alg, jwks)

    _check_issuer(claims, expected.issuer)
    _check_audience(claims, expected.client_id)
    _check_times(claims, time.time() if now is None else now, expected.leeway)
    _check_nonce(claims, expected.nonce)
    _check_subject(claims)
    return claims
