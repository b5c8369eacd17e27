"""One contract suite for the store, run against SQLite and PostgreSQL.

PostgreSQL is the server this machine runs on 127.0.0.1:5432 (trust auth,
database ``test``); each test works in a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from moko_guard.config import AccessSettings
from moko_guard.identity import Identity
from moko_guard.policy import SignInPolicy
from moko_guard.store import AuditFilter, IdentityTaken, Store, utcnow
from moko_guard.store.schema import LATEST_VERSION

pytestmark = pytest.mark.anyio

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        backend = Store(f"sqlite:///{tmp_path / 'contract.db'}")
        await backend.open()
        yield backend
        await backend.close()
        return

    schema = f"moko_test_{secrets.token_hex(6)}"
    backend = Store(POSTGRES_URL, schema=schema)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()
        connection = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await connection.close()


async def test_migrations_are_idempotent(store: Store) -> None:
    first = await store.upgrade()

    second = await store.upgrade()

    assert first == second == LATEST_VERSION


async def test_user_created_with_identity(store: Store) -> None:
    user, created = await store.create_user_with_identity(
        username="ann@example.com", email="Ann@Example.com", display_name="Ann", roles=["user"],
        provider="idp", subject="s-1", identity_email="Ann@Example.com",
    )

    found = await store.user_for_identity("idp", "s-1")

    assert created is True
    assert found == user
    assert user.email == "ann@example.com"
    assert await store.user_by_email("ANN@example.com") == user


async def test_identity_linked_to_one_user_only(store: Store) -> None:
    ann, _ = await store.create_user_with_identity(
        username="ann@example.com", email="ann@example.com", display_name=None, roles=[],
        provider="idp", subject="s-1", identity_email=None,
    )
    bob, _ = await store.create_user_with_identity(
        username="bob@example.com", email="bob@example.com", display_name=None, roles=[],
        provider="idp", subject="s-2", identity_email=None,
    )

    await store.link_identity(ann.id, "github", "gh-1", None)
    again = await store.link_identity(ann.id, "github", "gh-1", None)

    assert again.user_id == ann.id
    with pytest.raises(IdentityTaken):
        await store.link_identity(bob.id, "github", "gh-1", None)


async def test_concurrent_first_sign_ins_create_one_user(store: Store) -> None:
    policy = SignInPolicy(
        AccessSettings(auto_provision=True, provision_email_domains=["example.com"]), store
    )
    identity = Identity(provider="idp", subject="u-500", email="carol@example.com",
                        email_verified=True)

    results = await asyncio.gather(*(policy.resolve(identity) for _ in range(50)))

    assert len({r.user.id for r in results}) == 1
    assert sum(r.provisioned for r in results) == 1
    users = await store.list_users()
    assert len(users) == 1
    assert len(await store.identities_of(users[0].id)) == 1


async def test_session_revocation_visible_to_poll(store: Store) -> None:
    user, _ = await store.create_user_with_identity(
        username="ann@example.com", email="ann@example.com", display_name=None, roles=[],
        provider="idp", subject="s-1", identity_email=None,
    )
    now = utcnow()
    for session_id in ("a", "b"):
        await store.create_session(session_id=session_id, user_id=user.id, provider="idp",
                                   created_at=now, expires_at=now + timedelta(hours=1),
                                   client_ip=None, user_agent=None)
    before = utcnow() - timedelta(seconds=1)

    revoked = await store.revoke_user_sessions(user.id)
    rows = await store.revoked_sessions_since(before)

    assert sorted(revoked) == ["a", "b"]
    assert sorted(row[0] for row in rows) == ["a", "b"]
    assert await store.is_session_active("a") is False


async def test_audit_rows_filtered_and_ordered(store: Store) -> None:
    base = {"outcome": "failure", "provider": "idp", "reason": "state_mismatch"}
    start = utcnow()
    for offset in range(5):
        await store.add_audit({**base, "event": "login.failure",
                               "at": start + timedelta(seconds=offset)})
    await store.add_audit({**base, "event": "login.success", "outcome": "success",
                           "at": start + timedelta(seconds=10), "user_id": 7})

    failures = await store.list_audit(AuditFilter(outcome="failure"))
    window = await store.list_audit(AuditFilter(since=start + timedelta(seconds=2),
                                                until=start + timedelta(seconds=4)))
    by_user = await store.list_audit(AuditFilter(user_id=7))

    assert len(failures) == 5
    assert [r.at for r in failures] == sorted((r.at for r in failures), reverse=True)
    assert len(window) == 2
    assert [r.event for r in by_user] == ["login.success"]


async def test_version_one_database_upgraded(store: Store) -> None:
    """A database left at schema version 1 gains the provider session column."""
    async with store.engine.begin() as conn:
        await conn.exec_driver_sql("DROP INDEX IF EXISTS ix_moko_sessions_provider_sid")
        await conn.exec_driver_sql("ALTER TABLE moko_sessions DROP COLUMN provider_sid")
        await conn.exec_driver_sql("DELETE FROM moko_schema_version WHERE version > 1")

    version = await store.upgrade()
    user, _ = await store.create_user_with_identity(
        username="ann@example.com", email="ann@example.com", display_name=None, roles=[],
        provider="idp", subject="s-1", identity_email=None,
    )
    now = utcnow()
    await store.create_session(session_id="x", user_id=user.id, provider="idp", created_at=now,
                               expires_at=now + timedelta(hours=1), client_ip=None,
                               user_agent=None, provider_sid="op-sid-1")

    assert version == LATEST_VERSION
    assert await store.revoke_provider_sessions("idp", provider_sid="op-sid-1") == ["x"]
