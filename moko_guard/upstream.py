"""HTTP/1.1 client for the reverse proxy: a keep-alive pool of upstream connections.

The proxy sends every request to one upstream origin, so the pool is a plain
last-in-first-out list of idle connections to that origin, with a bound on
open connections. Taking a connection and putting it back are constant-time
list operations, whatever the number of pooled connections.

The client sends the request target byte for byte (no ``..`` resolution, no
re-encoding) and keeps no cookies. It reads responses by the framing rules of
RFC 9112 section 6.3. There is no body for ``HEAD``, 1xx, 204 and 304. The body
is chunked when the last transfer coding is ``chunked``, else it has
``Content-Length`` bytes, else it lasts until the upstream closes. A response that breaks those rules, or whose header block is
larger than :data:`MAX_HEAD_SIZE`, raises :class:`UpstreamProtocolError`, and
its connection is closed rather than reused.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator

RawHeaders = list[tuple[bytes, bytes]]

# Largest body piece handed to the caller at once.
CHUNK_SIZE = 64 * 1024
# Largest status line plus header block accepted from the upstream, and largest chunk-size line.
MAX_HEAD_SIZE = 64 * 1024
# The receive buffer of each upstream socket. With the stream reader's own limit it
# bounds how much of a response is read ahead of a slow client.
RECEIVE_BUFFER = 128 * 1024
# Methods that may be sent again on a fresh connection when a reused one turns out closed.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
NO_BODY_STATUSES = frozenset({204, 304})


# RFC 9110 section 5.6.2: a header name is a token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters other than horizontal tab (RFC 9110 section 5.5).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class _Default:
    """The type of :data:`DEFAULT`: "use the pool's setting" for an optional argument."""


DEFAULT = _Default()


class UpstreamError(Exception):
    """The upstream did not return a usable response."""


class UpstreamBusy(UpstreamError):
    """Every upstream connection stayed in use for the whole timeout."""


class UpstreamTimeout(UpstreamError):
    """Connecting, sending or reading took longer than its timeout."""


class UpstreamUnreachable(UpstreamError):
    """The connection failed or closed before the response was complete."""


class UpstreamClosed(UpstreamUnreachable):
    """The upstream closed the connection before the response was complete."""


class UpstreamWriteTimeout(UpstreamTimeout):
    """Sending the request stalled for longer than the write timeout."""


class UpstreamConnectTimeout(UpstreamTimeout):
    """The TCP or TLS connection was not set up within the connect timeout."""


class UpstreamConnectError(UpstreamUnreachable):
    """The TCP or TLS connection could not be set up."""


class UpstreamProtocolError(UpstreamUnreachable):
    """The upstream's response is not valid HTTP/1.1."""


class _Connection:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def unusable(self) -> bool:
        """True when the upstream has closed its side, the socket is gone, or bytes wait unread.

        Bytes on an idle connection belong to no request (a ``408`` the upstream sent
        before closing, or data beyond the last response's end), so they would be
        taken as the next request's response.
        """
        # StreamReader has no public way to see its buffer; _buffer has been its name
        # since asyncio's first release.
        return (self.writer.is_closing() or self.reader.at_eof()
                or bool(getattr(self.reader, "_buffer", b"")))

    def close(self) -> None:
        self.writer.transport.abort()


