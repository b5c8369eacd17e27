"""The async store: users, provider identities, sessions and the audit log.

SQLite (the default) runs in WAL mode with a busy timeout, and this process
funnels its writes through one lock, so a write never waits on another of its
own. PostgreSQL serves several replicas. Both run the same SQL through
SQLAlchemy Core.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import delete, event, func, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..config import StoreSettings
from ..errors import StoreError
from . import schema

logger = logging.getLogger(__name__)

T = TypeVar("T")
_BUSY_RETRIES = 5


def utcnow() -> datetime:
    """Naive UTC, the form every timestamp column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


def to_utc(value: datetime) -> datetime:
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


@dataclass(frozen=True)
class UserRecord:
    id: int
    username: str
    email: str | None
    display_name: str | None
    roles: tuple[str, ...]
    disabled: bool
    created_at: datetime
    last_login_at: datetime | None


@dataclass(frozen=True)
class IdentityRecord:
    id: int
    user_id: int
    provider: str
    subject: str
    email: str | None
    created_at: datetime
    last_login_at: datetime | None


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime
    event: str
    outcome: str
    reason: str | None
    provider: str | None
    subject: str | None
    user_id: int | None
    email: str | None
    client_ip: str | None
    user_agent: str | None
    request_id: str | None
    detail: str | None

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["at"] = self.at.replace(tzinfo=UTC).isoformat()
        return data


@dataclass(frozen=True)
class AuditFilter:
    since: datetime | None = None
    until: datetime | None = None
    user_id: int | None = None
    provider: str | None = None
    outcome: str | None = None
    event: str | None = None
    limit: int = 100
    offset: int = 0


class IdentityTaken(StoreError):
    """The provider identity is already linked to another user."""

    def __init__(self, user_id: int) -> None:
        super().__init__("link_identity", "identity is linked to another user")
        self.user_id = user_id


class EmailTaken(StoreError):
    """Another user already has this email."""

    def __init__(self, user_id: int) -> None:
        super().__init__("create_user", "email belongs to another user")
        self.user_id = user_id


def _roles_to_text(roles: Sequence[str]) -> str:
    return ",".join(sorted({role.strip() for role in roles if role.strip()}))


def _user(row: Row[Any]) -> UserRecord:
    roles = tuple(r for r in (row.roles or "").split(",") if r)
    return UserRecord(
        id=row.id, username=row.username, email=row.email, display_name=row.display_name,
        roles=roles, disabled=bool(row.disabled), created_at=row.created_at,
        last_login_at=row.last_login_at,
    )


def _identity(row: Row[Any]) -> IdentityRecord:
    return IdentityRecord(
        id=row.id, user_id=row.user_id, provider=row.provider, subject=row.subject,
        email=row.email, created_at=row.created_at, last_login_at=row.last_login_at,
    )


