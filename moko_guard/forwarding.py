"""What the request really is: client address, scheme, host and URI.

``X-Forwarded-*``, ``X-Real-IP`` and ``X-Original-URI`` are read only when the
TCP peer is in ``server.trusted_proxies``. An empty list trusts nobody.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Sequence

from starlette.types import Scope

from .headers import header_value

logger = logging.getLogger(__name__)

# Headers that would change the scheme, host or path the guard decides on, had a
# trusted proxy sent them. From any other peer they are ignored with a warning.
# X-Forwarded-For and X-Real-IP are left out: client-side proxies add them to
# ordinary traffic, and they only change the address written to the audit log.
_DECISION_HEADERS = (
    (b"x-forwarded-proto", "X-Forwarded-Proto"), (b"x-forwarded-host", "X-Forwarded-Host"),
    (b"x-forwarded-uri", "X-Forwarded-Uri"), (b"x-original-uri", "X-Original-URI"),
)
# Set in scope["state"] once the warning for a request is logged, because several
# parts of the guard read the request info of one request.
_WARNED_STATE_KEY = "moko_untrusted_forwarding_warned"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)
def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # Cached: the same few peer and proxy addresses come back on every request.
    try:
        return ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None


def is_trusted(peer: str | None, trusted: Sequence[Network]) -> bool:
    if not peer or not trusted:
        return False
    address = _parse_ip(peer)
    return address is not None and any(address in network for network in trusted)


class RequestInfo:
    """The request as the guard sees it; ``client_ip`` is worked out on first use."""

    def __init__(self, peer: str | None, scheme: str, host: str | None, trusted_peer: bool,
                 headers: Sequence[tuple[bytes, bytes]] = (),
                 trusted: Sequence[Network] = ()) -> None:
        self.peer = peer
        self.scheme = scheme
        self.host = host
        self.trusted_peer = trusted_peer
        self._headers = headers
        self._trusted = trusted

    @functools.cached_property
    def client_ip(self) -> str | None:
        if not self.trusted_peer:
            return self.peer
        return _forwarded_client(self._headers, self._trusted) or self.peer


def request_info(scope: Scope, trusted: Sequence[Network]) -> RequestInfo:
    client = scope.get("client")
    peer = client[0] if client else None
    trusted_peer = is_trusted(peer, trusted)
    headers = scope.get("headers", [])
    scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
    host = header_value(headers, b"host")
    if trusted_peer:
        proto = header_value(headers, b"x-forwarded-proto")
        if proto and proto.split(",")[0].strip().lower() in ("http", "https"):
            scheme = proto.split(",")[0].strip().lower()
        forwarded_host = header_value(headers, b"x-forwarded-host")
        if forwarded_host:
            host = forwarded_host.split(",")[0].strip()
    else:
        _warn_untrusted_forwarding(scope, headers, peer)
    return RequestInfo(peer, scheme, host, trusted_peer, headers, trusted)


def _warn_untrusted_forwarding(scope: Scope, headers: Sequence[tuple[bytes, bytes]],
                               peer: str | None) -> None:
    """Log each ignored forwarding header of an untrusted peer once per request, without its value."""
    names = [name for raw, name in _DECISION_HEADERS if header_value(headers, raw) is not None]
    if not names:
        return
    state = scope.setdefault("state", {})
    if state.get(_WARNED_STATE_KEY):
        return
    state[_WARNED_STATE_KEY] = True
    for name in names:
        logger.warning("untrusted_forwarded_header name=%s peer=%s", name, peer)


def _forwarded_client(headers: Sequence[tuple[bytes, bytes]], trusted: Sequence[Network]) -> str | None:
    """The right-most address in ``X-Forwarded-For`` that is not a trusted proxy."""
    chain = header_value(headers, b"x-forwarded-for")
    if chain:
        for item in reversed([part.strip() for part in chain.split(",")]):
            address = _parse_ip(item)
            if address is None:
                return None
            if not any(address in network for network in trusted):
                return str(address)
    real_ip = header_value(headers, b"x-real-ip")
    address = _parse_ip(real_ip) if real_ip else None
    return str(address) if address else None
