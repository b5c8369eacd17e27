"""End to end: the nginx recipes in deploy/nginx/ with real nginx, guard, provider and PHP-FPM.

Every server listens on 127.0.0.1 or on a unix socket in a temporary directory:
the OpenID Connect provider (tests/oidc), two `moko-guard serve` processes, the
CRM (support.crm_apps under uvicorn), PHP-FPM with tests/data/crm_remote_user.php
standing in for Dolibarr, and one nginx per recipe, each run from the shipped
file with only its EDIT lines changed.

- auth-cache.conf and dolibarr.conf share one guard, whose public URL is the
  cache recipe's nginx.
- subdomains.conf has a guard of its own with session.cookie_domain =
  ".example.test". Its host names are sent as Host headers to 127.0.0.1
  (support.recipes.LoopbackHosts), never looked up in DNS. The test provider
  accepts only loopback redirect URIs, so that guard's public URL is
  http://127.0.0.1:<port>, and the tests carry the provider's redirect to the
  same path on the sign-in host sso.example.test, where a browser would land
  when the registered redirect URI is https://sso.example.test/oauth2/callback.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
import pytest
from support.e2e import (
    SESSION_COOKIE,
    audit_records,
    echo_headers,
    header_values,
    new_client,
    provider_client,
    query_of,
    signed_in,
    start_link,
    users,
)
from support.nginx import render_server_config
from support.oidc_provider import (
    OidcProvider,
    complete_provider_login,
    free_port,
    run_oidc_provider,
)
from support.php_fpm import RunningPhpFpm, listening_tcp_ports, run_php_fpm
from support.processes import RunningProcess, run_cli, run_guard, run_uvicorn
from support.recipes import (
    LoopbackHosts,
    Replacement,
    apply_replacements,
    auth_check_count,
    read_recipe,
    render_recipe,
    run_nginx_recipe,
    write_guard_config_with,
)

pytestmark = pytest.mark.e2e

TESTS_DIR = Path(__file__).resolve().parent
REMOTE_USER_PAGE = TESTS_DIR / "data" / "crm_remote_user.php"
CACHE_SECONDS = 5.0
# The poll interval of the revocation test, and its bound: twice the cache time.
POLL_SECONDS = 0.2
POLL_LIMIT_SECONDS = 2 * CACHE_SECONDS
DOMAIN = "example.test"
SSO_HOST = f"sso.{DOMAIN}"
CRM_HOST = f"crm.{DOMAIN}"
ADMIN_HOST = f"admin.{DOMAIN}"
UNKNOWN_HOST = f"unknown.{DOMAIN}"
FORGED_IDENTITY = {
    "Remote-User": "mallory@example.com",
    "X-Remote-User": "mallory@example.com",
    "Remote_User": "mallory@example.com",
    "X-Auth-Request-User": "mallory@example.com",
    "X-Forwarded-User": "mallory@example.com",
    # "mallory:x": Debian's fastcgi_params would pass this user name as REMOTE_USER.
    "Authorization": "Basic bWFsbG9yeTp4",
}


@dataclass
class Ports:
    cache_nginx: int
    dolibarr_nginx: int
    subdomain_nginx: int
    plain_guard: int
    subdomain_guard: int
    crm: int


@pytest.fixture(scope="module")
def ports() -> Ports:
    return Ports(*(free_port() for _ in range(6)))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-recipes")


@pytest.fixture(scope="module")
def provider(ports: Ports) -> Iterator[OidcProvider]:
    client = provider_client(f"http://127.0.0.1:{ports.cache_nginx}/oauth2/callback")
    client["redirect_uris"] = [
        f"http://127.0.0.1:{ports.cache_nginx}/oauth2/callback",
        f"http://127.0.0.1:{ports.subdomain_nginx}/oauth2/callback",
    ]
    with run_oidc_provider([client]) as running:
        yield running


@pytest.fixture(scope="module")
def crm(ports: Ports, work: Path) -> Iterator[RunningProcess]:
    with run_uvicorn("support.crm_apps:create_crm", ports.crm, work / "crm.log",
                     app_dir=TESTS_DIR, health_path="/api/echo/ready") as running:
        yield running


# --- auth-cache.conf and dolibarr.conf: one guard --------------------------------


@pytest.fixture(scope="module")
def plain_guard(ports: Ports, work: Path, provider: OidcProvider) -> Iterator[RunningProcess]:
    config = write_guard_config_with(
        work / "plain-guard.toml", public_url=f"http://127.0.0.1:{ports.cache_nginx}",
        issuer=provider.issuer, store_path=work / "plain-guard.db",
        access_lines=(
            'public_paths = ["/public/"]\n'
            "[[access.rules]]\n"
            'path = "/api/echo/admin"\n'
            'roles = ["admin"]\n'
        ),
    )
    with run_guard(config, ports.plain_guard, work / "plain-guard.log") as running:
        yield running


@pytest.fixture(scope="module")
def cache_nginx(ports: Ports, work: Path, plain_guard: RunningProcess,
                crm: RunningProcess) -> Iterator[RunningProcess]:
    cache_dir = work / "auth-cache"
    cache_dir.mkdir()
    text = render_server_config(read_recipe("auth-cache.conf"), listen_port=ports.cache_nginx,
                                guard_port=plain_guard.port, crm_port=crm.port)
    text = apply_replacements(text, [
        Replacement("/var/cache/nginx/moko-auth", f'"{cache_dir}"', 1),
    ])
    with run_nginx_recipe(work / "nginx-cache", text, listen_port=ports.cache_nginx) as running:
        yield running


def cookie_client(base_url: str, session: str, **headers: str) -> httpx.Client:
    """A client that sends the session cookie, and ``headers``, with every request."""
    return httpx.Client(base_url=base_url, follow_redirects=False, timeout=15.0,
                        headers={"Cookie": f"{SESSION_COOKIE}={session}", **headers})


def sign_in_through(nginx: RunningProcess, provider: OidcProvider, login: str) -> str:
    with new_client(nginx.url) as client:
        return signed_in(client, provider, login)


def test_auth_cache_recipe_only_adds_lines() -> None:
    base = read_recipe("moko-guard.conf")
    cached = read_recipe("auth-cache.conf")
    base_lines = base[base.index("upstream moko_guard {"):].splitlines()
    cached_lines = cached[cached.index("upstream moko_guard {"):].splitlines()

    operations = difflib.SequenceMatcher(a=base_lines, b=cached_lines,
                                         autojunk=False).get_opcodes()

    changed = [(tag, base_lines[i1:i2]) for tag, i1, i2, _, _ in operations
               if tag not in ("equal", "insert")]
    assert changed == []
    inserted = [line for tag, _, _, j1, j2 in operations if tag == "insert"
                for line in cached_lines[j1:j2]]
    assert any(line.strip().startswith("proxy_cache_valid 202 401 5s;") for line in inserted)


def test_cached_answer_spares_the_guard(cache_nginx: RunningProcess, plain_guard: RunningProcess,
                                        provider: OidcProvider) -> None:
    session = sign_in_through(cache_nginx, provider, "cache-carol")
    before = auth_check_count(plain_guard.url, "allow")

    with cookie_client(cache_nginx.url, session) as client:
        repeated = [client.get("/api/echo/cached") for _ in range(4)]
        other_uri = client.get("/api/echo/cached?page=2")
    after = auth_check_count(plain_guard.url, "allow")

    for response in [*repeated, other_uri]:
        assert header_values(echo_headers(response), "x-auth-request-user") == [
            "cache-carol@example.com"]
    # One check for the four requests of one URI (three came from the cache), one for the other URI.
    assert after - before == 2


def test_cookieless_requests_skip_the_cache(
    cache_nginx: RunningProcess, plain_guard: RunningProcess,
) -> None:
    before = auth_check_count(plain_guard.url, "unauthenticated")

    with new_client(cache_nginx.url) as client:
        responses = [client.get("/api/echo/anonymous") for _ in range(3)]
    after = auth_check_count(plain_guard.url, "unauthenticated")

    for response in responses:
        assert response.status_code == 302
        assert response.headers["location"] == "/oauth2/sign_in?rd=%2Fapi%2Fecho%2Fanonymous"
    # Each request is decided twice: by /oauth2/auth, then by the 401 location's redirect.
    assert after - before == 2 * len(responses)


def test_invalid_cookie_answer_is_cached(cache_nginx: RunningProcess,
                                         plain_guard: RunningProcess) -> None:
    before = auth_check_count(plain_guard.url, "unauthenticated")

    with cookie_client(cache_nginx.url, "not-a-sealed-value") as client:
        responses = [client.get("/api/echo/invalid-cookie") for _ in range(3)]
    after = auth_check_count(plain_guard.url, "unauthenticated")

    assert [r.status_code for r in responses] == [302, 302, 302]
    # The first request reaches /oauth2/auth and the redirect location; the next two only the latter.
    assert after - before == 2 + 1 + 1


def test_authorization_header_bypasses_the_cache(
    cache_nginx: RunningProcess, plain_guard: RunningProcess, provider: OidcProvider,
) -> None:
    session = sign_in_through(cache_nginx, provider, "cache-ivan")
    before = auth_check_count(plain_guard.url, "allow")

    with cookie_client(cache_nginx.url, session, Authorization="Bearer not-checked") as client:
        responses = [client.get("/api/echo/with-authorization") for _ in range(3)]
    after = auth_check_count(plain_guard.url, "allow")

    assert [r.status_code for r in responses] == [200, 200, 200]
    assert after - before == 3


def test_forbidden_answer_is_not_cached(
    cache_nginx: RunningProcess, plain_guard: RunningProcess, provider: OidcProvider,
) -> None:
    session = sign_in_through(cache_nginx, provider, "cache-frank")
    before = auth_check_count(plain_guard.url, "forbidden")

    with cookie_client(cache_nginx.url, session) as client:
        responses = [client.get("/api/echo/admin/users") for _ in range(3)]
    after = auth_check_count(plain_guard.url, "forbidden")

    assert [r.status_code for r in responses] == [403, 403, 403]
    assert after - before == 3


def test_revoked_session_works_until_the_cache_time_ends(
    cache_nginx: RunningProcess, plain_guard: RunningProcess, provider: OidcProvider,
) -> None:
    session = sign_in_through(cache_nginx, provider, "cache-dave")
    path = "/api/echo/revoked"

    with cookie_client(cache_nginx.url, session) as client:
        cached_at = time.monotonic()
        first = client.get(path)
        signed_out = client.get("/oauth2/sign_out")
        guard_answer = httpx.get(f"{plain_guard.url}/oauth2/auth", timeout=10.0, headers={
            "Cookie": f"{SESSION_COOKIE}={session}", "X-Original-URI": path})
        right_after = client.get(path)
        signed_out_after = time.monotonic() - cached_at

        # Bounded: the answer must change within twice the cache time.
        last = right_after
        while last.status_code == 200 and time.monotonic() - cached_at < POLL_LIMIT_SECONDS:
            time.sleep(POLL_SECONDS)
            last = client.get(path)
        redirected_after = time.monotonic() - cached_at

    assert first.status_code == 200
    assert signed_out.status_code == 200
    assert signed_out_after < CACHE_SECONDS - 1
    # The guard refuses the revoked session at once; nginx still answers from its cache.
    assert guard_answer.status_code == 401
    assert right_after.status_code == 200
    assert header_values(echo_headers(right_after), "x-auth-request-user") == [
        "cache-dave@example.com"]
    # Then the cached answer expires and the request goes to sign-in. nginx counts
    # cache times in whole seconds, so the entry lives between 4 and 5 seconds.
    assert last.status_code == 302
    assert last.headers["location"] == "/oauth2/sign_in?rd=%2Fapi%2Fecho%2Frevoked"
    assert CACHE_SECONDS - 1.5 <= redirected_after <= CACHE_SECONDS + 1.0


# --- dolibarr.conf: PHP-FPM with REMOTE_USER -------------------------------------


@pytest.fixture(scope="module")
def php_fpm(work: Path) -> Iterator[RunningPhpFpm]:
    with run_php_fpm(work / "php") as running:
        yield running


@pytest.fixture(scope="module")
def dolibarr_nginx(ports: Ports, work: Path, plain_guard: RunningProcess,
                   php_fpm: RunningPhpFpm) -> Iterator[RunningProcess]:
    htdocs = work / "htdocs"
    (htdocs / "public").mkdir(parents=True)
    page = REMOTE_USER_PAGE.read_text(encoding="utf-8")
    (htdocs / "index.php").write_text(page, encoding="utf-8")
    (htdocs / "public" / "index.php").write_text(page, encoding="utf-8")
    (htdocs / "style.css").write_text("body { color: black; }\n", encoding="utf-8")
    text = render_recipe(read_recipe("dolibarr.conf"), listen_port=ports.dolibarr_nginx,
                         replacements=[
        Replacement("server 127.0.0.1:4180;", f"server 127.0.0.1:{plain_guard.port};", 1),
        Replacement("root /var/www/dolibarr/htdocs;", f'root "{htdocs}";', 1),
        Replacement("unix:/run/php/php8.2-fpm-dolibarr.sock", f"unix:{php_fpm.socket_path}", 1),
    ])
    with run_nginx_recipe(work / "nginx-dolibarr", text,
                          listen_port=ports.dolibarr_nginx) as running:
        yield running


@pytest.fixture(scope="module")
def dolibarr_session(cache_nginx: RunningProcess, provider: OidcProvider) -> str:
    """A session of the guard that dolibarr.conf asks, signed in once for the module."""
    return sign_in_through(cache_nginx, provider, "doli-alice")


def php_variables(response: httpx.Response) -> dict[str, str | None]:
    assert response.headers["content-type"].startswith("application/json"), response.text[:500]
    variables: dict[str, str | None] = response.json()["server"]
    return variables


@pytest.mark.parametrize("path", ["/", "/index.php", "/index.php/deals?id=3", "/missing.php",
                                  "/style.css", "/public/%2e%2e/index.php"])
def test_dolibarr_without_session_is_sent_to_sign_in(dolibarr_nginx: RunningProcess,
                                                     path: str) -> None:
    with new_client(dolibarr_nginx.url) as client:
        plain = client.get(path)
        forged = client.get(path, headers=FORGED_IDENTITY)

    for response in (plain, forged):
        assert response.status_code == 302, (path, response.status_code, response.text[:300])
        assert urlsplit(response.headers["location"]).path == "/oauth2/sign_in"


def test_dolibarr_gets_the_email_as_remote_user(dolibarr_nginx: RunningProcess,
                                                dolibarr_session: str) -> None:
    with cookie_client(dolibarr_nginx.url, dolibarr_session) as client:
        index = client.get("/")
        with_path_info = client.get("/index.php/deals?id=3")
        static = client.get("/style.css")

    assert index.status_code == 200, index.text[:500]
    assert index.json()["remote_user"] == "doli-alice@example.com"
    variables = php_variables(index)
    assert variables["HTTP_X_AUTH_REQUEST_USER"] == "doli-alice@example.com"
    assert variables["HTTP_X_AUTH_REQUEST_EMAIL"] == "doli-alice@example.com"
    assert variables["HTTP_X_AUTH_REQUEST_ROLES"] == "user"
    assert with_path_info.status_code == 200
    assert php_variables(with_path_info)["PATH_INFO"] == "/deals"
    assert php_variables(with_path_info)["SCRIPT_NAME"] == "/index.php"
    assert static.status_code == 200
    assert static.text == "body { color: black; }\n"


def test_dolibarr_forged_headers_never_become_remote_user(dolibarr_nginx: RunningProcess,
                                                          dolibarr_session: str) -> None:
    with cookie_client(dolibarr_nginx.url, dolibarr_session) as client:
        response = client.get("/index.php", headers=FORGED_IDENTITY)

    assert response.status_code == 200
    assert response.json()["remote_user"] == "doli-alice@example.com"
    variables = php_variables(response)
    assert variables["REMOTE_USER"] == "doli-alice@example.com"
    assert variables.get("HTTP_REMOTE_USER") in ("", None)
    assert variables.get("HTTP_X_REMOTE_USER") in ("", None)
    assert variables.get("HTTP_X_FORWARDED_USER") in ("", None)
    assert variables["HTTP_X_AUTH_REQUEST_USER"] == "doli-alice@example.com"
    # PHP itself decodes a Basic Authorization header into PHP_AUTH_USER: a client
    # value, which Dolibarr's http mode does not read. Nothing else carries mallory.
    carrying = sorted(name for name, value in variables.items() if value and "mallory" in value)
    assert carrying == ["PHP_AUTH_USER"]


def test_dolibarr_public_path_gets_empty_remote_user(dolibarr_nginx: RunningProcess) -> None:
    with new_client(dolibarr_nginx.url) as client:
        plain = client.get("/public/index.php")
        forged = client.get("/public/index.php", headers=FORGED_IDENTITY)

    # The guard lets public paths through without identity, and the page refuses.
    for response in (plain, forged):
        assert response.status_code == 401, response.text[:500]
        assert response.json()["remote_user"] == ""
        assert php_variables(response)["REMOTE_USER"] == ""
    assert php_variables(forged)["PHP_AUTH_USER"] == "mallory"


def test_dolibarr_never_sees_the_session_cookie(dolibarr_nginx: RunningProcess,
                                                dolibarr_session: str) -> None:
    cookie = f"DOLSESSID_abc=php-session; {SESSION_COOKIE}={dolibarr_session}; theme=dark"
    with httpx.Client(base_url=dolibarr_nginx.url, timeout=15.0,
                      headers={"Cookie": cookie}) as client:
        response = client.get("/index.php")

    assert response.status_code == 200
    assert response.json()["cookies"] == {"DOLSESSID_abc": "php-session", "theme": "dark"}
    assert dolibarr_session not in response.text


def test_php_fpm_listens_on_its_socket_only(php_fpm: RunningPhpFpm) -> None:
    mode = php_fpm.socket_path.stat().st_mode

    assert php_fpm.socket_path.is_socket()
    assert mode & 0o077 == 0
    assert listening_tcp_ports(php_fpm.process.pid) == []


# --- subdomains.conf: one sign-in, several hosts ---------------------------------


@dataclass
class Subdomains:
    nginx: RunningProcess
    guard: RunningProcess
    config_path: Path
    provider: OidcProvider

    def url(self, host: str, path: str = "/") -> str:
        return f"http://{host}:{self.nginx.port}{path}"

    def client(self) -> httpx.Client:
        names = (SSO_HOST, CRM_HOST, ADMIN_HOST, UNKNOWN_HOST)
        return httpx.Client(transport=LoopbackHosts(names), follow_redirects=False,
                            timeout=15.0)


@pytest.fixture(scope="module")
def subdomains(ports: Ports, work: Path, provider: OidcProvider,
               crm: RunningProcess) -> Iterator[Subdomains]:
    port = ports.subdomain_nginx
    config = write_guard_config_with(
        work / "subdomain-guard.toml", public_url=f"http://127.0.0.1:{port}",
        issuer=provider.issuer, store_path=work / "subdomain-guard.db",
        session_lines=f'cookie_domain = ".{DOMAIN}"\n',
        access_lines=(
            f'allowed_redirect_hosts = [".{DOMAIN}:{port}"]\n'
            "[[access.rules]]\n"
            'path = "/_hosts/admin/"\n'
            'roles = ["admin"]\n'
        ),
    )
    text = render_recipe(read_recipe("subdomains.conf"), listen_port=port, replacements=[
        Replacement("server 127.0.0.1:4180;", f"server 127.0.0.1:{ports.subdomain_guard};", 1),
        Replacement("server 127.0.0.1:8080;", f"server 127.0.0.1:{crm.port};", 1),
        Replacement("server 127.0.0.1:8081;", f"server 127.0.0.1:{crm.port};", 1),
        Replacement("https://sso.example.com", f"http://{SSO_HOST}:{port}", None),
        Replacement("https%3A%2F%2F$host", f"http%3A%2F%2F$host%3A{port}", 2),
        Replacement("example.com", DOMAIN, None),
    ])
    with (
        run_guard(config, ports.subdomain_guard, work / "subdomain-guard.log") as guard,
        run_nginx_recipe(work / "nginx-subdomains", text, listen_port=port) as nginx,
    ):
        yield Subdomains(nginx, guard, config, provider)


def sign_in_across_hosts(subdomains: Subdomains, client: httpx.Client, login: str,
                         start_url: str) -> httpx.Response:
    """Sign in from ``start_url`` on an application host; return the callback's answer."""
    first = client.get(start_url)
    assert first.status_code == 302, (first.status_code, first.text[:500])
    sign_in_url = first.headers["location"]
    assert sign_in_url.startswith(subdomains.url(SSO_HOST, "/oauth2/sign_in?")), sign_in_url

    page = client.get(sign_in_url)
    assert page.status_code == 200, page.text[:500]
    start = client.get(urljoin(sign_in_url, start_link(page)))
    assert start.status_code == 302, start.text[:500]
    with httpx.Client(timeout=15.0) as provider_http:
        callback_url = complete_provider_login(provider_http, start.headers["location"], login)

    parts = urlsplit(callback_url)
    assert parts.path == "/oauth2/callback", callback_url
    on_sign_in_host = urlunsplit(("http", f"{SSO_HOST}:{subdomains.nginx.port}", parts.path,
                                  parts.query, ""))
    return client.get(on_sign_in_host)


