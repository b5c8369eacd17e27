"""Sign-out: local revocation, and the optional redirect to the provider's end-session page."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import respx

from conftest import GuardHarness
from support.fake_idp import CLIENT_ID, ISSUER

pytestmark = pytest.mark.anyio

METADATA = {
    "issuer": ISSUER, "authorization_endpoint": f"{ISSUER}/authorize",
    "token_endpoint": f"{ISSUER}/token", "userinfo_endpoint": f"{ISSUER}/userinfo",
    "jwks_uri": f"{ISSUER}/jwks", "end_session_endpoint": f"{ISSUER}/logout",
}


def _provider_settings(**changes: Any) -> list[dict[str, Any]]:
    return [{"id": "idp", "type": "oidc", "name": "Example IdP", "issuer": ISSUER,
             "client_id": CLIENT_ID, "client_secret": "crm-client-secret",
             "id_token_algorithms": ["RS256"], **changes}]


async def test_sign_out_ends_provider_session_when_set(
    make_harness: Any, idp_router: respx.Router
) -> None:
    idp_router.get(f"{ISSUER}/.well-known/openid-configuration").respond(200, json=METADATA)
    harness: GuardHarness = await make_harness(providers=_provider_settings(
        sign_out_at_provider=True))
    await harness.sign_in()

    response = await harness.client.post("/oauth2/sign_out", params={"rd": "/goodbye"})

    assert response.status_code == 302
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == f"{ISSUER}/logout"
    query = parse_qs(location.query)
    assert query["client_id"] == [CLIENT_ID]
    assert query["post_logout_redirect_uri"] == ["https://crm.example.com/goodbye"]
    assert 'moko_session=""' in response.headers["set-cookie"]


async def test_sign_out_stays_local_by_default(
    harness: GuardHarness, idp_router: respx.Router
) -> None:
    idp_router.get(f"{ISSUER}/.well-known/openid-configuration").respond(200, json=METADATA)
    await harness.sign_in()

    response = await harness.client.post("/oauth2/sign_out")

    assert response.status_code == 200
    assert "signed out" in response.text


async def test_sign_out_without_end_session_endpoint_stays_local(make_harness: Any) -> None:
    harness: GuardHarness = await make_harness(providers=_provider_settings(
        sign_out_at_provider=True))
    await harness.sign_in()

    response = await harness.client.post("/oauth2/sign_out", params={"rd": "/bye"})

    assert response.status_code == 302
    assert response.headers["location"] == "/bye"
