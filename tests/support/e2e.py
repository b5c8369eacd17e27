"""Shared steps of the end-to-end tests: the guard's config file and a scripted sign-in.

A sign-in is driven the way a browser does it, one redirect at a time, with an
``httpx.Client`` that never follows redirects: the CRM's 302 to the sign-in
page, the page's link for the provider, ``/oauth2/start``, the provider's
login and consent forms (``complete_provider_login``, in a separate client so
the provider's cookies never reach the guard) and the callback.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

from .oidc_provider import HtmlPageParser, OidcProvider, complete_provider_login
from .processes import run_cli

PROVIDER_ID = "op"
CLIENT_ID = "moko-guard-e2e"
CLIENT_SECRET = "moko-guard-e2e-secret"
SESSION_COOKIE = "moko_session"
HTTP_TIMEOUT_SECONDS = 15.0


def provider_client(redirect_uri: str) -> dict[str, object]:
    """The client registration at oidc-provider that matches :func:`write_guard_config`."""
    return {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uris": [redirect_uri],
        "token_endpoint_auth_method": "client_secret_basic",
    }


def _toml_string(value: str) -> str:
    # A JSON string of printable ASCII is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=True)


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(_toml_string(v) for v in values) + "]"


def write_guard_config(path: Path, *, public_url: str, issuer: str, store_path: Path,
                       trusted_proxies: list[str], access_rules: str = "") -> Path:
    """Write the guard's TOML config for a plain-http loopback deployment; return ``path``.

    ``access_rules`` is TOML text of ``[[access.rules]]`` tables, added as written.
    """
    secret = secrets.token_urlsafe(36)  # 48 characters
    assert len(secret) == 48
    path.write_text(
        "[server]\n"
        f"public_url = {_toml_string(public_url)}\n"
        "enforce_https = false\n"
        "insecure_allow_http = true\n"
        f"trusted_proxies = {_toml_list(trusted_proxies)}\n"
        "\n[session]\n"
        f"secrets = {_toml_list([secret])}\n"
        "\n[store]\n"
        f"url = {_toml_string(f'sqlite:///{store_path}')}\n"
        "\n[access]\n"
        "auto_provision = true\n"
        'provision_email_domains = ["example.com"]\n'
        f"{access_rules}"
        "\n[[providers]]\n"
        f"id = {_toml_string(PROVIDER_ID)}\n"
        'type = "oidc"\n'
        'name = "Test OP"\n'
        f"issuer = {_toml_string(issuer)}\n"
        "insecure_allow_http_issuer = true\n"
        f"client_id = {_toml_string(CLIENT_ID)}\n"
        f"client_secret = {_toml_string(CLIENT_SECRET)}\n",
        encoding="utf-8",
    )
    run_cli("check-config", "--config", str(path))
    return path


def new_client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, follow_redirects=False, timeout=HTTP_TIMEOUT_SECONDS)


def query_of(url: str) -> dict[str, str]:
    parameters = parse_qs(urlsplit(url).query, keep_blank_values=True)
    assert all(len(values) == 1 for values in parameters.values()), parameters
    return {name: values[0] for name, values in parameters.items()}


def page_reason(response: httpx.Response) -> str | None:
    match = re.search(r'data-reason="([^"]+)"', response.text)
    return match.group(1) if match else None


@dataclass
class SignIn:
    """What one scripted sign-in saw along the way."""

    protected_redirect: httpx.Response
    sign_in_page: httpx.Response
    start: httpx.Response
    callback_url: str
    callback: httpx.Response

    @property
    def session_cookie(self) -> str | None:
        return _set_cookie_value(self.callback, SESSION_COOKIE)


def _set_cookie_value(response: httpx.Response, name: str) -> str | None:
    for header in response.headers.get_list("set-cookie"):
        cookie_name, _, rest = header.partition("=")
        if cookie_name.strip() == name:
            return rest.split(";", 1)[0]
    return None


def start_link(sign_in_page: httpx.Response) -> str:
    """The href of the sign-in page's button for the test provider."""
    match = re.search(
        rf'<a class="button" href="([^"]+)" data-provider="{PROVIDER_ID}"', sign_in_page.text
    )
    assert match, f"no button for provider {PROVIDER_ID!r}: {sign_in_page.text[:2000]}"
    return match.group(1).replace("&amp;", "&")