def session_set_cookie(response: httpx.Response) -> str:
    headers = [h for h in response.headers.get_list("set-cookie")
               if h.startswith(f"{SESSION_COOKIE}=")]
    assert len(headers) == 1, response.headers.get_list("set-cookie")
    return headers[0]


@pytest.fixture(scope="module")
def alice_hosts(subdomains: Subdomains) -> Iterator[httpx.Client]:
    """A client signed in as sub-alice (role "user") from the CRM host, for the module."""
    with subdomains.client() as client:
        callback = sign_in_across_hosts(subdomains, client, "sub-alice",
                                        subdomains.url(CRM_HOST, "/api/whoami"))
        assert callback.status_code == 302, callback.text[:500]
        yield client


def test_subdomain_request_is_sent_to_the_sign_in_host(subdomains: Subdomains) -> None:
    with subdomains.client() as client:
        crm = client.get(subdomains.url(CRM_HOST, "/api/echo/deals?page=2&sort=a%20b"))
        admin = client.get(subdomains.url(ADMIN_HOST, "/"))
        api = client.get(subdomains.url(CRM_HOST, "/api/echo/deals"),
                         headers={"Accept": "application/json"})

    sign_in = subdomains.url(SSO_HOST, "/oauth2/sign_in")
    assert crm.status_code == 302
    assert crm.headers["location"].startswith(sign_in + "?")
    assert query_of(crm.headers["location"]) == {
        "rd": subdomains.url(CRM_HOST, "/api/echo/deals?page=2&sort=a%20b")}
    assert admin.status_code == 302
    assert query_of(admin.headers["location"]) == {"rd": subdomains.url(ADMIN_HOST, "/")}
    assert api.status_code == 401
    assert api.json()["error"] == "unauthenticated"


