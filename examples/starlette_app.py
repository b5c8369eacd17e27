"""A Starlette CRM behind GuardMiddleware: the middleware mode in one file.

Run it from the repository root with a guard config file (README.md,
"Configuration"), whose server.public_url is the address people open:

    MOKO_GUARD_CONFIG=/etc/moko-guard.toml uvicorn examples.starlette_app:app --port 4180

The settings are read when this module is imported, so a missing or invalid
config file stops uvicorn at start with the guard's error message. Each request
passes the guard first: the routes below run only for a signed-in user (or a
public path), and read the user from the request scope.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from moko_guard import PRINCIPAL_SCOPE_KEY, GuardMiddleware, Principal, load_settings


def signed_in_user(request: Request) -> Principal | None:
    """Return the user the guard let in, or None on a public path."""
    principal: Principal | None = request.scope.get(PRINCIPAL_SCOPE_KEY)
    return principal


async def home(request: Request) -> PlainTextResponse:
    user = signed_in_user(request)
    name = user.username if user else "nobody (public path)"
    return PlainTextResponse(f"Deals of {name}\n")


async def me(request: Request) -> JSONResponse:
    user = signed_in_user(request)
    return JSONResponse(user.to_json() if user else None)


crm = Starlette(routes=[Route("/", home), Route("/api/me", me)])

# load_settings() reads the file named by MOKO_GUARD_CONFIG (default: moko-guard.toml).
app = GuardMiddleware(crm, load_settings())
