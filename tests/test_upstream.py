"""The proxy's HTTP/1.1 keep-alive client against scripted raw servers on 127.0.0.1.

Each server sends exact bytes, so a test controls response framing, and records
the raw bytes of every request and every connection it accepted.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from support.loopback import free_port
from support.nginx import write_self_signed_certificate
from support.raw_http import HOST, Handler, Peer, ServerFactory, closing_after, ok, replying
from support.raw_http import serve  # noqa: F401 - the pytest fixture the tests name

from moko_guard.upstream import (
    CHUNK_SIZE,
    MAX_HEAD_SIZE,
    RECEIVE_BUFFER,
    UpstreamBusy,
    UpstreamClosed,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)

pytestmark = pytest.mark.anyio

# The pool's timeouts in these tests, in seconds. Timing checks allow a wide margin
# above it, so a loaded machine does not fail them.
TIMEOUT = 0.3
MAX_WAIT = 1.5
HEAD = [(b"Host", b"upstream.test")]

PoolFactory = Callable[..., UpstreamPool]


class RecordingPool(UpstreamPool):
    """A pool that keeps every response it returned, so a failed test can still abort them."""

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.responses: list[UpstreamResponse] = []

    async def request(self, *args: Any, **options: Any) -> UpstreamResponse:
        response = await super().request(*args, **options)
        self.responses.append(response)
        return response


@pytest.fixture
async def make_pool() -> AsyncIterator[PoolFactory]:
    """Create pools to a port on 127.0.0.1 with short timeouts, and close them at the end."""
    pools: list[RecordingPool] = []

    def create(port: int, scheme: str = "http", **options: Any) -> UpstreamPool:
        options = {"connect_timeout": TIMEOUT, "timeout": TIMEOUT, **options}
        pool = RecordingPool(scheme, HOST, port, **options)
        pools.append(pool)
        return pool

    yield create
    for pool in pools:
        # A test that failed before reading a body leaves its connection in use.
        for response in pool.responses:
            response.abort()
        await pool.aclose()


async def get(pool: UpstreamPool, target: bytes = b"/") -> UpstreamResponse:
    return await pool.request(b"GET", target, HEAD)


async def read_pieces(response: UpstreamResponse) -> list[bytes]:
    """Read the body to its end and return the pieces as :meth:`read` returned them."""
    pieces: list[bytes] = []
    while True:
        piece = await response.read()
        if not piece:
            return pieces
        pieces.append(piece)


async def read_all(response: UpstreamResponse) -> bytes:
    return b"".join(await read_pieces(response))


async def wait_for_event(event: asyncio.Event) -> None:
    async with asyncio.timeout(MAX_WAIT):
        await event.wait()


# --- request bytes ---------------------------------------------------------------------


async def test_request_head_sent_byte_for_byte(serve: ServerFactory,
                                               make_pool: PoolFactory) -> None:
    """The target keeps ``..`` and ``%2e%2e`` as sent, and headers keep their order and case."""
    server = await serve(replying(ok()))
    pool = make_pool(server.port)
    headers = [(b"Host", b"upstream.test"), (b"X-B", b"2"), (b"x-a", b"1"),
               (b"X-B", b"3 ; q=\"x\"")]

    response = await pool.request(b"GET", b"/a/../b/%2e%2e/c?x=%2F&y=..", headers)
    await read_all(response)

    assert server.requests == [
        b"GET /a/../b/%2e%2e/c?x=%2F&y=.. HTTP/1.1\r\n"
        b"Host: upstream.test\r\nX-B: 2\r\nx-a: 1\r\nX-B: 3 ; q=\"x\"\r\n\r\n"
    ]


async def test_request_body_bytes_follow_head(serve: ServerFactory,
                                              make_pool: PoolFactory) -> None:
    server = await serve(replying(ok()))
    pool = make_pool(server.port)
    body = b"line\r\n\x00\xff binary"

    response = await pool.request(b"POST", b"/upload", [
        (b"Host", b"upstream.test"), (b"Content-Length", str(len(body)).encode())], body)
    await read_all(response)

    assert server.requests == [
        b"POST /upload HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 15\r\n\r\n" + body
    ]


async def pieces_of(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def test_streamed_body_with_content_length(serve: ServerFactory,
                                                 make_pool: PoolFactory) -> None:
    server = await serve(replying(ok()))
    pool = make_pool(server.port)

    response = await pool.request(
        b"PUT", b"/file", [(b"Host", b"upstream.test"), (b"Content-Length", b"11")],
        pieces_of(b"hello", b" ", b"world"))
    await read_all(response)

    assert server.requests == [
        b"PUT /file HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 11\r\n\r\nhello world"
    ]


async def test_streamed_body_in_chunked_coding(serve: ServerFactory,
                                               make_pool: PoolFactory) -> None:
    """Each piece becomes one chunk with a hexadecimal size, and a 0 chunk ends the body."""
    server = await serve(replying(ok()))
    pool = make_pool(server.port)
    large = b"x" * 70_000

    response = await pool.request(
        b"POST", b"/upload", [(b"Host", b"upstream.test"), (b"Transfer-Encoding", b"chunked")],
        pieces_of(b"hello", large), chunked=True)
    await read_all(response)

    assert server.requests == [
        b"POST /upload HTTP/1.1\r\nHost: upstream.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n" + b"11170\r\n" + large + b"\r\n" + b"0\r\n\r\n"
    ]


async def test_chunked_body_skips_empty_piece(serve: ServerFactory,
                                              make_pool: PoolFactory) -> None:
    """An empty piece sends no chunk, because ``0`` would end the body early.

    The pieces after it would then reach the upstream as a request of their own.
    """
    server = await serve(replying(ok()))
    pool = make_pool(server.port)

    response = await pool.request(
        b"POST", b"/upload", [(b"Host", b"upstream.test"), (b"Transfer-Encoding", b"chunked")],
        pieces_of(b"abc", b"", b"def"), chunked=True)
    await read_all(response)

    assert server.requests[0].endswith(b"\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")


# --- response framing ----------------------------------------------------------------


async def test_small_body_read_at_once(serve: ServerFactory, make_pool: PoolFactory) -> None:
    """A body of up to 64 KiB comes whole with the first read, and header order stays."""
    body = b"b" * CHUNK_SIZE
    server = await serve(replying(ok(body, "X-Multi: a", "Set-Cookie:  id=1 \t", "x-multi:b")))
    pool = make_pool(server.port)

    response = await get(pool)
    complete_before_read = response.complete
    first = await response.read()
    complete_after_read = response.complete

    assert response.status == 200
    assert response.headers == [(b"x-multi", b"a"), (b"set-cookie", b"id=1"),
                                (b"x-multi", b"b"), (b"content-length", b"65536")]
    assert complete_before_read is False
    assert first == body
    assert complete_after_read is True
    assert await response.read() == b""
    assert await response.read() == b""
    assert pool.idle_connections == 1


async def test_large_body_streamed_in_pieces(serve: ServerFactory,
                                             make_pool: PoolFactory) -> None:
    body = bytes(range(256)) * 800
    server = await serve(replying(ok(body)))
    pool = make_pool(server.port)

    response = await get(pool)
    pieces = await read_pieces(response)

    assert b"".join(pieces) == body
    assert len(pieces) >= 4
    assert max(len(piece) for piece in pieces) <= CHUNK_SIZE
    assert response.complete
    assert pool.idle_connections == 1


async def test_zero_content_length_body(serve: ServerFactory, make_pool: PoolFactory) -> None:
    server = await serve(replying(ok(b""), ok(b"next")))
    pool = make_pool(server.port)

    first = await get(pool)
    complete = first.complete
    first_body = await first.read()
    second_body = await read_all(await get(pool))

    assert complete is True
    assert first_body == b""
    assert second_body == b"next"
    assert len(server.peers) == 1


async def test_head_arriving_in_pieces(serve: ServerFactory, make_pool: PoolFactory) -> None:
    async def handle(peer: Peer) -> None:
        await peer.read_request()
        for part in (b"HTTP/1.1 200 OK\r\nX-A: ", b"1\r\nContent-Len", b"gth: 2\r\n\r", b"\nok"):
            await peer.send(part)
            await asyncio.sleep(0.01)
        await peer.wait_closed_by_client()

    server = await serve(handle)
    pool = make_pool(server.port)

    response = await get(pool)

    assert response.headers == [(b"x-a", b"1"), (b"content-length", b"2")]
    assert await read_all(response) == b"ok"


CHUNKED_BODY = (b"5;name=value\r\nhello\r\n"
                b"6 ; a=1;b=\"x y\"\r\n world\r\n"
                b"A\r\n0123456789\r\n"
                b"0;last\r\nX-Trailer: t\r\nX-Checksum: abc\r\n\r\n")


@pytest.mark.parametrize("codings", [
    pytest.param(["chunked"], id="chunked"),
    pytest.param(["Chunked"], id="upper_case"),
    pytest.param(["gzip, chunked"], id="gzip_then_chunked"),
    pytest.param(["gzip", "chunked"], id="two_header_lines"),
])
async def test_chunked_response_decoded(serve: ServerFactory, make_pool: PoolFactory,
                                        codings: list[str]) -> None:
    """Chunk extensions are ignored, trailers are dropped, and the connection is reused."""
    head = "HTTP/1.1 200 OK\r\n" + "".join(f"Transfer-Encoding: {c}\r\n" for c in codings)
    server = await serve(replying(head.encode() + b"\r\n" + CHUNKED_BODY, ok(b"next")))
    pool = make_pool(server.port)

    response = await get(pool)
    body = await read_all(response)
    following = await read_all(await get(pool))

    assert body == b"hello world0123456789"
    assert [name for name, _ in response.headers] == [b"transfer-encoding"] * len(codings)
    assert response.complete
    assert following == b"next"
    assert len(server.peers) == 1


async def test_long_chunk_split_into_pieces(serve: ServerFactory,
                                            make_pool: PoolFactory) -> None:
    data = b"c" * 150_000
    response_bytes = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n")
    server = await serve(replying(response_bytes))
    pool = make_pool(server.port)

    pieces = await read_pieces(await get(pool))

    assert b"".join(pieces) == data
    assert max(len(piece) for piece in pieces) <= CHUNK_SIZE
    assert pool.idle_connections == 1


@pytest.mark.parametrize("head", [
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n", id="no_length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", id="not_chunked"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                 id="chunked_not_last"),
])
async def test_body_read_until_close(serve: ServerFactory, make_pool: PoolFactory,
                                     head: bytes) -> None:
    """Without a length, the body ends when the upstream closes, and the connection is gone."""
    body = b"5\r\nraw bytes, not decoded\r\n" * 5000

    async def handle(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(head + body)
        peer.close()

    server = await serve(handle)
    pool = make_pool(server.port)

    pieces = await read_pieces(await get(pool))

    assert b"".join(pieces) == body
    assert max(len(piece) for piece in pieces) <= CHUNK_SIZE
    assert pool.open_connections == 0


@pytest.mark.parametrize(("method", "status"), [
    pytest.param(b"HEAD", "200 OK", id="head"),
    pytest.param(b"GET", "204 No Content", id="204"),
    pytest.param(b"GET", "304 Not Modified", id="304"),
])
async def test_response_without_body(serve: ServerFactory, make_pool: PoolFactory,
                                     method: bytes, status: str) -> None:
    """The announced length is not read, so the next response on the connection parses."""
    no_body = f"HTTP/1.1 {status}\r\nContent-Length: 1000\r\nETag: \"v1\"\r\n\r\n".encode()
    server = await serve(replying(no_body, ok(b"next")))
    pool = make_pool(server.port)

    response = await pool.request(method, b"/", HEAD)
    complete = response.complete
    body = await response.read()
    following = await read_all(await get(pool))

    assert response.status == int(status[:3])
    assert complete is True
    assert body == b""
    assert following == b"next"
    assert len(server.peers) == 1


async def test_interim_responses_skipped(serve: ServerFactory, make_pool: PoolFactory) -> None:
    server = await serve(replying(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n"
        + ok(b"final", "X-Final: 1"),
        ok(b"next")))
    pool = make_pool(server.port)

    response = await get(pool)
    body = await read_all(response)
    following = await read_all(await get(pool))

    assert response.status == 200
    assert response.headers == [(b"x-final", b"1"), (b"content-length", b"5")]
    assert body == b"final"
    assert following == b"next"
    assert len(server.peers) == 1


async def test_switching_protocols_rejected(serve: ServerFactory,
                                            make_pool: PoolFactory) -> None:
    server = await serve(replying(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"))
    pool = make_pool(server.port)

    with pytest.raises(UpstreamProtocolError, match="101"):
        await get(pool)

    assert pool.open_connections == 0
    await wait_for_event(server.peers[0].closed_by_client)


@pytest.mark.parametrize("lengths", [
    pytest.param(["5", "5"], id="repeated_header"),
    pytest.param(["5, 5"], id="repeated_in_list"),
    pytest.param([" 5 "], id="surrounding_space"),
])
async def test_equal_content_lengths_accepted(serve: ServerFactory, make_pool: PoolFactory,
                                              lengths: list[str]) -> None:
    head = "HTTP/1.1 200 OK\r\n" + "".join(f"Content-Length: {v}\r\n" for v in lengths)
    server = await serve(replying(head.encode() + b"\r\nhello", ok(b"next")))
    pool = make_pool(server.port)

    body = await read_all(await get(pool))
    following = await read_all(await get(pool))

    assert body == b"hello"
    assert following == b"next"
    assert len(server.peers) == 1


# --- malformed responses -------------------------------------------------------------

MALFORMED_HEADS = [
    pytest.param(b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n", id="http2_version"),
    pytest.param(b"ICY 200 OK\r\nContent-Length: 0\r\n\r\n", id="unknown_protocol"),
    pytest.param(b"HTTP/1.1\r\nContent-Length: 0\r\n\r\n", id="no_status_code"),
    pytest.param(b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", id="empty_status_line"),
    pytest.param(b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", id="non_digit_status"),
    pytest.param(b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n", id="two_digit_status"),
    pytest.param(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", id="four_digit_status"),
    pytest.param(b"HTTP/1.1 099 OK\r\nContent-Length: 0\r\n\r\n", id="leading_zero_status"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
                 id="obs_fold_space"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\r\n\tb\r\nContent-Length: 0\r\n\r\n",
                 id="obs_fold_tab"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A : a\r\nContent-Length: 0\r\n\r\n",
                 id="space_before_colon"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A\t: a\r\nContent-Length: 0\r\n\r\n",
                 id="tab_before_colon"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\nX-B: b\r\nContent-Length: 0\r\n\r\n",
                 id="bare_lf"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\rX-B: b\r\nContent-Length: 0\r\n\r\n",
                 id="bare_cr"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
                 id="nul_in_value"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A a\r\nContent-Length: 0\r\n\r\n", id="no_colon"),
    pytest.param(b"HTTP/1.1 200 OK\r\n: a\r\nContent-Length: 0\r\n\r\n", id="empty_name"),
    pytest.param(b"HTTP/1.1 200 OK\r\nBad Name: a\r\nContent-Length: 0\r\n\r\n",
                 id="space_inside_name"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
                 id="conflicting_lengths"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello",
                 id="conflicting_lengths_in_list"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", id="non_numeric_length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", id="negative_length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", id="signed_length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello", id="hex_length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n", id="empty_length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD_SIZE + b"\r\n\r\n",
                 id="head_over_64_kib"),
]


@pytest.mark.parametrize("head", MALFORMED_HEADS)
async def test_malformed_head_rejected(serve: ServerFactory, make_pool: PoolFactory,
                                       head: bytes) -> None:
    """The request raises, the connection is closed, and the next request opens a new one."""
    server = await serve(replying(head, ok(b"next")))
    pool = make_pool(server.port)

    with pytest.raises(UpstreamProtocolError):
        await get(pool)
    open_after_error = pool.open_connections
    following = await read_all(await get(pool))

    assert open_after_error == 0
    await wait_for_event(server.peers[0].closed_by_client)
    assert following == b"next"
    assert len(server.peers) == 2


MALFORMED_CHUNKED_BODIES = [
    pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="non_hex_size"),
    pytest.param(b"\r\nhello\r\n0\r\n\r\n", id="empty_size"),
    pytest.param(b";ext\r\nhello\r\n0\r\n\r\n", id="extension_without_size"),
    pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", id="negative_size"),
    pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", id="prefixed_size"),
    pytest.param(b"1" * 17 + b"\r\nhello\r\n0\r\n\r\n", id="size_over_16_digits"),
    pytest.param(b"5\r\nhelloXX0\r\n\r\n", id="no_crlf_after_data"),
    pytest.param(b"5\r\nhello\n0\r\n\r\n", id="bare_lf_after_data"),
]


@pytest.mark.parametrize("body", MALFORMED_CHUNKED_BODIES)
async def test_malformed_chunk_rejected(serve: ServerFactory, make_pool: PoolFactory,
                                        body: bytes) -> None:
    server = await serve(replying(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body, ok(b"next")))
    pool = make_pool(server.port)
    response = await get(pool)

    with pytest.raises(UpstreamProtocolError):
        await read_all(response)
    open_after_error = pool.open_connections
    following = await read_all(await get(pool))

    assert open_after_error == 0
    assert following == b"next"
    assert len(server.peers) == 2


async def test_chunk_size_line_over_limit(serve: ServerFactory,
                                          make_pool: PoolFactory) -> None:
    """A chunk-size line longer than 64 KiB fails the read instead of being buffered."""
    extension = b";x=" + b"e" * MAX_HEAD_SIZE
    server = await serve(replying(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5" + extension + b"\r\nhello\r\n"))
    pool = make_pool(server.port)
    response = await get(pool)

    with pytest.raises(UpstreamUnreachable):
        await read_all(response)

    assert pool.open_connections == 0


@pytest.mark.parametrize("framing", [
    pytest.param(b"Content-Length: 5\r\n\r\nfirst", id="content_length"),
    pytest.param(b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n\r\n", id="chunked"),
])
async def test_bytes_after_response_not_reused(serve: ServerFactory, make_pool: PoolFactory,
                                               framing: bytes) -> None:
    """Bytes after a complete response belong to no request, so that connection is not reused.

    Otherwise the next request, perhaps another user's, reads them as its response.
    """
    unsolicited = ok(b"not yours")
    server = await serve(replying(b"HTTP/1.1 200 OK\r\n" + framing + unsolicited, ok(b"second")))
    pool = make_pool(server.port)

    first = await read_all(await get(pool))
    second = await read_all(await get(pool))

    assert first == b"first"
    assert second == b"second"
    assert len(server.peers) == 2


async def test_unsolicited_408_not_taken_as_response(serve: ServerFactory,
                                                     make_pool: PoolFactory) -> None:
    """Some servers send 408 on an idle keep-alive connection before closing it.

    That response belongs to no request, so the next GET must not receive it.
    """
    async def time_out_idle(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(ok(b"from %d" % peer.number))
        if peer.number == 0:
            await peer.send(ok(b"", "Connection: close", status="408 Request Timeout"))
            peer.close()
            return
        await peer.wait_closed_by_client()

    server = await serve(time_out_idle)
    pool = make_pool(server.port)
    await read_all(await get(pool))
    # Give the 408 and the FIN time to arrive before the next request goes out.
    await asyncio.sleep(0.1)

    response = await get(pool)
    body = await read_all(response)

    assert response.status == 200
    assert body == b"from 1"
    assert len(server.peers) == 2


# --- keep-alive ----------------------------------------------------------------------


async def test_sequential_requests_share_connection(serve: ServerFactory,
                                                    make_pool: PoolFactory) -> None:
    server = await serve(replying(ok(b"one"), ok(b"two")))
    pool = make_pool(server.port)

    first = await read_all(await get(pool, b"/1"))
    second = await read_all(await get(pool, b"/2"))

    assert (first, second) == (b"one", b"two")
    assert len(server.peers) == 1
    assert [request.split(b" ")[1] for request in server.peers[0].requests] == [b"/1", b"/2"]
    assert pool.open_connections == 1
    assert pool.idle_connections == 1


@pytest.mark.parametrize("response", [
    pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nfirst", id="http_1_0"),
    pytest.param(ok(b"first", "Connection: close"), id="connection_close"),
    pytest.param(ok(b"first", "Connection: keep-alive, Close"), id="close_in_token_list"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                 b"5\r\nfirst\r\n0\r\n\r\n", id="transfer_encoding_and_length"),
])
async def test_connection_not_reused(serve: ServerFactory, make_pool: PoolFactory,
                                     response: bytes) -> None:
    server = await serve(replying(response, ok(b"second")))
    pool = make_pool(server.port)

    first = await read_all(await get(pool))
    open_after_first = pool.open_connections
    second = await read_all(await get(pool))

    assert first == b"first"
    assert open_after_first == 0
    await wait_for_event(server.peers[0].closed_by_client)
    assert second == b"second"
    assert len(server.peers) == 2


async def test_abort_before_body_end_closes(serve: ServerFactory,
                                            make_pool: PoolFactory) -> None:
    server = await serve(replying(ok(b"a" * 200_000), ok(b"second")))
    pool = make_pool(server.port)

    response = await get(pool)
    first_piece = await response.read()
    response.abort()
    response.abort()
    open_after_abort = pool.open_connections
    second = await read_all(await get(pool))

    assert 0 < len(first_piece) <= CHUNK_SIZE
    assert open_after_abort == 0
    await wait_for_event(server.peers[0].closed_by_client)
    assert second == b"second"
    assert len(server.peers) == 2


async def test_abort_after_body_end_keeps_connection(serve: ServerFactory,
                                                     make_pool: PoolFactory) -> None:
    server = await serve(replying(ok(b"one"), ok(b"two")))
    pool = make_pool(server.port)

    response = await get(pool)
    await read_all(response)
    response.abort()
    second = await read_all(await get(pool))

    assert second == b"two"
    assert len(server.peers) == 1


async def test_unread_small_body_holds_connection(serve: ServerFactory,
                                                  make_pool: PoolFactory) -> None:
    """A prefetched body keeps its connection in use until the caller reads or aborts it."""
    server = await serve(replying(ok(b"one"), ok(b"two")))
    pool = make_pool(server.port)

    first = await get(pool)
    second = await get(pool)
    open_while_in_use = pool.open_connections
    idle_while_in_use = pool.idle_connections
    first.abort()
    second.abort()

    assert open_while_in_use == 2
    assert idle_while_in_use == 0
    assert pool.open_connections == 0
    assert len(server.peers) == 2


async def test_idle_connection_expires(serve: ServerFactory, make_pool: PoolFactory) -> None:
    server = await serve(replying(ok(b"one"), ok(b"two")))
    pool = make_pool(server.port, idle_expiry=0.05)

    await read_all(await get(pool))
    await asyncio.sleep(0.1)
    second = await read_all(await get(pool))

    assert second == b"two"
    assert len(server.peers) == 2
    await wait_for_event(server.peers[0].closed_by_client)
    assert pool.open_connections == 1


async def test_max_idle_respected(serve: ServerFactory, make_pool: PoolFactory) -> None:
    server = await serve(replying(ok(b"one"), ok(b"two"), ok(b"three")))
    pool = make_pool(server.port, max_idle=1)

    responses = [await get(pool) for _ in range(3)]
    open_while_in_use = pool.open_connections
    for response in responses:
        await read_all(response)

    assert open_while_in_use == 3
    assert pool.idle_connections == 1
    assert pool.open_connections == 1
    for peer in server.peers[1:]:
        await wait_for_event(peer.closed_by_client)


async def test_connection_counts_after_errors(serve: ServerFactory,
                                              make_pool: PoolFactory) -> None:
    """Failed requests of every kind leave no connection counted and no slot taken."""
    server = await serve(replying(
        b"HTTP/1.1 200 OK\r\nX-A : a\r\n\r\n",
        ok(b"hello", "Content-Length: 6"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ok(b"x" * 100_000),
        ok(b"fine")))
    pool = make_pool(server.port, max_connections=1)

    with pytest.raises(UpstreamProtocolError):
        await get(pool)
    with pytest.raises(UpstreamProtocolError):
        await get(pool)
    with pytest.raises(UpstreamProtocolError):
        await read_all(await get(pool))
    response = await get(pool)
    await response.read()
    response.abort()
    last = await read_all(await get(pool))

    assert last == b"fine"
    assert pool.open_connections == 1
    assert pool.idle_connections == 1
    assert len(server.peers) == 5


# --- stale connections ---------------------------------------------------------------


async def test_idle_connection_closed_by_upstream(serve: ServerFactory,
                                                  make_pool: PoolFactory) -> None:
    """The upstream closes an idle kept-alive connection, so the next GET uses a new one."""
    async def handle(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(ok(b"from %d" % peer.number))
        peer.close()

    server = await serve(handle)
    pool = make_pool(server.port)

    first = await read_all(await get(pool))
    await asyncio.sleep(0.05)
    second = await read_all(await get(pool))

    assert first == b"from 0"
    assert second == b"from 1"
    assert len(server.peers) == 2


def closing_on_second_request(*, reset: bool, stale_connections: int = 1) -> Handler:
    """Build a handler whose first connections reply to one request, then close on the next.

    Connections numbered ``stale_connections`` and up reply to every request.
    """
    async def handle(peer: Peer) -> None:
        if peer.number >= stale_connections:
            while await peer.read_request() is not None:
                await peer.send(ok(b"from %d" % peer.number))
            return
        await peer.read_request()
        await peer.send(ok(b"from %d" % peer.number))
        await peer.read_request()
        if reset:
            peer.reset()
        else:
            peer.close()

    return handle


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_stale_connection_get_retried(serve: ServerFactory, make_pool: PoolFactory,
                                            reset: bool) -> None:
    """The upstream closes a reused connection as the GET arrives, so the GET is sent again."""
    server = await serve(closing_on_second_request(reset=reset))
    pool = make_pool(server.port)

    await read_all(await get(pool, b"/first"))
    response = await get(pool, b"/second")
    body = await read_all(response)

    assert response.status == 200
    assert body == b"from 1"
    assert len(server.peers) == 2
    assert [request.split(b" ")[1] for request in server.peers[0].requests] == [
        b"/first", b"/second"]
    assert [request.split(b" ")[1] for request in server.peers[1].requests] == [b"/second"]
    assert pool.open_connections == 1


async def test_retry_reaches_new_connection(serve: ServerFactory,
                                            make_pool: PoolFactory) -> None:
    """Two idle connections went stale together, and the GET still reaches a new connection.

    Upstreams close idle connections on a keep-alive timer, so connections that
    went idle together go stale together, and a retry on the next idle one fails
    the same way.
    """
    server = await serve(closing_on_second_request(reset=False, stale_connections=2))
    pool = make_pool(server.port)
    concurrent = [await get(pool), await get(pool)]
    for response in concurrent:
        await read_all(response)

    response = await get(pool, b"/again")
    body = await read_all(response)

    assert response.status == 200
    assert body == b"from 2"
    assert len(server.peers) == 3


async def test_retry_not_repeated(serve: ServerFactory, make_pool: PoolFactory) -> None:
    """When the retry's new connection closes too, the request fails without a third try."""
    async def handle(peer: Peer) -> None:
        await peer.read_request()
        if peer.number == 0:
            await peer.send(ok(b"from 0"))
            await peer.read_request()
        peer.close()

    server = await serve(handle)
    pool = make_pool(server.port)
    await read_all(await get(pool))

    with pytest.raises(UpstreamUnreachable) as raised:
        await get(pool, b"/again")

    assert raised.type is UpstreamClosed
    assert len(server.peers) == 2
    assert pool.open_connections == 0


