"""The google provider type through the whole sign-in flow, against a respx fake of Google.

The fake returns responses shaped as Google documents them: the discovery
document of https://accounts.google.com, the token response, and ID tokens
with ``hd`` for Google Workspace accounts and without it for consumer accounts.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import respx
from conftest import base_config, echo_app, merge, page_reason
from support.provider_harness import FakeTokenEndpoint, ProviderHarness, guarded_app

from moko_guard import settings_from_mapping
from moko_guard.errors import ConfigError
from moko_guard.providers import build_provider
from moko_guard.providers.google import GOOGLE_ISSUER, GoogleProvider

pytestmark = pytest.mark.anyio

CLIENT_ID = "1234987819200-5l0vb3adqe0hm8hqjoc.apps.googleusercontent.com"
CLIENT_SECRET = "GOCSPX-test-secret"
AUTHORIZATION_ENDPOINT = "https://accounts.google.com/o/oauth2/v2/auth"
TOKEN_ENDPOINT = "https://oauth2.googleapis.com/token"
USERINFO_ENDPOINT = "https://openidconnect.googleapis.com/v1/userinfo"
JWKS_URI = "https://www.googleapis.com/oauth2/v3/certs"
ALICE_SUB = "110169484474386276334"

# Shape of https://accounts.google.com/.well-known/openid-configuration.
DISCOVERY = {
    "issuer": GOOGLE_ISSUER,
    "authorization_endpoint": AUTHORIZATION_ENDPOINT,
    "device_authorization_endpoint": "https://oauth2.googleapis.com/device/code",
    "token_endpoint": TOKEN_ENDPOINT,
    "userinfo_endpoint": USERINFO_ENDPOINT,
    "revocation_endpoint": "https://oauth2.googleapis.com/revoke",
    "jwks_uri": JWKS_URI,
    "response_types_supported": [
        "code", "token", "id_token", "code token", "code id_token", "token id_token",
        "code token id_token", "none",
    ],
    "subject_types_supported": ["public"],
    "id_token_signing_alg_values_supported": ["RS256"],
    "scopes_supported": ["openid", "email", "profile"],
    "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
    "claims_supported": [
        "aud", "email", "email_verified", "exp", "family_name", "given_name", "iat", "iss",
        "name", "picture", "sub",
    ],
    "code_challenge_methods_supported": ["plain", "S256"],
    "grant_types_supported": [
        "authorization_code", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
    ],
}


def workspace_claims() -> dict[str, Any]:
    """ID token claims of a Google Workspace account in example.com."""
    return {
        "iss": GOOGLE_ISSUER,
        "azp": CLIENT_ID,
        "aud": CLIENT_ID,
        "sub": ALICE_SUB,
        "hd": "example.com",
        "email": "alice@example.com",
        "email_verified": True,
        "at_hash": "HK6E_P6Dh8Y93mRNtsDB1Q",
        "name": "Alice Example",
        "picture": "https://lh3.googleusercontent.com/a/ACg8ocJ-example",
        "given_name": "Alice",
        "family_name": "Example",
    }


@dataclass
class FakeGoogle:
    """Google's discovery, token, JWKS and userinfo endpoints."""

    endpoint: FakeTokenEndpoint = field(default_factory=lambda: FakeTokenEndpoint(
        claims=workspace_claims(),
        token_fields={
            "access_token": "ya29.a0AfB_byC-example-access-token",
            "expires_in": 3599,
            "scope": "openid https://www.googleapis.com/auth/userinfo.email "
                     "https://www.googleapis.com/auth/userinfo.profile",
            "token_type": "Bearer",
        },
        jwk_fields={"kid": "1f40f0a8ef3d880978dc82f25c3ec317c6a5b781"},
        kid="1f40f0a8ef3d880978dc82f25c3ec317c6a5b781",
    ))
    # None: the userinfo response repeats the ID token's profile claims.
    userinfo: dict[str, Any] | None = None

    @property
    def claims(self) -> dict[str, Any]:
        return self.endpoint.claims

    def remember_nonce(self, authorize_url: str) -> dict[str, str]:
        return self.endpoint.remember_nonce(authorize_url)

    def install(self, router: respx.Router) -> None:
        router.get(f"{GOOGLE_ISSUER}/.well-known/openid-configuration").mock(
            return_value=httpx.Response(200, json=DISCOVERY)
        )
        router.get(JWKS_URI).mock(side_effect=self.endpoint.jwks)
        router.post(TOKEN_ENDPOINT).mock(side_effect=self.endpoint.token)
        router.get(USERINFO_ENDPOINT).mock(side_effect=self._userinfo)

    def _userinfo(self, _request: httpx.Request) -> httpx.Response:
        if self.userinfo is not None:
            return httpx.Response(200, json=self.userinfo)
        names = ("sub", "name", "given_name", "family_name", "picture", "email",
                 "email_verified", "hd")
        return httpx.Response(200, json={k: self.claims[k] for k in names if k in self.claims})


