"""End to end: oidc-provider ends a session and sends GuardMiddleware a back-channel logout.

Two real processes on 127.0.0.1, started once for the module: the OpenID
Connect provider (tests/oidc) and uvicorn serving examples/sample_crm.py's app
wrapped in GuardMiddleware. The guard's client at the provider has a
``backchannel_logout_uri`` pointing at the guard and
``backchannel_logout_session_required``, so its ID tokens carry the provider's
session id (``sid``), which the guard stores with its own session. When a user
logs out at the provider's end_session endpoint, the provider POSTs a logout
token with ``sub`` and ``sid`` to the guard before it responds to the browser.

Each simulated browser keeps two cookie jars: one for the guard and one for
the provider, whose cookies are not port-specific and must not reach the guard.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from support.e2e import (
    CLIENT_ID,
    HTTP_TIMEOUT_SECONDS,
    PROVIDER_ID,
    SESSION_COOKIE,
    audit_records,
    new_client,
    provider_client,
    query_of,
    write_guard_config,
)
from support.oidc_provider import (
    HtmlPageParser,
    OidcProvider,
    complete_provider_login,
    free_port,
    run_oidc_provider,
)
from support.processes import RunningProcess, run_uvicorn

pytestmark = pytest.mark.e2e

TESTS_DIR = Path(__file__).resolve().parent
PROTECTED_PATH = "/api/whoami"
BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"


@dataclass
class App:
    provider: OidcProvider
    server: RunningProcess
    config_path: Path
    store_path: Path

    @property
    def url(self) -> str:
        return self.server.url


@dataclass
class Browser:
    """One user agent: the guard's cookies and the provider's cookies in separate clients."""

    guard: httpx.Client
    provider: httpx.Client
    cookie: str
    user_id: int


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    work = tmp_path_factory.mktemp("e2e-backchannel")
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    client = {
        **provider_client(f"{public_url}/oauth2/callback"),
        "backchannel_logout_uri": f"{public_url}/oauth2/backchannel_logout/{PROVIDER_ID}",
        "backchannel_logout_session_required": True,
    }

    with run_oidc_provider([client]) as provider:
        store_path = work / "guard.db"
        config_path = write_guard_config(
            work / "guard.toml", public_url=public_url, issuer=provider.issuer,
            store_path=store_path, trusted_proxies=[],
        )
        with run_uvicorn("support.crm_apps:create_guarded_crm", port, work / "app.log",
                         app_dir=TESTS_DIR, env={"MOKO_GUARD_CONFIG": str(config_path)},
                         health_path="/oauth2/sign_in") as server:
            yield App(provider, server, config_path, store_path)


@pytest.fixture
def clients() -> Iterator[contextlib.ExitStack]:
    """Close the HTTP clients of the test's browsers when the test ends."""
    with contextlib.ExitStack() as stack:
        yield stack


def _sign_in(app: App, clients: contextlib.ExitStack, login: str) -> Browser:
    """Sign in as ``login`` in a new browser, keeping its provider session for a later logout."""
    guard = clients.enter_context(new_client(app.url))
    provider = clients.enter_context(httpx.Client(timeout=HTTP_TIMEOUT_SECONDS))
    start = guard.get("/oauth2/start", params={"provider": PROVIDER_ID, "rd": PROTECTED_PATH})
    assert start.status_code == 302, start.text
    callback_url = complete_provider_login(provider, start.headers["location"], login)
    callback = guard.get(callback_url)
    assert callback.status_code == 302, callback.text[:2000]
    assert callback.headers["location"] == PROTECTED_PATH
    cookie = guard.cookies.get(SESSION_COOKIE)
    assert cookie, callback.headers.get_list("set-cookie")
    userinfo = guard.get("/oauth2/userinfo")
    assert userinfo.status_code == 200, userinfo.text
    return Browser(guard, provider, cookie, int(userinfo.json()["user_id"]))


def _log_out_at_provider(app: App, browser: Browser) -> httpx.Response:
    """Log out at the provider's end_session endpoint and confirm its form, as the user would.

    The provider sends its back-channel logout requests before it responds to
    the confirmation, so the guard has processed them when this returns.
    """
    discovery = browser.provider.get(f"{app.provider.issuer}/.well-known/openid-configuration")
    assert discovery.status_code == 200, discovery.text
    logout_page = browser.provider.get(discovery.json()["end_session_endpoint"])
    assert logout_page.status_code == 200, logout_page.text
    parser = HtmlPageParser()
    parser.feed(logout_page.text)
    parser.close()
    assert len(parser.forms) == 1, parser.text
    form = parser.forms[0]
    # The "Yes, sign me out" button is <button name="logout" value="yes">, which the parser skips.
    return browser.provider.post(urljoin(str(logout_page.url), form.action),
                                 data={**form.fields, "logout": "yes"}, follow_redirects=False)