def _short(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    return str(original).splitlines()[0][:200]


def engine_url(url: str) -> str:
    """Map the config's URL to SQLAlchemy's async driver URL."""
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "sqlite":
        return f"sqlite+aiosqlite:{rest}"
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+asyncpg:{rest}"
    raise ValueError(f"unsupported store URL scheme {scheme!r}")


class Store:
    """All reads and writes of moko_guard's own data."""

    def __init__(self, url: str, *, busy_timeout: float = 5.0, schema: str | None = None) -> None:
        self.url = url
        self.is_sqlite = url.lower().startswith("sqlite")
        self.busy_timeout = busy_timeout
        if schema is not None and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
            raise ValueError(f"schema {schema!r} is not a lower-case SQL identifier")
        self.schema = schema
        self._engine: AsyncEngine | None = None
        self._write_lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> Store:
        return cls(settings.url, busy_timeout=settings.busy_timeout, schema=settings.schema_name)

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise StoreError("open", "the store is not open")
        return self._engine

    async def open(self) -> None:
        """Connect and bring the schema to the latest version."""
        if self._engine is not None:
            return
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": self.busy_timeout}
        else:
            # No pre-ping: it costs a round trip per checkout; stale connections are
            # recycled instead.
            kwargs.update(pool_size=10, max_overflow=10, pool_recycle=1800)
            if self.schema:
                kwargs["connect_args"] = {"server_settings": {"search_path": self.schema}}
        engine = create_async_engine(engine_url(self.url), **kwargs)
        if self.is_sqlite:
            busy_ms = int(self.busy_timeout * 1000)

            @event.listens_for(engine.sync_engine, "connect")
            def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.close()

        self._engine = engine
        try:
            await self.upgrade()
        except (OperationalError, OSError) as exc:
            self._engine = None
            await engine.dispose()
            where = self.url.split("?", 1)[0] if self.is_sqlite else self.url.split("@")[-1]
            raise StoreError("open", f"cannot open the store at {where}: {_short(exc)}; "
                             "check store.url, that its folder exists and is writable, "
                             "or that the server is reachable") from None

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def upgrade(self) -> int:
        """Apply pending migrations; return the schema version now in force."""
        if not self.is_sqlite:
            return await self._migrate()
        # SQLite has no advisory lock: when another process migrates the same file at the
        # same moment, one of the two fails on "already exists" or "locked" and tries again,
        # then finds the migrations applied.
        for attempt in range(_BUSY_RETRIES):
            try:
                return await self._migrate()
            except OperationalError as exc:
                message = str(exc).lower()
                if "already exists" not in message and "locked" not in message:
                    raise
                logger.warning("store_migration_retry attempt=%d", attempt + 1)
                await asyncio.sleep(0.1 * (attempt + 1))
        return await self._migrate()

    async def _migrate(self) -> int:
        async with self._write() as conn:
            if not self.is_sqlite:
                # One migrator at a time when several replicas start together. The lock is taken
                # before CREATE SCHEMA because IF NOT EXISTS does not prevent a unique violation
                # when two sessions create the same schema at once.
                await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7201350412)")
                if self.schema:
                    await conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.run_sync(
                lambda sync: schema.schema_version.create(sync, checkfirst=True)
            )
            current = (await conn.execute(select(func.max(schema.schema_version.c.version)))).scalar()
            current = current or 0
            for version in sorted(v for v in schema.MIGRATIONS if v > current):
                await conn.run_sync(schema.MIGRATIONS[version])
                await conn.execute(
                    insert(schema.schema_version).values(version=version, applied_at=utcnow())
                )
                logger.info("store_migrated version=%d", version)
                current = version
            return int(current)

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(select(1))
        except (SQLAlchemyError, OSError, StoreError):
            return False
        return True

    # --- transactions ------------------------------------------------------

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """One short write transaction, serialised within this process on SQLite."""
        if self.is_sqlite:
            async with self._write_lock:
                async with self.engine.begin() as conn:
                    yield conn
        else:
            async with self.engine.begin() as conn:
                yield conn

    async def _retry(self, operation: str, action: Callable[[], Awaitable[T]]) -> T:
        """Run ``action``, retrying a few times while the database reports it is busy."""
        delay = 0.05
        for attempt in range(_BUSY_RETRIES):
            try:
                return await action()
            except OperationalError as exc:
                if "locked" not in str(exc).lower() and "busy" not in str(exc).lower():
                    raise StoreError(operation, type(exc.orig).__name__) from None
                logger.warning("store_busy op=%s attempt=%d", operation, attempt + 1)
                await asyncio.sleep(delay)
                delay *= 2
        logger.error("store_busy op=%s gave_up=true", operation)
        raise StoreError(operation, "database stayed busy")

    # --- users and identities ---------------------------------------------

    async def user_for_identity(self, provider: str, subject: str) -> UserRecord | None:
        query = (
            select(schema.users)
            .join(schema.identities, schema.identities.c.user_id == schema.users.c.id)
            .where(schema.identities.c.provider == provider, schema.identities.c.subject == subject)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return _user(row) if row else None

    async def user_by_email(self, email: str) -> UserRecord | None:
        query = select(schema.users).where(schema.users.c.email == email.lower())
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return _user(row) if row else None

    async def user_by_id(self, user_id: int) -> UserRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(schema.users).where(schema.users.c.id == user_id))).first()
        return _user(row) if row else None

    async def user_by_username(self, username: str) -> UserRecord | None:
        query = select(schema.users).where(schema.users.c.username == username)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return _user(row) if row else None

    async def list_users(self, limit: int = 1000, offset: int = 0) -> list[UserRecord]:
        query = select(schema.users).order_by(schema.users.c.id).limit(limit).offset(offset)
        async with self.engine.connect() as conn:
            return [_user(row) for row in await conn.execute(query)]

    async def identities_of(self, user_id: int) -> list[IdentityRecord]:
        query = (
            select(schema.identities)
            .where(schema.identities.c.user_id == user_id)
            .order_by(schema.identities.c.id)
        )
        async with self.engine.connect() as conn:
            return [_identity(row) for row in await conn.execute(query)]

    async def create_user_with_identity(
        self,
        *,
        username: str,
        email: str | None,
        display_name: str | None,
        roles: Sequence[str],
        provider: str,
        subject: str,
        identity_email: str | None,
    ) -> tuple[UserRecord, bool]:
        """Create a user and its first identity in one transaction.

        Returns ``(user, True)`` when this call created the user. When another
        request created the same identity first, returns that user with
        ``False``. Raises :class:`EmailTaken` when another user holds the email.
        """

        async def attempt() -> tuple[UserRecord, bool]:
            now = utcnow()
            try:
                async with self._write() as conn:
                    result = await conn.execute(
                        insert(schema.users).values(
                            username=username, email=email.lower() if email else None,
                            display_name=display_name, roles=_roles_to_text(roles),
                            disabled=False, created_at=now, last_login_at=now,
                        )
                    )
                    user_id = int(result.inserted_primary_key[0])
                    await conn.execute(
                        insert(schema.identities).values(
                            user_id=user_id, provider=provider, subject=subject,
                            email=identity_email, created_at=now, last_login_at=now,
                        )
                    )
            except IntegrityError:
                return await self._resolve_create_conflict(provider, subject, email)
            user = await self.user_by_id(user_id)
            if user is None:
                raise StoreError("create_user", "created user not found")
            return user, True

        return await self._retry("create_user", attempt)

    async def _resolve_create_conflict(
        self, provider: str, subject: str, email: str | None
    ) -> tuple[UserRecord, bool]:
        existing = await self.user_for_identity(provider, subject)
        if existing is not None:
            return existing, False
        if email:
            owner = await self.user_by_email(email)
            if owner is not None:
                raise EmailTaken(owner.id)
        raise StoreError("create_user", "username is already taken")

    async def link_identity(
        self, user_id: int, provider: str, subject: str, email: str | None
    ) -> IdentityRecord:
        """Link a provider identity to a user; idempotent for the same user."""

        async def attempt() -> IdentityRecord:
            now = utcnow()
            try:
                async with self._write() as conn:
                    await conn.execute(
                        insert(schema.identities).values(
                            user_id=user_id, provider=provider, subject=subject, email=email,
                            created_at=now, last_login_at=now,
                        )
                    )
            except IntegrityError:
                pass
            query = select(schema.identities).where(
                schema.identities.c.provider == provider, schema.identities.c.subject == subject
            )
            async with self.engine.connect() as conn:
                row = (await conn.execute(query)).first()
            if row is None:
                raise StoreError("link_identity", "user not found")
            if row.user_id != user_id:
                raise IdentityTaken(int(row.user_id))
            return _identity(row)

        return await self._retry("link_identity", attempt)

    async def unlink_identity(self, user_id: int, provider: str, subject: str | None = None) -> int:
        """Remove a user's identities at ``provider`` (one ``subject`` or all); return the count."""

        async def attempt() -> int:
            table = schema.identities
            query = delete(table).where(table.c.user_id == user_id, table.c.provider == provider)
            if subject is not None:
                query = query.where(table.c.subject == subject)
            async with self._write() as conn:
                result = await conn.execute(query)
                return int(result.rowcount or 0)

        return await self._retry("unlink_identity", attempt)

    async def prune_audit(self, before: datetime) -> int:
        """Delete audit rows older than ``before``; return how many."""

        async def attempt() -> int:
            async with self._write() as conn:
                result = await conn.execute(
                    delete(schema.audit_log).where(schema.audit_log.c.at < to_utc(before))
                )
                return int(result.rowcount or 0)

        return await self._retry("prune_audit", attempt)

    async def record_login(self, user_id: int, provider: str, subject: str) -> None:
        async def attempt() -> None:
            now = utcnow()
            async with self._write() as conn:
                await conn.execute(
                    update(schema.users).where(schema.users.c.id == user_id).values(last_login_at=now)
                )
                await conn.execute(
                    update(schema.identities)
                    .where(schema.identities.c.provider == provider,
                           schema.identities.c.subject == subject)
                    .values(last_login_at=now)
                )

        await self._retry("record_login", attempt)

    async def set_disabled(self, user_id: int, disabled: bool) -> bool:
        async def attempt() -> bool:
            async with self._write() as conn:
                result = await conn.execute(
                    update(schema.users).where(schema.users.c.id == user_id).values(disabled=disabled)
                )
                return bool(result.rowcount)

        return await self._retry("set_disabled", attempt)

    async def set_roles(self, user_id: int, roles: Sequence[str]) -> bool:
        async def attempt() -> bool:
            async with self._write() as conn:
                result = await conn.execute(
                    update(schema.users)
                    .where(schema.users.c.id == user_id)
                    .values(roles=_roles_to_text(roles))
                )
                return bool(result.rowcount)

        return await self._retry("set_roles", attempt)

    # --- sessions ------------------------------------------------------------

    async def create_session(
        self, *, session_id: str, user_id: int, provider: str, created_at: datetime,
        expires_at: datetime, client_ip: str | None, user_agent: str | None,
        provider_sid: str | None = None,
    ) -> None:
        async def attempt() -> None:
            async with self._write() as conn:
                await conn.execute(
                    insert(schema.sessions).values(
                        id=session_id, user_id=user_id, provider=provider,
                        created_at=to_utc(created_at), expires_at=to_utc(expires_at),
                        client_ip=client_ip, user_agent=user_agent, provider_sid=provider_sid,
                    )
                )

        await self._retry("create_session", attempt)

    async def revoke_provider_sessions(
        self, provider: str, *, user_id: int | None = None, provider_sid: str | None = None
    ) -> list[str]:
        """Revoke live sessions of one provider by user, by provider session id, or both."""
        if user_id is None and provider_sid is None:
            return []

        async def attempt() -> list[str]:
            table = schema.sessions
            now = utcnow()
            query = select(table.c.id).where(
                table.c.provider == provider, table.c.revoked_at.is_(None), table.c.expires_at > now
            )
            if user_id is not None:
                query = query.where(table.c.user_id == user_id)
            if provider_sid is not None:
                query = query.where(table.c.provider_sid == provider_sid)
            async with self._write() as conn:
                ids = [row.id for row in await conn.execute(query)]
                if ids:
                    await conn.execute(update(table).where(table.c.id.in_(ids)).values(revoked_at=now))
            return ids

        return await self._retry("revoke_provider_sessions", attempt)

    async def revoke_session(self, session_id: str) -> bool:
        async def attempt() -> bool:
            async with self._write() as conn:
                result = await conn.execute(
                    update(schema.sessions)
                    .where(schema.sessions.c.id == session_id, schema.sessions.c.revoked_at.is_(None))
                    .values(revoked_at=utcnow())
                )
                return bool(result.rowcount)

        return await self._retry("revoke_session", attempt)

    async def revoke_user_sessions(self, user_id: int) -> list[str]:
        """Revoke every live session of a user; return their ids."""

        async def attempt() -> list[str]:
            now = utcnow()
            async with self._write() as conn:
                rows = await conn.execute(
                    select(schema.sessions.c.id).where(
                        schema.sessions.c.user_id == user_id,
                        schema.sessions.c.revoked_at.is_(None),
                        schema.sessions.c.expires_at > now,
                    )
                )
                ids = [row.id for row in rows]
                if ids:
                    await conn.execute(
                        update(schema.sessions)
                        .where(schema.sessions.c.id.in_(ids))
                        .values(revoked_at=now)
                    )
                return ids

        return await self._retry("revoke_user_sessions", attempt)

    async def revoked_sessions_since(
        self, since: datetime | None
    ) -> list[tuple[str, datetime, datetime]]:
        """Return ``(id, expires_at, revoked_at)`` of unexpired sessions revoked after ``since``."""
        query = select(
            schema.sessions.c.id, schema.sessions.c.expires_at, schema.sessions.c.revoked_at
        ).where(schema.sessions.c.revoked_at.is_not(None), schema.sessions.c.expires_at > utcnow())
        if since is not None:
            query = query.where(schema.sessions.c.revoked_at >= since)
        async with self.engine.connect() as conn:
            return [(row.id, row.expires_at, row.revoked_at) for row in await conn.execute(query)]

    async def count_active_sessions(self) -> int:
        table = schema.sessions
        query = select(func.count()).select_from(table).where(
            table.c.revoked_at.is_(None), table.c.expires_at > utcnow())
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar() or 0)

    async def is_session_active(self, session_id: str) -> bool:
        query = select(schema.sessions.c.revoked_at, schema.sessions.c.expires_at).where(
            schema.sessions.c.id == session_id
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return row is not None and row.revoked_at is None and row.expires_at > utcnow()

    # --- audit log -----------------------------------------------------------

    async def add_audit(self, values: dict[str, Any]) -> None:
        async def attempt() -> None:
            async with self._write() as conn:
                await conn.execute(insert(schema.audit_log).values(**values))

        await self._retry("add_audit", attempt)

    async def list_audit(self, filters: AuditFilter) -> list[AuditRecord]:
        table = schema.audit_log
        query = select(table)
        if filters.since is not None:
            query = query.where(table.c.at >= to_utc(filters.since))
        if filters.until is not None:
            query = query.where(table.c.at < to_utc(filters.until))
        if filters.user_id is not None:
            query = query.where(table.c.user_id == filters.user_id)
        if filters.provider is not None:
            query = query.where(table.c.provider == filters.provider)
        if filters.outcome is not None:
            query = query.where(table.c.outcome == filters.outcome)
        if filters.event is not None:
            query = query.where(table.c.event == filters.event)
        query = query.order_by(table.c.at.desc(), table.c.id.desc())
        query = query.limit(filters.limit).offset(filters.offset)
        async with self.engine.connect() as conn:
            return [AuditRecord(**row._asdict()) for row in await conn.execute(query)]

    async def daily_sign_ins(self, since: datetime) -> list[tuple[str, str, int]]:
        """Return ``(day, outcome, count)`` of sign-in attempts since ``since``, by UTC day."""
        table = schema.audit_log
        day = func.date(table.c.at)
        query = (
            select(day.label("day"), table.c.outcome, func.count().label("n"))
            .where(table.c.at >= to_utc(since),
                   table.c.event.in_(("login.success", "login.failure")))
            .group_by(day, table.c.outcome)
            .order_by(day)
        )
        async with self.engine.connect() as conn:
            return [(str(row.day), row.outcome, int(row.n)) for row in await conn.execute(query)]

    async def count_audit(self, event: str | None = None) -> int:
        query = select(func.count()).select_from(schema.audit_log)
        if event is not None:
            query = query.where(schema.audit_log.c.event == event)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar() or 0)


__all__ = [
    "AuditFilter",
    "AuditRecord",
    "EmailTaken",
    "IdentityRecord",
    "IdentityTaken",
    "Store",
    "UserRecord",
    "utcnow",
]