def test_subdomain_sign_in_sets_a_domain_cookie(subdomains: Subdomains) -> None:
    with subdomains.client() as client:
        callback = sign_in_across_hosts(subdomains, client, "sub-carol",
                                        subdomains.url(CRM_HOST, "/api/whoami?tab=1"))

    assert callback.status_code == 302, callback.text[:500]
    assert callback.headers["location"] == subdomains.url(CRM_HOST, "/api/whoami?tab=1")
    attributes = [part.strip().lower() for part in session_set_cookie(callback).split(";")]
    assert f"domain=.{DOMAIN}" in attributes
    assert "httponly" in attributes
    assert "path=/" in attributes


def test_one_sign_in_covers_every_host(subdomains: Subdomains, alice_hosts: httpx.Client) -> None:
    crm = alice_hosts.get(subdomains.url(CRM_HOST, "/api/echo/records"))
    userinfo = alice_hosts.get(subdomains.url(SSO_HOST, "/oauth2/userinfo"))
    admin = alice_hosts.get(subdomains.url(ADMIN_HOST, "/api/echo/users"))

    assert header_values(echo_headers(crm), "x-auth-request-user") == ["sub-alice@example.com"]
    assert header_values(echo_headers(crm), "x-forwarded-host") == [CRM_HOST]
    assert userinfo.status_code == 200
    assert userinfo.json()["email"] == "sub-alice@example.com"
    # Signed in on the admin host too, but without its role: 403, not a sign-in redirect.
    assert admin.status_code == 403


