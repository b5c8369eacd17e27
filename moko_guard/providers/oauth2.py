"""Plain OAuth 2.0 sign-in: the authorization code flow with PKCE (RFC 6749, RFC 7636).

Without an ID token nothing signed vouches for the person. The identity is
what the userinfo endpoint returns for the access token, so every endpoint
must be https (http only with ``insecure_allow_http_issuer``), and an email
counts as verified only when the provider's response marks it verified.

:class:`OAuth2Provider` is the ``oauth2`` type. The ``facebook`` and
``github`` types subclass it and change the endpoints, the default scopes and
how the provider's responses become an :class:`Identity`. The flow, the token
exchange, the client authentication and the role mapping stay here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal
from urllib.parse import quote, urlencode, urlsplit

import httpx

from ..config import ProviderSettings
from ..errors import ConfigError, LoginError
from ..identity import Identity
from .base import request_json, timeouts

# Column sizes of the store: a longer subject or email cannot be saved.
SUBJECT_MAX_LENGTH = 255
EMAIL_MAX_LENGTH = 320
NAME_MAX_LENGTH = 255
CLAIM_PATH_MAX_SEGMENTS = 8

IDENTITY_FIELDS = ("subject", "email", "email_verified", "name", "username", "groups")
DEFAULT_CLAIM_PATHS: Mapping[str, str] = {
    "subject": "sub",
    "email": "email",
    "email_verified": "email_verified",
    "name": "name",
    "username": "preferred_username",
    "groups": "groups",
}

AuthMethod = Literal["client_secret_basic", "client_secret_post"]

ENDPOINT_PURPOSES: Mapping[str, str] = {
    "authorize_url": "the page where the person signs in and approves the request",
    "token_url": "the endpoint that exchanges the authorization code for an access token",
    "userinfo_url": "the endpoint that returns the signed-in person as JSON",
}


@dataclass(frozen=True)
class Endpoints:
    """The three URLs of the code flow, after overrides and defaults are applied."""

    authorize_url: str
    token_url: str
    userinfo_url: str


def endpoint_problem(settings: ProviderSettings, key: str, url: str) -> str | None:
    """Return why ``url`` may not be used as the provider's ``key`` endpoint, or None."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        return f"providers \"{settings.id}\": {key} must not contain a user name or password"
    secure = parts.scheme == "https" or (
        parts.scheme == "http" and settings.insecure_allow_http_issuer
    )
    if not secure or not parts.hostname:
        return (
            f"providers \"{settings.id}\": {key} \"{url}\" must be an https URL "
            "(http only with insecure_allow_http_issuer = true, for loopback testing)"
        )
    if parts.fragment:
        return f"providers \"{settings.id}\": {key} \"{url}\" must not contain a fragment (#...)"
    return None


def login_rejected(reason: str, detail: str, *, subject: str | None) -> LoginError:
    """Build a :class:`LoginError` that names the provider account in the audit record."""
    return LoginError(reason, detail, subject=subject)


async def fetch_json(
    client: httpx.AsyncClient,
    url: str,
    *,
    provider_id: str,
    step: str,
    timeout: httpx.Timeout,
    headers: Mapping[str, str],
    accept_statuses: Collection[int] = (),
) -> tuple[int, Any]:
    """Send a GET to a provider and return the status and the JSON value of the response.

    Unlike :func:`base.request_json`, the value may be any JSON value (GitHub
    returns arrays), and a status listed in ``accept_statuses`` (a 404 that
    means "not a member") is returned instead of raised. Failures map to the
    same reason codes: ``provider_timeout``, ``provider_unreachable`` and
    ``provider_error``, with the step and the status in the detail.
    """
    # NOTE: this mirrors base.request_json's error mapping, and belongs next to it.
    try:
        response = await client.get(url, timeout=timeout, headers=dict(headers))
    except httpx.TimeoutException:
        raise LoginError("provider_timeout", f"{provider_id} {step}: timed out", status=504) from None
    except httpx.HTTPError as exc:
        raise LoginError(
            "provider_unreachable", f"{provider_id} {step}: {type(exc).__name__}", status=502
        ) from None

    if response.status_code in accept_statuses:
        return response.status_code, None
    if response.status_code >= 400:
        raise LoginError(
            "provider_error", f"{provider_id} {step}: HTTP {response.status_code}", status=502
        )
    try:
        return response.status_code, response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LoginError(
            "provider_error", f"{provider_id} {step}: response is not valid JSON", status=502
        ) from None


