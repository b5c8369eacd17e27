"""Shared fixtures: settings, a guard wired to the fake provider, and an app behind it."""

from __future__ import annotations

import copy
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from moko_guard import Guard, GuardMiddleware, Settings, settings_from_mapping
from support.fake_idp import CLIENT_ID, CLIENT_SECRET, ISSUER, FakeIdp

PUBLIC_URL = "https://crm.example.com"
SESSION_SECRET = "s" * 48


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def base_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "server": {"public_url": PUBLIC_URL, "trusted_proxies": ["127.0.0.2/32"]},
        "session": {"secrets": [SESSION_SECRET], "lifetime": "8h"},
        "store": {"url": f"sqlite:///{tmp_path / 'guard.db'}"},
        "access": {
            "auto_provision": True,
            "provision_email_domains": ["example.com"],
            "default_roles": ["user"],
            "allowed_redirect_hosts": [".example.com"],
            "public_paths": ["/public/", "/healthz"],
        },
        "providers": [{
            "id": "idp", "type": "oidc", "name": "Example IdP", "issuer": ISSUER,
            "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
            "id_token_algorithms": ["RS256"],
        }],
    }


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return settings_from_mapping(merge(base_config(tmp_path), overrides))

    return factory


@pytest.fixture
def idp() -> FakeIdp:
    return FakeIdp()


@pytest.fixture
def idp_router(idp: FakeIdp) -> respx.Router:
    router = respx.Router(assert_all_called=False)
    idp.install(router)
    return router


async def echo(request: Request) -> JSONResponse:
    principal = request.scope.get("moko_guard.principal")
    return JSONResponse({
        "path": request.url.path,
        "headers": dict(request.headers),
        "user": principal.username if principal else None,
    })


def echo_app() -> Starlette:
    return Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])


class GuardHarness:
    """A guarded echo app, the guard itself and the fake provider, for one test."""

    def __init__(self, guard: Guard, client: httpx.AsyncClient, idp: FakeIdp) -> None:
        self.guard = guard
        self.client = client
        self.idp = idp

    async def start_login(self, rd: str = "/deals") -> tuple[httpx.Response, dict[str, str]]:
        response = await self.client.get("/oauth2/start", params={"provider": "idp", "rd": rd})
        assert response.status_code == 302, response.text
        params = self.idp.remember_nonce(response.headers["location"])
        return response, params

    async def sign_in(self, rd: str = "/deals") -> httpx.Response:
        _, params = await self.start_login(rd)
        return await self.client.get(
            "/oauth2/callback", params={"code": "code-1", "state": params["state"]}
        )

    async def audit_reasons(self) -> list[str | None]:
        from moko_guard.store import AuditFilter

        records = await self.guard.store.list_audit(AuditFilter(limit=1000))
        return [r.reason for r in records if r.event == "login.failure"]


@pytest.fixture
async def make_harness(
    make_settings: Callable[..., Settings], idp: FakeIdp, idp_router: respx.Router
) -> AsyncIterator[Callable[..., Any]]:
    created: list[GuardHarness] = []

    async def factory(**overrides: Any) -> GuardHarness:
        settings = make_settings(**overrides)
        http = httpx.AsyncClient(transport=httpx.MockTransport(idp_router.handler))
        guard = Guard(settings, http_client=http)
        app = GuardMiddleware(echo_app(), guard=guard)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 40000)),
            base_url=PUBLIC_URL,
        )
        harness = GuardHarness(guard, client, idp)
        created.append(harness)
        return harness

    yield factory
    for harness in created:
        await harness.client.aclose()
        await harness.guard.shutdown()
        await harness.guard.http.aclose()


@pytest.fixture
async def harness(make_harness: Callable[..., Any]) -> GuardHarness:
    result: GuardHarness = await make_harness()
    return result


def page_reason(response: httpx.Response) -> str | None:
    match = re.search(r'data-reason="([^"]+)"', response.text)
    return match.group(1) if match else None
