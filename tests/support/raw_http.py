"""A raw TCP server on 127.0.0.1 that replies to HTTP requests with scripted bytes.

Tests of the upstream client need exact control over response framing, which a
real HTTP server would correct, so this server sends whatever bytes a test
gives it. It records every connection and the raw bytes of every request.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Self

import pytest

HOST = "127.0.0.1"


class Peer:
    """One accepted connection, seen from the server side."""

    def __init__(self, number: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        # The connection's position in accept order, from 0.
        self.number = number
        self.reader = reader
        self.writer = writer
        self.requests: list[bytes] = []
        self.closed_by_client = asyncio.Event()

    async def read_request(self) -> bytes | None:
        """Read one request's head and body and return its raw bytes, or None at EOF.

        The body is framed by ``Content-Length`` or by chunked coding, as the
        upstream client sends it.
        """
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
            return None
        lines = head.lower().split(b"\r\n")
        body = b""
        if b"transfer-encoding: chunked" in lines:
            body = await self._read_chunked_body()
        else:
            for line in lines:
                if line.startswith(b"content-length:"):
                    length = int(line.partition(b":")[2])
                    body = await self.reader.readexactly(length)
        request = head + body
        self.requests.append(request)
        return request

    async def _read_chunked_body(self) -> bytes:
        body = b""
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            body += size_line
            if size == 0:
                return body + await self.reader.readuntil(b"\r\n")
            body += await self.reader.readexactly(size + 2)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_closed_by_client(self) -> None:
        """Read and drop everything until the client closes the connection."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.closed_by_client.set()

    def close(self) -> None:
        """Close the connection with a FIN, after the bytes already written."""
        self.writer.close()

    def reset(self) -> None:
        """Close the connection with a TCP RST, so the client's next read or write fails."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Peer], Awaitable[None]]


class RawServer:
    """Serve each accepted connection with ``handler`` on 127.0.0.1 and a free port.

    ``receive_buffer`` sets SO_RCVBUF on the listening socket, which accepted
    sockets inherit, so a test can make the client's writes block early. With
    ``ssl_context`` the server speaks TLS.
    """

    def __init__(self, handler: Handler, *, receive_buffer: int | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.receive_buffer = receive_buffer
        self.ssl_context = ssl_context
        self.peers: list[Peer] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def requests(self) -> list[bytes]:
        """Every request received, in the order of the connections, then of arrival."""
        return [request for peer in self.peers for request in peer.requests]

    async def __aenter__(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.bind((HOST, 0))
        self.port = sock.getsockname()[1]
        # A plain callback rather than a coroutine function, so the tasks are this
        # server's own and can be cancelled at the end without asyncio logging them.
        self._server = await asyncio.start_server(self._accept, sock=sock, ssl=self.ssl_context)
        return self

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(len(self.peers), reader, writer)
        self.peers.append(peer)
        self._tasks.append(asyncio.create_task(self._serve(peer)))

    async def _serve(self, peer: Peer) -> None:
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            # The client went away while the script was still running.
            pass

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, traceback: TracebackType | None) -> None:
        if self._server is not None:
            self._server.close()
        for peer in self.peers:
            peer.writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


def replying(*responses: bytes) -> Handler:
    """Build a handler that replies to requests with ``responses`` in order, over all connections.

    After the last response each connection stays open until the client closes it.
    """
    queue = list(responses)

    async def handle(peer: Peer) -> None:
        while queue:
            if await peer.read_request() is None:
                return
            await peer.send(queue.pop(0))
        await peer.wait_closed_by_client()

    return handle


# Starts a RawServer for a test: ``await serve(handler, **options)``.
ServerFactory = Callable[..., Awaitable[RawServer]]


@pytest.fixture
async def serve() -> AsyncIterator[ServerFactory]:
    """Start raw servers for one test and stop them at its end."""
    servers: list[RawServer] = []

    async def start(handler: Handler, **options: Any) -> RawServer:
        server = RawServer(handler, **options)
        await server.__aenter__()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.__aexit__(None, None, None)


def ok(body: bytes = b"", *headers: str, status: str = "200 OK") -> bytes:
    """Build a response with ``Content-Length`` framing, after the given header lines."""
    lines = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def closing_after(data: bytes) -> Handler:
    """Build a handler that sends ``data`` for the first request and then closes with a FIN."""

    async def handle(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(data)
        peer.close()

    return handle