async def streamed_body() -> AsyncIterator[bytes]:
    yield b"data"


@pytest.mark.parametrize(("method", "body"), [
    pytest.param(b"POST", b"data", id="post_bytes"),
    pytest.param(b"PUT", None, id="put_streamed"),
])
async def test_stale_connection_body_not_retried(serve: ServerFactory, make_pool: PoolFactory,
                                                 method: bytes, body: bytes | None) -> None:
    """A POST, or any request with a streamed body, may have been processed, so it is not resent."""
    server = await serve(closing_on_second_request(reset=False))
    pool = make_pool(server.port)
    await read_all(await get(pool))
    headers = [*HEAD, (b"Content-Length", b"4")]

    with pytest.raises(UpstreamUnreachable) as raised:
        await pool.request(method, b"/submit", headers,
                           body if body is not None else streamed_body())

    assert raised.type is UpstreamClosed
    assert len(server.peers) == 1
    assert server.peers[0].requests[1].endswith(b"\r\n\r\ndata")
    assert pool.open_connections == 0


async def test_new_connection_closed_not_retried(serve: ServerFactory,
                                                 make_pool: PoolFactory) -> None:
    async def handle(peer: Peer) -> None:
        await peer.read_request()
        peer.close()

    server = await serve(handle)
    pool = make_pool(server.port)

    with pytest.raises(UpstreamUnreachable) as raised:
        await get(pool)

    assert raised.type is UpstreamClosed
    assert len(server.peers) == 1
    assert pool.open_connections == 0


