"""API clients with ``Authorization: Bearer <JWT>`` through the middleware and the fake provider."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import respx
from conftest import PUBLIC_URL, GuardHarness, echo_app
from cryptography.hazmat.primitives import serialization
from support.fake_idp import CLIENT_ID, ISSUER, FakeIdp, new_rsa_key

from moko_guard import Guard, GuardMiddleware, Settings
from moko_guard.store import AuditFilter

pytestmark = pytest.mark.anyio

JSON = {"Accept": "application/json"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def valid_token(idp: FakeIdp, **changes: Any) -> str:
    claims = {**idp.claims(None), **changes}
    return idp.sign({key: value for key, value in claims.items() if value is not None})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned_token(idp: FakeIdp) -> str:
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(idp.claims(None)).encode())
    return f"{header}.{payload}."


def hmac_with_public_key_token(idp: FakeIdp) -> str:
    public_pem = idp.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": idp.kid}).encode())
    payload = b64url(json.dumps(idp.claims(None)).encode())
    signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def tampered_token(idp: FakeIdp) -> str:
    header, payload, signature = valid_token(idp).split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged["sub"] = "mallory-sub"
    return f"{header}.{b64url(json.dumps(forged).encode())}.{signature}"


def foreign_key_token(idp: FakeIdp) -> str:
    stranger = FakeIdp(key=new_rsa_key(), kid="key-2")
    return stranger.sign(idp.claims(None))


def assert_invalid_token_answer(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert "set-cookie" not in response.headers


async def test_valid_id_token_admits_without_cookie(harness: GuardHarness, idp: FakeIdp) -> None:
    response = await harness.client.get("/api/deals", headers=bearer(valid_token(idp)))

    echo = response.json()
    assert response.status_code == 200
    assert echo["user"] == "alice@example.com"
    assert echo["headers"]["x-auth-request-user"] == "alice@example.com"
    assert echo["headers"]["x-auth-request-provider"] == "idp"
    assert "set-cookie" not in response.headers
    assert harness.client.cookies.get("moko_session") is None


async def test_first_bearer_call_provisions_user_once(harness: GuardHarness,
                                                      idp: FakeIdp) -> None:
    token = valid_token(idp)

    for _ in range(3):
        response = await harness.client.get("/api/deals", headers=bearer(token))
        assert response.status_code == 200

    provisioned = await harness.guard.store.list_audit(AuditFilter(event="user.provisioned"))
    assert len(provisioned) == 1
    assert (await harness.guard.store.user_by_email("alice@example.com")) is not None


async def test_access_token_for_api_audience_admitted(make_harness: Callable[..., Any],
                                                      idp: FakeIdp) -> None:
    harness = await make_harness(providers=[{
        "id": "idp", "type": "oidc", "name": "Example IdP", "issuer": ISSUER,
        "client_id": CLIENT_ID, "client_secret": "crm-client-secret",
        "id_token_algorithms": ["RS256"], "api_audiences": ["https://crm.example.com/api"],
    }])
    token = valid_token(idp, aud="https://crm.example.com/api")

    response = await harness.client.get("/api/deals", headers=bearer(token))

    assert response.status_code == 200
    assert response.json()["user"] == "alice@example.com"


INVALID_TOKENS: dict[str, Callable[[FakeIdp], str]] = {
    "expired": lambda idp: valid_token(idp, exp=int(time.time()) - 3600,
                                       iat=int(time.time()) - 7200),
    "wrong_audience": lambda idp: valid_token(idp, aud="another-client"),
    "api_audience_not_configured": lambda idp: valid_token(idp, aud="https://crm.example.com/api"),
    "wrong_issuer": lambda idp: valid_token(idp, iss="https://evil.example"),
    "issued_in_future": lambda idp: valid_token(idp, iat=int(time.time()) + 3600),
    "alg_none": unsigned_token,
    "hmac_with_public_key": hmac_with_public_key_token,
    "tampered_claims": tampered_token,
    "unknown_signing_key": foreign_key_token,
    "garbage_three_parts": lambda idp: "abc.def.ghi",
    "not_a_jwt": lambda idp: "opaque-access-token",
}


@pytest.mark.parametrize("make_token", list(INVALID_TOKENS.values()), ids=list(INVALID_TOKENS))
async def test_invalid_token_gets_401_json(harness: GuardHarness, idp: FakeIdp,
                                           make_token: Callable[[FakeIdp], str]) -> None:
    response = await harness.client.get("/api/deals", headers=bearer(make_token(idp)))

    assert_invalid_token_answer(response)
    denied = await harness.guard.store.list_audit(AuditFilter(event="access.denied"))
    assert [record.reason for record in denied] == ["token_invalid"]
    assert await harness.guard.store.user_by_email("alice@example.com") is None


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Bearer a b", "Bearer tok\u00e9n"],
                         ids=["no_token", "empty_token", "two_tokens", "non_ascii"])
async def test_malformed_bearer_header_gets_401_json(harness: GuardHarness, header: str) -> None:
    raw_header = [(b"Authorization", header.encode("utf-8"))]

    response = await harness.client.get("/api/deals", headers=raw_header)

    assert_invalid_token_answer(response)


async def test_browser_with_invalid_token_gets_401_not_redirect(harness: GuardHarness) -> None:
    response = await harness.client.get(
        "/deals", headers={"Accept": "text/html", **bearer("abc.def.ghi")})

    assert_invalid_token_answer(response)


async def test_basic_authorization_is_not_a_bearer_token(harness: GuardHarness) -> None:
    response = await harness.client.get("/api/deals", headers=JSON, auth=("alice", "secret"))

    assert response.status_code == 401
    assert response.json()["error"] == "unauthenticated"


async def test_disabled_user_refused(harness: GuardHarness, idp: FakeIdp) -> None:
    await harness.client.get("/api/deals", headers=bearer(valid_token(idp)))
    user = await harness.guard.store.user_by_email("alice@example.com")
    assert user is not None
    await harness.guard.store.set_disabled(user.id, True)
    fresh_token = valid_token(idp, jti="second-token")

    response = await harness.client.get("/api/deals", headers=bearer(fresh_token))

    assert response.status_code == 403
    assert response.json()["error"] == "user_disabled"
    assert "set-cookie" not in response.headers
    denied = await harness.guard.store.list_audit(AuditFilter(event="access.denied"))
    assert [record.reason for record in denied] == ["user_disabled"]


async def test_unknown_identity_refused_without_provisioning(make_harness: Callable[..., Any],
                                                             idp: FakeIdp) -> None:
    harness = await make_harness(access={"auto_provision": False})

    response = await harness.client.get("/api/deals", headers=bearer(valid_token(idp)))

    assert response.status_code == 403
    assert response.json()["error"] == "provisioning_disabled"


async def test_role_rule_applies_to_bearer_user(make_harness: Callable[..., Any],
                                                idp: FakeIdp) -> None:
    harness = await make_harness(access={"rules": [{"path": "/admin", "roles": ["admin"]}]})

    response = await harness.client.get("/admin/users",
                                        headers={**JSON, **bearer(valid_token(idp))})

    assert response.status_code == 403
    assert response.json()["error"].startswith("missing_role")


async def test_valid_session_wins_over_bad_token(harness: GuardHarness) -> None:
    await harness.sign_in()

    response = await harness.client.get("/api/deals", headers=bearer("abc.def.ghi"))

    assert response.status_code == 200
    assert response.json()["user"] == "alice@example.com"


async def test_public_path_ignores_bearer_token(harness: GuardHarness) -> None:
    response = await harness.client.get("/public/logo.png", headers=bearer("abc.def.ghi"))

    assert response.status_code == 200
    assert "x-auth-request-user" not in response.json()["headers"]


# --- the cache, with a clock the test moves --------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


Clocked = tuple[Guard, httpx.AsyncClient, Clock]


@pytest.fixture
async def clocked(make_settings: Callable[..., Settings],
                  idp_router: respx.Router) -> AsyncIterator[Clocked]:
    clock = Clock()
    provider_http = httpx.AsyncClient(transport=httpx.MockTransport(idp_router.handler))
    guard = Guard(make_settings(session={"revocation_poll_interval": "30s"}),
                  http_client=provider_http, clock=clock)
    app = GuardMiddleware(echo_app(), guard=guard)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC_URL)
    yield guard, client, clock
    await client.aclose()
    await guard.shutdown()
    await provider_http.aclose()


async def test_cached_token_rechecked_after_interval(clocked: Clocked, idp: FakeIdp) -> None:
    guard, client, clock = clocked
    token = valid_token(idp)
    first = await client.get("/api/deals", headers=bearer(token))
    user = await guard.store.user_by_email("alice@example.com")
    assert user is not None
    await guard.store.set_disabled(user.id, True)

    cached = await client.get("/api/deals", headers=bearer(token))
    clock.now += 31
    rechecked = await client.get("/api/deals", headers=bearer(token))

    assert first.status_code == 200
    assert cached.status_code == 200
    assert rechecked.status_code == 403
    assert rechecked.json()["error"] == "user_disabled"


async def test_cached_token_expires_with_token(clocked: Clocked, idp: FakeIdp) -> None:
    _, client, clock = clocked
    token = valid_token(idp, exp=int(clock.now) + 20)
    first = await client.get("/api/deals", headers=bearer(token))

    clock.now += 20 + 61
    expired = await client.get("/api/deals", headers=bearer(token))

    assert first.status_code == 200
    assert_invalid_token_answer(expired)
