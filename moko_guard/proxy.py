"""Streaming reverse proxy to the upstream CRM (``moko-guard serve --upstream URL``).

:class:`ProxyApp` sits inside :class:`GuardMiddleware`, so it only receives
requests the guard allowed, with client identity headers and the guard's own
cookies already removed. Request and response bodies stream in both
directions in chunks of at most 64 KiB, so memory use does not grow with their
size. Hop-by-hop headers (RFC 9110 section 7.6.1), including those a
``Connection`` header names, are removed in both directions, and
``X-Forwarded-For``, ``-Proto`` and ``-Host`` are set by the guard.

The proxy talks to the upstream through httpcore, the transport layer under
httpx, because two httpx client features are wrong for a proxy: the client's
cookie jar keeps an upstream ``Set-Cookie`` and sends it with other users'
requests, and ``httpx.URL`` resolves ``..`` segments, so the upstream would get
another path than the one the guard checked. httpcore sends the request
target byte for byte.

Websocket requests are proxied once the middleware has allowed the handshake:
the guard opens its own websocket to the upstream, then relays messages both
ways until either side closes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from urllib.parse import urlsplit

import anyio
import httpcore
from starlette.types import Message, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.http11 import Request as HandshakeRequest
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI

from .audit import escape_control
from .guard import Guard
from .headers import header_value
from .inject import wrap_login_page
from .web import message_page

logger = logging.getLogger(__name__)

RawHeaders = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"proxy-connection",
})
# Set by the proxy itself from the client's connection.
FORWARDING_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# Other proxy headers an upstream may trust. They are passed on only from a trusted proxy.
UNTRUSTED_FORWARDING_HEADERS = frozenset({
    b"forwarded", b"x-real-ip", b"x-forwarded-port", b"x-forwarded-prefix",
    b"x-forwarded-server", b"x-forwarded-uri", b"x-original-uri", b"x-forwarded-ssl",
    b"x-forwarded-scheme", b"x-url-scheme", b"front-end-https",
})
# IIS, Symfony and Zend route by these instead of the request line, so a client
# could name a path the guard never checked. Dropped from every request.
PATH_OVERRIDE_HEADERS = frozenset({b"x-original-url", b"x-rewrite-url"})
# Body framing is rebuilt from the client's request, and the guard's server sends 100 Continue.
FRAMING_HEADERS = frozenset({b"content-length", b"expect", b"host"})
WEBSOCKET_HANDSHAKE_HEADERS = frozenset({
    b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
    b"sec-websocket-protocol", b"sec-websocket-accept",
})

# NOTE: a guessed bound on concurrent upstream connections. A request beyond it
# waits for a free connection up to upstream_timeout, then gets a 503.
MAX_UPSTREAM_CONNECTIONS = 256
MAX_IDLE_UPSTREAM_CONNECTIONS = 64
IDLE_CONNECTION_EXPIRY = 30.0
# The receive buffer of each upstream socket, which bounds how much of a response is read
# ahead. anyio pauses a socket only after its reading task wakes up, and uvloop delivers up
# to 32 reads of 256 KiB before that, so without this bound 8 MiB per download can queue up.
UPSTREAM_RECEIVE_BUFFER = 128 * 1024
# The same bound uvicorn puts on messages from the client (its ws_max_size default).
WEBSOCKET_MAX_MESSAGE = 16 * 1024 * 1024


class ClientDisconnected(Exception):
    """The client went away before it sent the whole request body."""


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    return tokens


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]],
                     protected: Callable[[bytes], bool] = lambda _name: False) -> RawHeaders:
    """Remove hop-by-hop headers and those the ``Connection`` header names.

    A header for which ``protected`` returns True stays even when ``Connection``
    names it, so a client cannot use ``Connection`` to remove a header the
    guard added, such as the identity headers.
    """
    headers = list(headers)
    named = _connection_tokens(headers)
    kept: RawHeaders = []
    for key, value in headers:
        name = key.lower()
        if name in HOP_BY_HOP or (name in named and not protected(name)):
            continue
        kept.append((name, value))
    return kept


class ProxyApp:
    """Forward each allowed request to the upstream and stream the response back."""

    def __init__(self, upstream: str, guard: Guard, *, timeout: float | None = None,
                 connect_timeout: float | None = None,
                 preserve_host: bool | None = None) -> None:
        server = guard.settings.server
        parts = urlsplit(upstream)
        self.guard = guard
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.netloc = parts.netloc
        self.base_path = parts.path.rstrip("/")
        self.timeout = server.upstream_timeout if timeout is None else timeout
        self.connect_timeout = (server.upstream_connect_timeout if connect_timeout is None
                                else connect_timeout)
        self.preserve_host = server.preserve_host if preserve_host is None else preserve_host
        self.pool = httpcore.AsyncConnectionPool(
            max_connections=MAX_UPSTREAM_CONNECTIONS,
            max_keepalive_connections=MAX_IDLE_UPSTREAM_CONNECTIONS,
            keepalive_expiry=IDLE_CONNECTION_EXPIRY,
            socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, UPSTREAM_RECEIVE_BUFFER)],
        )
        self._closed = False
        guard.on_shutdown.append(self.aclose)

    async def aclose(self) -> None:
        """Close the upstream connections; called once when the guard shuts down."""
        if self._closed:
            return
        self._closed = True
        await self.pool.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await self._proxy_websocket(scope, receive, send)
        elif scope["type"] == "http":
            scope, send = wrap_login_page(self.guard, scope, send)
            await self._proxy_http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- request headers -------------------------------------------------------

    def _target(self, scope: Scope) -> bytes:
        """Build the request target for the upstream: its base path, then the client's raw path."""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        query: bytes = scope.get("query_string", b"")
        target = self.base_path.encode("latin-1") + raw_path
        return target + b"?" + query if query else target

    def _host_header(self, scope: Scope) -> bytes:
        client_host = header_value(scope.get("headers", []), b"host")
        if self.preserve_host and client_host:
            return client_host.encode("latin-1")
        return self.netloc.encode("latin-1")

    def _forwarding_headers(self, scope: Scope) -> RawHeaders:
        info = self.guard.info(scope)
        prior = header_value(scope.get("headers", []), b"x-forwarded-for")
        chain = f"{prior}, {info.peer}" if prior and info.trusted_peer else (info.peer or "")
        headers = [(b"x-forwarded-for", chain.encode("latin-1")),
                   (b"x-forwarded-proto", info.scheme.encode("latin-1"))]
        if info.host:
            headers.append((b"x-forwarded-host", info.host.encode("latin-1")))
        return headers

    def upstream_headers(self, scope: Scope) -> RawHeaders:
        """Return the client's headers as the upstream gets them, with ``Host`` and forwarding."""
        trusted = self.guard.info(scope).trusted_peer
        dropped = FORWARDING_HEADERS | PATH_OVERRIDE_HEADERS | FRAMING_HEADERS
        if not trusted:
            dropped |= UNTRUSTED_FORWARDING_HEADERS
        kept = strip_hop_by_hop(scope.get("headers", []),
                                self.guard.identity_headers.is_identity_header)
        headers = [(key, value) for key, value in kept if key not in dropped]
        return [(b"host", self._host_header(scope)), *headers, *self._forwarding_headers(scope)]

    # --- http --------------------------------------------------------------------

    def _timeouts(self) -> dict[str, float]:
        return {"connect": self.connect_timeout, "read": self.timeout,
                "write": self.timeout, "pool": self.timeout}

    async def _proxy_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        body_done = anyio.Event()
        headers, content = self._request_body(scope, receive, body_done)
        request = httpcore.Request(
            scope["method"],
            httpcore.URL(scheme=self.scheme, host=self.host, port=self.port,
                         target=self._target(scope)),
            headers=headers, content=content, extensions={"timeout": self._timeouts()},
        )
        try:
            response = await self.pool.handle_async_request(request)
        except ClientDisconnected:
            logger.info("client_disconnected during request body path=%s", _log_path(scope))
            return
        except httpcore.PoolTimeout:
            logger.error("upstream_busy path=%s", _log_path(scope))
            await self._error_page(scope, receive, send, 503)
            return
        except httpcore.TimeoutException as exc:
            logger.error("upstream_timeout error=%s path=%s", type(exc).__name__, _log_path(scope))
            await self._error_page(scope, receive, send, 504)
            return
        except (httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
            logger.error("upstream_unreachable error=%s path=%s", type(exc).__name__,
                         _log_path(scope))
            await self._error_page(scope, receive, send, 502)
            return
        try:
            await self._relay_response(scope, response, receive, send, body_done)
        finally:
            await response.aclose()

    def _request_body(self, scope: Scope, receive: Receive, body_done: anyio.Event,
                      ) -> tuple[RawHeaders, AsyncIterator[bytes] | bytes]:
        """Return the upstream headers with the body's framing, and the body itself."""
        headers = self.upstream_headers(scope)
        raw = scope.get("headers", [])
        length = header_value(raw, b"content-length")
        chunked = header_value(raw, b"transfer-encoding") is not None
        if chunked:
            headers.append((b"transfer-encoding", b"chunked"))
            return headers, _stream_request_body(receive, body_done)
        if length is not None and length.strip() != "0":
            headers.append((b"content-length", length.strip().encode("latin-1")))
            return headers, _stream_request_body(receive, body_done)
        if scope["method"] in ("POST", "PUT", "PATCH") or length is not None:
            headers.append((b"content-length", b"0"))
        body_done.set()
        return headers, b""

    async def _relay_response(self, scope: Scope, response: httpcore.Response,
                              receive: Receive, send: Send, body_done: anyio.Event) -> None:
        """Stream the upstream's response, and stop reading it when the client goes away."""
        headers = strip_hop_by_hop(response.headers)
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        async with anyio.create_task_group() as group:
            group.start_soon(_cancel_on_disconnect, receive, body_done, group.cancel_scope)
            try:
                async for chunk in response.aiter_stream():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (httpcore.TimeoutException, httpcore.NetworkError,
                    httpcore.ProtocolError) as exc:
                # The status line is already sent, so the only signal left is to end the
                # response without its final chunk. The server then closes the connection.
                logger.error("upstream_body_failed error=%s path=%s", type(exc).__name__,
                             _log_path(scope))
                group.cancel_scope.cancel()
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            group.cancel_scope.cancel()

    async def _error_page(self, scope: Scope, receive: Receive, send: Send, status: int) -> None:
        title, message = ERROR_PAGES[status]
        page = message_page(title, message, status=status,
                            request_id=self.guard.request_id(scope),
                            headers={"Retry-After": "5"} if status == 503 else None)
        await page(scope, receive, send)

    # --- websocket ---------------------------------------------------------------

    async def _proxy_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        try:
            upstream = await self._open_websocket(scope)
        except InvalidStatus as exc:
            status = exc.response.status_code
            logger.warning("upstream_websocket_refused status=%d path=%s", status, _log_path(scope))
            await _refuse_websocket(scope, send, status)
            return
        except TimeoutError:
            logger.error("upstream_timeout error=websocket_handshake path=%s", _log_path(scope))
            await _refuse_websocket(scope, send, 504)
            return
        except (OSError, InvalidHandshake) as exc:
            logger.error("upstream_unreachable error=%s path=%s", type(exc).__name__,
                         _log_path(scope))
            await _refuse_websocket(scope, send, 502)
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_client_to_upstream, receive, upstream, group.cancel_scope)
                group.start_soon(_upstream_to_client, upstream, send, group.cancel_scope)
        finally:
            await upstream.close()

    async def _open_websocket(self, scope: Scope) -> ClientConnection:
        """Open the upstream websocket: TCP within the connect timeout, then the handshake."""
        raw_target = self._target(scope).decode("latin-1")
        path, _, query = raw_target.partition("?")
        uri = WebSocketURI(self.scheme == "https", self.host, self.port, path, query)
        subprotocols = [Subprotocol(name) for name in scope.get("subprotocols", [])]
        protocol = _UpstreamHandshake(uri, self._host_header(scope).decode("latin-1"),
                                      subprotocols=subprotocols or None,
                                      max_size=WEBSOCKET_MAX_MESSAGE)
        headers = [(key.decode("latin-1"), value.decode("latin-1"))
                   for key, value in self.upstream_headers(scope)
                   if key != b"host" and key not in WEBSOCKET_HANDSHAKE_HEADERS]
        loop = asyncio.get_running_loop()
        tls = ssl.create_default_context() if uri.secure else None
        async with asyncio.timeout(self.connect_timeout):
            _, connection = await loop.create_connection(
                lambda: ClientConnection(protocol), self.host, self.port, ssl=tls)
        try:
            async with asyncio.timeout(self.timeout):
                await connection.handshake(headers, user_agent_header=None)
        except BaseException:
            connection.transport.abort()
            raise
        connection.start_keepalive()
        return connection


