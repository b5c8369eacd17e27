"""Tests of the store on SQLite files: schema, users, identities, sessions and the audit log."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from moko_guard.audit import AuditEvent, Auditor
from moko_guard.config import AccessSettings
from moko_guard.errors import StoreError
from moko_guard.identity import Identity
from moko_guard.policy import SignInPolicy
from moko_guard.store import (
    AuditFilter,
    EmailTaken,
    IdentityTaken,
    Store,
    UserRecord,
    utcnow,
)
from moko_guard.store import schema as store_schema

pytestmark = pytest.mark.anyio

TABLES = {"moko_schema_version", "moko_users", "moko_identities", "moko_sessions",
          "moko_audit_log"}


@pytest.fixture
def database_path(tmp_path: Path) -> Path:
    return tmp_path / "guard.db"


@pytest.fixture
async def store(database_path: Path) -> AsyncIterator[Store]:
    backend = Store(f"sqlite:///{database_path}")
    await backend.open()
    yield backend
    await backend.close()


async def create_user(store: Store, name: str, provider: str = "idp",
                      subject: str | None = None) -> UserRecord:
    user, created = await store.create_user_with_identity(
        username=f"{name}@example.com", email=f"{name}@example.com", display_name=name.title(),
        roles=["user"], provider=provider, subject=subject or f"{name}-sub",
        identity_email=f"{name}@example.com",
    )
    assert created is True
    return user


async def add_session(store: Store, session_id: str, user_id: int,
                      lifetime: timedelta = timedelta(hours=8)) -> None:
    now = utcnow()
    await store.create_session(
        session_id=session_id, user_id=user_id, provider="idp", created_at=now,
        expires_at=now + lifetime, client_ip="127.0.0.1", user_agent="pytest",
    )


def read_sqlite(path: Path, query: str) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(query).fetchall()
    finally:
        connection.close()


# --- schema ------------------------------------------------------------------------


async def test_open_creates_schema(store: Store, database_path: Path) -> None:
    tables = {row[0] for row in read_sqlite(
        database_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    journal_mode = read_sqlite(database_path, "PRAGMA journal_mode")

    assert TABLES <= tables
    assert journal_mode == [("wal",)]


async def test_migrations_idempotent(database_path: Path) -> None:
    url = f"sqlite:///{database_path}"
    first = Store(url)
    await first.open()
    await first.close()
    second = Store(url)

    await second.open()
    try:
        version = await second.upgrade()
        again = await second.upgrade()
    finally:
        await second.close()

    assert version == store_schema.LATEST_VERSION
    assert again == store_schema.LATEST_VERSION
    applied = read_sqlite(database_path, "SELECT version FROM moko_schema_version ORDER BY version")
    assert applied == [(v,) for v in sorted(store_schema.MIGRATIONS)]


async def test_stores_opening_one_file_together_migrate_once(tmp_path: Path) -> None:
    """Replicas that start at the same moment on a new SQLite file each end at the latest version."""
    for round_number in range(3):
        database_path = tmp_path / f"together-{round_number}.db"
        stores = [Store(f"sqlite:///{database_path}") for _ in range(4)]
        try:
            await asyncio.gather(*(store.open() for store in stores))
            versions = [await store.upgrade() for store in stores]
        finally:
            for store in stores:
                await store.close()

        assert versions == [store_schema.LATEST_VERSION] * 4
        applied = read_sqlite(database_path,
                              "SELECT version FROM moko_schema_version ORDER BY version")
        assert applied == [(v,) for v in sorted(store_schema.MIGRATIONS)]


async def test_migration_retried_after_another_process_wrote_version(
        database_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Losing the race on the schema version's unique key means the other process migrated."""
    store = Store(f"sqlite:///{database_path}")
    await store.open()
    migrate = store._migrate
    calls = 0

    async def lose_once() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise IntegrityError("INSERT INTO moko_schema_version", {},
                                 sqlite3.IntegrityError("UNIQUE constraint failed"))
        return await migrate()

    monkeypatch.setattr(store, "_migrate", lose_once)
    try:
        with caplog.at_level("WARNING", logger="moko_guard.store"):
            version = await store.upgrade()
    finally:
        await store.close()

    assert version == store_schema.LATEST_VERSION
    assert calls == 2
    assert "store_migration_retry attempt=1" in caplog.text


async def test_closed_store_raises_store_error() -> None:
    backend = Store("sqlite:///unused.db")

    with pytest.raises(StoreError, match="the store is not open"):
        await backend.user_by_id(1)


# --- users and identities ---------------------------------------------------------------


async def test_user_found_by_identity(store: Store) -> None:
    user = await create_user(store, "ann")

    found = await store.user_for_identity("idp", "ann-sub")
    other_provider = await store.user_for_identity("github", "ann-sub")

    assert found == user
    assert found is not None
    assert found.username == "ann@example.com"
    assert found.roles == ("user",)
    assert found.disabled is False
    assert other_provider is None


