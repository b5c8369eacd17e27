"""Reverse-proxy mode against a real upstream: both run under uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
import respx
from support.fake_idp import FakeIdp
from support.loopback import HOST, free_port, raw_request, wait_for_port
from support.proxy_stack import ProxyStack, Upstream, running_proxy, running_upstream
from support.raw_http import Peer, RawServer, replying
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from moko_guard import Settings
from moko_guard.store import AuditFilter

pytestmark = pytest.mark.anyio

ProxyFactory = Callable[..., Any]
JSON = {"Accept": "application/json"}
GIB = 1024 * 1024 * 1024
MIB = 1024 * 1024
RSS_LIMIT_BYTES = 100 * 1000 * 1000
TESTS_DIR = Path(__file__).parent


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with running_upstream() as server:
        yield server


@pytest.fixture
async def proxy(make_settings: Callable[..., Settings], idp: FakeIdp, idp_router: respx.Router,
                upstream: Upstream) -> AsyncIterator[ProxyStack]:
    async with running_proxy(make_settings, idp, idp_router, upstream.url) as stack:
        yield stack


@pytest.fixture
async def make_proxy(make_settings: Callable[..., Settings], idp: FakeIdp,
                     idp_router: respx.Router) -> AsyncIterator[ProxyFactory]:
    """Start a proxy with settings overrides; ``upstream_url`` may point anywhere on loopback."""
    stacks: list[Any] = []

    async def factory(upstream_url: str, **overrides: Any) -> ProxyStack:
        context = running_proxy(make_settings, idp, idp_router, upstream_url, **overrides)
        stacks.append(context)
        stack: ProxyStack = await context.__aenter__()
        return stack

    yield factory
    for context in reversed(stacks):
        await context.__aexit__(None, None, None)


def echoed_headers(response: httpx.Response) -> dict[str, list[str]]:
    """The headers the upstream's echo endpoint received, name to list of values."""
    headers: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        headers.setdefault(name, []).append(value)
    return headers


# --- streaming and memory ----------------------------------------------------------


class RssSampler:
    """Record the peak resident set size of one process, read from /proc every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS line for process {self.pid}")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(0.02)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def write_guard_config(tmp_path: Path, guard_port: int) -> Path:
    config = tmp_path / "moko-guard.toml"
    config.write_text(f"""
[server]
public_url = "http://{HOST}:{guard_port}"
enforce_https = false
insecure_allow_http = true

[session]
secrets = ["{'s' * 48}"]

[store]
url = "sqlite:///{tmp_path / 'guard.db'}"

[access]
public_paths = ["/public/"]

