"""A tiny stand-in CRM for the demo and the examples.

It trusts the identity headers the guard sets, because the guard removes any
client-sent copy before the request reaches it. Run it alone only behind the
guard: ``moko-guard demo`` does that.
"""

from __future__ import annotations

from html import escape

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

DEALS = [
    ("Acme Corp", "Renewal 2027", "12,400 EUR"),
    ("Globex", "New licences", "8,900 EUR"),
    ("Initech", "Support upgrade", "3,150 EUR"),
]


async def home(request: Request) -> HTMLResponse:
    user = request.headers.get("x-auth-request-user", "")
    email = request.headers.get("x-auth-request-email", "")
    roles = request.headers.get("x-auth-request-roles", "")
    rows = "".join(
        f"<tr><td>{escape(a)}</td><td>{escape(b)}</td><td>{escape(c)}</td></tr>" for a, b, c in DEALS
    )
    html = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="color-scheme" content="light dark"><title>Sample CRM</title>
<style>body{{font:16px system-ui,sans-serif;max-width:720px;margin:5vh auto;padding:0 16px}}
table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #8886;padding:8px;text-align:left}}</style>
</head><body><h1>Sample CRM</h1>
<p id="signed-in-user">Signed in as <strong>{escape(user)}</strong> ({escape(email)}), roles: {escape(roles)}</p>
<p><a href="/oauth2/sign_out">Sign out</a></p>
<table><tr><th>Customer</th><th>Deal</th><th>Value</th></tr>{rows}</table></body></html>"""
    return HTMLResponse(html)


async def whoami(request: Request) -> JSONResponse:
    """Echo every request header, so tests can see what reached the app."""
    return JSONResponse({"headers": {k: v for k, v in request.headers.items()}})


app = Starlette(routes=[Route("/", home), Route("/deals", home), Route("/api/whoami", whoami)])
