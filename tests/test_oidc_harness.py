"""Tests of the OpenID Connect provider harness against the real oidc-provider.

With the harness default (conform_id_token_claims=False) the ID token from the
code flow carries email, email_verified, name and preferred_username, and so does
the userinfo response. With conform_id_token_claims=True, the oidc-provider
default, the ID token carries only protocol claims such as sub and nonce, and the
scope claims come from the userinfo endpoint alone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import httpx
import pytest
import support.oidc_provider
from support.oidc_provider import (
    PROVIDER_DIR,
    PROVIDER_SCRIPT,
    HtmlPageParser,
    OidcProvider,
    complete_provider_login,
    free_port,
    run_oidc_provider,
)

pytestmark = pytest.mark.e2e

CLIENT_ID = "moko-guard-test"
BACKCHANNEL_CLIENT_ID = "moko-guard-test-backchannel"
CLIENT_SECRET = "moko-guard-test-secret"
SCOPE = "openid email profile"
BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"


@dataclass(frozen=True)
class AuthorizationRequest:
    url: str
    state: str
    nonce: str
    code_verifier: str


class LogoutTokenReceiver(ThreadingHTTPServer):
    """A loopback relying-party endpoint that stores back-channel logout request bodies."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _LogoutTokenHandler)
        self.requests: list[dict[str, list[str]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/backchannel-logout"


class _LogoutTokenHandler(BaseHTTPRequestHandler):
    server: LogoutTokenReceiver

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        self.server.requests.append(parse_qs(self.rfile.read(length).decode()))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def _client_metadata(redirect_uri: str, client_id: str = CLIENT_ID) -> dict[str, object]:
    return {
        "client_id": client_id,
        "client_secret": CLIENT_SECRET,
        "redirect_uris": [redirect_uri],
        "token_endpoint_auth_method": "client_secret_basic",
    }


@pytest.fixture(scope="module")
def redirect_uri() -> str:
    # Nothing listens on this port: complete_provider_login stops at the redirect.
    return f"http://127.0.0.1:{free_port()}/oauth2/callback"


@pytest.fixture(scope="module")
def logout_receiver() -> Iterator[LogoutTokenReceiver]:
    receiver = LogoutTokenReceiver()
    thread = threading.Thread(
        target=receiver.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    )
    thread.start()
    try:
        yield receiver
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def provider(redirect_uri: str, logout_receiver: LogoutTokenReceiver) -> Iterator[OidcProvider]:
    backchannel_client = _client_metadata(redirect_uri, BACKCHANNEL_CLIENT_ID)
    backchannel_client["backchannel_logout_uri"] = logout_receiver.url
    backchannel_client["backchannel_logout_session_required"] = True
    backchannel_client["post_logout_redirect_uris"] = [urljoin(redirect_uri, "/")]

    with run_oidc_provider([_client_metadata(redirect_uri), backchannel_client]) as running:
        yield running


@pytest.fixture
def http_client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as client:
        yield client


def _discovery(http_client: httpx.Client, provider: OidcProvider) -> dict[str, object]:
    response = http_client.get(provider.discovery_url)
    assert response.status_code == 200, response.text
    document: dict[str, object] = response.json()
    return document


def _build_authorization_request(
    authorization_endpoint: str, redirect_uri: str, client_id: str = CLIENT_ID
) -> AuthorizationRequest:
    state = secrets.token_urlsafe(16)
    nonce = secrets.token_urlsafe(16)
    code_verifier = secrets.token_urlsafe(48)
    code_challenge = (
        base64.urlsafe_b64encode(hashlib.sha256(code_verifier.encode()).digest())
        .rstrip(b"=")
        .decode()
    )
    query = urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": SCOPE,
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
    )
    return AuthorizationRequest(f"{authorization_endpoint}?{query}", state, nonce, code_verifier)


def _decode_jwt_part(token: str, index: int) -> dict[str, object]:
    """Decode one base64url JSON part of a compact JWT without checking the signature."""
    part = token.split(".")[index]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def _callback_parameters(callback_url: str, redirect_uri: str) -> dict[str, str]:
    parts = urlsplit(callback_url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == redirect_uri
    parameters = parse_qs(parts.query)
    assert all(len(values) == 1 for values in parameters.values()), parameters
    return {name: values[0] for name, values in parameters.items()}


def _exchange_code(
    http_client: httpx.Client,
    token_endpoint: str,
    code: str,
    redirect_uri: str,
    code_verifier: str,
    client_id: str = CLIENT_ID,
) -> httpx.Response:
    return http_client.post(
        token_endpoint,
        auth=(client_id, CLIENT_SECRET),
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        },
    )


def _log_in_and_get_tokens(
    http_client: httpx.Client,
    provider: OidcProvider,
    redirect_uri: str,
    login: str,
    client_id: str = CLIENT_ID,
) -> tuple[AuthorizationRequest, dict[str, object]]:
    discovery = _discovery(http_client, provider)
    request = _build_authorization_request(
        str(discovery["authorization_endpoint"]), redirect_uri, client_id
    )

    callback_url = complete_provider_login(http_client, request.url, login)
    parameters = _callback_parameters(callback_url, redirect_uri)
    assert "error" not in parameters, parameters
    assert parameters["state"] == request.state

    response = _exchange_code(
        http_client,
        str(discovery["token_endpoint"]),
        parameters["code"],
        redirect_uri,
        request.code_verifier,
        client_id,
    )
    assert response.status_code == 200, response.text
    tokens: dict[str, object] = response.json()
    return request, tokens


def _userinfo(
    http_client: httpx.Client, provider: OidcProvider, access_token: object
) -> dict[str, object]:
    discovery = _discovery(http_client, provider)
    response = http_client.get(
        str(discovery["userinfo_endpoint"]), headers={"Authorization": f"Bearer {access_token}"}
    )
    assert response.status_code == 200, response.text
    claims: dict[str, object] = response.json()
    return claims


def test_discovery_lists_endpoints(http_client: httpx.Client, provider: OidcProvider) -> None:
    document = _discovery(http_client, provider)

    assert provider.issuer == f"http://127.0.0.1:{provider.port}"
    assert document["issuer"] == provider.issuer
    assert document["authorization_endpoint"] == f"{provider.issuer}/auth"
    assert document["token_endpoint"] == f"{provider.issuer}/token"
    assert document["userinfo_endpoint"] == f"{provider.issuer}/me"
    assert document["jwks_uri"] == f"{provider.issuer}/jwks"
    assert document["end_session_endpoint"] == f"{provider.issuer}/session/end"
    assert document["backchannel_logout_supported"] is True
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["scopes_supported"] == ["openid", "email", "profile"]


def test_jwks_has_one_rs256_key(http_client: httpx.Client, provider: OidcProvider) -> None:
    response = http_client.get(f"{provider.issuer}/jwks")

    assert response.status_code == 200
    keys = response.json()["keys"]
    assert len(keys) == 1
    assert keys[0]["kty"] == "RSA"
    assert keys[0]["alg"] == "RS256"
    assert "d" not in keys[0]


def test_code_flow_for_alice(
    http_client: httpx.Client, provider: OidcProvider, redirect_uri: str
) -> None:
    discovery = _discovery(http_client, provider)
    request = _build_authorization_request(str(discovery["authorization_endpoint"]), redirect_uri)

    callback_url = complete_provider_login(http_client, request.url, "alice")

    parameters = _callback_parameters(callback_url, redirect_uri)
    assert parameters["state"] == request.state
    assert parameters["code"]
    # oidc-provider adds the RFC 9207 iss parameter to every authorization response.
    assert parameters["iss"] == provider.issuer

    response = _exchange_code(
        http_client,
        str(discovery["token_endpoint"]),
        parameters["code"],
        redirect_uri,
        request.code_verifier,
    )
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["token_type"] == "Bearer"
    assert tokens["scope"] == SCOPE
    assert "refresh_token" not in tokens

    id_token = tokens["id_token"]
    header = _decode_jwt_part(id_token, 0)
    payload = _decode_jwt_part(id_token, 1)
    assert header["alg"] == "RS256"
    assert payload["iss"] == provider.issuer
    assert payload["aud"] == CLIENT_ID
    assert payload["sub"] == "alice"
    assert payload["nonce"] == request.nonce
    assert payload["email"] == "alice@example.com"
    assert payload["email_verified"] is True
    assert payload["name"] == "alice"
    assert payload["preferred_username"] == "alice"
    # oidc-provider puts sid into ID tokens only for clients with a
    # backchannel_logout_uri and backchannel_logout_session_required=true.
    assert "sid" not in payload


def test_unverified_login_has_unverified_email(
    http_client: httpx.Client, provider: OidcProvider, redirect_uri: str
) -> None:
    _, tokens = _log_in_and_get_tokens(http_client, provider, redirect_uri, "unverified-bob")

    payload = _decode_jwt_part(str(tokens["id_token"]), 1)
    assert payload["sub"] == "unverified-bob"
    assert payload["email"] == "unverified-bob@example.com"
    assert payload["email_verified"] is False

    userinfo = _userinfo(http_client, provider, tokens["access_token"])
    assert userinfo["sub"] == "unverified-bob"
    assert userinfo["email_verified"] is False


def test_login_with_email_address(
    http_client: httpx.Client, provider: OidcProvider, redirect_uri: str
) -> None:
    _, tokens = _log_in_and_get_tokens(http_client, provider, redirect_uri, "carol@corp.example")

    payload = _decode_jwt_part(str(tokens["id_token"]), 1)
    assert payload["sub"] == "carol@corp.example"
    assert payload["email"] == "carol@corp.example"
    assert payload["email_verified"] is True
    assert payload["name"] == "carol"
    assert payload["preferred_username"] == "carol"


def test_second_login_reuses_provider_session(
    http_client: httpx.Client, provider: OidcProvider, redirect_uri: str
) -> None:
    _log_in_and_get_tokens(http_client, provider, redirect_uri, "alice")
    assert "_session" in http_client.cookies

    # The provider session and grant from the first login skip both forms,
    # so the login name passed here is never typed in and the subject stays alice.
    _, tokens = _log_in_and_get_tokens(http_client, provider, redirect_uri, "dave")

    payload = _decode_jwt_part(str(tokens["id_token"]), 1)
    assert payload["sub"] == "alice"


def test_backchannel_logout_after_rp_initiated_logout(
    http_client: httpx.Client,
    provider: OidcProvider,
    redirect_uri: str,
    logout_receiver: LogoutTokenReceiver,
) -> None:
    _, tokens = _log_in_and_get_tokens(
        http_client, provider, redirect_uri, "alice", BACKCHANNEL_CLIENT_ID
    )
    id_token = str(tokens["id_token"])
    sid = _decode_jwt_part(id_token, 1)["sid"]
    assert isinstance(sid, str)
    discovery = _discovery(http_client, provider)
    post_logout_redirect_uri = urljoin(redirect_uri, "/")
    logout_state = secrets.token_urlsafe(16)
    requests_before = len(logout_receiver.requests)

    logout_page = http_client.get(
        str(discovery["end_session_endpoint"]),
        params={
            "id_token_hint": id_token,
            "post_logout_redirect_uri": post_logout_redirect_uri,
            "state": logout_state,
        },
    )
    assert logout_page.status_code == 200, logout_page.text
    parser = HtmlPageParser()
    parser.feed(logout_page.text)
    parser.close()
    assert len(parser.forms) == 1, parser.text
    form = parser.forms[0]
    assert "xsrf" in form.fields

    # The "Yes, sign me out" button is <button name="logout" value="yes">, which the parser skips.
    confirm = http_client.post(
        urljoin(str(logout_page.url), form.action),
        data={**form.fields, "logout": "yes"},
        follow_redirects=False,
    )

    assert confirm.status_code == 303, confirm.text
    assert confirm.headers["location"] == f"{post_logout_redirect_uri}?state={logout_state}"
    # The provider waits for the back-channel request before it responds to the confirm POST.
    assert len(logout_receiver.requests) == requests_before + 1
    logout_token = logout_receiver.requests[-1]["logout_token"][0]
    claims = _decode_jwt_part(logout_token, 1)
    assert claims["iss"] == provider.issuer
    assert claims["aud"] == BACKCHANNEL_CLIENT_ID
    assert claims["sub"] == "alice"
    assert claims["sid"] == sid
    assert claims["events"] == {BACKCHANNEL_LOGOUT_EVENT: {}}
    assert "nonce" not in claims


def test_token_endpoint_rejects_wrong_code_verifier(
    http_client: httpx.Client, provider: OidcProvider, redirect_uri: str
) -> None:
    discovery = _discovery(http_client, provider)
    request = _build_authorization_request(str(discovery["authorization_endpoint"]), redirect_uri)
    parameters = _callback_parameters(
        complete_provider_login(http_client, request.url, "alice"), redirect_uri
    )

    response = _exchange_code(
        http_client,
        str(discovery["token_endpoint"]),
        parameters["code"],
        redirect_uri,
        secrets.token_urlsafe(48),
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_login_rejects_unknown_redirect_uri(
    http_client: httpx.Client, provider: OidcProvider
) -> None:
    discovery = _discovery(http_client, provider)
    unregistered = f"http://127.0.0.1:{free_port()}/other/callback"
    request = _build_authorization_request(str(discovery["authorization_endpoint"]), unregistered)

    with pytest.raises(AssertionError, match="redirect_uri did not match"):
        complete_provider_login(http_client, request.url, "alice")


def test_conform_mode_moves_claims_to_userinfo(
    http_client: httpx.Client, redirect_uri: str
) -> None:
    with run_oidc_provider(
        [_client_metadata(redirect_uri)], conform_id_token_claims=True
    ) as strict_provider:
        _, tokens = _log_in_and_get_tokens(
            http_client, strict_provider, redirect_uri, "unverified-erin"
        )
        userinfo = _userinfo(http_client, strict_provider, tokens["access_token"])

    payload = _decode_jwt_part(str(tokens["id_token"]), 1)
    assert payload["sub"] == "unverified-erin"
    assert "email" not in payload
    assert "email_verified" not in payload
    assert "name" not in payload

    assert userinfo["email"] == "unverified-erin@example.com"
    assert userinfo["email_verified"] is False
    assert userinfo["name"] == "unverified-erin"


def test_provider_rejects_non_loopback_urls(redirect_uri: str) -> None:
    client = _client_metadata(redirect_uri)
    client["backchannel_logout_uri"] = "http://192.0.2.10/backchannel"

    with pytest.raises(RuntimeError, match="only loopback hosts"), run_oidc_provider([client]):
        pass


def test_provider_reports_invalid_client_metadata(redirect_uri: str) -> None:
    client = _client_metadata(redirect_uri)
    del client["client_secret"]

    with (
        pytest.raises(RuntimeError, match="exited with code 2") as raised,
        run_oidc_provider([client]),
    ):
        pass

    assert "client_secret is mandatory property" in str(raised.value)


def test_missing_node_modules_names_npm_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redirect_uri: str
) -> None:
    monkeypatch.setattr(support.oidc_provider, "PROVIDER_DIR", tmp_path)

    with (
        pytest.raises(RuntimeError, match=r"run `npm ci --prefix tests/oidc`"),
        run_oidc_provider([_client_metadata(redirect_uri)]),
    ):
        pass


def test_provider_rejects_other_listen_host(redirect_uri: str) -> None:
    result = subprocess.run(
        ["node", str(PROVIDER_SCRIPT)],
        cwd=PROVIDER_DIR,
        env={
            "PATH": os.environ.get("PATH", ""),
            "OP_HOST": "0.0.0.0",
            "OP_PORT": str(free_port()),
            "OP_CLIENTS": json.dumps([_client_metadata(redirect_uri)]),
        },
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )

    assert result.returncode == 2
    assert result.stdout == ""
    assert "listens on 127.0.0.1 only" in result.stderr
