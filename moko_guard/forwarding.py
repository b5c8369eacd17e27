"""What the request really is: client address, scheme, host and URI.

``X-Forwarded-*``, ``X-Real-IP`` and ``X-Original-URI`` are read only when the
TCP peer is in ``server.trusted_proxies``. An empty list trusts nobody.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.types import Scope

from .headers import header_value

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None


def is_trusted(peer: str | None, trusted: Sequence[Network]) -> bool:
    if not peer or not trusted:
        return False
    address = _parse_ip(peer)
    return address is not None and any(address in network for network in trusted)


@dataclass(frozen=True)
class RequestInfo:
    peer: str | None
    client_ip: str | None
    scheme: str
    host: str | None
    trusted_peer: bool


def request_info(scope: Scope, trusted: Sequence[Network]) -> RequestInfo:
    client = scope.get("client")
    peer = client[0] if client else None
    trusted_peer = is_trusted(peer, trusted)
    headers = scope.get("headers", [])
    scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
    host = header_value(headers, b"host")
    client_ip = peer
    if trusted_peer:
        proto = header_value(headers, b"x-forwarded-proto")
        if proto and proto.split(",")[0].strip().lower() in ("http", "https"):
            scheme = proto.split(",")[0].strip().lower()
        forwarded_host = header_value(headers, b"x-forwarded-host")
        if forwarded_host:
            host = forwarded_host.split(",")[0].strip()
        client_ip = _forwarded_client(headers, trusted) or peer
    elif header_value(headers, b"x-forwarded-proto") or header_value(headers, b"x-forwarded-uri"):
        logger.debug("untrusted_forwarded_header peer=%s", peer)
    return RequestInfo(peer, client_ip, scheme, host, trusted_peer)


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
