"""GitHub and GitHub Enterprise Server sign-in through the REST API.

GitHub returns no ID token. The subject is the numeric user id from
``GET /user`` (a login can be renamed and then taken by someone else). The
email is the primary address from ``GET /user/emails``, and only when GitHub
marks it verified: the profile email is whatever the user typed, so it is
never used. Optional organization and team lists are checked through the
membership endpoints, which need the ``read:org`` scope.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from ..config import ProviderSettings
from ..errors import LoginError
from ..identity import Identity
from .oauth2 import (
    EMAIL_MAX_LENGTH,
    NAME_MAX_LENGTH,
    OAuth2Provider,
    display_text,
    fetch_json,
    login_rejected,
    optional_text,
    require_subject,
)

logger = logging.getLogger(__name__)

GITHUB_API = "https://api.github.com"
GITHUB_WEB = "https://github.com"
# GitHub Enterprise Server serves its REST API under this path of the web host.
ENTERPRISE_API_PATH = "/api/v3"
# Scopes that include read:org (write:org and admin:org grant it too).
ORG_READ_SCOPES = frozenset({"read:org", "write:org", "admin:org"})
# The maximum page size of GET /user/emails.
# NOTE: only the first page is read, so an account with more than 100 addresses
# whose primary one is on a later page signs in without an email.
EMAILS_PER_PAGE = 100

_ORG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,38}$")
_TEAM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


def web_base_for(api_base_url: str | None) -> str | None:
    """Return the web origin for a GitHub API base URL, or None when it cannot be derived.

    ``https://ghe.example.com/api/v3`` gives ``https://ghe.example.com``, and an
    ``api.`` host such as ``https://api.github.com`` gives the host without ``api.``.
    """
    if api_base_url is None:
        return GITHUB_WEB
    parts = urlsplit(api_base_url)
    path = parts.path.rstrip("/")
    if path.endswith(ENTERPRISE_API_PATH):
        return urlunsplit((parts.scheme, parts.netloc, path[: -len(ENTERPRISE_API_PATH)], "", ""))
    if parts.netloc.startswith("api.") and not path:
        return urlunsplit((parts.scheme, parts.netloc[len("api."):], "", "", ""))
    return None


class GitHubProvider(OAuth2Provider):
    """The ``github`` type: GitHub or GitHub Enterprise Server OAuth app with PKCE."""

    # GitHub's documented token request carries client_id and client_secret as parameters.
    default_auth_method = "client_secret_post"
    unused_settings = (
        "issuer", "hosted_domain", "tenant", "allowed_tenants", "insecure_email_from_username",
        "id_token_algorithms", "graph_version", "claims",
    )

    def __init__(self, settings: ProviderSettings, client: httpx.AsyncClient) -> None:
        super().__init__(settings, client)
        self.api_base = (self.settings.api_base_url or GITHUB_API).rstrip("/")

    # --- settings ------------------------------------------------------------

    @classmethod
    def default_endpoints(cls, settings: ProviderSettings) -> dict[str, str | None]:
        api = (settings.api_base_url or GITHUB_API).rstrip("/")
        web = web_base_for(settings.api_base_url)
        return {
            "authorize_url": f"{web}/login/oauth/authorize" if web else None,
            "token_url": f"{web}/login/oauth/access_token" if web else None,
            "userinfo_url": f"{api}/user",
        }

    @classmethod
    def default_scopes_for(cls, settings: ProviderSettings) -> list[str]:
        # read:user for the profile, user:email for private addresses and their
        # verified flag, read:org for the membership checks.
        scopes = ["read:user", "user:email"]
        if settings.allowed_organizations or settings.allowed_teams:
            scopes.append("read:org")
        return scopes

    @classmethod
    def missing_endpoint_problem(cls, settings: ProviderSettings, key: str) -> str:
        return (
            f"providers \"{settings.id}\": api_base_url \"{settings.api_base_url}\" does not end "
            f"in \"{ENTERPRISE_API_PATH}\", so {key} cannot be derived from it: "
            f"set {key} too (for GitHub Enterprise Server, https://HOST/login/oauth/...)"
        )

    @classmethod
    def check_type_settings(cls, settings: ProviderSettings) -> list[str]:
        problems = []
        for org in settings.allowed_organizations:
            if not _ORG_RE.fullmatch(org):
                problems.append(
                    f"providers \"{settings.id}\": allowed_organizations entry \"{org}\" is not "
                    "a GitHub organization name"
                )
        for team in settings.allowed_teams:
            if not _TEAM_RE.fullmatch(team):
                problems.append(
                    f"providers \"{settings.id}\": allowed_teams entry \"{team}\" is not "
                    "\"organization/team-slug\""
                )
        lists_set = settings.allowed_organizations or settings.allowed_teams
        explicit_scopes = "scopes" in settings.model_fields_set
        if lists_set and explicit_scopes and not ORG_READ_SCOPES & set(settings.scopes):
            problems.append(
                f"providers \"{settings.id}\": allowed_organizations or allowed_teams need the "
                "\"read:org\" scope: add it to scopes, or remove scopes to use the defaults"
            )
        return problems

    # --- API requests -------------------------------------------------------------

    def api_headers(self, access_token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {access_token}", "Accept": "application/vnd.github+json"}

    async def _get(
        self, access_token: str, path: str, step: str, accept_statuses: tuple[int, ...] = ()
    ) -> tuple[int, Any]:
        return await fetch_json(
            self.client, self.api_base + path, provider_id=self.id, step=step,
            timeout=self.timeout, headers=self.api_headers(access_token),
            accept_statuses=accept_statuses,
        )

    async def identify(self, access_token: str) -> Identity:
        user = await self.fetch_userinfo(access_token)
        subject = require_subject(self.id, user.get("id"), "id")
        login = optional_text(user.get("login"), NAME_MAX_LENGTH)
        email = await self._primary_verified_email(access_token, subject)
        groups = await self._memberships(access_token, subject, login)
        return Identity(
            provider=self.id,
            subject=subject,
            email=email,
            email_verified=email is not None,
            name=display_text(user.get("name")),
            username=login,
            groups=groups,
        )

    async def _primary_verified_email(self, access_token: str, subject: str) -> str | None:
        """Return the primary email when GitHub marks it verified, else None."""
        _, emails = await self._get(
            access_token, f"/user/emails?per_page={EMAILS_PER_PAGE}", "emails"
        )
        if not isinstance(emails, list):
            raise LoginError("provider_error", f"{self.id} emails: response is not a JSON array",
                             status=502)
        primary = next(
            (item for item in emails if isinstance(item, dict) and item.get("primary") is True),
            None,
        )
        if primary is None:
            logger.warning("github_no_primary_email provider=%s github_id=%s", self.id, subject)
            return None
        address = optional_text(primary.get("email"), EMAIL_MAX_LENGTH)
        if address is None or primary.get("verified") is not True:
            # The address is left out entirely, so it can decide no domain check and no link.
            logger.warning(
                "github_primary_email_unverified provider=%s github_id=%s", self.id, subject
            )
            return None
        return address

    async def _is_active_member(self, access_token: str, path: str, step: str) -> bool:
        status, membership = await self._get(access_token, path, step, accept_statuses=(404,))
        # GitHub returns 404 for a person who is not a member (or cannot see the team).
        if status == 404:
            return False
        if not isinstance(membership, dict):
            raise LoginError("provider_error", f"{self.id} {step}: response is not a JSON object",
                             status=502)
        # A pending invitation is not a membership.
        return membership.get("state") == "active"

    async def _memberships(
        self, access_token: str, subject: str, login: str | None
    ) -> tuple[str, ...]:
        """Check the allowed organizations and teams, and return those the person belongs to."""
        groups: list[str] = []
        organizations = self.settings.allowed_organizations
        if organizations:
            for org in organizations:
                path = f"/user/memberships/orgs/{quote(org, safe='')}"
                if await self._is_active_member(access_token, path, "organization membership"):
                    groups.append(org)
            if not groups:
                raise login_rejected(
                    "org_not_allowed",
                    f"{self.id}: GitHub user {subject} is not an active member of "
                    f"{', '.join(organizations)}",
                    subject=subject,
                )

        teams = self.settings.allowed_teams
        if teams:
            if login is None:
                raise LoginError("provider_error", f"{self.id} userinfo: no login", status=502)
            found = []
            for team in teams:
                org, slug = team.split("/", 1)
                path = (f"/orgs/{quote(org, safe='')}/teams/{quote(slug, safe='')}"
                        f"/memberships/{quote(login, safe='')}")
                if await self._is_active_member(access_token, path, "team membership"):
                    found.append(team)
            if not found:
                raise login_rejected(
                    "team_not_allowed",
                    f"{self.id}: GitHub user {subject} is not an active member of "
                    f"{', '.join(teams)}",
                    subject=subject,
                )
            groups.extend(found)
        return tuple(groups)
