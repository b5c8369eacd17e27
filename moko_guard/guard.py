"""The core shared by every mode: sign-in flow endpoints, session checks, access decisions.

The middleware, the forward-auth server and the reverse proxy all hold one
:class:`Guard` and ask it the same questions, so no mode carries its own copy
of a security decision.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlencode, urlsplit

import httpx
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from .admin import AdminPages
from .audit import AuditEvent, Auditor, escape_control
from .config import Settings
from .errors import LoginError, StoreError
from .flow import FlowManager, FlowState, code_challenge
from .flow import cookie_name as flow_cookie_name
from .forwarding import RequestInfo, request_info
from .headers import IdentityHeaders, header_value
from .identity import Identity, Principal
from .logout import ReplayCache
from .logs import request_id_var
from .metrics import GuardMetrics
from .outbound import provider_client
from .paths import AmbiguousPath, is_public, matches_prefix, normalise_path, path_variants
from .policy import SignInPolicy
from .providers import Provider, build_provider
from .ratelimit import RateLimiter
from .redirects import RedirectPolicy, check_redirect
from .rotation import SecretReloader
from .sessions import SessionCheck, SessionManager
from .store import IdentityTaken, SignInPlan, Store, UserRecord
from .web import ProviderButton, english_strings, message_page, sign_in_page
from .web.i18n import Catalogues

logger = logging.getLogger(__name__)

Decision = Literal["allow", "anonymous", "unauthenticated", "forbidden", "bad_request"]
# The scope key under which Guard.info keeps a request's RequestInfo, worked out once per request.
INFO_SCOPE_KEY = "moko_guard.request_info"


@dataclass(frozen=True)
class AccessResult:
    """The outcome of one access check."""

    decision: Decision
    principal: Principal | None = None
    reason: str | None = None
    path: str | None = None


def _is_api_client(scope: Scope) -> bool:
    headers = scope.get("headers", [])
    accept = (header_value(headers, b"accept") or "").lower()
    requested_with = (header_value(headers, b"x-requested-with") or "").lower()
    wants_json = "application/json" in accept and "text/html" not in accept
    return wants_json or requested_with == "xmlhttprequest"


class Guard:
    """Everything the modes share: settings, store, providers, sessions and endpoints."""

    def __init__(
        self,
        settings: Settings,
        *,
        http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        config_path: str | None = None,
    ) -> None:
        self.settings = settings
        self.reloader = SecretReloader(self, config_path) if config_path else None
        self.clock = clock
        self.store = Store.from_settings(settings.store)
        self.auditor = Auditor(self.store)
        secret_values = [secret.get() for secret in settings.session.secrets]
        self.sessions = SessionManager(
            secret_values, self.store, lifetime=settings.session.lifetime,
            poll_interval=settings.session.revocation_poll_interval, clock=clock,
        )
        self.flows = FlowManager(self.sessions.sealer, clock)
        self.http = http_client or provider_client()
        self._owns_http = http_client is None
        self.providers: dict[str, Provider] = {
            p.id: build_provider(p, self.http) for p in settings.providers
        }
        self.policy = SignInPolicy(settings.access, self.store)
        self.identity_headers = IdentityHeaders(settings.headers)
        server = settings.server
        self.prefix = server.prefix
        # Served by the middleware before routing; every method is accepted, because
        # nginx may pass the original one (proxy_method $request_method).
        self.auth_path = f"{server.prefix}/auth"
        self.callback_path = server.effective_callback_path
        self.secure_cookies = server.enforce_https
        public = urlsplit(server.public_url)
        self.redirect_policy = RedirectPolicy(
            public_host=server.public_host,
            public_port=public.port,
            allowed_hosts=tuple(settings.access.allowed_redirect_hosts),
            allow_http=not server.enforce_https,
        )
        self._started = False
        self._start_lock = asyncio.Lock()
        self.metrics = GuardMetrics()
        # One histogram child per decision, looked up once instead of per request.
        self._auth_timers = {
            decision: self.metrics.auth_checks.labels(decision)
            for decision in ("allow", "anonymous", "unauthenticated", "forbidden", "bad_request")
        }
        self.sign_in_limit = RateLimiter(settings.rate_limit.sign_in_per_minute,
                                         settings.rate_limit.burst)
        locales_dir = settings.ui.locales_dir
        self.catalogues = Catalogues(english_strings(), Path(locales_dir) if locales_dir else None)
        self.admin = AdminPages(self)
        self._logout_replays = ReplayCache()
        self.sessions.on_poll.append(self._update_session_gauge)
        self.router = Router(routes=self._routes())
        # Run by shutdown(), for example to close the reverse proxy's upstream connections.
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []

    # --- lifecycle -----------------------------------------------------------

    async def startup(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            if self.settings.server.insecure_allow_http:
                logger.warning("insecure_allow_http is on: cookies are sent over plain http; "
                               "use this for loopback testing only")
            for provider in self.settings.providers:
                if provider.insecure_allow_http_issuer:
                    logger.warning("providers %s: insecure_allow_http_issuer is on: provider "
                                   "answers travel over plain http", provider.id)
                if provider.insecure_email_from_username:
                    logger.warning("providers %s: insecure_email_from_username is on: the "
                                   "unverified user name is trusted as an email", provider.id)
            logger.info("guard_starting providers=%s trusted_proxies=%s mode=%s",
                        ",".join(self.providers), self.settings.server.trusted_proxies,
                        self.settings.server.mode)
            await self.store.open()
            await self.sessions.start()
            if self.reloader is not None:
                self.reloader.start()
            self._started = True

    async def shutdown(self) -> None:
        for callback in self.on_shutdown:
            await callback()
        if self.reloader is not None:
            await self.reloader.stop()
        await self.sessions.stop()
        await self.store.close()
        if self._owns_http:
            await self.http.aclose()
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    async def ensure_started(self) -> None:
        if not self._started:
            await self.startup()

    def apply_secrets(self, fresh: Settings) -> list[str]:
        """Use the secrets of freshly loaded settings; return the names of those that changed."""
        changed = []
        if fresh.session.secrets != self.settings.session.secrets:
            self.sessions.rotate([secret.get() for secret in fresh.session.secrets])
            self.flows.sealer = self.sessions.sealer
            changed.append("session.secrets")
        for provider_settings in fresh.providers:
            current = self.settings.provider(provider_settings.id)
            provider = self.providers.get(provider_settings.id)
            if current is None or provider is None:
                continue
            if provider_settings.client_secret != current.client_secret:
                provider.settings = provider_settings  # type: ignore[attr-defined]
                changed.append(f"providers.{provider_settings.id}.client_secret")
        if changed:
            session = fresh.session
            self.settings = self.settings.model_copy(update={
                "session": self.settings.session.model_copy(update={"secrets": session.secrets}),
                "providers": [fresh.provider(p.id) or p for p in self.settings.providers],
            })
        return changed

    async def _update_session_gauge(self) -> None:
        self.metrics.active_sessions.set(await self.store.count_active_sessions())

    async def readiness(self) -> dict[str, bool]:
        checks = {"store": await self.store.ping()}
        for provider_id, provider in self.providers.items():
            checks[f"provider:{provider_id}"] = await provider.ready()
        return checks

    # --- request helpers -----------------------------------------------------

    def info(self, scope: Scope) -> RequestInfo:
        """The request's peer, scheme and host, worked out once per request and kept in the scope."""
        info = scope.get(INFO_SCOPE_KEY)
        if info is None:
            info = request_info(scope, self.settings.server.trusted_proxies)
            scope[INFO_SCOPE_KEY] = info
        return info

    def request_id(self, scope: Scope, info: RequestInfo | None = None) -> str:
        existing = scope.get("state", {}).get("moko_request_id") if "state" in scope else None
        if isinstance(existing, str):
            return existing
        info = info or self.info(scope)
        supplied = header_value(scope.get("headers", []), b"x-request-id") if info.trusted_peer else None
        if supplied and len(supplied) <= 64 and supplied.replace("-", "").isalnum():
            request_id = supplied
        else:
            request_id = secrets.token_hex(8)
        scope.setdefault("state", {})["moko_request_id"] = request_id
        request_id_var.set(request_id)
        return request_id

    def session_cookie(self, scope: Scope) -> str | None:
        raw = header_value(scope.get("headers", []), b"cookie")
        if not raw:
            return None
        return read_cookie(raw, self.settings.session.cookie_name)

    def check_session(self, scope: Scope) -> SessionCheck:
        """Open the session cookie: the hot path, with no I/O."""
        return self.sessions.check(self.session_cookie(scope))

    def access(self, scope: Scope, target: str | None = None) -> AccessResult:
        """Decide a request from its path (``target`` overrides it, for forward-auth)."""
        started = time.perf_counter()
        result = self._access(scope, target)
        self._auth_timers[result.decision].observe(time.perf_counter() - started)
        return result

    def _access(self, scope: Scope, target: str | None) -> AccessResult:
        raw_target = target
        if raw_target is None:
            raw_path = scope.get("raw_path")
            raw_target = raw_path.decode("latin-1") if raw_path else quote(scope.get("path", "/"))
        try:
            path = normalise_path(raw_target)
        except AmbiguousPath as exc:
            logger.warning("ambiguous_path reason=%s path=%s", exc, escape_control(raw_target[:200]))
            return AccessResult("bad_request", reason="ambiguous_path")

        access = self.settings.access
        method = str(scope.get("method", "GET")).upper()
        variants = path_variants(path)
        if (self.settings.server.mode == "sso_only"
                and any(self._is_native_login(variant, method) for variant in variants)):
            return AccessResult("forbidden", reason="sso_only", path=path)
        public_paths = access.public_paths
        if public_paths and all(is_public(variant, public_paths) for variant in variants):
            return AccessResult("anonymous", path=path)

        check = self.check_session(scope)
        principal = check.principal
        if principal is None:
            if self.settings.server.mode == "optional":
                return AccessResult("anonymous", reason=check.reason, path=path)
            return AccessResult("unauthenticated", reason=check.reason, path=path)

        if access.allowed_roles or access.rules:
            denial = None
            for variant in variants:
                denial = denial or self._role_denial(principal, variant, method)
            if denial is not None:
                return AccessResult("forbidden", principal, denial, path)
        return AccessResult("allow", principal, path=path)

    def _is_native_login(self, path: str, method: str) -> bool:
        """True for the CRM's own password login, which ``sso_only`` mode shuts."""
        if self.settings.server.mode != "sso_only":
            return False
        for entry in self.settings.access.native_login_paths:
            entry_method, _, entry_path = entry.partition(" ") if " " in entry else ("", "", entry)
            if entry_method and entry_method.upper() != method:
                continue
            if matches_prefix(path, entry_path.strip(), ignore_case=True):
                return True
        return False

    def _role_denial(self, principal: Principal, path: str, method: str) -> str | None:
        access = self.settings.access
        roles = set(principal.roles)
        if access.allowed_roles and not roles & set(access.allowed_roles):
            return "role_not_allowed"
        for rule in access.rules:
            if rule.methods and method.upper() not in {m.upper() for m in rule.methods}:
                continue
            if matches_prefix(path, rule.path, ignore_case=True):
                if rule.roles and not roles & set(rule.roles):
                    return "missing_role:" + ",".join(rule.roles)
                return None
        return None

    def sign_in_url(self, rd: str | None) -> str:
        query = f"?{urlencode({'rd': rd})}" if rd else ""
        return f"{self.prefix}/sign_in{query}"

    # --- cookies ---------------------------------------------------------------

    def _set_cookie(self, response: Response, name: str, value: str, *, max_age: int,
                    path: str = "/", domain: str | None = None) -> None:
        response.set_cookie(
            name, value, max_age=max_age, path=path, domain=domain,
            secure=self.secure_cookies, httponly=True, samesite="lax",
        )

    def _clear_cookie(self, response: Response, name: str, *, path: str = "/",
                      domain: str | None = None) -> None:
        response.delete_cookie(name, path=path, domain=domain, secure=self.secure_cookies,
                               httponly=True, samesite="lax")

    def _set_session_cookie(self, response: Response, value: str) -> None:
        self._set_cookie(response, self.settings.session.cookie_name, value,
                         max_age=int(self.settings.session.lifetime),
                         domain=self.settings.session.cookie_domain)

    def _clear_session_cookie(self, response: Response) -> None:
        self._clear_cookie(response, self.settings.session.cookie_name,
                           domain=self.settings.session.cookie_domain)

    # --- audit -----------------------------------------------------------------

    async def audit(self, request: Request, event: AuditEvent) -> None:
        await self.audit_scope(request.scope, event)

    async def audit_scope(self, scope: Scope, event: AuditEvent) -> None:
        """Record an event, filling in the client address, user agent and request id."""
        await self.auditor.record(self._filled_event(scope, event))

    def _filled_event(self, scope: Scope, event: AuditEvent) -> AuditEvent:
        """Return ``event`` with the request's client address, user agent and id where unset."""
        info = self.info(scope)
        return replace(
            event,
            client_ip=event.client_ip or info.client_ip,
            user_agent=event.user_agent or header_value(scope.get("headers", []), b"user-agent"),
            request_id=event.request_id or self.request_id(scope, info),
        )

    # --- endpoints ---------------------------------------------------------------

    def _routes(self) -> list[Route]:
        p = self.prefix
        routes = [
            Route(f"{p}/sign_in", self.sign_in, methods=["GET", "HEAD"]),
            Route(f"{p}/start", self.start, methods=["GET", "HEAD"]),
            Route(f"{p}/link", self.link, methods=["GET"]),
            Route(self.callback_path, self.callback, methods=["GET"]),
            Route(f"{p}/sign_out", self.sign_out, methods=["GET", "POST"]),
            Route(f"{p}/userinfo", self.userinfo, methods=["GET"]),
        ]
        routes += [
            Route(f"{p}/backchannel_logout/{{provider}}", self.backchannel_logout,
                  methods=["POST"]),
            Route(f"{p}/admin", self.admin.page, methods=["GET"]),
            Route(f"{p}/admin/{{action}}", self.admin.action, methods=["POST"]),
        ]
        if self.callback_path != f"{p}/callback":
            routes.append(Route(f"{p}/callback", self.callback, methods=["GET"]))
        return routes

    def handles(self, path: str) -> bool:
        """True for paths the guard serves itself."""
        return path == self.callback_path or matches_prefix(path, self.prefix)

    def _buttons(self, rd: str) -> list[ProviderButton]:
        return [
            ProviderButton(p.id, self.providers[p.id].name,
                           f"{self.prefix}/start?{urlencode({'provider': p.id, 'rd': rd})}",
                           kind=p.type)
            for p in self.settings.providers
        ]

    def _checked_rd(self, request: Request, raw: str | None) -> str:
        result = check_redirect(raw, self.redirect_policy)
        if result.rejected:
            logger.warning("redirect_rejected reason=%s rd=%s request_id=%s", result.reason,
                           escape_control((raw or "")[:300]), self.request_id(request.scope))
        return result.target

    def language(self, request: Request) -> str:
        return self.catalogues.choose(request.headers.get("accept-language"))

    async def sign_in(self, request: Request) -> Response:
        rd = self._checked_rd(request, request.query_params.get("rd"))
        return sign_in_page(self._buttons(rd), language=self.language(request),
                            catalogues=self.catalogues)

    async def _rate_limited(self, request: Request, endpoint: str) -> Response | None:
        """Return a 429 page when this client started too many sign-ins, else None."""
        client = self.info(request.scope).client_ip or "unknown"
        allowed, wait = self.sign_in_limit.allow(client)
        if allowed:
            return None
        self.metrics.rate_limited.labels(endpoint).inc()
        error = LoginError("rate_limited", f"{endpoint} from {client}", status=429)
        response = await self._login_failed(request, error, provider=None)
        response.headers["Retry-After"] = str(wait)
        return response

    async def start(self, request: Request) -> Response:
        await self.ensure_started()
        return await self._begin_flow(request, "start", link_user_id=None)

    async def _begin_flow(self, request: Request, endpoint: str,
                          link_user_id: int | None) -> Response:
        """Check the rate limit, provider and ``rd`` of a start or link, then go to the provider."""
        limited = await self._rate_limited(request, endpoint)
        if limited is not None:
            return limited
        provider_id = request.query_params.get("provider", "")
        rd = self._checked_rd(request, request.query_params.get("rd"))
        provider = self.providers.get(provider_id)
        if provider is None:
            return await self._login_failed(
                request, LoginError("unknown_provider", f"provider {provider_id[:40]!r}", status=400),
                provider=provider_id[:40] or None, rd=rd,
            )
        return await self._redirect_to_provider(request, provider, rd, link_user_id=link_user_id)

    async def _redirect_to_provider(self, request: Request, provider: Provider, rd: str,
                                    link_user_id: int | None) -> Response:
        flow = self.flows.begin(provider.id, rd, link_user_id)
        try:
            url = await provider.authorization_url(
                state=flow.state, nonce=flow.nonce,
                code_challenge=code_challenge(flow.code_verifier), redirect_uri=self.settings.server.redirect_uri,
            )
        except LoginError as exc:
            return await self._login_failed(request, exc, provider=provider.id, rd=rd)
        response = RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})
        self._set_cookie(response, flow.cookie_name, self.flows.seal(flow),
                         max_age=600, path=self.callback_path)
        return response

    async def callback(self, request: Request) -> Response:
        await self.ensure_started()
        limited = await self._rate_limited(request, "callback")
        if limited is not None:
            return limited
        params = request.query_params
        state = params.get("state")
        attempt_id = self.flows.attempt_id_of(state)
        sealed = request.cookies.get(flow_cookie_name(attempt_id)) if attempt_id else None
        provider_id: str | None = None
        try:
            flow = self.flows.resume(state, sealed)
            provider_id = flow.provider
            response = await self._finish(request, flow)
        except LoginError as exc:
            if sealed is None and exc.reason == "state_mismatch" and \
                    self.check_session(request.scope).principal is not None:
                # A signed-in person reloaded a used callback (its flow cookie is gone):
                # take them into the app rather than show a failed sign-in.
                # The attempt is still audited: a forged callback looks the same.
                await self.audit(request, AuditEvent(
                    "login.failure", "failure", reason=exc.reason, detail=exc.detail))
                self.metrics.sign_ins.labels("", "failure", exc.reason).inc()
                response = RedirectResponse("/", status_code=302,
                                            headers={"Cache-Control": "no-store"})
            else:
                response = await self._login_failed(request, exc, provider=provider_id)
        except (StoreError, SQLAlchemyError, OSError) as exc:
            logger.error("store_error during callback: %s", type(exc).__name__)
            response = await self._login_failed(
                request, LoginError("store_unavailable", type(exc).__name__, status=503),
                provider=provider_id,
            )
        if attempt_id:
            self._clear_cookie(response, flow_cookie_name(attempt_id), path=self.callback_path)
        return response

    async def _finish(self, request: Request, flow: FlowState) -> Response:
        params = request.query_params
        provider = self.providers.get(flow.provider)
        if provider is None:
            raise LoginError("unknown_provider", f"provider {flow.provider!r}", status=400)
        error = params.get("error")
        if error:
            status = 403 if error in ("access_denied", "consent_required", "login_required") else 502
            raise LoginError("provider_denied", f"error={error[:64]}", status=status)
        code = params.get("code")
        if not code or len(code) > 4096:
            raise LoginError("invalid_request", "callback without a code", status=400)

        identity = await provider.complete(
            code=code, redirect_uri=self.settings.server.redirect_uri,
            code_verifier=flow.code_verifier, nonce=flow.nonce,
        )
        if flow.link_user_id is not None:
            return await self._finish_link(request, flow, identity)

        info = self.info(request.scope)
        draft = self.sessions.draft(
            identity.provider, identity.username,
            client_ip=info.client_ip, user_agent=request.headers.get("user-agent"),
            provider_session=identity.provider_session,
        )
        # The store keeps emails lower-cased, so the audit row shows the same form.
        email = identity.email.lower() if identity.email else None
        base = self._filled_event(request.scope, AuditEvent(
            "login.success", "success", provider=identity.provider, subject=identity.subject,
            email=email))

        async def write(plan: SignInPlan) -> tuple[UserRecord, tuple[str, Principal], list[dict]]:
            events = []
            if plan.new_user is not None:
                events.append(replace(base, event="user.provisioned", outcome="info"))
            if plan.link:
                events.append(replace(base, event="identity.linked", outcome="info"))
            events.append(base)
            rows = [self.auditor.row(event) for event in events]
            # The user, session and audit rows commit together or not at all.
            user, sealed = await self.store.sign_in(
                plan, session=draft.row, audit=rows,
                finish=lambda user: self.sessions.seal(draft, user))
            assert sealed is not None
            return user, sealed, rows

        try:
            user, (cookie_value, principal), rows = await self.policy.sign_in(identity, write)
        except LoginError as exc:
            raise _with_identity(exc, identity.subject, identity.email) from None
        for row in rows:
            self.auditor.log({**row, "user_id": user.id})
        self.metrics.sign_ins.labels(identity.provider, "success", "").inc()
        logger.info("login_success provider=%s user_id=%d session=%s", identity.provider,
                    user.id, principal.session_id[:8])

        target = self._checked_rd(request, flow.redirect_to)
        response = RedirectResponse(target, status_code=302, headers={"Cache-Control": "no-store"})
        self._set_session_cookie(response, cookie_value)
        return response

    async def link(self, request: Request) -> Response:
        """Start a sign-in at another provider whose identity joins the signed-in user."""
        await self.ensure_started()
        principal = self.check_session(request.scope).principal
        if principal is None:
            back = f"{self.prefix}/link?{request.url.query}" if request.url.query else None
            return RedirectResponse(self.sign_in_url(back), status_code=302)
        return await self._begin_flow(request, "link", link_user_id=principal.user_id)

    async def _finish_link(self, request: Request, flow: FlowState, identity: Identity) -> Response:
        """Link the identity a callback brought to the user who started the link."""
        principal = self.check_session(request.scope).principal
        if principal is None or principal.user_id != flow.link_user_id:
            raise _with_identity(LoginError(
                "link_session_mismatch", "the session that started the link is gone", status=403,
            ), identity.subject, identity.email)
        try:
            await self.store.link_identity(principal.user_id, identity.provider,
                                           identity.subject, identity.email)
        except IdentityTaken as exc:
            raise _with_identity(LoginError(
                "identity_taken", f"identity is linked to user {exc.user_id}", status=409,
            ), identity.subject, identity.email) from None
        await self.audit(request, AuditEvent(
            "identity.linked", "info", reason="explicit_link", provider=identity.provider,
            subject=identity.subject, user_id=principal.user_id, email=identity.email))
        target = self._checked_rd(request, flow.redirect_to)
        return RedirectResponse(target, status_code=302, headers={"Cache-Control": "no-store"})

    async def _login_failed(self, request: Request, error: LoginError, *,
                            provider: str | None, rd: str = "/") -> Response:
        await self.audit(request, AuditEvent(
            "login.failure", "failure", reason=error.reason, provider=provider,
            subject=error.subject, email=error.email, detail=error.detail,
        ))
        logger.warning("login_failed reason=%s provider=%s detail=%s", error.reason, provider,
                       escape_control(error.detail))
        self.metrics.sign_ins.labels(provider or "", "failure", error.reason).inc()
        if error.reason.startswith("provider_"):
            self.metrics.provider_errors.labels(provider or "", error.reason).inc()
        if error.reason == "store_unavailable":
            self.metrics.store_errors.labels("sign_in").inc()
        headers = {"Retry-After": "30"} if error.status == 503 else None
        return sign_in_page(self._buttons(rd), reason=error.reason,
                            request_id=self.request_id(request.scope), status=error.status,
                            headers=headers, language=self.language(request),
                            catalogues=self.catalogues)

    async def sign_out(self, request: Request) -> Response:
        await self.ensure_started()
        check = self.check_session(request.scope)
        principal = check.principal
        if principal is not None:
            try:
                await self.sessions.revoke(principal)
            except (StoreError, SQLAlchemyError, OSError) as exc:
                logger.error("sign_out_store_error error=%s", type(exc).__name__)
            event = dict(provider=principal.provider, user_id=principal.user_id,
                         email=principal.email)
            await self.audit(request, AuditEvent("sign_out", "info", **event))
            await self.audit(request, AuditEvent("session.revoked", "info", reason="sign_out",
                                                 **event))
        raw_rd = request.query_params.get("rd")
        provider_logout = await self._provider_logout_url(principal, raw_rd, request)
        if provider_logout:
            response: Response = RedirectResponse(provider_logout, status_code=302)
        elif raw_rd:
            response = RedirectResponse(self._checked_rd(request, raw_rd), status_code=302)
        else:
            language = self.language(request)
            strings = self.catalogues.strings(language)
            response = message_page(
                strings["ui.signed_out.title"], strings["ui.signed_out.message"],
                link=self.sign_in_url(None), link_text=strings["ui.signed_out.link"],
                strings=strings, language=language,
            )
        self._clear_session_cookie(response)
        return response

    async def _provider_logout_url(self, principal: Principal | None, raw_rd: str | None,
                                   request: Request) -> str | None:
        """Return the provider's end-session URL (RP-Initiated Logout 1.0) when it is turned on."""
        if principal is None:
            return None
        settings = self.settings.provider(principal.provider)
        provider = self.providers.get(principal.provider)
        end_session = getattr(provider, "end_session_url", None)
        if settings is None or not settings.sign_out_at_provider or end_session is None:
            return None
        target = self._checked_rd(request, raw_rd) if raw_rd else self.sign_in_url(None)
        if target.startswith("/"):
            target = self.settings.server.public_url + target
        try:
            url: str | None = await end_session(target)
        except LoginError as exc:
            logger.warning("provider_logout_unavailable provider=%s reason=%s",
                           principal.provider, exc.reason)
            return None
        return url

    async def backchannel_logout(self, request: Request) -> Response:
        """OpenID Connect Back-Channel Logout 1.0: revoke the sessions a logout token names."""
        await self.ensure_started()
        headers = {"Cache-Control": "no-store"}
        provider_id = request.path_params["provider"]
        provider = self.providers.get(provider_id)
        validate = getattr(provider, "validate_logout_token", None)
        if provider is None or validate is None:
            return JSONResponse({"error": "invalid_request"}, status_code=400, headers=headers)
        form = await request.form()
        token = form.get("logout_token")
        try:
            if not isinstance(token, str):
                raise LoginError("token_invalid", "no logout_token in the form")
            logout = await validate(token, self._logout_replays)
        except LoginError as exc:
            logger.warning("backchannel_logout_rejected provider=%s detail=%s", provider_id,
                           escape_control(exc.detail))
            return JSONResponse({"error": "invalid_request"}, status_code=400, headers=headers)
        user_id = None
        if logout.subject is not None:
            user = await self.store.user_for_identity(provider_id, logout.subject)
            user_id = user.id if user else None
            if user is None and logout.provider_session is None:
                return Response(status_code=200, headers=headers)
        ended = await self.store.revoke_provider_sessions(
            provider_id, user_id=user_id, provider_sid=logout.provider_session)
        self.sessions.mark_revoked(ended)
        await self.audit(request, AuditEvent(
            "session.revoked", "info", reason="backchannel_logout", provider=provider_id,
            subject=logout.subject, user_id=user_id, detail=f"{len(ended)} sessions"))
        return Response(status_code=200, headers=headers)

    async def userinfo(self, request: Request) -> Response:
        principal = self.check_session(request.scope).principal
        if principal is None:
            return JSONResponse({"error": "unauthenticated", "message": "no valid session"},
                                status_code=401, headers={"Cache-Control": "no-store"})
        return JSONResponse(principal.to_json(), headers={"Cache-Control": "no-store"})

    async def auth(self, scope: Scope, receive: Receive, send: Send) -> None:
        """nginx ``auth_request``: 202 with identity headers, 401 or 403; never 2xx on error.

        A raw ASGI app, since this is the hot path: the response is built from the
        request headers alone, with no body read and no database query.
        """
        try:
            status, headers = await self._auth_decision(scope)
        except Exception:  # noqa: BLE001 - an auth answer must never be an accidental 2xx
            logger.exception("auth_check_failed request_id=%s", self.request_id(scope))
            status, headers = 401, list(_NO_STORE)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _auth_decision(self, scope: Scope) -> tuple[int, list[tuple[bytes, bytes]]]:
        info = self.info(scope)
        raw_headers = scope.get("headers", [])
        sent = header_value(raw_headers, b"x-original-uri") or header_value(
            raw_headers, b"x-forwarded-uri")
        if not info.trusted_peer:
            # Only a trusted proxy may name the request being checked.
            logger.warning("untrusted_forwarded_header name=X-Original-URI peer=%s present=%s",
                           info.peer, sent is not None)
            return 401, list(_NO_STORE)
        if not sent:
            # Without the original URI no rule can be checked: refuse instead of guessing "/".
            logger.error("auth_bad_target header=X-Original-URI reason=missing peer=%s", info.peer)
            return 401, list(_NO_STORE)
        result = self.access(scope, sent)
        if result.decision == "allow" and result.principal is not None:
            return 202, [*_NO_STORE, *self.identity_headers.build_raw(result.principal)]
        if result.decision == "anonymous":
            return 202, list(_NO_STORE)
        if result.decision == "forbidden":
            principal = result.principal
            reason = result.reason or "forbidden"
            await self.audit_scope(scope, AuditEvent(
                "access.denied", "failure", reason=reason.split(":", 1)[0],
                provider=principal.provider if principal else None,
                user_id=principal.user_id if principal else None,
                detail=f"path={result.path} {reason}",
            ))
            return 403, list(_NO_STORE)
        return 401, list(_NO_STORE)


_NO_STORE = ((b"cache-control", b"no-store"), (b"content-length", b"0"))


def read_cookie(header: str, name: str) -> str | None:
    """Return cookie ``name`` from a ``Cookie`` header; the last copy wins, as in Starlette."""
    if name not in header:
        return None
    found = None
    for part in header.split(";"):
        key, separator, value = part.strip().partition("=")
        if separator and key.strip() == name:
            found = value.strip()
    return found


def _with_identity(error: LoginError, subject: str, email: str | None) -> LoginError:
    error.subject = error.subject or subject
    error.email = error.email or email
    return error
