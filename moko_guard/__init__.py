"""moko_guard: single sign-on in front of a CRM that was never built for it."""

from __future__ import annotations

from .config import Settings, load_settings, settings_from_mapping
from .errors import ConfigError, GuardError, LoginError, StoreError
from .guard import Guard
from .identity import Identity, Principal
from .middleware import PRINCIPAL_SCOPE_KEY, GuardMiddleware
from .server import create_app

__all__ = [
    "PRINCIPAL_SCOPE_KEY",
    "ConfigError",
    "Guard",
    "GuardError",
    "GuardMiddleware",
    "Identity",
    "LoginError",
    "Principal",
    "Settings",
    "StoreError",
    "create_app",
    "load_settings",
    "settings_from_mapping",
]
