"""``moko-guard demo``: the sample CRM behind the guard, with a local demo provider.

Everything listens on 127.0.0.1 only and keeps its data in a temporary folder
that is removed on exit.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import secrets
import signal
import socket
import sys
import tempfile
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from ..config import Settings, settings_from_mapping
from ..middleware import GuardMiddleware
from .provider import DemoProvider

logger = logging.getLogger(__name__)

DEMO_HOST = "127.0.0.1"
DEMO_CLIENT_ID = "moko-demo"
DEMO_EMAIL_DOMAIN = "example.com"
# Signing in with this address gives the admin role, so the admin page can be tried.
DEMO_ADMIN_EMAIL = f"admin@{DEMO_EMAIL_DOMAIN}"
SAMPLE_CRM_PATH = Path(__file__).resolve().parents[2] / "examples" / "sample_crm.py"


def load_sample_crm(path: Path = SAMPLE_CRM_PATH) -> ASGIApp:
    """Import ``examples/sample_crm.py`` from the source checkout and return its ``app``."""
    if not path.is_file():
        raise FileNotFoundError(
            f"sample CRM not found at {path}: run the demo from a source checkout "
            "(pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location("moko_guard_sample_crm", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app: ASGIApp = module.app
    return app


def demo_settings(port: int, provider_port: int, data_dir: Path, client_secret: str) -> Settings:
    return settings_from_mapping({
        "server": {
            "public_url": f"http://{DEMO_HOST}:{port}",
            "enforce_https": False,
            "insecure_allow_http": True,
        },
        "session": {"secrets": [secrets.token_urlsafe(48)], "lifetime": "8h"},
        "store": {"url": f"sqlite:///{data_dir / 'guard.db'}"},
        "access": {
            "auto_provision": True,
            "provision_email_domains": [DEMO_EMAIL_DOMAIN],
            "default_roles": ["user"],
            "public_paths": ["/static/"],
        },
        "providers": [{
            "id": "demo",
            "type": "oidc",
            "name": "Demo provider",
            "issuer": f"http://{DEMO_HOST}:{provider_port}",
            "insecure_allow_http_issuer": True,
            "client_id": DEMO_CLIENT_ID,
            "client_secret": client_secret,
            "id_token_algorithms": ["RS256"],
        }],
    })


class DemoStartError(Exception):
    """The demo cannot start, for a reason a person can fix."""


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((DEMO_HOST, port))
    except OSError as exc:
        sock.close()
        raise DemoStartError(
            f"port {port} on {DEMO_HOST} is not free ({exc.strerror}): "
            "choose others with --port and --provider-port"
        ) from None
    return sock


async def create_demo_admin(crm: GuardMiddleware) -> None:
    """Create the demo's admin user, tied to the subject the demo provider gives its address."""
    await crm.guard.store.create_user_with_identity(
        username=DEMO_ADMIN_EMAIL, email=DEMO_ADMIN_EMAIL, display_name="Demo admin",
        roles=["user", "admin"], provider="demo", subject=DemoProvider.subject_of(DEMO_ADMIN_EMAIL),
        identity_email=DEMO_ADMIN_EMAIL,
    )


async def _serve(port: int, provider_port: int, data_dir: Path) -> None:
    client_secret = secrets.token_urlsafe(32)
    settings = demo_settings(port, provider_port, data_dir, client_secret)
    provider = DemoProvider(
        issuer=f"http://{DEMO_HOST}:{provider_port}", client_id=DEMO_CLIENT_ID,
        client_secret=client_secret, redirect_uri=settings.server.redirect_uri,
        email_domain=DEMO_EMAIL_DOMAIN,
    )
    crm = GuardMiddleware(load_sample_crm(), settings)
    servers = [
        uvicorn.Server(uvicorn.Config(provider.app(), host=DEMO_HOST, port=provider_port,
                                      log_level="warning", lifespan="off")),
        uvicorn.Server(uvicorn.Config(crm, host=DEMO_HOST, port=port, log_level="warning",
                                      lifespan="on")),
    ]
    sockets = [_bind(provider_port), _bind(port)]
    tasks = [asyncio.create_task(server.serve(sockets=[sock]))
             for server, sock in zip(servers, sockets, strict=True)]
    while not all(server.started for server in servers):
        if any(task.done() for task in tasks):
            break
        await asyncio.sleep(0.05)
    if all(server.started for server in servers):
        await create_demo_admin(crm)
        print(f"moko_guard demo is running. Open http://{DEMO_HOST}:{port}/ in a browser.")
        print(f"Sign in with any email at {DEMO_EMAIL_DOMAIN} on the demo provider "
              f"(http://{DEMO_HOST}:{provider_port}); {DEMO_ADMIN_EMAIL} also opens the "
              f"admin page at http://{DEMO_HOST}:{port}/oauth2/admin. Press Ctrl+C to stop.",
              flush=True)
    done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(port: int = 4180, provider_port: int = 4190) -> int:
    for value in (port, provider_port):
        if not 1 <= value <= 65535:
            print(f"invalid port {value}: use a number from 1 to 65535", file=sys.stderr)
            return 2
    # uvicorn re-raises SIGTERM after its own shutdown; turning it into
    # KeyboardInterrupt here lets the temporary folder be removed.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="moko-guard-demo-") as folder:
        try:
            asyncio.run(_serve(port, provider_port, Path(folder)))
        except KeyboardInterrupt:
            pass
        except DemoStartError as exc:
            print(f"demo failed to start: {exc}", file=sys.stderr)
            return 1
    return 0