def google_provider(**overrides: Any) -> dict[str, Any]:
    return {"id": "google", "type": "google", "name": "Google", "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET, **overrides}


HarnessFactory = Callable[..., Awaitable[ProviderHarness]]


@pytest.fixture
def google() -> FakeGoogle:
    return FakeGoogle()


@pytest.fixture
def router(google: FakeGoogle) -> respx.Router:
    router = respx.Router(assert_all_called=False)
    google.install(router)
    return router


@pytest.fixture
async def make_harness(tmp_path: Path, router: respx.Router) -> AsyncIterator[HarnessFactory]:
    async with AsyncExitStack() as stack:

        async def factory(provider: dict[str, Any] | None = None,
                          **overrides: Any) -> ProviderHarness:
            config = merge(base_config(tmp_path), overrides)
            config["providers"] = [google_provider(**(provider or {}))]
            settings = settings_from_mapping(config)
            return await stack.enter_async_context(guarded_app(settings, router, echo_app()))

        yield factory


async def failure_reasons(harness: ProviderHarness) -> list[str | None]:
    return [record.reason for record in await harness.login_failures()]


# --- happy path ----------------------------------------------------------------


async def test_workspace_account_signs_in(
    make_harness: HarnessFactory, google: FakeGoogle
) -> None:
    harness = await make_harness({"hosted_domain": "example.com"})

    start = await harness.start_login("google")
    params = google.remember_nonce(start.headers["location"])
    callback = await harness.client.get(
        "/oauth2/callback", params={"code": "4/0AeaYSHA-code", "state": params["state"]}
    )

    assert start.headers["location"].startswith(AUTHORIZATION_ENDPOINT + "?")
    assert params["client_id"] == CLIENT_ID
    assert params["redirect_uri"] == "https://crm.example.com/oauth2/callback"
    assert params["scope"] == "openid email profile"
    assert params["code_challenge_method"] == "S256"
    assert params["hd"] == "example.com"
    assert callback.status_code == 302
    assert callback.headers["location"] == "/deals"
    headers = await harness.upstream_headers()
    assert headers["x-auth-request-user"] == "alice@example.com"
    assert headers["x-auth-request-email"] == "alice@example.com"
    assert headers["x-auth-request-provider"] == "google"
    user = await harness.guard.store.user_for_identity("google", ALICE_SUB)
    assert user is not None
    assert user.display_name == "Alice Example"


async def test_token_request_carries_pkce_and_client_credentials(
    make_harness: HarnessFactory, google: FakeGoogle
) -> None:
    harness = await make_harness()

    await harness.sign_in("google", google)

    request = google.endpoint.token_requests[0]
    form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
    assert form["grant_type"] == "authorization_code"
    assert form["redirect_uri"] == "https://crm.example.com/oauth2/callback"
    assert len(form["code_verifier"]) >= 43
    expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert request.headers["authorization"] == f"Basic {expected}"


async def test_token_request_uses_configured_timeouts(
    make_harness: HarnessFactory, google: FakeGoogle
) -> None:
    harness = await make_harness({"connect_timeout": "2s", "timeout": "7s"})

    await harness.sign_in("google", google)

    timeout = google.endpoint.token_requests[0].extensions["timeout"]
    assert timeout == {"connect": 2.0, "read": 7.0, "write": 7.0, "pool": 7.0}


def test_issuer_defaults_to_google(tmp_path: Path) -> None:
    config = merge(base_config(tmp_path), {})
    config["providers"] = [google_provider()]
    settings = settings_from_mapping(config)

    provider = build_provider(settings.providers[0], httpx.AsyncClient())

    assert isinstance(provider, GoogleProvider)
    assert provider.issuer == GOOGLE_ISSUER


async def test_issuer_without_scheme_accepted(
    make_harness: HarnessFactory, google: FakeGoogle
) -> None:
    """Google documents both "https://accounts.google.com" and "accounts.google.com" as iss."""
    harness = await make_harness()
    google.claims["iss"] = "accounts.google.com"

    response = await harness.sign_in("google", google)

    assert response.status_code == 302


@pytest.mark.parametrize(
    "issuer",
    ["https://accounts.google.com.evil.example", "https://accounts.google.com/",
     "http://accounts.google.com", "https://idp.example"],
    ids=["suffix-host", "trailing-slash", "plain-http", "other-issuer"],
)
async def test_foreign_issuer_rejected(
    make_harness: HarnessFactory, google: FakeGoogle, issuer: str
) -> None:
    harness = await make_harness()
    google.claims["iss"] = issuer

    response = await harness.sign_in("google", google)

    assert response.status_code == 403
    assert page_reason(response) == "token_invalid"
    assert await harness.guard.store.list_users() == []


async def test_sign_in_works_after_client_secret_change(
    make_harness: HarnessFactory, google: FakeGoogle, tmp_path: Path
) -> None:
    harness = await make_harness()
    config = merge(base_config(tmp_path), {})
    config["providers"] = [google_provider(client_secret="GOCSPX-rotated-secret")]

    changed = harness.guard.apply_secrets(settings_from_mapping(config))
    response = await harness.sign_in("google", google)

    assert changed == ["providers.google.client_secret"]
    assert response.status_code == 302
    rotated = base64.b64encode(f"{CLIENT_ID}:GOCSPX-rotated-secret".encode()).decode()
    assert google.endpoint.token_requests[0].headers["authorization"] == f"Basic {rotated}"


# --- hosted domain -------------------------------------------------------------


@pytest.mark.parametrize(
    "email",
    ["dave@gmail.com", "dave@example.com"],
    ids=["gmail-account", "consumer-account-with-company-address"],
)
async def test_account_without_hd_rejected_when_hosted_domain_set(
    make_harness: HarnessFactory, google: FakeGoogle, email: str
) -> None:
    """Source: oauth2-proxy issue #2363 (verify Google's hd claim), case C15 input A.

    A consumer Google account has no hd claim, even when registered with an
    address in the Workspace domain, so the email domain alone is not enough.
    """
    harness = await make_harness({"hosted_domain": "example.com"})
    del google.claims["hd"]
    google.claims["email"] = email

    response = await harness.sign_in("google", google)

    assert response.status_code == 403
    assert page_reason(response) == "hosted_domain_mismatch"
    assert "moko_session=" not in response.headers.get("set-cookie", "")
    failures = await harness.login_failures()
    assert [record.reason for record in failures] == ["hosted_domain_mismatch"]
    assert "hd=missing" in (failures[0].detail or "")
    assert await harness.guard.store.list_users() == []


@pytest.mark.parametrize(
    ("hd", "email"),
    [("other.example", "erin@other.example"), ("sub.example.com", "erin@sub.example.com"),
     ("example.com.evil.example", "erin@example.com.evil.example"),
     ("evilexample.com", "erin@evilexample.com"), ("", "erin@example.com")],
    ids=["other-domain", "subdomain", "suffix-domain", "prefix-domain", "empty-hd"],
)
async def test_other_hosted_domain_rejected(
    make_harness: HarnessFactory, google: FakeGoogle, hd: str, email: str
) -> None:
    """Source: oauth2-proxy issue #2363, case C15 input B: hd must equal the setting exactly."""
    harness = await make_harness(
        {"hosted_domain": "example.com"},
        access={"provision_email_domains": ["example.com", "other.example", "sub.example.com",
                                            "example.com.evil.example", "evilexample.com"]},
    )
    google.claims["hd"] = hd
    google.claims["email"] = email

    response = await harness.sign_in("google", google)

    assert response.status_code == 403
    assert page_reason(response) == "hosted_domain_mismatch"
    assert await failure_reasons(harness) == ["hosted_domain_mismatch"]
    assert await harness.guard.store.list_users() == []


async def test_hd_from_userinfo_not_trusted(
    make_harness: HarnessFactory, google: FakeGoogle
) -> None:
    """Source: case C15: the decision uses the signed ID token's hd, never the userinfo response."""
    harness = await make_harness({"hosted_domain": "example.com"})
    del google.claims["hd"]
    google.userinfo = {"sub": ALICE_SUB, "email": "alice@example.com", "email_verified": True,
                       "hd": "example.com"}

    response = await harness.sign_in("google", google)

    assert page_reason(response) == "hosted_domain_mismatch"
    assert await harness.guard.store.list_users() == []


async def test_hosted_domain_setting_compared_case_insensitively(
    make_harness: HarnessFactory, google: FakeGoogle
) -> None:
    harness = await make_harness({"hosted_domain": "Example.COM"})

    start = await harness.start_login("google")
    params = google.remember_nonce(start.headers["location"])
    response = await harness.client.get(
        "/oauth2/callback", params={"code": "c", "state": params["state"]}
    )

    assert params["hd"] == "example.com"
    assert response.status_code == 302


async def test_consumer_account_allowed_without_hosted_domain(
    make_harness: HarnessFactory, google: FakeGoogle
) -> None:
    harness = await make_harness(access={"provision_email_domains": ["gmail.com"]})
    del google.claims["hd"]
    google.claims["email"] = "bob@gmail.com"

    start = await harness.start_login("google")
    params = google.remember_nonce(start.headers["location"])
    response = await harness.client.get(
        "/oauth2/callback", params={"code": "c", "state": params["state"]}
    )

    assert "hd" not in params
    assert response.status_code == 302
    assert (await harness.upstream_headers())["x-auth-request-email"] == "bob@gmail.com"


# --- email ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "verified", [False, "false", None], ids=["false", "string-false", "missing"]
)
async def test_unverified_email_not_provisioned(
    make_harness: HarnessFactory, google: FakeGoogle, verified: object
) -> None:
    harness = await make_harness()
    google.claims["email_verified"] = verified
    if verified is None:
        del google.claims["email_verified"]

    response = await harness.sign_in("google", google)

    assert response.status_code == 403
    assert page_reason(response) == "email_unverified"
    assert await harness.guard.store.list_users() == []


