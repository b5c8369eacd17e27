"""PooledTransport, the guard's httpx transport for provider calls, over real sockets on 127.0.0.1.

Every request goes through a real ``httpx.AsyncClient`` to scripted raw servers
(``support.raw_http``), which record the exact request bytes and every accepted
connection. Where the transport should behave like httpx's own transport, a test
runs the same script against ``httpx.AsyncHTTPTransport`` as well.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest
from support.loopback import free_port
from support.nginx import write_self_signed_certificate
from support.raw_http import HOST, Handler, Peer, RawServer, ServerFactory, closing_after, ok
from support.raw_http import serve  # noqa: F401 - the pytest fixture the tests name

from moko_guard import Guard, Settings
from moko_guard.errors import LoginError
from moko_guard.outbound import PooledTransport, default_ssl_context, provider_client
from moko_guard.providers.base import request_json

pytestmark = pytest.mark.anyio

# Per-request timeout in these tests, in seconds. Timing checks allow a wide margin
# above it, so a loaded machine does not fail them.
TIMEOUT = 0.3
MAX_WAIT = 1.5
SHORT = httpx.Timeout(TIMEOUT)

ClientFactory = Callable[..., httpx.AsyncClient]

# Environment variables that send httpx requests through a proxy or exempt hosts from it.
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
                   "http_proxy", "https_proxy", "all_proxy", "no_proxy")


def json_response(document: object, *, status: str = "200 OK") -> bytes:
    return ok(json.dumps(document).encode(), "Content-Type: application/json", status=status)


def answering(response: bytes) -> Handler:
    """Build a handler that sends ``response`` to every request on every connection."""

    async def handle(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.send(response)

    return handle


def stalling_after(data: bytes) -> Handler:
    """Build a handler that sends ``data`` for the first request and then nothing more."""

    async def handle(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(data)
        await peer.wait_closed_by_client()

    return handle


def head_lines(request: bytes) -> list[bytes]:
    """Return the request line and the header lines of a raw request."""
    head, _, _ = request.partition(b"\r\n\r\n")
    return head.split(b"\r\n")


def header_values(request: bytes, name: bytes) -> list[bytes]:
    """Return every value of header ``name`` (any case) in a raw request, in order."""
    values = []
    for line in head_lines(request)[1:]:
        field, _, value = line.partition(b":")
        if field.lower() == name:
            values.append(value.strip())
    return values


def body_of(request: bytes) -> bytes:
    return request.partition(b"\r\n\r\n")[2]


async def wait_for_event(event: asyncio.Event) -> None:
    async with asyncio.timeout(MAX_WAIT):
        await event.wait()


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """Create clients on a PooledTransport with short timeouts, and close them at the end.

    ``trust_env`` is off unless a test turns it on, so a proxy set in the environment
    of the test run never receives these requests.
    """
    clients: list[httpx.AsyncClient] = []

    def create(transport: httpx.AsyncBaseTransport | None = None,
               **options: Any) -> httpx.AsyncClient:
        options = {"timeout": SHORT, "trust_env": False, **options}
        client = httpx.AsyncClient(transport=transport or PooledTransport(), **options)
        clients.append(client)
        return client

    yield create
    for client in clients:
        await client.aclose()


def url_of(server: RawServer, path: str = "/", scheme: str = "http") -> str:
    return f"{scheme}://{HOST}:{server.port}{path}"


# --- request bytes ---------------------------------------------------------------------


async def test_get_request_bytes(serve: ServerFactory, make_client: ClientFactory) -> None:
    """The target keeps the encoding httpx gives it, and a GET has no framing header."""
    server = await serve(answering(ok(b"done")))
    client = make_client()

    await client.get(url_of(server, "/a%2Fb/c d?x=%41&y=1 2"))
    await client.get(url_of(server, "/cb"), params={"a": "b c", "r": "https://x/y?z=1&w=é"})

    first, second = server.requests
    assert head_lines(first)[0] == b"GET /a%2Fb/c%20d?x=%41&y=1%202 HTTP/1.1"
    assert head_lines(second)[0] == (
        b"GET /cb?a=b+c&r=https%3A%2F%2Fx%2Fy%3Fz%3D1%26w%3D%C3%A9 HTTP/1.1")
    for request in (first, second):
        assert header_values(request, b"host") == [f"{HOST}:{server.port}".encode()]
        assert header_values(request, b"content-length") == []
        assert header_values(request, b"transfer-encoding") == []
        assert body_of(request) == b""


async def test_client_headers_sent(serve: ServerFactory, make_client: ClientFactory) -> None:
    """Client and request headers reach the server once each, with their values unchanged."""
    server = await serve(answering(ok()))
    client = make_client(headers={"User-Agent": "moko-guard"})

    await client.get(url_of(server), headers={"Authorization": "Bearer a.b.c",
                                              "X-Trace": "one, two"})

    request = server.requests[0]
    assert header_values(request, b"user-agent") == [b"moko-guard"]
    assert header_values(request, b"authorization") == [b"Bearer a.b.c"]
    assert header_values(request, b"x-trace") == [b"one, two"]
    assert header_values(request, b"accept") == [b"*/*"]


async def test_form_post_request_bytes(serve: ServerFactory, make_client: ClientFactory) -> None:
    """A token request's form body is sent whole, with one exact Content-Length."""
    server = await serve(answering(json_response({"access_token": "t"})))
    client = make_client()
    form = {"grant_type": "authorization_code", "code": "a b/c+d",
            "redirect_uri": "https://crm.example.com/cb?x=1"}

    response = await client.post(url_of(server, "/token"), data=form)

    assert response.json() == {"access_token": "t"}
    request = server.requests[0]
    expected_body = (b"grant_type=authorization_code&code=a+b%2Fc%2Bd"
                     b"&redirect_uri=https%3A%2F%2Fcrm.example.com%2Fcb%3Fx%3D1")
    assert head_lines(request)[0] == b"POST /token HTTP/1.1"
    assert body_of(request) == expected_body
    assert header_values(request, b"content-length") == [str(len(expected_body)).encode()]
    assert header_values(request, b"transfer-encoding") == []
    assert header_values(request, b"content-type") == [b"application/x-www-form-urlencoded"]


