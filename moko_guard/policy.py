"""Who may sign in, and which user a provider identity maps to.

Email-based decisions only use an email the provider asserts as verified, and
compare the exact domain after the last ``@``, case-insensitively: a
``.example.com`` suffix does not admit ``evilexample.com`` or
``example.com.evil.example``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from .config import AccessSettings
from .errors import LoginError
from .identity import Identity
from .store import (
    EmailTaken,
    NewUser,
    SignInConflict,
    SignInPlan,
    Store,
    UserRecord,
    normalise_roles,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Plans per sign-in: a plan is made again only when a concurrent request wrote first.
_PLAN_ATTEMPTS = 3


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

        async def write(plan: SignInPlan) -> Resolution:
            if plan.user is not None and not plan.link and plan.roles is None:
                # A known identity whose roles stay the same needs no write.
                return Resolution(plan.user)
            user, _ = await self.store.sign_in(plan, record_login=False)
            return Resolution(user, provisioned=plan.new_user is not None, linked=plan.link)

        return await self.sign_in(identity, write)

    async def sign_in(self, identity: Identity, write: Callable[[SignInPlan], Awaitable[T]]) -> T:
        """Plan the sign-in of ``identity`` and return what ``write`` returns for the plan.

        ``write`` should apply the plan in one transaction (``Store.sign_in``).
        When a concurrent request changed the store after the plan was read, the
        write fails with nothing written, and the sign-in is planned again from
        fresh reads, up to three times. Raises :class:`LoginError` when the
        identity may not sign in.
        """
        for attempt in range(1, _PLAN_ATTEMPTS + 1):
            plan = await self.plan(identity)
            try:
                return await write(plan)
            except SignInConflict as exc:
                if attempt == _PLAN_ATTEMPTS:
                    raise
                logger.info("sign_in_planned_again provider=%s attempt=%d detail=%s",
                            identity.provider, attempt, exc.detail)
            except EmailTaken:
                if not self.access.link_by_verified_email or attempt == _PLAN_ATTEMPTS:
                    raise LoginError("email_in_use", "the email belongs to another user") from None
                # The next plan finds the email's owner and links the identity to it.
                logger.info("sign_in_planned_again provider=%s attempt=%d detail=email_taken",
                            identity.provider, attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def plan(self, identity: Identity) -> SignInPlan:
        """Decide, from reads only, which user ``identity`` signs in as and what must be written.

        Raises :class:`LoginError` when the identity may not sign in.
        """
        _check_email_shape(identity)
        _check_email_allowed(identity, self.access)

        user = await self.store.user_for_identity(identity.provider, identity.subject)
        if user is not None:
            return self._existing_user(user, identity, link=False)

        if not identity.email and self.access.allow_missing_email:
            if not self.access.auto_provision:
                raise LoginError("provisioning_disabled", "no account (no email)")
            return self._new_user(identity, f"{identity.provider}:{identity.subject}", None)
        try:
            email = _check_provisioning(identity, self.access)
        except LoginError as exc:
            if self.access.auto_provision:
                raise
            raise LoginError("provisioning_disabled", f"no account ({exc.reason})") from None

        if self.access.link_by_verified_email:
            owner = await self.store.user_by_email(email)
            if owner is not None:
                return self._existing_user(owner, identity, link=True)

        if not self.access.auto_provision:
            raise LoginError("provisioning_disabled", "no account for this identity")
        return self._new_user(identity, email, email)

    def _existing_user(self, user: UserRecord, identity: Identity, *, link: bool) -> SignInPlan:
        """Plan a sign-in as ``user``, after the role mapping, or raise when the user may not."""
        roles = _mapped_roles(user, identity)
        _check_user(replace(user, roles=normalise_roles(roles)) if roles is not None else user,
                    self.access)
        return SignInPlan(identity.provider, identity.subject, identity.email, user=user,
                          link=link, roles=roles)

    def _new_user(self, identity: Identity, username: str, email: str | None) -> SignInPlan:
        roles = (*self.access.default_roles, *identity.roles)
        # Reject before writing, so a person who may not sign in leaves no user behind.
        if self.access.allowed_roles and not set(roles) & set(self.access.allowed_roles):
            raise LoginError("role_not_allowed", "a new user would hold none of the allowed roles")
        new_user = NewUser(username=username, email=email, display_name=identity.name, roles=roles)
        return SignInPlan(identity.provider, identity.subject, identity.email, new_user=new_user)


def _mapped_roles(user: UserRecord, identity: Identity) -> tuple[str, ...] | None:
    """Return the user's roles after the provider's role mapping, or None when they stay.

    The roles the mapping manages follow the token at each sign-in, and the others stay.
    """
    if not identity.managed_roles:
        return None
    unmanaged = set(user.roles) - set(identity.managed_roles)
    mapped = tuple(sorted(unmanaged | set(identity.roles)))
    if mapped == tuple(sorted(user.roles)):
        return None
    return mapped
