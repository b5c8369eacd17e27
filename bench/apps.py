"""ASGI app factories that the benchmark runs under uvicorn (``apps:<name> --factory``).

The guard's settings come from the TOML file named by ``MOKO_BENCH_CONFIG``.
Servers run with ``--lifespan off``: the guard opens its store on the first
request (``Guard.ensure_started``), and the benchmark creates the schema
before any server starts, so several workers never migrate at once.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from moko_guard import GuardMiddleware, load_settings
from moko_guard.demo.provider import DemoProvider
from moko_guard.server import create_app

# Static stand-ins for the identity headers, so the bare 202 response is about
# as long as the guard's.
STAND_IN_IDENTITY = {
    "Cache-Control": "no-store",
    "X-Auth-Request-User": "user0@example.com",
    "X-Auth-Request-Email": "user0@example.com",
    "X-Auth-Request-Roles": "user",
    "X-Auth-Request-Provider": "demo",
    "X-Auth-Request-Preferred-Username": "user0",
}


def _settings_path() -> str:
    path = os.environ.get("MOKO_BENCH_CONFIG")
    if not path:
        raise RuntimeError("MOKO_BENCH_CONFIG is not set: it must name the guard's TOML file")
    return path


async def _ok(_request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def _accepted(_request: Request) -> Response:
    return Response(status_code=202, headers=STAND_IN_IDENTITY)


def plain_app() -> ASGIApp:
    """Return a Starlette app whose ``GET /`` returns 200 ``ok``: the app without a guard."""
    return Starlette(routes=[Route("/", _ok, methods=["GET", "HEAD"])])


def guarded_app() -> ASGIApp:
    """Return ``plain_app`` wrapped in GuardMiddleware."""
    return GuardMiddleware(plain_app(), load_settings(_settings_path()))


def bare_auth_app() -> ASGIApp:
    """Return a Starlette app whose ``/oauth2/auth`` returns 202 with fixed identity headers."""
    return Starlette(routes=[Route("/oauth2/auth", _accepted, methods=["GET", "HEAD"])])


def guard_server() -> ASGIApp:
    """Return the app of ``moko-guard serve``: forward-auth, or reverse proxy when upstream is set."""
    return create_app(load_settings(_settings_path()))


def demo_provider() -> ASGIApp:
    """Return the demo OpenID Connect provider, configured from MOKO_BENCH_PROVIDER_* variables."""
    provider = DemoProvider(
        issuer=os.environ["MOKO_BENCH_PROVIDER_ISSUER"],
        client_id=os.environ["MOKO_BENCH_PROVIDER_CLIENT_ID"],
        client_secret=os.environ["MOKO_BENCH_PROVIDER_CLIENT_SECRET"],
        redirect_uri=os.environ["MOKO_BENCH_PROVIDER_REDIRECT_URI"],
    )
    return provider.app()
