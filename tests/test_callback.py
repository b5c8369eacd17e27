"""The sign-in flow through the middleware, against the fake provider."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conftest import GuardHarness, page_reason

pytestmark = pytest.mark.anyio


async def test_sign_in_provisions_user_and_sets_session(harness: GuardHarness) -> None:
    response = await harness.sign_in("/deals")

    assert response.status_code == 302
    assert response.headers["location"] == "/deals"
    cookie = response.headers.get_list("set-cookie")
    assert any(c.startswith("moko_session=") and "HttpOnly" in c and "Secure" in c for c in cookie)
    echo = (await harness.client.get("/deals")).json()
    assert echo["user"] == "alice@example.com"
    assert echo["headers"]["x-auth-request-email"] == "alice@example.com"
    assert echo["headers"]["x-auth-request-roles"] == "user"
    user = await harness.guard.store.user_by_email("alice@example.com")
    assert user is not None and user.roles == ("user",)


async def test_unauthenticated_browser_redirected_to_sign_in(harness: GuardHarness) -> None:
    response = await harness.client.get("/deals?id=5", headers={"Accept": "text/html"})

    assert response.status_code == 302
    assert response.headers["location"] == "/oauth2/sign_in?rd=%2Fdeals%3Fid%3D5"


async def test_api_client_gets_401_json(harness: GuardHarness) -> None:
    for headers in ({"Accept": "application/json"}, {"X-Requested-With": "XMLHttpRequest"}):
        response = await harness.client.get("/api/deals", headers=headers)

        assert response.status_code == 401
        assert response.json()["error"] == "unauthenticated"


async def test_callback_rejects_wrong_state(harness: GuardHarness) -> None:
    _, params = await harness.start_login()
    attempt = params["state"].split(".")[0]
    forged = attempt + "." + "A" * 32

    response = await harness.client.get("/oauth2/callback", params={"code": "c", "state": forged})

    assert response.status_code == 400
    assert page_reason(response) == "state_mismatch"
    assert await harness.audit_reasons() == ["state_mismatch"]


@pytest.mark.parametrize("state", [None, "", "garbage", "a.b", "x" * 500], ids=repr)
async def test_callback_rejects_missing_or_malformed_state(
    harness: GuardHarness, state: str | None
) -> None:
    params = {"code": "c"} if state is None else {"code": "c", "state": state}

    response = await harness.client.get("/oauth2/callback", params=params)

    assert response.status_code == 400
    assert page_reason(response) == "state_mismatch"


async def test_replayed_callback_fails_cleanly(harness: GuardHarness) -> None:
    start, params = await harness.start_login()
    flow_cookie = next(c for c in start.headers.get_list("set-cookie") if c.startswith("moko_flow_"))
    name, value = flow_cookie.split(";", 1)[0].split("=", 1)
    first = await harness.client.get("/oauth2/callback", params={"code": "c", "state": params["state"]})
    assert first.status_code == 302

    harness.client.cookies.set(name, value, path="/oauth2/callback")
    replay = await harness.client.get(
        "/oauth2/callback", params={"code": "c", "state": params["state"]}
    )

    assert replay.status_code == 400
    assert page_reason(replay) == "flow_replayed"


async def test_parallel_tabs_each_complete(harness: GuardHarness) -> None:
    _, first = await harness.start_login("/one")
    first_nonce = harness.idp.last_nonce
    _, second = await harness.start_login("/two")

    response_two = await harness.client.get(
        "/oauth2/callback", params={"code": "c2", "state": second["state"]})
    harness.idp.last_nonce = first_nonce
    response_one = await harness.client.get(
        "/oauth2/callback", params={"code": "c1", "state": first["state"]})

    assert response_two.headers["location"] == "/two"
    assert response_one.headers["location"] == "/one"


async def test_provider_error_parameter_is_audited(harness: GuardHarness) -> None:
    _, params = await harness.start_login()

    response = await harness.client.get(
        "/oauth2/callback", params={"error": "access_denied", "state": params["state"]})

    assert response.status_code == 403
    assert page_reason(response) == "provider_denied"
    assert await harness.audit_reasons() == ["provider_denied"]


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, {}), (503, {"error": "temporarily_unavailable"}), (400, {"error": "invalid_grant"})],
    ids=["500", "503", "invalid_grant"],
)
async def test_token_endpoint_errors_become_provider_error(
    harness: GuardHarness, status: int, body: dict[str, str]
) -> None:
    harness.idp.token_status = status
    harness.idp.token_body = body

    response = await harness.sign_in()

    assert response.status_code == 502
    assert page_reason(response) == "provider_error"
    assert "Traceback" not in response.text
    assert await harness.audit_reasons() == ["provider_error"]


async def test_unverified_email_not_provisioned(harness: GuardHarness) -> None:
    harness.idp.email_verified = False

    response = await harness.sign_in()

    assert response.status_code == 403
    assert page_reason(response) == "email_unverified"
    assert await harness.guard.store.list_users() == []


@pytest.mark.parametrize(
    "email",
    ["alice@evilexample.com", "alice@example.com.evil.example", "alice@sub.example.com"],
)
async def test_email_domain_matched_exactly(harness: GuardHarness, email: str) -> None:
    harness.idp.email = email

    response = await harness.sign_in()

    assert response.status_code == 403
    assert page_reason(response) == "domain_not_allowed"
    assert await harness.guard.store.list_users() == []


@pytest.mark.parametrize(
    "email",
    ["alice@example.com@evil.example", "mallory@evil.example@example.com", "a b@example.com",
     "alice@example.com\n", "@example.com", "alice@"],
    ids=repr,
)
async def test_malformed_email_rejected(harness: GuardHarness, email: str) -> None:
    """oauth2-proxy GHSA-c5c4-8r6x-56w3: an address with two "@" must not pass a domain check."""
    harness.idp.email = email

    response = await harness.sign_in()

    assert response.status_code == 403
    assert page_reason(response) == "malformed_email"
    assert await harness.guard.store.list_users() == []


async def test_provisioning_off_refuses_unknown_identity(make_harness) -> None:  # type: ignore[no-untyped-def]
    harness = await make_harness(access={"auto_provision": False})

    response = await harness.sign_in()

    assert response.status_code == 403
    assert page_reason(response) == "provisioning_disabled"
    assert await harness.audit_reasons() == ["provisioning_disabled"]


async def test_disabled_user_refused(harness: GuardHarness) -> None:
    await harness.sign_in()
    user = await harness.guard.store.user_by_email("alice@example.com")
    assert user is not None
    await harness.guard.store.set_disabled(user.id, True)
    harness.client.cookies.clear()

    response = await harness.sign_in()

    assert response.status_code == 403
    assert page_reason(response) == "user_disabled"


async def test_returning_identity_maps_to_same_user(harness: GuardHarness) -> None:
    await harness.sign_in()
    harness.client.cookies.clear()
    harness.idp.email = "alice.new@example.com"

    response = await harness.sign_in()

    assert response.status_code == 302
    users = await harness.guard.store.list_users()
    assert len(users) == 1


async def test_unsafe_rd_falls_back_to_root(harness: GuardHarness) -> None:
    response = await harness.sign_in("//evil.example/landing")

    assert response.headers["location"] == "/"


async def test_sign_out_kills_copied_cookie(harness: GuardHarness) -> None:
    await harness.sign_in()
    copied = harness.client.cookies.get("moko_session")
    assert copied

    signed_out = await harness.client.post("/oauth2/sign_out")
    assert signed_out.status_code == 200
    harness.client.cookies.clear()
    harness.client.cookies.set("moko_session", copied)
    replay = await harness.client.get("/deals", headers={"Accept": "application/json"})

    assert replay.status_code == 401
    assert await harness.guard.store.is_session_active("nonexistent") is False


async def test_client_identity_headers_stripped(harness: GuardHarness) -> None:
    await harness.sign_in()
    forged = {
        "X-Auth-Request-User": "mallory", "X_Auth_Request_User": "mallory",
        "x-forwarded-user": "mallory", "Remote-User": "mallory", "X-Forwarded-Email": "m@evil.example",
    }

    echo = (await harness.client.get("/deals", headers=forged)).json()

    values = [v for k, v in echo["headers"].items() if "mallory" in v or "evil" in v]
    assert values == []
    assert echo["headers"]["x-auth-request-user"] == "alice@example.com"
    assert "moko_session" not in echo["headers"].get("cookie", "")


async def test_public_path_passes_without_session(harness: GuardHarness) -> None:
    response = await harness.client.get("/public/logo.png", headers={"X-Auth-Request-User": "eve"})

    assert response.status_code == 200
    assert "x-auth-request-user" not in response.json()["headers"]


async def test_public_path_dot_segments_do_not_bypass(harness: GuardHarness) -> None:
    response = await harness.client.get("/public/%2e%2e/admin", headers={"Accept": "application/json"})

    assert response.status_code == 401


async def test_userinfo_requires_session(harness: GuardHarness) -> None:
    assert (await harness.client.get("/oauth2/userinfo")).status_code == 401
    await harness.sign_in()

    info = (await harness.client.get("/oauth2/userinfo")).json()

    assert info["email"] == "alice@example.com"


async def test_provider_discovery_outage_gives_503(
    make_harness, idp_router  # type: ignore[no-untyped-def]
) -> None:
    idp_router.routes.clear()
    idp_router.get("https://idp.test/.well-known/openid-configuration").respond(502)
    harness = await make_harness()

    response = await harness.client.get("/oauth2/start", params={"provider": "idp"})

    assert response.status_code == 503
    assert response.headers["retry-after"] == "30"
    assert page_reason(response) == "provider_unavailable"
    assert await harness.audit_reasons() == ["provider_unavailable"]


async def test_token_endpoint_timeout_gives_plain_page(
    harness: GuardHarness, idp_router  # type: ignore[no-untyped-def]
) -> None:
    _, params = await harness.start_login()
    idp_router.post("https://idp.test/token").mock(side_effect=httpx.ConnectTimeout("slow"))

    response = await harness.client.get(
        "/oauth2/callback", params={"code": "c", "state": params["state"]})

    assert response.status_code == 504
    assert page_reason(response) == "provider_timeout"
    assert await harness.audit_reasons() == ["provider_timeout"]


async def test_unknown_provider_is_audited(harness: GuardHarness) -> None:
    response = await harness.client.get("/oauth2/start", params={"provider": "nope"})

    assert response.status_code == 400
    assert page_reason(response) == "unknown_provider"
    assert await harness.audit_reasons() == ["unknown_provider"]


async def test_sso_only_blocks_native_login(make_harness) -> None:  # type: ignore[no-untyped-def]
    """Dolibarr issue #29356: the password form must stay shut in SSO-only mode."""
    harness = await make_harness(access={"native_login_paths": ["/login", "POST /index.php"]})
    await harness.sign_in()

    form = await harness.client.get("/login", headers={"Accept": "text/html"})
    post = await harness.client.post("/index.php", data={"username": "alice", "password": "x"})
    get_index = await harness.client.get("/index.php")

    assert form.status_code == 403
    assert "single sign-on" in form.text
    assert post.status_code == 403
    assert get_index.status_code == 200
    from moko_guard.store import AuditFilter

    denied = await harness.guard.store.list_audit(AuditFilter(event="access.denied"))
    assert [r.reason for r in denied] == ["sso_only", "sso_only"]