[[providers]]
id = "idp"
type = "oidc"
issuer = "https://idp.test"
client_id = "crm-client"
client_secret = "crm-client-secret"
""")
    return config


def start_process(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT,
                                cwd=TESTS_DIR.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def zero_chunks(total: int) -> AsyncIterator[bytes]:
    chunk = b"\0" * MIB
    for _ in range(total // MIB):
        yield chunk


async def test_proxy_streams_gigabyte_bodies_within_memory_bound(tmp_path: Path) -> None:
    """A 1 GiB upload and a 1 GiB download pass while the guard process stays under 100 MB."""
    upstream_port, guard_port = free_port(), free_port()
    guard_command = shutil.which("moko-guard")
    assert guard_command is not None, "the moko-guard command is not installed"
    config = write_guard_config(tmp_path, guard_port)
    upstream = start_process(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(TESTS_DIR), "support.upstream:app",
         "--host", HOST, "--port", str(upstream_port), "--log-level", "warning"],
        tmp_path / "upstream.log")
    guard = start_process(
        [guard_command, "serve", "--config", str(config), "--port", str(guard_port),
         "--upstream", f"http://{HOST}:{upstream_port}"],
        tmp_path / "guard.log")
    try:
        await asyncio.to_thread(wait_for_port, upstream_port)
        await asyncio.to_thread(wait_for_port, guard_port)
        identity = {"Accept-Encoding": "identity"}
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{guard_port}", timeout=60) as client:
            with RssSampler(guard.pid) as rss:
                started = time.monotonic()
                uploaded = await client.post(
                    "/public/upload", content=zero_chunks(GIB),
                    headers={**identity, "Content-Length": str(GIB)})
                downloaded = 0
                async with client.stream("GET", f"/public/download?size={GIB}",
                                         headers=identity) as response:
                    async for chunk in response.aiter_raw():
                        downloaded += len(chunk)
                elapsed = time.monotonic() - started
    finally:
        stop_process(guard)
        stop_process(upstream)

    assert uploaded.status_code == 200, (tmp_path / "guard.log").read_text()[-2000:]
    assert uploaded.json() == {"received": GIB}
    assert response.status_code == 200
    assert downloaded == GIB
    assert rss.peak < RSS_LIMIT_BYTES, f"peak RSS {rss.peak / 1e6:.1f} MB"
    assert elapsed < 60


async def test_chunked_upload_reaches_upstream_streamed(proxy: ProxyStack) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 100_000

    response = await proxy.client.post("/public/echo", content=parts())

    assert response.json()["body_size"] == 800_000
    assert echoed_headers(response)["transfer-encoding"] == ["chunked"]
    assert "content-length" not in echoed_headers(response)


async def test_signed_in_upload_reaches_crm(proxy: ProxyStack) -> None:
    """A 9 MB upload of a signed-in user reaches the CRM, decided from headers alone.

    Source: kubernetes/ingress-nginx issue #811, where external auth with big
    request bodies ended in 500 or 413 instead of reaching the application.
    """
    await proxy.sign_in()
    body = b"-" * 9_000_000

    response = await proxy.client.post(
        "/documents/upload", content=body,
        headers={"Content-Type": "multipart/form-data; boundary=x"})

    assert response.status_code == 200
    assert response.json()["body_size"] == 9_000_000
    assert echoed_headers(response)["content-length"] == ["9000000"]


async def test_auth_endpoint_answers_without_waiting_for_body(
    proxy: ProxyStack, upstream: Upstream
) -> None:
    """``/oauth2/auth`` answers a request that announces 9 MB and sends none of it.

    Source: kubernetes/ingress-nginx issue #811 (auth sub-requests with big bodies).
    """
    response = await raw_request(
        proxy.port, "/oauth2/auth", method="POST", send_body=False, timeout=5,
        headers=[("Content-Length", "9000000"), ("Content-Type", "application/octet-stream")])

    assert response.status == 401
    assert response.elapsed < 1.0
    assert upstream.requests == []


async def test_client_disconnect_stops_upstream_download(proxy: ProxyStack,
                                                         upstream: Upstream) -> None:
    async with proxy.client.stream("GET", f"/public/download?size={GIB}",
                                   headers={"Accept-Encoding": "identity"}) as response:
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
            if received >= 4 * MIB:
                break

    for _ in range(200):
        if upstream.downloads:
            break
        await asyncio.sleep(0.01)
    assert upstream.downloads, "the upstream is still sending after the client left"
    assert upstream.downloads[0] < 256 * MIB


BAD_AUTH_TARGETS = {
    "invalid_escape": {"X-Original-URI": "/%zz%"},
    "raw_space": {"X-Original-URI": "/a b"},
    "tab": {"X-Original-URI": "/a\tb"},
    "bad_forwarded_host": {"X-Original-URI": "/deals", "X-Forwarded-Host": "crm.example.com:abc"},
    "missing_target": {"X-Forwarded-Host": "crm.example.com"},
    "missing_all": {},
}
@pytest.mark.parametrize(
    ("headers", "signed_in"),
    [pytest.param(headers, False, id=f"anonymous-{name}")
     for name, headers in BAD_AUTH_TARGETS.items()]
    + [pytest.param(BAD_AUTH_TARGETS["invalid_escape"], True, id="signed_in-invalid_escape"),
       pytest.param(BAD_AUTH_TARGETS["raw_space"], True, id="signed_in-raw_space"),
       pytest.param(BAD_AUTH_TARGETS["missing_target"], True, id="signed_in-missing_target",
                    )],
)
async def test_auth_endpoint_never_admits_unparseable_target(
    proxy: ProxyStack, headers: dict[str, str], signed_in: bool
) -> None:
    """``/oauth2/auth`` answers 401 or 403, never 2xx, when the target cannot be read.

    Source: authelia advisory GHSA-68wm-pfjf-wqp6 (CVE-2021-32637), where an error
    path of the verify endpoint answered 200.
    """
    cookie = {"Cookie": f"moko_session={await proxy.sign_in()}"} if signed_in else {}
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")

    async with httpx.AsyncClient(base_url=proxy.url, transport=transport) as nginx:
        response = await nginx.get("/oauth2/auth", headers={
            "X-Forwarded-Proto": "https", **headers, **cookie})

    assert response.status_code in (401, 403)
    assert "x-auth-request-user" not in response.headers


# --- methods, status pages and timeouts ---------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_is_forwarded(proxy: ProxyStack, upstream: Upstream,
                                         method: str) -> None:
    body = b"payload" if method in ("POST", "PUT", "PATCH", "DELETE") else b""

    response = await proxy.client.request(method, "/public/echo?q=1", content=body)

    assert response.status_code == 200
    assert upstream.requests[-1]["method"] == method
    if method == "HEAD":
        assert response.content == b""
    else:
        assert response.json()["body_size"] == len(body)
        assert response.json()["query"] == "q=1"


async def test_upstream_down_gives_502_page(make_proxy: ProxyFactory) -> None:
    stack = await make_proxy(f"http://{HOST}:{free_port()}")

    response = await stack.client.get("/public/anything", headers={"Accept": "text/html"})

    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    assert "cannot be reached" in response.text
    assert "Traceback" not in response.text
    assert "ConnectError" not in response.text


async def test_slow_upstream_gives_504_after_timeout(make_proxy: ProxyFactory,
                                                     upstream: Upstream) -> None:
    stack = await make_proxy(upstream.url, server={"upstream_timeout": "1s"})
    started = time.monotonic()

    response = await stack.client.get("/public/slow?seconds=2")

    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert "did not respond in time" in response.text
    assert "Traceback" not in response.text
    assert 0.9 <= elapsed < 2.5


# --- headers -------------------------------------------------------------------------


async def test_hop_by_hop_request_headers_removed(proxy: ProxyStack) -> None:
    response = await raw_request(proxy.port, "/public/echo", headers=[
        ("Connection", "keep-alive, X-Hop-Secret"), ("X-Hop-Secret", "1"),
        ("Keep-Alive", "timeout=5"), ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
        ("TE", "trailers"), ("Proxy-Connection", "keep-alive"), ("Trailer", "X-Sum"),
        ("X-End-To-End", "kept"),
    ])

    received = {name for name, _ in json.loads(response.body)["headers"]}
    assert response.status == 200
    assert received.isdisjoint({"connection", "x-hop-secret", "keep-alive", "te", "trailer",
                                "proxy-authorization", "proxy-connection"})
    assert "x-end-to-end" in received


async def test_hop_by_hop_response_headers_removed(proxy: ProxyStack) -> None:
    response = await raw_request(proxy.port, "/public/hop")

    names = {name.lower() for name, _ in response.headers}
    assert response.status == 200
    assert names.isdisjoint({"keep-alive", "x-upstream-hop", "proxy-authenticate"})
    assert response.header("x-end-to-end") == "kept"


async def test_connection_header_cannot_remove_identity_headers(proxy: ProxyStack) -> None:
    await proxy.sign_in()

    response = await proxy.client.get("/deals", headers={
        "Connection": "X-Auth-Request-User, X-Forwarded-For, X-Auth-Request-Roles"})

    headers = echoed_headers(response)
    assert headers["x-auth-request-user"] == ["alice@example.com"]
    assert headers["x-auth-request-roles"] == ["user"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]


@pytest.mark.parametrize("mode", ["optional", "sso_only"])
async def test_client_identity_headers_never_reach_upstream(
    make_proxy: ProxyFactory, upstream: Upstream, mode: str
) -> None:
    """Identity headers a client sends are removed on routes that pass anonymous traffic.

    Source: OpenIDC/mod_auth_openidc issue #222, where an anonymous pass-through
    mode forwarded the client's own identity headers.
    """
    stack = await make_proxy(upstream.url, server={"mode": mode})
    forged = [("X-Forwarded-User", "admin"), ("X-Auth-Request-Email", "admin@example.com"),
              ("X-Auth-Request-Roles", "crm-admins"), ("X_Auth_Request_User", "admin"),
              ("Remote-User", "admin"), ("X-Moko-Identity", "forged")]
    paths = ["/public/quote-form"] + (["/deals"] if mode == "optional" else [])

    for path in paths:
        response = await raw_request(stack.port, path, headers=forged)

        received = {name for name, _ in json.loads(response.body)["headers"]}
        assert response.status == 200, path
        assert received.isdisjoint({"x-forwarded-user", "x-auth-request-email",
                                    "x-auth-request-roles", "x_auth_request_user",
                                    "remote-user", "x-moko-identity"}), path


async def test_forwarding_headers_replaced_for_untrusted_client(proxy: ProxyStack) -> None:
    response = await proxy.client.get("/public/echo", headers={
        "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example", "X-Real-IP": "203.0.113.7",
        "Forwarded": "for=203.0.113.7;proto=https", "X-Forwarded-Port": "443",
        "X-Original-URL": "/admin", "X-Rewrite-URL": "/admin",
        "X-Original-URI": "/admin", "X-Forwarded-Uri": "/admin",
    })

    headers = echoed_headers(response)
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-forwarded-host"] == [f"{HOST}:{proxy.port}"]
    for name in ("x-real-ip", "forwarded", "x-forwarded-port", "x-original-url",
                 "x-rewrite-url", "x-original-uri", "x-forwarded-uri"):
        assert name not in headers, name


async def test_forwarding_headers_extend_trusted_proxy_chain(proxy: ProxyStack) -> None:
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=proxy.url, transport=transport) as client:
        response = await client.get("/public/echo", headers={
            "X-Forwarded-For": "198.51.100.20", "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "crm.example.com", "X-Real-IP": "198.51.100.20",
            "X-Original-URL": "/admin",
        })

    headers = echoed_headers(response)
    assert headers["x-forwarded-for"] == ["198.51.100.20, 127.0.0.2"]
    assert headers["x-forwarded-proto"] == ["https"]
    assert headers["x-forwarded-host"] == ["crm.example.com"]
    assert headers["x-real-ip"] == ["198.51.100.20"]
    assert "x-original-url" not in headers


@pytest.mark.parametrize("preserve_host", [True, False], ids=["preserved", "rewritten"])
async def test_host_header_follows_preserve_host(make_proxy: ProxyFactory, upstream: Upstream,
                                                 preserve_host: bool) -> None:
    stack = await make_proxy(upstream.url, server={"preserve_host": preserve_host})

    response = await stack.client.get("/public/echo", headers={"Host": "crm.example.com"})

    expected = "crm.example.com" if preserve_host else f"{HOST}:{upstream.server.port}"
    assert echoed_headers(response)["host"] == [expected]


# --- cookies and redirects ---------------------------------------------------------


async def test_guard_cookies_not_forwarded(proxy: ProxyStack) -> None:
    """The upstream gets the CRM's cookies but never the guard's session or flow cookies.

    Source: oauth2-proxy issue #388, where the proxy's own cookie was sent on to
    the upstream.
    """
    session = await proxy.sign_in()
    proxy.client.cookies.clear()
    cookie = f"moko_session={session}; moko_flow_abc=sealed; crm_sid=abc123; theme=dark"

    response = await proxy.client.get("/deals", headers={"Cookie": cookie})

    headers = echoed_headers(response)
    assert response.status_code == 200
    assert headers["cookie"] == ["crm_sid=abc123; theme=dark"]
    assert headers["x-auth-request-user"] == ["alice@example.com"]


async def test_split_session_cookies_not_forwarded(proxy: ProxyStack) -> None:
    """Leftover split session cookies are removed too, and the request stays under 8 KB.

    Source: oauth2-proxy issues #388 and #644 (split session cookies sent upstream,
    "Header too large").
    """
    session = await proxy.sign_in()
    proxy.client.cookies.clear()
    cookie = (f"moko_session={session}; moko_session_0={'a' * 3900}; "
              f"moko_session_1={'b' * 3900}; crm_sid=abc123; theme=dark")

    response = await proxy.client.get("/deals", headers={"Cookie": cookie})

    assert response.status_code == 200
    assert echoed_headers(response)["cookie"] == ["crm_sid=abc123; theme=dark"]


async def test_upstream_set_cookie_and_redirect_pass_intact(proxy: ProxyStack) -> None:
    cookies = await proxy.client.get("/public/cookies")
    redirect = await proxy.client.get("/public/redirect")

    assert cookies.headers.get_list("set-cookie") == [
        "crm_sid=abc123; HttpOnly; Path=/; SameSite=lax",
        "theme=dark; Max-Age=3600; Path=/; SameSite=lax",
    ]
    assert redirect.status_code == 302
    assert redirect.headers["location"] == "/deals?page=2&sort=name"


async def test_upstream_cookies_not_shared_between_clients(proxy: ProxyStack) -> None:
    await proxy.client.get("/public/cookies")

    async with httpx.AsyncClient(base_url=proxy.url) as other_client:
        response = await other_client.get("/public/echo")

    assert "cookie" not in echoed_headers(response)


# --- websockets ----------------------------------------------------------------------


async def test_websocket_echo_after_sign_in(proxy: ProxyStack, upstream: Upstream) -> None:
    session = await proxy.sign_in()
    url = f"ws://{HOST}:{proxy.port}/ws?room=1"
    cookie = f"moko_session={session}; crm_sid=abc123"

    async with connect(url, additional_headers={"Cookie": cookie},
                       subprotocols=[Subprotocol("chat.v1")], proxy=None) as websocket:
        handshake = json.loads(await websocket.recv())
        await websocket.send("hello")
        text = await websocket.recv()
        await websocket.send(b"\x01\x02\x03")
        binary = await websocket.recv()
        await websocket.send("close please")
        with pytest.raises(ConnectionClosed):
            await websocket.recv()

    headers = {name: value for name, value in handshake["headers"]}
    assert websocket.subprotocol == "chat.v1"
    assert handshake["path"] == "/ws"
    assert headers["x-auth-request-user"] == "alice@example.com"
    assert headers["cookie"] == "crm_sid=abc123"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["host"] == f"{HOST}:{proxy.port}"
    assert text == "echo: hello"
    assert binary == b"\x03\x02\x01"
    assert websocket.close_code == 4321
    assert websocket.close_reason == "asked to close"


async def test_websocket_refused_without_session(proxy: ProxyStack, upstream: Upstream) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"ws://{HOST}:{proxy.port}/ws", proxy=None):
            pass

    assert refused.value.response.status_code == 403
    assert upstream.requests == []


async def test_websocket_client_close_reaches_upstream(proxy: ProxyStack) -> None:
    session = await proxy.sign_in()
    headers = {"Cookie": f"moko_session={session}"}

    async with connect(f"ws://{HOST}:{proxy.port}/ws", additional_headers=headers,
                       proxy=None) as websocket:
        await websocket.recv()
        await websocket.close(code=1001, reason="leaving")

    assert websocket.close_code == 1001


async def test_websocket_upstream_down_gives_502(make_proxy: ProxyFactory) -> None:
    stack = await make_proxy(f"http://{HOST}:{free_port()}")
    session = await stack.sign_in()

    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"ws://{HOST}:{stack.port}/ws", proxy=None,
                           additional_headers={"Cookie": f"moko_session={session}"}):
            pass

    assert refused.value.response.status_code == 502


# --- access decisions through the proxy ----------------------------------------------

RULES = {"rules": [{"path": "/admin", "roles": ["admin"]}], "public_paths": ["/public/"]}
ADMIN_BYPASS_ATTEMPTS = [
    pytest.param("/admin", id="plain"),
    pytest.param("/public/../admin", id="dot_segments"),
    pytest.param("/public/../admin/users", id="dot_segments_deeper"),
    pytest.param("//admin", id="double_slash"),
    pytest.param("/%61dmin", id="encoded_letter"),
    pytest.param("/admin%2f", id="encoded_trailing_slash"),
    pytest.param("/admin%2fusers", id="encoded_inner_slash"),
    pytest.param("/public/%2e%2e/admin", id="encoded_dots"),
    pytest.param("/public/%2E%2E%2Fadmin/users", id="encoded_dots_and_slash"),
    pytest.param("/public/..%2fadmin/users", id="dots_encoded_slash"),
    pytest.param("/%2e%2e/admin", id="encoded_dots_at_root"),
    pytest.param("/public/..;/admin", id="dot_segment_parameter"),
    pytest.param("/public//../admin/users", id="empty_segment_dots"),
    pytest.param("/admin%23/../public/", id="encoded_hash"),
    pytest.param("/public/%23/../../admin", id="encoded_hash_in_public"),
    pytest.param("/public/x%3F/../../admin", id="encoded_question_mark"),
    pytest.param("/public/%252e%252e/admin", id="double_encoding"),
    pytest.param("/ADMIN", id="upper_case"),
    pytest.param("/Admin/", id="mixed_case_slash"),
    pytest.param("/admin?/public/", id="public_in_query"),
    pytest.param("/admin?x=/public/../public/", id="dots_in_query"),
    pytest.param("/admin//../public/", id="empty_segment_reads_public"),
]


@pytest.mark.parametrize("target", ADMIN_BYPASS_ATTEMPTS)
async def test_admin_bypass_attempt_never_reaches_upstream(
    make_proxy: ProxyFactory, upstream: Upstream, target: str
) -> None:
    """An encoded or dotted path to /admin is refused without a session.

    Source: authelia PR #3661 (object path not normalised: ../, ..%2f and %2e%2e
    variants) and oauth2-proxy advisory GHSA-7x63-xv5r-3p2x.
    """
    stack = await make_proxy(upstream.url, access=RULES)

    response = await raw_request(stack.port, target, headers=list(JSON.items()))

    assert response.status in (400, 401)
    assert upstream.requests == []


ROLE_BYPASS_ATTEMPTS = [
    pytest.param("/admin/users", id="plain"),
    pytest.param("/ADMIN/users", id="upper_case"),
    pytest.param("/Admin/", id="mixed_case_slash"),
    pytest.param("//admin", id="double_slash"),
    pytest.param("/%61dmin/x", id="encoded_letter"),
    pytest.param("/public/../admin/users", id="dot_segments"),
    pytest.param("/public/%2e%2e/admin", id="encoded_dots"),
    pytest.param("/admin%2fusers", id="encoded_inner_slash"),
    pytest.param("/admin;x=1/users", id="segment_parameter"),
]


@pytest.mark.parametrize("target", ROLE_BYPASS_ATTEMPTS)
async def test_role_rule_blocks_path_variants(
    make_proxy: ProxyFactory, upstream: Upstream, target: str
) -> None:
    """A signed-in user without the admin role cannot reach /admin by any spelling.

    Source: authelia PR #3661 (object path not normalised).
    """
    stack = await make_proxy(upstream.url, access=RULES)
    session = await stack.sign_in()
    upstream.requests.clear()

    response = await raw_request(stack.port, target, headers=[
        ("Accept", "application/json"), ("Cookie", f"moko_session={session}")])

    assert response.status in (400, 403)
    assert upstream.requests == []


PUBLIC_TARGETS = [
    pytest.param("/public/", "/public/", id="folder"),
    pytest.param("/public/logo.png", "/public/logo.png", id="file"),
    pytest.param("/public/?x=/admin", "/public/", id="admin_in_query"),
    pytest.param("/public/x?/../../admin", "/public/x", id="dots_in_query"),
    pytest.param("/public/a/./b", "/public/a/./b", id="dot_segment_inside"),
    pytest.param("/public/x%2Fy", "/public/x/y", id="encoded_slash_inside"),
]


@pytest.mark.parametrize(("target", "upstream_path"), PUBLIC_TARGETS)
async def test_public_path_stays_reachable(make_proxy: ProxyFactory, upstream: Upstream,
                                           target: str, upstream_path: str) -> None:
    stack = await make_proxy(upstream.url, access=RULES)

    response = await raw_request(stack.port, target)

    assert response.status == 200
    assert upstream.paths() == [upstream_path]
    assert upstream.requests[0]["raw_path"] == target.split("?", 1)[0]


@pytest.mark.parametrize("trusted_proxies", [["127.0.0.2/32"], []], ids=["one_trusted", "none"])
async def test_forwarded_uri_from_client_cannot_make_path_public(
    make_proxy: ProxyFactory, upstream: Upstream, trusted_proxies: list[str]
) -> None:
    """The rule applies to the path served, whatever X-Forwarded-Uri a direct client sends.

    Source: oauth2-proxy advisory GHSA-7x63-xv5r-3p2x (skip-auth rules matched
    against a client-supplied X-Forwarded-Uri).
    """
    stack = await make_proxy(upstream.url, server={"trusted_proxies": trusted_proxies},
                             access=RULES)

    response = await stack.client.get("/admin/export.csv", headers={
        **JSON, "X-Forwarded-Uri": "/public/logo.png", "X-Original-URI": "/public/logo.png",
        "X-Forwarded-Host": "crm.example.com"})

    assert response.status_code == 401
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("headers", "status"),
    [({"Accept": "application/json"}, 401), ({"X-Requested-With": "XMLHttpRequest"}, 401),
     ({"Accept": "text/html"}, 302)],
    ids=["json", "xhr", "browser"],
)
async def test_unauthenticated_request_never_gets_upstream_page(
    proxy: ProxyStack, upstream: Upstream, headers: dict[str, str], status: int
) -> None:
    """API clients get a 401 and browsers a redirect to the sign-in page, never the CRM's page.

    Source: oauth2-proxy PR #3314 (an auth answer other than 202, 401 or 403 broke
    nginx auth_request, and API clients got an HTML page with 200).
    """
    response = await proxy.client.get("/deals", headers=headers)

    assert response.status_code == status
    if status == 302:
        assert response.headers["location"].startswith("/oauth2/sign_in?rd=")
    else:
        assert response.json()["error"] == "unauthenticated"
    assert upstream.requests == []


async def test_native_login_blocked_before_upstream(make_proxy: ProxyFactory,
                                                    upstream: Upstream) -> None:
    """In SSO-only mode the CRM's password login never reaches it, even with a session.

    Source: Dolibarr issue #29356 (the password page stayed usable after forcing SSO).
    """
    stack = await make_proxy(upstream.url, access={
        "native_login_paths": ["/login", "POST /api/login"]})
    await stack.sign_in()
    upstream.requests.clear()

    form = await stack.client.get("/login", headers={"Accept": "text/html"})
    post = await stack.client.post("/login", data={"username": "alice",
                                                   "password": "correct-horse"})
    stack.client.cookies.clear()
    basic = await stack.client.post("/api/login", auth=("alice", "correct-horse"),
                                    headers=JSON)
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=stack.url, transport=transport) as nginx:
        auth = await nginx.get("/oauth2/auth", headers={"X-Original-URI": "/login"})

    denied = await stack.guard.store.list_audit(AuditFilter(event="access.denied"))
    assert form.status_code == 403
    assert "single sign-on" in form.text
    assert post.status_code == 403
    assert basic.status_code == 403
    assert auth.status_code == 403
    assert upstream.requests == []
    assert [record.reason for record in denied] == ["sso_only"] * 4


# --- upstream connection failures ------------------------------------------------------

MALFORMED_UPSTREAM_HEADERS = [
    pytest.param(b"X-Folded: a\r\n b\r\n", id="obs_fold"),
    pytest.param(b"X-Spaced : a\r\n", id="space_before_colon"),
    pytest.param(b"X-Nul: a\x00b\r\n", id="nul_in_value"),
    pytest.param(b"X-Bare: a\nX-Injected: b\r\n", id="bare_lf"),
    pytest.param(b"X-Bad Name: a\r\n", id="space_inside_name"),
    pytest.param(b"X-Control: a\x01b\r\n", id="control_character_in_value"),
]


@pytest.mark.parametrize("header", MALFORMED_UPSTREAM_HEADERS)
async def test_malformed_upstream_header_gives_502(make_proxy: ProxyFactory,
                                                   header: bytes) -> None:
    """The client gets the 502 page, never a response header it could misread."""
    response_bytes = b"HTTP/1.1 200 OK\r\n" + header + b"Content-Length: 2\r\n\r\nok"
    async with RawServer(replying(response_bytes)) as server:
        stack = await make_proxy(f"http://{HOST}:{server.port}")

        response = await stack.client.get("/public/page", headers={"Accept": "text/html"})

    assert response.status_code == 502
    assert "cannot be reached" in response.text
    header_names = {name.lower() for name in response.headers}
    assert not header_names & {"x-folded", "x-spaced", "x-nul", "x-bare", "x-injected",
                               "x-bad name", "x-control"}


@pytest.mark.parametrize("closed_on_next_request", [False, True],
                         ids=["closed_while_idle", "closed_on_next_request"])
async def test_upstream_closing_idle_connection_gives_no_502(
    make_proxy: ProxyFactory, closed_on_next_request: bool
) -> None:
    """An upstream that ends a kept-alive connection does not fail the next GET."""
    async def answer_once(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % peer.number)
        if closed_on_next_request:
            await peer.read_request()
        peer.close()

    async with RawServer(answer_once) as server:
        stack = await make_proxy(f"http://{HOST}:{server.port}")

        first = await stack.client.get("/public/first")
        await asyncio.sleep(0.05)
        second = await stack.client.get("/public/second")

    assert first.status_code == 200
    assert first.text == "0"
    assert second.status_code == 200
    assert second.text == "1"


async def test_upstream_length_beside_chunked_not_relayed(make_proxy: ProxyFactory) -> None:
    """With both framings the upstream's Content-Length is wrong, so the client never gets it."""
    response_bytes = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                      b"5\r\nhello\r\n0\r\n\r\n")
    async with RawServer(replying(response_bytes)) as server:
        stack = await make_proxy(f"http://{HOST}:{server.port}")

        response = await raw_request(stack.port, "/public/page")

    assert response.status == 200
    assert response.body == b"hello"
    assert response.header("content-length") in (None, "5")
