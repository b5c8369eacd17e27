"""Provider types: each turns a provider's answers into an :class:`Identity`."""

from __future__ import annotations

import httpx

from ..config import ProviderSettings
from .base import Provider
from .facebook import FacebookProvider
from .github import GitHubProvider
from .google import GoogleProvider
from .microsoft import MicrosoftProvider
from .oauth2 import OAuth2Provider
from .oidc import OidcProvider


def build_provider(settings: ProviderSettings, client: httpx.AsyncClient) -> Provider:
    """Return the provider implementation for ``settings.type``."""
    if settings.type == "oidc":
        return OidcProvider(settings, client)
    if settings.type == "facebook":
        return FacebookProvider(settings, client)
    if settings.type == "github":
        return GitHubProvider(settings, client)
    if settings.type == "oauth2":
        return OAuth2Provider(settings, client)
    if settings.type == "google":
        return GoogleProvider(settings, client)
    if settings.type == "microsoft":
        return MicrosoftProvider(settings, client)
    raise NotImplementedError(f"provider type {settings.type!r} is not implemented yet")


__all__ = [
    "FacebookProvider",
    "GitHubProvider",
    "GoogleProvider",
    "MicrosoftProvider",
    "OAuth2Provider",
    "OidcProvider",
    "Provider",
    "build_provider",
]
