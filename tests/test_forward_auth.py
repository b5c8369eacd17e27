"""Tests of the forward-auth server: ``/oauth2/auth`` for nginx ``auth_request`` and health checks.

Requests go through httpx.ASGITransport, so the peer addresses below are only
ASGI scope values: 127.0.0.2 is the configured trusted proxy and 203.0.113.7
is an untrusted client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
import respx
from support.fake_idp import ISSUER

from moko_guard import Guard, Settings
from moko_guard.flow import FLOW_PURPOSE
from moko_guard.server import GuardServer, create_app
from moko_guard.store import Store, UserRecord

pytestmark = pytest.mark.anyio

TRUSTED_PEER = "127.0.0.2"
UNTRUSTED_PEER = "203.0.113.7"
# nginx calls the guard on loopback over plain http, so the https redirect must not apply.
FORWARD_AUTH_URL = "http://127.0.0.1:4180"
ADMIN_RULE = {"rules": [{"path": "/admin", "roles": ["admin"]}]}
IDENTITY_HEADERS = (
    "x-auth-request-user", "x-auth-request-email", "x-auth-request-roles",
    "x-auth-request-provider", "x-auth-request-preferred-username",
)


class ForwardAuth:
    """The forward-auth app around one guard, with helpers to create sessions and send requests."""

    def __init__(self, guard: Guard, app: GuardServer) -> None:
        self.guard = guard
        self.app = app

    async def create_session(self, name: str = "alice",
                             roles: tuple[str, ...] = ("user",)) -> tuple[str, UserRecord]:
        """Create a user in the store and return a session cookie value for them."""
        await self.guard.ensure_started()
        email = f"{name}@example.com"
        user, _ = await self.guard.store.create_user_with_identity(
            username=email, email=email, display_name=name.title(), roles=roles,
            provider="idp", subject=f"{name}-sub", identity_email=email,
        )
        cookie, _ = await self.guard.sessions.issue(user, "idp", name, client_ip=None,
                                                    user_agent="pytest")
        return cookie, user

    async def request(self, path: str = "/oauth2/auth", *, cookie: str | None = None,
                      peer: str = TRUSTED_PEER, headers: dict[str, str] | None = None,
                      method: str = "GET", base_url: str = FORWARD_AUTH_URL) -> httpx.Response:
        sent = dict(headers or {})
        if cookie is not None:
            sent["Cookie"] = f"moko_session={cookie}"
        transport = httpx.ASGITransport(app=self.app, client=(peer, 1234))
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            return await client.request(method, path, headers=sent)

    async def auth(self, *, cookie: str | None = None, original_uri: str | None = None,
                   peer: str = TRUSTED_PEER, headers: dict[str, str] | None = None,
                   ) -> httpx.Response:
        sent = dict(headers or {})
        if original_uri is not None:
            sent["X-Original-URI"] = original_uri
        return await self.request(cookie=cookie, peer=peer, headers=sent)


@pytest.fixture
async def make_forward_auth(
    make_settings: Callable[..., Settings], idp_router: respx.Router
) -> AsyncIterator[Callable[..., Any]]:
    created: list[tuple[Guard, httpx.AsyncClient]] = []

    async def factory(router: respx.Router | None = None, **overrides: Any) -> ForwardAuth:
        settings = make_settings(**overrides)
        http = httpx.AsyncClient(transport=httpx.MockTransport((router or idp_router).handler))
        guard = Guard(settings, http_client=http)
        created.append((guard, http))
        return ForwardAuth(guard, create_app(settings, guard=guard))

    yield factory
    for guard, http in created:
        await guard.shutdown()
        await http.aclose()


@pytest.fixture
async def forward_auth(make_forward_auth: Callable[..., Any]) -> ForwardAuth:
    result: ForwardAuth = await make_forward_auth(access=ADMIN_RULE)
    return result


def identity_headers_of(response: httpx.Response) -> dict[str, str]:
    return {name: response.headers[name] for name in IDENTITY_HEADERS if name in response.headers}


# --- sessions ------------------------------------------------------------------------


async def test_auth_without_cookie_returns_401(forward_auth: ForwardAuth) -> None:
    response = await forward_auth.auth(original_uri="/deals")

    assert response.status_code == 401
    assert identity_headers_of(response) == {}
    assert response.headers["cache-control"] == "no-store"


async def test_auth_with_session_returns_identity_headers(forward_auth: ForwardAuth) -> None:
    cookie, _ = await forward_auth.create_session()

    response = await forward_auth.auth(cookie=cookie, original_uri="/deals")

    assert response.status_code == 202
    assert identity_headers_of(response) == {
        "x-auth-request-user": "alice@example.com",
        "x-auth-request-email": "alice@example.com",
        "x-auth-request-roles": "user",
        "x-auth-request-provider": "idp",
        "x-auth-request-preferred-username": "alice",
    }
    assert response.headers["cache-control"] == "no-store"


async def test_auth_ignores_client_identity_headers(forward_auth: ForwardAuth) -> None:
    forged = {"X-Auth-Request-User": "mallory", "Remote-User": "mallory"}

    response = await forward_auth.auth(original_uri="/deals", headers=forged)

    assert response.status_code == 401
    assert identity_headers_of(response) == {}


@pytest.mark.parametrize(
    "cookie", ["garbage", "A" * 5000, "", "moko"],
    ids=["garbage", "oversized", "empty", "short"],
)
async def test_auth_with_garbage_cookie_returns_401(
    forward_auth: ForwardAuth, cookie: str
) -> None:
    response = await forward_auth.auth(cookie=cookie, original_uri="/deals")

    assert response.status_code == 401
    assert identity_headers_of(response) == {}


async def test_auth_with_tampered_cookie_returns_401(forward_auth: ForwardAuth) -> None:
    cookie, _ = await forward_auth.create_session()
    tampered = cookie[:20] + ("A" if cookie[20] != "A" else "B") + cookie[21:]

    response = await forward_auth.auth(cookie=tampered, original_uri="/deals")

    assert response.status_code == 401


async def test_auth_with_flow_sealed_cookie_returns_401(forward_auth: ForwardAuth) -> None:
    cookie, _ = await forward_auth.create_session()
    sealer = forward_auth.guard.sessions.sealer
    foreign = sealer.seal(sealer.open(cookie, "session"), FLOW_PURPOSE)

    response = await forward_auth.auth(cookie=foreign, original_uri="/deals")

    assert response.status_code == 401


async def test_auth_with_revoked_session_returns_401(forward_auth: ForwardAuth) -> None:
    cookie, _ = await forward_auth.create_session()
    principal = forward_auth.guard.sessions.check(cookie).principal
    assert principal is not None

    await forward_auth.guard.sessions.revoke(principal)
    response = await forward_auth.auth(cookie=cookie, original_uri="/deals")

    assert response.status_code == 401


async def test_auth_for_user_disabled_elsewhere_returns_401(forward_auth: ForwardAuth) -> None:
    cookie, user = await forward_auth.create_session()
    # Disable the user the way "moko-guard users disable" does, from another process's store.
    other_process = Store(forward_auth.guard.settings.store.url)
    await other_process.open()
    try:
        await other_process.set_disabled(user.id, True)
        await other_process.revoke_user_sessions(user.id)
    finally:
        await other_process.close()

    await forward_auth.guard.sessions.poll_revocations()
    response = await forward_auth.auth(cookie=cookie, original_uri="/deals")

    assert response.status_code == 401


# --- access rules and the original URI -------------------------------------------------


@pytest.mark.parametrize("header", ["X-Original-URI", "X-Forwarded-Uri"])
async def test_auth_role_rule_forbids_user_without_role(
    forward_auth: ForwardAuth, header: str
) -> None:
    cookie, _ = await forward_auth.create_session()

    response = await forward_auth.auth(cookie=cookie, headers={header: "/admin/x"})

    assert response.status_code == 403
    assert identity_headers_of(response) == {}


async def test_auth_role_rule_admits_user_with_role(forward_auth: ForwardAuth) -> None:
    cookie, _ = await forward_auth.create_session("root", roles=("admin",))

    response = await forward_auth.auth(cookie=cookie, original_uri="/admin/x")

    assert response.status_code == 202
    assert response.headers["x-auth-request-roles"] == "admin"
    assert response.headers["x-auth-request-user"] == "root@example.com"


@pytest.mark.parametrize(
    "original_uri",
    ["/ADMIN/x", "/Admin", "/admin", "//admin/x", "/%61dmin/x", "/public/../admin",
     "/public/..%2fadmin", "/public/%2e%2e/admin", "/deals/../admin/x?y=1"],
)
async def test_auth_role_rule_holds_for_path_variants(
    forward_auth: ForwardAuth, original_uri: str
) -> None:
    cookie, _ = await forward_auth.create_session()

    response = await forward_auth.auth(cookie=cookie, original_uri=original_uri)

    assert response.status_code == 403


async def test_auth_refuses_untrusted_peer(forward_auth: ForwardAuth) -> None:
    """oauth2-proxy GHSA-7x63-xv5r-3p2x: only a trusted proxy may name the checked request."""
    cookie, _ = await forward_auth.create_session()

    with_header = await forward_auth.auth(
        cookie=cookie, original_uri="/deals", peer=UNTRUSTED_PEER)
    without_header = await forward_auth.auth(cookie=cookie, peer=UNTRUSTED_PEER)

    assert with_header.status_code == 401
    assert without_header.status_code == 401
    assert "x-auth-request-user" not in with_header.headers


async def test_auth_refuses_missing_original_uri(forward_auth: ForwardAuth) -> None:
    """authelia GHSA-68wm-pfjf-wqp6: a check without a target must not answer 2xx."""
    cookie, _ = await forward_auth.create_session()

    response = await forward_auth.auth(cookie=cookie)

    assert response.status_code == 401


async def test_untrusted_peer_cannot_claim_public_path(forward_auth: ForwardAuth) -> None:
    response = await forward_auth.auth(original_uri="/public/logo.png", peer=UNTRUSTED_PEER)

    assert response.status_code == 401


async def test_auth_passes_public_path_without_identity(forward_auth: ForwardAuth) -> None:
    response = await forward_auth.auth(original_uri="/public/logo.png")

    assert response.status_code == 202
    assert identity_headers_of(response) == {}


BAD_ORIGINAL_URIS = {
    "invalid_escape": "/%zz%",
    "raw_space": "/a b",
    "encoded_slash_traversal": "/public/..%2fadmin",
    "dot_segment_parameter": "/public/..;/admin",
    "double_encoding": "/public/%252e%252e/admin",
    "backslash": "/public\\..\\admin",
    "encoded_hash": "/public/x%23/../../admin",
    "encoded_question_mark": "/public/x%3F/../../admin",
    "encoded_nul": "/public/%00/../../admin",
    "no_leading_slash": "admin",
    "overlong_utf8_dots": "/%c0%ae%c0%ae/admin",
    "long_admin_path": "/admin/" + "a" * 8000,
}


@pytest.mark.parametrize(
    "original_uri", list(BAD_ORIGINAL_URIS.values()), ids=list(BAD_ORIGINAL_URIS)
)
@pytest.mark.parametrize("signed_in", [False, True], ids=["anonymous", "signed_in"])
async def test_auth_never_allows_bad_original_uri(
    forward_auth: ForwardAuth, original_uri: str, signed_in: bool
) -> None:
    cookie = (await forward_auth.create_session())[0] if signed_in else None

    response = await forward_auth.auth(cookie=cookie, original_uri=original_uri)

    assert response.status_code in (401, 403)
    assert identity_headers_of(response) == {}


@pytest.mark.parametrize(
    "headers",
    [{"Accept": "text/html"}, {"Accept": "application/json"},
     {"X-Requested-With": "XMLHttpRequest"}, {"Accept": "*/*"}, {}],
    ids=["html", "json", "xhr", "any", "none"],
)
@pytest.mark.parametrize("base_url", [FORWARD_AUTH_URL, "https://crm.example.com"],
                         ids=["http", "https"])
@pytest.mark.parametrize("original_uri", ["/deals", "/admin/x", "/%zz"],
                         ids=["plain", "ruled", "ambiguous"])
async def test_auth_never_redirects(
    forward_auth: ForwardAuth, headers: dict[str, str], base_url: str, original_uri: str
) -> None:
    sent = {**headers, "X-Original-URI": original_uri}

    response = await forward_auth.request(headers=sent, base_url=base_url)

    assert response.status_code == 401
    assert "location" not in response.headers


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT", "DELETE", "OPTIONS"])
async def test_auth_answers_every_method(forward_auth: ForwardAuth, method: str) -> None:
    cookie, _ = await forward_auth.create_session()

    target = {"X-Original-URI": "/deals"}
    signed_in = await forward_auth.request(cookie=cookie, method=method, headers=target)
    anonymous = await forward_auth.request(method=method, headers=target)

    assert signed_in.status_code == 202
    assert anonymous.status_code == 401


async def test_auth_decides_before_reading_body(forward_auth: ForwardAuth) -> None:
    cookie, _ = await forward_auth.create_session()
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/oauth2/auth", "raw_path": b"/oauth2/auth",
        "query_string": b"", "root_path": "", "client": (TRUSTED_PEER, 1234),
        "server": ("127.0.0.1", 4180),
        "headers": [
            (b"host", b"127.0.0.1:4180"), (b"content-length", b"9000000"),
            (b"content-type", b"application/octet-stream"),
            (b"cookie", f"moko_session={cookie}".encode("ascii")),
            (b"x-original-uri", b"/documents/upload"),
        ],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        await forward_auth.app(scope, receive, send)

    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 202


# --- health and readiness ----------------------------------------------------------


async def test_healthz_returns_200(forward_auth: ForwardAuth) -> None:
    response = await forward_auth.request("/healthz", peer=UNTRUSTED_PEER)

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_returns_200_when_provider_discovery_works(
    forward_auth: ForwardAuth,
) -> None:
    response = await forward_auth.request("/readyz")

    assert response.status_code == 200
    assert response.json() == {"ready": True, "checks": {"store": True, "provider:idp": True}}


async def test_readyz_returns_503_when_provider_discovery_fails(
    make_forward_auth: Callable[..., Any],
) -> None:
    router = respx.Router(assert_all_called=False)
    router.get(f"{ISSUER}/.well-known/openid-configuration").mock(
        return_value=httpx.Response(502, text="bad gateway")
    )
    forward_auth: ForwardAuth = await make_forward_auth(router=router)

    response = await forward_auth.request("/readyz")

    assert response.status_code == 503
    assert response.json() == {"ready": False, "checks": {"store": True, "provider:idp": False}}


async def test_unknown_path_returns_404(forward_auth: ForwardAuth) -> None:
    cookie, _ = await forward_auth.create_session()

    response = await forward_auth.request("/deals", cookie=cookie, base_url="https://crm.example.com")

    assert response.status_code == 404
