"""The facebook provider type, driven through the whole sign-in flow against a fake Graph API."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from conftest import page_reason
from support.oauth_harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    FACEBOOK_TOKEN,
    REDIRECT_URI,
    FakeFacebook,
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
def facebook() -> FakeFacebook:
    return FakeFacebook()


async def test_facebook_sign_in_provisions_user(
    harnesses: HarnessFactory, facebook: FakeFacebook
) -> None:
    harness = await harnesses.create(facebook)

    response = await harness.sign_in("facebook")

    assert response.status_code == 302
    assert response.headers["location"] == "/deals"
    users = await harness.users()
    assert [(u.email, u.display_name) for u in users] == [("alice@example.com", "Alice Example")]
    identities = await harness.guard.store.identities_of(users[0].id)
    assert [(i.provider, i.subject) for i in identities] == [("facebook", "10158012345678901")]
    echo = (await harness.client.get("/deals")).json()
    assert echo["headers"]["x-auth-request-provider"] == "facebook"


async def test_facebook_authorization_url_versioned_dialog(
    harnesses: HarnessFactory, facebook: FakeFacebook
) -> None:
    harness = await harnesses.create(facebook)

    response = await harness.start("facebook")

    location = response.headers["location"]
    assert location.startswith("https://www.facebook.com/v21.0/dialog/oauth?")
    params = query_params(location)
    assert params["client_id"] == CLIENT_ID
    assert params["redirect_uri"] == REDIRECT_URI
    assert params["response_type"] == "code"
    assert params["scope"] == "email public_profile"
    assert params["code_challenge_method"] == "S256"
    assert len(params["code_challenge"]) == 43
    assert params["state"]
    assert params["auth_type"] == "rerequest"
    assert "nonce" not in params


async def test_facebook_graph_version_moves_endpoints(
    harnesses: HarnessFactory,
) -> None:
    facebook = FakeFacebook(graph_version="v19.0")
    harness = await harnesses.create(facebook)

    response = await harness.sign_in("facebook")

    assert response.status_code == 302
    assert facebook.server.token_requests[0].url.path == "/v19.0/oauth/access_token"
    assert facebook.profile_requests[0].url.path == "/v19.0/me"


async def test_facebook_token_request_sends_verifier_and_credentials(
    harnesses: HarnessFactory, facebook: FakeFacebook
) -> None:
    harness = await harnesses.create(facebook)

    await harness.sign_in("facebook")

    form = query_params("?" + facebook.server.token_requests[0].content.decode())
    assert form["grant_type"] == "authorization_code"
    assert form["redirect_uri"] == REDIRECT_URI
    assert form["client_id"] == CLIENT_ID
    assert form["client_secret"] == CLIENT_SECRET
    assert len(form["code_verifier"]) >= 43
    assert "authorization" not in facebook.server.token_requests[0].headers


async def test_facebook_profile_request_carries_appsecret_proof(
    harnesses: HarnessFactory, facebook: FakeFacebook
) -> None:
    harness = await harnesses.create(facebook)

    await harness.sign_in("facebook")

    request = facebook.profile_requests[0]
    params = query_params(str(request.url))
    expected = hmac.new(CLIENT_SECRET.encode(), FACEBOOK_TOKEN.encode(), hashlib.sha256).hexdigest()
    assert params["appsecret_proof"] == expected
    assert params["fields"] == "id,name,email"
    assert request.headers["authorization"] == f"Bearer {FACEBOOK_TOKEN}"
    assert FACEBOOK_TOKEN not in str(request.url)


async def test_facebook_rejected_appsecret_proof_is_provider_error(
    harnesses: HarnessFactory,
) -> None:
    # The Graph API checks the proof against its own copy of the app secret.
    facebook = FakeFacebook(app_secret="the-secret-facebook-holds")
    harness = await harnesses.create(facebook)

    response = await harness.sign_in("facebook")

    assert response.status_code == 502
    assert page_reason(response) == "provider_error"
    assert await harness.users() == []


async def test_facebook_user_without_email_rejected(
    harnesses: HarnessFactory, facebook: FakeFacebook
) -> None:
    # A person who unticks "email address" in the dialog: /me has no email field.
    del facebook.profile["email"]
    harness = await harnesses.create(facebook)

    response = await harness.sign_in("facebook")

    assert response.status_code == 403
    assert page_reason(response) == "email_declined"
    assert "allow access to your email address" in response.text
    failures = await harness.audit("login.failure")
    assert [(f.reason, f.provider, f.subject) for f in failures] == [
        ("email_declined", "facebook", "10158012345678901")
    ]
    assert await harness.users() == []
    assert "moko_session" not in harness.client.cookies


async def test_facebook_user_without_email_admitted_when_allowed(
    harnesses: HarnessFactory, facebook: FakeFacebook
) -> None:
    del facebook.profile["email"]
    harness = await harnesses.create(facebook, access={"allow_missing_email": True})

    response = await harness.sign_in("facebook")

    assert response.status_code == 302
    users = await harness.users()
    assert [u.username for u in users] == ["facebook:10158012345678901"]
    assert users[0].email is None


async def test_facebook_email_links_existing_user(
    harnesses: HarnessFactory, facebook: FakeFacebook
) -> None:
    harness = await harnesses.create(facebook)
    await harness.guard.ensure_started()
    existing, _ = await harness.guard.store.create_user_with_identity(
        username="alice@example.com", email="alice@example.com", display_name="Alice",
        roles=["user"], provider="google", subject="google-1", identity_email="alice@example.com",
    )

    response = await harness.sign_in("facebook")

    assert response.status_code == 302
    identities = await harness.guard.store.identities_of(existing.id)
    assert sorted(i.provider for i in identities) == ["facebook", "google"]
    assert [r.event for r in await harness.audit("identity.linked")] == ["identity.linked"]


@pytest.mark.parametrize(
    ("token_response", "status", "reason"),
    [
        (httpx.Response(400, json={"error": {"message": "Invalid verification code format.",
                                             "type": "OAuthException", "code": 100}}),
         502, "provider_error"),
        (httpx.Response(500, text="<html>Sorry, something went wrong.</html>"),
         502, "provider_error"),
        (httpx.Response(200, text='{"access_token": "EAAB", "token_type": '),
         502, "provider_error"),
        (httpx.Response(200, json={"token_type": "bearer", "expires_in": 5183944}),
         403, "token_invalid"),
        (httpx.ReadTimeout("slow"), 504, "provider_timeout"),
        (httpx.ConnectError("refused"), 502, "provider_unreachable"),
    ],
    ids=["oauth-exception", "500", "malformed-json", "no-access-token", "timeout", "refused"],
)
async def test_facebook_token_failures_become_reason_codes(
    harnesses: HarnessFactory, facebook: FakeFacebook,
    token_response: httpx.Response | Exception, status: int, reason: str,
) -> None:
    facebook.server.token_response = token_response
    harness = await harnesses.create(facebook)

    response = await harness.sign_in("facebook")

    assert response.status_code == status
    assert page_reason(response) == reason
    assert "Traceback" not in response.text
    assert await harness.failure_reasons() == [reason]
    assert await harness.users() == []


async def test_facebook_explicit_scopes_replace_defaults(
    harnesses: HarnessFactory, facebook: FakeFacebook
) -> None:
    harness = await harnesses.create(facebook, provider={"scopes": ["public_profile", "email",
                                                                    "user_link"]})

    response = await harness.start("facebook")

    assert query_params(response.headers["location"])["scope"] == "public_profile email user_link"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"graph_version": "21.0"}, "graph_version \"21.0\" is not a Graph API version"),
        ({"graph_version": "v21.0/../me"}, "graph_version"),
        ({"token_url": "http://graph.facebook.com/v21.0/oauth/access_token"},
         "token_url \"http://graph.facebook.com/v21.0/oauth/access_token\" must be an https URL"),
        ({"allowed_organizations": ["acme-corp"]},
         "allowed_organizations is not used by type \"facebook\": remove it"),
        ({"role_mapping": {"admins": ["admin"]}},
         "role_mapping is not used by type \"facebook\": remove it"),
    ],
    ids=["version-without-v", "version-with-path", "http-token-url", "github-only-setting",
         "role-mapping-without-groups"],
)
async def test_facebook_bad_settings_stop_start(
    harnesses: HarnessFactory, facebook: FakeFacebook, overrides: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        await harnesses.create(facebook, provider=overrides)

    assert expected in str(caught.value)
    assert "providers \"facebook\"" in str(caught.value)


async def test_facebook_http_endpoint_allowed_with_insecure_flag(
    harnesses: HarnessFactory, facebook: FakeFacebook
) -> None:
    harness = await harnesses.create(facebook, provider={
        "authorize_url": "http://127.0.0.1:9/v21.0/dialog/oauth",
        "insecure_allow_http_issuer": True,
    })

    response = await harness.start("facebook")

    assert response.headers["location"].startswith("http://127.0.0.1:9/v21.0/dialog/oauth?")
