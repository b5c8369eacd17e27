"""The oauth2 provider type (plain OAuth 2.0, no ID token) through the whole sign-in flow."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import page_reason
from support.oauth_harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    OAUTH2_BASE,
    OAUTH2_TOKEN,
    REDIRECT_URI,
    FakeOAuth2,
    HarnessFactory,
    query_params,
)

from moko_guard import ConfigError

pytestmark = pytest.mark.anyio


@pytest.fixture
async def harnesses(tmp_path: Path) -> AsyncIterator[HarnessFactory]:
    async with HarnessFactory(tmp_path) as factory:
        yield factory


@pytest.fixture
def partner() -> FakeOAuth2:
    return FakeOAuth2()


async def test_oauth2_claim_paths_map_nested_userinfo(
    harnesses: HarnessFactory, partner: FakeOAuth2
) -> None:
    harness = await harnesses.create(partner, provider={
        "role_mapping": {"crm-admins": ["admin"], "finance": ["billing"]},
    })

    response = await harness.sign_in("partner")

    assert response.status_code == 302
    users = await harness.users()
    assert [(u.email, u.display_name, u.roles) for u in users] == [
        ("alice@example.com", "Alice Example", ("admin", "user"))
    ]
    identities = await harness.guard.store.identities_of(users[0].id)
    assert [(i.provider, i.subject) for i in identities] == [("partner", "73")]
    request = partner.userinfo_requests[0]
    assert request.headers["authorization"] == f"Bearer {OAUTH2_TOKEN}"


async def test_oauth2_default_claim_names(harnesses: HarnessFactory) -> None:
    partner = FakeOAuth2(claims={}, userinfo={
        "sub": "u-81", "email": "alice@example.com", "email_verified": True,
        "name": "Alice Example", "preferred_username": "alice",
    })
    harness = await harnesses.create(partner)

    response = await harness.sign_in("partner")

    assert response.status_code == 302
    echo = (await harness.client.get("/deals")).json()
    assert echo["headers"]["x-auth-request-preferred-username"] == "alice"
    assert echo["headers"]["x-auth-request-email"] == "alice@example.com"


async def test_oauth2_claim_path_indexes_arrays(harnesses: HarnessFactory) -> None:
    partner = FakeOAuth2(
        claims={"subject": "user.id", "email": "user.emails.0.value",
                "email_verified": "user.emails.0.confirmed"},
        userinfo={"user": {"id": "p-1", "emails": [
            {"value": "alice@example.com", "confirmed": True},
            {"value": "alice@other.example", "confirmed": False},
        ]}},
    )
    harness = await harnesses.create(partner)

    response = await harness.sign_in("partner")

    assert response.status_code == 302
    assert [u.email for u in await harness.users()] == ["alice@example.com"]


async def test_oauth2_authorization_url_uses_configured_endpoint(
    harnesses: HarnessFactory, partner: FakeOAuth2
) -> None:
    harness = await harnesses.create(partner)

    response = await harness.start("partner")

    location = response.headers["location"]
    assert location.startswith(f"{OAUTH2_BASE}/oauth/authorize?")
    params = query_params(location)
    assert params["client_id"] == CLIENT_ID
    assert params["redirect_uri"] == REDIRECT_URI
    assert params["scope"] == "profile email"
    assert params["code_challenge_method"] == "S256"
    assert params["state"]
    assert "nonce" not in params


async def test_oauth2_sends_no_scope_unless_configured(
    harnesses: HarnessFactory, partner: FakeOAuth2
) -> None:
    harness = await harnesses.create(partner, provider={"scopes": None})

    response = await harness.start("partner")

    assert "scope" not in query_params(response.headers["location"])


async def test_oauth2_authorize_url_with_query_keeps_it(
    harnesses: HarnessFactory, partner: FakeOAuth2
) -> None:
    harness = await harnesses.create(partner, provider={
        "authorize_url": f"{OAUTH2_BASE}/oauth/authorize?tenant=crm",
    })

    response = await harness.start("partner")

    location = response.headers["location"]
    assert location.startswith(f"{OAUTH2_BASE}/oauth/authorize?tenant=crm&response_type=code&")


async def test_oauth2_client_authenticates_with_basic_by_default(
    harnesses: HarnessFactory, partner: FakeOAuth2
) -> None:
    harness = await harnesses.create(partner)

    await harness.sign_in("partner")

    request = partner.server.token_requests[0]
    expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert request.headers["authorization"] == f"Basic {expected}"
    assert "client_secret" not in query_params("?" + request.content.decode())


async def test_oauth2_client_secret_post_when_configured(
    harnesses: HarnessFactory, partner: FakeOAuth2
) -> None:
    harness = await harnesses.create(partner, provider={
        "token_endpoint_auth_method": "client_secret_post",
    })

    response = await harness.sign_in("partner")

    # The fake accepts only Basic, as a server without client_secret_post support would.
    assert page_reason(response) == "provider_error"
    form = query_params("?" + partner.server.token_requests[0].content.decode())
    assert (form["client_id"], form["client_secret"]) == (CLIENT_ID, CLIENT_SECRET)


@pytest.mark.parametrize(
    "userinfo",
    [
        {"data": {"mail": "alice@example.com", "verified": True}},
        {"data": {"id": None, "mail": "alice@example.com", "verified": True}},
        {"data": {"id": "", "mail": "alice@example.com", "verified": True}},
        {"data": {"id": True, "mail": "alice@example.com", "verified": True}},
        {"data": {"id": {"value": 73}, "mail": "alice@example.com", "verified": True}},
        {"data": {"id": "x" * 256, "mail": "alice@example.com", "verified": True}},
        {"data": "73"},
    ],
    ids=["absent", "null", "empty", "boolean", "object", "too-long", "data-not-object"],
)
async def test_oauth2_unusable_subject_rejected(
    harnesses: HarnessFactory, userinfo: dict[str, Any]
) -> None:
    partner = FakeOAuth2(userinfo=userinfo)
    harness = await harnesses.create(partner)

    response = await harness.sign_in("partner")

    assert response.status_code == 403
    assert page_reason(response) == "subject_invalid"
    assert "did not return a usable account ID" in response.text
    assert await harness.failure_reasons() == ["subject_invalid"]
    assert await harness.users() == []


@pytest.mark.parametrize(
    "verified", [False, None, "yes", 1, "True"], ids=["false", "absent", "yes", "one", "True"]
)
async def test_oauth2_unverified_email_not_provisioned(
    harnesses: HarnessFactory, verified: object
) -> None:
    data: dict[str, Any] = {"id": 73, "mail": "alice@example.com"}
    if verified is not None:
        data["verified"] = verified
    partner = FakeOAuth2(userinfo={"data": data})
    harness = await harnesses.create(partner)

    response = await harness.sign_in("partner")

    assert response.status_code == 403
    assert page_reason(response) == "email_unverified"
    assert await harness.users() == []


@pytest.mark.parametrize(
    ("token_response", "status", "reason"),
    [
        (httpx.Response(400, json={"error": "invalid_grant"}), 502, "provider_error"),
        (httpx.Response(503, text="Service Unavailable"), 502, "provider_error"),
        (httpx.Response(200, text="{not json", headers={"Content-Type": "application/json"}),
         502, "provider_error"),
        (httpx.Response(200, json=["access_token"]), 502, "provider_error"),
        (httpx.Response(200, json={"token_type": "Bearer"}), 403, "token_invalid"),
        (httpx.Response(200, json={"access_token": "at", "token_type": "N_A"}),
         403, "token_invalid"),
        (httpx.ReadTimeout("slow"), 504, "provider_timeout"),
    ],
    ids=["invalid_grant", "503", "malformed-json", "json-array", "no-access-token",
         "not-bearer", "timeout"],
)
async def test_oauth2_token_failures_become_reason_codes(
    harnesses: HarnessFactory, partner: FakeOAuth2,
    token_response: httpx.Response | Exception, status: int, reason: str,
) -> None:
    partner.server.token_response = token_response
    harness = await harnesses.create(partner)

    response = await harness.sign_in("partner")

    assert response.status_code == status
    assert page_reason(response) == reason
    assert await harness.failure_reasons() == [reason]
    assert await harness.users() == []


@pytest.mark.parametrize(
    ("userinfo_response", "status", "reason"),
    [
        (httpx.Response(401, json={"error": "invalid_token"}), 502, "provider_error"),
        (httpx.Response(500, text="Internal Server Error"), 502, "provider_error"),
        (httpx.Response(200, text="<html>login</html>"), 502, "provider_error"),
        (httpx.ConnectTimeout("slow"), 504, "provider_timeout"),
    ],
    ids=["401", "500", "html", "timeout"],
)
async def test_oauth2_userinfo_failures_become_reason_codes(
    harnesses: HarnessFactory, partner: FakeOAuth2,
    userinfo_response: httpx.Response | Exception, status: int, reason: str,
) -> None:
    partner.userinfo_response = userinfo_response
    harness = await harnesses.create(partner)

    response = await harness.sign_in("partner")

    assert response.status_code == status
    assert page_reason(response) == reason
    assert await harness.failure_reasons() == [reason]
    assert await harness.users() == []


@pytest.mark.parametrize("key", ["authorize_url", "token_url", "userinfo_url"])
async def test_oauth2_missing_endpoint_stops_start(
    harnesses: HarnessFactory, partner: FakeOAuth2, key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        await harnesses.create(partner, provider={key: None})

    message = str(caught.value)
    assert f"providers \"partner\": type \"oauth2\" needs {key}" in message
    assert f"add {key} = \"https://...\"" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"userinfo_url": "http://auth.crm-idp.test/api/v2/me"},
         "userinfo_url \"http://auth.crm-idp.test/api/v2/me\" must be an https URL"),
        ({"token_url": "https://client:pw@auth.crm-idp.test/oauth/token"},
         "token_url must not contain a user name or password"),
        ({"authorize_url": "https://auth.crm-idp.test/oauth/authorize#x"},
         "must not contain a fragment"),
        ({"claims": {"subject": "data.id", "roles": "data.roles"}},
         "claims.roles is not an identity field"),
        ({"claims": {"subject": "data..id"}}, "claims.subject \"data..id\" is not a dotted path"),
        ({"allowed_teams": ["acme-corp/crm-admins"]},
         "allowed_teams is not used by type \"oauth2\": remove it"),
    ],
    ids=["http-userinfo", "credentials-in-url", "fragment", "unknown-claim", "empty-segment",
         "github-only-setting"],
)
async def test_oauth2_bad_settings_stop_start(
    harnesses: HarnessFactory, partner: FakeOAuth2, overrides: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        await harnesses.create(partner, provider=overrides)

    assert expected in str(caught.value)
    assert "pw" not in str(caught.value)


async def test_oauth2_every_endpoint_problem_reported_at_once(
    harnesses: HarnessFactory, partner: FakeOAuth2
) -> None:
    with pytest.raises(ConfigError) as caught:
        await harnesses.create(partner, provider={
            "token_url": None, "userinfo_url": "http://auth.crm-idp.test/me",
        })

    assert len(caught.value.problems) == 2


async def test_oauth2_http_endpoints_allowed_with_insecure_flag(
    harnesses: HarnessFactory, partner: FakeOAuth2
) -> None:
    harness = await harnesses.create(partner, provider={
        "authorize_url": "http://127.0.0.1:9/oauth/authorize", "insecure_allow_http_issuer": True,
    })

    response = await harness.start("partner")

    assert response.headers["location"].startswith("http://127.0.0.1:9/oauth/authorize?")
