"""The standalone server: forward-auth for nginx ``auth_request`` and health checks."""

from __future__ import annotations

import ipaddress
import json
import logging
import os

from starlette.types import ASGIApp, Receive, Scope, Send

from .config import Settings
from .forwarding import is_trusted
from .guard import Guard
from .metrics import CONTENT_TYPE_LATEST
from .middleware import GuardMiddleware

logger = logging.getLogger(__name__)


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    body = b"moko-guard: this path is not served here (forward-auth mode)\n"
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class GuardServer:
    """Health and readiness endpoints in front of the guarded app."""

    def __init__(self, guard: Guard, app: ASGIApp) -> None:
        self.guard = guard
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "http" and scope.get("path") in ("/healthz", "/readyz"):
            await self._health(scope, send)
            return
        if scope["type"] == "http" and scope.get("path") == "/metrics":
            if self._may_scrape(scope):
                await self._metrics(send)
            else:
                await _not_found(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Start and stop the guard; the inner apps (404 page, proxy) need no lifespan."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.guard.startup()
                except Exception as exc:  # noqa: BLE001 - reported to the server, which exits
                    logger.exception("startup_failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.guard.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _may_scrape(self, scope: Scope) -> bool:
        """Metrics go to loopback and the trusted proxies only, never to the open network."""
        client = scope.get("client")
        peer = client[0] if client else None
        if peer is None:
            return False
        try:
            if ipaddress.ip_address(peer).is_loopback:
                return True
        except ValueError:
            return False
        return is_trusted(peer, self.guard.settings.server.trusted_proxies)

    async def _metrics(self, send: Send) -> None:
        body = self.guard.metrics.render()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                (b"cache-control", b"no-store"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _health(self, scope: Scope, send: Send) -> None:
        if scope["path"] == "/healthz":
            status, payload = 200, {"status": "ok"}
        else:
            await self.guard.ensure_started()
            checks = await self.guard.readiness()
            ready = all(checks.values())
            status, payload = (200 if ready else 503), {"ready": ready, "checks": checks}
        body = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"cache-control", b"no-store"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings, *, guard: Guard | None = None,
               config_path: str | None = None) -> GuardServer:
    """Build the ASGI app that ``moko-guard serve`` runs."""
    guard = guard or Guard(settings, config_path=config_path)
    inner: ASGIApp = _not_found
    if settings.server.upstream:
        from .proxy import ProxyApp

        inner = ProxyApp(settings.server.upstream, guard)
    return GuardServer(guard, GuardMiddleware(inner, guard=guard))


def app_from_environment() -> GuardServer:
    """Build the app from ``MOKO_GUARD_CONFIG`` (each ``serve --workers`` process calls this)."""
    from .config import load_settings
    from .logs import configure_logging

    settings = load_settings()
    configure_logging(settings.logging.level, settings.logging.format)
    return create_app(settings, config_path=os.environ.get("MOKO_GUARD_CONFIG"))
