"""The upstream CRM of the end-to-end tests, as uvicorn factories.

``create_crm`` is examples/sample_crm.py's app plus ``/api/echo/...``, which
answers any method with the request as the CRM received it: every header as a
``[name, value]`` pair (so a forged duplicate cannot hide behind the real one),
the cookies, and the body's length and SHA-256. ``create_guarded_crm`` wraps
that app in GuardMiddleware with the settings file named by MOKO_GUARD_CONFIG.

Run with ``uvicorn --factory support.crm_apps:create_crm --app-dir tests``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

SAMPLE_CRM_PATH = Path(__file__).resolve().parents[2] / "examples" / "sample_crm.py"
ECHO_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


def _sample_crm() -> ASGIApp:
    spec = importlib.util.spec_from_file_location("moko_e2e_sample_crm", SAMPLE_CRM_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {SAMPLE_CRM_PATH}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app: ASGIApp = module.app
    return app


async def echo(request: Request) -> JSONResponse:
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.stream():
        digest.update(chunk)
        length += len(chunk)
    return JSONResponse({
        "method": request.method,
        "raw_path": request.scope.get("raw_path", b"").decode("latin-1"),
        "query": request.scope.get("query_string", b"").decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]],
        "cookies": dict(request.cookies),
        "body_length": length,
        "body_sha256": digest.hexdigest(),
    })


def create_crm() -> Starlette:
    return Starlette(routes=[
        Route("/api/echo/{path:path}", echo, methods=ECHO_METHODS),
        Mount("/", app=_sample_crm()),
    ])


def create_guarded_crm() -> ASGIApp:
    from moko_guard import GuardMiddleware, load_settings

    guarded: ASGIApp = GuardMiddleware(create_crm(), load_settings())
    return guarded
