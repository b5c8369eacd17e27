"""The github provider type, driven through the whole sign-in flow against a fake GitHub."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from conftest import page_reason
from support.oauth_harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    GITHUB_TOKEN,
    REDIRECT_URI,
    FakeGitHub,
    HarnessFactory,
    OAuthHarness,
    query_params,
)

from moko_guard import ConfigError

pytestmark = pytest.mark.anyio

GHE_API = "https://ghe.example.test/api/v3"


@pytest.fixture
async def harnesses(tmp_path: Path) -> AsyncIterator[HarnessFactory]:
    async with HarnessFactory(tmp_path) as factory:
        yield factory


@pytest.fixture
def github() -> FakeGitHub:
    return FakeGitHub()


async def assert_rejected(harness: OAuthHarness, response: httpx.Response, reason: str) -> None:
    assert response.status_code == 403
    assert page_reason(response) == reason
    assert await harness.failure_reasons() == [reason]
    assert await harness.users() == []
    assert "moko_session" not in harness.client.cookies


async def test_github_private_email_signs_in(harnesses: HarnessFactory, github: FakeGitHub) -> None:
    # The profile email is null (kept private); /user/emails lists the primary as verified.
    harness = await harnesses.create(github)

    response = await harness.sign_in("github")

    assert response.status_code == 302
    users = await harness.users()
    assert [(u.email, u.display_name) for u in users] == [("octocat@example.com", "The Octocat")]
    identities = await harness.guard.store.identities_of(users[0].id)
    assert [(i.provider, i.subject) for i in identities] == [("github", "583231")]
    echo = (await harness.client.get("/deals")).json()
    assert echo["headers"]["x-auth-request-preferred-username"] == "octocat"


async def test_github_profile_email_is_never_used(
    harnesses: HarnessFactory, github: FakeGitHub
) -> None:
    # Anyone can type any address into the profile; only /user/emails shows what is verified.
    github.user["email"] = "ceo@example.com"
    harness = await harnesses.create(github)

    await harness.sign_in("github")

    assert [u.email for u in await harness.users()] == ["octocat@example.com"]


async def test_github_unverified_primary_email_untrusted(
    harnesses: HarnessFactory, github: FakeGitHub, caplog: pytest.LogCaptureFixture
) -> None:
    """An unverified primary email decides nothing: no domain check, no link, no headers.

    Case C14, from oauth2-proxy PR #96 "github should check if email is verified"
    and issue #374: a GitHub account can add any address as primary without
    proving it, and must not reach the existing account that owns it.
    """
    github.user.update({"id": 4242, "login": "mallory-gh", "email": None})
    github.emails = [
        {"email": "alice@example.com", "primary": True, "verified": False, "visibility": "private"},
        {"email": "mallory@personal.example", "primary": False, "verified": True,
         "visibility": None},
    ]
    harness = await harnesses.create(github, access={"allowed_email_domains": ["example.com"]})
    await harness.guard.ensure_started()
    alice, _ = await harness.guard.store.create_user_with_identity(
        username="alice@example.com", email="alice@example.com", display_name="Alice",
        roles=["user"], provider="google", subject="google-alice",
        identity_email="alice@example.com",
    )
    caplog.set_level(logging.WARNING, logger="moko_guard.providers.github")

    response = await harness.sign_in("github")

    assert response.status_code == 403
    assert page_reason(response) == "email_missing"
    assert "moko_session" not in harness.client.cookies
    identities = await harness.guard.store.identities_of(alice.id)
    assert [i.provider for i in identities] == ["google"]
    failures = await harness.audit("login.failure")
    assert [(f.reason, f.subject, f.email) for f in failures] == [("email_missing", "4242", None)]
    assert "github_primary_email_unverified provider=github github_id=4242" in caplog.text
    assert "alice@example.com" not in caplog.text


async def test_github_unverified_primary_email_not_provisioned(
    harnesses: HarnessFactory, github: FakeGitHub
) -> None:
    github.emails[0]["verified"] = False
    harness = await harnesses.create(github)

    response = await harness.sign_in("github")

    await assert_rejected(harness, response, "email_missing")


async def test_github_authorization_url_asks_for_profile_and_emails(
    harnesses: HarnessFactory, github: FakeGitHub
) -> None:
    harness = await harnesses.create(github)

    response = await harness.start("github")

    location = response.headers["location"]
    assert location.startswith("https://github.com/login/oauth/authorize?")
    params = query_params(location)
    assert params["client_id"] == CLIENT_ID
    assert params["redirect_uri"] == REDIRECT_URI
    assert params["scope"] == "read:user user:email"
    assert params["code_challenge_method"] == "S256"
    assert params["state"]


async def test_github_token_request_asks_for_json(
    harnesses: HarnessFactory, github: FakeGitHub
) -> None:
    harness = await harnesses.create(github)

    await harness.sign_in("github")

    request = github.server.token_requests[0]
    assert request.headers["accept"] == "application/json"
    form = query_params("?" + request.content.decode())
    assert (form["client_id"], form["client_secret"]) == (CLIENT_ID, CLIENT_SECRET)
    assert form["code_verifier"]
    api_calls = [(r.url.path, r.headers["authorization"]) for r in github.api_requests]
    assert api_calls == [("/user", f"Bearer {GITHUB_TOKEN}"),
                         ("/user/emails", f"Bearer {GITHUB_TOKEN}")]


async def test_github_token_error_with_status_200(
    harnesses: HarnessFactory, github: FakeGitHub
) -> None:
    github.server.token_response = httpx.Response(200, json={
        "error": "bad_verification_code",
        "error_description": "The code passed is incorrect or expired.",
    })
    harness = await harnesses.create(github)

    response = await harness.sign_in("github")

    assert response.status_code == 502
    assert page_reason(response) == "provider_error"
    failures = await harness.audit("login.failure")
    assert failures[0].detail == "github token: error=bad_verification_code"
    assert await harness.users() == []


@pytest.mark.parametrize(
    ("token_response", "status", "reason"),
    [
        (httpx.Response(200, text="{\"access_token\": \"gho_"), 502, "provider_error"),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), 502, "provider_error"),
        (httpx.Response(200, text="access_token=gho_x&token_type=bearer"), 502, "provider_error"),
        (httpx.Response(200, json={"access_token": "gho_x", "token_type": "mac"}),
         403, "token_invalid"),
        (httpx.ConnectTimeout("slow"), 504, "provider_timeout"),
    ],
    ids=["malformed-json", "502", "form-encoded", "not-bearer", "timeout"],
)
async def test_github_token_failures_become_reason_codes(
    harnesses: HarnessFactory, github: FakeGitHub,
    token_response: httpx.Response | Exception, status: int, reason: str,
) -> None:
    github.server.token_response = token_response
    harness = await harnesses.create(github)

    response = await harness.sign_in("github")

    assert response.status_code == status
    assert page_reason(response) == reason
    assert await harness.failure_reasons() == [reason]
    assert await harness.users() == []


@pytest.mark.parametrize(
    ("user_response", "reason"),
    [
        (httpx.Response(503, json={"message": "Service Unavailable"}), "provider_error"),
        (httpx.Response(200, text="<!DOCTYPE html><title>Unicorn!</title>"), "provider_error"),
        (httpx.Response(200, json={"login": "octocat", "id": None}), "subject_invalid"),
        (httpx.Response(200, json={"login": "octocat", "id": True}), "subject_invalid"),
    ],
    ids=["503", "html", "null-id", "boolean-id"],
)
async def test_github_user_failures_become_reason_codes(
    harnesses: HarnessFactory, github: FakeGitHub, user_response: httpx.Response, reason: str
) -> None:
    github.user_response = user_response
    harness = await harnesses.create(github)

    response = await harness.sign_in("github")

    assert page_reason(response) == reason
    assert await harness.failure_reasons() == [reason]
    assert await harness.users() == []


async def test_github_renamed_login_keeps_same_user(
    harnesses: HarnessFactory, github: FakeGitHub
) -> None:
    harness = await harnesses.create(github)
    await harness.sign_in("github")
    harness.client.cookies.clear()
    github.user["login"] = "octocat-renamed"

    response = await harness.sign_in("github")

    assert response.status_code == 302
    assert len(await harness.users()) == 1


async def test_github_org_member_gets_org_group(
    harnesses: HarnessFactory, github: FakeGitHub
) -> None:
    github.org_states = {"acme-corp": "active"}
    harness = await harnesses.create(github, provider={
        "allowed_organizations": ["other-org", "acme-corp"],
        "role_mapping": {"acme-corp": ["crm-user"]},
    })

    start = await harness.start("github")
    response = await harness.client.get(
        "/oauth2/callback", params=github.authorize(start.headers["location"]))

    assert query_params(start.headers["location"])["scope"] == "read:user user:email read:org"
    assert response.status_code == 302
    paths = [r.url.path for r in github.api_requests]
    assert "/user/memberships/orgs/other-org" in paths
    assert "/user/memberships/orgs/acme-corp" in paths
    echo = (await harness.client.get("/deals")).json()
    assert echo["headers"]["x-auth-request-roles"] == "crm-user,user"


@pytest.mark.parametrize("org_states", [{}, {"acme-corp": "pending"}], ids=["404", "pending"])
async def test_github_org_non_member_rejected(
    harnesses: HarnessFactory, github: FakeGitHub, org_states: dict[str, str]
) -> None:
    github.org_states = org_states
    harness = await harnesses.create(github, provider={"allowed_organizations": ["acme-corp"]})

    response = await harness.sign_in("github")

    await assert_rejected(harness, response, "org_not_allowed")
    failures = await harness.audit("login.failure")
    assert failures[0].subject == "583231"
    assert "not an active member of acme-corp" in (failures[0].detail or "")


@pytest.mark.parametrize("status", [403, 500], ids=["403-app-restricted", "500"])
async def test_github_membership_errors_are_provider_errors(
    harnesses: HarnessFactory, github: FakeGitHub, status: int
) -> None:
    github.membership_status = status
    harness = await harnesses.create(github, provider={"allowed_organizations": ["acme-corp"]})

    response = await harness.sign_in("github")

    assert response.status_code == 502
    assert page_reason(response) == "provider_error"
    assert await harness.failure_reasons() == ["provider_error"]
    assert await harness.users() == []


async def test_github_team_member_signs_in(harnesses: HarnessFactory, github: FakeGitHub) -> None:
    github.team_states = {"acme-corp/crm-admins": "active"}
    harness = await harnesses.create(github, provider={"allowed_teams": ["acme-corp/crm-admins"]})

    response = await harness.sign_in("github")

    assert response.status_code == 302
    team_calls = [r.url.path for r in github.api_requests if "/teams/" in r.url.path]
    assert team_calls == ["/orgs/acme-corp/teams/crm-admins/memberships/octocat"]


async def test_github_team_non_member_rejected(
    harnesses: HarnessFactory, github: FakeGitHub
) -> None:
    github.org_states = {"acme-corp": "active"}
    github.team_states = {"acme-corp/support": "active"}
    harness = await harnesses.create(github, provider={
        "allowed_organizations": ["acme-corp"], "allowed_teams": ["acme-corp/crm-admins"],
    })

    response = await harness.sign_in("github")

    await assert_rejected(harness, response, "team_not_allowed")


async def test_github_team_roles_decide_allowed_roles(
    harnesses: HarnessFactory, github: FakeGitHub
) -> None:
    """A team that maps to no allowed role keeps the person out; roles are the person's own.

    Case C20, from oauth2-proxy advisory GHSA-652x-m2gr-hppm (group
    authorization): bob is only in the support team, and access.allowed_roles
    lists crm-admins, so he must not get in, and nobody gets the allow-list as roles.
    """
    github.user.update({"login": "bob", "id": 12})
    github.team_states = {"acme-corp/support": "active"}
    harness = await harnesses.create(
        github,
        provider={
            "allowed_teams": ["acme-corp/support", "acme-corp/crm-admins"],
            "role_mapping": {"acme-corp/support": ["support"],
                             "acme-corp/crm-admins": ["crm-admins"]},
        },
        access={"allowed_roles": ["crm-admins"]},
    )

    rejected = await harness.sign_in("github")
    users_after_rejection = await harness.users()
    github.team_states = {"acme-corp/support": "active", "acme-corp/crm-admins": "active"}
    admitted = await harness.sign_in("github")

    assert rejected.status_code == 403
    assert page_reason(rejected) == "role_not_allowed"
    assert users_after_rejection == []
    assert admitted.status_code == 302
    echo = (await harness.client.get("/deals")).json()
    assert echo["headers"]["x-auth-request-roles"] == "crm-admins,support,user"


async def test_github_no_groups_denied_by_allowed_roles(
    harnesses: HarnessFactory, github: FakeGitHub
) -> None:
    # The regression guard of case C20: no groups at all must mean no entry, not any entry.
    harness = await harnesses.create(
        github,
        provider={"role_mapping": {"acme-corp/crm-admins": ["crm-admins"]}},
        access={"allowed_roles": ["crm-admins"]},
    )

    response = await harness.sign_in("github")

    await assert_rejected(harness, response, "role_not_allowed")


async def test_github_enterprise_server_base_url(harnesses: HarnessFactory) -> None:
    github = FakeGitHub(web_base="https://ghe.example.test", api_base=GHE_API)
    harness = await harnesses.create(github, provider={"allowed_organizations": ["acme-corp"]})
    github.org_states = {"acme-corp": "active"}

    response = await harness.sign_in("github")

    assert response.status_code == 302
    token_url = str(github.server.token_requests[0].url)
    assert token_url == "https://ghe.example.test/login/oauth/access_token"
    assert [str(r.url).split("?")[0] for r in github.api_requests] == [
        f"{GHE_API}/user", f"{GHE_API}/user/emails", f"{GHE_API}/user/memberships/orgs/acme-corp",
    ]


async def test_github_enterprise_endpoint_overrides_win(harnesses: HarnessFactory) -> None:
    github = FakeGitHub(web_base="https://sso.ghe.example.test", api_base=GHE_API)
    harness = await harnesses.create(github, provider={
        "authorize_url": "https://sso.ghe.example.test/login/oauth/authorize",
        "token_url": "https://sso.ghe.example.test/login/oauth/access_token",
    })

    response = await harness.sign_in("github")

    assert response.status_code == 302
    assert github.server.token_requests[0].url.host == "sso.ghe.example.test"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"api_base_url": "https://ghe.example.test/rest"},
         ("api_base_url \"https://ghe.example.test/rest\" does not end in \"/api/v3\", "
          "so authorize_url cannot be derived from it: set authorize_url too")),
        ({"api_base_url": "http://ghe.example.test/api/v3"}, "must be an https URL"),
        ({"allowed_teams": ["crm-admins"]},
         "allowed_teams entry \"crm-admins\" is not \"organization/team-slug\""),
        ({"allowed_organizations": ["acme/../../user"]},
         "allowed_organizations entry \"acme/../../user\" is not a GitHub organization name"),
        ({"allowed_organizations": ["acme-corp"], "scopes": ["read:user", "user:email"]},
         "need the \"read:org\" scope: add it to scopes"),
        ({"claims": {"subject": "id"}}, "claims is not used by type \"github\": remove it"),
    ],
    ids=["api-base-without-api-v3", "http-api-base", "team-without-org", "org-with-path",
         "scopes-without-read-org", "oauth2-only-setting"],
)
async def test_github_bad_settings_stop_start(
    harnesses: HarnessFactory, github: FakeGitHub, overrides: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        await harnesses.create(github, provider=overrides)

    assert expected in str(caught.value)
