"""Provider types: each turns a provider's answers into an :class:`Identity`."""

from __future__ import annotations

import httpx

from ..config import ProviderSettings
from .base import Provider
from .oidc import OidcProvider


def build_provider(settings: ProviderSettings, client: httpx.AsyncClient) -> Provider:
    """Return the provider implementation for ``settings.type``."""
    if settings.type == "oidc":
        return OidcProvider(settings, client)
    # TODO: google, microsoft, facebook, github and oauth2 types are not built yet.
    raise NotImplementedError(f"provider type {settings.type!r} is not implemented yet")


__all__ = ["OidcProvider", "Provider", "build_provider"]
