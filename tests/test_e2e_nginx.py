"""End to end: Debian's nginx with deploy/nginx/moko-guard.conf, `moko-guard serve`, oidc-provider.

Four real processes on 127.0.0.1, started once for the module: the OpenID
Connect provider (tests/oidc), the guard in forward-auth mode, the CRM
(examples/sample_crm.py plus an echo route, under uvicorn) and nginx running
the shipped template with only its addresses and TLS lines changed. Every
request of the tests goes to nginx, except the ones that check the guard's
/oauth2/auth answers, which nginx keeps internal.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

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
    query_of,
    sign_in,
    signed_in,
    tampered_callback,
    write_guard_config,
)
from support.nginx import (
    TEMPLATE_PATH,
    check_config,
    render_certificate_paths,
    run_nginx,
    write_config,
    write_self_signed_certificate,
)
from support.oidc_provider import OidcProvider, free_port, run_oidc_provider
from support.processes import RunningProcess, run_guard, run_uvicorn

pytestmark = pytest.mark.e2e

TESTS_DIR = Path(__file__).resolve().parent
IDENTITY_HEADERS = (
    "x-auth-request-user", "x-auth-request-email", "x-auth-request-roles",
    "x-auth-request-provider", "x-auth-request-preferred-username",
)
# Role rules that alice (role "user") fails: one for a path, one for write methods only.
ACCESS_RULES = """
[[access.rules]]
path = "/api/echo/admin"
roles = ["admin"]

