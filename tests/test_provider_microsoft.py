"""The microsoft provider type through the whole sign-in flow, against respx fakes.

The fakes return responses shaped as Microsoft documents them for the
identity platform v2.0 endpoints: the discovery document (with the ``{tenantid}`` issuer template
for ``common``), v2.0 ID tokens with ``tid``, ``oid`` and ``preferred_username``,
personal-account tokens from tenant 9188040d-6c67-4c5b-b112-36a304b66dad, and
Microsoft Graph's response to ``POST /v1.0/me/getMemberObjects``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from conftest import base_config, echo_app, merge, page_reason
from support.provider_harness import FakeTokenEndpoint, ProviderHarness, guarded_app

from moko_guard import settings_from_mapping
from moko_guard.errors import ConfigError
from moko_guard.providers.microsoft import CONSUMERS_TENANT_ID, MicrosoftProvider

pytestmark = pytest.mark.anyio

LOGIN = "https://login.microsoftonline.com"
GRAPH = "https://graph.microsoft.com"
ISSUER_TEMPLATE = f"{LOGIN}/{{tenantid}}/v2.0"
CLIENT_ID = "6cb04018-a3f5-46a7-b995-940c78f5aef3"
CLIENT_SECRET = "Qx28Q~example-client-secret"
# Tenant ids and object ids below are made up for the tests.
CONTOSO = "b9419818-09af-49c2-b0c3-653adc1f376e"
FABRIKAM = "3c8b7a2e-5d41-4f0a-9e6b-1f2d3c4b5a69"
ALICE_OID = "690222be-ff1a-4d56-abd1-7e4f7d38e474"
CAROL_OID = "00000000-0000-0000-66f3-3332eca7ea81"
SALES_GROUP = "fee2c45b-915a-4a64-b130-f4eb9e75525e"
FINANCE_GROUP = "4fe90ae7-065a-478b-9400-e0a0e1cbd540"
UNMAPPED_GROUP = "c1d2e3f4-0000-4000-8000-000000000001"
ACCESS_TOKEN = "eyJ0eXAiOiJKV1QiLCJub25jZSI6Ik1pY3Jvc29mdCBHcmFwaCJ9.example.signature"


def discovery(base: str, tenant_path: str, issuer: str) -> dict[str, Any]:
    """Shape of {base}/{tenant}/v2.0/.well-known/openid-configuration."""
    endpoint = f"{base}/{tenant_path}"
    return {
        "token_endpoint": f"{endpoint}/oauth2/v2.0/token",
        "token_endpoint_auth_methods_supported": [
            "client_secret_post", "private_key_jwt", "client_secret_basic"],
        "jwks_uri": f"{endpoint}/discovery/v2.0/keys",
        "response_modes_supported": ["query", "fragment", "form_post"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
        "scopes_supported": ["openid", "profile", "email", "offline_access"],
        "issuer": issuer,
        "request_uri_parameter_supported": False,
        "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
        "authorization_endpoint": f"{endpoint}/oauth2/v2.0/authorize",
        "device_authorization_endpoint": f"{endpoint}/oauth2/v2.0/devicecode",
        "http_logout_supported": True,
        "frontchannel_logout_supported": True,
        "end_session_endpoint": f"{endpoint}/oauth2/v2.0/logout",
        "claims_supported": [
            "sub", "iss", "cloud_instance_name", "cloud_instance_host_name",
            "cloud_graph_host_name", "msgraph_host", "aud", "exp", "iat", "auth_time", "acr",
            "nonce", "preferred_username", "name", "tid", "ver", "at_hash", "c_hash", "email"],
        "kerberos_endpoint": f"{endpoint}/kerberos",
        "tenant_region_scope": None,
        "cloud_instance_name": "microsoftonline.com",
        "cloud_graph_host_name": "graph.windows.net",
        "msgraph_host": "graph.microsoft.com",
        "rbac_url": "https://pas.windows.net",
    }


def work_account_claims(tid: str = CONTOSO) -> dict[str, Any]:
    """Claims of a v2.0 ID token for a work account, with the email optional claims."""
    return {
        "aud": CLIENT_ID,
        "iss": f"{LOGIN}/{tid}/v2.0",
        "aio": "AXQAi/8UAAAAvA6kcEVNxzwC4YqFJkBTvJ3YN4+ZlbEC4lZfV1hSOcU=",
        "name": "Alice Example",
        "oid": ALICE_OID,
        "preferred_username": "alice@example.com",
        "email": "alice@example.com",
        "xms_edov": True,
        "rh": "0.AXkAGJhBua8Jw0mwwGU63B83bhhAsGz1o6dGuZWUDHj1rvN5AAA.",
        "sid": "00a4c7b2-1e2f-4d3c-9b8a-7f6e5d4c3b2a",
        "sub": "HKZpfaHyWadeOouYlitjrI-KffTm222X5rrV3xDqfKQ",
        "tid": tid,
        "uti": "fqiBqXLPj0eQa82S-IYFAA",
        "ver": "2.0",
    }


def personal_account_claims() -> dict[str, Any]:
    """Claims of a v2.0 ID token for a personal Microsoft account (no email optional claims)."""
    return {
        "aud": CLIENT_ID,
        "iss": f"{LOGIN}/{CONSUMERS_TENANT_ID}/v2.0",
        "name": "Carol Example",
        "oid": CAROL_OID,
        "preferred_username": "carol@outlook.com",
        "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
        "tid": CONSUMERS_TENANT_ID,
        "aio": "Dd1MNJlc4h1UVbFDq0P1mDaWxbsA2dr0ItbT*7q4BSFnnYbN3R1Mwyk=",
        "ver": "2.0",
    }


def overage_claims(tid: str = CONTOSO) -> dict[str, Any]:
    """The claims an ID token carries in place of "groups" when the user has too many."""
    return {
        "_claim_names": {"groups": "src1"},
        "_claim_sources": {"src1": {
            "endpoint": f"https://graph.windows.net/{tid}/users/{ALICE_OID}/getMemberObjects"}},
    }


@dataclass
class FakeMicrosoft:
    """The discovery, token and JWKS endpoints of one tenant path, and Microsoft Graph."""

    endpoint: FakeTokenEndpoint = field(default_factory=lambda: FakeTokenEndpoint(
        claims=work_account_claims(),
        token_fields={
            "token_type": "Bearer",
            "scope": "openid profile email User.Read",
            "expires_in": 4796,
            "ext_expires_in": 4796,
            "access_token": ACCESS_TOKEN,
        },
        kid="nOo3ZDrODXEK1jKWhXslHR_KXEg",
        # Microsoft's keys name their issuer and carry no "alg".
        jwk_fields={"alg": None, "x5t": "nOo3ZDrODXEK1jKWhXslHR_KXEg",
                    "issuer": ISSUER_TEMPLATE},
        with_not_before=True,
    ))
    base: str = LOGIN
    graph: str = GRAPH
    tenant_path: str = "common"
    issuer: str = ISSUER_TEMPLATE
    graph_groups: list[str] = field(default_factory=list)
    graph_failure: httpx.Response | Exception | None = None
    graph_requests: list[httpx.Request] = field(default_factory=list)
    document_changes: dict[str, Any] = field(default_factory=dict)

    @property
    def claims(self) -> dict[str, Any]:
        return self.endpoint.claims

    def remember_nonce(self, authorize_url: str) -> dict[str, str]:
        return self.endpoint.remember_nonce(authorize_url)

    def install(self, router: respx.Router) -> None:
        prefix = f"{self.base}/{self.tenant_path}"
        router.get(f"{prefix}/v2.0/.well-known/openid-configuration").mock(
            side_effect=self._discovery
        )
        router.get(f"{prefix}/discovery/v2.0/keys").mock(side_effect=self.endpoint.jwks)
        router.post(f"{prefix}/oauth2/v2.0/token").mock(side_effect=self.endpoint.token)
        router.post(f"{self.graph}/v1.0/me/getMemberObjects").mock(side_effect=self._graph)

    def _discovery(self, _request: httpx.Request) -> httpx.Response:
        document = {**discovery(self.base, self.tenant_path, self.issuer), **self.document_changes}
        return httpx.Response(200, json=document)

    def _graph(self, request: httpx.Request) -> httpx.Response:
        self.graph_requests.append(request)
        if isinstance(self.graph_failure, Exception):
            raise self.graph_failure
        if self.graph_failure is not None:
            return self.graph_failure
        return httpx.Response(200, json={
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(Edm.String)",
            "value": self.graph_groups,
        })


def microsoft_provider(**overrides: Any) -> dict[str, Any]:
    return {"id": "entra", "type": "microsoft", "name": "Microsoft", "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET, **overrides}


ROLE_MAPPING = {SALES_GROUP: ["sales"], FINANCE_GROUP: ["finance"], "CRM.Admin": ["admin"]}
GRAPH_403 = httpx.Response(403, json={"error": {
    "code": "Authorization_RequestDenied",
    "message": "Insufficient privileges to complete the operation.",
    "innerError": {"date": "2024-05-02T10:00:00", "request-id": "9b1c7a4e-0000-4000-8000-1"},
}})

HarnessFactory = Callable[..., Awaitable[ProviderHarness]]


@pytest.fixture
def microsoft() -> FakeMicrosoft:
    return FakeMicrosoft()


@pytest.fixture
async def make_harness(
    tmp_path: Path, microsoft: FakeMicrosoft
) -> AsyncIterator[HarnessFactory]:
    async with AsyncExitStack() as stack:

        async def factory(provider: dict[str, Any] | None = None,
                          **overrides: Any) -> ProviderHarness:
            config = merge(base_config(tmp_path), overrides)
            config["providers"] = [microsoft_provider(**(provider or {}))]
            settings = settings_from_mapping(config)
            router = respx.Router(assert_all_called=False)
            microsoft.install(router)
            return await stack.enter_async_context(guarded_app(settings, router, echo_app()))

        yield factory


async def failure_reasons(harness: ProviderHarness) -> list[str | None]:
    return [record.reason for record in await harness.login_failures()]


async def user_roles(harness: ProviderHarness, subject: str) -> tuple[str, ...]:
    user = await harness.guard.store.user_for_identity("entra", subject)
    assert user is not None
    return user.roles


# --- happy path and subject ----------------------------------------------------


async def test_work_account_signs_in_as_tid_oid(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    harness = await make_harness({"allowed_tenants": [CONTOSO]})

    start = await harness.start_login("entra")
    params = microsoft.remember_nonce(start.headers["location"])
    callback = await harness.client.get(
        "/oauth2/callback", params={"code": "0.AXkA-code", "state": params["state"]}
    )

    assert start.headers["location"].startswith(f"{LOGIN}/common/oauth2/v2.0/authorize?")
    assert params["client_id"] == CLIENT_ID
    assert params["scope"] == "openid email profile"
    assert params["code_challenge_method"] == "S256"
    assert callback.status_code == 302
    assert callback.headers["location"] == "/deals"
    headers = await harness.upstream_headers()
    assert headers["x-auth-request-email"] == "alice@example.com"
    assert headers["x-auth-request-provider"] == "entra"
    assert headers["x-auth-request-preferred-username"] == "alice@example.com"
    user = await harness.guard.store.user_for_identity("entra", f"{CONTOSO}:{ALICE_OID}")
    assert user is not None
    assert user.roles == ("user",)


async def test_subject_stays_tid_oid_when_email_changes(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    harness = await make_harness()
    await harness.sign_in("entra", microsoft)
    microsoft.claims["email"] = "alice.renamed@example.com"
    microsoft.claims["preferred_username"] = "alice.renamed@example.com"

    response = await harness.sign_in_again("entra", microsoft)

    assert response.status_code == 302
    users = await harness.guard.store.list_users()
    assert len(users) == 1
    identities = await harness.guard.store.identities_of(users[0].id)
    assert [identity.subject for identity in identities] == [f"{CONTOSO}:{ALICE_OID}"]


async def test_same_oid_in_other_tenant_is_other_identity(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    """An object id signed for another tenant is another identity: the tid is in the subject."""
    harness = await make_harness()
    await harness.sign_in("entra", microsoft)
    microsoft.endpoint.claims = work_account_claims(FABRIKAM)
    microsoft.claims["email"] = "alice@fabrikam.example"
    del microsoft.claims["xms_edov"]

    response = await harness.sign_in_again("entra", microsoft)

    assert response.status_code == 403
    assert await harness.guard.store.user_for_identity("entra", f"{FABRIKAM}:{ALICE_OID}") is None


async def test_token_without_oid_rejected(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    harness = await make_harness()
    del microsoft.claims["oid"]

    response = await harness.sign_in("entra", microsoft)

    assert response.status_code == 403
    assert page_reason(response) == "token_invalid"
    assert await harness.guard.store.list_users() == []


# --- issuer and tenant -----------------------------------------------------------


@pytest.mark.parametrize(
    "issuer",
    [f"{LOGIN}/{CONTOSO}/v2.0", ISSUER_TEMPLATE, f"https://sts.windows.net/{FABRIKAM}/",
     f"{LOGIN}/{FABRIKAM}/v2.0/", f"https://login.microsoftonline.us/{FABRIKAM}/v2.0"],
    ids=["other-tenant", "template-literal", "v1-issuer", "trailing-slash", "other-cloud"],
)
async def test_iss_not_matching_token_tid_rejected(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft, issuer: str
) -> None:
    """Source: mod_auth_openidc issue #336 (Azure AD common endpoint), case C17 input B.

    The expected iss is the metadata's template with the token's own tid, so
    a token whose iss names another tenant than its tid is rejected even when
    that other tenant is allowed.
    """
    harness = await make_harness({"allowed_tenants": [CONTOSO, FABRIKAM]})
    microsoft.endpoint.claims = work_account_claims(FABRIKAM)
    microsoft.claims["iss"] = issuer

    response = await harness.sign_in("entra", microsoft)

    assert response.status_code == 403
    assert page_reason(response) == "token_invalid"
    assert await failure_reasons(harness) == ["token_invalid"]
    assert await harness.guard.store.list_users() == []


@pytest.mark.parametrize(
    "tid", ["", "not-a-guid", None], ids=["empty", "not-a-guid", "missing"]
)
async def test_token_without_tenant_id_rejected(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft, tid: str | None
) -> None:
    harness = await make_harness()
    if tid is None:
        del microsoft.claims["tid"]
    else:
        microsoft.claims["tid"] = tid

    response = await harness.sign_in("entra", microsoft)

    assert page_reason(response) == "token_invalid"
    assert await harness.guard.store.list_users() == []


async def test_tenant_outside_allowed_tenants_rejected(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    """Source: mod_auth_openidc issue #336, case C17 input A: valid token, tenant not allowed."""
    harness = await make_harness(
        {"allowed_tenants": [CONTOSO]},
        access={"provision_email_domains": ["example.com", "fabrikam.example"]},
    )
    microsoft.endpoint.claims = work_account_claims(FABRIKAM)
    microsoft.claims["email"] = "frank@fabrikam.example"

    response = await harness.sign_in("entra", microsoft)

    assert response.status_code == 403
    assert page_reason(response) == "tenant_not_allowed"
    failures = await harness.login_failures()
    assert [record.reason for record in failures] == ["tenant_not_allowed"]
    assert f"tid={FABRIKAM}" in (failures[0].detail or "")
    assert await harness.guard.store.list_users() == []


