"""Streaming reverse proxy to the upstream CRM (``moko-guard serve --upstream URL``).

:class:`ProxyApp` sits inside :class:`GuardMiddleware`, so it only receives
requests the guard allowed, with client identity headers and the guard's own
cookies already removed. Request and response bodies stream in both
directions in chunks of at most 64 KiB, so memory use does not grow with their
size. Hop-by-hop headers (RFC 9110 section 7.6.1), including those a
``Connection`` header names, are removed in both directions, and
``X-Forwarded-For``, ``-Proto`` and ``-Host`` are set by the guard.

The proxy talks to the upstream through its own keep-alive pool
(:mod:`moko_guard.upstream`), not httpx: httpx's cookie jar would keep an
upstream ``Set-Cookie`` and send it with other users' requests, and
``httpx.URL`` resolves ``..`` segments, so the upstream would get another path
than the one the guard checked. The pool sends the request target byte for
byte, and takes and returns a connection in constant time.

Websocket requests are proxied once the middleware has allowed the handshake:
the guard opens its own websocket to the upstream, then relays messages both
ways until either side closes.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from urllib.parse import urlsplit

import anyio
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
from .upstream import (RawHeaders, UpstreamBusy, UpstreamError, UpstreamPool, UpstreamResponse,
                       UpstreamTimeout)
from .web import message_page

logger = logging.getLogger(__name__)

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
# The same bound uvicorn puts on messages from the client (its ws_max_size default).
WEBSOCKET_MAX_MESSAGE = 16 * 1024 * 1024


class ClientDisconnected(Exception):
    """The client went away before it sent the whole request body."""


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]],
                     protected: Callable[[bytes], bool] = lambda _name: False) -> RawHeaders:
    """Remove hop-by-hop headers and those the ``Connection`` header names.

    A header for which ``protected`` returns True stays even when ``Connection``
    names it, so a client cannot use ``Connection`` to remove a header the
    guard added, such as the identity headers. Names come back in lower case.
    """
    kept: RawHeaders = []
    named: set[bytes] = set()
    for key, value in headers:
        name = key.lower()
        if name in HOP_BY_HOP:
            if name == b"connection":
                named.update(token.strip().lower() for token in value.split(b","))
            continue
        kept.append((name, value))
    if named:
        kept = [(name, value) for name, value in kept if name not in named or protected(name)]
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
        self._netloc_bytes = self.netloc.encode("latin-1")
        always = HOP_BY_HOP | FORWARDING_HEADERS | PATH_OVERRIDE_HEADERS | FRAMING_HEADERS
        self._dropped_trusted = always
        self._dropped_untrusted = always | UNTRUSTED_FORWARDING_HEADERS
        self.pool = UpstreamPool(
            self.scheme, self.host, self.port, connect_timeout=self.connect_timeout,
            timeout=self.timeout, max_connections=MAX_UPSTREAM_CONNECTIONS,
            max_idle=MAX_IDLE_UPSTREAM_CONNECTIONS, idle_expiry=IDLE_CONNECTION_EXPIRY,
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

    def upstream_headers(self, scope: Scope) -> RawHeaders:
        """Return the client's headers as the upstream gets them, with ``Host`` and forwarding.

        The framing headers (``Content-Length``, ``Transfer-Encoding``) are left
        out; :meth:`_request_body` adds the ones the body needs.
        """
        info = self.guard.info(scope)
        dropped = self._dropped_trusted if info.trusted_peer else self._dropped_untrusted
        kept: RawHeaders = []
        named: set[bytes] = set()
        client_host = prior_chain = None
        for key, value in scope.get("headers", []):
            name = key.lower()
            if name in dropped:
                if name == b"connection":
                    named.update(token.strip().lower() for token in value.split(b","))
                elif name == b"host" and client_host is None:
                    client_host = value
                elif name == b"x-forwarded-for" and prior_chain is None:
                    prior_chain = value
                continue
            kept.append((name, value))
        if named:
            is_identity = self.guard.identity_headers.is_identity_header
            kept = [(name, value) for name, value in kept
                    if name not in named or is_identity(name)]
        host = client_host if self.preserve_host and client_host else self._netloc_bytes
        peer = (info.peer or "").encode("latin-1")
        chain = prior_chain + b", " + peer if prior_chain and info.trusted_peer else peer
        kept.insert(0, (b"host", host))
        kept.append((b"x-forwarded-for", chain))
        kept.append((b"x-forwarded-proto", info.scheme.encode("latin-1")))
        if info.host:
            kept.append((b"x-forwarded-host", info.host.encode("latin-1")))
        return kept

    # --- http --------------------------------------------------------------------

    async def _proxy_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers, content, chunked, body_done = self._request_body(scope, receive)
        try:
            response = await self.pool.request(scope["method"].encode("latin-1"),
                                               self._target(scope), headers, content,
                                               chunked=chunked)
            try:
                first = await response.read()
            except BaseException:
                response.abort()
                raise
        except ClientDisconnected:
            logger.info("client_disconnected during request body path=%s", _log_path(scope))
            return
        except UpstreamBusy:
            logger.error("upstream_busy path=%s", _log_path(scope))
            await self._error_page(scope, receive, send, 503)
            return
        except UpstreamTimeout as exc:
            logger.error("upstream_timeout error=%s path=%s", _log_text(exc), _log_path(scope))
            await self._error_page(scope, receive, send, 504)
            return
        except UpstreamError as exc:
            logger.error("upstream_unreachable error=%s path=%s", _log_text(exc), _log_path(scope))
            await self._error_page(scope, receive, send, 502)
            return
        try:
            await self._relay_response(scope, response, first, receive, send, body_done)
        finally:
            response.abort()

    def _request_body(self, scope: Scope, receive: Receive,
                      ) -> tuple[RawHeaders, AsyncIterator[bytes] | bytes, bool, asyncio.Event | None]:
        """Return the upstream headers with the body's framing, the body, whether it is
        chunked, and an event set once the body has been read (None when there is none)."""
        headers = self.upstream_headers(scope)
        length: bytes | None = None
        chunked = False
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                length = value.strip() if length is None else length
            elif key == b"transfer-encoding":
                chunked = True
        if chunked or (length is not None and length != b"0"):
            body_done = asyncio.Event()
            headers.append((b"transfer-encoding", b"chunked") if chunked
                           else (b"content-length", length or b"0"))
            return headers, _stream_request_body(receive, body_done), chunked, body_done
        if scope["method"] in ("POST", "PUT", "PATCH") or length is not None:
            headers.append((b"content-length", b"0"))
        return headers, b"", False, None

    async def _relay_response(self, scope: Scope, response: UpstreamResponse, first: bytes,
                              receive: Receive, send: Send,
                              body_done: asyncio.Event | None) -> None:
        """Send the upstream's response; stream a longer body, and stop when the client goes away."""
        start = {"type": "http.response.start", "status": response.status,
                 "headers": strip_hop_by_hop(response.headers)}
        if response.complete:
            # The whole body came with the first read: no streaming, nothing to watch.
            await send(start)
            await send({"type": "http.response.body", "body": first, "more_body": False})
            return
        await send(start)
        async with anyio.create_task_group() as group:
            group.start_soon(_cancel_on_disconnect, receive, body_done, group.cancel_scope)
            try:
                chunk = first
                while not response.complete:
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                    chunk = await response.read()
            except UpstreamError as exc:
                # The status line is already sent, so the only signal left is to end the
                # response without its final chunk. The server then closes the connection.
                logger.error("upstream_body_failed error=%s path=%s", _log_text(exc),
                             _log_path(scope))
                group.cancel_scope.cancel()
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": False})
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


async def _stream_request_body(receive: Receive, done: asyncio.Event) -> AsyncIterator[bytes]:
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


async def _cancel_on_disconnect(receive: Receive, body_done: asyncio.Event | None,
                                scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` once the client disconnects (after its request body was read)."""
    if body_done is not None:
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


def _log_text(exc: Exception) -> str:
    """Return what went wrong with the upstream as one log field: the exception's text, escaped."""
    return escape_control(str(exc) or type(exc).__name__)[:200].replace(" ", "_")


def _log_path(scope: Scope) -> str:
    """The request path for a log line: no query string (it may carry tokens), escaped."""
    return escape_control(str(scope.get("path", ""))[:200])
