"""Fake Facebook, GitHub and plain OAuth 2.0 providers behind respx, and a guard in front of them.

Each fake responds as the provider's documentation shows: Facebook's Graph
API (token response, ``/me`` with ``appsecret_proof``, ``OAuthException``
errors), GitHub's OAuth app and REST API (token responses with HTTP 200 and an
``error`` member, ``/user``, ``/user/emails``, membership endpoints that return
404 for non-members) and a plain OAuth 2.0 server on a ``.test`` host. Every
fake checks the client credentials, the redirect URI and the PKCE verifier
against the authorization request, so a guard that skips one of them fails.

Only the respx router responds: a request to any URL without a route raises
in the test, so nothing reaches the network.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import httpx
import respx
from conftest import PUBLIC_URL, base_config, echo_app, merge

from moko_guard import Guard, GuardMiddleware, settings_from_mapping
from moko_guard.flow import code_challenge
from moko_guard.store import AuditFilter, AuditRecord, UserRecord

REDIRECT_URI = PUBLIC_URL + "/oauth2/callback"
CLIENT_ID = "crm-app-1234"
CLIENT_SECRET = "crm-app-secret-5678"


def query_params(url: str) -> dict[str, str]:
    """Return the query parameters of ``url``, one value each."""
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


def form_params(request: httpx.Request) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(request.content.decode()).items()}


@dataclass
class AuthorizationRequest:
    """What the fake remembers of one authorization request, keyed by the code it issued."""

    client_id: str
    redirect_uri: str
    code_challenge: str
    code_challenge_method: str


class FakeProvider(Protocol):
    provider_id: str

    def provider_config(self) -> dict[str, Any]: ...

    def install(self, router: respx.Router) -> None: ...

    def authorize(self, authorize_url: str) -> dict[str, str]: ...


@dataclass
class AuthorizationServer:
    """The part every fake shares: issuing codes and checking a token request against them."""

    issued: dict[str, AuthorizationRequest] = field(default_factory=dict)
    token_requests: list[httpx.Request] = field(default_factory=list)
    # A test sets this to replace the token response (or to raise an exception instead).
    token_response: httpx.Response | Exception | None = None
    codes_issued: int = 0

    def issue_code(self, authorize_url: str) -> dict[str, str]:
        """Accept an authorization request and return the callback parameters (code, state)."""
        params = query_params(authorize_url)
        self.codes_issued += 1
        code = f"code-{self.codes_issued}"
        self.issued[code] = AuthorizationRequest(
            client_id=params.get("client_id", ""),
            redirect_uri=params.get("redirect_uri", ""),
            code_challenge=params.get("code_challenge", ""),
            code_challenge_method=params.get("code_challenge_method", ""),
        )
        return {"code": code, "state": params.get("state", "")}

    def grant_problem(self, form: Mapping[str, str], client_id: str, secret: str) -> str | None:
        """Return the OAuth error code a real server would send for this token request, or None."""
        if client_id != CLIENT_ID or secret != CLIENT_SECRET:
            return "invalid_client"
        request = self.issued.pop(form.get("code", ""), None)
        if request is None or request.client_id != client_id:
            return "invalid_grant"
        if form.get("redirect_uri") != request.redirect_uri:
            return "invalid_grant"
        # RFC 7636 section 4.6: the verifier must hash to the challenge sent earlier.
        verifier = form.get("code_verifier", "")
        if request.code_challenge_method != "S256" or code_challenge(verifier) != request.code_challenge:
            return "invalid_grant"
        return None

    def fixed_token_response(self) -> httpx.Response | None:
        if isinstance(self.token_response, Exception):
            raise self.token_response
        return self.token_response


# --- Facebook -------------------------------------------------------------------

FACEBOOK_TOKEN = "EAAGm0PX4ZCpsBAKZC2ZAxGvEXAMPLEaccessTOKEN"


def facebook_error(message: str, error_type: str = "OAuthException", code: int = 100) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "code": code,
                      "fbtrace_id": "AbCdEfGh123"}}


@dataclass
class FakeFacebook:
    """Facebook Login and the Graph API ``/me`` endpoint."""

    provider_id: str = "facebook"
    graph_version: str = "v21.0"
    app_secret: str = CLIENT_SECRET
    # The /me response. Graph returns only the requested fields that exist.
    profile: dict[str, Any] = field(default_factory=lambda: {
        "id": "10158012345678901", "name": "Alice Example", "email": "alice@example.com",
    })
    server: AuthorizationServer = field(default_factory=AuthorizationServer)
    profile_requests: list[httpx.Request] = field(default_factory=list)

    def provider_config(self) -> dict[str, Any]:
        return {"id": self.provider_id, "type": "facebook", "name": "Facebook",
                "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                "graph_version": self.graph_version}

    def install(self, router: respx.Router) -> None:
        graph = f"https://graph.facebook.com/{self.graph_version}"
        router.post(f"{graph}/oauth/access_token").mock(side_effect=self._token)
        router.get(url__startswith=f"{graph}/me").mock(side_effect=self._me)

    def authorize(self, authorize_url: str) -> dict[str, str]:
        assert authorize_url.startswith(f"https://www.facebook.com/{self.graph_version}/dialog/oauth?")
        return self.server.issue_code(authorize_url)

    def _token(self, request: httpx.Request) -> httpx.Response:
        self.server.token_requests.append(request)
        fixed = self.server.fixed_token_response()
        if fixed is not None:
            return fixed
        form = form_params(request)
        problem = self.server.grant_problem(form, form.get("client_id", ""),
                                            form.get("client_secret", ""))
        if problem is not None:
            return httpx.Response(400, json=facebook_error(
                "Error validating verification code. Please make sure your redirect_uri is "
                "identical to the one you used in the OAuth dialog request"))
        return httpx.Response(200, json={
            "access_token": FACEBOOK_TOKEN, "token_type": "bearer", "expires_in": 5183944,
        })

    def _me(self, request: httpx.Request) -> httpx.Response:
        self.profile_requests.append(request)
        if request.headers.get("authorization") != f"Bearer {FACEBOOK_TOKEN}":
            return httpx.Response(400, json=facebook_error(
                "An active access token must be used to query information about the current user.",
                code=2500))
        params = query_params(str(request.url))
        expected_proof = hmac.new(self.app_secret.encode(), FACEBOOK_TOKEN.encode(),
                                  hashlib.sha256).hexdigest()
        if params.get("appsecret_proof") != expected_proof:
            return httpx.Response(400, json=facebook_error(
                "Invalid appsecret_proof provided in the API argument", "GraphMethodException"))
        fields = params.get("fields", "id,name").split(",")
        return httpx.Response(200, json={k: v for k, v in self.profile.items() if k in fields})


# --- GitHub -----------------------------------------------------------------------

GITHUB_TOKEN = "gho_16C7e42F292c6912E7710c838347Ae178B4a"
NOT_FOUND = {"message": "Not Found", "status": "404",
             "documentation_url": "https://docs.github.com/rest"}


@dataclass
class FakeGitHub:
    """A GitHub OAuth app and the REST API, on github.com or a GitHub Enterprise Server host."""

    provider_id: str = "github"
    web_base: str = "https://github.com"
    api_base: str = "https://api.github.com"
    user: dict[str, Any] = field(default_factory=lambda: {
        "login": "octocat", "id": 583231, "node_id": "MDQ6VXNlcjU4MzIzMQ==", "type": "User",
        "site_admin": False, "name": "The Octocat", "company": "@acme-corp", "email": None,
        "created_at": "2011-01-25T18:44:36Z",
    })
    emails: list[dict[str, Any]] = field(default_factory=lambda: [
        {"email": "octocat@example.com", "primary": True, "verified": True,
         "visibility": "private"},
        {"email": "583231+octocat@users.noreply.github.com", "primary": False, "verified": True,
         "visibility": None},
    ])
    # Organization login -> membership state ("active" or "pending"). Others get 404.
    org_states: dict[str, str] = field(default_factory=dict)
    # "org/team-slug" -> membership state. Others get 404.
    team_states: dict[str, str] = field(default_factory=dict)
    # A status returned for every membership request instead (403, 500, ...).
    membership_status: int | None = None
    # A response returned for GET /user instead.
    user_response: httpx.Response | None = None
    server: AuthorizationServer = field(default_factory=AuthorizationServer)
    api_requests: list[httpx.Request] = field(default_factory=list)

    def provider_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"id": self.provider_id, "type": "github", "name": "GitHub",
                                  "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        if self.api_base != "https://api.github.com":
            config["api_base_url"] = self.api_base
        return config

    def install(self, router: respx.Router) -> None:
        router.post(f"{self.web_base}/login/oauth/access_token").mock(side_effect=self._token)
        router.get(f"{self.api_base}/user").mock(side_effect=self._user)
        router.get(url__startswith=f"{self.api_base}/user/emails").mock(side_effect=self._emails)
        router.get(url__regex=rf"^{self.api_base}/user/memberships/orgs/[^/]+$").mock(
            side_effect=self._org_membership)
        router.get(url__regex=rf"^{self.api_base}/orgs/[^/]+/teams/[^/]+/memberships/[^/]+$").mock(
            side_effect=self._team_membership)

    def authorize(self, authorize_url: str) -> dict[str, str]:
        assert authorize_url.startswith(f"{self.web_base}/login/oauth/authorize?")
        return self.server.issue_code(authorize_url)

    def _token(self, request: httpx.Request) -> httpx.Response:
        self.server.token_requests.append(request)
        fixed = self.server.fixed_token_response()
        if fixed is not None:
            return fixed
        form = form_params(request)
        problem = self.server.grant_problem(form, form.get("client_id", ""),
                                            form.get("client_secret", ""))
        if problem == "invalid_client":
            body = {"error": "incorrect_client_credentials",
                    "error_description": "The client_id and/or client_secret passed are incorrect."}
        elif problem is not None:
            body = {"error": "bad_verification_code",
                    "error_description": "The code passed is incorrect or expired."}
        else:
            body = {"access_token": GITHUB_TOKEN, "scope": "read:user,user:email",
                    "token_type": "bearer"}
        # GitHub returns errors with HTTP 200 too, and form-encoded unless JSON is requested.
        if "application/json" in request.headers.get("accept", ""):
            return httpx.Response(200, json=body)
        return httpx.Response(200, text=urlencode(body),
                              headers={"Content-Type": "application/x-www-form-urlencoded"})

    def _authorized(self, request: httpx.Request) -> bool:
        self.api_requests.append(request)
        authorization: str = request.headers.get("authorization", "")
        return authorization == f"Bearer {GITHUB_TOKEN}"

    def _user(self, request: httpx.Request) -> httpx.Response:
        if not self._authorized(request):
            return httpx.Response(401, json={"message": "Requires authentication"})
        if self.user_response is not None:
            return self.user_response
        return httpx.Response(200, json=self.user)

    def _emails(self, request: httpx.Request) -> httpx.Response:
        if not self._authorized(request):
            return httpx.Response(401, json={"message": "Requires authentication"})
        return httpx.Response(200, json=self.emails)

    def _membership(self, request: httpx.Request, state: str | None) -> httpx.Response:
        if not self._authorized(request):
            return httpx.Response(401, json={"message": "Requires authentication"})
        if self.membership_status is not None:
            return httpx.Response(self.membership_status, json={"message": "Forbidden"})
        if state is None:
            return httpx.Response(404, json=NOT_FOUND)
        return httpx.Response(200, json={"url": str(request.url), "role": "member", "state": state})

    def _org_membership(self, request: httpx.Request) -> httpx.Response:
        org = request.url.path.rsplit("/", 1)[1]
        return self._membership(request, self.org_states.get(org))

    def _team_membership(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.split("/")
        org, slug, login = parts[-5], parts[-3], parts[-1]
        state = self.team_states.get(f"{org}/{slug}") if login == self.user.get("login") else None
        return self._membership(request, state)


# --- plain OAuth 2.0 ------------------------------------------------------------------

OAUTH2_BASE = "https://auth.crm-idp.test"
OAUTH2_TOKEN = "opaque-access-token-0001"


@dataclass
class FakeOAuth2:
    """A plain OAuth 2.0 server with its own userinfo shape and HTTP Basic client auth."""

    provider_id: str = "partner"
    userinfo: Any = field(default_factory=lambda: {"data": {
        "id": 73, "mail": "alice@example.com", "verified": True, "display_name": "Alice Example",
        "groups": ["sales", "crm-admins"],
    }})
    claims: dict[str, str] = field(default_factory=lambda: {
        "subject": "data.id", "email": "data.mail", "email_verified": "data.verified",
        "name": "data.display_name", "groups": "data.groups",
    })
    userinfo_response: httpx.Response | Exception | None = None
    server: AuthorizationServer = field(default_factory=AuthorizationServer)
    userinfo_requests: list[httpx.Request] = field(default_factory=list)

    def provider_config(self) -> dict[str, Any]:
        return {"id": self.provider_id, "type": "oauth2", "name": "Partner Portal",
                "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                "authorize_url": f"{OAUTH2_BASE}/oauth/authorize",
                "token_url": f"{OAUTH2_BASE}/oauth/token",
                "userinfo_url": f"{OAUTH2_BASE}/api/v2/me",
                "scopes": ["profile", "email"], "claims": self.claims}

    def install(self, router: respx.Router) -> None:
        router.post(f"{OAUTH2_BASE}/oauth/token").mock(side_effect=self._token)
        router.get(f"{OAUTH2_BASE}/api/v2/me").mock(side_effect=self._userinfo)

    def authorize(self, authorize_url: str) -> dict[str, str]:
        assert authorize_url.startswith(f"{OAUTH2_BASE}/oauth/authorize?")
        return self.server.issue_code(authorize_url)

    def _token(self, request: httpx.Request) -> httpx.Response:
        self.server.token_requests.append(request)
        fixed = self.server.fixed_token_response()
        if fixed is not None:
            return fixed
        client_id, secret = basic_credentials(request)
        problem = self.server.grant_problem(form_params(request), client_id, secret)
        if problem is not None:
            return httpx.Response(400 if problem == "invalid_grant" else 401,
                                  json={"error": problem})
        return httpx.Response(200, json={"access_token": OAUTH2_TOKEN, "token_type": "Bearer",
                                         "expires_in": 3600, "scope": "profile email"})

    def _userinfo(self, request: httpx.Request) -> httpx.Response:
        self.userinfo_requests.append(request)
        if request.headers.get("authorization") != f"Bearer {OAUTH2_TOKEN}":
            return httpx.Response(401, json={"error": "invalid_token"})
        if isinstance(self.userinfo_response, Exception):
            raise self.userinfo_response
        if self.userinfo_response is not None:
            return self.userinfo_response
        return httpx.Response(200, json=self.userinfo)


def basic_credentials(request: httpx.Request) -> tuple[str, str]:
    """Return the client id and secret of an RFC 6749 section 2.3.1 Basic header, or blanks."""
    header = request.headers.get("authorization", "")
    if not header.startswith("Basic "):
        return "", ""
    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    return unquote(user), unquote(password)


# --- the guard ----------------------------------------------------------------------


class OAuthHarness:
    """A guard wired to fake providers, in front of an echo app, with a browser-like client."""

    def __init__(self, guard: Guard, client: httpx.AsyncClient, router: respx.Router,
                 fakes: Sequence[FakeProvider]) -> None:
        self.guard = guard
        self.client = client
        self.router = router
        self.fakes = {fake.provider_id: fake for fake in fakes}

    async def start(self, provider_id: str, rd: str = "/deals") -> httpx.Response:
        return await self.client.get("/oauth2/start", params={"provider": provider_id, "rd": rd})

    async def sign_in(self, provider_id: str, rd: str = "/deals") -> httpx.Response:
        """Run the whole sign-in: start, the provider's approval, then the callback."""
        start = await self.start(provider_id, rd)
        assert start.status_code == 302, start.text
        callback_params = self.fakes[provider_id].authorize(start.headers["location"])
        return await self.client.get("/oauth2/callback", params=callback_params)

    async def audit(self, event: str | None = None) -> list[AuditRecord]:
        records = await self.guard.store.list_audit(AuditFilter(limit=1000))
        return [r for r in records if event is None or r.event == event]

    async def failure_reasons(self) -> list[str | None]:
        return [record.reason for record in await self.audit("login.failure")]

    async def users(self) -> list[UserRecord]:
        return await self.guard.store.list_users()