async def resetting_after_head(peer: Peer) -> None:
    """Reset the connection once a request's head has arrived, while its body is on the way."""
    await peer.reader.readuntil(b"\r\n\r\n")
    peer.reset()


async def test_reset_while_sending_body(serve: ServerFactory, make_pool: PoolFactory) -> None:
    """The request fails when the upstream resets while a large body is still being written."""
    server = await serve(resetting_after_head, receive_buffer=4096)
    # A long send timeout, so only the reset can end the blocked write.
    pool = make_pool(server.port, timeout=MAX_WAIT)
    size = 16 * 1024 * 1024
    headers = [*HEAD, (b"Content-Length", str(size).encode())]

    with pytest.raises(UpstreamUnreachable) as raised:
        await pool.request(b"POST", b"/upload", headers, b"u" * size)

    assert raised.type is UpstreamUnreachable
    assert len(server.peers) == 1
    assert pool.open_connections == 0


async def test_stale_connection_put_retried(serve: ServerFactory,
                                            make_pool: PoolFactory) -> None:
    """A PUT whose whole body is in memory is idempotent, so it is sent again."""
    server = await serve(closing_on_second_request(reset=True))
    pool = make_pool(server.port)
    await read_all(await get(pool))
    headers = [*HEAD, (b"Content-Length", b"4")]

    response = await pool.request(b"PUT", b"/file", headers, b"data")
    body = await read_all(response)

    assert body == b"from 1"
    assert len(server.peers) == 2
    assert server.peers[1].requests == [server.peers[0].requests[1]]
    assert server.peers[1].requests[0].endswith(b"\r\n\r\ndata")