async def test_email_verified_from_id_token_not_userinfo(
    make_harness: HarnessFactory, google: FakeGoogle
) -> None:
    harness = await make_harness()
    google.claims["email_verified"] = False
    google.userinfo = {"sub": ALICE_SUB, "email": "alice@example.com", "email_verified": True}

    response = await harness.sign_in("google", google)

    assert page_reason(response) == "email_unverified"


async def test_email_verified_as_string_true_accepted(
    make_harness: HarnessFactory, google: FakeGoogle
) -> None:
    """Google's ID token documentation shows email_verified as the string "true"."""
    harness = await make_harness()
    google.claims["email_verified"] = "true"

    response = await harness.sign_in("google", google)

    assert response.status_code == 302


async def test_email_domain_matched_case_insensitively(
    make_harness: HarnessFactory, google: FakeGoogle
) -> None:
    """Source: traefik-forward-auth issues #366 and #153, case C13.

    A returning identity is matched on (provider, sub) first, so a change in
    the letter case of its email creates no second user.
    """
    harness = await make_harness(access={"allowed_email_domains": ["example.com"]})
    await harness.sign_in("google", google)
    google.claims["email"] = "Alice@Example.COM"

    response = await harness.sign_in_again("google", google)

    assert response.status_code == 302
    assert len(await harness.guard.store.list_users()) == 1
    assert (await harness.upstream_headers())["x-auth-request-email"] == "alice@example.com"