def test_admin_host_rule_sees_the_host_prefix(subdomains: Subdomains,
                                              alice_hosts: httpx.Client) -> None:
    response = alice_hosts.get(subdomains.url(ADMIN_HOST, "/api/echo/prefix-check"))

    assert response.status_code == 403
    alice_ids = [u["id"] for u in users(subdomains.config_path)
                 if u["username"] == "sub-alice@example.com"]
    assert len(alice_ids) == 1
    denials = [r for r in audit_records(subdomains.config_path)
               if r["event"] == "access.denied" and r["user_id"] == alice_ids[0]]
    assert any("path=/_hosts/admin/api/echo/prefix-check" in str(r["detail"]) for r in denials)


def test_admin_host_prefix_cannot_be_left(subdomains: Subdomains,
                                          alice_hosts: httpx.Client) -> None:
    climbing = ["/%2e%2e/api/echo/x", "/%2E%2E%2Fapi/echo/x", "/api/%2e%2e/%2e%2e/api/echo/x",
                "/..%2fapi/echo/x"]
    staying = ["/x/%2e%2e/api/echo/x", "//api/echo/x", "/API/ECHO/x"]

    climbing_answers = [alice_hosts.get(subdomains.url(ADMIN_HOST, path)) for path in climbing]
    staying_answers = [alice_hosts.get(subdomains.url(ADMIN_HOST, path)) for path in staying]

    for path, response in zip(climbing, climbing_answers, strict=True):
        assert response.status_code == 400, (path, response.status_code)
    for path, response in zip(staying, staying_answers, strict=True):
        assert response.status_code == 403, (path, response.status_code)


