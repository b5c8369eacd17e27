"""Real servers on 127.0.0.1 for tests: uvicorn in the test's event loop, and a raw HTTP client.

The raw client sends the request target byte for byte, which httpx does not:
it resolves ``..`` segments before sending.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

import h11
import uvicorn
from starlette.types import ASGIApp

HOST = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    """Block until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout} s") from None
            time.sleep(0.05)


class LoopbackServer:
    """An ASGI app served by uvicorn on 127.0.0.1 inside the running event loop."""

    def __init__(self, app: ASGIApp | None = None, *,
                 lifespan: Literal["auto", "on", "off"] = "on", port: int | None = None) -> None:
        self.app = app
        self.lifespan = lifespan
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((HOST, port or 0))
        self.port: int = self.socket.getsockname()[1]
        self.server: uvicorn.Server | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def __aenter__(self) -> Self:
        if self.app is None:
            raise RuntimeError("set LoopbackServer.app before starting it")
        config = uvicorn.Config(self.app, lifespan=self.lifespan, log_level="warning",
                                access_log=False, server_header=False, proxy_headers=False)
        self.server = uvicorn.Server(config)
        self.task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        deadline = time.monotonic() + 10
        while not self.server.started:
            if self.task.done() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, traceback: TracebackType | None) -> None:
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            await self.task
        self.socket.close()


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    elapsed: float = 0.0
    header_map: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.header_map.get(name.lower())


async def raw_request(port: int, target: str, *, method: str = "GET",
                      headers: list[tuple[str, str]] | None = None, body: bytes = b"",
                      send_body: bool = True, timeout: float = 10.0) -> RawResponse:
    """Send one HTTP/1.1 request with ``target`` exactly as given and read the response.

    With ``send_body`` false the request's headers go out but its body does not,
    like a client that announced a body and then stalls.
    """
    started = time.monotonic()
    connection = h11.Connection(our_role=h11.CLIENT)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        all_headers = [("Host", f"{HOST}:{port}"), *(headers or [])]
        if body and not any(k.lower() == "content-length" for k, _ in all_headers):
            all_headers.append(("Content-Length", str(len(body))))
        writer.write(connection.send(h11.Request(method=method, target=target,
                                                 headers=all_headers)) or b"")
        if send_body:
            if body:
                writer.write(connection.send(h11.Data(data=body)) or b"")
            writer.write(connection.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await _read_response(connection, reader, started)
    finally:
        writer.close()


async def _read_response(connection: h11.Connection, reader: asyncio.StreamReader,
                         started: float) -> RawResponse:
    response: RawResponse | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(65536))
            continue
        if isinstance(event, h11.Response):
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
            response = RawResponse(event.status_code, headers,
                                   header_map={k: v for k, v in headers})
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)) and response:
            response.body = bytes(body)
            response.elapsed = time.monotonic() - started
            return response