[[access.rules]]
path = "/api/echo/records"
methods = ["POST", "DELETE"]
roles = ["admin"]
"""
FORGED_HEADERS = {
    "X-Auth-Request-User": "mallory@example.com",
    "X_Auth_Request_User": "mallory@example.com",
    "X-Auth-Request-Roles": "admin",
    "X_Auth_Request_Email": "mallory@example.com",
    "X-Auth-Request-Groups": "admins",
    "X-Forwarded-User": "mallory",
    "X_Forwarded_User": "mallory",
    "Remote-User": "mallory",
    "Remote_User": "mallory",
    "X-Remote-User": "mallory",
    "X-Forwarded-Email": "mallory@example.com",
}


class Deployment:
    """The running processes and the paths the tests read."""

    def __init__(self, provider: OidcProvider, guard: RunningProcess, crm: RunningProcess,
                 nginx: RunningProcess, config_path: Path, work: Path) -> None:
        self.provider = provider
        self.guard = guard
        self.crm = crm
        self.nginx = nginx
        self.config_path = config_path
        self.work = work

    @property
    def url(self) -> str:
        return self.nginx.url

    def client(self) -> httpx.Client:
        return new_client(self.url)

    def auth(self, original_uri: str = "/api/whoami", **headers: str) -> httpx.Response:
        """The guard's /oauth2/auth, called directly as nginx's sub-request calls it."""
        sent = {"X-Original-URI": original_uri, "X-Forwarded-Proto": "http",
                "X-Forwarded-Host": "127.0.0.1", "X-Forwarded-For": "127.0.0.1", **headers}
        return httpx.get(f"{self.guard.url}/oauth2/auth", headers=sent, timeout=10.0)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("e2e-nginx")
    nginx_port, guard_port, crm_port = free_port(), free_port(), free_port()
    public_url = f"http://127.0.0.1:{nginx_port}"

    with run_oidc_provider([provider_client(f"{public_url}/oauth2/callback")]) as provider:
        config_path = write_guard_config(
            work / "guard.toml", public_url=public_url, issuer=provider.issuer,
            store_path=work / "guard.db", trusted_proxies=["127.0.0.1/32"],
            access_rules=ACCESS_RULES,
        )
        with (
            run_guard(config_path, guard_port, work / "guard.log") as guard,
            run_uvicorn("support.crm_apps:create_crm", crm_port, work / "crm.log",
                        app_dir=TESTS_DIR, health_path="/api/echo/ready") as crm,
            run_nginx(work / "nginx", listen_port=nginx_port, guard_port=guard_port,
                      crm_port=crm_port) as nginx,
        ):
            yield Deployment(provider, guard, crm, nginx, config_path, work)


@pytest.fixture(scope="module")
def alice(deployment: Deployment) -> str:
    """The session cookie of alice, signed in once for the module."""
    with deployment.client() as client:
        return signed_in(client, deployment.provider, "alice")


def _cookie_client(deployment: Deployment, cookie_header: str) -> httpx.Client:
    """A client that sends exactly ``cookie_header`` and keeps no cookie jar of its own."""
    return httpx.Client(base_url=deployment.url, follow_redirects=False, timeout=15.0,
                        headers={"Cookie": cookie_header})


def test_unauthenticated_browser_is_sent_to_sign_in(deployment: Deployment) -> None:
    with deployment.client() as client:
        response = client.get("/api/whoami")
        with_query = client.get("/api/echo/deals?page=2&sort=name%20asc")

    assert response.status_code == 302
    assert response.headers["location"] == "/oauth2/sign_in?rd=%2Fapi%2Fwhoami"
    # The whole original URI survives, query and "&" included.
    assert with_query.status_code == 302
    assert query_of(with_query.headers["location"]) == {
        "rd": "/api/echo/deals?page=2&sort=name%20asc"
    }


def test_unauthenticated_api_client_gets_401(deployment: Deployment) -> None:
    with deployment.client() as client:
        as_json = client.get("/api/whoami", headers={"Accept": "application/json"})
        as_xhr = client.get("/api/whoami", headers={"X-Requested-With": "XMLHttpRequest"})

    for response in (as_json, as_xhr):
        assert response.status_code == 401
        assert response.json()["error"] == "unauthenticated"


def test_sign_in_through_nginx(deployment: Deployment) -> None:
    with deployment.client() as client:
        result = sign_in(client, deployment.provider, "alice")
        callback = result.callback

        assert callback.status_code == 302, callback.text[:2000]
        assert callback.headers["location"] == "/api/whoami"
        session = [h for h in callback.headers.get_list("set-cookie")
                   if h.startswith(f"{SESSION_COOKIE}=")]
        assert len(session) == 1
        attributes = session[0].lower()
        assert "httponly" in attributes
        assert "samesite=lax" in attributes
        assert "path=/" in attributes
        # The flow cookie is cleared on its own path.
        assert any(h.startswith("moko_flow_") and "path=/oauth2/callback" in h.lower()
                   for h in callback.headers.get_list("set-cookie"))

        whoami = client.get("/api/whoami")

    assert whoami.status_code == 200, whoami.text
    headers = whoami.json()["headers"]
    assert headers["x-auth-request-user"] == "alice@example.com"
    assert headers["x-auth-request-email"] == "alice@example.com"
    assert headers["x-auth-request-roles"] == "user"
    assert headers["x-auth-request-provider"] == "op"
    assert headers["x-auth-request-preferred-username"] == "alice"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-for"] == "127.0.0.1"


def test_sign_in_page_lists_the_provider(deployment: Deployment) -> None:
    with deployment.client() as client:
        page = client.get("/oauth2/sign_in", params={"rd": "/deals"})

    assert page.status_code == 200
    assert 'data-provider="op"' in page.text
    assert "Sign in with Test OP" in page.text
    assert "/oauth2/start?provider=op&amp;rd=%2Fdeals" in page.text


def test_forged_identity_headers_never_reach_the_crm(deployment: Deployment, alice: str) -> None:
    with _cookie_client(deployment, f"{SESSION_COOKIE}={alice}") as client:
        response = client.get("/api/echo/forged", headers=FORGED_HEADERS)

    received = echo_headers(response)
    for name in FORGED_HEADERS:
        values = header_values(received, name)
        assert all("mallory" not in v and v != "admin" and v != "admins" for v in values), (
            name, values)
    assert header_values(received, "x-auth-request-user") == ["alice@example.com"]
    assert header_values(received, "x-auth-request-roles") == ["user"]
    assert header_values(received, "x-auth-request-email") == ["alice@example.com"]
    for name in ("x-forwarded-user", "remote-user", "x-remote-user", "x-forwarded-email",
                 "x-auth-request-groups"):
        assert header_values(received, name) == [], name
    assert not any("_" in name for name, _ in received), received


def test_forged_identity_headers_without_a_session_are_not_trusted(
    deployment: Deployment,
) -> None:
    with deployment.client() as client:
        response = client.get("/api/whoami", headers=FORGED_HEADERS)

    assert response.status_code == 302
    assert response.headers["location"].startswith("/oauth2/sign_in?")


@pytest.mark.parametrize(
    ("cookie_template", "expected_cookies"),
    [
        ("{session}", {}),
        ("{session}; crm_sid=abc; theme=dark", {"crm_sid": "abc", "theme": "dark"}),
        ("crm_sid=abc; {session}; theme=dark", {"crm_sid": "abc", "theme": "dark"}),
        ("crm_sid=abc;{session}", {"crm_sid": "abc"}),
        ("crm_sid=abc; theme=dark; {session}", {"crm_sid": "abc", "theme": "dark"}),
        ("my_moko_session=keep; {session}", {"my_moko_session": "keep"}),
        # Two copies, as after a change of session.cookie_domain.
        ("moko_session=stale; crm_sid=abc; {session}", {"crm_sid": "abc"}),
        # Three copies: rather no cookies than one of them.
        ("moko_session=a; moko_session=b; crm_sid=abc; {session}", {}),
    ],
)
def test_session_cookie_never_reaches_the_crm(
    deployment: Deployment, alice: str, cookie_template: str, expected_cookies: dict[str, str]
) -> None:
    cookie_header = cookie_template.format(session=f"{SESSION_COOKIE}={alice}")
    with _cookie_client(deployment, cookie_header) as client:
        response = client.get("/api/echo/cookies")

    received = echo_headers(response)
    assert header_values(received, "x-auth-request-user") == ["alice@example.com"]
    assert response.json()["cookies"] == expected_cookies
    assert all(SESSION_COOKIE + "=" not in v.replace("my_moko_session=", "")
               for v in header_values(received, "cookie")), received
    assert alice not in str(received)


@pytest.mark.parametrize(
    ("label", "headers"),
    [
        ("no cookie", {}),
        ("garbage cookie", {"Cookie": f"{SESSION_COOKIE}=not-a-sealed-value"}),
        ("empty cookie", {"Cookie": f"{SESSION_COOKIE}="}),
        ("json client", {"Accept": "application/json"}),
        ("xhr client", {"X-Requested-With": "XMLHttpRequest"}),
        ("json xhr with garbage", {"Accept": "application/json", "X-Requested-With":
                                   "XMLHttpRequest", "Cookie": f"{SESSION_COOKIE}=x.y.z"}),
    ],
)
def test_auth_endpoint_answers_401_without_a_valid_session(
    deployment: Deployment, label: str, headers: dict[str, str]
) -> None:
    response = deployment.auth(**headers)

    assert response.status_code == 401, label
    assert response.headers["cache-control"] == "no-store"
    assert not any(h.lower() in IDENTITY_HEADERS for h in response.headers)


def test_auth_endpoint_answers_202_with_identity(deployment: Deployment, alice: str) -> None:
    for headers in ({}, {"Accept": "application/json"}, {"X-Requested-With": "XMLHttpRequest"}):
        response = deployment.auth(Cookie=f"{SESSION_COOKIE}={alice}", **headers)
        assert response.status_code == 202
        assert response.headers["x-auth-request-user"] == "alice@example.com"
        assert response.headers["x-auth-request-provider"] == "op"


def test_auth_endpoint_refuses_an_ambiguous_original_uri(
    deployment: Deployment, alice: str
) -> None:
    # Paths the guard cannot read one way only; a resolvable one such as
    # /api/%2e%2e/x is normalised instead (to /x) and decided like any other.
    for uri in ("/api/%zz", "/api/%252e%252e/x", "/api/a%5cb", "/a/..;/b", "relative"):
        response = deployment.auth(uri, Cookie=f"{SESSION_COOKIE}={alice}")
        assert response.status_code == 401, (uri, response.status_code)
        assert "x-auth-request-user" not in response.headers


def test_auth_endpoint_answers_403_for_a_missing_role(deployment: Deployment, alice: str) -> None:
    response = deployment.auth("/api/echo/admin/users", Cookie=f"{SESSION_COOKIE}={alice}")

    assert response.status_code == 403
    assert "x-auth-request-user" not in response.headers


def test_missing_role_is_refused_by_nginx(deployment: Deployment, alice: str) -> None:
    with _cookie_client(deployment, f"{SESSION_COOKIE}={alice}") as client:
        admin = client.get("/api/echo/admin/users")
        read = client.get("/api/echo/records/7")
        write = client.post("/api/echo/records/7", content=b"{}")
        delete = client.delete("/api/echo/records/7")

    assert admin.status_code == 403
    # The sub-request carries the original method, so method rules apply.
    assert read.status_code == 200
    assert write.status_code == 403
    assert delete.status_code == 403


def test_auth_endpoint_is_internal_in_nginx(deployment: Deployment, alice: str) -> None:
    with _cookie_client(deployment, f"{SESSION_COOKIE}={alice}") as client:
        response = client.get("/oauth2/auth")

    assert response.status_code == 404


def test_garbage_cookie_through_nginx_is_sent_to_sign_in(deployment: Deployment) -> None:
    for value in ("garbage", "", "a" * 3000):
        with _cookie_client(deployment, f"{SESSION_COOKIE}={value}") as client:
            response = client.get("/deals")
        assert response.status_code == 302, (value[:20], response.status_code)
        assert response.headers["location"] == "/oauth2/sign_in?rd=%2Fdeals"


def test_large_upload_reaches_the_crm(deployment: Deployment, alice: str) -> None:
    body = bytes(range(256)) * (9 * 1024 * 1024 // 256)
    with _cookie_client(deployment, f"{SESSION_COOKIE}={alice}") as client:
        response = client.post("/api/echo/upload", content=body,
                               headers={"Content-Type": "application/octet-stream"})

    assert response.status_code == 200, response.text[:500]
    echoed = response.json()
    assert echoed["method"] == "POST"
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_large_upload_without_a_session_is_sent_to_sign_in(deployment: Deployment) -> None:
    body = b"x" * (9 * 1024 * 1024)
    with deployment.client() as client:
        response = client.post("/api/echo/upload", content=body)

    assert response.status_code == 302
    assert response.headers["location"] == "/oauth2/sign_in?rd=%2Fapi%2Fecho%2Fupload"


def test_sign_out_ends_a_copied_cookie(deployment: Deployment) -> None:
    with deployment.client() as client:
        cookie = signed_in(client, deployment.provider, "erin")
        assert client.get("/api/whoami").status_code == 200

        signed_out = client.get("/oauth2/sign_out")

        assert signed_out.status_code == 200
        assert "You are signed out." in signed_out.text
        cleared = [h for h in signed_out.headers.get_list("set-cookie")
                   if h.startswith(f"{SESSION_COOKIE}=")]
        assert cleared and ("max-age=0" in cleared[0].lower() or "expires=" in cleared[0].lower())

    with _cookie_client(deployment, f"{SESSION_COOKIE}={cookie}") as replay:
        again = replay.get("/api/whoami")
    assert again.status_code == 302
    assert again.headers["location"] == "/oauth2/sign_in?rd=%2Fapi%2Fwhoami"
    assert deployment.auth(Cookie=f"{SESSION_COOKIE}={cookie}").status_code == 401


def test_audit_log_records_sign_in_sign_out_and_a_tampered_callback(
    deployment: Deployment,
) -> None:
    with deployment.client() as client:
        tampered = tampered_callback(client, deployment.provider)
        assert tampered.status_code == 400
        assert page_reason(tampered) == "state_mismatch"

        signed_in(client, deployment.provider, "audit-dave")
        # A client-sent X-Forwarded-For must not become the audited address.
        assert client.get("/oauth2/sign_out",
                          headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 200

    records = audit_records(deployment.config_path)

    successes = [r for r in records if r["event"] == "login.success"
                 and r["email"] == "audit-dave@example.com"]
    assert len(successes) == 1
    success = successes[0]
    assert success["outcome"] == "success"
    assert success["provider"] == "op"
    assert success["subject"] == "audit-dave"
    assert success["client_ip"] == "127.0.0.1"
    sign_outs = [r for r in records if r["event"] == "sign_out"
                 and r["user_id"] == success["user_id"]]
    assert len(sign_outs) == 1
    assert sign_outs[0]["client_ip"] == "127.0.0.1"
    failures = [r for r in records if r["event"] == "login.failure"
                and r["reason"] == "state_mismatch"]
    assert failures
    assert all(r["outcome"] == "failure" for r in failures)
    assert "forged-code" not in str(records)


def test_guard_endpoints_outside_oauth2_stay_hidden(deployment: Deployment) -> None:
    with deployment.client() as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            response = client.get(path)
            assert response.status_code == 302, (path, response.text)
            location = urlsplit(response.headers["location"])
            assert (location.path, location.query) == ("/oauth2/sign_in", f"rd={path}")


class StubGuard(ThreadingHTTPServer):
    """Answers /oauth2/auth with 202, identity headers and a renewed cookie; keeps the requests."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StubGuardHandler)
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _StubGuardHandler(BaseHTTPRequestHandler):
    server: StubGuard
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.requests.append((self.command, self.path, headers, body))
        self.send_response(202)
        self.send_header("X-Auth-Request-User", "stub-user@example.com")
        self.send_header("X-Auth-Request-Email", "stub-user@example.com")
        self.send_header("X-Auth-Request-Roles", "user,admin")
        self.send_header("X-Auth-Request-Provider", "stub")
        self.send_header("X-Auth-Request-Preferred-Username", "stub-user")
        self.send_header("Set-Cookie", "moko_session=renewed-value; Path=/; HttpOnly")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def stub_guard() -> Iterator[StubGuard]:
    server = StubGuard()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_sub_request_shape_and_renewed_cookie(
    deployment: Deployment, stub_guard: StubGuard
) -> None:
    """The template's side of the contract, against a stub guard that always says 202."""
    port = free_port()
    with (
        run_nginx(deployment.work / "nginx-stub", listen_port=port, guard_port=stub_guard.port,
                  crm_port=deployment.crm.port),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15.0) as client,
    ):
        response = client.post("/api/echo/notes?x=1&y=2", content=b"n" * 5000,
                               headers={"X-Auth-Request-User": "mallory",
                                        "X-Forwarded-For": "203.0.113.7"})

    assert response.status_code == 200, response.text[:500]
    # The renewed session cookie from the auth answer reaches the browser.
    assert "moko_session=renewed-value; Path=/; HttpOnly" in response.headers.get_list(
        "set-cookie")
    received = echo_headers(response)
    assert header_values(received, "x-auth-request-user") == ["stub-user@example.com"]
    assert header_values(received, "x-auth-request-roles") == ["user,admin"]
    assert header_values(received, "x-auth-request-provider") == ["stub"]
    assert header_values(received, "x-auth-request-preferred-username") == ["stub-user"]
    assert header_values(received, "x-forwarded-for") == ["127.0.0.1"]
    assert response.json()["body_length"] == 5000

    method, path, headers, body = stub_guard.requests[-1]
    assert (method, path) == ("POST", "/oauth2/auth")
    assert body == b""
    assert "content-length" not in headers
    assert headers["x-original-uri"] == "/api/echo/notes?x=1&y=2"
    assert headers["x-original-method"] == "POST"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "127.0.0.1"
    assert headers["x-forwarded-for"] == "127.0.0.1"


def test_guard_down_fails_closed(deployment: Deployment) -> None:
    port = free_port()
    with (
        run_nginx(deployment.work / "nginx-no-guard", listen_port=port, guard_port=free_port(),
                  crm_port=deployment.crm.port),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=15.0) as client,
    ):
        response = client.get("/api/echo/anything", headers={"X-Auth-Request-User": "mallory"})

    assert response.status_code == 500
    assert "x-auth-request-user" not in response.text


def test_shipped_template_passes_nginx_t(tmp_path: Path) -> None:
    """The template as shipped, TLS included, with only its certificate paths filled in."""
    certificate, key = write_self_signed_certificate(tmp_path / "tls", "crm.example.com")
    text = render_certificate_paths(TEMPLATE_PATH.read_text(encoding="utf-8"), certificate, key)
    conf = write_config(tmp_path / "nginx", text)

    output = check_config(tmp_path / "nginx", conf)

    assert "test is successful" in output
    assert "[warn]" not in output, output