def test_admin_role_opens_both_hosts_with_one_cookie(subdomains: Subdomains) -> None:
    with subdomains.client() as client:
        first = sign_in_across_hosts(subdomains, client, "sub-bob",
                                     subdomains.url(CRM_HOST, "/api/whoami"))
        assert first.status_code == 302
        run_cli("users", "roles", "sub-bob@example.com", "--add", "admin",
                "--config", str(subdomains.config_path))
        # Roles live in the session cookie: sign in again, this time from the admin host.
        client.cookies.clear()
        second = sign_in_across_hosts(subdomains, client, "sub-bob",
                                      subdomains.url(ADMIN_HOST, "/api/echo/users"))
        cookie = client.cookies.get(SESSION_COOKIE, domain=f".{DOMAIN}")

        admin = client.get(second.headers["location"])
        crm = client.get(subdomains.url(CRM_HOST, "/api/echo/records"))

    assert second.status_code == 302
    assert second.headers["location"] == subdomains.url(ADMIN_HOST, "/api/echo/users")
    assert cookie
    for response in (admin, crm):
        received = echo_headers(response)
        assert header_values(received, "x-auth-request-user") == ["sub-bob@example.com"]
        roles = header_values(received, "x-auth-request-roles")
        assert len(roles) == 1
        assert sorted(roles[0].split(",")) == ["admin", "user"]
        assert cookie not in str(received)