def _stored_sessions(store_path: Path, user_id: int) -> list[tuple[str | None, str | None]]:
    """Return ``(provider_sid, revoked_at)`` of each of the user's sessions, oldest first."""
    uri = f"file:{store_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
        rows = connection.execute(
            "SELECT provider_sid, revoked_at FROM moko_sessions WHERE user_id = ? "
            "ORDER BY created_at", (user_id,)
        ).fetchall()
    return [(row[0], row[1]) for row in rows]


def _backchannel_revocations(app: App, user_id: int) -> list[dict[str, object]]:
    """Return the user's ``session.revoked`` audit events of back-channel logouts, newest first."""
    return [record for record in audit_records(app.config_path)
            if record["event"] == "session.revoked" and record["reason"] == "backchannel_logout"
            and record["user_id"] == user_id]


def _base64url_json(value: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _unsigned_logout_token(app: App, subject: str) -> str:
    """Build a logout token with every claim the guard checks but no signature (``alg`` "none")."""
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": app.provider.issuer, "aud": CLIENT_ID, "iat": now, "exp": now + 120,
        "jti": secrets.token_hex(16), "sub": subject, "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
    }
    return f"{_base64url_json({'alg': 'none', 'typ': 'logout+jwt'})}.{_base64url_json(claims)}."


def test_id_token_sid_stored_with_session(app: App, clients: contextlib.ExitStack) -> None:
    first = _sign_in(app, clients, "carol")
    second = _sign_in(app, clients, "carol")

    sessions = _stored_sessions(app.store_path, first.user_id)

    assert second.user_id == first.user_id
    assert len(sessions) == 2
    sids = [sid for sid, _revoked_at in sessions]
    assert all(sids), sids
    # Two browsers have two provider sessions, so the sids differ.
    assert sids[0] != sids[1]
    assert [revoked_at for _sid, revoked_at in sessions] == [None, None]


def test_provider_logout_ends_guard_session(app: App, clients: contextlib.ExitStack) -> None:
    alice = _sign_in(app, clients, "alice")
    alice_elsewhere = _sign_in(app, clients, "alice")
    bob = _sign_in(app, clients, "bob")
    assert alice.guard.get(PROTECTED_PATH).status_code == 200

    confirm = _log_out_at_provider(app, alice)
    browser_after = alice.guard.get(PROTECTED_PATH)
    api_after = alice.guard.get(PROTECTED_PATH, headers={"Accept": "application/json"})
    userinfo_after = alice.guard.get("/oauth2/userinfo")
    elsewhere_after = alice_elsewhere.guard.get(PROTECTED_PATH)
    bob_after = bob.guard.get(PROTECTED_PATH)
    revocations = _backchannel_revocations(app, alice.user_id)
    alice_sessions = _stored_sessions(app.store_path, alice.user_id)

    assert confirm.status_code == 303, confirm.text
    assert urlsplit(confirm.headers["location"]).path == "/session/end/success"
    assert len(revocations) == 1
    revocation = revocations[0]
    assert revocation["provider"] == PROVIDER_ID
    assert revocation["subject"] == "alice"
    assert revocation["outcome"] == "info"
    assert revocation["detail"] == "1 sessions"
    assert browser_after.status_code == 302
    assert urlsplit(browser_after.headers["location"]).path == "/oauth2/sign_in"
    assert query_of(browser_after.headers["location"]) == {"rd": PROTECTED_PATH}
    assert api_after.status_code == 401
    assert api_after.json()["error"] == "unauthenticated"
    assert userinfo_after.status_code == 401
    assert elsewhere_after.status_code == 200
    assert bob_after.status_code == 200
    assert [revoked_at is not None for _sid, revoked_at in alice_sessions] == [True, False]


def test_forged_logout_token_rejected(app: App, clients: contextlib.ExitStack) -> None:
    dave = _sign_in(app, clients, "dave")
    forged = _unsigned_logout_token(app, "dave")

    with new_client(app.url) as sender:
        unsigned = sender.post(f"/oauth2/backchannel_logout/{PROVIDER_ID}",
                               data={"logout_token": forged})
        missing = sender.post(f"/oauth2/backchannel_logout/{PROVIDER_ID}", data={})
        unknown_provider = sender.post("/oauth2/backchannel_logout/elsewhere",
                                       data={"logout_token": forged})
    revocations = _backchannel_revocations(app, dave.user_id)
    dave_after = dave.guard.get(PROTECTED_PATH)

    assert unsigned.status_code == 400
    assert unsigned.json() == {"error": "invalid_request"}
    assert missing.status_code == 400
    assert unknown_provider.status_code == 400
    assert revocations == []
    assert dave_after.status_code == 200
