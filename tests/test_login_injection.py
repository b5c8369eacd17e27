"""Sign-in links on the CRM's own login page, in middleware mode and through the proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
import respx
from conftest import PUBLIC_URL
from support.fake_idp import CLIENT_ID, CLIENT_SECRET, ISSUER, FakeIdp
from support.proxy_stack import running_proxy, running_upstream
from support.upstream import LOGIN_PAGE, build_app

from moko_guard import Guard, GuardMiddleware, Settings
from moko_guard.inject import MAX_BUFFERED_BODY

pytestmark = pytest.mark.anyio

ClientFactory = Callable[..., Any]
BROWSER = {"Accept": "text/html", "Accept-Encoding": "gzip, deflate, br"}
LINK = '<a class="moko-guard-sign-in-link" href="/oauth2/start?provider=idp">Example IdP</a>'
LOGIN_ACCESS = {"login_page_path": "/login", "public_paths": ["/public/", "/login"]}


@pytest.fixture(params=["middleware", "proxy"])
async def make_client(request: pytest.FixtureRequest, make_settings: Callable[..., Settings],
                      idp: FakeIdp, idp_router: respx.Router) -> AsyncIterator[ClientFactory]:
    """Return a factory for a client of the guarded CRM; ``overrides`` go to the settings."""
    mode: str = request.param
    async with AsyncExitStack() as stack:

        async def factory(**overrides: Any) -> httpx.AsyncClient:
            if mode == "proxy":
                upstream = await stack.enter_async_context(running_upstream())
                proxy = await stack.enter_async_context(
                    running_proxy(make_settings, idp, idp_router, upstream.url, **overrides))
                return proxy.client
            provider_http = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.MockTransport(idp_router.handler)))
            guard = Guard(make_settings(**overrides), http_client=provider_http)
            stack.push_async_callback(guard.shutdown)
            app = GuardMiddleware(build_app(), guard=guard)
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
            return await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url=PUBLIC_URL))

        yield factory


def page_with_links(page: str) -> str:
    end = page.index("</form>") + len("</form>")
    return page[:end] + '<div class="moko-guard-sign-in">' + page[end:]


async def test_login_page_gets_provider_links(make_client: ClientFactory) -> None:
    client = await make_client(access=LOGIN_ACCESS)

    response = await client.get("/login", headers=BROWSER)

    body = response.text
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    assert "etag" not in response.headers
    assert int(response.headers["content-length"]) == len(response.content)
    assert body.startswith(LOGIN_PAGE[:LOGIN_PAGE.index("</form>") + len("</form>")]
                           + '<div class="moko-guard-sign-in">')
    assert LINK in body
    assert body.endswith("</ul></div><p>Forgot your password?</p></body></html>")


async def test_login_page_unchanged_when_setting_off(make_client: ClientFactory) -> None:
    client = await make_client(access={"public_paths": ["/public/", "/login"]})

    response = await client.get("/login", headers=BROWSER)

    assert response.status_code == 200
    assert response.text == LOGIN_PAGE
    assert response.headers["etag"] == '"login-v1"'


async def test_streamed_login_page_gets_links(make_client: ClientFactory) -> None:
    client = await make_client(access=LOGIN_ACCESS)

    response = await client.get("/login?kind=streamed", headers=BROWSER)

    assert response.status_code == 200
    assert LINK in response.text
    assert int(response.headers["content-length"]) == len(response.content)


@pytest.mark.parametrize("kind", ["forced-gzip", "json", "error", "no-marker"])
async def test_unsuitable_login_answer_passes_unchanged(make_client: ClientFactory,
                                                        kind: str) -> None:
    client = await make_client(access=LOGIN_ACCESS)

    response = await client.get(f"/login?kind={kind}", headers=BROWSER)

    assert "moko-guard-sign-in" not in response.text
    if kind == "forced-gzip":
        assert response.headers["content-encoding"] == "gzip"
        assert response.text == LOGIN_PAGE
    if kind == "error":
        assert response.status_code == 500
        assert response.text == LOGIN_PAGE


async def test_login_page_over_buffer_limit_passes_unchanged(make_client: ClientFactory) -> None:
    client = await make_client(access=LOGIN_ACCESS)

    response = await client.get("/login?kind=large", headers=BROWSER)

    assert response.status_code == 200
    assert len(response.content) > MAX_BUFFERED_BODY
    assert response.text.endswith(LOGIN_PAGE)
    assert "moko-guard-sign-in" not in response.text


@pytest.mark.parametrize("method", ["HEAD", "POST"])
async def test_login_page_other_methods_unchanged(make_client: ClientFactory,
                                                  method: str) -> None:
    client = await make_client(access=LOGIN_ACCESS)

    response = await client.request(method, "/login",
                                    headers={**BROWSER, "Accept-Encoding": "identity"})

    assert b"moko-guard-sign-in" not in response.content
    if method == "HEAD":
        assert response.headers["content-length"] == str(len(LOGIN_PAGE))


async def test_login_marker_matched_case_insensitively(make_client: ClientFactory) -> None:
    client = await make_client(access={**LOGIN_ACCESS, "login_page_marker": "</FORM>"})

    response = await client.get("/login", headers=BROWSER)

    assert LINK in response.text


async def test_provider_name_escaped_in_links(make_client: ClientFactory) -> None:
    client = await make_client(access=LOGIN_ACCESS, providers=[{
        "id": "corp", "type": "oidc", "name": "<b>Corp & Co</b>", "issuer": ISSUER,
        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
    }])

    response = await client.get("/login", headers=BROWSER)

    assert ('href="/oauth2/start?provider=corp">&lt;b&gt;Corp &amp; Co&lt;/b&gt;</a>'
            in response.text)
    assert "<b>Corp" not in response.text