def claim_value(document: Any, path: str) -> Any:
    """Follow a dotted path such as ``data.emails.0.value`` through objects and arrays.

    Returns None when a step is missing. A segment of digits indexes an array.
    """
    value = document
    for segment in path.split("."):
        if isinstance(value, dict):
            value = value.get(segment)
        elif isinstance(value, list) and segment.isascii() and segment.isdigit():
            index = int(segment)
            value = value[index] if index < len(value) else None
        else:
            return None
    return value


def subject_text(value: Any) -> str | None:
    """Return a provider's account id as text: a non-empty string or an integer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def require_subject(provider_id: str, value: Any, source: str) -> str:
    """Return the account id, or raise ``subject_invalid`` when it is unusable."""
    subject = subject_text(value)
    if subject is None:
        raise LoginError(
            "subject_invalid", f"{provider_id} userinfo: no account id at {source!r}"
        )
    if len(subject) > SUBJECT_MAX_LENGTH:
        raise LoginError(
            "subject_invalid",
            f"{provider_id} userinfo: account id at {source!r} is longer than "
            f"{SUBJECT_MAX_LENGTH} characters",
        )
    return subject


def optional_text(value: Any, max_length: int) -> str | None:
    """Return ``value`` when it is a non-empty string of at most ``max_length`` characters."""
    if isinstance(value, str) and value.strip() and len(value) <= max_length:
        return value
    return None


def display_text(value: Any) -> str | None:
    """Return a non-empty string cut to the store's name length, or None."""
    if isinstance(value, str) and value.strip():
        return value[:NAME_MAX_LENGTH]
    return None


def claim_bool(value: Any) -> bool:
    # Some providers send "true" as a string. Anything else is not verified.
    return value is True or value == "true"


def claim_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(
        str(item) for item in value if isinstance(item, str | int) and not isinstance(item, bool)
    )


def claim_problems(settings: ProviderSettings) -> list[str]:
    """Check the ``claims`` table: known identity fields mapped to well-formed dotted paths."""
    problems = []
    for field, path in settings.claims.items():
        if field not in IDENTITY_FIELDS:
            problems.append(
                f"providers \"{settings.id}\": claims.{field} is not an identity field: "
                f"use one of {', '.join(IDENTITY_FIELDS)}"
            )
            continue
        segments = path.split(".")
        if not path or any(not segment.strip() for segment in segments):
            problems.append(
                f"providers \"{settings.id}\": claims.{field} \"{path}\" is not a dotted path "
                "like \"data.id\""
            )
        elif len(segments) > CLAIM_PATH_MAX_SEGMENTS:
            problems.append(
                f"providers \"{settings.id}\": claims.{field} \"{path}\" has more than "
                f"{CLAIM_PATH_MAX_SEGMENTS} segments"
            )
    return problems