async def test_json_post_request_bytes(serve: ServerFactory, make_client: ClientFactory) -> None:
    server = await serve(answering(ok()))
    client = make_client()

    await client.post(url_of(server, "/api"), json={"name": "Zoë", "ids": [1, 2]})

    request = server.requests[0]
    body = body_of(request)
    assert json.loads(body) == {"name": "Zoë", "ids": [1, 2]}
    assert header_values(request, b"content-length") == [str(len(body)).encode()]
    assert header_values(request, b"transfer-encoding") == []
    assert header_values(request, b"content-type") == [b"application/json"]


async def test_streamed_body_sent_with_length(serve: ServerFactory,
                                              make_client: ClientFactory) -> None:
    """httpx frames a generator body as chunked, and the transport sends it whole with a length."""

    async def pieces() -> AsyncIterator[bytes]:
        yield b"hello"
        yield b" "
        yield b"world"

    server = await serve(answering(ok()))
    client = make_client()

    await client.post(url_of(server), content=pieces())

    request = server.requests[0]
    assert header_values(request, b"transfer-encoding") == []
    assert header_values(request, b"content-length") == [b"11"]
    assert body_of(request) == b"hello world"


async def test_empty_post_has_zero_length(serve: ServerFactory,
                                          make_client: ClientFactory) -> None:
    server = await serve(answering(ok()))
    client = make_client()

    await client.post(url_of(server))
    await client.put(url_of(server))
    await client.delete(url_of(server))

    post, put, delete = server.requests
    assert header_values(post, b"content-length") == [b"0"]
    assert header_values(put, b"content-length") == [b"0"]
    assert header_values(delete, b"content-length") == []


# --- responses ----------------------------------------------------------------------------


async def test_response_status_headers_body(serve: ServerFactory,
                                            make_client: ClientFactory) -> None:
    document = {"keys": [{"kid": "k1", "kty": "RSA"}], "name": "Zoë"}
    body = json.dumps(document).encode()
    server = await serve(answering(ok(
        body, "Content-Type: application/json; charset=utf-8", "Set-Cookie: a=1",
        "Set-Cookie: b=2", "Cache-Control: max-age=60", status="201 Created")))
    client = make_client()

    response = await client.get(url_of(server, "/jwks"))

    assert response.status_code == 201
    assert response.http_version == "HTTP/1.1"
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert response.headers["cache-control"] == "max-age=60"
    assert response.headers["content-length"] == str(len(body))
    assert response.content == body
    assert response.json() == document