# --- limits and timeouts -------------------------------------------------------------


async def test_busy_pool_raises_after_timeout(serve: ServerFactory,
                                              make_pool: PoolFactory) -> None:
    server = await serve(replying(ok(b"a" * 100_000), ok(b"after")))
    pool = make_pool(server.port, max_connections=1)
    in_use = await get(pool)
    started = time.monotonic()

    with pytest.raises(UpstreamBusy):
        await get(pool)
    elapsed = time.monotonic() - started
    in_use.abort()
    after = await read_all(await get(pool))

    assert TIMEOUT * 0.9 <= elapsed < MAX_WAIT
    assert after == b"after"
    assert len(server.peers) == 2


async def test_waiting_request_gets_freed_connection(serve: ServerFactory,
                                                     make_pool: PoolFactory) -> None:
    server = await serve(replying(ok(b"a" * 100_000), ok(b"second")))
    pool = make_pool(server.port, max_connections=1)
    in_use = await get(pool)

    waiting = asyncio.create_task(get(pool))
    await asyncio.sleep(0.05)
    waited_before_release = not waiting.done()
    await read_all(in_use)
    second = await read_all(await waiting)

    assert waited_before_release
    assert second == b"second"
    assert len(server.peers) == 1


async def test_connect_refused(make_pool: PoolFactory) -> None:
    """Refused connections raise at once and give their slot back."""
    pool = make_pool(free_port(), max_connections=1)

    for _ in range(2):
        with pytest.raises(UpstreamUnreachable, match="ConnectionRefusedError"):
            await get(pool)

    assert pool.open_connections == 0


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