class OAuth2Provider:
    """The ``oauth2`` type: code flow with PKCE, then the identity from the userinfo endpoint."""

    # Scopes requested when the provider's settings do not set ``scopes``.
    default_scopes: ClassVar[tuple[str, ...]] = ()
    # Client authentication at the token endpoint when ``token_endpoint_auth_method``
    # is not set. RFC 6749 section 2.3.1 makes HTTP Basic the one every server supports.
    default_auth_method: ClassVar[AuthMethod] = "client_secret_basic"
    # Parameters added to every authorization URL.
    extra_authorization_params: ClassVar[Mapping[str, str]] = {}
    # Settings this type never reads: setting one is a mistake, reported at start.
    unused_settings: ClassVar[tuple[str, ...]] = (
        "issuer", "hosted_domain", "tenant", "allowed_tenants", "insecure_email_from_username",
        "id_token_algorithms", "graph_version", "api_base_url", "allowed_organizations",
        "allowed_teams",
    )

    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient) -> None:
        problems = self.check_settings(settings)
        if problems:
            raise ConfigError(problems)
        self.settings = settings
        self.id = settings.id
        self.name = settings.display_name
        self.client = client
        self.timeout = timeouts(settings.connect_timeout, settings.timeout)
        self.endpoints = self.resolve_endpoints(settings)
        self.scopes = self.requested_scopes(settings)
        self.auth_method = self.token_auth_method(settings)
        self.claim_paths = {**DEFAULT_CLAIM_PATHS, **settings.claims}

    # --- settings ------------------------------------------------------------

    @classmethod
    def default_endpoints(cls, settings: ProviderSettings) -> dict[str, str | None]:
        """Return the endpoint used for each key that is not set. None makes the key required."""
        return {key: None for key in ENDPOINT_PURPOSES}

    @classmethod
    def default_scopes_for(cls, settings: ProviderSettings) -> list[str]:
        return list(cls.default_scopes)

    @classmethod
    def missing_endpoint_problem(cls, settings: ProviderSettings, key: str) -> str:
        return (
            f"providers \"{settings.id}\": type \"{settings.type}\" needs {key}, "
            f"{ENDPOINT_PURPOSES[key]}: add {key} = \"https://...\""
        )

    @classmethod
    def check_type_settings(cls, settings: ProviderSettings) -> list[str]:
        """Check the settings only this type reads. For the ``oauth2`` type that is ``claims``."""
        return claim_problems(settings)

    @classmethod
    def check_settings(cls, settings: ProviderSettings) -> list[str]:
        """Return every problem with ``settings`` for this type, as one line each."""
        problems = []
        for key in (*ENDPOINT_PURPOSES, "api_base_url"):
            value = getattr(settings, key)
            if value is not None and (problem := endpoint_problem(settings, key, value)):
                problems.append(problem)
        problems.extend(cls.check_type_settings(settings))

        defaults = cls.default_endpoints(settings)
        for key in ENDPOINT_PURPOSES:
            if getattr(settings, key) is None and defaults[key] is None:
                problems.append(cls.missing_endpoint_problem(settings, key))
        for key in cls.unused_settings:
            if key in settings.model_fields_set:
                problems.append(
                    f"providers \"{settings.id}\": {key} is not used by type "
                    f"\"{settings.type}\": remove it"
                )
        return problems

    @classmethod
    def resolve_endpoints(cls, settings: ProviderSettings) -> Endpoints:
        defaults = cls.default_endpoints(settings)
        chosen = {key: getattr(settings, key) or defaults[key] or "" for key in ENDPOINT_PURPOSES}
        return Endpoints(**chosen)

    @classmethod
    def token_auth_method(cls, settings: ProviderSettings) -> AuthMethod:
        if "token_endpoint_auth_method" in settings.model_fields_set:
            return settings.token_endpoint_auth_method
        return cls.default_auth_method

    @classmethod
    def requested_scopes(cls, settings: ProviderSettings) -> list[str]:
        # The settings model's default is the OpenID Connect scope list, which
        # means nothing to these providers: use it only when it was set on purpose.
        if "scopes" in settings.model_fields_set:
            return list(settings.scopes)
        return cls.default_scopes_for(settings)

    # --- the flow --------------------------------------------------------------

    async def ready(self) -> bool:
        """Return True: the endpoints come from the settings, so nothing has to be loaded."""
        return True

    async def authorization_url(
        self, *, state: str, nonce: str, code_challenge: str, redirect_uri: str
    ) -> str:
        # Without an ID token the nonce has nowhere to come back, so it is not sent.
        params = {
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": redirect_uri,
        }
        if self.scopes:
            params["scope"] = " ".join(self.scopes)
        params.update({
            "state": state,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
            **self.extra_authorization_params,
        })
        endpoint = self.endpoints.authorize_url
        separator = "&" if urlsplit(endpoint).query else "?"
        return f"{endpoint}{separator}{urlencode(params, quote_via=quote)}"

    async def complete(
        self, *, code: str, redirect_uri: str, code_verifier: str, nonce: str
    ) -> Identity:
        access_token = await self.exchange_code(code, redirect_uri, code_verifier)
        identity = await self.identify(access_token)
        return self.apply_role_mapping(identity)

    def _client_auth(self, form: dict[str, str]) -> dict[str, str]:
        secret = self.settings.client_secret.get() if self.settings.client_secret else ""
        if self.auth_method == "client_secret_post":
            form["client_id"] = self.settings.client_id
            form["client_secret"] = secret
            return {}
        # RFC 6749 section 2.3.1: both parts are form-urlencoded before Basic encoding.
        pair = f"{quote(self.settings.client_id, safe='')}:{quote(secret, safe='')}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode("ascii")}

    async def exchange_code(self, code: str, redirect_uri: str, code_verifier: str) -> str:
        """Exchange the authorization code for an access token and return the token."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        headers = {"Accept": "application/json", **self._client_auth(form)}
        token_response = await request_json(
            self.client, "POST", self.endpoints.token_url, provider_id=self.id, step="token",
            timeout=self.timeout, data=form, headers=headers,
        )
        return self._access_token(token_response)

    def _access_token(self, token_response: dict[str, Any]) -> str:
        error = token_response.get("error")
        if error is not None:
            # GitHub reports a failed exchange with HTTP 200 and an "error" member.
            code = error[:64] if isinstance(error, str) else type(error).__name__
            raise LoginError("provider_error", f"{self.id} token: error={code}", status=502)
        token = token_response.get("access_token")
        if not isinstance(token, str) or not token:
            raise LoginError("token_invalid", f"{self.id} token response has no access_token")
        # RFC 6749 section 7.1: the token is sent back as an RFC 6750 bearer token,
        # so a token of another type is rejected.
        token_type = token_response.get("token_type")
        if token_type is not None and str(token_type).lower() != "bearer":
            raise LoginError(
                "token_invalid", f"{self.id} token_type {str(token_type)[:32]!r} is not bearer"
            )
        return token

    def api_headers(self, access_token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {access_token}", "Accept": "application/json"}

    async def fetch_userinfo(self, access_token: str) -> dict[str, Any]:
        return await request_json(
            self.client, "GET", self.endpoints.userinfo_url, provider_id=self.id,
            step="userinfo", timeout=self.timeout, headers=self.api_headers(access_token),
        )

    async def identify(self, access_token: str) -> Identity:
        """Return the identity of the person the access token belongs to."""
        userinfo = await self.fetch_userinfo(access_token)
        return self.identity_from_userinfo(userinfo)

    def identity_from_userinfo(self, userinfo: dict[str, Any]) -> Identity:
        """Map the userinfo JSON to an :class:`Identity` through the ``claims`` paths."""
        paths = self.claim_paths
        subject = require_subject(self.id, claim_value(userinfo, paths["subject"]), paths["subject"])
        email = optional_text(claim_value(userinfo, paths["email"]), EMAIL_MAX_LENGTH)
        verified = email is not None and claim_bool(claim_value(userinfo, paths["email_verified"]))
        return Identity(
            provider=self.id,
            subject=subject,
            email=email,
            email_verified=verified,
            name=display_text(claim_value(userinfo, paths["name"])),
            username=optional_text(claim_value(userinfo, paths["username"]), NAME_MAX_LENGTH),
            groups=claim_list(claim_value(userinfo, paths["groups"])),
        )

    def apply_role_mapping(self, identity: Identity) -> Identity:
        """Grant the roles ``role_mapping`` lists for the identity's groups.

        Every role the mapping can grant is ``managed``: the policy removes such
        a role from a returning user whose groups no longer grant it.
        """
        mapping = self.settings.role_mapping
        if not mapping:
            return identity
        granted = {role for group in identity.groups for role in mapping.get(group, [])}
        managed = {role for roles in mapping.values() for role in roles}
        return replace(identity, roles=tuple(sorted(granted)), managed_roles=tuple(sorted(managed)))
