"""Facebook Login through the Graph API.

The web flow returns no ID token, so the identity comes from
``GET /{graph_version}/me?fields=id,name,email``. Every Graph call that
carries the access token also carries ``appsecret_proof``, the HMAC-SHA256 of
the token keyed with the app secret, so a token taken from elsewhere cannot
be used with this app's id. The subject is the app-scoped user id.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..config import ProviderSettings
from ..identity import Identity
from .base import request_json
from .oauth2 import (
    EMAIL_MAX_LENGTH,
    OAuth2Provider,
    display_text,
    login_rejected,
    optional_text,
    require_subject,
)

FACEBOOK_WEB = "https://www.facebook.com"
GRAPH_API = "https://graph.facebook.com"
PROFILE_FIELDS = "id,name,email"
_GRAPH_VERSION_RE = re.compile(r"^v\d{1,3}\.\d{1,3}$")


def appsecret_proof(app_secret: str, access_token: str) -> str:
    """Return the hex HMAC-SHA256 of ``access_token`` keyed with ``app_secret``."""
    return hmac.new(app_secret.encode(), access_token.encode(), hashlib.sha256).hexdigest()


class FacebookProvider(OAuth2Provider):
    """The ``facebook`` type: Facebook Login with PKCE and the Graph API ``/me`` profile."""

    # "email" lets /me return the address, "public_profile" the id and name.
    default_scopes = ("email", "public_profile")
    # Facebook's documented token request carries client_id and client_secret as parameters.
    default_auth_method = "client_secret_post"
    # Ask again for a permission the person declined last time (the email, mostly).
    extra_authorization_params: ClassVar[Mapping[str, str]] = {"auth_type": "rerequest"}
    # Facebook sends no groups, so role_mapping could only remove roles.
    unused_settings = (
        "issuer", "hosted_domain", "tenant", "allowed_tenants", "insecure_email_from_username",
        "id_token_algorithms", "api_base_url", "allowed_organizations", "allowed_teams",
        "claims", "role_mapping",
    )

    @classmethod
    def default_endpoints(cls, settings: ProviderSettings) -> dict[str, str | None]:
        version = settings.graph_version
        return {
            "authorize_url": f"{FACEBOOK_WEB}/{version}/dialog/oauth",
            "token_url": f"{GRAPH_API}/{version}/oauth/access_token",
            "userinfo_url": f"{GRAPH_API}/{version}/me?fields={PROFILE_FIELDS}",
        }

    @classmethod
    def check_type_settings(cls, settings: ProviderSettings) -> list[str]:
        if _GRAPH_VERSION_RE.fullmatch(settings.graph_version):
            return []
        problem = (
            f"providers \"{settings.id}\": graph_version \"{settings.graph_version}\" is not a "
            "Graph API version like \"v21.0\""
        )
        return [problem]

    def profile_url(self, access_token: str) -> str:
        """Return the ``/me`` URL with the profile fields and the ``appsecret_proof``."""
        parts = urlsplit(self.endpoints.userinfo_url)
        params = parse_qsl(parts.query, keep_blank_values=True)
        if not any(name == "fields" for name, _ in params):
            params.append(("fields", PROFILE_FIELDS))
        secret = self.settings.client_secret.get() if self.settings.client_secret else ""
        params.append(("appsecret_proof", appsecret_proof(secret, access_token)))
        return urlunsplit(parts._replace(query=urlencode(params, safe=",")))

    async def fetch_userinfo(self, access_token: str) -> dict[str, Any]:
        return await request_json(
            self.client, "GET", self.profile_url(access_token), provider_id=self.id,
            step="userinfo", timeout=self.timeout, headers=self.api_headers(access_token),
        )

    def identity_from_userinfo(self, userinfo: dict[str, Any]) -> Identity:
        subject = require_subject(self.id, userinfo.get("id"), "id")
        email = optional_text(userinfo.get("email"), EMAIL_MAX_LENGTH)
        return Identity(
            provider=self.id,
            subject=subject,
            email=email,
            # /me returns only an email the person has confirmed with Facebook.
            email_verified=email is not None,
            missing_email_reason="email_declined",
            name=display_text(userinfo.get("name")),
        )
