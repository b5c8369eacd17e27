"""Run moko_guard in a product slot of the anchor harness (Apache + mod_auth_openidc beside it).

    python bench/anchor_slot.py middleware      # slot 9401: GuardMiddleware around /app/ok.txt
    python bench/anchor_slot.py forward-auth    # slot 9405: forward-auth behind the harness's nginx

The harness starts this command with MOKO_PORT, MOKO_OIDC_ISSUER,
MOKO_OIDC_CLIENT_ID and MOKO_OIDC_CLIENT_SECRET in the environment (and
MOKO_BENCH_STATE, its state folder). The process stays in the foreground on
127.0.0.1:MOKO_PORT until it gets SIGTERM. Config, SQLite store and session
secret are made fresh in a temporary folder under the state folder.

Where the slot contract and moko_guard's endpoints differ, a thin ASGI adapter
here bridges them without changing moko_guard:

* forward-auth: the harness's nginx requests ``GET /auth``, but moko_guard
  serves ``/oauth2/auth``. The adapter serves ``/auth`` with ``/oauth2/auth``.
* forward-auth: nginx sends a 401 to ``/oauth2/start?rd=URI`` without a
  provider; moko_guard's start needs ``provider=ID``. The adapter adds the one
  configured provider.
* middleware: the harness's login script expects an unauthenticated browser
  request to be redirected to the provider directly, as mod_auth_openidc does.
  moko_guard redirects to its own sign-in page first, so the adapter replaces
  that redirect with the response of ``/oauth2/start`` for the one provider.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moko_guard import GuardMiddleware, load_settings
from moko_guard.server import create_app

PROVIDER_ID = "anchor"
# The harness's nginx for the forward-auth slot listens here and proxies /oauth2/* to the slot.
FORWARD_AUTH_PUBLIC_URL = "http://127.0.0.1:9404"


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"anchor_slot: environment variable {name} is missing; "
                         "the anchor harness sets it when it starts a product slot")
    return value


def write_config(folder: Path, public_url: str) -> Path:
    """Write the guard's config for the harness's provider; secrets stay in the environment."""
    os.environ["MOKO_SLOT_SESSION_SECRET"] = secrets.token_urlsafe(48)
    os.environ["MOKO_SLOT_CLIENT_SECRET"] = _required("MOKO_OIDC_CLIENT_SECRET")
    path = folder / "moko-guard.toml"
    path.write_text(f"""\
[server]
public_url = "{public_url}"
enforce_https = false
insecure_allow_http = true
trusted_proxies = ["127.0.0.1/32"]

[session]
secrets = ["env:MOKO_SLOT_SESSION_SECRET"]
lifetime = "8h"

[store]
url = "sqlite:///{folder / 'guard.db'}"

[access]
auto_provision = true
provision_email_domains = ["example.com"]
default_roles = ["user"]

[[providers]]
id = "{PROVIDER_ID}"
type = "oidc"
name = "Anchor provider"
issuer = "{_required('MOKO_OIDC_ISSUER')}"
insecure_allow_http_issuer = true
client_id = "{_required('MOKO_OIDC_CLIENT_ID')}"
client_secret = "env:MOKO_SLOT_CLIENT_SECRET"
id_token_algorithms = ["RS256"]
""")
    return path


def _with_provider(query_string: bytes) -> bytes:
    params = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    if not any(key == "provider" for key, _ in params):
        params.insert(0, ("provider", PROVIDER_ID))
    return urlencode(params).encode("latin-1")


class ForwardAuthSlot:
    """Serve the slot's ``/auth`` with ``/oauth2/auth`` and default ``/oauth2/start`` to the provider."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["path"] == "/auth":
                path = f"{self.prefix}/auth"
                scope = {**scope, "path": path, "raw_path": path.encode()}
            elif scope["path"] == f"{self.prefix}/start":
                scope = {**scope, "query_string": _with_provider(scope.get("query_string", b""))}
        await self.app(scope, receive, send)


class DirectSignInSlot:
    """Turn the middleware's redirect to the sign-in page into the provider's redirect."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.sign_in = f"{prefix}/sign_in?".encode()
        self.start = f"{prefix}/start"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sign_in_query: list[bytes] = []

        async def intercept(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 302:
                location = dict(message.get("headers", [])).get(b"location", b"")
                if location.startswith(self.sign_in):
                    sign_in_query.append(location[len(self.sign_in):])
                    return
            if sign_in_query:
                return  # the body of the swallowed redirect
            await send(message)

        await self.app(scope, receive, intercept)
        if sign_in_query:
            start_scope = {**scope, "path": self.start, "raw_path": self.start.encode(),
                           "query_string": _with_provider(sign_in_query[0])}
            await self.app(start_scope, receive, send)


async def _ok(_request: Request) -> Response:
    return PlainTextResponse("ok\n")


def build_app(mode: str, folder: Path, port: int) -> ASGIApp:
    if mode == "forward-auth":
        public_url = os.environ.get("MOKO_PUBLIC_URL", FORWARD_AUTH_PUBLIC_URL)
        settings = load_settings(str(write_config(folder, public_url)))
        return ForwardAuthSlot(create_app(settings), settings.server.prefix)
    settings = load_settings(str(write_config(folder, f"http://127.0.0.1:{port}")))
    crm = Starlette(routes=[Route("/app/ok.txt", _ok, methods=["GET", "HEAD"])])
    return DirectSignInSlot(GuardMiddleware(crm, settings), settings.server.prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["middleware", "forward-auth"])
    args = parser.parse_args(argv)
    port = int(_required("MOKO_PORT"))
    state = Path(os.environ.get("MOKO_BENCH_STATE", tempfile.gettempdir()))
    state.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"moko-guard-{args.mode}-", dir=state) as folder:
        app = build_app(args.mode, Path(folder), port)
        # Lifespan is off because, in forward-auth mode, the app's lifespan start fails:
        # GuardMiddleware passes the lifespan scope to a 404 app. The guard starts on the
        # first request instead.
        uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                    access_log=False, server_header=False, proxy_headers=False, lifespan="off",
                    log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
