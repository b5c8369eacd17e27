"""Regression tests for failures that other auth proxies shipped, one section per kind of fault.

Each test is named after the behaviour it keeps, and its docstring names the
public advisory, issue or pull request where another project got that
behaviour wrong. A test covers the family of inputs, not only the one input
of the report. docs/cases.md maps every report to its tests, including those
in other files.

The tests drive the whole guard: the middleware around a recording app, the
forward-auth server from ``create_app`` and the fake provider of
``support.fake_idp`` behind respx. Peer addresses such as 127.0.0.2 (the
trusted proxy) and 203.0.113.7 (an untrusted client) are ASGI scope values
only, and evil.example and idp.test appear only in headers, parameters and
respx routes: no request leaves the process.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import httpx
import pytest
import respx
from conftest import PUBLIC_URL, GuardHarness, echo_app, page_reason
from cryptography.hazmat.primitives import serialization
from starlette.types import Receive, Scope, Send
from support.fake_idp import CLIENT_ID, ISSUER, FakeIdp, new_rsa_key, public_jwk

from moko_guard import Guard, GuardMiddleware, Settings
from moko_guard.audit import escape_control
from moko_guard.cli import main as cli_main
from moko_guard.flow import FLOW_PURPOSE
from moko_guard.headers import WELL_KNOWN_IDENTITY_HEADERS, IdentityHeaders, canonical
from moko_guard.server import create_app
from moko_guard.store import AuditFilter, AuditRecord, EmailTaken, UserRecord
from moko_guard.web import REASON_MESSAGES

pytestmark = pytest.mark.anyio

MakeHarness = Callable[..., Awaitable[GuardHarness]]

TRUSTED_PEER = "127.0.0.2"
UNTRUSTED_PEER = "203.0.113.7"
# nginx calls the guard on loopback over plain http; /oauth2/auth is never redirected to https.
FORWARD_AUTH_URL = "http://127.0.0.1:4180"
NO_RATE_LIMIT = {"sign_in_per_minute": 0}
CORPUS_PATH = Path(__file__).parent / "data" / "open_redirects.txt"


# --- helpers ---------------------------------------------------------------------------


class RecordingApp:
    """An upstream app that records the path and raw headers of every request it gets."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, list[tuple[bytes, bytes]]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.requests.append((scope["path"], list(scope["headers"])))
        body = b"upstream page"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def last_headers(self, name: bytes) -> list[str]:
        """Return every value of header ``name`` in the last request, in order."""
        _, headers = self.requests[-1]
        return [value.decode("latin-1") for key, value in headers if key == name]


def client_for(app: Any, *, peer: str = "127.0.0.1", base_url: str = PUBLIC_URL,
               headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 1234))
    return httpx.AsyncClient(transport=transport, base_url=base_url, headers=headers)


async def create_session(guard: Guard, name: str = "alice", roles: tuple[str, ...] = ("user",),
                         *, email: str | None = None) -> tuple[str, UserRecord]:
    """Store a user with an identity at the fake provider and return a session cookie for them."""
    await guard.ensure_started()
    address = email or f"{name}@example.com"
    user, _ = await guard.store.create_user_with_identity(
        username=address, email=address, display_name=name.title(), roles=roles,
        provider="idp", subject=f"{name}-sub", identity_email=address,
    )
    cookie, _ = await guard.sessions.issue(user, "idp", name, client_ip=None, user_agent="pytest")
    return cookie, user


async def auth_request(guard: Guard, *, cookie: str | None = None, original_uri: str = "/deals",
                       peer: str = TRUSTED_PEER,
                       headers: list[tuple[str, str]] | None = None) -> httpx.Response:
    """Send nginx's ``auth_request`` sub-request to the forward-auth server of ``guard``."""
    sent = [("X-Original-URI", original_uri), *(headers or [])]
    if cookie is not None:
        sent.append(("Cookie", f"moko_session={cookie}"))
    async with client_for(create_app(guard.settings, guard=guard), peer=peer,
                          base_url=FORWARD_AUTH_URL) as client:
        return await client.get("/oauth2/auth", headers=sent)


async def audit_rows(guard: Guard, event: str | None = None) -> list[AuditRecord]:
    return await guard.store.list_audit(AuditFilter(event=event, limit=1000))


def set_cookie_headers(response: httpx.Response, name: str) -> list[str]:
    return [c for c in response.headers.get_list("set-cookie") if c.startswith(f"{name}=")]


def flow_cookie_of(response: httpx.Response) -> tuple[str, str]:
    """Return the name and value of the flow cookie that /oauth2/start set."""
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith("moko_flow_"))
    name, value = cookie.split(";", 1)[0].split("=", 1)
    return name, value


def log_messages(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


def browser_host(location: str, base: str = PUBLIC_URL + "/") -> str | None:
    """Return the host a browser opens when it follows ``location`` from the page ``base``.

    It applies the steps of the WHATWG URL parser that open redirects rely on.
    Leading and trailing C0 controls and spaces are stripped, and tab, CR and LF
    are removed anywhere. ``\\`` counts as ``/``. An http(s) scheme other than
    the base's needs no ``//`` before its host.
    """
    cleaned = location.strip("".join(chr(code) for code in range(0x21)))
    cleaned = re.sub(r"[\t\r\n]", "", cleaned).replace("\\", "/")
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", cleaned)
    base_scheme = urlsplit(base).scheme
    if match and match.group(1).lower() in ("http", "https") \
            and match.group(1).lower() != base_scheme:
        return urlsplit(f"{match.group(1)}://{match.group(2).lstrip('/')}").hostname
    return urlsplit(urljoin(base, cleaned)).hostname


def load_corpus() -> list[str]:
    """Return the open-redirect payloads of tests/data/open_redirects.txt (split on LF only)."""
    text = CORPUS_PATH.read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line and not line.startswith("#")]


def pem_public_key(idp: FakeIdp, public_format: serialization.PublicFormat) -> bytes:
    return idp.key.public_key().public_bytes(serialization.Encoding.PEM, public_format)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hmac_token(claims: dict[str, Any], key: bytes, alg: str, kid: str) -> str:
    """Build a JWT signed with HMAC under ``key``, the way an algorithm-confusion attack does."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    header = b64url(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
    payload = b64url(json.dumps(claims).encode())
    signature = hmac.new(key, f"{header}.{payload}".encode("ascii"), digest).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def unsigned_token(claims: dict[str, Any], alg: str, kid: str) -> str:
    header = b64url(json.dumps({"alg": alg, "kid": kid}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


def age_jwks_cache(guard: Guard, seconds: float) -> None:
    """Make the fake provider's JWKS cache look ``seconds`` older, so a refetch is allowed."""
    # The cache is private to the OIDC provider and not part of the Provider protocol, so
    # getattr keeps the type checker quiet. Only the cache's clock field is changed.
    cache = getattr(guard.providers["idp"], "_jwks")  # noqa: B009
    assert cache is not None
    base_clock = cache.clock
    cache.clock = lambda: base_clock() + seconds


# --- open redirects ----------------------------------------------------------------------

BACKSLASH_TARGETS = {
    "backslash": "/\\evil.example/landing",
    "encoded_backslash": "/%5Cevil.example/landing",
    "two_encoded_backslashes": "/%5C%5Cevil.example",
    "backslash_then_slash": "\\/evil.example",
    "encoded_slash_and_backslash": "/%2F%5Cevil.example",
    "double_encoded_backslash": "/%255Cevil.example",
    "backslash_after_dot_segment": "/./\\evil.example",
}


@pytest.mark.parametrize("rd", list(BACKSLASH_TARGETS.values()), ids=list(BACKSLASH_TARGETS))
async def test_backslash_redirect_target_falls_back_to_root(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture, rd: str
) -> None:
    """oauth2-proxy GHSA-qqxw-m5fj-f7gv (CVE-2020-5233): "/\\host" is "//host" to a browser.

    The target is checked at /oauth2/start, the flow keeps "/", and the
    callback sends the browser to "/" with one warning naming the raw value.
    """
    caplog.set_level(logging.WARNING, logger="moko_guard.guard")

    start, params = await harness.start_login(rd)
    stored = harness.guard.flows.sealer.open(flow_cookie_of(start)[1], FLOW_PURPOSE)["r"]
    callback = await harness.client.get(
        "/oauth2/callback", params={"code": "code-1", "state": params["state"]})

    assert start.headers["location"].startswith(f"{ISSUER}/authorize?")
    assert stored == "/"
    assert callback.status_code == 302
    assert callback.headers["location"] == "/"
    assert browser_host(callback.headers["location"]) == "crm.example.com"
    warnings = log_messages(caplog, "redirect_rejected")
    assert len(warnings) == 1
    assert f"rd={escape_control(rd)} " in warnings[0]