@pytest.mark.parametrize(
    "allowed", [[CONTOSO], [CONTOSO.upper(), FABRIKAM], []],
    ids=["listed", "listed-upper-case", "no-list"],
)
async def test_tenant_in_allowed_tenants_accepted(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft, allowed: list[str]
) -> None:
    """Source: case C17 input C: iss and tid agree and the tenant is allowed."""
    harness = await make_harness({"allowed_tenants": allowed})

    response = await harness.sign_in("entra", microsoft)

    assert response.status_code == 302


async def test_personal_account_needs_consumers_tenant_in_allow_list(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    harness = await make_harness({"allowed_tenants": [CONTOSO]})
    microsoft.endpoint.claims = personal_account_claims()

    response = await harness.sign_in("entra", microsoft)

    assert page_reason(response) == "tenant_not_allowed"
    assert await harness.guard.store.list_users() == []


async def test_personal_account_signs_in_through_consumers_tenant(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    """The consumers metadata names the personal-account tenant itself as its issuer."""
    microsoft.tenant_path = "consumers"
    microsoft.issuer = f"{LOGIN}/{CONSUMERS_TENANT_ID}/v2.0"
    microsoft.endpoint.claims = personal_account_claims()
    harness = await make_harness(
        {"tenant": "consumers", "insecure_email_from_username": True},
        access={"provision_email_domains": ["outlook.com"]},
    )

    response = await harness.sign_in("entra", microsoft)

    assert response.status_code == 302
    subject = f"{CONSUMERS_TENANT_ID}:{CAROL_OID}"
    assert await harness.guard.store.user_for_identity("entra", subject) is not None


async def test_single_tenant_rejects_token_of_other_tenant(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    microsoft.tenant_path = CONTOSO
    microsoft.issuer = f"{LOGIN}/{CONTOSO}/v2.0"
    microsoft.endpoint.claims = work_account_claims(FABRIKAM)
    harness = await make_harness({"tenant": CONTOSO})

    response = await harness.sign_in("entra", microsoft)

    assert page_reason(response) == "token_invalid"


async def test_domain_tenant_pins_tenant_from_metadata(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    microsoft.tenant_path = "contoso.onmicrosoft.com"
    microsoft.issuer = f"{LOGIN}/{CONTOSO}/v2.0"
    harness = await make_harness({"tenant": "contoso.onmicrosoft.com"})

    accepted = await harness.sign_in("entra", microsoft)
    microsoft.endpoint.claims = work_account_claims(FABRIKAM)
    rejected = await harness.sign_in_again("entra", microsoft)

    assert accepted.status_code == 302
    assert page_reason(rejected) == "token_invalid"


@pytest.mark.parametrize(
    ("tenant", "changes"),
    [
        (CONTOSO, {"issuer": f"{LOGIN}/{FABRIKAM}/v2.0"}),
        ("common", {"issuer": f"{LOGIN}/{CONTOSO}/v2.0"}),
        ("common", {"issuer": "https://login.evil.example/{tenantid}/v2.0"}),
        ("common", {"token_endpoint": "https://login.evil.example/common/oauth2/v2.0/token"}),
        ("common", {"jwks_uri": "http://login.microsoftonline.com/common/discovery/v2.0/keys"}),
    ],
    ids=["other-tenant-issuer", "concrete-issuer-for-common", "issuer-other-host",
         "token-endpoint-other-host", "jwks-plain-http"],
)
async def test_discovery_document_not_matching_settings_rejected(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft, tenant: str,
    changes: dict[str, Any],
) -> None:
    microsoft.tenant_path = tenant
    microsoft.document_changes = changes
    harness = await make_harness({"tenant": tenant})

    response = await harness.client.get("/oauth2/start", params={"provider": "entra"})

    assert response.status_code == 503
    assert page_reason(response) == "provider_unavailable"
    assert microsoft.endpoint.token_requests == []


async def test_national_cloud_uses_configured_hosts(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    microsoft.base = "https://login.microsoftonline.us"
    microsoft.graph = "https://graph.microsoft.us"
    microsoft.tenant_path = CONTOSO
    microsoft.issuer = f"https://login.microsoftonline.us/{CONTOSO}/v2.0"
    microsoft.claims["iss"] = microsoft.issuer
    microsoft.claims.pop("groups", None)
    microsoft.claims.update(overage_claims())
    microsoft.graph_groups = [SALES_GROUP]
    harness = await make_harness({
        "tenant": CONTOSO, "api_base_url": "https://login.microsoftonline.us",
        "userinfo_url": "https://graph.microsoft.us/oidc/userinfo", "role_mapping": ROLE_MAPPING,
    })

    start = await harness.start_login("entra")
    params = microsoft.remember_nonce(start.headers["location"])
    response = await harness.client.get(
        "/oauth2/callback", params={"code": "c", "state": params["state"]}
    )

    assert start.headers["location"].startswith(
        f"https://login.microsoftonline.us/{CONTOSO}/oauth2/v2.0/authorize?")
    assert response.status_code == 302
    assert str(microsoft.graph_requests[0].url) == (
        "https://graph.microsoft.us/v1.0/me/getMemberObjects")
    assert "sales" in await user_roles(harness, f"{CONTOSO}:{ALICE_OID}")


# --- email ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "signed_in"),
    [({"xms_edov": True}, True), ({"email_verified": True}, True),
     ({"xms_edov": "true"}, True), ({}, False), ({"xms_edov": False}, False),
     ({"email_verified": False}, False)],
    ids=["xms-edov", "email-verified", "xms-edov-string", "no-flag", "xms-edov-false",
         "email-verified-false"],
)
async def test_email_claim_verified_only_with_flag(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft, flags: dict[str, Any],
    signed_in: bool,
) -> None:
    harness = await make_harness()
    del microsoft.claims["xms_edov"]
    microsoft.claims.update(flags)

    response = await harness.sign_in("entra", microsoft)

    if signed_in:
        assert response.status_code == 302
    else:
        assert response.status_code == 403
        assert page_reason(response) == "email_unverified"
        assert await harness.guard.store.list_users() == []


async def test_token_without_email_rejected_by_default(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    """Source: fastapi-sso issue #81 (missing "mail" with Microsoft SSO), case C18.

    Without an email claim the preferred_username is not taken as the email
    unless insecure_email_from_username is on.
    """
    harness = await make_harness()
    del microsoft.claims["email"]
    del microsoft.claims["xms_edov"]

    response = await harness.sign_in("entra", microsoft)

    assert response.status_code == 403
    assert page_reason(response) == "email_missing"
    assert "Traceback" not in response.text
    assert await failure_reasons(harness) == ["email_missing"]
    assert await harness.guard.store.list_users() == []


@pytest.mark.parametrize(
    "username_claims",
    [{"preferred_username": "frank@example.com"},
     {"upn": "frank@example.com", "preferred_username": "frank.old@example.com"}],
    ids=["preferred-username", "upn-first"],
)
async def test_username_taken_as_email_with_setting(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft, username_claims: dict[str, str]
) -> None:
    """Source: case C18: the operator's opt-in fallback to the user principal name."""
    harness = await make_harness({"insecure_email_from_username": True})
    del microsoft.claims["email"]
    del microsoft.claims["xms_edov"]
    microsoft.claims.update(username_claims)

    response = await harness.sign_in("entra", microsoft)

    assert response.status_code == 302
    users = await harness.guard.store.list_users()
    assert [user.email for user in users] == ["frank@example.com"]


@pytest.mark.parametrize(
    "username",
    ["+15555550123", "frank_gmail.com#EXT#@contoso.onmicrosoft.com", "frank"],
    ids=["phone-number", "guest-upn", "bare-name"],
)
async def test_non_address_username_ignored(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft, username: str
) -> None:
    harness = await make_harness({"insecure_email_from_username": True})
    del microsoft.claims["email"]
    del microsoft.claims["xms_edov"]
    microsoft.claims["preferred_username"] = username

    response = await harness.sign_in("entra", microsoft)

    assert page_reason(response) == "email_missing"


@pytest.mark.parametrize(
    "email",
    ["mallory@evil.example@example.com", "mallory@example.com@evil.example", "@example.com",
     "mallory@", "mallory@example.com."],
    ids=["two-at-signs", "two-at-signs-reversed", "empty-local-part", "empty-domain",
         "trailing-dot"],
)
async def test_malformed_email_claim_rejected(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft, email: str
) -> None:
    """Source: oauth2-proxy advisory GHSA-c5c4-8r6x-56w3, case C10: one "@", exact domain."""
    harness = await make_harness(access={"allowed_email_domains": ["example.com"]})
    microsoft.claims["email"] = email

    response = await harness.sign_in("entra", microsoft)

    assert response.status_code == 403
    assert page_reason(response) == "malformed_email"
    assert await failure_reasons(harness) == ["malformed_email"]
    assert await harness.guard.store.list_users() == []


# --- roles from groups and app roles ---------------------------------------------


async def test_roles_mapped_from_groups_and_app_roles(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    harness = await make_harness({"role_mapping": ROLE_MAPPING})
    microsoft.claims["groups"] = [SALES_GROUP.upper(), UNMAPPED_GROUP]
    microsoft.claims["roles"] = ["CRM.Admin", "CRM.Unmapped"]

    start = await harness.start_login("entra")
    params = microsoft.remember_nonce(start.headers["location"])
    response = await harness.client.get(
        "/oauth2/callback", params={"code": "c", "state": params["state"]}
    )

    assert params["scope"] == "openid email profile User.Read"
    assert response.status_code == 302
    roles = await user_roles(harness, f"{CONTOSO}:{ALICE_OID}")
    assert set(roles) == {"user", "sales", "admin"}
    header = (await harness.upstream_headers())["x-auth-request-roles"]
    assert set(header.split(",")) == {"user", "sales", "admin"}


@pytest.mark.parametrize(
    ("scopes", "expected"),
    [(None, "openid email profile User.Read"), (["openid", "profile"], "openid profile")],
    ids=["default-scopes", "configured-scopes"],
)
async def test_requested_scopes_kept_after_client_secret_change(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft, tmp_path: Path,
    scopes: list[str] | None, expected: str,
) -> None:
    provider: dict[str, Any] = {"role_mapping": ROLE_MAPPING}
    if scopes is not None:
        provider["scopes"] = scopes
    harness = await make_harness(provider)
    config = merge(base_config(tmp_path), {})
    config["providers"] = [microsoft_provider(**provider, client_secret="rotated-secret")]

    changed = harness.guard.apply_secrets(settings_from_mapping(config))
    start = await harness.start_login("entra")

    assert changed == ["providers.entra.client_secret"]
    assert microsoft.remember_nonce(start.headers["location"])["scope"] == expected


async def test_mapped_role_removed_when_group_gone(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    harness = await make_harness({"role_mapping": ROLE_MAPPING})
    microsoft.claims["groups"] = [SALES_GROUP, FINANCE_GROUP]
    microsoft.claims["roles"] = ["CRM.Admin"]
    await harness.sign_in("entra", microsoft)
    user = await harness.guard.store.user_for_identity("entra", f"{CONTOSO}:{ALICE_OID}")
    assert user is not None
    await harness.guard.store.set_roles(user.id, [*user.roles, "manager"])
    microsoft.claims["groups"] = [SALES_GROUP]
    microsoft.claims["roles"] = []

    response = await harness.sign_in_again("entra", microsoft)

    assert response.status_code == 302
    roles = await user_roles(harness, f"{CONTOSO}:{ALICE_OID}")
    assert set(roles) == {"user", "sales", "manager"}
    header = (await harness.upstream_headers())["x-auth-request-roles"]
    assert "admin" not in header.split(",")


async def test_groups_overage_resolved_through_graph(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    harness = await make_harness({"role_mapping": ROLE_MAPPING, "timeout": "7s"})
    microsoft.claims.update(overage_claims())
    microsoft.graph_groups = [FINANCE_GROUP, UNMAPPED_GROUP]

    response = await harness.sign_in("entra", microsoft)

    assert response.status_code == 302
    assert set(await user_roles(harness, f"{CONTOSO}:{ALICE_OID}")) == {"user", "finance"}
    request = microsoft.graph_requests[0]
    assert request.method == "POST"
    assert request.headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert json.loads(request.content) == {"securityEnabledOnly": False}
    assert request.extensions["timeout"]["read"] == 7.0


@pytest.mark.parametrize(
    "failure",
    [GRAPH_403,
     httpx.Response(401, json={"error": {"code": "InvalidAuthenticationToken",
                                         "message": "Access token validation failure."}}),
     httpx.Response(503, text="Service Unavailable"),
     httpx.Response(200, json={"@odata.context": "x"}),
     httpx.Response(200, json={"value": [1, 2]}),
     httpx.Response(200, text="<html>not json</html>"),
     httpx.ReadTimeout("timed out")],
    ids=["forbidden", "unauthorized", "http-503", "no-value", "value-not-ids", "html-body",
         "timeout"],
)
async def test_groups_overage_unresolved_rejected(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft, failure: httpx.Response | Exception
) -> None:
    harness = await make_harness({"role_mapping": ROLE_MAPPING})
    microsoft.claims.update(overage_claims())
    microsoft.graph_failure = failure

    response = await harness.sign_in("entra", microsoft)

    assert response.status_code in (502, 504)
    assert page_reason(response) == "groups_overage_unresolved"
    assert "Traceback" not in response.text
    assert await failure_reasons(harness) == ["groups_overage_unresolved"]
    assert await harness.guard.store.list_users() == []


async def test_groups_overage_ignored_without_role_mapping(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft
) -> None:
    harness = await make_harness()
    microsoft.claims.update(overage_claims())
    microsoft.graph_failure = GRAPH_403

    response = await harness.sign_in("entra", microsoft)

    assert response.status_code == 302
    assert microsoft.graph_requests == []


# --- token endpoint failures ---------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "status", "reason"),
    [
        (httpx.Response(400, json={
            "error": "invalid_grant",
            "error_description": "AADSTS70008: The provided authorization code or refresh "
                                 "token has expired due to inactivity.",
            "error_codes": [70008], "timestamp": "2024-05-02 10:00:00Z",
            "trace_id": "0000aaaa-11bb-cccc-dd22-eeeeee333333",
            "correlation_id": "aaaa0000-bb11-2222-33cc-444444dddddd"}),
         502, "provider_error"),
        (httpx.Response(500, json={"error": "server_error"}), 502, "provider_error"),
        (httpx.Response(200, text="<html><body>Sign in</body></html>"), 502, "provider_error"),
        (httpx.Response(200, content=b"{\"access_token\": "), 502, "provider_error"),
        (httpx.ConnectTimeout("timed out"), 504, "provider_timeout"),
    ],
    ids=["aadsts-invalid-grant", "http-500", "html-body", "truncated-json", "timeout"],
)
async def test_token_endpoint_failure_shows_reason(
    make_harness: HarnessFactory, microsoft: FakeMicrosoft,
    failure: httpx.Response | Exception, status: int, reason: str,
) -> None:
    harness = await make_harness()
    microsoft.endpoint.failure = failure

    response = await harness.sign_in("entra", microsoft)

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
    make_harness: HarnessFactory, microsoft: FakeMicrosoft, id_token_json: str
) -> None:
    harness = await make_harness()
    body = '{"access_token": "at", "token_type": "Bearer", "id_token": ' + id_token_json + "}"
    microsoft.endpoint.failure = httpx.Response(
        200, content=body.encode(), headers={"content-type": "application/json"}
    )

    response = await harness.sign_in("entra", microsoft)

    assert response.status_code == 403
    assert page_reason(response) == "token_invalid"
    assert await failure_reasons(harness) == ["token_invalid"]


# --- configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"tenant": "contoso tenant"}, "tenant \"contoso tenant\" is not valid"),
        ({"allowed_tenants": ["contoso.com"]}, "allowed_tenants entry \"contoso.com\""),
        ({"tenant": CONTOSO, "allowed_tenants": [FABRIKAM]}, f"tenant \"{CONTOSO}\" only"),
        ({"tenant": "consumers", "allowed_tenants": [CONTOSO]}, "tenant \"consumers\" only"),
        ({"hosted_domain": "example.com"}, "hosted_domain is not used by type \"microsoft\""),
        ({"issuer": ISSUER_TEMPLATE}, "issuer is not used"),
        ({"api_base_url": "http://login.microsoftonline.com"},
         "api_base_url \"http://login.microsoftonline.com\" is not an https URL"),
        ({"api_base_url": "https://login.microsoftonline.com/common"},
         "api_base_url \"https://login.microsoftonline.com/common\" has a path"),
        ({"role_mapping": {SALES_GROUP: [""]}}, f"role_mapping entry \"{SALES_GROUP}\""),
    ],
    ids=["tenant", "allowed-tenant-domain", "pinned-tenant-not-allowed",
         "consumers-not-allowed", "hosted-domain", "issuer", "http-base", "base-with-path",
         "empty-role"],
)
def test_invalid_settings_rejected_with_key_and_value(
    tmp_path: Path, overrides: dict[str, Any], expected: str
) -> None:
    config = merge(base_config(tmp_path), {})
    config["providers"] = [microsoft_provider(**overrides)]
    settings = settings_from_mapping(config)

    with pytest.raises(ConfigError) as caught:
        MicrosoftProvider(settings.providers[0], httpx.AsyncClient())

    assert expected in str(caught.value)
    assert "providers \"entra\"" in str(caught.value)