async def test_connect_timeout() -> None:
    with listener_with_full_queue() as port:
        pool = UpstreamPool("http", HOST, port, connect_timeout=TIMEOUT, timeout=TIMEOUT)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="connecting"):
            await get(pool)
        elapsed = time.monotonic() - started

    assert TIMEOUT * 0.9 <= elapsed < MAX_WAIT
    assert pool.open_connections == 0


async def test_no_answer_times_out(serve: ServerFactory, make_pool: PoolFactory) -> None:
    async def handle(peer: Peer) -> None:
        await peer.read_request()
        await peer.wait_closed_by_client()

    server = await serve(handle)
    pool = make_pool(server.port)
    started = time.monotonic()

    with pytest.raises(UpstreamTimeout, match="waiting for the response"):
        await get(pool)
    elapsed = time.monotonic() - started

    assert TIMEOUT * 0.9 <= elapsed < MAX_WAIT
    assert pool.open_connections == 0
    await wait_for_event(server.peers[0].closed_by_client)


def stalling_after(data: bytes) -> Handler:
    """Build a handler that sends ``data`` for the first request, then nothing more."""
    async def handle(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(data)
        await peer.wait_closed_by_client()

    return handle


async def test_request_timeout_overrides_pool(serve: ServerFactory,
                                              make_pool: PoolFactory) -> None:
    """A per-request timeout replaces the pool's for the head and for every body read."""
    server = await serve(stalling_after(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 70_000))
    pool = make_pool(server.port, timeout=60.0)
    response = await pool.request(b"GET", b"/", HEAD, timeout=TIMEOUT)
    started = time.monotonic()

    with pytest.raises(UpstreamTimeout, match="reading the response body"):
        await read_all(response)
    elapsed = time.monotonic() - started

    assert TIMEOUT * 0.9 <= elapsed < MAX_WAIT
    assert pool.open_connections == 0


async def test_request_without_timeout(serve: ServerFactory, make_pool: PoolFactory) -> None:
    """With ``timeout=None`` a response slower than the pool's timeout still arrives."""
    async def reply_late(peer: Peer) -> None:
        await peer.read_request()
        await asyncio.sleep(TIMEOUT * 2)
        await peer.send(ok(b"late"))
        await peer.wait_closed_by_client()

    server = await serve(reply_late)
    pool = make_pool(server.port)

    response = await pool.request(b"GET", b"/", HEAD, timeout=None)
    body = await read_all(response)

    assert body == b"late"


async def test_request_connect_timeout_overrides_pool() -> None:
    with listener_with_full_queue() as port:
        pool = UpstreamPool("http", HOST, port, connect_timeout=60.0, timeout=60.0)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="connecting"):
            await pool.request(b"GET", b"/", HEAD, connect_timeout=TIMEOUT)
        elapsed = time.monotonic() - started

    assert TIMEOUT * 0.9 <= elapsed < MAX_WAIT
    assert pool.open_connections == 0


