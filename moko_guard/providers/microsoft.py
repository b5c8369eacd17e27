"""Microsoft Entra ID (work and school accounts) and personal Microsoft accounts.

Discovery uses ``{api_base_url}/{tenant}/v2.0/.well-known/openid-configuration``.
For the multi-tenant names ``common`` and ``organizations`` the discovery
document's issuer is a template, ``https://login.microsoftonline.com/{tenantid}/v2.0``.
The expected ``iss`` of each ID token is that template with the token's own
``tid`` put in, so a token whose ``iss`` and ``tid`` name different tenants is
rejected. ``allowed_tenants`` then limits which tenants may sign in.

The subject is ``<tid>:<oid>``: the object id is immutable in its tenant,
unlike the email and the user principal name, which users or tenant
administrators can change.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

from ..config import ProviderSettings
from ..errors import ConfigError, LoginError
from ..identity import Identity
from ..tokens import TokenExpectations, validate_id_token
from .base import request_json
from .oidc import OidcProvider

logger = logging.getLogger(__name__)

DEFAULT_LOGIN_BASE = "https://login.microsoftonline.com"
DEFAULT_GRAPH_BASE = "https://graph.microsoft.com"
# The tenant id of every personal Microsoft account (Outlook.com, Xbox, ...).
CONSUMERS_TENANT_ID = "9188040d-6c67-4c5b-b112-36a304b66dad"
MULTI_TENANT_NAMES = ("common", "organizations", "consumers")
TENANT_PLACEHOLDER = "{tenantid}"
# Microsoft Graph: all groups, directory roles and administrative units of the
# signed-in user, transitively. Delegated permission User.Read is enough.
MEMBER_OBJECTS_PATH = "/v1.0/me/getMemberObjects"
GRAPH_SCOPE = "User.Read"

_GUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_DOMAIN_RE = re.compile(r"([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")
# One "@", a non-empty local part without spaces or "#" (guest UPNs look like
# "alice_example.com#EXT#@contoso.onmicrosoft.com"), and a domain of labels.
_PLAIN_EMAIL_RE = re.compile(
    r"[^@\s#]+@([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)
_UNUSED_SETTINGS = (
    "hosted_domain", "authorize_url", "token_url", "issuer",
    "graph_version", "allowed_organizations", "allowed_teams", "claims",
)


def is_guid(value: object) -> bool:
    return isinstance(value, str) and _GUID_RE.fullmatch(value.lower()) is not None


def _claim_true(claims: dict[str, Any], name: str) -> bool:
    value = claims.get(name)
    return value is True or value == "true"


def _grants_member_lookup(scopes: list[str]) -> bool:
    """True when the scopes include a Graph permission that allows /me/getMemberObjects."""
    accepted = {"user.read", "user.read.all", "directory.read.all", "user.readwrite.all",
                "directory.readwrite.all"}
    for scope in scopes:
        name = scope.lower().removeprefix("https://graph.microsoft.com/")
        if name in accepted:
            return True
    return False


def _requested_scopes(settings: ProviderSettings) -> list[str]:
    """Return the scopes to request: the default ones gain User.Read when roles are mapped.

    Resolving a groups overage calls Microsoft Graph, which needs User.Read.
    Scopes set in the configuration are used as they are.
    """
    if "scopes" in settings.model_fields_set or not settings.role_mapping:
        return list(settings.scopes)
    return [*settings.scopes, GRAPH_SCOPE]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _check_base_url(settings: ProviderSettings, key: str, value: str, problems: list[str]) -> str:
    parts = urlsplit(value)
    secure = parts.scheme == "https" or (
        parts.scheme == "http" and settings.insecure_allow_http_issuer
    )
    if not secure or not parts.hostname or parts.query or parts.fragment:
        problems.append(
            f"providers \"{settings.id}\": {key} \"{value}\" is not an https URL: "
            f"use the https address of your Microsoft cloud"
        )
    return value.rstrip("/")


@dataclass(frozen=True)
class _CheckedSettings:
    tenant: str
    login_base: str
    graph_base: str
    allowed_tenants: frozenset[str]


def _unused_setting_problems(settings: ProviderSettings) -> list[str]:
    fixes = {
        "hosted_domain": "use allowed_tenants or access.allowed_email_domains instead",
        "issuer": "set tenant, and api_base_url for a national cloud, instead",
        "authorize_url": "set api_base_url for a national cloud instead",
        "token_url": "set api_base_url for a national cloud instead",
    }
    return [
        f"providers \"{settings.id}\": {key} is not used by type \"microsoft\": "
        + fixes.get(key, "remove it")
        for key in _UNUSED_SETTINGS
        if key in settings.model_fields_set
    ]


def _check_tenants(settings: ProviderSettings, problems: list[str]) -> tuple[str, frozenset[str]]:
    """Return the normalised ``tenant`` and ``allowed_tenants``, adding problems found."""
    prefix = f"providers \"{settings.id}\""
    tenant = settings.tenant.strip().lower()
    if tenant not in MULTI_TENANT_NAMES and not is_guid(tenant) and not _DOMAIN_RE.fullmatch(tenant):
        problems.append(
            f"{prefix}: tenant \"{settings.tenant}\" is not valid: use \"common\", "
            "\"organizations\", \"consumers\", a tenant id (GUID) or a verified domain "
            "like \"contoso.onmicrosoft.com\""
        )

    allowed: set[str] = set()
    for item in settings.allowed_tenants:
        if is_guid(item.strip()):
            allowed.add(item.strip().lower())
        else:
            problems.append(
                f"{prefix}: allowed_tenants entry \"{item}\" is not a tenant id: list tenant "
                f"ids (GUIDs) such as \"{CONSUMERS_TENANT_ID}\" for personal accounts"
            )

    # The one tenant a single-tenant setting admits, if any.
    pinned = None
    if tenant == "consumers":
        pinned = CONSUMERS_TENANT_ID
    elif is_guid(tenant):
        pinned = tenant
    if allowed and pinned is not None and pinned not in allowed:
        problems.append(
            f"{prefix}: tenant \"{settings.tenant}\" only signs in tenant {pinned}, which "
            "allowed_tenants does not list, so nobody could sign in: add it or empty the list"
        )
    return tenant, frozenset(allowed)


def _check_hosts(settings: ProviderSettings, problems: list[str]) -> tuple[str, str]:
    """Return the login base URL and the Microsoft Graph origin, adding problems found."""
    login_base = _check_base_url(
        settings, "api_base_url", settings.api_base_url or DEFAULT_LOGIN_BASE, problems
    )
    if urlsplit(login_base).path:
        problems.append(
            f"providers \"{settings.id}\": api_base_url \"{settings.api_base_url}\" has a path: "
            "give only the login host, like \"https://login.microsoftonline.us\""
        )
    graph_url = _check_base_url(
        settings, "userinfo_url", settings.userinfo_url or DEFAULT_GRAPH_BASE, problems
    )
    return login_base, _origin(graph_url)


def _check_settings(settings: ProviderSettings) -> _CheckedSettings:
    """Validate the settings a Microsoft provider reads; raise ConfigError listing every problem."""
    problems = _unused_setting_problems(settings)
    tenant, allowed = _check_tenants(settings, problems)
    for key, values in settings.role_mapping.items():
        if not key.strip() or not all(isinstance(v, str) and v.strip() for v in values):
            problems.append(
                f"providers \"{settings.id}\": role_mapping entry \"{key}\" needs a group id "
                "or app role value as the key and a list of non-empty role names as the value"
            )
    login_base, graph_base = _check_hosts(settings, problems)
    if problems:
        raise ConfigError(problems)
    return _CheckedSettings(tenant, login_base, graph_base, allowed)


def issuer_tenant(issuer: object, login_base: str) -> str | None:
    """Return the tenant part of a v2.0 issuer on ``login_base`` (a GUID or "{tenantid}").

    Returns None when ``issuer`` does not have the form ``{login_base}/<tenant>/v2.0``.
    """
    if not isinstance(issuer, str):
        return None
    prefix, suffix = login_base + "/", "/v2.0"
    if not issuer.startswith(prefix) or not issuer.endswith(suffix):
        return None
    tenant = issuer[len(prefix):-len(suffix)]
    if tenant == TENANT_PLACEHOLDER:
        return tenant
    if is_guid(tenant):
        return tenant.lower()
    return None


def _unverified_tenant_id(id_token: str) -> str:
    # PyJWT raises UnicodeEncodeError on a lone surrogate, which a JSON string can carry.
    if not id_token.isascii():
        raise LoginError("token_invalid", "ID token is not a compact JWS")
    try:
        claims = jwt.decode(id_token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise LoginError("token_invalid", "ID token cannot be decoded") from None
    tid = claims.get("tid") if isinstance(claims, dict) else None
    if not is_guid(tid):
        raise LoginError("token_invalid", "ID token tid is missing or not a tenant id")
    return str(tid).lower()


class MicrosoftProvider(OidcProvider):
    """Sign-in with the Microsoft identity platform (v2.0 endpoints)."""

    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient) -> None:
        checked = _check_settings(settings)
        self.tenant = checked.tenant
        self.login_base = checked.login_base
        self.graph_base = checked.graph_base
        self.allowed_tenants = checked.allowed_tenants
        self.managed_roles = tuple(sorted({r for roles in settings.role_mapping.values() for r in roles}))
        self._role_sources = {
            (key.lower() if is_guid(key) else key): tuple(roles)
            for key, roles in settings.role_mapping.items()
        }
        if settings.role_mapping and not _grants_member_lookup(_requested_scopes(settings)):
            logger.warning(
                "provider=%s role_mapping is set but scopes do not include %s: users whose "
                "groups do not fit in the token (groups overage) will be rejected",
                settings.id, GRAPH_SCOPE,
            )
        super().__init__(settings, client)

    # A property, so that settings swapped in later (Guard.apply_secrets does
    # that on a client secret change) get the same default scopes.
    @property
    def settings(self) -> ProviderSettings:
        return self._settings

    @settings.setter
    def settings(self, value: ProviderSettings) -> None:
        self._settings = value.model_copy(update={"scopes": _requested_scopes(value)})

    @property
    def issuer(self) -> str:
        """The authority URL that discovery reads; each token's issuer follows the document."""
        return f"{self.login_base}/{self.tenant}/v2.0"

    async def _load_metadata(self) -> dict[str, Any]:
        url = f"{self.issuer}/.well-known/openid-configuration"
        document = await request_json(
            self.client, "GET", url, provider_id=self.id, step="discovery", timeout=self.timeout
        )
        tenant = issuer_tenant(document.get("issuer"), self.login_base)
        if tenant is None or not self._tenant_matches_setting(tenant):
            raise LoginError(
                "provider_error",
                f"{self.id} discovery: issuer {str(document.get('issuer'))[:200]!r} does not "
                f"belong to tenant {self.tenant!r} on {self.login_base}",
            )
        # Pinning every endpoint to the login host also rules out plain http.
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = document.get(key)
            if not isinstance(value, str) or not value.startswith(self.login_base + "/"):
                raise LoginError(
                    "provider_error", f"{self.id} discovery: {key} is not on {self.login_base}"
                )
        return document

    def _tenant_matches_setting(self, issuer_part: str) -> bool:
        """Check the discovery issuer's tenant part against the ``tenant`` setting."""
        if self.tenant in ("common", "organizations"):
            return issuer_part == TENANT_PLACEHOLDER
        if self.tenant == "consumers":
            return issuer_part in (TENANT_PLACEHOLDER, CONSUMERS_TENANT_ID)
        if is_guid(self.tenant):
            return issuer_part == self.tenant
        # A domain name: the issuer names the tenant id the domain belongs to.
        return is_guid(issuer_part)

    async def _validated_claims(
        self, metadata: dict[str, Any], id_token: str, nonce: str
    ) -> dict[str, Any]:
        if self._jwks is None:
            raise LoginError("provider_unavailable", f"{self.id} keys not loaded", status=503)
        tid = _unverified_tenant_id(id_token)
        issuer = str(metadata["issuer"])
        template = issuer_tenant(issuer, self.login_base) == TENANT_PLACEHOLDER
        expected = TokenExpectations(
            issuer=issuer.replace(TENANT_PLACEHOLDER, tid) if template else issuer,
            client_id=self.settings.client_id,
            nonce=nonce,
            algorithms=self.settings.id_token_algorithms,
        )
        # validate_id_token checks the signature, so after it the tid read
        # above is the signed one and iss names the same tenant.
        claims = await validate_id_token(id_token, expected, self._jwks)
        if not template and issuer_tenant(issuer, self.login_base) != tid:
            raise LoginError("token_invalid", f"ID token tid {tid} is not the issuer's tenant")
        if self.allowed_tenants and tid not in self.allowed_tenants:
            raise LoginError(
                "tenant_not_allowed", f"{self.id}: tid={tid} is not in allowed_tenants"
            )
        return claims

    def _email(self, claims: dict[str, Any]) -> tuple[str | None, bool]:
        """Return the email and whether it counts as verified.

        Entra ID copies the ``email`` claim from the user's mail attribute,
        which tenant administrators can set to any address, so it counts as
        verified only with ``xms_edov`` (the optional claim "email domain
        owner verified") or ``email_verified``.
        """
        email = claims.get("email")
        if isinstance(email, str) and email:
            if not _PLAIN_EMAIL_RE.fullmatch(email):
                raise LoginError(
                    "malformed_email",
                    f"{self.id}: email claim is not a plain address sub={claims.get('oid')}",
                )
            if _claim_true(claims, "xms_edov") or _claim_true(claims, "email_verified"):
                return email, True
        else:
            email = None
        if self.settings.insecure_email_from_username:
            for name in ("upn", "preferred_username"):
                value = claims.get(name)
                if isinstance(value, str) and _PLAIN_EMAIL_RE.fullmatch(value):
                    return value, True
        return email, False

    async def _member_object_ids(self, access_token: str) -> list[str]:
        """Fetch the ids of the user's groups from Microsoft Graph (groups overage)."""
        if not access_token:
            raise LoginError(
                "groups_overage_unresolved", f"{self.id}: no access token for Microsoft Graph",
                status=502,
            )
        try:
            body = await request_json(
                self.client, "POST", self.graph_base + MEMBER_OBJECTS_PATH,
                provider_id=self.id, step="groups", timeout=self.timeout,
                json={"securityEnabledOnly": False},
                headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
            )
        except LoginError as exc:
            raise LoginError("groups_overage_unresolved", exc.detail, status=exc.status) from None
        values = body.get("value")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise LoginError(
                "groups_overage_unresolved", f"{self.id} groups: response has no list of ids",
                status=502,
            )
        return values

    async def _groups(self, claims: dict[str, Any], access_token: str) -> tuple[str, ...]:
        names = claims.get("_claim_names")
        if isinstance(names, dict) and "groups" in names:
            # Overage: more groups than fit in a token (200 in a JWT), so the
            # token names a source instead. Only resolve it when roles depend on it.
            if not self._role_sources:
                return ()
            ids = await self._member_object_ids(access_token)
        else:
            listed = claims.get("groups")
            ids = [g for g in listed if isinstance(g, str)] if isinstance(listed, list) else []
        return tuple(sorted({g.lower() for g in ids}))

    def _mapped_roles(self, groups: tuple[str, ...], app_roles: tuple[str, ...]) -> tuple[str, ...]:
        granted: set[str] = set()
        for source in (*groups, *app_roles):
            granted.update(self._role_sources.get(source, ()))
        return tuple(sorted(granted))

    async def complete(
        self, *, code: str, redirect_uri: str, code_verifier: str, nonce: str
    ) -> Identity:
        metadata = await self.metadata()
        tokens = await self._exchange_code(metadata, code, redirect_uri, code_verifier)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise LoginError("token_invalid", f"{self.id} token response has no id_token")
        claims = await self._validated_claims(metadata, id_token, nonce)

        oid = claims.get("oid")
        if not is_guid(oid):
            raise LoginError(
                "token_invalid", f"{self.id}: ID token has no oid: request the profile scope"
            )
        subject = f"{str(claims['tid']).lower()}:{str(oid).lower()}"
        email, email_verified = self._email(claims)

        access_token = tokens.get("access_token")
        groups = await self._groups(claims, access_token if isinstance(access_token, str) else "")
        listed_roles = claims.get("roles")
        app_roles = (
            tuple(r for r in listed_roles if isinstance(r, str))
            if isinstance(listed_roles, list) else ()
        )
        name = claims.get("name")
        username = claims.get("preferred_username")
        session = claims.get("sid")
        return Identity(
            provider=self.id,
            subject=subject,
            email=email,
            email_verified=email_verified,
            name=name if isinstance(name, str) and name else None,
            username=username if isinstance(username, str) and username else None,
            groups=groups,
            roles=self._mapped_roles(groups, app_roles),
            managed_roles=self.managed_roles,
            provider_session=session if isinstance(session, str) and session else None,
        )

