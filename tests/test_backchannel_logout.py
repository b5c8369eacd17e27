"""Back-channel logout (OpenID Connect Back-Channel Logout 1.0) against the fake provider."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from conftest import GuardHarness
from moko_guard import logout as logout_module
from moko_guard.logout import LOGOUT_EVENT, ReplayCache
from moko_guard.store import AuditFilter
from support.fake_idp import CLIENT_ID, ISSUER

pytestmark = pytest.mark.anyio


def logout_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER, "aud": CLIENT_ID, "iat": now, "exp": now + 120, "jti": uuid.uuid4().hex,
        "sub": "alice-sub", "sid": "op-session-1", "events": {LOGOUT_EVENT: {}},
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


async def _signed_in(harness: GuardHarness) -> str:
    harness.idp.extra_claims = {"sid": "op-session-1"}
    await harness.sign_in()
    cookie = harness.client.cookies.get("moko_session")
    assert cookie
    return cookie


async def _post_logout(harness: GuardHarness, token: str) -> int:
    response = await harness.client.post("/oauth2/backchannel_logout/idp",
                                         data={"logout_token": token})
    return response.status_code


async def test_logout_token_revokes_session(harness: GuardHarness) -> None:
    await _signed_in(harness)
    token = harness.idp.sign(logout_claims(), typ="logout+jwt")

    status = await _post_logout(harness, token)
    after = await harness.client.get("/deals", headers={"Accept": "application/json"})

    assert status == 200
    assert after.status_code == 401
    events = await harness.guard.store.list_audit(AuditFilter(event="session.revoked"))
    assert [e.reason for e in events] == ["backchannel_logout"]


async def test_logout_by_sid_only(harness: GuardHarness) -> None:
    await _signed_in(harness)

    status = await _post_logout(harness, harness.idp.sign(logout_claims(sub=None)))
    after = await harness.client.get("/deals", headers={"Accept": "application/json"})

    assert status == 200
    assert after.status_code == 401


@pytest.mark.parametrize(
    "changes",
    [
        {"events": None}, {"events": {"urn:other": {}}}, {"nonce": "n"},
        {"sub": None, "sid": None}, {"jti": None}, {"aud": "other-client"},
        {"iss": "https://other.test"}, {"iat": int(time.time()) + 3600},
        {"exp": int(time.time()) - 3600},
    ],
    ids=["no-events", "wrong-event", "nonce", "no-sub-or-sid", "no-jti", "wrong-aud",
         "wrong-iss", "future-iat", "expired"],
)
async def test_invalid_logout_token_rejected(
    harness: GuardHarness, changes: dict[str, Any]
) -> None:
    await _signed_in(harness)

    status = await _post_logout(harness, harness.idp.sign(logout_claims(**changes)))
    after = await harness.client.get("/deals", headers={"Accept": "application/json"})

    assert status == 400
    assert after.status_code == 200


async def test_replayed_logout_token_rejected(harness: GuardHarness) -> None:
    await _signed_in(harness)
    token = harness.idp.sign(logout_claims())

    first = await _post_logout(harness, token)
    second = await _post_logout(harness, token)

    assert first == 200
    assert second == 400


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "é.é.é"], ids=repr)
async def test_garbage_logout_token_rejected(harness: GuardHarness, token: str) -> None:
    status = await _post_logout(harness, token)

    assert status == 400


async def test_unknown_provider_rejected(harness: GuardHarness) -> None:
    response = await harness.client.post("/oauth2/backchannel_logout/nope",
                                         data={"logout_token": "x.y.z"})

    assert response.status_code == 400


@pytest.mark.parametrize("typ", ["JWT", "application/logout+jwt", "Logout+JWT"])
async def test_logout_token_typ_variants_accepted(harness: GuardHarness, typ: str) -> None:
    await _signed_in(harness)

    status = await _post_logout(harness, harness.idp.sign(logout_claims(), typ=typ))

    assert status == 200


@pytest.mark.parametrize("typ", ["at+jwt", "secevent+jwt", "JWS"])
async def test_logout_token_other_typ_rejected(harness: GuardHarness, typ: str) -> None:
    await _signed_in(harness)

    status = await _post_logout(harness, harness.idp.sign(logout_claims(), typ=typ))
    after = await harness.client.get("/deals", headers={"Accept": "application/json"})

    assert status == 400
    assert after.status_code == 200


# --- replay cache ------------------------------------------------------------------


def test_replay_cache_forgets_jti_after_expiry() -> None:
    replays = ReplayCache()
    assert replays.check_and_add("jti-1", expires_at=1000.0, now=900.0) is True

    inside = replays.check_and_add("jti-1", expires_at=1000.0, now=1000.0)
    after = replays.check_and_add("jti-1", expires_at=2000.0, now=1000.5)

    assert inside is False
    assert after is True


def test_replay_cache_drops_oldest_jti_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logout_module, "_SEEN_JTI_LIMIT", 2)
    replays = ReplayCache()
    for jti in ("jti-1", "jti-2", "jti-3"):
        assert replays.check_and_add(jti, expires_at=1000.0, now=900.0) is True

    newest_again = replays.check_and_add("jti-3", expires_at=1000.0, now=900.0)
    oldest_again = replays.check_and_add("jti-1", expires_at=1000.0, now=900.0)

    assert newest_again is False
    assert oldest_again is True