ERROR_PAGES = {
    502: ("Application not reachable",
          ("The application behind the sign-in service cannot be reached right now. "
           "Please try again in a moment.")),
    503: ("Service busy",
          "The sign-in service is handling too many requests. Please try again in a moment."),
    504: ("Application did not respond",
          ("The application behind the sign-in service did not respond in time. "
           "Please try again in a moment.")),
}


class _UpstreamHandshake(ClientProtocol):
    """The client side of the upstream handshake, sending the ``Host`` the proxy chose."""

    def __init__(self, uri: WebSocketURI, host: str, *, subprotocols: list[Subprotocol] | None,
                 max_size: int) -> None:
        super().__init__(uri, subprotocols=subprotocols, max_size=max_size)
        self.host_header = host

    def connect(self) -> HandshakeRequest:
        request = super().connect()
        del request.headers["Host"]
        request.headers["Host"] = self.host_header
        return request


async def _stream_request_body(receive: Receive, done: anyio.Event) -> AsyncIterator[bytes]:
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return
    finally:
        done.set()


async def _cancel_on_disconnect(receive: Receive, body_done: anyio.Event,
                                scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` once the client disconnects (after its request body was read)."""
    await body_done.wait()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


def _close_code(code: int | None) -> int:
    """A close code that may be sent in a close frame (RFC 6455 section 7.4.1)."""
    if code is None or code == 1005:
        return 1000
    if code in (1006, 1015) or not (1000 <= code <= 4999):
        return 1011
    return code


async def _client_to_upstream(receive: Receive, upstream: ClientConnection,
                              scope: anyio.CancelScope) -> None:
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(code=_close_code(message.get("code")),
                                     reason=message.get("reason") or "")
                scope.cancel()
                return
            if message.get("text") is not None:
                await upstream.send(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send(message["bytes"])
    except ConnectionClosed:
        # The upstream side ended; _upstream_to_client closes the client's socket.
        return


async def _upstream_to_client(upstream: ClientConnection, send: Send,
                              scope: anyio.CancelScope) -> None:
    try:
        async for data in upstream:
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
            else:
                await send({"type": "websocket.send", "bytes": data})
    except ConnectionClosed:
        pass
    close: Message = {"type": "websocket.close", "code": _close_code(upstream.close_code),
                      "reason": upstream.close_reason or ""}
    try:
        await send(close)
    except OSError:
        # The client is gone as well.
        pass
    scope.cancel()


async def _refuse_websocket(scope: Scope, send: Send, status: int) -> None:
    """Answer a websocket handshake with an HTTP status when the server supports it."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1011})
        return
    if status in ERROR_PAGES:
        text = ERROR_PAGES[status][1]
    else:
        text = f"The application refused the websocket handshake with status {status}."
    body = (text + "\n").encode()
    await send({"type": "websocket.http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "websocket.http.response.body", "body": body})


def _log_path(scope: Scope) -> str:
    """The request path for a log line: no query string (it may carry tokens), escaped."""
    return escape_control(str(scope.get("path", ""))[:200])