def test_sign_out_on_an_app_host_ends_every_host(subdomains: Subdomains) -> None:
    with subdomains.client() as client:
        callback = sign_in_across_hosts(subdomains, client, "sub-erin",
                                        subdomains.url(CRM_HOST, "/api/whoami"))
        assert callback.status_code == 302
        session = client.cookies.get(SESSION_COOKIE, domain=f".{DOMAIN}")
        assert client.get(subdomains.url(CRM_HOST, "/api/whoami")).status_code == 200

        moved = client.get(subdomains.url(CRM_HOST, "/oauth2/sign_out"))
        signed_out = client.get(moved.headers["location"])
        crm = client.get(subdomains.url(CRM_HOST, "/api/whoami"))
    with subdomains.client() as replay:
        replayed = replay.get(subdomains.url(CRM_HOST, "/api/whoami"),
                              headers={"Cookie": f"{SESSION_COOKIE}={session}"})

    assert moved.status_code == 302
    assert moved.headers["location"] == subdomains.url(SSO_HOST, "/oauth2/sign_out")
    assert signed_out.status_code == 200
    assert "You are signed out." in signed_out.text
    cleared = [part.strip().lower() for part in session_set_cookie(signed_out).split(";")]
    assert f"domain=.{DOMAIN}" in cleared
    assert "max-age=0" in cleared
    assert crm.status_code == 302
    assert replayed.status_code == 302
    assert urlsplit(replayed.headers["location"]).netloc == f"{SSO_HOST}:{subdomains.nginx.port}"