async def test_identity_unique_per_provider_and_subject(store: Store, database_path: Path) -> None:
    ann = await create_user(store, "ann")

    again, created = await store.create_user_with_identity(
        username="other@example.com", email="other@example.com", display_name=None, roles=[],
        provider="idp", subject="ann-sub", identity_email=None,
    )
    same_subject_other_provider = await create_user(store, "bob", provider="github",
                                                    subject="ann-sub")

    assert created is False
    assert again.id == ann.id
    assert same_subject_other_provider.id != ann.id
    assert await store.user_by_email("other@example.com") is None
    connection = sqlite3.connect(database_path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            connection.execute(
                "INSERT INTO moko_identities (user_id, provider, subject, created_at) "
                "VALUES (?, 'idp', 'ann-sub', '2026-01-01 00:00:00')",
                (same_subject_other_provider.id,),
            )
    finally:
        connection.close()


async def test_link_identity_same_user_idempotent(store: Store) -> None:
    ann = await create_user(store, "ann")

    first = await store.link_identity(ann.id, "github", "gh-1", "ann@example.com")
    second = await store.link_identity(ann.id, "github", "gh-1", "ann@example.com")

    assert first.id == second.id
    assert second.user_id == ann.id
    identities = await store.identities_of(ann.id)
    assert [(i.provider, i.subject) for i in identities] == [("idp", "ann-sub"), ("github", "gh-1")]


async def test_link_identity_of_other_user_raises(store: Store) -> None:
    ann = await create_user(store, "ann")
    bob = await create_user(store, "bob")

    with pytest.raises(IdentityTaken) as caught:
        await store.link_identity(bob.id, "idp", "ann-sub", None)

    assert caught.value.user_id == ann.id
    assert [i.subject for i in await store.identities_of(bob.id)] == ["bob-sub"]


async def test_email_of_other_user_raises(store: Store) -> None:
    ann = await create_user(store, "ann")

    with pytest.raises(EmailTaken) as caught:
        await store.create_user_with_identity(
            username="ann-second", email="ANN@example.com", display_name=None, roles=[],
            provider="github", subject="gh-ann", identity_email="ANN@example.com",
        )

    assert caught.value.user_id == ann.id
    assert await store.user_for_identity("github", "gh-ann") is None
    assert len(await store.list_users()) == 1


async def test_concurrent_first_sign_ins_create_one_user(store: Store) -> None:
    access = AccessSettings(auto_provision=True, provision_email_domains=["example.com"])
    policy = SignInPolicy(access, store)
    identity = Identity(provider="idp", subject="carol-sub", email="carol@example.com",
                        email_verified=True, name="Carol")

    results = await asyncio.wait_for(
        asyncio.gather(*(policy.resolve(identity) for _ in range(20))), timeout=60
    )

    assert len(results) == 20
    assert {result.user.id for result in results} == {results[0].user.id}
    assert sum(result.provisioned for result in results) == 1
    users = await store.list_users()
    assert [user.username for user in users] == ["carol@example.com"]
    identities = await store.identities_of(users[0].id)
    assert [(i.provider, i.subject) for i in identities] == [("idp", "carol-sub")]


async def test_set_disabled_and_roles(store: Store) -> None:
    ann = await create_user(store, "ann")

    disabled = await store.set_disabled(ann.id, True)
    roles_set = await store.set_roles(ann.id, ["admin", " user ", "admin", ""])
    missing = await store.set_disabled(9999, True)

    updated = await store.user_by_id(ann.id)
    assert disabled is True
    assert roles_set is True
    assert missing is False
    assert updated is not None
    assert updated.disabled is True
    assert updated.roles == ("admin", "user")


# --- sessions ------------------------------------------------------------------------------


async def test_revoke_session_once(store: Store) -> None:
    ann = await create_user(store, "ann")
    await add_session(store, "s-1", ann.id)
    await add_session(store, "s-2", ann.id)

    first = await store.revoke_session("s-1")
    second = await store.revoke_session("s-1")
    unknown = await store.revoke_session("no-such-session")

    assert first is True
    assert second is False
    assert unknown is False
    assert await store.is_session_active("s-1") is False
    assert await store.is_session_active("s-2") is True
    assert await store.is_session_active("no-such-session") is False


async def test_revoke_user_sessions_only_live_ones(store: Store) -> None:
    ann = await create_user(store, "ann")
    bob = await create_user(store, "bob")
    await add_session(store, "ann-live", ann.id)
    await add_session(store, "ann-revoked", ann.id)
    await add_session(store, "ann-expired", ann.id, lifetime=timedelta(seconds=-1))
    await add_session(store, "bob-live", bob.id)
    await store.revoke_session("ann-revoked")

    ended = await store.revoke_user_sessions(ann.id)
    ended_again = await store.revoke_user_sessions(ann.id)

    assert ended == ["ann-live"]
    assert ended_again == []
    assert await store.is_session_active("ann-live") is False
    assert await store.is_session_active("ann-expired") is False
    assert await store.is_session_active("bob-live") is True


async def test_revoked_sessions_since(store: Store) -> None:
    ann = await create_user(store, "ann")
    for session_id in ("early", "late", "live"):
        await add_session(store, session_id, ann.id)
    await add_session(store, "expired", ann.id, lifetime=timedelta(seconds=-1))
    await store.revoke_session("early")
    await store.revoke_session("expired")
    await asyncio.sleep(0.01)
    cutoff = utcnow()
    await store.revoke_session("late")

    everything = await store.revoked_sessions_since(None)
    recent = await store.revoked_sessions_since(cutoff)

    assert sorted(row[0] for row in everything) == ["early", "late"]
    assert [row[0] for row in recent] == ["late"]
    session_id, expires_at, revoked_at = recent[0]
    assert revoked_at >= cutoff
    assert expires_at > revoked_at


# --- audit log ---------------------------------------------------------------------------


async def test_list_audit_filters_and_order(store: Store) -> None:
    start = utcnow().replace(microsecond=0)
    rows = [
        ("login.failure", "failure", "idp", None, 0),
        ("login.success", "success", "idp", 1, 1),
        ("login.success", "success", "github", 2, 2),
        ("sign_out", "info", "idp", 1, 3),
        ("access.denied", "failure", "github", 2, 3),
    ]
    for event, outcome, provider, user_id, seconds in rows:
        await store.add_audit({"event": event, "outcome": outcome, "provider": provider,
                               "user_id": user_id, "at": start + timedelta(seconds=seconds)})

    everything = await store.list_audit(AuditFilter())
    since = await store.list_audit(AuditFilter(since=start + timedelta(seconds=2)))
    until = await store.list_audit(AuditFilter(until=start + timedelta(seconds=2)))
    by_user = await store.list_audit(AuditFilter(user_id=1))
    by_provider = await store.list_audit(AuditFilter(provider="github"))
    failures = await store.list_audit(AuditFilter(outcome="failure"))
    by_event = await store.list_audit(AuditFilter(event="login.success"))
    page = await store.list_audit(AuditFilter(limit=2, offset=1))

    assert [r.event for r in everything] == [
        "access.denied", "sign_out", "login.success", "login.success", "login.failure"]
    assert [r.event for r in since] == ["access.denied", "sign_out", "login.success"]
    assert [r.event for r in until] == ["login.success", "login.failure"]
    assert [r.event for r in by_user] == ["sign_out", "login.success"]
    assert {r.provider for r in by_provider} == {"github"}
    assert len(by_provider) == 2
    assert [r.event for r in failures] == ["access.denied", "login.failure"]
    assert [r.provider for r in by_event] == ["github", "idp"]
    assert [r.event for r in page] == ["sign_out", "login.success"]
    assert await store.count_audit() == 5
    assert await store.count_audit("login.success") == 2


async def test_list_audit_converts_aware_times(store: Store) -> None:
    start = utcnow().replace(microsecond=0)
    await store.add_audit({"event": "sign_out", "outcome": "info", "at": start})
    plus_five = timezone(timedelta(hours=5))
    just_before = (start - timedelta(seconds=1)).replace(tzinfo=UTC).astimezone(plus_five)
    just_after = (start + timedelta(seconds=1)).replace(tzinfo=UTC).astimezone(plus_five)

    since_before = await store.list_audit(AuditFilter(since=just_before))
    since_after = await store.list_audit(AuditFilter(since=just_after))
    until_after = await store.list_audit(AuditFilter(until=just_after))

    assert [r.event for r in since_before] == ["sign_out"]
    assert since_after == []
    assert [r.event for r in until_after] == ["sign_out"]


async def test_writes_continue_during_long_read(store: Store, database_path: Path) -> None:
    auditor = Auditor(store)
    reader = sqlite3.connect(database_path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        before = reader.execute("SELECT count(*) FROM moko_audit_log").fetchone()

        await asyncio.wait_for(asyncio.gather(*(
            auditor.record(AuditEvent(event="login.failure", outcome="failure",
                                      reason="state_mismatch", request_id=f"req-{index}"))
            for index in range(30)
        )), timeout=60)

        snapshot = reader.execute("SELECT count(*) FROM moko_audit_log").fetchone()
        reader.execute("COMMIT")
    finally:
        reader.close()

    assert before == (0,)
    assert snapshot == (0,)
    assert await store.count_audit("login.failure") == 30
    records = await store.list_audit(AuditFilter(limit=100))
    assert {r.request_id for r in records} == {f"req-{index}" for index in range(30)}
