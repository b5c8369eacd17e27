"""GuardMiddleware: a pure ASGI middleware for http and websocket scopes.

For each request: the guard's own endpoints are served here; client-sent
identity headers are removed; public paths pass; a signed-in user passes with
identity headers and ``scope["moko_guard.principal"]``; anyone else gets a
302 to the sign-in page (browsers), a 401 JSON body (API clients) or a
refused handshake (websockets). The decision is made from headers alone,
before the request body is read.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import quote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings
from .audit import AuditEvent
from .bearer import BearerAuth, BearerRejected
from .guard import AccessResult, Guard, _is_api_client
from .inject import wrap_login_page
from .web import message_page
from .headers import header_value

logger = logging.getLogger(__name__)

PRINCIPAL_SCOPE_KEY = "moko_guard.principal"


class GuardMiddleware:
    """Wrap an ASGI app so every request passes the guard first."""

    def __init__(self, app: ASGIApp, settings: Settings | None = None, *,
                 guard: Guard | None = None) -> None:
        if guard is None:
            if settings is None:
                raise TypeError("GuardMiddleware needs settings or a guard")
            guard = Guard(settings)
        self.app = app
        self.guard = guard
        self.bearer = BearerAuth(guard)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        guard = self.guard
        if not guard.started:
            await guard.ensure_started()
        if scope["type"] == "http" and scope["path"] == guard.auth_path:
            await guard.auth(scope, receive, send)
            return
        if guard.settings.server.enforce_https:
            info = guard.info(scope)
            send = self._with_security_headers(scope, send, info.scheme)
            redirect = self._https_redirect(scope, info.scheme, info.host)
            if redirect is not None:
                await redirect(scope, receive, send)
                return

        if scope["type"] == "http" and guard.handles(scope.get("path", "")):
            await guard.router(scope, receive, send)
            return

        scope = dict(scope)
        result = guard.access(scope)
        if self.bearer.applies(scope, result):
            try:
                result = await self.bearer.authenticate(scope, result)
            except BearerRejected as rejection:
                await rejection.respond(scope, send)
                return
        scope["headers"] = guard.identity_headers.strip_request(
            scope.get("headers", []), guard.settings.session.cookie_name
        )
        scope, send = wrap_login_page(guard, scope, send)
        await self._dispatch(result, scope, receive, send)

    async def _dispatch(self, result: AccessResult, scope: Scope, receive: Receive,
                        send: Send) -> None:
        if result.decision == "allow" and result.principal is not None:
            scope[PRINCIPAL_SCOPE_KEY] = result.principal
            scope["headers"] += self.guard.identity_headers.build_raw(result.principal)
            await self.app(scope, receive, send)
        elif result.decision == "anonymous":
            scope[PRINCIPAL_SCOPE_KEY] = None
            await self.app(scope, receive, send)
        elif result.decision == "bad_request":
            await self._respond(scope, receive, send, 400, "bad_request",
                                "The request path is not valid.")
        elif result.decision == "forbidden":
            await self._forbidden(result, scope, receive, send)
        else:
            await self._unauthenticated(scope, send)

    async def _forbidden(self, result: AccessResult, scope: Scope, receive: Receive,
                         send: Send) -> None:
        reason = result.reason or "forbidden"
        await self.guard.audit_scope(scope, AuditEvent(
            "access.denied", "failure", reason=reason.split(":", 1)[0],
            provider=result.principal.provider if result.principal else None,
            user_id=result.principal.user_id if result.principal else None,
            detail=f"path={result.path} {reason}",
        ))
        if reason == "sso_only":
            message = ("This sign-in form is turned off. Use single sign-on: "
                       "the providers are listed on the sign-in page.")
            link: str | None = self.guard.sign_in_url(None)
        elif reason.startswith("missing_role:"):
            message = f"This page needs the role {reason.split(':', 1)[1]}, which your account lacks."
            link = None
        else:
            message = "You are signed in but may not open this page."
            link = None
        await self._respond(scope, receive, send, 403, reason, message, link=link)

    async def _unauthenticated(self, scope: Scope, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401, "reason": "unauthenticated"})
            return
        if _is_api_client(scope):
            await self._respond_json(send, 401, "unauthenticated", "Sign-in required.")
            return
        path = scope.get("raw_path", b"").decode("latin-1") or quote(scope.get("path", "/"))
        query = scope.get("query_string", b"").decode("latin-1")
        rd = path + (f"?{query}" if query else "")
        await self._send_simple(send, 302, b"", [(b"location",
                                                  self.guard.sign_in_url(rd).encode("latin-1"))])

    async def _respond(self, scope: Scope, receive: Receive, send: Send, status: int, error: str,
                       message: str, *, link: str | None = None) -> None:
        """Refuse a request: a closed handshake, a JSON body for API clients, else a page."""
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4000 + status, "reason": error[:100]})
            return
        if _is_api_client(scope):
            await self._respond_json(send, status, error, message)
            return
        title = "Access denied" if status == 403 else "Bad request"
        page = message_page(title, message, status=status, link=link,
                            link_text="Go to the sign-in page" if link else None,
                            request_id=self.guard.request_id(scope))
        await page(scope, receive, send)

    async def _respond_json(self, send: Send, status: int, error: str, message: str) -> None:
        body = json.dumps({"error": error, "message": message}).encode()
        headers = [(b"content-type", b"application/json")]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="moko-guard"'))
        await self._send_simple(send, status, body, headers)

    @staticmethod
    async def _send_simple(send: Send, status: int, body: bytes,
                           headers: list[tuple[bytes, bytes]]) -> None:
        headers = [*headers, (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _https_redirect(self, scope: Scope, scheme: str, host: str | None) -> ASGIApp | None:
        server = self.guard.settings.server
        if not server.enforce_https or scheme == "https" or scope["type"] != "http":
            return None
        if scope.get("path") == self.guard.auth_path:
            # nginx's auth_request sub-request: answered 202/401/403, never redirected.
            return None
        method = scope.get("method", "GET")
        target_host = host or server.public_host
        path = scope.get("raw_path", b"").decode("latin-1") or quote(scope.get("path", "/"))
        query = scope.get("query_string", b"").decode("latin-1")
        location = f"https://{target_host}{path}" + (f"?{query}" if query else "")
        if header_value(scope.get("headers", []), b"host") is None and host is None:
            location = server.public_url + path

        async def respond(scope: Scope, receive: Receive, send: Send) -> None:
            if method in ("GET", "HEAD"):
                await self._send_simple(send, 308, b"", [(b"location", location.encode("latin-1"))])
            else:
                await self._respond_json(send, 403, "https_required", "Use https.")

        return respond

    def _with_security_headers(self, scope: Scope, send: Send, scheme: str) -> Send:
        server = self.guard.settings.server
        if scope["type"] != "http" or not server.enforce_https or scheme != "https":
            return send
        hsts = f"max-age={server.hsts_max_age}; includeSubDomains".encode()

        async def send_with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []),
                                      (b"strict-transport-security", hsts)]
            await send(message)

        return send_with_hsts

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        guard = self.guard

        async def guarded_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await guard.startup()
            elif message["type"] == "lifespan.shutdown":
                await guard.shutdown()
            return message

        await self.app(scope, guarded_receive, send)