class UpstreamResponse:
    """A response whose status and headers have arrived; read the body with :meth:`read`."""

    __slots__ = ("status", "headers", "_pool", "_connection", "_timeout", "_remaining",
                 "_chunked", "_until_close", "_keep_alive", "_done", "_released", "_prefetched")

    def __init__(self, pool: UpstreamPool, connection: _Connection, status: int,
                 headers: RawHeaders, *, no_body: bool, keep_alive: bool,
                 timeout: float | None) -> None:
        self.status = status
        self.headers = headers
        self._pool = pool
        self._connection = connection
        self._timeout = timeout
        self._remaining = 0
        self._chunked = False
        self._until_close = False
        self._keep_alive = keep_alive
        self._done = no_body
        self._released = False
        self._prefetched = b""
        if not no_body:
            self._frame(headers)

    def _frame(self, headers: RawHeaders) -> None:
        codings = [value for name, value in headers if name == b"transfer-encoding"]
        lengths = [value for name, value in headers if name == b"content-length"]
        if codings:
            last = b",".join(codings).split(b",")[-1].strip().lower()
            self._chunked = last == b"chunked"
            self._until_close = not self._chunked
            # A Content-Length beside Transfer-Encoding may be a smuggling attempt, so the
            # connection is not reused and the length, which the body does not have, is dropped.
            if lengths:
                self.headers = [(name, value) for name, value in headers
                                if name != b"content-length"]
            if lengths or self._until_close:
                self._keep_alive = False
            return
        if not lengths:
            self._until_close = True
            self._keep_alive = False
            return
        values = {value.strip() for joined in lengths for value in joined.split(b",")}
        if len(values) != 1:
            raise UpstreamProtocolError("conflicting Content-Length values")
        value = values.pop()
        if not value.isdigit():
            raise UpstreamProtocolError("Content-Length is not a number")
        self._remaining = int(value)
        self._done = self._remaining == 0

    @property
    def complete(self) -> bool:
        """True once the whole body has been handed to the caller."""
        return self._done and not self._prefetched

    async def read(self) -> bytes:
        """Return the next piece of the body (at most :data:`CHUNK_SIZE`), or ``b""`` at its end."""
        if self._prefetched:
            data, self._prefetched = self._prefetched, b""
            if self._done:
                self._release()
            return data
        if self._done:
            self._release()
            return b""
        try:
            async with asyncio.timeout(self._timeout):
                data = await self._read_piece()
        except TimeoutError:
            self.abort()
            raise UpstreamTimeout("reading the response body") from None
        except UpstreamError:
            self.abort()
            raise
        except asyncio.IncompleteReadError:
            self.abort()
            raise UpstreamClosed("the upstream closed inside the response body") from None
        except (OSError, asyncio.LimitOverrunError, ValueError) as exc:
            self.abort()
            raise UpstreamUnreachable(f"response body: {type(exc).__name__}") from None
        if self._done:
            self._release()
        return data

    async def _read_piece(self) -> bytes:
        reader = self._connection.reader
        if self._until_close:
            data = await reader.read(CHUNK_SIZE)
            if not data:
                self._done = True
            return data
        if self._chunked:
            return await self._read_chunk_piece(reader)
        if self._remaining <= CHUNK_SIZE:
            data = await reader.readexactly(self._remaining)
        else:
            data = await reader.read(CHUNK_SIZE)
            if not data:
                raise UpstreamClosed("the upstream closed before the end of the body")
        self._remaining -= len(data)
        self._done = self._remaining == 0
        return data

    async def _read_chunk_piece(self, reader: asyncio.StreamReader) -> bytes:
        if self._remaining == 0:
            size_line = await reader.readuntil(b"\r\n")
            size_text = size_line[:-2].split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 16 or not all(
                    byte in b"0123456789abcdefABCDEF" for byte in size_text):
                raise UpstreamProtocolError("chunk size is not a hexadecimal number")
            size = int(size_text, 16)
            if size == 0:
                # Trailer fields end with an empty line; they are not passed on.
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                self._done = True
                return b""
            self._remaining = size
        data = await reader.read(min(self._remaining, CHUNK_SIZE))
        if not data:
            raise UpstreamClosed("the upstream closed inside a chunk")
        self._remaining -= len(data)
        if self._remaining == 0 and await reader.readexactly(2) != b"\r\n":
            raise UpstreamProtocolError("chunk data is not followed by CRLF")
        return data

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self._pool._put_back(self._connection, reusable=self._done and self._keep_alive)

    def abort(self) -> None:
        """Stop reading: the connection is closed, since the rest of the body is still on it."""
        if self._released:
            return
        self._released = True
        self._pool._put_back(self._connection, reusable=False)


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to one upstream origin."""

    def __init__(self, scheme: str, host: str, port: int, *, connect_timeout: float | None,
                 timeout: float | None, max_connections: int = 256, max_idle: int = 64,
                 idle_expiry: float = 30.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_idle = max_idle
        self.idle_expiry = idle_expiry
        self.tls = (ssl_context or ssl.create_default_context()) if scheme == "https" else None
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._open = 0
        self._closed = False

    @property
    def open_connections(self) -> int:
        """How many upstream connections exist, in use or idle."""
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def aclose(self) -> None:
        """Close the idle connections; connections in use close when their response ends."""
        self._closed = True
        while self._idle:
            self._discard(self._idle.pop())

    async def request(self, method: bytes, target: bytes, headers: RawHeaders,
                      body: bytes | AsyncIterator[bytes] = b"", *, chunked: bool = False,
                      timeout: float | None | _Default = DEFAULT,
                      connect_timeout: float | None | _Default = DEFAULT,
                      write_timeout: float | None | _Default = DEFAULT,
                      pool_timeout: float | None | _Default = DEFAULT) -> UpstreamResponse:
        """Send one request and return once the response's status and headers arrived.

        ``body`` is either the whole body or an iterator of its pieces; with
        ``chunked`` the pieces are sent in chunked transfer coding. The caller
        sets the framing header (``Content-Length`` or ``Transfer-Encoding``).
        The connection goes back to the pool when the caller has read the body
        to its end, or is closed by :meth:`UpstreamResponse.abort`.

        ``timeout`` (reading) and ``connect_timeout`` replace the pool's for this
        request. ``write_timeout`` (each write) and ``pool_timeout`` (waiting for
        a free connection) default to ``timeout``. None means no limit.
        """
        if isinstance(timeout, _Default):
            timeout = self.timeout
        if isinstance(connect_timeout, _Default):
            connect_timeout = self.connect_timeout
        if isinstance(write_timeout, _Default):
            write_timeout = timeout
        if isinstance(pool_timeout, _Default):
            pool_timeout = timeout
        await self._take_slot(pool_timeout)
        try:
            head = _request_head(method, target, headers)
            # A request with a streamed body cannot be sent twice.
            retry = isinstance(body, bytes) and method in IDEMPOTENT_METHODS
            connection, reused = await self._connection(connect_timeout)
            while True:
                try:
                    return await self._exchange(connection, method, head, body, chunked, timeout,
                                                write_timeout)
                except _StaleConnection as stale:
                    self._discard(connection)
                    if not (reused and retry):
                        if stale.reset:
                            raise UpstreamUnreachable("the upstream reset the connection") from None
                        raise UpstreamClosed("the upstream closed the connection") from None
                    # Other idle connections may be just as stale: the retry opens a new one.
                    retry = False
                    connection, reused = await self._connect(connect_timeout), False
                except BaseException:
                    self._discard(connection)
                    raise
        except BaseException:
            self._slots.release()
            raise

    async def _take_slot(self, timeout: float | None) -> None:
        if not self._slots.locked():
            await self._slots.acquire()
            return
        try:
            async with asyncio.timeout(timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamBusy("no upstream connection became free") from None

    async def _connection(self, connect_timeout: float | None) -> tuple[_Connection, bool]:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.unusable() or now - connection.idle_since > self.idle_expiry:
                self._discard(connection)
                continue
            return connection, True
        return await self._connect(connect_timeout), False

    async def _connect(self, connect_timeout: float | None) -> _Connection:
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self.tls, limit=MAX_HEAD_SIZE,
                    server_hostname=self.host if self.tls else None)
        except TimeoutError:
            raise UpstreamConnectTimeout("connecting to the upstream") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConnectError(f"connecting to the upstream: {type(exc).__name__}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            except OSError:
                pass
        self._open += 1
        return _Connection(reader, writer)

    async def _exchange(self, connection: _Connection, method: bytes, head: bytes,
                        body: bytes | AsyncIterator[bytes], chunked: bool,
                        timeout: float | None, write_timeout: float | None) -> UpstreamResponse:
        writer = connection.writer
        try:
            if isinstance(body, bytes):
                writer.write(head + body if body else head)
                await self._drain(writer, write_timeout)
            else:
                writer.write(head)
                await self._send_stream(writer, body, chunked, write_timeout)
        except (ConnectionResetError, BrokenPipeError):
            raise _StaleConnection(reset=True) from None
        except OSError as exc:
            raise UpstreamUnreachable(f"sending the request: {type(exc).__name__}") from None
        reader = connection.reader
        response: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(timeout):
                status, version, headers = await _read_head(reader)
                keep_alive = (version == b"HTTP/1.1" and not self._closed
                              and not _has_token(headers, b"connection", b"close"))
                no_body = method == b"HEAD" or status in NO_BODY_STATUSES
                response = UpstreamResponse(self, connection, status, headers, no_body=no_body,
                                            keep_alive=keep_alive, timeout=timeout)
                # A short body of known length is read at once: the usual response then
                # needs one timeout and one read, and the caller gets it whole.
                if response._remaining and response._remaining <= CHUNK_SIZE:
                    response._prefetched = await reader.readexactly(response._remaining)
                    response._remaining = 0
                    response._done = True
                return response
        except TimeoutError:
            raise UpstreamTimeout("waiting for the response") from None
        except asyncio.IncompleteReadError as exc:
            if not exc.partial and response is None:
                raise _StaleConnection(reset=False) from None
            raise UpstreamClosed("the upstream closed inside the response") from None
        except ConnectionResetError:
            raise _StaleConnection(reset=True) from None
        except asyncio.LimitOverrunError:
            raise UpstreamProtocolError("the response head is too large") from None
        except OSError as exc:
            raise UpstreamUnreachable(f"reading the response: {type(exc).__name__}") from None

    async def _drain(self, writer: asyncio.StreamWriter, timeout: float | None) -> None:
        if not writer.transport.get_write_buffer_size():
            # Everything went to the socket already; an error shows when the response is read.
            return
        try:
            async with asyncio.timeout(timeout):
                await writer.drain()
        except TimeoutError:
            raise UpstreamWriteTimeout("sending the request") from None

    async def _send_stream(self, writer: asyncio.StreamWriter, body: AsyncIterator[bytes],
                           chunked: bool, timeout: float | None) -> None:
        """Send the body's pieces as the client sends them; each write has its own timeout."""
        async for piece in body:
            if not piece:
                # An empty chunk would end a chunked body.
                continue
            if chunked:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                writer.write(piece)
            await self._drain(writer, timeout)
        if chunked:
            writer.write(b"0\r\n\r\n")
            await self._drain(writer, timeout)

    def _put_back(self, connection: _Connection, *, reusable: bool) -> None:
        self._slots.release()
        if (reusable and not self._closed and len(self._idle) < self.max_idle
                and not connection.unusable()):
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            self._discard(connection)

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open -= 1


