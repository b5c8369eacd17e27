"""Streaming reverse proxy to the upstream CRM (``moko-guard serve --upstream URL``).

It sits inside :class:`GuardMiddleware`, so it only sees requests the guard
allowed, with client identity headers already replaced. Bodies stream in both
directions without being held in memory. Hop-by-hop headers (RFC 9110 section
7.6.1) and the guard's own cookies are removed before the upstream sees them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
from starlette.types import Receive, Scope, Send

from .guard import Guard
from .headers import header_value

logger = logging.getLogger(__name__)

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"proxy-connection",
})


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def strip_hop_by_hop(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    drop = HOP_BY_HOP | _connection_tokens(headers)
    return [(k, v) for k, v in headers if k.lower() not in drop]


class ProxyApp:
    def __init__(self, upstream: str, guard: Guard, *, timeout: float = 60.0,
                 connect_timeout: float = 5.0, preserve_host: bool = True) -> None:
        self.upstream = upstream.rstrip("/")
        self.upstream_host = urlsplit(upstream).netloc
        self.guard = guard
        self.preserve_host = preserve_host
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    def _request_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        info = self.guard.info(scope)
        headers = strip_hop_by_hop(list(scope.get("headers", [])))
        out: list[tuple[bytes, bytes]] = []
        for key, value in headers:
            if key in (b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"):
                continue
            else:
                out.append((key, value))
        host = header_value(scope.get("headers", []), b"host") or ""
        out.append((b"host", (host if self.preserve_host and host else self.upstream_host).encode()))
        prior = header_value(scope.get("headers", []), b"x-forwarded-for") if info.trusted_peer else None
        chain = f"{prior}, {info.peer}" if prior else (info.peer or "")
        out.append((b"x-forwarded-for", chain.encode("latin-1")))
        out.append((b"x-forwarded-proto", info.scheme.encode()))
        if info.host:
            out.append((b"x-forwarded-host", info.host.encode("latin-1")))
        return out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            # TODO: websocket proxying after the authorised handshake is not built yet.
            await send({"type": "websocket.close", "code": 1011, "reason": "not supported"})
            return

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return

        raw_path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        url = self.upstream + raw_path.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")
        method = scope["method"]
        has_body = method not in ("GET", "HEAD", "OPTIONS") or header_value(
            scope.get("headers", []), b"content-length") not in (None, "0")
        request = self.client.build_request(
            method, url, headers=self._request_headers(scope),
            content=body() if has_body else None,
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            await self._error(send, 504, b"The application did not answer in time.\n")
            return
        except httpx.HTTPError as exc:
            logger.error("upstream_unreachable error=%s", type(exc).__name__)
            await self._error(send, 502, b"The application is not reachable.\n")
            return
        try:
            headers = strip_hop_by_hop(list(response.headers.raw))
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": headers})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    @staticmethod
    async def _error(send: Send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