async def test_gzip_body_decoded(serve: ServerFactory, make_client: ClientFactory) -> None:
    document = {"issuer": "https://idp.example.com", "padding": "x" * 1000}
    compressed = gzip.compress(json.dumps(document).encode())
    server = await serve(answering(ok(compressed, "Content-Type: application/json",
                                      "Content-Encoding: gzip")))
    client = make_client()

    response = await client.get(url_of(server))

    assert header_values(server.requests[0], b"accept-encoding")[0].startswith(b"gzip")
    assert response.json() == document
    assert response.num_bytes_downloaded == len(compressed)


async def test_chunked_response_decoded(serve: ServerFactory,
                                        make_client: ClientFactory) -> None:
    """Chunk extensions and trailers are dropped, and the connection is kept."""
    server = await serve(answering(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\n{\"a\"\r\n3;ext=1\r\n: 1\r\n1\r\n}\r\n0\r\nX-Trailer: t\r\n\r\n"))
    client = make_client()

    first = await client.get(url_of(server))
    second = await client.get(url_of(server))

    assert first.json() == {"a": 1}
    assert second.json() == {"a": 1}
    assert len(server.peers) == 1


async def test_large_chunked_response_streamed(serve: ServerFactory,
                                               make_client: ClientFactory) -> None:
    """A body larger than one read arrives in several pieces, all of it."""
    payload = bytes(range(256)) * 1024
    server = await serve(answering(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n"))
    client = make_client()

    async with client.stream("GET", url_of(server)) as response:
        pieces = [piece async for piece in response.aiter_raw()]

    assert len(pieces) > 1
    assert b"".join(pieces) == payload


async def test_body_read_until_close(serve: ServerFactory, make_client: ClientFactory) -> None:
    """A response without length ends at the server's FIN, and its connection is not reused."""
    server = await serve(closing_after(b"HTTP/1.1 200 OK\r\n\r\nuntil the end"))
    client = make_client()

    first = await client.get(url_of(server))
    second = await client.get(url_of(server))

    assert first.content == b"until the end"
    assert second.content == b"until the end"
    assert len(server.peers) == 2


@pytest.mark.parametrize("method", ["HEAD", "GET"])
async def test_response_without_body(serve: ServerFactory, make_client: ClientFactory,
                                     method: str) -> None:
    """HEAD and 204 responses end after the head, so the connection is reused."""
    response_bytes = (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" if method == "HEAD"
                      else b"HTTP/1.1 204 No Content\r\n\r\n")
    server = await serve(answering(response_bytes))
    client = make_client()

    first = await client.request(method, url_of(server))
    second = await client.request(method, url_of(server))

    assert first.content == b""
    assert second.content == b""
    assert len(server.peers) == 1


# --- connections --------------------------------------------------------------------------


async def test_keep_alive_reuses_connection(serve: ServerFactory,
                                            make_client: ClientFactory) -> None:
    server = await serve(answering(json_response({"ok": True})))
    client = make_client()

    for _ in range(3):
        await client.get(url_of(server, "/userinfo"))
    await client.post(url_of(server, "/token"), data={"code": "c"})

    assert len(server.peers) == 1
    assert len(server.peers[0].requests) == 4


async def test_pool_per_origin(serve: ServerFactory, make_client: ClientFactory) -> None:
    """Two servers each get one connection, whatever the order of the requests."""
    first_server = await serve(answering(ok(b"first")))
    second_server = await serve(answering(ok(b"second")))
    client = make_client()

    bodies = []
    for server in (first_server, second_server, first_server, second_server):
        bodies.append((await client.get(url_of(server))).content)

    assert bodies == [b"first", b"second", b"first", b"second"]
    assert len(first_server.peers) == 1
    assert len(second_server.peers) == 1
    assert len(first_server.requests) == 2
    assert len(second_server.requests) == 2


async def test_connection_close_not_reused(serve: ServerFactory,
                                           make_client: ClientFactory) -> None:
    server = await serve(answering(ok(b"once", "Connection: close")))
    client = make_client()

    await client.get(url_of(server))
    await client.get(url_of(server))

    assert len(server.peers) == 2
    await wait_for_event(server.peers[0].closed_by_client)


async def test_idle_connection_closed_by_server(serve: ServerFactory,
                                                make_client: ClientFactory) -> None:
    """A POST after the server closed the idle connection goes out on a new connection."""
    server = await serve(closing_after(json_response({"ok": True})))
    client = make_client()

    await client.get(url_of(server))
    # Give the event loop time to see the server's FIN on the idle connection.
    await asyncio.sleep(0.05)
    response = await client.post(url_of(server, "/token"), data={"code": "c"})

    assert response.json() == {"ok": True}
    assert len(server.peers) == 2


async def test_cancelled_request_frees_connection(serve: ServerFactory,
                                                  make_client: ClientFactory) -> None:
    """Cancelling a request waiting for its response releases its slot in a one-connection pool."""

    async def ignore_first_connection(peer: Peer) -> None:
        if peer.number == 0:
            await peer.wait_closed_by_client()
            return
        await answering(ok(b"later"))(peer)

    server = await serve(ignore_first_connection)
    client = make_client(PooledTransport(max_connections=1))

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await client.get(url_of(server), timeout=httpx.Timeout(5.0))
    response = await client.get(url_of(server))

    assert response.content == b"later"
    await wait_for_event(server.peers[0].closed_by_client)


# --- timeouts and errors ------------------------------------------------------------------


async def test_no_answer_read_timeout(serve: ServerFactory, make_client: ClientFactory) -> None:
    server = await serve(stalling_after(b""))
    client = make_client()

    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await client.get(url_of(server), timeout=httpx.Timeout(TIMEOUT, connect=TIMEOUT))
    elapsed = time.monotonic() - started

    assert TIMEOUT * 0.9 <= elapsed < MAX_WAIT


async def test_request_timeout_per_request(serve: ServerFactory,
                                           make_client: ClientFactory) -> None:
    """Each request's own timeout applies: a short one fails, and None waits for the response."""

    async def answer_after_delay(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await asyncio.sleep(0.2)
            await peer.send(ok(b"late"))

    server = await serve(answer_after_delay)
    client = make_client(timeout=httpx.Timeout(5.0))

    with pytest.raises(httpx.ReadTimeout):
        await client.get(url_of(server), timeout=httpx.Timeout(0.05))
    response = await client.get(url_of(server), timeout=httpx.Timeout(None))

    assert response.content == b"late"


async def test_connect_refused(make_client: ClientFactory) -> None:
    client = make_client()

    with pytest.raises(httpx.ConnectError):
        await client.get(f"http://{HOST}:{free_port()}/")


@contextmanager
def listener_with_full_queue() -> Iterator[int]:
    """Yield the port of a listener whose accept queue is full, so a TCP handshake never ends."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((HOST, 0))
    listener.listen(0)
    # Linux queues backlog + 1 connections, so this one fills the queue.
    queued = socket.create_connection(listener.getsockname(), timeout=1)
    try:
        yield listener.getsockname()[1]
    finally:
        queued.close()
        listener.close()


async def test_full_accept_queue_connect_timeout(make_client: ClientFactory) -> None:
    client = make_client(timeout=httpx.Timeout(5.0))

    with listener_with_full_queue() as port:
        started = time.monotonic()
        with pytest.raises(httpx.ConnectTimeout):
            await client.get(f"http://{HOST}:{port}/",
                             timeout=httpx.Timeout(5.0, connect=TIMEOUT))
        elapsed = time.monotonic() - started

    assert TIMEOUT * 0.9 <= elapsed < MAX_WAIT


MALFORMED_RESPONSES = {
    "status line not HTTP": b"hello world\r\n\r\n",
    "status code not digits": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "header without colon": b"HTTP/1.1 200 OK\r\nBroken\r\nContent-Length: 0\r\n\r\n",
    "space in header name": b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
    "conflicting lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "length not a number": b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    "chunk size not hex": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "switching protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
}


@pytest.mark.parametrize("response_bytes", MALFORMED_RESPONSES.values(),
                         ids=MALFORMED_RESPONSES.keys())
async def test_malformed_response_protocol_error(serve: ServerFactory,
                                                 make_client: ClientFactory,
                                                 response_bytes: bytes) -> None:
    server = await serve(stalling_after(response_bytes))
    client = make_client()

    with pytest.raises(httpx.RemoteProtocolError):
        await client.get(url_of(server))
    await wait_for_event(server.peers[0].closed_by_client)


async def test_body_stall_while_streaming(serve: ServerFactory,
                                          make_client: ClientFactory) -> None:
    """A body that stops after its first chunk raises ReadTimeout from the body iterator."""
    server = await serve(stalling_after(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"))
    client = make_client()

    pieces: list[bytes] = []
    async with client.stream("GET", url_of(server)) as response:
        assert response.status_code == 200
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            async for piece in response.aiter_bytes():
                pieces.append(piece)
        elapsed = time.monotonic() - started

    assert pieces == [b"hello"]
    assert TIMEOUT * 0.9 <= elapsed < MAX_WAIT
    await wait_for_event(server.peers[0].closed_by_client)


@pytest.mark.parametrize("response_bytes", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 70_000,
], ids=["small body", "large body"])
async def test_body_stall_plain_get(serve: ServerFactory, make_client: ClientFactory,
                                    response_bytes: bytes) -> None:
    server = await serve(stalling_after(response_bytes))
    client = make_client()

    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await client.get(url_of(server))
    elapsed = time.monotonic() - started

    assert TIMEOUT * 0.9 <= elapsed < MAX_WAIT


async def test_busy_pool_pool_timeout(serve: ServerFactory, make_client: ClientFactory) -> None:
    """With every connection in use, the next request raises PoolTimeout after its timeout."""
    server = await serve(answering(ok(b"body")))
    client = make_client(PooledTransport(max_connections=1))

    async with client.stream("GET", url_of(server)):
        with pytest.raises(httpx.PoolTimeout):
            await client.get(url_of(server), timeout=SHORT)


async def test_pool_timeout_honoured(serve: ServerFactory, make_client: ClientFactory) -> None:
    """The wait for a free connection is bounded by httpx's pool timeout, not the read timeout."""
    server = await serve(answering(ok(b"body")))
    client = make_client(PooledTransport(max_connections=1))

    async with client.stream("GET", url_of(server)):
        started = time.monotonic()
        with pytest.raises(httpx.PoolTimeout):
            await client.get(url_of(server), timeout=httpx.Timeout(1.0, pool=0.1))
        elapsed = time.monotonic() - started

    assert elapsed < 0.6


async def test_write_stall_write_timeout(serve: ServerFactory,
                                         make_client: ClientFactory) -> None:
    """A server that stops reading the request body makes the send raise WriteTimeout.

    httpx's own transport raises WriteTimeout after the write timeout here.
    """

    async def never_read(peer: Peer) -> None:
        await peer.closed_by_client.wait()

    server = await serve(never_read, receive_buffer=4096)
    client = make_client()

    started = time.monotonic()
    with pytest.raises(httpx.TimeoutException) as caught:
        await client.post(url_of(server), content=b"x" * (8 << 20),
                          timeout=httpx.Timeout(1.0, write=0.2))
    elapsed = time.monotonic() - started

    assert isinstance(caught.value, httpx.WriteTimeout), type(caught.value).__name__
    assert elapsed < 0.8


# Scripts after which httpx's own transport raises RemoteProtocolError (httpx 0.29,
# httpcore 1.0 with h11), because the server closed before the response was complete.
EARLY_CLOSES = {
    "before the response": b"",
    "inside the head": b"HTTP/1.1 200 OK\r\nContent-Le",
    "inside a sized body": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    "inside a chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
}


@pytest.mark.parametrize("response_bytes", EARLY_CLOSES.values(), ids=EARLY_CLOSES.keys())
async def test_early_close_matches_httpx_transport(serve: ServerFactory,
                                                   make_client: ClientFactory,
                                                   response_bytes: bytes) -> None:
    """The transport raises the same exception type as httpx's own for a closed connection."""
    server = await serve(closing_after(response_bytes))
    native = make_client(httpx.AsyncHTTPTransport())
    pooled = make_client()

    with pytest.raises(httpx.TransportError) as native_error:
        await native.get(url_of(server))
    with pytest.raises(httpx.TransportError) as pooled_error:
        await pooled.get(url_of(server))

    assert type(native_error.value) is httpx.RemoteProtocolError
    assert type(pooled_error.value) is type(native_error.value)


def resetting_after(data: bytes) -> Handler:
    """Build a handler that sends ``data`` for the first request and then resets the connection."""

    async def handle(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(data)
        # Let the client receive the data before the RST, which would discard it.
        await asyncio.sleep(0.05)
        peer.reset()

    return handle


RESETS = {
    "before the response": b"",
    "inside a sized body": b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 70_000,
}


@pytest.mark.parametrize("response_bytes", RESETS.values(), ids=RESETS.keys())
async def test_reset_matches_httpx_transport(serve: ServerFactory, make_client: ClientFactory,
                                             response_bytes: bytes) -> None:
    """A TCP reset raises ReadError, as with httpx's own transport."""
    server = await serve(resetting_after(response_bytes))
    native = make_client(httpx.AsyncHTTPTransport())
    pooled = make_client()

    with pytest.raises(httpx.TransportError) as native_error:
        await native.get(url_of(server))
    with pytest.raises(httpx.TransportError) as pooled_error:
        await pooled.get(url_of(server))

    assert type(native_error.value) is httpx.ReadError
    assert type(pooled_error.value) is httpx.ReadError


async def test_unsupported_scheme(make_client: ClientFactory) -> None:
    transport = PooledTransport()
    client = make_client(transport)

    with pytest.raises(httpx.UnsupportedProtocol):
        await client.get(f"ftp://{HOST}/file")
    with pytest.raises(httpx.UnsupportedProtocol, match="'ws'"):
        await transport.handle_async_request(httpx.Request("GET", f"ws://{HOST}/socket"))


# --- request_json -------------------------------------------------------------------------


async def send_token_request(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    """Send a request as a provider sends its token request."""
    return await request_json(client, "POST", url, provider_id="idp", step="token",
                              timeout=httpx.Timeout(TIMEOUT, connect=TIMEOUT),
                              data={"grant_type": "authorization_code", "code": "c"})


async def test_request_json_returns_object(serve: ServerFactory,
                                           make_client: ClientFactory) -> None:
    server = await serve(answering(json_response({"access_token": "t", "expires_in": 60})))

    result = await send_token_request(make_client(), url_of(server, "/token"))

    assert result == {"access_token": "t", "expires_in": 60}


async def test_request_json_read_timeout(serve: ServerFactory,
                                         make_client: ClientFactory) -> None:
    server = await serve(stalling_after(b""))

    with pytest.raises(LoginError) as caught:
        await send_token_request(make_client(), url_of(server, "/token"))

    assert caught.value.reason == "provider_timeout"
    assert caught.value.detail == "idp token: timed out"
    assert caught.value.status == 504


async def test_request_json_connect_timeout(make_client: ClientFactory) -> None:
    with listener_with_full_queue() as port:
        with pytest.raises(LoginError) as caught:
            await send_token_request(make_client(), f"http://{HOST}:{port}/token")

    assert caught.value.reason == "provider_timeout"


async def test_request_json_refused(make_client: ClientFactory) -> None:
    with pytest.raises(LoginError) as caught:
        await send_token_request(make_client(), f"http://{HOST}:{free_port()}/token")

    assert caught.value.reason == "provider_unreachable"
    assert caught.value.detail == "idp token: ConnectError"
    assert caught.value.status == 502


async def test_request_json_malformed_response(serve: ServerFactory,
                                               make_client: ClientFactory) -> None:
    server = await serve(stalling_after(b"not http\r\n\r\n"))

    with pytest.raises(LoginError) as caught:
        await send_token_request(make_client(), url_of(server, "/token"))

    assert caught.value.reason == "provider_unreachable"
    assert caught.value.detail == "idp token: RemoteProtocolError"


async def test_request_json_invalid_grant(serve: ServerFactory,
                                          make_client: ClientFactory) -> None:
    server = await serve(answering(json_response(
        {"error": "invalid_grant", "error_description": "code expired"},
        status="400 Bad Request")))

    with pytest.raises(LoginError) as caught:
        await send_token_request(make_client(), url_of(server, "/token"))

    assert caught.value.reason == "provider_error"
    assert "HTTP 400" in caught.value.detail
    assert "error=invalid_grant" in caught.value.detail
    assert caught.value.status == 502


# --- streaming ----------------------------------------------------------------------------


async def test_stream_left_early_closes(serve: ServerFactory,
                                        make_client: ClientFactory) -> None:
    """Leaving a stream before its end closes the connection, so the next request opens one."""
    payload = b"x" * 200_000
    server = await serve(answering(ok(payload)))
    client = make_client()

    async with client.stream("GET", url_of(server)) as response:
        async for piece in response.aiter_raw():
            assert piece
            break
    await wait_for_event(server.peers[0].closed_by_client)
    after = await client.get(url_of(server))

    assert after.content == payload
    assert len(server.peers) == 2


async def test_stream_unread_closes(serve: ServerFactory, make_client: ClientFactory) -> None:
    """A stream closed without reading even a short body also closes its connection."""
    server = await serve(answering(ok(b"short")))
    client = make_client()

    async with client.stream("GET", url_of(server)):
        pass
    await wait_for_event(server.peers[0].closed_by_client)
    await client.get(url_of(server))

    assert len(server.peers) == 2


@pytest.mark.parametrize("response_bytes", [
    ok(b"x" * 200_000),
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
], ids=["sized body", "chunked body"])
async def test_stream_read_fully_reused(serve: ServerFactory, make_client: ClientFactory,
                                        response_bytes: bytes) -> None:
    server = await serve(answering(response_bytes))
    client = make_client()

    for _ in range(2):
        async with client.stream("GET", url_of(server)) as response:
            await response.aread()

    assert len(server.peers) == 1
    assert len(server.requests) == 2


# --- HTTPS --------------------------------------------------------------------------------


@pytest.fixture
async def tls_server(serve: ServerFactory, tmp_path: Path) -> tuple[RawServer, Path]:
    """Start a TLS server with a self-signed certificate, and return it and the certificate path."""
    certificate, key = write_self_signed_certificate(tmp_path, HOST)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    server = await serve(answering(json_response({"issuer": "https"})), ssl_context=context)
    return server, certificate


async def test_https_with_ssl_cert_file(tls_server: tuple[RawServer, Path],
                                        make_client: ClientFactory,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    server, certificate = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    client = make_client()

    first = await client.get(url_of(server, "/.well-known/openid-configuration", "https"))
    second = await client.get(url_of(server, "/jwks", "https"))

    assert first.json() == {"issuer": "https"}
    assert second.json() == {"issuer": "https"}
    assert len(server.peers) == 1
    assert [head_lines(request)[0] for request in server.requests] == [
        b"GET /.well-known/openid-configuration HTTP/1.1", b"GET /jwks HTTP/1.1"]


async def test_https_with_ssl_cert_dir(tls_server: tuple[RawServer, Path],
                                       make_client: ClientFactory, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command, which names the files of a CA directory, is missing")
    server, certificate = tls_server
    directory = tmp_path / "ca"
    directory.mkdir()
    shutil.copy(certificate, directory / "provider.pem")
    subprocess.run([openssl, "rehash", str(directory)], check=True, capture_output=True)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(directory))
    client = make_client()

    response = await client.get(url_of(server, "/", "https"))

    assert response.json() == {"issuer": "https"}


async def test_https_unknown_certificate(tls_server: tuple[RawServer, Path],
                                         make_client: ClientFactory,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without SSL_CERT_FILE the self-signed certificate is not trusted: ConnectError."""
    server, _ = tls_server
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    client = make_client()

    with pytest.raises(httpx.ConnectError):
        await client.get(url_of(server, "/", "https"))

    assert server.requests == []


async def test_https_explicit_context(tls_server: tuple[RawServer, Path],
                                      make_client: ClientFactory,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A context given to the transport is used, and the environment is not read."""
    server, certificate = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate.with_name("missing.pem")))
    client = make_client(PooledTransport(
        ssl_context=ssl.create_default_context(cafile=str(certificate))))

    response = await client.get(url_of(server, "/", "https"))

    assert response.json() == {"issuer": "https"}


def test_default_context_uses_certifi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    context = default_ssl_context()

    expected = ssl.create_default_context(cafile=certifi.where())
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert len(context.get_ca_certs()) == len(expected.get_ca_certs())
    assert context.get_ca_certs()


# --- proxies from the environment ---------------------------------------------------------


@pytest.fixture
def clean_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Remove every proxy variable, so a test sets exactly the ones it needs."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def test_env_http_proxy_used(serve: ServerFactory, make_client: ClientFactory,
                                   clean_proxy_environment: pytest.MonkeyPatch) -> None:
    """With HTTP_PROXY set, an http URL goes to the proxy in absolute form, not to its host."""
    proxy = await serve(answering(ok(b"from the proxy")))
    provider = await serve(answering(ok(b"from the provider")))
    clean_proxy_environment.setenv("HTTP_PROXY", f"http://{HOST}:{proxy.port}")

    async with provider_client() as client:
        response = await client.get(url_of(provider, "/userinfo?x=1"), timeout=SHORT)

    assert provider.peers == [], "the request went to the provider, bypassing HTTP_PROXY"
    assert [head_lines(request)[0] for request in proxy.requests] == [
        f"GET http://{HOST}:{provider.port}/userinfo?x=1 HTTP/1.1".encode()]
    assert response.content == b"from the proxy"


async def test_env_https_proxy_used(serve: ServerFactory, make_client: ClientFactory,
                                    clean_proxy_environment: pytest.MonkeyPatch) -> None:
    """With HTTPS_PROXY set, an https URL is tunnelled with CONNECT through the proxy.

    The proxy rejects the tunnel, so httpx raises ProxyError, and the provider,
    which would never finish a TLS handshake, must see no connection at all.
    """
    proxy = await serve(answering(ok(status="403 Forbidden")))
    provider = await serve(stalling_after(b""))
    clean_proxy_environment.setenv("HTTPS_PROXY", f"http://{HOST}:{proxy.port}")

    with pytest.raises(httpx.TransportError) as caught:
        async with provider_client() as client:
            await client.get(url_of(provider, "/token", "https"), timeout=SHORT)

    assert provider.peers == [], "the request went to the provider, bypassing HTTPS_PROXY"
    assert [head_lines(request)[0] for request in proxy.requests] == [
        f"CONNECT {HOST}:{provider.port} HTTP/1.1".encode()]
    assert isinstance(caught.value, httpx.ProxyError), type(caught.value).__name__


async def test_provider_client_pooled_without_proxy(
        clean_proxy_environment: pytest.MonkeyPatch) -> None:
    async with provider_client() as client:
        assert type(client._transport) is PooledTransport


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "https_proxy", "ALL_PROXY"])
async def test_provider_client_uses_httpx_transport_behind_proxy(
        clean_proxy_environment: pytest.MonkeyPatch, variable: str) -> None:
    clean_proxy_environment.setenv(variable, f"http://{HOST}:9")

    async with provider_client() as client:
        assert type(client._transport) is httpx.AsyncHTTPTransport


# --- closing ------------------------------------------------------------------------------


async def test_aclose_closes_idle_connections(serve: ServerFactory) -> None:
    first_server = await serve(answering(ok(b"one")))
    second_server = await serve(answering(ok(b"two")))
    transport = PooledTransport()
    client = httpx.AsyncClient(transport=transport, timeout=SHORT, trust_env=False)

    await client.get(url_of(first_server))
    await client.get(url_of(second_server))
    await client.aclose()

    await wait_for_event(first_server.peers[0].closed_by_client)
    await wait_for_event(second_server.peers[0].closed_by_client)


async def test_aclose_closes_connection_in_use(serve: ServerFactory) -> None:
    """A response still being read when the transport closes ends its connection when read."""
    payload = b"y" * 200_000
    server = await serve(answering(ok(payload)))
    transport = PooledTransport()
    client = httpx.AsyncClient(transport=transport, timeout=SHORT, trust_env=False)

    async with client.stream("GET", url_of(server)) as response:
        await transport.aclose()
        body = await response.aread()
    await wait_for_event(server.peers[0].closed_by_client)
    await client.aclose()

    assert body == payload


# --- the guard's default client -----------------------------------------------------------


async def test_guard_default_client_pooled(serve: ServerFactory,
                                           make_settings: Callable[..., Settings]) -> None:
    """A guard built without http_client sends its provider calls through PooledTransport."""
    server = await serve(answering(json_response({"ok": True})))
    guard = Guard(make_settings())
    try:
        assert type(guard.http._transport) is PooledTransport
        response = await guard.http.get(url_of(server, "/jwks"), timeout=SHORT)
    finally:
        await guard.http.aclose()

    assert response.json() == {"ok": True}
    request = server.requests[0]
    assert header_values(request, b"user-agent") == [b"moko-guard"]
    # httpx's own transport keeps the case of header names, and PooledTransport lowers them.
    assert head_lines(request)[1].startswith(b"host: ")


async def test_guard_keeps_given_client(make_settings: Callable[..., Settings]) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        guard = Guard(make_settings(), http_client=client)

        assert guard.http is client