class _StaleConnection(Exception):
    """The connection closed before any byte of the response: the request may be sent again."""

    def __init__(self, *, reset: bool) -> None:
        super().__init__()
        self.reset = reset


def _request_head(method: bytes, target: bytes, headers: RawHeaders) -> bytes:
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, bytes, RawHeaders]:
    """Read a final response's status line and headers, skipping 1xx interim responses."""
    while True:
        block = await reader.readuntil(b"\r\n\r\n")
        status, version, headers = _parse_head(block)
        if status >= 200:
            return status, version, headers
        if status == 101:
            # The proxy never requests an upgrade on this path (websockets have their own).
            raise UpstreamProtocolError("unexpected 101 Switching Protocols")


def _parse_head(block: bytes) -> tuple[int, bytes, RawHeaders]:
    lines = block[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise UpstreamProtocolError("the status line is not HTTP/1.x")
    code = parts[1]
    if len(code) != 3 or not code.isdigit() or code[0:1] == b"0":
        raise UpstreamProtocolError("the status code is not three digits")
    headers: RawHeaders = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        # The name must be a token (no space, no folded line) and the value free of control
        # characters, or a client, or the server relaying the response, could misread it.
        if not colon or not _TOKEN.fullmatch(name) or _CONTROL.search(value):
            raise UpstreamProtocolError("a response header line is malformed")
        headers.append((name.lower(), value))
    return int(code), parts[0], headers


def _has_token(headers: RawHeaders, name: bytes, token: bytes) -> bool:
    for key, value in headers:
        if key == name and token in (part.strip().lower() for part in value.split(b",")):
            return True
    return False
