"""A TCP proxy on 127.0.0.1 in front of PostgreSQL that counts the statements its clients send.

It reads the client side of the PostgreSQL wire protocol (version 3.0). After
the startup packet, every client message is one type byte followed by a
big-endian int32 length that counts itself but not the type byte. A simple
query (``Q``) or an extended-protocol Execute (``E``) runs one statement, so
those two are counted; Parse, Bind, Describe and Sync are forwarded uncounted.
The proxy replies ``N`` to an SSLRequest or GSSENCRequest itself, which keeps
the traffic plain text and readable. Clients that require TLS fail to connect.
The server's side is forwarded unchanged.

Each statement is stored with its ``time.monotonic()`` arrival time, so a test
can count the statements of one replica in one time window, unaffected by
other clients of the same database.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
STATEMENT_MESSAGE_TYPES = (b"Q", b"E")
# Startup packets are small. A longer declared length means the stream is not
# PostgreSQL protocol 3.0, and the proxy drops the connection.
MAX_STARTUP_PACKET_BYTES = 10_000
ACCEPT_POLL_SECONDS = 0.2
JOIN_TIMEOUT_SECONDS = 5.0


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    """Read exactly ``size`` bytes, or return None when the peer closes first."""
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already shut down or never connected
    sock.close()


class StatementCountingProxy:
    """Forward 127.0.0.1:``port`` to a PostgreSQL server and record each statement's time.

    Use it as a context manager; leaving the block closes the listener and
    every proxied connection.
    """

    def __init__(self, upstream_port: int, upstream_host: str = HOST) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(ACCEPT_POLL_SECONDS)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._statement_times: list[float] = []
        self._open_sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="pg-proxy-accept",
                                          daemon=True)

    def __enter__(self) -> Self:
        self._acceptor.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._stopping.set()
        self._acceptor.join(timeout=JOIN_TIMEOUT_SECONDS)
        self._listener.close()
        with self._lock:
            sockets = list(self._open_sockets)
            self._open_sockets.clear()
            threads = list(self._threads)
        for sock in sockets:
            _close(sock)
        for thread in threads:
            thread.join(timeout=JOIN_TIMEOUT_SECONDS)

    def statement_times(self, start: float, end: float) -> list[float]:
        """Return the ``time.monotonic()`` arrival times of statements from ``start`` to ``end``."""
        with self._lock:
            return [at for at in self._statement_times if start <= at <= end]

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            client.settimeout(None)
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                _close(client)
                continue
            # The proxy writes one protocol message at a time. Without TCP_NODELAY, Nagle's
            # algorithm holds back a small write until the previous one is acknowledged.
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open_sockets.update((client, server))
                for target, name in ((self._client_to_server, "pg-proxy-client"),
                                     (self._server_to_client, "pg-proxy-server")):
                    thread = threading.Thread(target=target, args=(client, server), name=name,
                                              daemon=True)
                    self._threads.append(thread)
                    thread.start()

    def _forward_startup(self, client: socket.socket, server: socket.socket) -> bool:
        """Decline TLS and GSS encryption, then forward the startup packet.

        Returns False when the connection should close: the client left, sent
        something other than a startup packet, or sent a CancelRequest.
        """
        while True:
            header = _recv_exact(client, 8)
            if header is None:
                return False
            length = int.from_bytes(header[:4], "big")
            code = int.from_bytes(header[4:], "big")
            if length < 8 or length > MAX_STARTUP_PACKET_BYTES:
                return False
            if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE) and length == 8:
                client.sendall(b"N")
                continue
            rest = _recv_exact(client, length - 8)
            if rest is None:
                return False
            server.sendall(header + rest)
            return code != CANCEL_REQUEST_CODE

    def _client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        try:
            if not self._forward_startup(client, server):
                return
            while True:
                header = _recv_exact(client, 5)
                if header is None:
                    return
                length = int.from_bytes(header[1:], "big")
                body = _recv_exact(client, length - 4) if length > 4 else b""
                if body is None:
                    return
                if header[:1] in STATEMENT_MESSAGE_TYPES:
                    with self._lock:
                        self._statement_times.append(time.monotonic())
                server.sendall(header + body)
        except OSError:
            return
        finally:
            self._hang_up(client, server)

    def _server_to_client(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while True:
                chunk = server.recv(65536)
                if not chunk:
                    return
                client.sendall(chunk)
        except OSError:
            return
        finally:
            self._hang_up(client, server)

    def _hang_up(self, client: socket.socket, server: socket.socket) -> None:
        with self._lock:
            owned = [sock for sock in (client, server) if sock in self._open_sockets]
            self._open_sockets.difference_update(owned)
        for sock in owned:
            _close(sock)