async def test_small_body_stall_times_out(serve: ServerFactory, make_pool: PoolFactory) -> None:
    """A short body is read with the head, so its stall fails the request itself."""
    server = await serve(stalling_after(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf."))
    pool = make_pool(server.port)

    with pytest.raises(UpstreamTimeout):
        await get(pool)

    assert pool.open_connections == 0


@pytest.mark.parametrize("sent", [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 70_000,
                 id="content_length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                 id="chunked"),
    pytest.param(b"HTTP/1.1 200 OK\r\n\r\nuntil close", id="until_close"),
])
async def test_body_stall_times_out(serve: ServerFactory, make_pool: PoolFactory,
                                    sent: bytes) -> None:
    server = await serve(stalling_after(sent))
    pool = make_pool(server.port)
    response = await get(pool)
    started = time.monotonic()

    with pytest.raises(UpstreamTimeout, match="reading the response body"):
        await read_all(response)
    elapsed = time.monotonic() - started

    assert TIMEOUT * 0.9 <= elapsed < MAX_WAIT
    assert pool.open_connections == 0
    await wait_for_event(server.peers[0].closed_by_client)


async def megabyte_pieces() -> AsyncIterator[bytes]:
    piece = b"u" * (1024 * 1024)
    for _ in range(16):
        yield piece


@pytest.mark.parametrize("streamed", [False, True], ids=["bytes", "streamed"])
async def test_send_stall_times_out(serve: ServerFactory, make_pool: PoolFactory,
                                    streamed: bool) -> None:
    """An upstream that stops reading the request body fails the request after the timeout."""
    async def never_read(peer: Peer) -> None:
        await asyncio.Event().wait()

    server = await serve(never_read, receive_buffer=4096)
    pool = make_pool(server.port)
    size = 16 * 1024 * 1024
    headers = [*HEAD, (b"Content-Length", str(size).encode())]
    body = megabyte_pieces() if streamed else b"u" * size
    started = time.monotonic()

    with pytest.raises(UpstreamTimeout, match="sending the request"):
        await pool.request(b"POST", b"/upload", headers, body)
    elapsed = time.monotonic() - started

    assert TIMEOUT * 0.9 <= elapsed < MAX_WAIT
    assert pool.open_connections == 0


# --- premature close -----------------------------------------------------------------


@pytest.mark.parametrize("sent", [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", id="inside_head"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.", id="inside_small_body"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", id="before_small_body"),
])
async def test_close_before_response_returned(serve: ServerFactory, make_pool: PoolFactory,
                                              sent: bytes) -> None:
    """A close after part of the response is not a stale connection, so the request is not resent."""
    server = await serve(closing_after(sent))
    pool = make_pool(server.port)

    with pytest.raises(UpstreamUnreachable) as raised:
        await get(pool)

    assert raised.type is UpstreamClosed
    assert pool.open_connections == 0
    assert len(server.peers) == 1


@pytest.mark.parametrize("sent", [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"a" * 70_000,
                 id="large_content_length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nhalf",
                 id="inside_chunk"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfull",
                 id="before_chunk_crlf"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfull\r\n",
                 id="before_next_chunk"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n",
                 id="inside_trailers"),
])
async def test_close_inside_body(serve: ServerFactory, make_pool: PoolFactory,
                                 sent: bytes) -> None:
    server = await serve(closing_after(sent))
    pool = make_pool(server.port)
    response = await get(pool)

    with pytest.raises(UpstreamUnreachable) as raised:
        await read_all(response)

    assert raised.type is UpstreamClosed
    assert not response.complete
    assert pool.open_connections == 0


# --- closing the pool ----------------------------------------------------------------


async def test_aclose_closes_idle_connections(serve: ServerFactory,
                                              make_pool: PoolFactory) -> None:
    server = await serve(replying(ok(b"one"), ok(b"two")))
    pool = make_pool(server.port)
    await read_all(await get(pool))
    await read_all(await get(pool))

    await pool.aclose()

    assert pool.idle_connections == 0
    assert pool.open_connections == 0
    await wait_for_event(server.peers[0].closed_by_client)


async def test_aclose_closes_connection_in_use_after_body(serve: ServerFactory,
                                                          make_pool: PoolFactory) -> None:
    server = await serve(replying(ok(b"a" * 100_000), ok(b"after close")))
    pool = make_pool(server.port)
    response = await get(pool)

    await pool.aclose()
    open_during_use = pool.open_connections
    body = await read_all(response)
    open_after_body = pool.open_connections
    after_close = await read_all(await get(pool))

    assert open_during_use == 1
    assert len(body) == 100_000
    assert open_after_body == 0
    assert after_close == b"after close"
    assert pool.open_connections == 0
    assert len(server.peers) == 2


# --- TLS and socket options ----------------------------------------------------------


async def test_tls_upstream_verified(serve: ServerFactory, make_pool: PoolFactory,
                                     tmp_path: Path) -> None:
    certificate, key = write_self_signed_certificate(tmp_path, HOST)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certificate, key)
    client_context = ssl.create_default_context(cafile=str(certificate))
    server = await serve(replying(ok(b"secure one"), ok(b"secure two")),
                         ssl_context=server_context)
    pool = make_pool(server.port, scheme="https", ssl_context=client_context)

    first = await read_all(await get(pool))
    second = await read_all(await get(pool))

    assert pool.tls is client_context
    assert (first, second) == (b"secure one", b"secure two")
    assert len(server.peers) == 1