async def test_role_rule_names_missing_role(make_harness) -> None:  # type: ignore[no-untyped-def]
    harness = await make_harness(access={"rules": [{"path": "/admin", "roles": ["admin"]}]})
    await harness.sign_in()

    for path in ("/admin/users", "/ADMIN/users", "/public/..%2fadmin/users", "//admin"):
        url = "https://crm.example.com" + path
        response = await harness.client.get(url, headers={"Accept": "text/html"})

        assert response.status_code == 403, path
        assert "admin" in response.text


async def test_parallel_first_sign_ins_create_one_user(harness: GuardHarness) -> None:
    """strapi/strapi issue #25113: five tabs of a new user must not create five users."""
    states = []
    for index in range(5):
        _, params = await harness.start_login(f"/tab{index}")
        harness.idp.nonces_by_code[f"code-{index}"] = params["nonce"]
        states.append(params["state"])

    responses = await asyncio.gather(*(
        harness.client.get("/oauth2/callback", params={"code": f"code-{i}", "state": state})
        for i, state in enumerate(states)
    ))

    assert [r.status_code for r in responses] == [302] * 5
    assert len(await harness.guard.store.list_users()) == 1
    from moko_guard.store import AuditFilter

    provisioned = await harness.guard.store.list_audit(AuditFilter(event="user.provisioned"))
    successes = await harness.guard.store.list_audit(AuditFilter(event="login.success"))
    assert len(provisioned) == 1
    assert len(successes) == 5


