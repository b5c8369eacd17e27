"""A small CRM stand-in for reverse-proxy tests, served by uvicorn on 127.0.0.1.

Every HTTP request and websocket handshake it receives is appended to
``app.state.requests``, so a test can prove that a request never reached it,
and ``app.state.downloads`` records how many bytes each download produced.
Run it in another process with ``python -m uvicorn --app-dir tests support.upstream:app``.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

CHUNK = b"\0" * (1024 * 1024)

LOGIN_PAGE = (
    "<!doctype html><html><head><title>CRM login</title></head><body>"
    "<form method=\"post\" action=\"/login\"><input name=\"username\">"
    "<input name=\"password\" type=\"password\"><button>Log in</button></form>"
    "<p>Forgot your password?</p></body></html>"
)


def _describe(request: Request, body_size: int) -> dict[str, Any]:
    return {
        "method": request.method,
        "path": request.url.path,
        "raw_path": request.scope.get("raw_path", b"").decode("latin-1"),
        "query": request.scope.get("query_string", b"").decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")]
                    for k, v in request.scope["headers"]],
        "body_size": body_size,
    }


async def echo(request: Request) -> JSONResponse:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
    return JSONResponse(_describe(request, size))


async def upload(request: Request) -> JSONResponse:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
    return JSONResponse({"received": size})


class Download:
    """``GET /public/download?size=N``: N zero bytes, stopping as soon as the client leaves.

    A plain ASGI endpoint, because a streaming response on uvicorn keeps producing
    after a disconnect (uvicorn drops the sends silently), which would hide whether
    the proxy stopped reading.
    """

    def __init__(self, log: list[int]) -> None:
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = dict(pair.split("=", 1) for pair in scope["query_string"].decode().split("&")
                     if "=" in pair)
        size = int(query.get("size", "0"))
        disconnected = asyncio.Event()
        watcher = asyncio.create_task(self._watch(receive, disconnected))
        sent = 0
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(size).encode())]})
            while sent < size and not disconnected.is_set():
                chunk = CHUNK if size - sent >= len(CHUNK) else CHUNK[:size - sent]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
            if not disconnected.is_set():
                await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()
            self.log.append(sent)

    @staticmethod
    async def _watch(receive: Receive, disconnected: asyncio.Event) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected.set()


async def slow(request: Request) -> Response:
    await asyncio.sleep(float(request.query_params.get("seconds", "3")))
    return Response("finally\n", media_type="text/plain")


async def redirect(request: Request) -> RedirectResponse:
    return RedirectResponse("/deals?page=2&sort=name", status_code=302)


async def set_cookies(request: Request) -> Response:
    response = Response("cookies set\n", media_type="text/plain")
    response.set_cookie("crm_sid", "abc123", path="/", httponly=True)
    response.set_cookie("theme", "dark", path="/", max_age=3600)
    return response


async def hop_by_hop(request: Request) -> Response:
    return Response("hop\n", media_type="text/plain", headers={
        "Keep-Alive": "timeout=5", "Connection": "X-Upstream-Hop",
        "X-Upstream-Hop": "secret", "Proxy-Authenticate": "Basic", "X-End-To-End": "kept",
    })


async def login_page(request: Request) -> Response:
    kind = request.query_params.get("kind", "plain")
    if kind == "json":
        return JSONResponse({"login": True})
    if kind == "error":
        return HTMLResponse(LOGIN_PAGE, status_code=500)
    if kind == "no-marker":
        return HTMLResponse("<html><body><p>Maintenance</p></body></html>")
    if kind == "large":
        padding = "<!-- " + "x" * (3 * 1024 * 1024) + " -->"
        return HTMLResponse(padding + LOGIN_PAGE)
    if kind == "forced-gzip":
        return Response(gzip.compress(LOGIN_PAGE.encode()), media_type="text/html",
                        headers={"Content-Encoding": "gzip"})
    if kind == "streamed":
        async def parts() -> AsyncIterator[bytes]:
            for part in (LOGIN_PAGE[:60], LOGIN_PAGE[60:130], LOGIN_PAGE[130:]):
                yield part.encode()

        return StreamingResponse(parts(), media_type="text/html; charset=utf-8")
    return HTMLResponse(LOGIN_PAGE, headers={"ETag": '"login-v1"'})


async def websocket_echo(websocket: WebSocket) -> None:
    await websocket.accept(subprotocol=websocket.scope["subprotocols"][0]
                           if websocket.scope["subprotocols"] else None)
    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in websocket.scope["headers"]]
    await websocket.send_json({"path": websocket.url.path, "headers": headers})
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "close please":
            await websocket.close(code=4321, reason="asked to close")
            return
        if message.get("text") is not None:
            await websocket.send_text("echo: " + message["text"])
        elif message.get("bytes") is not None:
            await websocket.send_bytes(message["bytes"][::-1])


async def websocket_refuse(websocket: WebSocket) -> None:
    await websocket.close(code=1008)


class RecordRequests:
    """Append each request's method, path and raw path to ``app.state.requests``."""

    def __init__(self, app: ASGIApp, log: list[dict[str, str]]) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            self.log.append({"type": scope["type"], "method": scope.get("method", "GET"),
                             "path": scope["path"],
                             "raw_path": scope.get("raw_path", b"").decode("latin-1")})
        await self.app(scope, receive, send)


def build_app() -> Starlette:
    requests: list[dict[str, str]] = []
    downloads: list[int] = []
    app = Starlette(
        routes=[
            Route("/public/upload", upload, methods=["POST", "PUT"]),
            Route("/public/download", Download(downloads)),
            Route("/public/slow", slow),
            Route("/public/redirect", redirect),
            Route("/public/cookies", set_cookies),
            Route("/public/hop", hop_by_hop),
            Route("/login", login_page),
            WebSocketRoute("/ws", websocket_echo),
            WebSocketRoute("/ws-refused", websocket_refuse),
            Route("/{path:path}", echo,
                  methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
        ],
        middleware=[Middleware(RecordRequests, log=requests),
                    Middleware(GZipMiddleware, minimum_size=16)],
    )
    app.state.requests = requests
    # Bytes each download sent before it finished or the client left.
    app.state.downloads = downloads
    return app


app = build_app()