async def test_tls_to_plain_server_unreachable(serve: ServerFactory,
                                               make_pool: PoolFactory) -> None:
    """The default context is used for https, and a failed handshake raises as unreachable."""
    async def answer_plain(peer: Peer) -> None:
        await peer.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await peer.wait_closed_by_client()

    server = await serve(answer_plain)
    pool = make_pool(server.port, scheme="https")

    with pytest.raises(UpstreamUnreachable, match="SSL"):
        await get(pool)

    assert isinstance(pool.tls, ssl.SSLContext)
    assert pool.tls.verify_mode == ssl.CERT_REQUIRED
    assert pool.open_connections == 0


async def test_tls_record_corrupted(serve: ServerFactory, make_pool: PoolFactory,
                                    tmp_path: Path) -> None:
    """A TLS record that fails to decrypt raises as unreachable and closes the connection."""
    certificate, key = write_self_signed_certificate(tmp_path, HOST)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certificate, key)

    async def corrupt_record(peer: Peer) -> None:
        await peer.read_request()
        # An application-data record written past the TLS layer, so its MAC cannot match.
        record = b"\x17\x03\x03\x00\x20" + b"\x00" * 32
        os.write(peer.writer.get_extra_info("socket").fileno(), record)
        await peer.wait_closed_by_client()

    server = await serve(corrupt_record, ssl_context=server_context)
    pool = make_pool(server.port, scheme="https",
                     ssl_context=ssl.create_default_context(cafile=str(certificate)))

    with pytest.raises(UpstreamUnreachable, match="SSLError") as raised:
        await get(pool)

    assert raised.type is UpstreamUnreachable
    assert pool.open_connections == 0


async def test_plain_scheme_without_tls(make_pool: PoolFactory) -> None:
    pool = make_pool(free_port())

    assert pool.tls is None


async def test_receive_buffer_set_and_failure_ignored(
    serve: ServerFactory, make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool requests a 128 KiB receive buffer, and a socket that rejects it still works."""
    options: list[tuple[int, int, Any]] = []

    def reject_option(_sock: object, level: int, option: int, value: Any) -> None:
        options.append((level, option, value))
        raise OSError("option rejected")

    monkeypatch.setattr(asyncio.trsock.TransportSocket, "setsockopt", reject_option)
    server = await serve(replying(ok(b"fine")))
    pool = make_pool(server.port)

    body = await read_all(await get(pool))

    assert options == [(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)]
    assert body == b"fine"
