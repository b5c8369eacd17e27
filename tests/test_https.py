"""HTTPS enforcement: redirects, HSTS, trusted X-Forwarded-Proto and cookie flags."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import GuardHarness, echo_app
from moko_guard import GuardMiddleware

pytestmark = pytest.mark.anyio

TRUSTED = ("127.0.0.2", 5000)
UNTRUSTED = ("203.0.113.7", 5000)


def _client(harness: GuardHarness, base_url: str, peer: tuple[str, int]) -> httpx.AsyncClient:
    app = GuardMiddleware(echo_app(), guard=harness.guard)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=peer),
                             base_url=base_url)


async def test_plain_http_get_redirected_to_https(harness: GuardHarness) -> None:
    async with _client(harness, "http://crm.example.com", UNTRUSTED) as client:
        response = await client.get("/deals?id=5")

    assert response.status_code == 308
    assert response.headers["location"] == "https://crm.example.com/deals?id=5"
    assert "set-cookie" not in response.headers


async def test_plain_http_post_refused(harness: GuardHarness) -> None:
    async with _client(harness, "http://crm.example.com", UNTRUSTED) as client:
        response = await client.post("/deals", content=b"x")

    assert response.status_code == 403
    assert response.json()["error"] == "https_required"


async def test_forwarded_proto_from_trusted_proxy_counts(harness: GuardHarness) -> None:
    async with _client(harness, "http://crm.example.com", TRUSTED) as client:
        response = await client.get("/oauth2/sign_in", headers={"X-Forwarded-Proto": "https"})

    assert response.status_code == 200
    assert response.headers["strict-transport-security"].startswith("max-age=31536000")


async def test_forwarded_proto_from_untrusted_peer_ignored(harness: GuardHarness) -> None:
    async with _client(harness, "http://crm.example.com", UNTRUSTED) as client:
        response = await client.get("/oauth2/sign_in", headers={"X-Forwarded-Proto": "https"})

    assert response.status_code == 308


async def test_hsts_sent_over_https(harness: GuardHarness) -> None:
    response = await harness.client.get("/oauth2/sign_in")

    assert "includeSubDomains" in response.headers["strict-transport-security"]


async def test_auth_endpoint_never_redirected(harness: GuardHarness) -> None:
    async with _client(harness, "http://guard.internal", UNTRUSTED) as client:
        response = await client.get("/oauth2/auth")

    assert response.status_code == 401


async def test_http_redirect_target_refused(harness: GuardHarness) -> None:
    response = await harness.sign_in("http://crm.example.com/deals")

    assert response.headers["location"] == "/"


async def test_cookies_secure_under_https(harness: GuardHarness) -> None:
    start, _ = await harness.start_login()
    flow_cookie = start.headers["set-cookie"]

    assert "Secure" in flow_cookie
    assert "HttpOnly" in flow_cookie
    assert "samesite=lax" in flow_cookie.lower()


async def test_insecure_mode_sets_no_secure_flag(make_harness: Any) -> None:
    harness: GuardHarness = await make_harness(server={
        "public_url": "http://127.0.0.1:8000", "enforce_https": False,
        "insecure_allow_http": True})

    async with _client(harness, "http://127.0.0.1:8000", ("127.0.0.1", 5000)) as client:
        response = await client.get("/oauth2/start", params={"provider": "idp"})

    assert response.status_code == 302
    assert "Secure" not in response.headers["set-cookie"]
    assert "strict-transport-security" not in response.headers
