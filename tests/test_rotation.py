"""Secret rotation without a restart: session keys and client secrets re-read from files."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest
import respx

from conftest import PUBLIC_URL, GuardHarness, echo_app
from moko_guard import Guard, GuardMiddleware, load_settings
from moko_guard.store import AuditFilter
from support.fake_idp import CLIENT_ID, ISSUER, FakeIdp

pytestmark = pytest.mark.anyio

OLD_KEY = "o" * 48
NEW_KEY = "n" * 48


def _write_config(folder: Path) -> Path:
    config = folder / "guard.toml"
    config.write_text(f"""
[server]
public_url = "{PUBLIC_URL}"
[session]
secrets = ["file:{folder / 'session-1'}", "file:{folder / 'session-2'}"]
[store]
url = "sqlite:///{folder / 'guard.db'}"
[access]
auto_provision = true
provision_email_domains = ["example.com"]
[[providers]]
id = "idp"
type = "oidc"
issuer = "{ISSUER}"
client_id = "{CLIENT_ID}"
client_secret = "file:{folder / 'client-secret'}"
""")
    return config


@pytest.fixture
async def rotating(tmp_path: Path, idp: FakeIdp, idp_router: respx.Router) -> GuardHarness:
    (tmp_path / "session-1").write_text(OLD_KEY + "\n")
    (tmp_path / "session-2").write_text(OLD_KEY + "\n")
    (tmp_path / "client-secret").write_text("first-client-secret\n")
    config = _write_config(tmp_path)
    http = httpx.AsyncClient(transport=httpx.MockTransport(idp_router.handler))
    guard = Guard(load_settings(config, environ={}), http_client=http, config_path=str(config))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=GuardMiddleware(echo_app(), guard=guard)),
        base_url=PUBLIC_URL,
    )
    harness = GuardHarness(guard, client, idp)
    yield harness  # type: ignore[misc]
    await client.aclose()
    await guard.shutdown()
    await http.aclose()


def _basic_secret(request: httpx.Request) -> str:
    encoded = request.headers["authorization"].removeprefix("Basic ")
    return base64.b64decode(encoded).decode().split(":", 1)[1]


async def test_new_session_key_keeps_old_cookies(rotating: GuardHarness, tmp_path: Path) -> None:
    await rotating.sign_in()
    old_cookie = rotating.client.cookies.get("moko_session")
    assert old_cookie
    assert rotating.guard.reloader is not None
    (tmp_path / "session-1").write_text(NEW_KEY)

    changed = await rotating.guard.reloader.reload("test")
    still_valid = rotating.guard.sessions.check(old_cookie)
    (tmp_path / "session-2").write_text(NEW_KEY)
    await rotating.guard.reloader.reload("test")
    after_removal = rotating.guard.sessions.check(old_cookie)

    assert changed == ["session.secrets"]
    assert still_valid.principal is not None
    assert after_removal.reason == "tampered"
    events = await rotating.guard.store.list_audit(AuditFilter(event="secret.changed"))
    assert [e.detail for e in events] == ["session.secrets", "session.secrets"]
    assert all(OLD_KEY not in (e.detail or "") and NEW_KEY not in (e.detail or "") for e in events)


async def test_new_client_secret_used_for_next_exchange(
    rotating: GuardHarness, tmp_path: Path
) -> None:
    assert rotating.guard.reloader is not None
    await rotating.sign_in()
    (tmp_path / "client-secret").write_text("second-client-secret")

    changed = await rotating.guard.reloader.reload("sighup")
    rotating.client.cookies.clear()
    await rotating.sign_in()

    assert changed == ["providers.idp.client_secret"]
    secrets_sent = [_basic_secret(r) for r in rotating.idp.token_requests]
    assert secrets_sent == ["first-client-secret", "second-client-secret"]


async def test_broken_config_keeps_current_secrets(rotating: GuardHarness, tmp_path: Path) -> None:
    assert rotating.guard.reloader is not None
    await rotating.sign_in()
    cookie = rotating.client.cookies.get("moko_session")
    (tmp_path / "session-1").write_text("too-short")

    changed = await rotating.guard.reloader.reload("sighup")

    assert changed == []
    assert rotating.guard.sessions.check(cookie).principal is not None
