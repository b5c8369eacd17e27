"""Who may sign in, and which user a provider identity maps to.

Email-based decisions only use an email the provider asserts as verified, and
compare the exact domain after the last ``@``, case-insensitively: a
``.example.com`` suffix does not admit ``evilexample.com`` or
``example.com.evil.example``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from .config import AccessSettings
from .errors import LoginError
from .identity import Identity
from .store import EmailTaken, Store, UserRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resolution:
    user: UserRecord
    provisioned: bool = False
    linked: bool = False


# One "@", a local part without spaces or control characters, and a domain of
# dot-separated ASCII labels: no empty label, so no leading, trailing or double dot.
_PLAIN_EMAIL_RE = re.compile(
    r"[^@\s\x00-\x1f\x7f]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


def _check_email_shape(identity: Identity) -> None:
    """Reject an address with a second "@", spaces, control characters or an odd domain.

    Such an address is never guessed at: "alice@example.com." is not read as
    "alice@example.com", and neither is "alice@example.com@evil.example".
    """
    if identity.email and not _PLAIN_EMAIL_RE.fullmatch(identity.email):
        raise LoginError("malformed_email", "the provider's email is not a plain address")


def verified_domain(identity: Identity) -> str | None:
    """The verified email's domain, or None when there is no verified email."""
    if not identity.email_verified:
        return None
    return identity.email_domain


def _check_email_allowed(identity: Identity, access: AccessSettings) -> None:
    if not access.allowed_email_domains:
        return
    if not identity.email:
        raise LoginError(identity.missing_email_reason, "the provider sent no email")
    if not identity.email_verified:
        raise LoginError("email_unverified", "the provider does not assert the email as verified")
    if verified_domain(identity) not in access.allowed_email_domains:
        raise LoginError("domain_not_allowed", f"email domain {identity.email_domain!r} not allowed")


def _check_user(user: UserRecord, access: AccessSettings) -> None:
    if user.disabled:
        raise LoginError("user_disabled", f"user {user.id} is disabled")
    if access.allowed_roles and not set(user.roles) & set(access.allowed_roles):
        raise LoginError("role_not_allowed", f"user {user.id} holds none of the allowed roles")


def _check_provisioning(identity: Identity, access: AccessSettings) -> str:
    if not identity.email:
        raise LoginError(identity.missing_email_reason, "the provider sent no email")
    if not identity.email_verified:
        raise LoginError("email_unverified", "the provider does not assert the email as verified")
    domain = verified_domain(identity)
    if domain not in access.provision_email_domains:
        raise LoginError("domain_not_allowed", f"email domain {domain!r} not allowed to provision")
    return identity.email.lower()


class SignInPolicy:
    def __init__(self, access: AccessSettings, store: Store) -> None:
        self.access = access
        self.store = store

    async def resolve(self, identity: Identity) -> Resolution:
        """Return the user this identity signs in as, creating or linking it when allowed."""
        _check_email_shape(identity)
        _check_email_allowed(identity, self.access)

        user = await self.store.user_for_identity(identity.provider, identity.subject)
        if user is not None:
            user = await self._sync_mapped_roles(user, identity)
            _check_user(user, self.access)
            return Resolution(user)

        if not identity.email and self.access.allow_missing_email:
            if not self.access.auto_provision:
                raise LoginError("provisioning_disabled", "no account (no email)")
            return await self._provision_without_email(identity)
        try:
            email = _check_provisioning(identity, self.access)
        except LoginError as exc:
            if self.access.auto_provision:
                raise
            raise LoginError("provisioning_disabled", f"no account ({exc.reason})") from None

        if self.access.link_by_verified_email:
            owner = await self.store.user_by_email(email)
            if owner is not None:
                return await self._link(owner, identity)

        if not self.access.auto_provision:
            raise LoginError("provisioning_disabled", "no account for this identity")
        return await self._provision(identity, email)

    async def _sync_mapped_roles(self, user: UserRecord, identity: Identity) -> UserRecord:
        """Apply the provider's role mapping: roles it manages follow the token each sign-in."""
        if not identity.managed_roles:
            return user
        kept = set(user.roles) - set(identity.managed_roles)
        wanted = sorted(kept | set(identity.roles))
        if wanted == sorted(user.roles):
            return user
        await self.store.set_roles(user.id, wanted)
        refreshed = await self.store.user_by_id(user.id)
        return refreshed or user

    async def _link(self, owner: UserRecord, identity: Identity) -> Resolution:
        owner = await self._sync_mapped_roles(owner, identity)
        _check_user(owner, self.access)
        await self.store.link_identity(owner.id, identity.provider, identity.subject, identity.email)
        return Resolution(owner, linked=True)

    async def _provision_without_email(self, identity: Identity) -> Resolution:
        roles = [*self.access.default_roles, *identity.roles]
        if self.access.allowed_roles and not set(roles) & set(self.access.allowed_roles):
            raise LoginError("role_not_allowed", "a new user would hold none of the allowed roles")
        user, created = await self.store.create_user_with_identity(
            username=f"{identity.provider}:{identity.subject}", email=None,
            display_name=identity.name, roles=roles, provider=identity.provider,
            subject=identity.subject, identity_email=None,
        )
        _check_user(user, self.access)
        return Resolution(user, provisioned=created)

    async def _provision(self, identity: Identity, email: str) -> Resolution:
        roles = [*self.access.default_roles, *identity.roles]
        # Reject before writing, so a person who may not sign in leaves no user behind.
        if self.access.allowed_roles and not set(roles) & set(self.access.allowed_roles):
            raise LoginError("role_not_allowed", "a new user would hold none of the allowed roles")
        try:
            user, created = await self.store.create_user_with_identity(
                username=email, email=email, display_name=identity.name,
                roles=roles, provider=identity.provider,
                subject=identity.subject, identity_email=identity.email,
            )
        except EmailTaken as exc:
            owner = await self.store.user_by_id(exc.user_id)
            if owner is None or not self.access.link_by_verified_email:
                raise LoginError("email_in_use", "another user holds this email") from None
            return await self._link(owner, identity)
        _check_user(user, self.access)
        return Resolution(user, provisioned=created)
