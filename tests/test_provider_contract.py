"""One contract for every provider type: the authorization URL and the identity it returns.

Each case configures one provider type against respx fakes of that provider's
documented responses. The contract test builds the provider with
``build_provider``, as the guard does, and checks only what the guard relies on.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from conftest import PUBLIC_URL, echo_app
from support.fake_idp import FakeIdp
from support.oauth_harness import (
    REDIRECT_URI,
    FakeFacebook,
    FakeGitHub,
    FakeOAuth2,
    guard_config,
)
from support.provider_harness import FakeTokenEndpoint

from moko_guard import Guard, GuardMiddleware, settings_from_mapping
from moko_guard.config import PROVIDER_TYPES
from moko_guard.flow import code_challenge
from moko_guard.providers import build_provider

pytestmark = pytest.mark.anyio

STATE = "attempt-0001.state-value-0123456789abcdefABCDEF"
NONCE = "nonce-value-0123456789"
CODE_VERIFIER = "verifier-" + "v" * 50
GOOGLE_ISSUER = "https://accounts.google.com"
MICROSOFT_LOGIN = "https://login.microsoftonline.com"
MICROSOFT_TENANT = "b9419818-09af-49c2-b0c3-653adc1f376e"


@dataclass
class ContractCase:
    """A provider entry, the fake that responds for it, and how that fake approves a request."""

    provider: dict[str, Any]
    install: Callable[[respx.Router], None]
    # Takes the authorization URL, returns the code the provider sends back.
    approve: Callable[[str], str]


def oidc_case() -> ContractCase:
    from support.fake_idp import CLIENT_ID, CLIENT_SECRET, ISSUER

    idp = FakeIdp()

    def approve(url: str) -> str:
        idp.remember_nonce(url)
        return "code-1"

    provider = {"id": "idp", "type": "oidc", "issuer": ISSUER, "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET, "id_token_algorithms": ["RS256"]}
    return ContractCase(provider, idp.install, approve)


def google_case() -> ContractCase:
    client_id = "1234987819200-5l0vb3adqe0hm8hqjoc.apps.googleusercontent.com"
    endpoint = FakeTokenEndpoint(
        claims={"iss": GOOGLE_ISSUER, "aud": client_id, "azp": client_id,
                "sub": "110169484474386276334", "email": "alice@example.com",
                "email_verified": True, "name": "Alice Example"},
        token_fields={"access_token": "ya29.a0-example", "expires_in": 3599,
                      "token_type": "Bearer", "scope": "openid email profile"},
    )
    document: dict[str, Any] = {
        "issuer": GOOGLE_ISSUER,
        "authorization_endpoint": f"{GOOGLE_ISSUER}/o/oauth2/v2/auth",
        "token_endpoint": "https://oauth2.googleapis.com/token",
        "userinfo_endpoint": "https://openidconnect.googleapis.com/v1/userinfo",
        "jwks_uri": "https://www.googleapis.com/oauth2/v3/certs",
        "id_token_signing_alg_values_supported": ["RS256"],
    }

    def install(router: respx.Router) -> None:
        router.get(f"{GOOGLE_ISSUER}/.well-known/openid-configuration").respond(json=document)
        router.get(document["jwks_uri"]).mock(side_effect=endpoint.jwks)
        router.post(document["token_endpoint"]).mock(side_effect=endpoint.token)
        router.get(document["userinfo_endpoint"]).respond(
            json={"sub": "110169484474386276334", "name": "Alice Example"})

    def approve(url: str) -> str:
        endpoint.remember_nonce(url)
        return "4/0AY0e-example-code"

    provider = {"id": "google", "type": "google", "client_id": client_id,
                "client_secret": "GOCSPX-test-secret"}
    return ContractCase(provider, install, approve)


def microsoft_case() -> ContractCase:
    client_id = "6cb04018-a3f5-46a7-b995-940c78f5aef3"
    issuer = f"{MICROSOFT_LOGIN}/{MICROSOFT_TENANT}/v2.0"
    prefix = f"{MICROSOFT_LOGIN}/{MICROSOFT_TENANT}"
    endpoint = FakeTokenEndpoint(
        claims={"iss": issuer, "aud": client_id, "tid": MICROSOFT_TENANT,
                "oid": "690222be-ff1a-4d56-abd1-7e4f7d38e474",
                "sub": "HKZpfaHyWadeOouYlitjrI-KffTm222X5rrV3xDqfKQ",
                "preferred_username": "alice@example.com", "email": "alice@example.com",
                "xms_edov": True, "name": "Alice Example", "ver": "2.0"},
        token_fields={"access_token": "eyJ0eXAi.example.signature", "token_type": "Bearer",
                      "expires_in": 4796, "scope": "openid profile email"},
        with_not_before=True,
    )
    document: dict[str, Any] = {
        "issuer": issuer,
        "authorization_endpoint": f"{prefix}/oauth2/v2.0/authorize",
        "token_endpoint": f"{prefix}/oauth2/v2.0/token",
        "jwks_uri": f"{prefix}/discovery/v2.0/keys",
        "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
        "id_token_signing_alg_values_supported": ["RS256"],
    }

    def install(router: respx.Router) -> None:
        router.get(f"{issuer}/.well-known/openid-configuration").respond(json=document)
        router.get(document["jwks_uri"]).mock(side_effect=endpoint.jwks)
        router.post(document["token_endpoint"]).mock(side_effect=endpoint.token)

    def approve(url: str) -> str:
        endpoint.remember_nonce(url)
        return "0.AXkAGJhBua8Jw0mw-example-code"

    provider = {"id": "entra", "type": "microsoft", "client_id": client_id,
                "client_secret": "Qx28Q~example-client-secret", "tenant": MICROSOFT_TENANT}
    return ContractCase(provider, install, approve)


def oauth2_family_case(fake: FakeFacebook | FakeGitHub | FakeOAuth2) -> ContractCase:
    return ContractCase(fake.provider_config(), fake.install,
                        lambda url: fake.authorize(url)["code"])


CASES: dict[str, Callable[[], ContractCase]] = {
    "oidc": oidc_case,
    "google": google_case,
    "microsoft": microsoft_case,
    "facebook": lambda: oauth2_family_case(FakeFacebook()),
    "github": lambda: oauth2_family_case(FakeGitHub()),
    "oauth2": lambda: oauth2_family_case(FakeOAuth2()),
}


def skip_unless_built(provider_type: str) -> None:
    if importlib.util.find_spec(f"moko_guard.providers.{provider_type}") is None:
        pytest.skip(f"moko_guard/providers/{provider_type}.py does not exist yet")


def test_contract_covers_every_configurable_type() -> None:
    assert sorted(CASES) == sorted(PROVIDER_TYPES)


@pytest.mark.parametrize("provider_type", list(CASES), ids=list(CASES))
async def test_provider_contract(tmp_path: Path, provider_type: str) -> None:
    skip_unless_built(provider_type)
    case = CASES[provider_type]()
    router = respx.Router(assert_all_called=False)
    case.install(router)
    settings = settings_from_mapping(guard_config(tmp_path, [case.provider]))
    challenge = code_challenge(CODE_VERIFIER)

    async with httpx.AsyncClient(transport=httpx.MockTransport(router.handler)) as client:
        provider = build_provider(settings.providers[0], client)
        url = await provider.authorization_url(
            state=STATE, nonce=NONCE, code_challenge=challenge, redirect_uri=REDIRECT_URI)
        code = case.approve(url)
        identity = await provider.complete(
            code=code, redirect_uri=REDIRECT_URI, code_verifier=CODE_VERIFIER, nonce=NONCE)
        ready = await provider.ready()

    params = httpx.URL(url).params
    assert httpx.URL(url).scheme == "https"
    assert params["state"] == STATE
    assert params["code_challenge"] == challenge
    assert params["code_challenge_method"] == "S256"
    assert params["redirect_uri"] == REDIRECT_URI
    assert params["client_id"] == case.provider["client_id"]
    assert params["response_type"] == "code"
    assert provider.id == case.provider["id"]
    assert identity.provider == case.provider["id"]
    assert identity.subject.strip()
    assert isinstance(identity.email_verified, bool)
    assert ready is True


async def test_sign_in_page_marks_in_order(tmp_path: Path) -> None:
    order = ("github", "oauth2", "microsoft", "facebook", "oidc", "google")
    built = [t for t in order if importlib.util.find_spec(f"moko_guard.providers.{t}")]
    entries = [{**CASES[t]().provider, "name": f"{t.title()} Sign-In"} for t in built]
    settings = settings_from_mapping(guard_config(tmp_path, entries))
    guard = Guard(settings, http_client=httpx.AsyncClient(transport=httpx.MockTransport(
        respx.Router().handler)))
    app = GuardMiddleware(echo_app(), guard=guard)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url=PUBLIC_URL) as client:
        page = await client.get("/oauth2/sign_in")
    await guard.shutdown()
    await guard.http.aclose()

    buttons = [part.split('"', 1)[0] for part in page.text.split('data-provider="')[1:]]
    marks = [part.split('"', 1)[0] for part in page.text.split('data-mark="')[1:]]
    expected_marks = {"github": "github", "oauth2": "letter", "microsoft": "microsoft",
                      "facebook": "facebook", "oidc": "letter", "google": "google"}
    assert page.status_code == 200
    assert buttons == [entry["id"] for entry in entries]
    assert marks == [expected_marks[t] for t in built]
    for entry in entries:
        assert f"Sign in with {entry['name']}" in page.text
