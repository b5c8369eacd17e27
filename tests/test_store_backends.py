"""One contract suite for the store, run against SQLite and PostgreSQL.

PostgreSQL is the server this machine runs on 127.0.0.1:5432 (trust auth,
database ``test``); each test works in a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import secrets
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from moko_guard.config import AccessSettings
from moko_guard.errors import LoginError, StoreError
from moko_guard.identity import Identity
from moko_guard.policy import SignInPolicy
from moko_guard.store import (
    AuditFilter,
    EmailTaken,
    IdentityTaken,
    NewUser,
    SessionRow,
    SignInConflict,
    SignInPlan,
    Store,
    utcnow,
)
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

    async with postgres_schema_store() as backend:
        yield backend


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


def sign_in_session(session_id: str) -> SessionRow:
    now = utcnow()
    return SessionRow(id=session_id, provider="idp", created_at=now,
                      expires_at=now + timedelta(hours=1), client_ip="127.0.0.1",
                      user_agent="pytest")


def sign_in_audit(event: str = "login.success") -> dict[str, Any]:
    return {"at": utcnow(), "event": event, "outcome": "success", "provider": "idp",
            "subject": "u-600", "user_id": None}


async def table_counts(store: Store) -> dict[str, int]:
    counts = {}
    async with store.engine.connect() as conn:
        for table in ("moko_users", "moko_identities", "moko_sessions", "moko_audit_log"):
            counts[table] = (await conn.exec_driver_sql(f"SELECT COUNT(*) FROM {table}")).scalar()
    return counts


NOTHING_WRITTEN = {"moko_users": 0, "moko_identities": 0, "moko_sessions": 0,
                   "moko_audit_log": 0}
NEW_USER_PLAN = SignInPlan(
    "idp", "u-600", "dora@example.com",
    new_user=NewUser(username="dora@example.com", email="Dora@Example.com", display_name="Dora",
                     roles=("user", " user", "")),
)


async def test_sign_in_writes_user_session_audit(store: Store) -> None:
    user, sealed = await store.sign_in(
        NEW_USER_PLAN, session=sign_in_session("sid-1"),
        audit=[sign_in_audit("user.provisioned"), sign_in_audit()],
        finish=lambda created: f"cookie-for-{created.id}",
    )

    assert sealed == f"cookie-for-{user.id}"
    assert user == await store.user_by_id(user.id)
    assert user == await store.user_for_identity("idp", "u-600")
    assert user.email == "dora@example.com"
    assert user.roles == ("user",)
    assert await store.is_session_active("sid-1") is True
    rows = await store.list_audit(AuditFilter(user_id=user.id))
    assert sorted(row.event for row in rows) == ["login.success", "user.provisioned"]


async def test_sign_in_records_returning_login(store: Store) -> None:
    user, _ = await store.sign_in(NEW_USER_PLAN)
    first_login = (await store.identities_of(user.id))[0].last_login_at
    returning = SignInPlan("idp", "u-600", None, user=user, roles=("sales", "user"))

    again, _ = await store.sign_in(returning, session=sign_in_session("sid-2"),
                                   audit=[sign_in_audit()])

    stored = await store.user_by_id(user.id)
    assert again.roles == ("sales", "user")
    assert stored is not None
    assert stored.roles == ("sales", "user")
    assert stored.last_login_at is not None and user.last_login_at is not None
    assert stored.last_login_at >= user.last_login_at
    assert (await store.identities_of(user.id))[0].last_login_at >= first_login
    assert await store.count_active_sessions() == 1


async def test_sign_in_failing_finish_writes_nothing(store: Store) -> None:
    def reject_user(_user: object) -> None:
        raise LoginError("session_too_large", "rejected by the test")

    with pytest.raises(LoginError):
        await store.sign_in(NEW_USER_PLAN, session=sign_in_session("sid-1"),
                            audit=[sign_in_audit()], finish=reject_user)

    assert await table_counts(store) == NOTHING_WRITTEN


async def test_sign_in_failing_last_row_writes_nothing(store: Store) -> None:
    """An audit row that breaks a NOT NULL column, after the user and session rows."""
    broken_audit = {**sign_in_audit(), "event": None}

    with pytest.raises(StoreError) as caught:
        await store.sign_in(NEW_USER_PLAN, session=sign_in_session("sid-1"),
                            audit=[sign_in_audit("user.provisioned"), broken_audit])

    assert not isinstance(caught.value, SignInConflict)
    assert caught.value.operation == "sign_in"
    assert await table_counts(store) == NOTHING_WRITTEN


async def test_sign_in_of_disabled_user_conflicts(store: Store) -> None:
    user, _ = await store.sign_in(NEW_USER_PLAN)
    await store.set_disabled(user.id, True)
    before = await table_counts(store)

    with pytest.raises(SignInConflict):
        await store.sign_in(SignInPlan("idp", "u-600", None, user=user),
                            session=sign_in_session("sid-2"), audit=[sign_in_audit()])

    assert await table_counts(store) == before


async def test_concurrent_guard_sign_ins_create_one_user(store: Store) -> None:
    """First sign-ins of one identity race, so the losers plan again and sign in as the winner."""
    policy = SignInPolicy(
        AccessSettings(auto_provision=True, provision_email_domains=["example.com"]), store
    )
    identity = Identity(provider="idp", subject="u-600", email="dora@example.com",
                        email_verified=True)
    plans: list[SignInPlan] = []

    async def write(plan: SignInPlan) -> int:
        plans.append(plan)
        events = ["user.provisioned", "login.success"] if plan.new_user else ["login.success"]
        user, _ = await store.sign_in(plan, session=sign_in_session(f"sid-{len(plans)}"),
                                      audit=[sign_in_audit(event) for event in events])
        return user.id

    user_ids = await asyncio.gather(*(policy.sign_in(identity, write) for _ in range(20)))

    assert len(set(user_ids)) == 1
    assert len(plans) > 20, "no sign-in had to plan again"
    counts = await table_counts(store)
    assert counts["moko_users"] == 1
    assert counts["moko_identities"] == 1
    assert counts["moko_sessions"] == 20
    assert await store.count_audit("user.provisioned") == 1
    assert await store.count_audit("login.success") == 20


async def test_sign_in_with_taken_email(store: Store) -> None:
    owner, _ = await store.create_user_with_identity(
        username="dora@example.com", email="dora@example.com", display_name=None, roles=[],
        provider="other", subject="o-1", identity_email=None,
    )

    with pytest.raises(EmailTaken) as caught:
        await store.sign_in(NEW_USER_PLAN, session=sign_in_session("sid-1"),
                            audit=[sign_in_audit()])

    assert caught.value.user_id == owner.id
    assert len(await store.list_users()) == 1
    assert await store.count_active_sessions() == 0


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


# --- dropped PostgreSQL connections --------------------------------------------------------


@asynccontextmanager
async def postgres_schema_store() -> AsyncIterator[Store]:
    """Open a Store on a schema of its own in the test database, and drop the schema after."""
    schema = f"moko_test_{secrets.token_hex(6)}"
    backend = Store(POSTGRES_URL, schema=schema)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()
        connection = await asyncpg.connect(POSTGRES_URL)
        try:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await connection.close()


@pytest.fixture
async def postgres_store() -> AsyncIterator[Store]:
    async with postgres_schema_store() as backend:
        yield backend


async def terminate_pooled_connections(store: Store) -> int:
    """End the server side of every connection in the store's pool, as a server restart would."""
    pool = store.engine.pool
    checked_out = [await store.engine.connect() for _ in range(pool.checkedin())]
    pids = [(await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar()
            for conn in checked_out]
    for conn in checked_out:
        await conn.close()
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        for pid in pids:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid) is True
        for _ in range(100):
            alive = await admin.fetchval(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids)
            if alive == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        await admin.close()
    return len(pids)


async def test_read_survives_dropped_connection(
    postgres_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    user, _ = await postgres_store.sign_in(NEW_USER_PLAN)
    dropped = await terminate_pooled_connections(postgres_store)

    found = await postgres_store.user_for_identity("idp", "u-600")

    assert dropped >= 1
    assert found == user
    assert any(r.getMessage().startswith("store_reconnect op=read ") for r in caplog.records)


async def test_write_survives_dropped_connection(
    postgres_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    user, _ = await postgres_store.sign_in(NEW_USER_PLAN)
    await terminate_pooled_connections(postgres_store)

    await postgres_store.sign_in(SignInPlan("idp", "u-600", None, user=user),
                                 session=sign_in_session("sid-2"), audit=[sign_in_audit()])

    assert await postgres_store.is_session_active("sid-2") is True
    assert await postgres_store.count_audit("login.success") == 1
    assert any(r.getMessage().startswith("store_reconnect op=write ") for r in caplog.records)


async def test_ping_survives_dropped_connection(postgres_store: Store) -> None:
    await terminate_pooled_connections(postgres_store)

    assert await postgres_store.ping() is True