async def test_new_user_email_domain_matched_case_insensitively(
    make_harness: HarnessFactory, google: FakeGoogle
) -> None:
    """Source: case C13: the domain is compared case-insensitively on a first sign-in too."""
    harness = await make_harness(access={"allowed_email_domains": ["example.com"]})
    google.claims["email"] = "Alice@Example.COM"

    response = await harness.sign_in("google", google)

    assert response.status_code == 302
    users = await harness.guard.store.list_users()
    assert [user.email for user in users] == ["alice@example.com"]


@pytest.mark.parametrize(
    "email",
    ["mallory@evil.example", "mallory@example.com.evil.example", "mallory@evilexample.com"],
    ids=["other-domain", "suffix-domain", "prefix-domain"],
)
async def test_email_domain_outside_allow_list_rejected(
    make_harness: HarnessFactory, google: FakeGoogle, email: str
) -> None:
    """Source: oauth2-proxy advisory GHSA-c5c4-8r6x-56w3, case C10: exact domain match only."""
    harness = await make_harness(access={"allowed_email_domains": ["example.com"]})
    del google.claims["hd"]
    google.claims["email"] = email

    response = await harness.sign_in("google", google)

    assert response.status_code == 403
    assert page_reason(response) == "domain_not_allowed"
    assert await harness.guard.store.list_users() == []


