"""The admin pages under ``<prefix>/admin``, for users holding the ``admin`` role.

Every change is a POST carrying a CSRF token bound to the admin's session
(HMAC-SHA256 of the session id under a key derived from the session secrets)
and, when the browser sends one, an ``Origin`` equal to the public URL. Each
change is an audit event naming the acting admin.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from .audit import AuditEvent
from .identity import Principal
from .store import AuditFilter, IdentityRecord, UserRecord
from .web import message_page, render

if TYPE_CHECKING:
    from .guard import Guard

ADMIN_ROLE = "admin"
PAGE_SIZE = 50
CHART_DAYS = 14


@dataclass(frozen=True)
class UserView:
    user: UserRecord
    identities: list[IdentityRecord]


@dataclass(frozen=True)
class ChartBar:
    day: str
    success: int
    failure: int
    x: int
    success_height: int
    failure_height: int


def csrf_token(secret: str, session_id: str) -> str:
    key = hashlib.sha256(b"moko_guard admin csrf\x00" + secret.encode()).digest()
    return hmac.new(key, session_id.encode(), hashlib.sha256).hexdigest()


def _chart(rows: list[tuple[str, str, int]], today: datetime) -> list[ChartBar]:
    days = [(today - timedelta(days=offset)).date().isoformat() for offset in range(CHART_DAYS)]
    days.reverse()
    counts = {(day, outcome): count for day, outcome, count in rows}
    peak = max([1, *(counts.get((d, "success"), 0) + counts.get((d, "failure"), 0) for d in days)])
    bars = []
    for index, day in enumerate(days):
        success, failure = counts.get((day, "success"), 0), counts.get((day, "failure"), 0)
        bars.append(ChartBar(day, success, failure, x=index * 40,
                             success_height=round(160 * success / peak),
                             failure_height=round(160 * failure / peak)))
    return bars


class AdminPages:
    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.base = f"{guard.prefix}/admin"

    def _admin(self, request: Request) -> Principal | None:
        principal = self.guard.check_session(request.scope).principal
        if principal is None or ADMIN_ROLE not in principal.roles:
            return None
        return principal

    def _token(self, principal: Principal) -> str:
        return csrf_token(self.guard.settings.session.secrets[0].get(), principal.session_id)

    def _denied(self, request: Request) -> Response:
        if self.guard.check_session(request.scope).principal is None:
            return RedirectResponse(self.guard.sign_in_url(self.base), status_code=302)
        return message_page("Access denied", "The admin pages need the admin role.", status=403,
                            request_id=self.guard.request_id(request.scope))

    async def page(self, request: Request) -> Response:
        principal = self._admin(request)
        if principal is None:
            return self._denied(request)
        params = request.query_params
        try:
            page_number = max(1, int(params.get("page", "1")))
        except ValueError:
            page_number = 1
        outcome = params.get("outcome") if params.get("outcome") in ("success", "failure",
                                                                      "info") else None
        provider = params.get("provider") or None
        store = self.guard.store
        users = [UserView(u, await store.identities_of(u.id)) for u in await store.list_users()]
        records = await store.list_audit(AuditFilter(
            outcome=outcome, provider=provider, limit=PAGE_SIZE + 1,
            offset=(page_number - 1) * PAGE_SIZE,
        ))
        now = datetime.now(UTC)
        chart = _chart(await store.daily_sign_ins(now - timedelta(days=CHART_DAYS)), now)
        filters = {k: v for k, v in (("outcome", outcome), ("provider", provider)) if v}
        return render(
            "admin.html", users=users, records=records[:PAGE_SIZE], chart=chart,
            csrf=self._token(principal), base=self.base, me=principal, filters=filters,
            page=page_number, has_next=len(records) > PAGE_SIZE,
            next_query=urlencode({**filters, "page": page_number + 1}),
            prev_query=urlencode({**filters, "page": page_number - 1}),
            providers=list(self.guard.providers),
        )

    def _same_origin(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None or origin == "null":
            return origin is None
        public = urlsplit(self.guard.settings.server.public_url)
        return origin.rstrip("/") == f"{public.scheme}://{public.netloc}"

    async def action(self, request: Request) -> Response:
        principal = self._admin(request)
        if principal is None:
            return self._denied(request)
        form = await request.form()
        token = str(form.get("csrf", ""))
        if not hmac.compare_digest(token.encode(), self._token(principal).encode()) or \
                not self._same_origin(request):
            return message_page("Request refused", "The form expired. Reload the page and retry.",
                                status=403, request_id=self.guard.request_id(request.scope))
        try:
            user_id = int(str(form.get("user_id", "")))
        except ValueError:
            return message_page("Bad request", "No user was given.", status=400)
        action = request.path_params["action"]
        user = await self.guard.store.user_by_id(user_id)
        if user is None or action not in ("disable", "enable", "unlink"):
            return message_page("Not found", "That user or action does not exist.", status=404)
        await self._apply(request, principal, user, action, form.get("provider"),
                          form.get("subject"))
        return RedirectResponse(self.base, status_code=303)

    async def _apply(self, request: Request, admin: Principal, user: UserRecord, action: str,
                     provider: object, subject: object) -> None:
        guard = self.guard
        detail = f"by admin user {admin.user_id} ({admin.username})"
        if action in ("disable", "enable"):
            await guard.store.set_disabled(user.id, action == "disable")
            if action == "disable":
                await guard.sessions.revoke_user(user.id)
            await guard.audit(request, AuditEvent(
                "user.disabled" if action == "disable" else "user.enabled", "info",
                reason=f"user_{action}d", user_id=user.id, detail=detail))
            return
        if not isinstance(provider, str) or not isinstance(subject, str):
            return
        removed = await guard.store.unlink_identity(user.id, provider, subject)
        if removed:
            await guard.sessions.revoke_user(user.id)
            await guard.audit(request, AuditEvent(
                "identity.unlinked", "info", provider=provider, subject=subject,
                user_id=user.id, detail=detail))