def test_guard_pages_live_on_the_sign_in_host_only(subdomains: Subdomains) -> None:
    with subdomains.client() as client:
        crm_sign_in = client.get(subdomains.url(CRM_HOST, "/oauth2/sign_in?rd=%2F"))
        crm_auth = client.get(subdomains.url(CRM_HOST, "/oauth2/auth"))
        sso_auth = client.get(subdomains.url(SSO_HOST, "/oauth2/auth"))
        sso_root = client.get(subdomains.url(SSO_HOST, "/"))
        health = client.get(subdomains.url(CRM_HOST, "/healthz"))

    assert crm_sign_in.status_code == 302
    assert crm_sign_in.headers["location"] == subdomains.url(SSO_HOST, "/oauth2/sign_in?rd=%2F")
    assert crm_auth.status_code == 404
    assert sso_auth.status_code == 404
    assert sso_root.status_code == 404
    assert health.status_code == 302
    assert query_of(health.headers["location"]) == {"rd": subdomains.url(CRM_HOST, "/healthz")}


def test_unknown_host_gets_no_answer(subdomains: Subdomains) -> None:
    with subdomains.client() as client, pytest.raises(httpx.RemoteProtocolError):
        client.get(subdomains.url(UNKNOWN_HOST, "/api/whoami"))
