"""The guard in reverse-proxy mode under uvicorn on 127.0.0.1, in front of the test upstream.

The guard runs in the test's event loop and reaches the fake provider through
respx, so a test can sign in over real HTTP and then talk to the upstream
through the proxy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import respx

from moko_guard import Guard, Settings, create_app
from support.fake_idp import FakeIdp
from support.loopback import HOST, LoopbackServer
from support.upstream import build_app


class Upstream:
    """The test upstream under uvicorn, with the log of every request it received."""

    def __init__(self, server: LoopbackServer, requests: list[dict[str, str]],
                 downloads: list[int]) -> None:
        self.server = server
        self.requests = requests
        self.downloads = downloads

    @property
    def url(self) -> str:
        return self.server.url

    def paths(self) -> list[str]:
        return [entry["path"] for entry in self.requests]


@asynccontextmanager
async def running_upstream() -> AsyncIterator[Upstream]:
    app = build_app()
    async with LoopbackServer(app) as server:
        yield Upstream(server, app.state.requests, app.state.downloads)


class ProxyStack:
    """A guard in reverse-proxy mode, a client pointed at it, and the fake provider."""

    def __init__(self, guard: Guard, server: LoopbackServer, client: httpx.AsyncClient,
                 idp: FakeIdp) -> None:
        self.guard = guard
        self.server = server
        self.client = client
        self.idp = idp

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    async def sign_in(self, client: httpx.AsyncClient | None = None) -> str:
        """Sign in through the fake provider and return the session cookie value."""
        client = client or self.client
        start = await client.get("/oauth2/start", params={"provider": "idp", "rd": "/deals"})
        assert start.status_code == 302, start.text
        params = self.idp.remember_nonce(start.headers["location"])
        callback = await client.get("/oauth2/callback",
                                    params={"code": "code-1", "state": params["state"]})
        assert callback.status_code == 302, callback.text
        cookie = client.cookies.get(self.guard.settings.session.cookie_name)
        assert cookie, "the callback set no session cookie"
        return cookie


def proxy_settings(make_settings: Callable[..., Settings], listener: LoopbackServer,
                   upstream_url: str, **overrides: Any) -> Settings:
    """Build settings for a guard on plain http at ``listener``, proxying to ``upstream_url``."""
    server_settings = {
        "public_url": f"http://{HOST}:{listener.port}", "enforce_https": False,
        "insecure_allow_http": True, "upstream": upstream_url,
        **overrides.pop("server", {}),
    }
    return make_settings(server=server_settings, **overrides)


@asynccontextmanager
async def running_proxy(make_settings: Callable[..., Settings], idp: FakeIdp,
                        idp_router: respx.Router, upstream_url: str,
                        **overrides: Any) -> AsyncIterator[ProxyStack]:
    """Start the guard in reverse-proxy mode; ``overrides`` go to ``make_settings``."""
    server = LoopbackServer()
    settings = proxy_settings(make_settings, server, upstream_url, **overrides)
    provider_http = httpx.AsyncClient(transport=httpx.MockTransport(idp_router.handler))
    guard = Guard(settings, http_client=provider_http)
    server.app = create_app(settings, guard=guard)
    try:
        async with server, httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            yield ProxyStack(guard, server, client, idp)
    finally:
        await provider_http.aclose()
