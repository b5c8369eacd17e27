"""What a provider asserts about a person, and what a session carries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class Identity:
    """A provider's answer, in one shape for every provider type."""

    provider: str
    subject: str
    email: str | None = None
    email_verified: bool = False
    name: str | None = None
    username: str | None = None
    groups: tuple[str, ...] = ()
    # Roles the provider's role mapping grants (see ProviderSettings.role_mapping).
    roles: tuple[str, ...] = ()
    # Every role the mapping can grant, so roles it no longer grants can be removed.
    managed_roles: tuple[str, ...] = ()
    # The provider's own session id (the ID token's "sid"), for back-channel logout.
    provider_session: str | None = None
    # The reason code for a sign-in that needs an email when the provider sent none.
    missing_email_reason: str = "email_missing"

    @property
    def email_domain(self) -> str | None:
        """The part after the last ``@``, lower-cased, or None without an email."""
        if not self.email or "@" not in self.email:
            return None
        return self.email.rsplit("@", 1)[1].lower()


@dataclass(frozen=True)
class Principal:
    """The signed-in user as the session cookie carries it."""

    session_id: str
    user_id: int
    username: str
    email: str | None
    roles: tuple[str, ...]
    provider: str
    preferred_username: str | None
    issued_at: float
    expires_at: float
    # Read-only, so that the requests of one session can share the Principal.
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def to_json(self) -> dict[str, object]:
        return {
            "user": self.username,
            "user_id": self.user_id,
            "email": self.email,
            "roles": list(self.roles),
            "provider": self.provider,
            "preferred_username": self.preferred_username,
            "expires_at": int(self.expires_at),
        }