class HarnessFactory:
    """Builds harnesses for one test and closes them at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.created: list[OAuthHarness] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for harness in self.created:
            await harness.client.aclose()
            await harness.guard.shutdown()
            await harness.guard.http.aclose()

    async def create(
        self,
        *fakes: FakeProvider,
        provider: Mapping[str, Any] | None = None,
        access: Mapping[str, Any] | None = None,
    ) -> OAuthHarness:
        """Start a guard with one provider entry per fake; ``provider`` changes the first one."""
        router = respx.Router(assert_all_called=False)
        entries = []
        for index, fake in enumerate(fakes):
            fake.install(router)
            entry = fake.provider_config()
            if index == 0 and provider:
                entry.update(provider)
            entries.append({k: v for k, v in entry.items() if v is not None})
        config = guard_config(self.tmp_path, entries, access)
        http = httpx.AsyncClient(transport=httpx.MockTransport(router.handler))
        guard = Guard(settings_from_mapping(config), http_client=http)
        app = GuardMiddleware(echo_app(), guard=guard)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("127.0.0.1", 40000)),
            base_url=PUBLIC_URL,
        )
        harness = OAuthHarness(guard, client, router, fakes)
        self.created.append(harness)
        return harness


def guard_config(
    tmp_path: Path, providers: list[dict[str, Any]], access: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Return the test suite's base configuration with these provider entries."""
    config = merge(base_config(tmp_path), {"access": dict(access or {})})
    config["providers"] = providers
    return config

