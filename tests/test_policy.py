"""Tests of the sign-in policy: email domains, provisioning, linking, disabled users, roles."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from moko_guard.config import AccessSettings
from moko_guard.errors import LoginError
from moko_guard.identity import Identity
from moko_guard.policy import Resolution, SignInPolicy
from moko_guard.store import Store, UserRecord

pytestmark = pytest.mark.anyio

# (email, reason): None when the email is accepted. The domain after the "@" must equal
# "example.com", ignoring case. An address with a second "@" or without a domain is rejected
# as malformed before any domain is compared, and so is a domain with an empty label.
DOMAIN_CASES: list[tuple[str, str | None]] = [
    ("alice@example.com", None),
    ("ALICE@EXAMPLE.COM", None),
    ("alice@Example.Com", None),
    ("alice@evilexample.com", "domain_not_allowed"),
    ("alice@example.com.evil.example", "domain_not_allowed"),
    ("alice@sub.example.com", "domain_not_allowed"),
    ("alice@example.com.", "malformed_email"),
    ("alice@evil.example@example.com", "malformed_email"),
    ("alice@example.com@evil.example", "malformed_email"),
    ("alice@", "malformed_email"),
    ("example.com", "malformed_email"),
    ("alice smith@example.com", "malformed_email"),
    ("alice\n@example.com", "malformed_email"),
]
DOMAIN_IDS = ["exact", "upper-case", "mixed-case", "suffix-without-dot", "allowed-as-prefix",
              "subdomain", "trailing-dot", "two-at-last-allowed", "two-at-last-evil",
              "no-domain", "no-at", "space", "newline"]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    backend = Store(f"sqlite:///{tmp_path / 'policy.db'}")
    await backend.open()
    yield backend
    await backend.close()


def make_policy(store: Store, **access: Any) -> SignInPolicy:
    return SignInPolicy(AccessSettings(**access), store)


def provisioning(store: Store, **access: Any) -> SignInPolicy:
    return make_policy(store, auto_provision=True, provision_email_domains=["example.com"],
                       **access)


def identity(email: str | None = "alice@example.com", *, verified: bool = True,
             provider: str = "github", subject: str = "gh-alice") -> Identity:
    return Identity(provider=provider, subject=subject, email=email, email_verified=verified,
                    name="Alice")


async def existing_user(store: Store, name: str = "alice", roles: tuple[str, ...] = ("user",),
                        *, disabled: bool = False) -> UserRecord:
    user, _ = await store.create_user_with_identity(
        username=f"{name}@example.com", email=f"{name}@example.com", display_name=name.title(),
        roles=list(roles), provider="idp", subject=f"{name}-sub",
        identity_email=f"{name}@example.com",
    )
    if disabled:
        await store.set_disabled(user.id, True)
    return user


async def rejection(policy: SignInPolicy, attempt: Identity) -> str:
    with pytest.raises(LoginError) as caught:
        await policy.resolve(attempt)
    return caught.value.reason


# --- email domains -----------------------------------------------------------------------


@pytest.mark.parametrize(("email", "reason"), DOMAIN_CASES, ids=DOMAIN_IDS)
async def test_provisioning_matches_exact_domain(
    store: Store, email: str, reason: str | None
) -> None:
    policy = provisioning(store)

    if reason is None:
        result = await policy.resolve(identity(email))

        assert result.provisioned is True
        assert result.user.email == email.lower()
        assert result.user.username == email.lower()
    else:
        rejected_reason = await rejection(policy, identity(email))

        assert rejected_reason == reason
        assert await store.list_users() == []


@pytest.mark.parametrize(("email", "reason"), DOMAIN_CASES, ids=DOMAIN_IDS)
async def test_allowed_domains_checked_for_known_user(
    store: Store, email: str, reason: str | None
) -> None:
    user = await existing_user(store)
    policy = make_policy(store, allowed_email_domains=["example.com"])
    known = identity(email, provider="idp", subject="alice-sub")

    if reason is None:
        result = await policy.resolve(known)

        assert result == Resolution(user)
    else:
        rejected_reason = await rejection(policy, known)

        assert rejected_reason == reason


async def test_allowed_domains_need_an_email(store: Store) -> None:
    await existing_user(store)
    policy = make_policy(store, allowed_email_domains=["example.com"])

    reason = await rejection(policy, identity(None, provider="idp", subject="alice-sub"))

    assert reason == "email_missing"


async def test_upper_case_domain_setting_matches(store: Store) -> None:
    policy = make_policy(store, auto_provision=True, provision_email_domains=["EXAMPLE.COM"],
                         allowed_email_domains=["Example.com"])

    result = await policy.resolve(identity("alice@example.com"))

    assert result.provisioned is True


# --- unverified and missing emails --------------------------------------------------------------


async def test_unverified_email_never_provisions(store: Store) -> None:
    policy = provisioning(store)

    reason = await rejection(policy, identity(verified=False))

    assert reason == "email_unverified"
    assert await store.list_users() == []


async def test_unverified_email_never_links(store: Store) -> None:
    user = await existing_user(store)

    provisioning_reason = await rejection(provisioning(store), identity(verified=False))
    plain_reason = await rejection(make_policy(store, provision_email_domains=["example.com"]),
                                   identity(verified=False))

    assert provisioning_reason == "email_unverified"
    assert plain_reason == "provisioning_disabled"
    assert await store.user_for_identity("github", "gh-alice") is None
    assert [i.provider for i in await store.identities_of(user.id)] == ["idp"]


async def test_unverified_email_rejected_by_allowed_domains(store: Store) -> None:
    await existing_user(store)
    policy = make_policy(store, allowed_email_domains=["example.com"])

    reason = await rejection(policy, identity(verified=False, provider="idp", subject="alice-sub"))

    assert reason == "email_unverified"


async def test_missing_email_never_provisions(store: Store) -> None:
    reason = await rejection(provisioning(store), identity(None))

    assert reason == "email_missing"
    assert await store.list_users() == []


async def test_known_identity_signs_in_without_email(store: Store) -> None:
    user = await existing_user(store)

    result = await make_policy(store).resolve(identity(None, provider="idp", subject="alice-sub"))

    assert result == Resolution(user)


async def test_unknown_identity_without_provisioning(store: Store) -> None:
    policy = make_policy(store, provision_email_domains=["example.com"])

    reason = await rejection(policy, identity())

    assert reason == "provisioning_disabled"
    assert await store.list_users() == []


# --- linking by verified email -------------------------------------------------------------


@pytest.mark.parametrize(
    "auto_provision", [True, False], ids=["provisioning-on", "provisioning-off"]
)
async def test_verified_email_links_existing_user(store: Store, auto_provision: bool) -> None:
    user = await existing_user(store)
    policy = make_policy(store, auto_provision=auto_provision,
                         provision_email_domains=["example.com"])

    result = await policy.resolve(identity("Alice@Example.com"))

    assert result.linked is True
    assert result.provisioned is False
    assert result.user.id == user.id
    identities = await store.identities_of(user.id)
    assert [(i.provider, i.subject) for i in identities] == [("idp", "alice-sub"),
                                                           ("github", "gh-alice")]
    assert len(await store.list_users()) == 1


async def test_linked_identity_signs_in_directly(store: Store) -> None:
    user = await existing_user(store)
    policy = provisioning(store)
    await policy.resolve(identity())

    again = await policy.resolve(identity())

    assert again == Resolution(user)


async def test_linking_needs_provisioning_domain(store: Store) -> None:
    user = await existing_user(store)
    policy = make_policy(store, allowed_email_domains=["example.com"])

    reason = await rejection(policy, identity())

    assert reason == "provisioning_disabled"
    assert [i.provider for i in await store.identities_of(user.id)] == ["idp"]


async def test_linking_off_reports_email_in_use(store: Store) -> None:
    user = await existing_user(store)
    policy = provisioning(store, link_by_verified_email=False)

    reason = await rejection(policy, identity())

    assert reason == "email_in_use"
    assert await store.user_for_identity("github", "gh-alice") is None
    assert [i.provider for i in await store.identities_of(user.id)] == ["idp"]
    assert len(await store.list_users()) == 1


async def test_linking_off_without_provisioning(store: Store) -> None:
    user = await existing_user(store)
    policy = make_policy(store, provision_email_domains=["example.com"],
                         link_by_verified_email=False)

    reason = await rejection(policy, identity())

    assert reason == "provisioning_disabled"
    assert [i.provider for i in await store.identities_of(user.id)] == ["idp"]


# --- disabled users and roles ----------------------------------------------------------------


async def test_disabled_user_rejected(store: Store) -> None:
    await existing_user(store, disabled=True)

    reason = await rejection(provisioning(store), identity(provider="idp", subject="alice-sub"))

    assert reason == "user_disabled"


async def test_disabled_user_not_linked(store: Store) -> None:
    user = await existing_user(store, disabled=True)

    reason = await rejection(provisioning(store), identity())

    assert reason == "user_disabled"
    assert [i.provider for i in await store.identities_of(user.id)] == ["idp"]


@pytest.mark.parametrize(
    ("roles", "allowed_roles", "accepted"),
    [
        (("user",), ["admin"], False),
        (("user", "admin"), ["admin"], True),
        (("sales",), ["admin", "sales"], True),
        ((), ["admin"], False),
        ((), [], True),
    ],
    ids=["missing-role", "has-role", "one-of-several", "no-roles", "no-rule"],
)
async def test_allowed_roles(
    store: Store, roles: tuple[str, ...], allowed_roles: list[str], accepted: bool
) -> None:
    user = await existing_user(store, roles=roles)
    policy = make_policy(store, allowed_roles=allowed_roles)
    known = identity(provider="idp", subject="alice-sub")

    if accepted:
        result = await policy.resolve(known)

        assert result.user.id == user.id
    else:
        reason = await rejection(policy, known)

        assert reason == "role_not_allowed"


async def test_allowed_roles_apply_to_new_users(store: Store) -> None:
    policy = provisioning(store, default_roles=["user"], allowed_roles=["admin"])

    reason = await rejection(policy, identity())

    assert reason == "role_not_allowed"
    assert await store.list_users() == []


async def test_mapped_roles_replace_managed_roles(store: Store) -> None:
    user = await existing_user(store, roles=("user", "crm-admin"))
    mapped = Identity(provider="idp", subject="alice-sub", email="alice@example.com",
                      email_verified=True, roles=("crm-sales",),
                      managed_roles=("crm-admin", "crm-sales"))

    result = await make_policy(store).resolve(mapped)

    assert result.user.id == user.id
    assert result.user.roles == ("crm-sales", "user")