async def test_redirect_warning_escapes_control_characters(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """oauth2-proxy GHSA-qqxw-m5fj-f7gv: the logged raw value can never forge a log line."""
    caplog.set_level(logging.WARNING, logger="moko_guard.guard")
    rd = "/deals\r\nredirect_accepted rd=https://evil.example\x00"

    await harness.start_login(rd)

    warnings = log_messages(caplog, "redirect_rejected")
    assert len(warnings) == 1
    assert "reason=forbidden_character" in warnings[0]
    assert "\\x0d\\x0aredirect_accepted" in warnings[0]
    assert "\r" not in caplog.text
    assert "\n" not in warnings[0]
    assert "\x00" not in caplog.text


async def test_guard_paths_never_reach_upstream(harness: GuardHarness) -> None:
    """oauth2-proxy GHSA-qqxw-m5fj-f7gv: requests under /oauth2/ are the guard's, never the app's."""
    upstream = RecordingApp()
    app = GuardMiddleware(upstream, guard=harness.guard)

    async with client_for(app) as client:
        start = await client.get("/oauth2/start", params={"provider": "idp", "rd": "/\\evil.example"})
        sign_in = await client.get("/oauth2/sign_in", params={"rd": "/%5Cevil.example"})
        callback = await client.get("/oauth2/callback", params={"code": "c", "state": "x"})
        unknown = await client.get("/oauth2/anything/else")

    assert start.status_code == 302
    assert sign_in.status_code == 200
    assert callback.status_code == 400
    assert unknown.status_code == 404
    assert upstream.requests == []


# The values of the report, as the guard receives them after the query string is decoded.
WHITESPACE_AND_DOT_TARGETS = [
    "/%09%09/%09/evil.example",
    "/%09%09%5C%09/evil.example",
    "/./%5Cevil.example",
    "/./../../%5Cevil.example",
    "////evil.example/",
    "/%2F%2Fevil.example",
]


@pytest.mark.parametrize(
    "rd",
    [*WHITESPACE_AND_DOT_TARGETS, *(unquote(value) for value in WHITESPACE_AND_DOT_TARGETS)],
    ids=[*(f"encoded:{v}" for v in WHITESPACE_AND_DOT_TARGETS),
         *(f"decoded:{v}" for v in WHITESPACE_AND_DOT_TARGETS)],
)
async def test_tab_and_dot_targets_fall_back(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture, rd: str
) -> None:
    """oauth2-proxy GHSA-5m6c-jp6f-2vcv (CVE-2020-4037): tabs and "/./" hid a "//" from the check.

    Browsers drop tabs and resolve dot segments, so each value reaches
    evil.example. The guard keeps "/", and the final Location resolves, under
    the WHATWG steps, to the CRM's own host.
    """
    caplog.set_level(logging.WARNING, logger="moko_guard.guard")

    response = await harness.sign_in(rd)

    assert response.status_code == 302
    assert response.headers["location"] == "/"
    assert browser_host(response.headers["location"]) == "crm.example.com"
    assert len(log_messages(caplog, "redirect_rejected")) == 1


async def test_redirect_corpus_never_stored_as_target(make_harness: MakeHarness) -> None:
    """oauth2-proxy GHSA-5m6c-jp6f-2vcv: every payload of the open-redirect list keeps "/".

    tests/test_redirects.py checks the same list against check_redirect. This
    test sends each payload to /oauth2/start and reads the target that the
    sealed flow cookie carries to the callback.
    """
    harness = await make_harness(rate_limit=NO_RATE_LIMIT)
    sealer = harness.guard.flows.sealer
    stored: dict[str, str] = {}

    for payload in load_corpus():
        response = await harness.client.get(
            "/oauth2/start", params={"provider": "idp", "rd": payload})
        assert response.status_code == 302, payload
        stored[payload] = sealer.open(flow_cookie_of(response)[1], FLOW_PURPOSE)["r"]

    assert len(stored) > 400
    assert {payload: target for payload, target in stored.items() if target != "/"} == {}


TAMPERED_STATE_SUFFIXES = ["://evil.example", "%3A%2F%2Fevil.example", "//evil.example", ".x",
                           "\n//evil.example"]


@pytest.mark.parametrize("suffix", TAMPERED_STATE_SUFFIXES, ids=repr)
async def test_callback_target_comes_from_flow_not_state(
    harness: GuardHarness, suffix: str
) -> None:
    """bitly/oauth2_proxy issue #478: the redirect was read from the state parameter.

    The target lives in the sealed flow cookie; a state with anything added
    matches no flow, exchanges no code and redirects nowhere, and the genuine
    callback still ends at the target saved by /oauth2/start.
    """
    _, params = await harness.start_login("/deals")

    tampered = await harness.client.get(
        "/oauth2/callback", params={"code": "code-1", "state": params["state"] + suffix})
    genuine = await harness.client.get(
        "/oauth2/callback", params={"code": "code-1", "state": params["state"]})

    assert tampered.status_code == 400
    assert page_reason(tampered) == "state_mismatch"
    assert "location" not in tampered.headers
    assert genuine.status_code == 302
    assert genuine.headers["location"] == "/deals"
    assert len(harness.idp.token_requests) == 1


async def test_flow_target_checked_again_at_callback(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """bitly/oauth2_proxy issue #478: a saved target is checked again before the last redirect.

    The flow cookie here carries "//evil.example/x", as one sealed before a
    stricter check would; the callback still redirects to "/" with a warning.
    """
    caplog.set_level(logging.WARNING, logger="moko_guard.guard")
    await harness.guard.ensure_started()
    flow = harness.guard.flows.begin("idp", "//evil.example/x")
    harness.client.cookies.set(flow.cookie_name, harness.guard.flows.seal(flow),
                               path="/oauth2/callback")
    harness.idp.last_nonce = flow.nonce

    response = await harness.client.get(
        "/oauth2/callback", params={"code": "code-1", "state": flow.state})

    assert response.status_code == 302
    assert response.headers["location"] == "/"
    warnings = log_messages(caplog, "redirect_rejected")
    assert len(warnings) == 1
    assert "reason=not_local_path" in warnings[0]


ALLOW_LIST_TARGETS = {
    "suffix_without_dot": ("https://evilexample.com/", "host"),
    "allowed_host_as_prefix": ("https://crm.example.com.evil.example/", "host"),
    "allowed_domain_in_query": ("https://evil.example/?next=.example.com", "host"),
    "allowed_domain_in_fragment": ("https://evil.example#.example.com", "host"),
    "allowed_domain_in_userinfo": ("https://ops.example.com@evil.example/", "userinfo"),
    "http_scheme": ("http://crm.example.com/", "scheme"),
    "unlisted_port": ("https://crm.example.com:8443/", "port"),
    "subdomain_unlisted_port": ("https://ops.example.com:8443/", "port"),
}


@pytest.mark.parametrize(
    ("rd", "reason"), list(ALLOW_LIST_TARGETS.values()), ids=list(ALLOW_LIST_TARGETS)
)
async def test_redirect_host_must_match_allow_list_exactly(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture, rd: str, reason: str
) -> None:
    """oauth2-proxy GHSA-4mf2-f3wh-gvf2 and authelia PR #3799: a host suffix check without its dot.

    With allowed_redirect_hosts = [".example.com"], only https on port 443
    to example.com or one of its subdomains passes; the warning names the part
    that failed.
    """
    caplog.set_level(logging.WARNING, logger="moko_guard.guard")

    response = await harness.sign_in(rd)

    assert response.headers["location"] == "/"
    warnings = log_messages(caplog, "redirect_rejected")
    assert len(warnings) == 1
    assert warnings[0].startswith(f"redirect_rejected reason={reason} ")


@pytest.mark.parametrize(
    "rd", ["https://ops.example.com/", "https://crm.example.com/deals", "https://example.com/x"],
    ids=["subdomain", "public_host", "bare_domain"],
)
async def test_redirect_to_allowed_host_kept(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture, rd: str
) -> None:
    """oauth2-proxy GHSA-4mf2-f3wh-gvf2: the exact-label check still admits the listed hosts."""
    caplog.set_level(logging.WARNING, logger="moko_guard.guard")

    response = await harness.sign_in(rd)

    assert response.headers["location"] == rd
    assert log_messages(caplog, "redirect_rejected") == []


SCHEME_WITHOUT_AUTHORITY_TARGETS = {
    "http_no_slashes": ("http:evil.example", "scheme"),
    "https_no_slashes": ("https:evil.example", "empty_host"),
    "http_one_slash": ("http:/evil.example", "scheme"),
    "https_one_slash": ("https:/evil.example", "empty_host"),
    "https_encoded_slashes": ("HTTPS:%2F%2Fevil.example", "empty_host"),
    "http_encoded_slashes": ("HTTP:%2F%2Fevil.example", "scheme"),
    "https_three_slashes": ("https:///evil.example", "empty_host"),
    "javascript": ("javascript:alert(1)", "scheme"),
    "data": ("data:text/html,x", "scheme"),
    "bare_host": ("evil.example/landing", "not_local_path"),
}


@pytest.mark.parametrize(
    ("rd", "reason"), list(SCHEME_WITHOUT_AUTHORITY_TARGETS.values()),
    ids=list(SCHEME_WITHOUT_AUTHORITY_TARGETS),
)
async def test_target_with_scheme_but_no_host_rejected(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture, rd: str, reason: str
) -> None:
    """mod_auth_openidc issue #449 (and mod_auth_mellon CVE-2019-3877): an empty parsed host.

    "http:evil.example" has no host for a URL parser, so a host check that
    only runs when a host exists let it through; browsers still open
    evil.example. A value with a scheme needs "//" and an allowed host.
    """
    caplog.set_level(logging.WARNING, logger="moko_guard.guard")

    response = await harness.sign_in(rd)

    assert response.headers["location"] == "/"
    assert browser_host(response.headers["location"]) == "crm.example.com"
    warnings = log_messages(caplog, "redirect_rejected")
    assert len(warnings) == 1
    assert warnings[0].startswith(f"redirect_rejected reason={reason} ")


SIGN_OUT_TARGETS = ["https://evil.example/", "//evil.example", "/\\evil.example",
                    "https:evil.example", "https://crm.example.com@evil.example/"]


@pytest.mark.parametrize("rd", SIGN_OUT_TARGETS, ids=repr)
async def test_sign_out_target_checked_like_sign_in(harness: GuardHarness, rd: str) -> None:
    """pomerium GHSA-fv82-r8qv-ch4v (CVE-2021-29652): sign_out parameters went unchecked."""
    await harness.sign_in()

    response = await harness.client.post("/oauth2/sign_out", params={"rd": rd})

    assert response.status_code == 302
    assert response.headers["location"] == "/"


async def test_signed_in_start_rechecks_target(
    harness: GuardHarness,
) -> None:
    """pomerium GHSA-35vc-w93w-75c2 (CVE-2021-29651): a signed-in user's login URL leaked a token.

    A second /oauth2/start while signed in goes through the same check, and
    neither the provider's URL nor the final redirect carries the code, a
    token or the session cookie.
    """
    await harness.sign_in()
    session = harness.client.cookies.get("moko_session")
    assert session

    start, params = await harness.start_login("https://evil.example/collect")
    callback = await harness.client.get(
        "/oauth2/callback", params={"code": "code-1", "state": params["state"]})
    sign_in_page = await harness.client.get(
        "/oauth2/sign_in", params={"rd": "https://evil.example/collect"})

    assert "evil.example" not in start.headers["location"]
    assert session not in start.headers["location"]
    assert callback.headers["location"] == "/"
    assert "evil.example" not in sign_in_page.text
    assert "rd=%2F" in sign_in_page.text


# --- email allow-lists -------------------------------------------------------------------

MALFORMED_EMAILS = {
    "second_at_before_domain": "mallory@evil.example@example.com",
    "second_at_after_domain": "mallory@example.com@evil.example",
    "quoted_local_part_with_at": '"mallory@evil.example"@example.com',
    "empty_local_part": "@example.com",
    "empty_domain": "mallory@",
    "trailing_dot": "mallory@example.com.",
    "leading_dot": "mallory@.example.com",
    "double_dot": "mallory@example..com",
    "hyphen_label": "mallory@-example.com",
    "cyrillic_letter": "mallory@ex\u0430mple.com",
    "fullwidth_at": "mallory\uff20example.com",
    "newline": "mallory@example.com\n",
    "space_in_domain": "mallory@example.com evil.example",
}


# Malformed addresses that read like the existing user's, so a lax parser would link to her.
MALFORMED_OWNER_EMAILS = {
    "owner_trailing_newline": "alice@example.com\n",
    "owner_trailing_dot": "alice@example.com.",
    "owner_second_at": "alice@evil.example@example.com",
    "owner_after_second_at": "alice@example.com@evil.example",
    "owner_cyrillic_letter": "alice@ex\u0430mple.com",
    "owner_fullwidth_at": "alice\uff20example.com",
}


@pytest.mark.parametrize("email", [*MALFORMED_EMAILS.values(), *MALFORMED_OWNER_EMAILS.values()],
                         ids=[*MALFORMED_EMAILS, *MALFORMED_OWNER_EMAILS])
async def test_malformed_email_never_signs_in_or_links(
    make_harness: MakeHarness, email: str
) -> None:
    """oauth2-proxy GHSA-c5c4-8r6x-56w3 (CVE-2026-40574): "a@evil.example@example.com" passed.

    Only an address with one "@", a local part and a domain of proper labels
    counts. Anything else is refused before the allow-list, the provisioning
    rule or linking by email look at it.
    """
    harness = await make_harness(access={"allowed_email_domains": ["example.com"]})
    await harness.guard.ensure_started()
    alice, _ = await harness.guard.store.create_user_with_identity(
        username="alice@example.com", email="alice@example.com", display_name="Alice",
        roles=["user"], provider="google", subject="g-alice", identity_email="alice@example.com",
    )
    harness.idp.subject = "u-771"
    harness.idp.email = email

    response = await harness.sign_in()

    assert response.status_code == 403
    assert page_reason(response) == "malformed_email"
    assert set_cookie_headers(response, "moko_session") == []
    assert [u.id for u in await harness.guard.store.list_users()] == [alice.id]
    identities = await harness.guard.store.identities_of(alice.id)
    assert [(i.provider, i.subject) for i in identities] == [("google", "g-alice")]
    failures = await audit_rows(harness.guard, "login.failure")
    assert [(f.reason, f.subject) for f in failures] == [("malformed_email", "u-771")]
    # The audit row keeps the address as sent, with control characters escaped.
    assert failures[0].email == escape_control(email)
    assert "\n" not in (failures[0].email or "")


@pytest.mark.parametrize(
    ("allowed", "status"),
    [(["example.com"], 403), (["example.com", "contractors.example.com"], 302)],
    ids=["parent_domain_only", "subdomain_listed"],
)
async def test_email_domain_allow_list_matches_exact_domain(
    make_harness: MakeHarness, allowed: list[str], status: int
) -> None:
    """vouch-proxy issue #453: whether "example.com" admits its subdomains must be explicit.

    An entry admits exactly its own domain; a subdomain gets in only when it
    is listed itself.
    """
    harness = await make_harness(access={
        "allowed_email_domains": allowed,
        "provision_email_domains": ["example.com", "contractors.example.com"],
    })
    harness.idp.email = "eve@contractors.example.com"

    response = await harness.sign_in()

    assert response.status_code == status
    failures = await audit_rows(harness.guard, "login.failure")
    if status == 403:
        assert page_reason(response) == "domain_not_allowed"
        assert [f.reason for f in failures] == ["domain_not_allowed"]
        assert "contractors.example.com" in (failures[0].detail or "")
    else:
        assert failures == []


@pytest.mark.parametrize("entry", [".example.com", "*.example.com", "@example.com"])
def test_wildcard_email_domain_rejected_by_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str
) -> None:
    """vouch-proxy issue #453: a wildcard form is not offered, so the config check rejects it.

    The message names the key, the value and the expected form, so a
    later convenience change cannot widen access silently.
    """
    config = tmp_path / "guard.toml"
    config.write_text(
        f"""
[server]
public_url = "https://crm.example.com"
[session]
secrets = ["{'s' * 48}"]
[store]
url = "sqlite:///{tmp_path / 'guard.db'}"
[access]
allowed_email_domains = ["{entry}"]
[[providers]]
id = "idp"
type = "oidc"
issuer = "https://idp.test"
client_id = "crm-client"
client_secret = "crm-client-secret"
""",
        encoding="utf-8",
    )

    code = cli_main(["check-config", "--config", str(config)])
    error = capsys.readouterr().err

    assert code == 1
    assert '"access.allowed_email_domains"' in error
    assert f'"{entry}"' in error
    assert 'like "example.com"' in error


async def test_mixed_case_email_keeps_one_user_and_lower_case(harness: GuardHarness) -> None:
    """traefik-forward-auth issues #366 and #153: "Alice@Example.COM" was another person.

    The returning identity is matched on (provider, subject); the email the
    app and the audit log see is the store's lower-case form.
    """
    await harness.sign_in()
    harness.client.cookies.clear()
    harness.idp.email = "Alice@Example.COM"

    response = await harness.sign_in()
    echo = (await harness.client.get("/deals")).json()

    assert response.status_code == 302
    assert len(await harness.guard.store.list_users()) == 1
    assert echo["headers"]["x-auth-request-email"] == "alice@example.com"
    successes = await audit_rows(harness.guard, "login.success")
    assert [s.email for s in successes] == ["alice@example.com", "alice@example.com"]


async def test_mixed_case_email_links_existing_user(harness: GuardHarness) -> None:
    """traefik-forward-auth issue #366: a new identity in other letter case links, not duplicates."""
    await harness.guard.ensure_started()
    alice, _ = await harness.guard.store.create_user_with_identity(
        username="alice@example.com", email="alice@example.com", display_name="Alice",
        roles=["user"], provider="google", subject="g-1", identity_email="alice@example.com",
    )
    harness.idp.email = "ALICE@EXAMPLE.COM"

    response = await harness.sign_in()

    assert response.status_code == 302
    assert [u.id for u in await harness.guard.store.list_users()] == [alice.id]
    identities = await harness.guard.store.identities_of(alice.id)
    assert sorted(i.provider for i in identities) == ["google", "idp"]


# --- identity claims -----------------------------------------------------------------------


async def test_verified_email_has_exactly_one_owner(harness: GuardHarness) -> None:
    """Dolibarr PR #34669: "login = claim OR email = claim" matched two accounts, first row won.

    The store keeps each lower-cased email once, so an email never names two
    users, and a user-typed name is never a sign-in key.
    """
    await harness.guard.ensure_started()
    store = harness.guard.store
    alice, _ = await store.create_user_with_identity(
        username="alice@example.com", email="alice@example.com", display_name="Alice",
        roles=["user"], provider="google", subject="g-7", identity_email="alice@example.com",
    )

    with pytest.raises(EmailTaken):
        await store.create_user_with_identity(
            username="gary", email="Alice@Example.com", display_name="Gary", roles=["user"],
            provider="google", subject="g-9", identity_email="Alice@Example.com",
        )
    harness.idp.subject = "u-3"
    response = await harness.sign_in()

    assert response.status_code == 302
    assert [u.id for u in await store.list_users()] == [alice.id]
    assert (await store.user_for_identity("idp", "u-3")) == await store.user_by_id(alice.id)


async def test_linked_identity_ignores_later_email_claim(harness: GuardHarness) -> None:
    """Dolibarr PR #34669: once linked, (provider, subject) is the key, not an editable email."""
    await harness.guard.ensure_started()
    store = harness.guard.store
    gary, _ = await store.create_user_with_identity(
        username="gary@example.com", email="gary@example.com", display_name="Gary",
        roles=["user"], provider="google", subject="g-9", identity_email="gary@example.com",
    )
    await harness.sign_in()
    harness.client.cookies.clear()
    harness.idp.email = "gary@example.com"

    response = await harness.sign_in()
    echo = (await harness.client.get("/deals")).json()

    assert response.status_code == 302
    assert echo["user"] == "alice@example.com"
    assert [i.provider for i in await store.identities_of(gary.id)] == ["google"]


# --- roles ---------------------------------------------------------------------------------


async def test_route_role_rule_denies_user_without_role(make_harness: MakeHarness) -> None:
    """oauth2-proxy GHSA-652x-m2gr-hppm: group authorization let users outside the group in.

    Through /oauth2/auth, a rule for /deals/export admits only crm-admins, so
    bob (support) and a user with no roles at all get 403. The roles header
    always carries the user's own roles, never the rule's.
    """
    harness = await make_harness(
        access={"rules": [{"path": "/deals/export", "roles": ["crm-admins"]}]})
    bob_cookie, bob = await create_session(harness.guard, "bob", ("support",))
    nobody_cookie, _ = await create_session(harness.guard, "nobody", ())
    admin_cookie, _ = await create_session(harness.guard, "root", ("crm-admins",))

    bob_export = await auth_request(harness.guard, cookie=bob_cookie, original_uri="/deals/export")
    bob_deals = await auth_request(harness.guard, cookie=bob_cookie, original_uri="/deals")
    nobody_export = await auth_request(harness.guard, cookie=nobody_cookie,
                                       original_uri="/deals/export")
    admin_export = await auth_request(harness.guard, cookie=admin_cookie,
                                      original_uri="/deals/export")

    assert bob_export.status_code == 403
    assert nobody_export.status_code == 403
    assert bob_deals.status_code == 202
    assert bob_deals.headers["x-auth-request-roles"] == "support"
    assert admin_export.status_code == 202
    assert admin_export.headers["x-auth-request-roles"] == "crm-admins"
    denials = [r for r in await audit_rows(harness.guard, "access.denied") if r.user_id == bob.id]
    assert [r.reason for r in denials] == ["missing_role"]
    assert "path=/deals/export" in (denials[0].detail or "")


async def test_allowed_roles_deny_user_without_listed_role(make_harness: MakeHarness) -> None:
    """oauth2-proxy GHSA-652x-m2gr-hppm: access.allowed_roles must keep out every other role.

    A user with no roles is denied too, not taken as unrestricted.
    """
    harness = await make_harness(access={"allowed_roles": ["crm-admins"]})
    bob_cookie, _ = await create_session(harness.guard, "bob", ("support",))
    nobody_cookie, _ = await create_session(harness.guard, "nobody", ())

    bob = await auth_request(harness.guard, cookie=bob_cookie)
    nobody = await auth_request(harness.guard, cookie=nobody_cookie)

    assert bob.status_code == 403
    assert nobody.status_code == 403
    denials = await audit_rows(harness.guard, "access.denied")
    assert [r.reason for r in denials] == ["role_not_allowed", "role_not_allowed"]


# --- identity headers --------------------------------------------------------------------

FORGED_HEADERS = [
    ("X-Auth-Request-Email", "admin@example.com"),
    ("X_Auth_Request_Email", "admin@example.com"),
    ("x-auth-request-email", "admin@example.com"),
    ("X.Auth.Request.Email", "admin@example.com"),
    ("X-AUTH-REQUEST-USER", "admin"),
    ("X_Auth.Request-Roles", "crm-admins"),
    ("X-Forwarded-User", "admin"),
    ("X_Forwarded_User", "admin"),
    ("X.Forwarded.Email", "admin@example.com"),
    ("Remote-User", "admin"),
    ("remote_user", "admin"),
    ("Remote.User", "admin"),
]


async def test_forged_identity_headers_never_reach_app(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """oauth2-proxy GHSA-vjrc-mh2v-45x6 (CVE-2025-64484); Traefik GHSA-x677-9fxg-v5c5, GHSA-rf44-j88r-hh8c.

    Every spelling of an identity header (letter case, "_", "." for "-") is
    removed, and the app receives exactly one of each identity header, from
    the session. The debug log names each stripped header, never its value.
    """
    upstream = RecordingApp()
    app = GuardMiddleware(upstream, guard=harness.guard)
    cookie, _ = await create_session(harness.guard)
    caplog.set_level(logging.DEBUG, logger="moko_guard.headers")

    async with client_for(app) as client:
        response = await client.get(
            "/deals", headers=[*FORGED_HEADERS, ("Cookie", f"moko_session={cookie}")])

    assert response.status_code == 200
    assert upstream.last_headers(b"x-auth-request-email") == ["alice@example.com"]
    assert upstream.last_headers(b"x-auth-request-user") == ["alice@example.com"]
    assert upstream.last_headers(b"x-auth-request-roles") == ["user"]
    _, headers = upstream.requests[-1]
    forged = [(k, v) for k, v in headers if b"admin" in v]
    assert forged == []
    stripped = log_messages(caplog, "stripped_client_identity_header")
    assert len(stripped) == len(FORGED_HEADERS)
    assert "stripped_client_identity_header name='x_auth_request_email'" in stripped
    assert "admin" not in caplog.text


async def test_forged_identity_headers_absent_from_auth_answer(harness: GuardHarness) -> None:
    """oauth2-proxy GHSA-vjrc-mh2v-45x6: the 202 of /oauth2/auth carries the session's identity only."""
    cookie, _ = await create_session(harness.guard)

    signed_in = await auth_request(harness.guard, cookie=cookie, headers=FORGED_HEADERS)
    anonymous = await auth_request(harness.guard, headers=FORGED_HEADERS)

    assert signed_in.status_code == 202
    assert signed_in.headers.get_list("x-auth-request-email") == ["alice@example.com"]
    assert signed_in.headers.get_list("x-auth-request-user") == ["alice@example.com"]
    assert "admin" not in str(signed_in.headers)
    assert anonymous.status_code == 401
    assert "admin" not in str(anonymous.headers)


SPELLINGS: dict[str, Callable[[str], str]] = {
    "lower": str.lower,
    "upper": str.upper,
    "title": lambda name: "-".join(part.title() for part in name.split("-")),
    "underscores": lambda name: name.replace("-", "_"),
    "dots": lambda name: name.replace("-", "."),
    "mixed_separators": lambda name: "".join(
        ("_."[i % 2] if char == "-" else char) for i, char in enumerate(name)),
    "alternating_case": lambda name: "".join(
        char.upper() if i % 2 else char for i, char in enumerate(name)),
}


@pytest.mark.parametrize("spell", list(SPELLINGS.values()), ids=list(SPELLINGS))
def test_every_spelling_of_identity_header_blocked(
    make_settings: Callable[..., Settings], spell: Callable[[str], str]
) -> None:
    """oauth2-proxy GHSA-vjrc-mh2v-45x6; Traefik GHSA-x677-9fxg-v5c5 and GHSA-rf44-j88r-hh8c.

    Each well-known and configured identity header, in each spelling, is
    removed by strip_request; the configured names here are custom ones.
    """
    settings = make_settings(headers={"user": "X-Crm-User", "email": "X-Crm-Mail"})
    identity_headers = IdentityHeaders(settings.headers)
    names = [*WELL_KNOWN_IDENTITY_HEADERS, *settings.headers.names()]
    sent = [(spell(name).encode("latin-1"), b"forged") for name in names]

    kept = identity_headers.strip_request([*sent, (b"x-crm-other", b"kept")], "moko_session")

    assert all(identity_headers.is_identity_header(name) for name, _ in sent)
    assert kept == [(b"x-crm-other", b"kept")]
    assert canonical(spell("X-Crm-User")) == "x-crm-user"


# --- sign-in state -------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["no_cookies", "own_flow_cookie", "signed_in"])
async def test_foreign_state_exchanges_no_code(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture, victim: str
) -> None:
    """fastapi-sso issue #266: a callback URL made in the attacker's browser signed the victim in.

    The state must belong to a flow cookie of this browser; otherwise the
    code is never exchanged, no session is set, a signed-in victim keeps
    her session, and neither the state nor the code reaches the log.
    """
    caplog.set_level(logging.INFO, logger="moko_guard")
    attacker_app = GuardMiddleware(echo_app(), guard=harness.guard)
    async with client_for(attacker_app) as attacker:
        start = await attacker.get("/oauth2/start", params={"provider": "idp", "rd": "/"})
    attacker_state = parse_qs(urlsplit(start.headers["location"]).query)["state"][0]
    if victim == "own_flow_cookie":
        await harness.start_login()
    elif victim == "signed_in":
        await harness.sign_in()
    session_before = harness.client.cookies.get("moko_session")
    exchanges_before = len(harness.idp.token_requests)

    response = await harness.client.get(
        "/oauth2/callback", params={"code": "ATT_CODE_0123", "state": attacker_state})
    userinfo = await harness.client.get("/oauth2/userinfo")

    if victim == "signed_in":
        # A signed-in person is taken back into the app; nothing else changes.
        assert response.status_code == 302
        assert response.headers["location"] == "/"
    else:
        assert response.status_code == 400
        assert page_reason(response) == "state_mismatch"
    assert len(harness.idp.token_requests) == exchanges_before
    assert set_cookie_headers(response, "moko_session") == []
    assert harness.client.cookies.get("moko_session") == session_before
    if victim == "signed_in":
        assert userinfo.json()["email"] == "alice@example.com"
    else:
        assert userinfo.status_code == 401
    failures = await audit_rows(harness.guard, "login.failure")
    assert [f.reason for f in failures] == ["state_mismatch"]
    assert attacker_state not in caplog.text
    assert "ATT_CODE_0123" not in caplog.text


async def test_callback_without_state_exchanges_no_code(harness: GuardHarness) -> None:
    """fastapi-sso issue #266 (and issue #34, state checking removed): no state, no exchange."""
    await harness.start_login()

    response = await harness.client.get("/oauth2/callback", params={"code": "ATT_CODE"})

    assert response.status_code == 400
    assert page_reason(response) == "state_mismatch"
    assert harness.idp.token_requests == []


@pytest.mark.parametrize("victim_cookie", ["own_name", "renamed_to_attacker_attempt"])
async def test_state_only_opens_flow_cookie_that_created_it(
    harness: GuardHarness, victim_cookie: str
) -> None:
    """authlib GHSA-fg6f-75jq-6523: cached state was usable from any browser.

    The flow of an attempt lives in a cookie of the browser that started it.
    The victim's own flow cookie opens only its own state, even under the
    attacker attempt's cookie name, so no code is exchanged and nothing is
    linked or created.
    """
    attacker_app = GuardMiddleware(echo_app(), guard=harness.guard)
    async with client_for(attacker_app) as attacker:
        attacker_start = await attacker.get("/oauth2/start", params={"provider": "idp"})
    attacker_state = parse_qs(urlsplit(attacker_start.headers["location"]).query)["state"][0]
    attacker_cookie_name, _ = flow_cookie_of(attacker_start)
    victim_start, _ = await harness.start_login()
    own_name, own_value = flow_cookie_of(victim_start)
    if victim_cookie == "renamed_to_attacker_attempt":
        harness.client.cookies.set(attacker_cookie_name, own_value, path="/oauth2/callback")

    response = await harness.client.get(
        "/oauth2/callback", params={"code": "C1", "state": attacker_state})

    assert response.status_code == 400
    assert page_reason(response) == "state_mismatch"
    assert harness.idp.token_requests == []
    assert await harness.guard.store.list_users() == []
    assert own_name != attacker_cookie_name
    assert "Max-Age=600" in next(
        c for c in victim_start.headers.get_list("set-cookie") if c.startswith(own_name))


@pytest.mark.parametrize("nonce", ["other-login-nonce", None], ids=["mismatch", "missing"])
async def test_id_token_nonce_must_match_flow(harness: GuardHarness, nonce: str | None) -> None:
    """mozilla-django-oidc issue #312 and bamf PR #153: a nonce sent but never compared."""
    if nonce is None:
        harness.idp.extra_claims["nonce"] = None
    else:
        harness.idp.nonce_override = nonce

    response = await harness.sign_in()

    assert response.status_code == 403
    assert page_reason(response) == "token_invalid"
    assert set_cookie_headers(response, "moko_session") == []
    assert await harness.guard.store.list_users() == []
    failures = await audit_rows(harness.guard, "login.failure")
    assert "nonce" in (failures[0].detail or "")


async def test_reloaded_callback_exchanges_no_second_code(harness: GuardHarness) -> None:
    """mozilla-django-oidc issue #312: reloading a used callback gave an error after the nonce was used.

    The reload never causes a 500 or a second code exchange. In a browser that
    is no longer signed in it gets a plain 400 page asking to start again.
    """
    first = await harness.sign_in()
    callback_url = str(first.request.url)
    harness.client.cookies.clear()

    reload = await harness.client.get(callback_url)

    assert first.status_code == 302
    assert reload.status_code == 400
    assert page_reason(reload) == "state_mismatch"
    assert REASON_MESSAGES["state_mismatch"] in reload.text
    assert len(harness.idp.token_requests) == 1


async def test_captured_callback_replayed_elsewhere_rejected(harness: GuardHarness) -> None:
    """mozilla/blurts-server issue #796: flow state must be cleared after use.

    A captured callback URL replayed in a fresh browser has no flow cookie,
    and replayed with a copy of the used flow cookie it is refused as used.
    """
    start, params = await harness.start_login()
    flow_name, flow_value = flow_cookie_of(start)
    first = await harness.client.get(
        "/oauth2/callback", params={"code": "code-1", "state": params["state"]})
    app = GuardMiddleware(echo_app(), guard=harness.guard)

    async with client_for(app) as fresh:
        without_cookie = await fresh.get(str(first.request.url))
        fresh.cookies.set(flow_name, flow_value, path="/oauth2/callback")
        with_copied_cookie = await fresh.get(str(first.request.url))

    assert first.status_code == 302
    assert without_cookie.status_code == 400
    assert page_reason(without_cookie) == "state_mismatch"
    assert with_copied_cookie.status_code == 400
    assert page_reason(with_copied_cookie) == "flow_replayed"
    assert len(harness.idp.token_requests) == 1


async def test_reloaded_callback_with_session_returns_to_app(harness: GuardHarness) -> None:
    """mozilla-django-oidc issue #312: a signed-in user who reloads the callback should land in the app."""
    first = await harness.sign_in("/deals")

    reload = await harness.client.get(str(first.request.url))

    # The flow cookie, and with it "/deals", was used up by the first callback.
    assert reload.status_code == 302
    assert reload.headers["location"] == "/"
    assert len(harness.idp.token_requests) == 1


@pytest.mark.parametrize("same_site", ["cross-site", "same-site", "none"])
async def test_flow_cookie_lax_and_scoped_to_callback(
    harness: GuardHarness, same_site: str
) -> None:
    """oauth2-proxy issue #1663: a SameSite=Strict state cookie is not sent on the provider's redirect.

    The flow cookie is always SameSite=Lax, Secure, HttpOnly and limited to
    the callback path, so the top-level redirect back from the provider
    carries it and the sign-in completes.
    """
    start, params = await harness.start_login("/deals")
    name, _ = flow_cookie_of(start)
    attributes = next(c for c in start.headers.get_list("set-cookie") if c.startswith(name))
    headers = {} if same_site == "none" else {"Sec-Fetch-Site": same_site}

    response = await harness.client.get(
        "/oauth2/callback", params={"code": "code-1", "state": params["state"]}, headers=headers)

    assert "SameSite=lax" in attributes
    assert "Secure" in attributes
    assert "HttpOnly" in attributes
    assert "Path=/oauth2/callback" in attributes
    assert response.status_code == 302
    assert response.headers["location"] == "/deals"
    session_cookie = set_cookie_headers(response, "moko_session")[0]
    assert "SameSite=lax" in session_cookie


async def test_callback_without_flow_cookie_gets_clear_page(harness: GuardHarness) -> None:
    """oauth2-proxy issue #1663: a browser that dropped the state cookie got a CSRF error, or worse."""
    _, params = await harness.start_login()
    harness.client.cookies.clear()

    response = await harness.client.get(
        "/oauth2/callback", params={"code": "code-1", "state": params["state"]})

    assert response.status_code == 400
    assert page_reason(response) == "state_mismatch"
    assert REASON_MESSAGES["state_mismatch"] in response.text
    assert [f.reason for f in await audit_rows(harness.guard, "login.failure")] == [
        "state_mismatch"]


# --- ID tokens -------------------------------------------------------------------------------

ForgedToken = Callable[[FakeIdp, dict[str, Any]], str]

FORGED_TOKENS: dict[str, ForgedToken] = {
    "hs256_spki_pem": lambda idp, claims: hmac_token(
        claims, pem_public_key(idp, serialization.PublicFormat.SubjectPublicKeyInfo), "HS256",
        idp.kid),
    "hs256_pkcs1_pem": lambda idp, claims: hmac_token(
        claims, pem_public_key(idp, serialization.PublicFormat.PKCS1), "HS256", idp.kid),
    "hs256_jwk_json": lambda idp, claims: hmac_token(
        claims, json.dumps(public_jwk(idp.key, idp.kid)).encode(), "HS256", idp.kid),
    "hs384_spki_pem": lambda idp, claims: hmac_token(
        claims, pem_public_key(idp, serialization.PublicFormat.SubjectPublicKeyInfo), "HS384",
        idp.kid),
    "hs512_spki_pem": lambda idp, claims: hmac_token(
        claims, pem_public_key(idp, serialization.PublicFormat.SubjectPublicKeyInfo), "HS512",
        idp.kid),
    "alg_none": lambda idp, claims: unsigned_token(claims, "none", idp.kid),
    "alg_None": lambda idp, claims: unsigned_token(claims, "None", idp.kid),
    "alg_NONE": lambda idp, claims: unsigned_token(claims, "NONE", idp.kid),
    "rs256_unknown_key": lambda idp, claims: FakeIdp(key=new_rsa_key(), kid=idp.kid).sign(claims),
}


@pytest.mark.parametrize("forge", list(FORGED_TOKENS.values()), ids=list(FORGED_TOKENS))
async def test_id_token_with_forged_algorithm_rejected(
    harness: GuardHarness, forge: ForgedToken
) -> None:
    """authlib GHSA-5357-c2jx-v7qh (CVE-2024-37568) and PyJWT GHSA-ffqj-6fqr-9h24 (CVE-2022-29217).

    The algorithm comes from the provider's settings, never from the token:
    a public key (PEM or JWK JSON) used as an HMAC secret, "none" in any
    letter case, and a signature by a key outside the JWKS are all refused.
    """
    idp = harness.idp
    idp.email = "admin@example.com"
    idp.token_builder = lambda claims: forge(idp, claims)

    response = await harness.sign_in()

    assert response.status_code == 403
    assert page_reason(response) == "token_invalid"
    assert set_cookie_headers(response, "moko_session") == []
    assert await harness.guard.store.list_users() == []


TIME_CLAIMS = {
    "iat_4s_ahead": ({"iat": 4, "exp": 300}, 302),
    "iat_an_hour_ahead": ({"iat": 3600, "exp": 7200}, 403),
    "expired_beyond_leeway": ({"iat": -600, "exp": -120}, 403),
    "exp_missing": ({"exp": None}, 403),
}


@pytest.mark.parametrize(
    ("offsets", "status"), list(TIME_CLAIMS.values()), ids=list(TIME_CLAIMS)
)
async def test_id_token_time_claims_checked_with_leeway(
    harness: GuardHarness, offsets: dict[str, int | None], status: int
) -> None:
    """Flask-pyoidc issue #147 (4 s of clock skew refused) and authlib issue #17 (exp inverted).

    iat, exp and nbf hold with 60 s of leeway: a few seconds of skew pass,
    an hour ahead or two minutes past expiry do not, and exp is required.
    """
    now = int(time.time())
    harness.idp.extra_claims.update(
        {name: None if offset is None else now + offset for name, offset in offsets.items()})

    response = await harness.sign_in()

    assert response.status_code == status
    if status == 403:
        assert page_reason(response) == "token_invalid"
        assert await harness.guard.store.list_users() == []


AUDIENCES = {
    "other_audience": ({"aud": "billing-app"}, 403),
    "several_audiences_foreign_azp": ({"aud": ["billing-app", CLIENT_ID], "azp": "billing-app"},
                                      403),
    "several_audiences_no_azp": ({"aud": ["billing-app", CLIENT_ID]}, 403),
    "own_audience_and_azp": ({"aud": CLIENT_ID, "azp": CLIENT_ID}, 302),
}


@pytest.mark.parametrize(("claims", "status"), list(AUDIENCES.values()), ids=list(AUDIENCES))
async def test_id_token_audience_must_name_client(
    harness: GuardHarness, claims: dict[str, Any], status: int
) -> None:
    """oidc-client-ts issue #2475 and DockYard/openid_connect issue #35: aud and azp went unchecked.

    A token the same provider issued to another client of the realm is not
    a sign-in for this one.
    """
    harness.idp.extra_claims.update(claims)

    response = await harness.sign_in()

    assert response.status_code == status
    if status == 403:
        assert page_reason(response) == "token_invalid"
        failures = await audit_rows(harness.guard, "login.failure")
        assert any(word in (failures[0].detail or "") for word in ("aud", "azp"))


async def test_rotated_signing_key_accepted_after_one_refetch(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """social-core issue #591: the JWKS was cached for a day, so a rotated key failed every sign-in."""
    caplog.set_level(logging.INFO, logger="moko_guard.tokens")
    await harness.sign_in()
    harness.client.cookies.clear()
    age_jwks_cache(harness.guard, 120)
    harness.idp.key = new_rsa_key()
    harness.idp.kid = "key-2"
    fetches_before = harness.idp.jwks_requests

    response = await harness.sign_in()

    assert response.status_code == 302
    assert harness.idp.jwks_requests == fetches_before + 1
    assert "jwks_refreshed url=https://idp.test/jwks kids=['key-2'] unnamed=0" in log_messages(
        caplog, "jwks_refreshed")


async def test_unknown_kids_refetch_jwks_at_most_once(make_harness: MakeHarness) -> None:
    """pyjwt PR #1207 (refetch on an unknown kid) and social-core #591, without hammering the provider.

    200 callbacks whose tokens name random kids within a minute are all
    refused, and the provider's JWKS is fetched again only once.
    """
    harness = await make_harness(rate_limit=NO_RATE_LIMIT)
    await harness.sign_in()
    harness.client.cookies.clear()
    age_jwks_cache(harness.guard, 120)
    fetches_before = harness.idp.jwks_requests
    statuses: list[int] = []

    for index in range(200):
        kid = f"k-rand-{index}"
        harness.idp.token_builder = lambda claims, kid=kid: harness.idp.sign(claims, kid=kid)
        response = await harness.sign_in()
        statuses.append(response.status_code)

    assert statuses == [403] * 200
    assert harness.idp.jwks_requests == fetches_before + 1
    failures = await audit_rows(harness.guard, "login.failure")
    assert len(failures) == 200
    assert all("no signing key" in (f.detail or "") for f in failures)


# --- sessions and provider tokens ----------------------------------------------------------

REFRESH_TOKEN = "rt-" + "R7q" * 466
ID_TOKEN_PADDING = "p" * 2400


def serve_refresh_tokens(idp: FakeIdp, router: respx.Router, issued: list[str]) -> None:
    """Make the fake token endpoint return a refresh token and record each ID token it issues."""

    def token(request: httpx.Request) -> httpx.Response:
        answer = idp._token(request)
        body = answer.json()
        issued.append(body["id_token"])
        return httpx.Response(200, json={**body, "refresh_token": REFRESH_TOKEN})

    router.post(f"{ISSUER}/token").mock(side_effect=token)


def stored_bytes(tmp_path: Path) -> bytes:
    """Return every byte of the SQLite store, its write-ahead log included."""
    return b"".join(path.read_bytes() for path in sorted(tmp_path.glob("guard.db*")))


async def test_provider_tokens_never_in_cookie_or_store(
    harness: GuardHarness, idp_router: respx.Router, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """starlette issue #2412 and oauth2-proxy issue #1945: provider tokens in a cookie session.

    The provider's 3 KB ID token and its refresh token are used once and
    dropped: neither the session cookie, nor the store, nor the log contains
    them, so the cookie stays far below 4096 bytes and nothing is ever
    refreshed.
    """
    caplog.set_level(logging.DEBUG)
    issued: list[str] = []
    serve_refresh_tokens(harness.idp, idp_router, issued)
    harness.idp.extra_claims["profile_blob"] = ID_TOKEN_PADDING

    response = await harness.sign_in()
    page = await harness.client.get("/deals")

    assert len(issued[0]) > 3200
    session_cookie = set_cookie_headers(response, "moko_session")[0]
    assert len(session_cookie) < 1024
    value = session_cookie.split(";", 1)[0].split("=", 1)[1]
    payload = json.dumps(harness.guard.sessions.sealer.open(value, "session"))
    for token in (REFRESH_TOKEN, issued[0], "at-123"):
        assert token not in payload
        assert token.encode() not in stored_bytes(tmp_path)
        assert token not in caplog.text
    assert page.status_code == 200
    assert page.json()["headers"]["x-auth-request-email"] == "alice@example.com"


async def test_session_never_calls_token_endpoint_again(harness: GuardHarness) -> None:
    """oauth2-proxy issue #1945 and PR #3333: failing refreshes retried on every request.

    The guard keeps no provider token and never refreshes: after the one
    code exchange, a provider whose token endpoint now fails changes nothing
    for a session until its own expiry.
    """
    await harness.sign_in()
    cookie = harness.client.cookies.get("moko_session")
    harness.idp.token_status = 400
    harness.idp.token_body = {"error": "invalid_grant", "error_description": "Session not active"}

    pages = [await harness.client.get("/deals") for _ in range(5)]
    answers = [await auth_request(harness.guard, cookie=cookie) for _ in range(5)]

    assert [page.status_code for page in pages] == [200] * 5
    assert [answer.status_code for answer in answers] == [202] * 5
    grants = [parse_qs(r.content.decode())["grant_type"][0] for r in harness.idp.token_requests]
    assert grants == ["authorization_code"]


async def test_session_cookie_fits_browser_with_many_roles(harness: GuardHarness) -> None:
    """starlette issue #2412: a session past 4096 bytes is dropped by the browser without a word.

    With 50 roles and a 131-character email the sealed cookie stays under
    4096 bytes (about 1.5 KB), and the app gets every role.
    """
    await harness.guard.ensure_started()
    roles = tuple(f"crm-role-{index:02d}" for index in range(50))
    email = "a" * 64 + "@" + "department." * 5 + "example.com"
    await harness.guard.store.create_user_with_identity(
        username=email, email=email, display_name="Alice", roles=roles,
        provider="idp", subject="alice-sub", identity_email=email,
    )

    response = await harness.sign_in()
    page = await harness.client.get("/deals")

    session_cookie = set_cookie_headers(response, "moko_session")[0]
    assert len(session_cookie) < 4096
    assert page.status_code == 200
    assert page.json()["headers"]["x-auth-request-roles"] == ",".join(roles)


async def test_oversized_session_refused_with_reason(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """starlette issue #2412: an oversized cookie must fail loudly, not loop back to sign-in.

    A user whose roles do not fit in a cookie gets the sign-in page with a
    reason and the operator an error line; no cookie or session row is left.
    """
    caplog.set_level(logging.ERROR, logger="moko_guard.sessions")
    await harness.guard.ensure_started()
    roles = tuple(f"crm-department-role-{index:03d}" for index in range(200))
    await harness.guard.store.create_user_with_identity(
        username="alice@example.com", email="alice@example.com", display_name="Alice",
        roles=roles, provider="idp", subject="alice-sub", identity_email="alice@example.com",
    )

    response = await harness.sign_in()

    assert response.status_code == 403
    assert page_reason(response) == "session_too_large"
    assert set_cookie_headers(response, "moko_session") == []
    assert await harness.guard.store.count_active_sessions() == 0
    errors = log_messages(caplog, "session_too_large")
    assert len(errors) == 1
    assert "roles=200" in errors[0]


# --- HTTPS behind a proxy --------------------------------------------------------------------


async def test_trusted_proxy_https_gives_secure_sign_in(harness: GuardHarness) -> None:
    """linagora/openrag issue #384 and oauth2-proxy issue #1647: proxy headers ignored behind TLS.

    From the trusted proxy, X-Forwarded-Proto: https counts: no redirect to
    https, Secure cookies, an https redirect_uri, and the client address of
    X-Forwarded-For in the audit log.
    """
    app = GuardMiddleware(echo_app(), guard=harness.guard)
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "198.51.100.20"}

    async with client_for(app, peer=TRUSTED_PEER, base_url="http://crm.example.com",
                          headers=forwarded) as proxy:
        start = await proxy.get("/oauth2/start", params={"provider": "idp", "rd": "/deals"})
        params = harness.idp.remember_nonce(start.headers["location"])
        flow_name, flow_value = flow_cookie_of(start)
        callback = await proxy.get(
            "/oauth2/callback", params={"code": "code-1", "state": params["state"]},
            headers={"Cookie": f"{flow_name}={flow_value}"})

    assert start.status_code == 302
    assert params["redirect_uri"] == "https://crm.example.com/oauth2/callback"
    assert "Secure" in next(c for c in start.headers.get_list("set-cookie"))
    assert callback.status_code == 302
    session_cookie = set_cookie_headers(callback, "moko_session")[0]
    assert "Secure" in session_cookie
    assert "HttpOnly" in session_cookie
    successes = await audit_rows(harness.guard, "login.success")
    assert [s.client_ip for s in successes] == ["198.51.100.20"]


@pytest.mark.parametrize("peer", [UNTRUSTED_PEER, TRUSTED_PEER], ids=["untrusted", "trusted"])
async def test_plain_http_redirected_before_any_cookie(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture, peer: str
) -> None:
    """linagora/openrag issue #384 and oauth2-proxy issue #259: cookies issued over plain http.

    A plain http request, or one whose X-Forwarded-Proto comes from an
    untrusted peer, gets 308 to https (403 for other methods) and no cookie;
    the ignored header is logged once with its name and the peer.
    """
    caplog.set_level(logging.WARNING, logger="moko_guard.forwarding")
    app = GuardMiddleware(echo_app(), guard=harness.guard)
    headers = {"X-Forwarded-Proto": "https"} if peer == UNTRUSTED_PEER else {}

    async with client_for(app, peer=peer, base_url="http://crm.example.com",
                          headers=headers) as client:
        start = await client.get("/oauth2/start", params={"provider": "idp", "rd": "/deals"})
        page = await client.get("/deals")
        post = await client.post("/deals", content=b"x")

    assert start.status_code == 308
    assert start.headers["location"] == (
        "https://crm.example.com/oauth2/start?provider=idp&rd=%2Fdeals")
    assert start.headers.get_list("set-cookie") == []
    assert page.status_code == 308
    assert page.headers["location"] == "https://crm.example.com/deals"
    assert post.status_code == 403
    warnings = log_messages(caplog, "untrusted_forwarded_header")
    if peer == UNTRUSTED_PEER:
        expected = f"untrusted_forwarded_header name=X-Forwarded-Proto peer={UNTRUSTED_PEER}"
        assert warnings == [expected] * 3
    else:
        assert warnings == []


async def test_untrusted_forwarding_headers_logged_once_per_request(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """oauth2-proxy GHSA-7x63-xv5r-3p2x (CVE-2026-40575): forwarded headers from any peer were trusted.

    Each ignored header is named once per request, without its value, even
    though several parts of the guard read the request's forwarding info.
    """
    caplog.set_level(logging.WARNING, logger="moko_guard.forwarding")
    app = GuardMiddleware(echo_app(), guard=harness.guard)
    forged = {"X-Forwarded-Uri": "/public/logo.png", "X-Original-URI": "/public/x",
              "X-Forwarded-Host": "crm.example.com", "X-Forwarded-Proto": "https"}

    async with client_for(app, peer=UNTRUSTED_PEER, headers=forged) as client:
        response = await client.get("/admin/export.csv", headers={"Accept": "application/json"})

    assert response.status_code == 401
    assert sorted(log_messages(caplog, "untrusted_forwarded_header")) == sorted(
        f"untrusted_forwarded_header name={name} peer={UNTRUSTED_PEER}" for name in forged)
    assert "/public/" not in caplog.text


async def test_startup_log_names_trusted_proxies(
    harness: GuardHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """linagora/openrag issue #384: the proxies the guard trusts must be visible at start."""
    caplog.set_level(logging.INFO, logger="moko_guard.guard")

    await harness.guard.ensure_started()

    starting = log_messages(caplog, "guard_starting")
    assert len(starting) == 1
    assert "127.0.0.2/32" in starting[0]


# --- sign-out ----------------------------------------------------------------------------------


async def test_sign_out_revokes_copied_cookie_in_every_mode(harness: GuardHarness) -> None:
    """traefik-forward-auth issue #105: removing the cookie was not enough, a copy still worked.

    After sign-out, a copy of the cookie gets 401 from /oauth2/auth and from
    the middleware at once on this process, and the audit log has the
    sign-out and the revocation.
    """
    await harness.sign_in()
    copied = harness.client.cookies.get("moko_session")
    assert copied
    assert (await auth_request(harness.guard, cookie=copied)).status_code == 202

    signed_out = await harness.client.post("/oauth2/sign_out")
    forward_auth = await auth_request(harness.guard, cookie=copied)
    harness.client.cookies.set("moko_session", copied)
    middleware = await harness.client.get("/deals", headers={"Accept": "application/json"})

    assert signed_out.status_code == 200
    assert any("Max-Age=0" in c for c in set_cookie_headers(signed_out, "moko_session"))
    assert forward_auth.status_code == 401
    assert middleware.status_code == 401
    events = [(r.event, r.reason) for r in await audit_rows(harness.guard)]
    assert ("sign_out", None) in events
    assert ("session.revoked", "sign_out") in events


async def test_revocation_reaches_other_process_within_poll_interval(
    make_harness: MakeHarness,
) -> None:
    """traefik-forward-auth issue #105: a revoked session must end on every replica, in a known time.

    Two guards share one store; the one that did not handle the sign-out
    refuses the copied cookie within session.revocation_poll_interval (here
    0.2 s, plus scheduling slack).
    """
    interval = 0.2
    first = await make_harness(session={"revocation_poll_interval": "200ms"})
    second = await make_harness(session={"revocation_poll_interval": "200ms"})
    await first.sign_in()
    copied = first.client.cookies.get("moko_session")
    assert copied
    await second.guard.ensure_started()
    assert (await auth_request(second.guard, cookie=copied)).status_code == 202

    await first.client.post("/oauth2/sign_out")
    signed_out_at = time.monotonic()
    status = 202
    while status == 202 and time.monotonic() - signed_out_at < interval + 5:
        await asyncio.sleep(0.02)
        status = (await auth_request(second.guard, cookie=copied)).status_code
    elapsed = time.monotonic() - signed_out_at

    assert status == 401
    assert elapsed < interval + 1.0


@pytest.mark.parametrize(("rd", "after_logout"), [
    ("/goodbye", "https://crm.example.com/goodbye"),
    ("https://evil.example/", "https://crm.example.com/"),
], ids=["local_target", "foreign_target"])
async def test_sign_out_ends_provider_session_when_configured(
    make_harness: MakeHarness, idp_router: respx.Router, rd: str, after_logout: str
) -> None:
    """traefik-forward-auth issue #105 and oauth2-proxy issue #1958: the provider session signs in again.

    With sign_out_at_provider and an end_session_endpoint in the provider's
    metadata, sign-out revokes the session here and then sends the browser to
    the provider, whose return address went through the same redirect check.
    """
    idp_router.get(f"{ISSUER}/.well-known/openid-configuration").respond(200, json={
        "issuer": ISSUER, "authorization_endpoint": f"{ISSUER}/authorize",
        "token_endpoint": f"{ISSUER}/token", "userinfo_endpoint": f"{ISSUER}/userinfo",
        "jwks_uri": f"{ISSUER}/jwks", "end_session_endpoint": f"{ISSUER}/logout",
    })
    harness = await make_harness(providers=[{
        "id": "idp", "type": "oidc", "name": "Example IdP", "issuer": ISSUER,
        "client_id": CLIENT_ID, "client_secret": "crm-client-secret",
        "id_token_algorithms": ["RS256"], "sign_out_at_provider": True,
    }])
    await harness.sign_in()
    copied = harness.client.cookies.get("moko_session")

    response = await harness.client.post("/oauth2/sign_out", params={"rd": rd})

    assert response.status_code == 302
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == f"{ISSUER}/logout"
    assert parse_qs(location.query)["post_logout_redirect_uri"] == [after_logout]
    assert (await auth_request(harness.guard, cookie=copied)).status_code == 401


# --- provider outage -----------------------------------------------------------------------

OUTAGES: dict[str, httpx.Response | Exception] = {
    "connection_refused": httpx.ConnectError("connection refused"),
    "no_answer": httpx.ReadTimeout("timed out"),
    "bad_gateway": httpx.Response(502, text="bad gateway"),
}


@pytest.mark.parametrize("outage", list(OUTAGES.values()), ids=list(OUTAGES))
async def test_provider_outage_keeps_sessions_and_answers_503(
    harness: GuardHarness, idp_router: respx.Router, caplog: pytest.LogCaptureFixture,
    outage: httpx.Response | Exception,
) -> None:
    """oauth2-proxy issue #3487 (start failed while the issuer was unreachable) and fastmcp #4365.

    The guard starts without asking the provider, existing sessions keep
    working, a new sign-in gets 503 with Retry-After at once, /readyz reports
    the provider, and discovery is tried again only after its 30 s back-off,
    with one error line per attempt, not per request.
    """
    caplog.set_level(logging.ERROR, logger="moko_guard.providers")
    discovery_calls: list[httpx.Request] = []

    def discovery(request: httpx.Request) -> httpx.Response:
        discovery_calls.append(request)
        if isinstance(outage, Exception):
            raise outage
        return outage

    idp_router.get(f"{ISSUER}/.well-known/openid-configuration").mock(side_effect=discovery)
    started_at = time.monotonic()
    cookie, _ = await create_session(harness.guard)
    startup_seconds = time.monotonic() - started_at
    harness.client.cookies.set("moko_session", cookie)

    alice = await harness.client.get("/deals")
    bob = [await harness.client.get("/oauth2/start", params={"provider": "idp"})
           for _ in range(3)]
    async with client_for(create_app(harness.guard.settings, guard=harness.guard),
                          base_url=FORWARD_AUTH_URL) as health:
        ready = await health.get("/readyz")

    assert startup_seconds < 5
    assert alice.status_code == 200
    assert alice.json()["user"] == "alice@example.com"
    assert [response.status_code for response in bob] == [503] * 3
    assert all(response.headers["retry-after"] == "30" for response in bob)
    assert all(page_reason(response) == "provider_unavailable" for response in bob)
    assert ready.status_code == 503
    assert ready.json()["checks"]["provider:idp"] is False
    assert len(discovery_calls) == 1
    assert len(log_messages(caplog, "provider_discovery_failed provider=idp")) == 1


async def test_every_provider_call_has_bounded_timeout(
    make_settings: Callable[..., Settings], idp: FakeIdp, idp_router: respx.Router
) -> None:
    """fastmcp issue #4365: provider discovery had no bounded default timeout.

    Discovery, token, userinfo and JWKS requests each carry connect, read,
    write and pool timeouts of at most 10 s.
    """
    timeouts: dict[str, dict[str, float | None]] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts[request.url.path] = dict(request.extensions["timeout"])
        response: httpx.Response = idp_router.handler(request)
        return response

    # Without preferred_username in the ID token, the guard also calls userinfo.
    idp.extra_claims = {"preferred_username": None}
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    guard = Guard(make_settings(), http_client=http)
    try:
        async with client_for(GuardMiddleware(echo_app(), guard=guard)) as client:
            start = await client.get("/oauth2/start", params={"provider": "idp"})
            params = idp.remember_nonce(start.headers["location"])
            callback = await client.get(
                "/oauth2/callback", params={"code": "code-1", "state": params["state"]})
    finally:
        await guard.shutdown()
        await http.aclose()

    assert callback.status_code == 302
    assert set(timeouts) == {"/.well-known/openid-configuration", "/token", "/userinfo", "/jwks"}
    for path, values in timeouts.items():
        assert all(value is not None and 0 < value <= 10 for value in values.values()), path


# --- audit log -------------------------------------------------------------------------------


async def test_unknown_identity_refused_with_reason_and_audit(make_harness: MakeHarness) -> None:
    """Dolibarr issue #35118: the sign-in fell back to the login screen with no error and no log.

    With provisioning off, a valid sign-in of a person without an account
    gets a 403 page in plain words (no redirect back to the provider) and one
    audit row with the email, subject and client address.
    """
    harness = await make_harness(access={"auto_provision": False})
    harness.idp.subject = "dave-sub"
    harness.idp.email = "dave@example.com"

    response = await harness.sign_in()

    assert response.status_code == 403
    assert "location" not in response.headers
    assert page_reason(response) == "provisioning_disabled"
    assert REASON_MESSAGES["provisioning_disabled"] in response.text
    failures = await audit_rows(harness.guard, "login.failure")
    assert [(f.reason, f.provider, f.email, f.subject, f.client_ip) for f in failures] == [
        ("provisioning_disabled", "idp", "dave@example.com", "dave-sub", "127.0.0.1")]


async def test_provider_refusal_shown_and_audited(harness: GuardHarness) -> None:
    """Dolibarr issue #31718: a failed provider sign-in left a blank security log entry."""
    _, params = await harness.start_login()

    response = await harness.client.get("/oauth2/callback", params={
        "error": "access_denied", "error_description": "User cancelled", "state": params["state"]})

    assert response.status_code == 403
    assert page_reason(response) == "provider_denied"
    failures = await audit_rows(harness.guard, "login.failure")
    assert [(f.reason, f.provider) for f in failures] == [("provider_denied", "idp")]
    assert "error=access_denied" in (failures[0].detail or "")


async def deny_by_domain(harness: GuardHarness) -> httpx.Response:
    harness.idp.email = "eve@evil.example"
    return await harness.sign_in()


async def deny_unverified(harness: GuardHarness) -> httpx.Response:
    harness.idp.email_verified = False
    return await harness.sign_in()


async def deny_by_token(harness: GuardHarness) -> httpx.Response:
    harness.idp.extra_claims["aud"] = "billing-app"
    return await harness.sign_in()


async def deny_by_state(harness: GuardHarness) -> httpx.Response:
    await harness.start_login()
    return await harness.client.get("/oauth2/callback", params={"code": "c", "state": "x"})


async def deny_at_provider(harness: GuardHarness) -> httpx.Response:
    _, params = await harness.start_login()
    return await harness.client.get(
        "/oauth2/callback", params={"error": "access_denied", "state": params["state"]})


async def deny_disabled_user(harness: GuardHarness) -> httpx.Response:
    _, user = await create_session(harness.guard)
    await harness.guard.store.set_disabled(user.id, True)
    return await harness.sign_in()


async def deny_plain(harness: GuardHarness) -> httpx.Response:
    return await harness.sign_in()


DENIALS: dict[str, tuple[Callable[[GuardHarness], Awaitable[httpx.Response]], dict[str, Any],
                         str]] = {
    "domain": (deny_by_domain, {}, "domain_not_allowed"),
    "unverified_email": (deny_unverified, {}, "email_unverified"),
    "token": (deny_by_token, {}, "token_invalid"),
    "state": (deny_by_state, {}, "state_mismatch"),
    "provider": (deny_at_provider, {}, "provider_denied"),
    "disabled_user": (deny_disabled_user, {}, "user_disabled"),
    "no_account": (deny_plain, {"access": {"auto_provision": False}}, "provisioning_disabled"),
    "role": (deny_plain, {"access": {"allowed_roles": ["crm-admins"]}}, "role_not_allowed"),
}


@pytest.mark.parametrize(("deny", "overrides", "reason"), list(DENIALS.values()),
                         ids=list(DENIALS))
async def test_every_denial_writes_one_audit_failure(
    make_harness: MakeHarness, deny: Callable[[GuardHarness], Awaitable[httpx.Response]],
    overrides: dict[str, Any], reason: str,
) -> None:
    """Dolibarr issues #35118 and #31718: every refused sign-in leaves one machine-readable row."""
    harness = await make_harness(**overrides)

    response = await deny(harness)

    assert 400 <= response.status_code < 500
    assert page_reason(response) == reason
    failures = await audit_rows(harness.guard, "login.failure")
    assert [f.reason for f in failures] == [reason]
    assert failures[0].client_ip == "127.0.0.1"


# --- store under load --------------------------------------------------------------------------


def serve_numbered_people(idp: FakeIdp, router: respx.Router, count: int) -> None:
    """Make the fake token endpoint sign in person N for code "code-N", with no userinfo call."""

    def token(request: httpx.Request) -> httpx.Response:
        code = parse_qs(request.content.decode())["code"][0]
        index = int(code.rsplit("-", 1)[1])
        assert 0 <= index < count
        claims = idp.claims(idp.nonces_by_code[code])
        claims.update({"sub": f"person-{index}", "email": f"person{index}@example.com"})
        return httpx.Response(200, json={"token_type": "Bearer", "id_token": idp.sign(claims)})

    router.post(f"{ISSUER}/token").mock(side_effect=token)


async def test_concurrent_sign_ins_during_long_read_all_succeed(
    make_harness: MakeHarness, idp_router: respx.Router, tmp_path: Path
) -> None:
    """codex-lb issue #2447 and gns3-server #2422: "database is locked" during concurrent sign-ins.

    While another connection holds a read transaction open, 30 first
    sign-ins of 30 people write users, identities, sessions and audit rows,
    and every one ends in a redirect with no row lost.
    """
    people = 30
    harness = await make_harness(rate_limit=NO_RATE_LIMIT)
    serve_numbered_people(harness.idp, idp_router, people)
    states = []
    for index in range(people):
        _, params = await harness.start_login(f"/tab{index}")
        harness.idp.nonces_by_code[f"code-{index}"] = params["nonce"]
        states.append(params["state"])
    reader = sqlite3.connect(tmp_path / "guard.db", isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM moko_audit_log").fetchone()
        responses = await asyncio.wait_for(asyncio.gather(*(
            harness.client.get("/oauth2/callback",
                               params={"code": f"code-{index}", "state": state})
            for index, state in enumerate(states)
        )), timeout=60)
        reader.execute("COMMIT")
    finally:
        reader.close()

    assert [r.status_code for r in responses] == [302] * people
    assert len(await harness.guard.store.list_users()) == people
    assert len(await audit_rows(harness.guard, "login.success")) == people
    assert len(await audit_rows(harness.guard, "user.provisioned")) == people
    assert await harness.guard.store.count_active_sessions() == people


async def test_locked_store_gives_503_and_leaves_nothing(
    make_harness: MakeHarness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """codex-lb issue #2447: a busy SQLite store must give a clear answer, not a 500.

    While another connection holds the write lock past the busy timeout and
    the retries, the callback answers 503 with Retry-After and logs the
    give-up; no user or session is half-written, and the next sign-in works.
    """
    caplog.set_level(logging.WARNING, logger="moko_guard")
    harness = await make_harness(store={"busy_timeout": "10ms"})
    await harness.guard.ensure_started()
    _, params = await harness.start_login()
    writer = sqlite3.connect(tmp_path / "guard.db", isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        busy = await asyncio.wait_for(harness.client.get(
            "/oauth2/callback", params={"code": "code-1", "state": params["state"]}), timeout=30)
        writer.execute("ROLLBACK")
    finally:
        writer.close()
    users_after_busy = await harness.guard.store.list_users()
    sessions_after_busy = await harness.guard.store.count_active_sessions()
    with sqlite3.connect(tmp_path / "guard.db") as reader:
        identities_after_busy = reader.execute("SELECT COUNT(*) FROM moko_identities").fetchone()[0]
    successes_after_busy = await audit_rows(harness.guard, "login.success")

    retry = await harness.sign_in()

    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "30"
    assert page_reason(busy) == "store_unavailable"
    assert users_after_busy == []
    assert sessions_after_busy == 0
    assert identities_after_busy == 0
    assert successes_after_busy == []
    assert any("gave_up=true" in m for m in log_messages(caplog, "store_busy op=create_user"))
    assert retry.status_code == 302
