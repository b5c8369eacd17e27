"""The admin pages: access, CSRF protection, actions and their audit events."""

from __future__ import annotations

import re
from typing import Any

import pytest

from conftest import GuardHarness
from moko_guard.store import AuditFilter

pytestmark = pytest.mark.anyio


async def _admin_harness(make_harness: Any) -> GuardHarness:
    harness: GuardHarness = await make_harness(access={"default_roles": ["user", "admin"]})
    await harness.sign_in()
    return harness


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert match, "no CSRF token on the admin page"
    return match.group(1)


async def _add_user(harness: GuardHarness, email: str, subject: str) -> int:
    user, _ = await harness.guard.store.create_user_with_identity(
        username=email, email=email, display_name=None, roles=["user"], provider="idp",
        subject=subject, identity_email=email,
    )
    return user.id


async def test_admin_page_lists_users_and_chart(make_harness: Any) -> None:
    harness = await _admin_harness(make_harness)

    response = await harness.client.get("/oauth2/admin")

    assert response.status_code == 200
    assert "alice@example.com" in response.text
    assert "idp: alice-sub" in response.text
    assert "<svg class=\"chart\"" in response.text
    assert "login.success" in response.text


async def test_admin_page_needs_admin_role(harness: GuardHarness) -> None:
    anonymous = await harness.client.get("/oauth2/admin")
    await harness.sign_in()

    user_page = await harness.client.get("/oauth2/admin")

    assert anonymous.status_code == 302
    assert user_page.status_code == 403


async def test_disable_ends_sessions_and_is_audited(make_harness: Any) -> None:
    harness = await _admin_harness(make_harness)
    bob_id = await _add_user(harness, "bob@example.com", "bob-sub")
    page = await harness.client.get("/oauth2/admin")

    response = await harness.client.post(
        "/oauth2/admin/disable", data={"csrf": _csrf(page.text), "user_id": str(bob_id)},
        headers={"Origin": "https://crm.example.com"},
    )

    assert response.status_code == 303
    bob = await harness.guard.store.user_by_id(bob_id)
    assert bob is not None and bob.disabled
    events = await harness.guard.store.list_audit(AuditFilter(event="user.disabled"))
    assert len(events) == 1
    assert events[0].user_id == bob_id
    assert "alice@example.com" in (events[0].detail or "")


@pytest.mark.parametrize(
    ("token", "origin"),
    [("0" * 64, "https://crm.example.com"), (None, "https://evil.example"), ("", None)],
    ids=["wrong-token", "foreign-origin", "empty-token"],
)
async def test_admin_action_refused_without_valid_csrf(
    make_harness: Any, token: str | None, origin: str | None
) -> None:
    harness = await _admin_harness(make_harness)
    bob_id = await _add_user(harness, "bob@example.com", "bob-sub")
    page = await harness.client.get("/oauth2/admin")
    headers = {"Origin": origin} if origin else {}

    response = await harness.client.post(
        "/oauth2/admin/disable",
        data={"csrf": _csrf(page.text) if token is None else token, "user_id": str(bob_id)},
        headers=headers,
    )

    assert response.status_code == 403
    bob = await harness.guard.store.user_by_id(bob_id)
    assert bob is not None and not bob.disabled


async def test_unlink_removes_identity(make_harness: Any) -> None:
    harness = await _admin_harness(make_harness)
    bob_id = await _add_user(harness, "bob@example.com", "bob-sub")
    page = await harness.client.get("/oauth2/admin")

    await harness.client.post("/oauth2/admin/unlink", data={
        "csrf": _csrf(page.text), "user_id": str(bob_id), "provider": "idp", "subject": "bob-sub",
    })

    assert await harness.guard.store.identities_of(bob_id) == []
    events = await harness.guard.store.list_audit(AuditFilter(event="identity.unlinked"))
    assert [e.subject for e in events] == ["bob-sub"]


async def test_audit_filter_and_paging(make_harness: Any) -> None:
    harness = await _admin_harness(make_harness)
    for _ in range(55):
        await harness.client.get("/oauth2/callback", params={"state": "bad", "code": "x"})

    first = await harness.client.get("/oauth2/admin", params={"outcome": "failure"})
    second = await harness.client.get("/oauth2/admin", params={"outcome": "failure", "page": "2"})

    assert first.text.count("<td>login.failure</td>") == 50
    assert "Older" in first.text
    assert second.text.count("<td>login.failure</td>") == 5
    assert "<td>login.success</td>" not in first.text
