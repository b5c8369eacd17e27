"""Sign-in links on the CRM's own login page (``access.login_page_path``, off by default).

For a GET to that path, the app's response is held back and, when it is a
``200`` ``text/html`` page without a content encoding, one link per provider
to ``/oauth2/start?provider=ID`` is inserted after the first occurrence of
``access.login_page_marker`` (compared case-insensitively) and
``Content-Length`` is recomputed. The request asks the app for an
uncompressed response (``Accept-Encoding: identity``). A compressed response,
a page without the marker, or one larger than :data:`MAX_BUFFERED_BODY` passes
through unchanged. Only that one path is ever held in memory.
"""

from __future__ import annotations

import html
from urllib.parse import urlencode

from starlette.types import Message, Scope, Send

from .guard import Guard
from .headers import header_value
from .paths import AmbiguousPath, normalise_path

MAX_BUFFERED_BODY = 2 * 1024 * 1024
# Set on a scope whose send is already wrapped, so the middleware and the proxy wrap it once.
SCOPE_KEY = "moko_guard.login_page"
# A changed body no longer matches validators computed over the original one.
VALIDATOR_HEADERS = frozenset({b"content-length", b"etag", b"content-md5", b"digest"})


def login_links_html(guard: Guard) -> bytes:
    """Build the HTML inserted into the login page: one link per configured provider.

    The markup carries class names but no inline style or script, so a strict
    Content-Security-Policy on the CRM's page still allows it. Non-ASCII
    characters become character references, so the bytes fit any ASCII-based
    page encoding.
    """
    items = []
    for provider_id, provider in guard.providers.items():
        href = f"{guard.prefix}/start?{urlencode({'provider': provider_id})}"
        items.append(f'<li><a class="moko-guard-sign-in-link" href="{html.escape(href)}">'
                     f"{html.escape(provider.name)}</a></li>")
    markup = ('<div class="moko-guard-sign-in"><p>Sign in with single sign-on:</p><ul>'
              + "".join(items) + "</ul></div>")
    return markup.encode("ascii", errors="xmlcharrefreplace")


def _is_login_page(guard: Guard, scope: Scope) -> bool:
    login_path = guard.settings.access.login_page_path
    if login_path is None or scope["type"] != "http" or scope.get("method") != "GET":
        return False
    raw_path = scope.get("raw_path") or scope.get("path", "/").encode("utf-8")
    try:
        path = normalise_path(raw_path.decode("latin-1"))
    except AmbiguousPath:
        return False
    return path.rstrip("/") == login_path.rstrip("/")


def wrap_login_page(guard: Guard, scope: Scope, send: Send) -> tuple[Scope, Send]:
    """Return the scope and send to use: wrapped for the login page, unchanged otherwise."""
    if guard.settings.access.login_page_path is None:
        # Off by default: every request of the guard and the proxy passes here.
        return scope, send
    if scope.get(SCOPE_KEY) or not _is_login_page(guard, scope):
        return scope, send
    scope = dict(scope)
    scope[SCOPE_KEY] = True
    scope["headers"] = [(key, value) for key, value in scope.get("headers", [])
                        if key.lower() != b"accept-encoding"]
    scope["headers"].append((b"accept-encoding", b"identity"))
    marker = guard.settings.access.login_page_marker.encode("utf-8")
    return scope, LoginLinksInjector(send, marker, login_links_html(guard)).send


class LoginLinksInjector:
    """A wrapper around ASGI ``send`` that inserts ``snippet`` after ``marker``."""

    def __init__(self, send: Send, marker: bytes, snippet: bytes) -> None:
        self.downstream = send
        self.marker = marker.lower()
        self.snippet = snippet
        self.start: Message | None = None
        self.body = bytearray()
        self.passing_through = False

    async def send(self, message: Message) -> None:
        if self.passing_through:
            await self.downstream(message)
        elif message["type"] == "http.response.start":
            self._hold_start(message)
            if self.passing_through:
                await self.downstream(message)
        elif message["type"] == "http.response.body" and self.start is not None:
            await self._buffer(message)
        else:
            await self._pass_through()
            await self.downstream(message)

    def _hold_start(self, message: Message) -> None:
        headers = message.get("headers", [])
        content_type = (header_value(headers, b"content-type") or "").lower()
        encoding = (header_value(headers, b"content-encoding") or "identity").strip().lower()
        if (message.get("status") != 200 or not content_type.startswith("text/html")
                or encoding != "identity"):
            self.passing_through = True
            return
        self.start = message

    async def _buffer(self, message: Message) -> None:
        self.body += message.get("body", b"")
        if len(self.body) > MAX_BUFFERED_BODY:
            await self._pass_through(more_body=message.get("more_body", False))
            return
        if message.get("more_body", False):
            return
        await self._send_injected()

    async def _pass_through(self, *, more_body: bool = False) -> None:
        """Send what is held back unchanged; everything after it goes straight through."""
        self.passing_through = True
        if self.start is None:
            return
        await self.downstream(self.start)
        await self.downstream({"type": "http.response.body", "body": bytes(self.body),
                               "more_body": more_body})
        self.body.clear()

    async def _send_injected(self) -> None:
        body = bytes(self.body)
        position = body.lower().find(self.marker)
        if self.start is None or position < 0:
            await self._pass_through()
            return
        end = position + len(self.marker)
        body = body[:end] + self.snippet + body[end:]
        headers = [(key, value) for key, value in self.start.get("headers", [])
                   if key.lower() not in VALIDATOR_HEADERS]
        headers.append((b"content-length", str(len(body)).encode("ascii")))
        self.passing_through = True
        await self.downstream({**self.start, "headers": headers})
        await self.downstream({"type": "http.response.body", "body": body, "more_body": False})
