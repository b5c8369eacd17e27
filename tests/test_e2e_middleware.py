"""End to end: GuardMiddleware around the sample CRM under uvicorn, signing in at oidc-provider.

Two real processes on 127.0.0.1, started once for the module: the OpenID
Connect provider (tests/oidc) and uvicorn serving examples/sample_crm.py's app
(plus an echo route) wrapped in GuardMiddleware, with the settings file the
test writes. No proxy is in front, so the guard trusts no forwarded headers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from support.e2e import (
    SESSION_COOKIE,
    audit_records,
    echo_headers,
    header_values,
    new_client,
    page_reason,
    provider_client,
    sign_in,
    signed_in,
    tampered_callback,
    users,
    write_guard_config,
)
from support.oidc_provider import OidcProvider, free_port, run_oidc_provider
from support.processes import RunningProcess, run_uvicorn

pytestmark = pytest.mark.e2e

TESTS_DIR = Path(__file__).resolve().parent
FORGED_HEADERS = {
    "X-Auth-Request-User": "mallory@example.com",
    "X_Auth_Request_User": "mallory@example.com",
    "X-Auth-Request-Roles": "admin",
    "x-auth-request-email": "mallory@example.com",
    "X-Forwarded-User": "mallory",
    "Remote-User": "mallory",
    "Remote_User": "mallory",
    "X-Remote-User": "mallory",
}


@dataclass
class App:
    provider: OidcProvider
    server: RunningProcess
    config_path: Path

    @property
    def url(self) -> str:
        return self.server.url

    def client(self) -> httpx.Client:
        return new_client(self.url)

    def cookie_client(self, cookie: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=15.0,
                            headers={"Cookie": f"{SESSION_COOKIE}={cookie}"})


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    work = tmp_path_factory.mktemp("e2e-middleware")
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"

    with run_oidc_provider([provider_client(f"{public_url}/oauth2/callback")]) as provider:
        config_path = write_guard_config(
            work / "guard.toml", public_url=public_url, issuer=provider.issuer,
            store_path=work / "guard.db", trusted_proxies=[],
        )
        with run_uvicorn("support.crm_apps:create_guarded_crm", port, work / "app.log",
                         app_dir=TESTS_DIR, env={"MOKO_GUARD_CONFIG": str(config_path)},
                         health_path="/oauth2/sign_in") as server:
            yield App(provider, server, config_path)


@pytest.fixture(scope="module")
def alice(app: App) -> str:
    """The session cookie of alice, signed in once for the module."""
    with app.client() as client:
        return signed_in(client, app.provider, "alice")


def test_unauthenticated_requests(app: App) -> None:
    with app.client() as client:
        browser = client.get("/deals?page=2&sort=name")
        api = client.get("/api/whoami", headers={"Accept": "application/json"})

    assert browser.status_code == 302
    assert browser.headers["location"] == "/oauth2/sign_in?rd=%2Fdeals%3Fpage%3D2%26sort%3Dname"
    assert api.status_code == 401
    assert api.json()["error"] == "unauthenticated"


def test_sign_in_and_identity_headers(app: App) -> None:
    with app.client() as client:
        cookie = signed_in(client, app.provider, "alice")
        whoami = client.get("/api/whoami")
        home = client.get("/")

    assert cookie
    assert whoami.status_code == 200
    headers = whoami.json()["headers"]
    assert headers["x-auth-request-user"] == "alice@example.com"
    assert headers["x-auth-request-email"] == "alice@example.com"
    assert headers["x-auth-request-roles"] == "user"
    assert headers["x-auth-request-provider"] == "op"
    assert headers["x-auth-request-preferred-username"] == "alice"
    assert home.status_code == 200
    assert "Signed in as <strong>alice@example.com</strong>" in home.text


def test_forged_identity_headers_are_stripped(app: App, alice: str) -> None:
    with app.cookie_client(alice) as client:
        response = client.get("/api/echo/forged", headers=FORGED_HEADERS)
        whoami = client.get("/api/whoami", headers=FORGED_HEADERS)

    received = echo_headers(response)
    for name in FORGED_HEADERS:
        assert all("mallory" not in v and v != "admin" for v in header_values(received, name)), (
            name, received)
    assert header_values(received, "x-auth-request-user") == ["alice@example.com"]
    assert header_values(received, "x-auth-request-roles") == ["user"]
    for name in ("x-forwarded-user", "remote-user", "x-remote-user"):
        assert header_values(received, name) == [], name
    assert whoami.json()["headers"]["x-auth-request-user"] == "alice@example.com"


def test_forged_identity_headers_without_a_session(app: App) -> None:
    with app.client() as client:
        response = client.get("/api/whoami", headers=FORGED_HEADERS)

    assert response.status_code == 302


def test_session_cookie_never_reaches_the_app(app: App, alice: str) -> None:
    with httpx.Client(base_url=app.url, follow_redirects=False, timeout=15.0, headers={
        "Cookie": f"crm_sid=abc; {SESSION_COOKIE}={alice}; theme=dark"
    }) as client:
        response = client.get("/api/echo/cookies")

    assert response.status_code == 200
    assert response.json()["cookies"] == {"crm_sid": "abc", "theme": "dark"}
    assert alice not in response.text


def test_sign_out_ends_a_copied_cookie(app: App) -> None:
    with app.client() as client:
        cookie = signed_in(client, app.provider, "erin")
        assert client.get("/api/whoami").status_code == 200

        signed_out = client.post("/oauth2/sign_out")
        assert signed_out.status_code == 200
        assert "You are signed out." in signed_out.text

    with app.cookie_client(cookie) as replay:
        again = replay.get("/api/whoami")
        userinfo = replay.get("/oauth2/userinfo")

    assert again.status_code == 302
    assert again.headers["location"] == "/oauth2/sign_in?rd=%2Fapi%2Fwhoami"
    assert userinfo.status_code == 401


def test_unverified_email_is_refused_and_audited(app: App) -> None:
    with app.client() as client:
        result = sign_in(client, app.provider, "unverified-bob")
        callback = result.callback

        assert callback.status_code == 403, callback.text[:2000]
        assert "text/html" in callback.headers["content-type"]
        assert page_reason(callback) == "email_unverified"
        assert "not verified" in callback.text
        assert result.session_cookie is None
        assert SESSION_COOKIE not in client.cookies
        assert client.get("/api/whoami").status_code == 302

    failures = [r for r in audit_records(app.config_path)
                if r["event"] == "login.failure" and r["reason"] == "email_unverified"]
    assert len(failures) == 1
    assert failures[0]["subject"] == "unverified-bob"
    assert failures[0]["email"] == "unverified-bob@example.com"
    assert failures[0]["provider"] == "op"
    assert failures[0]["user_id"] is None
    assert all("unverified-bob" not in str(user["email"]) and
               "unverified-bob" not in str(user["username"]) for user in users(app.config_path))


def test_audit_log_of_the_flow(app: App) -> None:
    with app.client() as client:
        tampered = tampered_callback(client, app.provider)
        assert tampered.status_code == 400
        assert page_reason(tampered) == "state_mismatch"
        signed_in(client, app.provider, "audit-dave")
        assert client.get("/oauth2/sign_out").status_code == 200

    records = audit_records(app.config_path)
    success = [r for r in records if r["event"] == "login.success"
               and r["email"] == "audit-dave@example.com"]
    assert len(success) == 1
    assert success[0]["client_ip"] == "127.0.0.1"
    assert [r for r in records if r["event"] == "sign_out"
            and r["user_id"] == success[0]["user_id"]]
    assert [r for r in records if r["event"] == "login.failure"
            and r["reason"] == "state_mismatch"]