async def test_complete_id_token_skips_userinfo(harness: GuardHarness) -> None:
    """An ID token with email, email_verified, name and preferred_username needs no userinfo call."""
    harness.idp.userinfo = {"sub": "someone-else"}  # would fail the sign-in if it were read

    response = await harness.sign_in("/deals")

    assert response.status_code == 302
    echo = (await harness.client.get("/deals")).json()
    assert echo["headers"]["x-auth-request-preferred-username"] == "alice"


async def test_missing_id_token_claim_fetches_userinfo(harness: GuardHarness) -> None:
    harness.idp.extra_claims = {"preferred_username": None}
    harness.idp.userinfo = {"sub": "alice-sub", "preferred_username": "alice.from.userinfo",
                            "email": "ignored@example.com"}

    response = await harness.sign_in("/deals")

    assert response.status_code == 302
    echo = (await harness.client.get("/deals")).json()
    assert echo["headers"]["x-auth-request-preferred-username"] == "alice.from.userinfo"
    # The ID token's claims win over userinfo's.
    assert echo["headers"]["x-auth-request-email"] == "alice@example.com"


async def test_userinfo_subject_mismatch_rejected(harness: GuardHarness) -> None:
    harness.idp.extra_claims = {"name": None}
    harness.idp.userinfo = {"sub": "someone-else", "name": "Mallory"}

    response = await harness.sign_in("/deals")

    assert page_reason(response) == "token_invalid"
    assert await harness.audit_reasons() == ["token_invalid"]