def sign_in(client: httpx.Client, provider: OidcProvider, login: str,
            protected_path: str = "/api/whoami") -> SignIn:
    """Sign in as ``login`` from an unauthenticated GET of ``protected_path``.

    Asserts each step up to the provider's redirect back; the caller checks the
    callback's answer, which differs for a refused login.
    """
    first = client.get(protected_path)
    assert first.status_code == 302, (first.status_code, first.text)
    location = first.headers["location"]
    assert urlsplit(location).path == "/oauth2/sign_in", location
    assert query_of(location) == {"rd": protected_path}, location

    page = client.get(location)
    assert page.status_code == 200, page.text
    assert "text/html" in page.headers["content-type"]
    parser = HtmlPageParser()
    parser.feed(page.text)
    parser.close()
    assert "Sign in with Test OP" in parser.text, parser.text

    start = client.get(start_link(page))
    assert start.status_code == 302, (start.status_code, start.text)
    authorize_url = start.headers["location"]
    assert authorize_url.startswith(f"{provider.issuer}/auth?"), authorize_url
    flow_cookies = [h for h in start.headers.get_list("set-cookie") if h.startswith("moko_flow_")]
    assert len(flow_cookies) == 1, start.headers.get_list("set-cookie")

    with httpx.Client(timeout=HTTP_TIMEOUT_SECONDS) as provider_http:
        callback_url = complete_provider_login(provider_http, authorize_url, login)
    base = str(client.base_url).rstrip("/")
    assert callback_url.startswith(f"{base}/oauth2/callback?"), callback_url

    callback = client.get(callback_url)
    return SignIn(first, page, start, callback_url, callback)


def signed_in(client: httpx.Client, provider: OidcProvider, login: str,
              protected_path: str = "/api/whoami") -> str:
    """Sign in as ``login``, check the redirect back to ``protected_path``; return the cookie."""
    result = sign_in(client, provider, login, protected_path)
    callback = result.callback
    assert callback.status_code == 302, (callback.status_code, callback.text[:2000])
    assert callback.headers["location"] == protected_path
    cookie = result.session_cookie
    assert cookie, callback.headers.get_list("set-cookie")
    assert client.cookies.get(SESSION_COOKIE) == cookie
    return cookie


def tampered_callback(client: httpx.Client, provider: OidcProvider) -> httpx.Response:
    """Start a sign-in, then call back with a ``state`` that differs from the flow cookie's."""
    start = client.get("/oauth2/start", params={"provider": PROVIDER_ID, "rd": "/"})
    assert start.status_code == 302, start.text
    state = query_of(start.headers["location"])["state"]
    attempt_id, _, random_part = state.partition(".")
    forged = attempt_id + "." + ("A" if random_part[0] != "A" else "B") + random_part[1:]
    return client.get("/oauth2/callback", params={"code": "forged-code", "state": forged,
                                                  "iss": provider.issuer})


def echo_headers(response: httpx.Response) -> list[tuple[str, str]]:
    """The ``[name, value]`` pairs that the CRM's /api/echo/ reports it received."""
    assert response.status_code == 200, (response.status_code, response.text[:2000])
    return [(name.lower(), value) for name, value in response.json()["headers"]]


def header_values(pairs: list[tuple[str, str]], name: str) -> list[str]:
    """Values of every header whose name matches ``name`` with ``_`` and ``-`` alike."""
    wanted = name.lower().replace("_", "-")
    return [value for key, value in pairs if key.replace("_", "-") == wanted]


def audit_records(config_path: Path) -> list[dict[str, object]]:
    """``moko-guard audit list --json``, newest first."""
    result = run_cli("audit", "list", "--json", "--limit", "1000", "--config", str(config_path))
    records: list[dict[str, object]] = json.loads(result.stdout)
    return records


def users(config_path: Path) -> list[dict[str, object]]:
    """``moko-guard users list --json``."""
    result = run_cli("users", "list", "--json", "--config", str(config_path))
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


def absolute(base_url: str, location: str) -> str:
    return urljoin(base_url + "/", location)
