"""Identity headers: the ones the guard sets, and every spelling a client could forge.

A client must never be able to send an identity header the upstream trusts.
Before the upstream sees a request, every header whose name, compared
case-insensitively with ``_``, ``.`` and ``-`` treated alike, is one of the
configured names or a well-known identity header (``X-Forwarded-User``,
``Remote-User``, ...) is removed. Treating ``_`` as ``-`` matters because
nginx, PHP's CGI variables and WSGI servers map ``X_Auth_Request_User`` and
``X-Auth-Request-User`` to the same variable. ``.`` counts too: PHP puts
``X.Authenticated.User`` and ``X-Authenticated-User`` in one ``$_SERVER`` key
(Traefik advisory GHSA-rf44-j88r-hh8c, the dot form of GHSA-x677-9fxg-v5c5).
"""

from __future__ import annotations

import logging
import functools
from collections.abc import Iterable, Sequence

from .config import HeaderSettings
from .flow import FLOW_COOKIE_PREFIX
from .identity import Principal

logger = logging.getLogger(__name__)

WELL_KNOWN_IDENTITY_HEADERS = (
    "x-forwarded-user", "x-forwarded-email", "x-forwarded-preferred-username",
    "x-forwarded-groups", "x-forwarded-access-token", "remote-user", "x-remote-user",
    "x-auth-request-user", "x-auth-request-email", "x-auth-request-roles",
    "x-auth-request-groups", "x-auth-request-provider", "x-auth-request-preferred-username",
    "x-auth-request-access-token", "x-moko-identity", "x-user", "x-email",
)

RawHeaders = list[tuple[bytes, bytes]]
# Distinct identities whose raw headers are kept; the oldest entry is dropped first.
_RAW_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=2048)
def canonical(name: str | bytes) -> str:
    """Lower-case a header name and map ``_`` and ``.`` to ``-``, the form used for matching."""
    text = name.decode("latin-1") if isinstance(name, bytes) else name
    return text.strip().lower().replace("_", "-").replace(".", "-")


class IdentityHeaders:
    def __init__(self, settings: HeaderSettings) -> None:
        self.settings = settings
        self._raw_cache: dict[tuple[object, ...], RawHeaders] = {}
        self.blocked = frozenset(
            canonical(n) for n in (*WELL_KNOWN_IDENTITY_HEADERS, *settings.names())
        )

    def is_identity_header(self, name: str | bytes) -> bool:
        return canonical(name) in self.blocked

    def strip_request(self, headers: Iterable[tuple[bytes, bytes]], session_cookie: str,
                      ) -> RawHeaders:
        """Remove identity headers and the guard's own cookies from a client's request."""
        cleaned: RawHeaders = []
        for key, value in headers:
            if canonical(key) in self.blocked:
                # The name only: the value may be a forged identity or a token.
                logger.debug("stripped_client_identity_header name=%r", key.decode("latin-1"))
                continue
            if key.lower() == b"cookie":
                kept = _cookies_without_guard(value.decode("latin-1"), session_cookie)
                if kept:
                    cleaned.append((b"cookie", kept.encode("latin-1")))
                continue
            cleaned.append((key, value))
        return cleaned

    def build(self, principal: Principal) -> list[tuple[str, str]]:
        """The headers handed to the upstream for a signed-in user."""
        names = self.settings
        values = [
            (names.user, principal.username),
            (names.email, principal.email or ""),
            (names.roles, ",".join(principal.roles)),
            (names.provider, principal.provider),
            (names.preferred_username, principal.preferred_username or principal.username),
        ]
        return [(k, _header_safe(v)) for k, v in values if v]

    def build_raw(self, principal: Principal) -> RawHeaders:
        """The identity headers as raw ASGI pairs, reused while the same identity returns."""
        key = (principal.username, principal.email, principal.roles, principal.provider,
               principal.preferred_username)
        cached = self._raw_cache.get(key)
        if cached is None:
            cached = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                      for k, v in self.build(principal)]
            if len(self._raw_cache) >= _RAW_CACHE_SIZE:
                self._raw_cache.pop(next(iter(self._raw_cache)))
            self._raw_cache[key] = cached
        return list(cached)


@functools.lru_cache(maxsize=4096)
def _cookies_without_guard(cookie_header: str, session_cookie: str) -> str:
    # Cached: a browser sends the same Cookie header with each request of a session.
    return strip_guard_cookies(cookie_header, session_cookie)


def strip_guard_cookies(cookie_header: str, session_cookie: str) -> str:
    """Remove the guard's session and flow cookies from a ``Cookie`` header value."""
    kept = []
    for part in cookie_header.split(";"):
        name = part.split("=", 1)[0].strip()
        # Also "<name>_0", "<name>_1", ...: leftovers of split session cookies.
        is_session = name == session_cookie or name.startswith(session_cookie + "_")
        if is_session or name.startswith(FLOW_COOKIE_PREFIX + "_"):
            continue
        if part.strip():
            kept.append(part.strip())
    return "; ".join(kept)


def _header_safe(value: str) -> str:
    """Drop characters that cannot travel in an HTTP header value (keep U+0020 to U+007E)."""
    # Fast path for the usual value: printable ASCII is exactly U+0020 to U+007E.
    if value.isascii() and value.isprintable():
        return value
    return "".join(ch for ch in value if 0x20 <= ord(ch) < 0x7f)


def header_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of a header in raw ASGI headers, or None."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None