# --- token endpoint failures ---------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "status", "reason"),
    [
        (httpx.Response(400, json={"error": "invalid_grant", "error_description": "Bad Request"}),
         502, "provider_error"),
        (httpx.Response(500, text="<html><title>Error 500 (Server Error)!!1</title></html>"),
         502, "provider_error"),
        (httpx.Response(200, text="<!DOCTYPE html><html>not json</html>"), 502, "provider_error"),
        (httpx.Response(200, json=["not", "an", "object"]), 502, "provider_error"),
        (httpx.ReadTimeout("timed out"), 504, "provider_timeout"),
        (httpx.ConnectError("connection refused"), 502, "provider_unreachable"),
    ],
    ids=["invalid-grant", "http-500", "html-body", "json-array", "timeout", "connect-error"],
)
async def test_token_endpoint_failure_shows_reason(
    make_harness: HarnessFactory, google: FakeGoogle,
    failure: httpx.Response | Exception, status: int, reason: str,
) -> None:
    harness = await make_harness()
    google.endpoint.failure = failure

    response = await harness.sign_in("google", google)

    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert page_reason(response) == reason
    assert "Traceback" not in response.text
    assert await failure_reasons(harness) == [reason]
    assert await harness.guard.store.list_users() == []


@pytest.mark.parametrize(
    "id_token_json",
    ['"\\ud800.e30.c2ln"', '"not-a-jwt"', '"a.b.c"', "12345", "null"],
    ids=["lone-surrogate", "no-dots", "garbage-parts", "number", "null"],
)
async def test_malformed_id_token_rejected(
    make_harness: HarnessFactory, google: FakeGoogle, id_token_json: str
) -> None:
    harness = await make_harness()
    body = '{"access_token": "at", "token_type": "Bearer", "id_token": ' + id_token_json + "}"
    google.endpoint.failure = httpx.Response(
        200, content=body.encode(), headers={"content-type": "application/json"}
    )

    response = await harness.sign_in("google", google)

    assert response.status_code == 403
    assert page_reason(response) == "token_invalid"
    assert await failure_reasons(harness) == ["token_invalid"]


# --- configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"hosted_domain": "not a domain"}, "hosted_domain \"not a domain\""),
        ({"hosted_domain": "example.com/"}, "hosted_domain \"example.com/\""),
        ({"hosted_domain": "*"}, "hosted_domain \"*\""),
        ({"tenant": "organizations"}, "tenant is not used by type \"google\""),
        ({"allowed_tenants": ["9188040d-6c67-4c5b-b112-36a304b66dad"]},
         "allowed_tenants is not used"),
        ({"role_mapping": {"admins": ["admin"]}}, "role_mapping is not used"),
        ({"token_url": "https://oauth2.googleapis.com/token"}, "token_url is not used"),
    ],
    ids=["spaces", "trailing-slash", "wildcard", "tenant", "allowed-tenants", "role-mapping",
         "token-url"],
)
def test_invalid_settings_rejected_with_key_and_value(
    tmp_path: Path, overrides: dict[str, Any], expected: str
) -> None:
    config = merge(base_config(tmp_path), {})
    config["providers"] = [google_provider(**overrides)]
    settings = settings_from_mapping(config)

    with pytest.raises(ConfigError) as caught:
        GoogleProvider(settings.providers[0], httpx.AsyncClient())

    assert expected in str(caught.value)
    assert "providers \"google\"" in str(caught.value)
