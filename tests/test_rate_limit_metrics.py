"""The sign-in rate limit and the Prometheus metrics."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import PUBLIC_URL, GuardHarness, page_reason
from moko_guard.ratelimit import RateLimiter
from moko_guard.server import create_app

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_refills_over_time() -> None:
    clock = FakeClock()
    limiter = RateLimiter(per_minute=60, burst=2, clock=clock)

    first, second, third = (limiter.allow("a") for _ in range(3))
    clock.now += 1.0
    refilled = limiter.allow("a")

    assert first == (True, 0)
    assert second == (True, 0)
    assert third == (False, 1)
    assert refilled == (True, 0)
    assert limiter.allow("b") == (True, 0)


def test_zero_rate_turns_limit_off() -> None:
    limiter = RateLimiter(per_minute=0, burst=1)

    results = [limiter.allow("a")[0] for _ in range(100)]

    assert all(results)


async def test_sign_in_flood_gets_429(make_harness: Any) -> None:
    harness: GuardHarness = await make_harness(rate_limit={"sign_in_per_minute": 6, "burst": 3})

    statuses = [
        (await harness.client.get("/oauth2/start", params={"provider": "idp"})).status_code
        for _ in range(5)
    ]
    limited = await harness.client.get("/oauth2/start", params={"provider": "idp"})

    assert statuses == [302, 302, 302, 429, 429]
    assert page_reason(limited) == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert "rate_limited" in await harness.audit_reasons()


async def test_metrics_count_sign_ins(make_harness: Any) -> None:
    harness: GuardHarness = await make_harness()
    await harness.sign_in()
    await harness.client.get("/oauth2/callback", params={"state": "bad"})
    await harness.client.get("/deals")
    app = create_app(harness.guard.settings, guard=harness.guard)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC_URL)

    async with client:
        text = (await client.get("/metrics")).text

    assert 'moko_guard_sign_ins_total{outcome="success",provider="idp",reason=""} 1.0' in text
    assert 'moko_guard_sign_ins_total{outcome="failure",provider="",reason="state_mismatch"} 1.0' in text
    assert 'moko_guard_auth_check_seconds_count{decision="allow"} 1.0' in text


async def test_metrics_hidden_from_open_network(make_harness: Any) -> None:
    harness: GuardHarness = await make_harness()
    app = create_app(harness.guard.settings, guard=harness.guard)
    outsider = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("203.0.113.7", 1234)), base_url=PUBLIC_URL)
    proxy = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("127.0.0.2", 1234)), base_url=PUBLIC_URL)

    async with outsider, proxy:
        hidden = await outsider.get("/metrics")
        shown = await proxy.get("/metrics")

    assert hidden.status_code == 404
    assert shown.status_code == 200
