"""Explicit account linking through /oauth2/link."""

from __future__ import annotations

import pytest

from conftest import GuardHarness, page_reason
from moko_guard.store import AuditFilter

pytestmark = pytest.mark.anyio


async def _start_link(harness: GuardHarness, rd: str = "/profile") -> dict[str, str]:
    response = await harness.client.get("/oauth2/link", params={"provider": "idp", "rd": rd})
    assert response.status_code == 302, response.text
    return harness.idp.remember_nonce(response.headers["location"])


async def test_link_adds_identity_to_signed_in_user(harness: GuardHarness) -> None:
    await harness.sign_in()
    cookie = harness.client.cookies.get("moko_session")
    params = await _start_link(harness)
    harness.idp.subject = "alice-second-account"
    harness.idp.email = "alice.private@other.example"

    response = await harness.client.get(
        "/oauth2/callback", params={"code": "c", "state": params["state"]})

    assert response.status_code == 302
    assert response.headers["location"] == "/profile"
    assert harness.client.cookies.get("moko_session") == cookie
    user = await harness.guard.store.user_by_email("alice@example.com")
    assert user is not None
    subjects = [i.subject for i in await harness.guard.store.identities_of(user.id)]
    assert subjects == ["alice-sub", "alice-second-account"]
    linked = await harness.guard.store.list_audit(AuditFilter(event="identity.linked"))
    assert [(e.reason, e.user_id) for e in linked] == [("explicit_link", user.id)]


async def test_link_needs_a_session(harness: GuardHarness) -> None:
    response = await harness.client.get("/oauth2/link", params={"provider": "idp"})

    assert response.status_code == 302
    assert response.headers["location"].startswith("/oauth2/sign_in?rd=")


async def test_link_refuses_identity_of_another_user(harness: GuardHarness) -> None:
    await harness.guard.ensure_started()
    await harness.guard.store.create_user_with_identity(
        username="bob@example.com", email="bob@example.com", display_name=None, roles=[],
        provider="idp", subject="bob-sub", identity_email=None)
    await harness.sign_in()
    params = await _start_link(harness)
    harness.idp.subject = "bob-sub"

    response = await harness.client.get(
        "/oauth2/callback", params={"code": "c", "state": params["state"]})

    assert response.status_code == 409
    assert page_reason(response) == "identity_taken"
    assert "identity_taken" in await harness.audit_reasons()


async def test_link_fails_when_session_ended(harness: GuardHarness) -> None:
    await harness.sign_in()
    params = await _start_link(harness)
    await harness.client.post("/oauth2/sign_out")
    harness.idp.subject = "alice-second-account"

    response = await harness.client.get(
        "/oauth2/callback", params={"code": "c", "state": params["state"]})

    assert response.status_code == 403
    assert page_reason(response) == "link_session_mismatch"
    user = await harness.guard.store.user_by_email("alice@example.com")
    assert user is not None
    assert len(await harness.guard.store.identities_of(user.id)) == 1


async def test_link_unknown_provider(harness: GuardHarness) -> None:
    await harness.sign_in()

    response = await harness.client.get("/oauth2/link", params={"provider": "nope"})

    assert response.status_code == 400
    assert page_reason(response) == "unknown_provider"
