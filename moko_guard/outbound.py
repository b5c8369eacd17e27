"""The httpx transport for the guard's own calls to providers (tokens, userinfo, keys).

httpx's default transport keeps its connections in httpcore's pool, which on
every request checks each pooled connection, with one ``poll`` system call per
idle connection. During a burst of sign-ins that pool keeps many connections to
the same provider open, and the checks cost more CPU than the rest of the call.
:class:`PooledTransport` sends each request through a
:class:`~moko_guard.upstream.UpstreamPool` for its origin instead, whose
connections are taken and put back in constant time.

The transport honours httpx's per-request timeouts and maps the pool's errors
to httpx's exceptions, so the providers' error handling stays the same.

httpx reads proxies from the environment (``HTTP_PROXY``, ``HTTPS_PROXY``,
``ALL_PROXY``) only for a client built without its own transport. So
:func:`provider_client` uses httpx's default transport whenever one of them
is set, and a guard behind an outbound proxy reaches its providers as before.
"""

from __future__ import annotations

import os
import ssl
import urllib.request
from collections.abc import AsyncIterator

import certifi
import httpx

from .upstream import (
    UpstreamBusy,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamWriteTimeout,
)

# Connections to one provider origin: at most this many at once, and this many kept idle.
MAX_CONNECTIONS_PER_ORIGIN = 64
MAX_IDLE_PER_ORIGIN = 16
IDLE_EXPIRY = 30.0
# Dropped from the request: the body is always sent whole, with its length.
_REBUILT_HEADERS = frozenset({b"transfer-encoding", b"content-length"})


def default_ssl_context() -> ssl.SSLContext:
    """Return the context httpx would use: certifi's roots, or SSL_CERT_FILE / SSL_CERT_DIR."""
    cafile = os.environ.get("SSL_CERT_FILE")
    capath = os.environ.get("SSL_CERT_DIR")
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile or None, capath=capath or None)
    return ssl.create_default_context(cafile=certifi.where())


def _map_error(exc: UpstreamError, request: httpx.Request) -> httpx.TransportError:
    """Return the httpx exception that httpx's own transport raises for the same failure."""
    message = str(exc)
    if isinstance(exc, UpstreamBusy):
        return httpx.PoolTimeout(message, request=request)
    if isinstance(exc, UpstreamConnectTimeout):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(exc, UpstreamWriteTimeout):
        return httpx.WriteTimeout(message, request=request)
    if isinstance(exc, UpstreamTimeout):
        return httpx.ReadTimeout(message, request=request)
    if isinstance(exc, UpstreamConnectError):
        return httpx.ConnectError(message, request=request)
    if isinstance(exc, (UpstreamProtocolError, UpstreamClosed)):
        return httpx.RemoteProtocolError(message, request=request)
    return httpx.ReadError(message, request=request)


class _ResponseStream(httpx.AsyncByteStream):
    """A response body, read from its pooled connection as httpx consumes it."""

    def __init__(self, response: UpstreamResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        response = self._response
        while True:
            try:
                piece = await response.read()
            except UpstreamError as exc:
                raise _map_error(exc, self._request) from None
            if piece:
                yield piece
            if response.complete:
                return

    async def aclose(self) -> None:
        # A body not read to its end leaves bytes on the connection, so it is closed.
        self._response.abort()


class PooledTransport(httpx.AsyncBaseTransport):
    """Send HTTP/1.1 requests through one keep-alive pool per origin."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None,
                 max_connections: int = MAX_CONNECTIONS_PER_ORIGIN,
                 max_idle: int = MAX_IDLE_PER_ORIGIN) -> None:
        self._ssl_context = ssl_context
        self._max_connections = max_connections
        self._max_idle = max_idle
        self._pools: dict[tuple[str, str, int], UpstreamPool] = {}

    def _pool(self, url: httpx.URL) -> UpstreamPool:
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, url.host, port)
        pool = self._pools.get(key)
        if pool is None:
            if scheme == "https" and self._ssl_context is None:
                self._ssl_context = default_ssl_context()
            pool = UpstreamPool(scheme, url.host, port, connect_timeout=None, timeout=None,
                                max_connections=self._max_connections, max_idle=self._max_idle,
                                idle_expiry=IDLE_EXPIRY, ssl_context=self._ssl_context)
            self._pools[key] = pool
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pool = self._pool(request.url)
        timeouts = request.extensions.get("timeout", {})
        body = await request.aread()
        headers = [(name.lower(), value) for name, value in request.headers.raw
                   if name.lower() not in _REBUILT_HEADERS]
        if body or request.method in ("POST", "PUT", "PATCH"):
            headers.append((b"content-length", str(len(body)).encode("ascii")))
        try:
            response = await pool.request(
                request.method.encode("ascii"), request.url.raw_path, headers, body,
                timeout=timeouts.get("read"), connect_timeout=timeouts.get("connect"),
                write_timeout=timeouts.get("write"), pool_timeout=timeouts.get("pool"),
            )
        except UpstreamError as exc:
            raise _map_error(exc, request) from None
        return httpx.Response(response.status, headers=response.headers,
                              stream=_ResponseStream(response, request),
                              extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()


def environment_names_proxy() -> bool:
    """Return True when HTTP_PROXY, HTTPS_PROXY or ALL_PROXY (any case) names a proxy."""
    proxies = urllib.request.getproxies_environment()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


def provider_client() -> httpx.AsyncClient:
    """Build the guard's client for provider calls: pooled, or httpx's own behind a proxy."""
    transport = None if environment_names_proxy() else PooledTransport()
    return httpx.AsyncClient(follow_redirects=False, headers={"User-Agent": "moko-guard"},
                             transport=transport)
