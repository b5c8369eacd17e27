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
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.sql import Executable
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
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


class SignInConflict(StoreError):
    """A concurrent request changed the rows a sign-in was planned on; nothing was written."""

    def __init__(self, detail: str) -> None:
        super().__init__("sign_in", detail)


@dataclass(frozen=True)
class NewUser:
    """A user that a sign-in creates together with its first identity."""

    username: str
    email: str | None
    display_name: str | None
    roles: tuple[str, ...]


@dataclass(frozen=True)
class SignInPlan:
    """The user side of one sign-in, decided from reads before the write.

    Exactly one of ``user`` (an existing user) and ``new_user`` is set. ``link``
    adds the identity to the existing user, and ``roles`` replaces that user's
    roles (the provider's role mapping).
    """

    provider: str
    subject: str
    identity_email: str | None
    user: UserRecord | None = None
    new_user: NewUser | None = None
    link: bool = False
    roles: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SessionRow:
    """A session row to insert. Its user is the one the sign-in resolves to."""

    id: str
    provider: str
    created_at: datetime
    expires_at: datetime
    client_ip: str | None
    user_agent: str | None
    provider_sid: str | None = None


def _roles_to_text(roles: Sequence[str]) -> str:
    return ",".join(sorted({role.strip() for role in roles if role.strip()}))


def normalise_roles(roles: Sequence[str]) -> tuple[str, ...]:
    """Return roles as the store keeps them: stripped, without blanks or repeats, sorted."""
    return tuple(role for role in _roles_to_text(roles).split(",") if role)


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


def _write_sign_in_user(conn: Connection, plan: SignInPlan, now: datetime,
                        record_login: bool) -> UserRecord:
    """Create or update the user side of a sign-in inside ``conn``'s transaction."""
    identity_values = {"provider": plan.provider, "subject": plan.subject,
                       "email": plan.identity_email, "created_at": now, "last_login_at": now}
    new = plan.new_user
    if new is not None:
        email = new.email.lower() if new.email else None
        roles = normalise_roles(new.roles)
        result = conn.execute(insert(schema.users), {
            "username": new.username, "email": email, "display_name": new.display_name,
            "roles": ",".join(roles), "disabled": False, "created_at": now, "last_login_at": now,
        })
        user_id = int(result.inserted_primary_key[0])
        conn.execute(insert(schema.identities), {**identity_values, "user_id": user_id})
        return UserRecord(id=user_id, username=new.username, email=email,
                          display_name=new.display_name, roles=roles, disabled=False,
                          created_at=now, last_login_at=now)

    user = plan.user
    if user is None:
        raise ValueError("a sign-in plan needs user or new_user")
    users = schema.users
    changes: dict[str, Any] = {}
    if plan.roles is not None:
        user = replace(user, roles=normalise_roles(plan.roles))
        changes["roles"] = ",".join(user.roles)
    if record_login:
        changes["last_login_at"] = now
    if changes:
        # A user disabled or deleted since the plan was read matches no row, so the caller
        # plans the sign-in again.
        updated = conn.execute(
            update(users)
            .where(users.c.id == user.id, users.c.disabled.is_(False))
            .values(**changes)
        )
        if updated.rowcount != 1:
            raise SignInConflict(f"user {user.id} was disabled or deleted during the sign-in")
    if plan.link:
        conn.execute(insert(schema.identities), {**identity_values, "user_id": user.id})
    elif record_login:
        identities = schema.identities
        conn.execute(
            update(identities)
            .where(identities.c.provider == plan.provider, identities.c.subject == plan.subject)
            .values(last_login_at=now)
        )
    return user


def _is_memory_sqlite(database: str | None) -> bool:
    return not database or database == ":memory:" or "mode=memory" in database


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
        # File-backed SQLite runs each write transaction in one call to this thread, on a
        # blocking engine, instead of one call to aiosqlite's thread per cursor operation.
        self._writer_engine: Engine | None = None
        self._writer: ThreadPoolExecutor | None = None

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
            event.listen(engine.sync_engine, "connect", self._sqlite_pragmas)
            if not _is_memory_sqlite(engine.url.database):
                # An in-memory database exists once per connection, so it keeps to aiosqlite.
                self._writer_engine = create_engine(
                    engine.url.set(drivername="sqlite+pysqlite"), **kwargs)
                event.listen(self._writer_engine, "connect", self._sqlite_pragmas)
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="moko-store-writer")

        self._engine = engine
        try:
            await self.upgrade()
        except (OperationalError, OSError) as exc:
            self._engine = None
            await engine.dispose()
            await self._close_writer()
            where = self.url.split("?", 1)[0] if self.is_sqlite else self.url.split("@")[-1]
            raise StoreError("open", f"cannot open the store at {where}: {_short(exc)}; "
                             "check store.url, that its folder exists and is writable, "
                             "or that the server is reachable") from None

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        await self._close_writer()

    async def _close_writer(self) -> None:
        if self._writer is None or self._writer_engine is None:
            return
        # Disposed in the writer thread, because SQLite connections belong to the thread
        # that opened them.
        await asyncio.get_running_loop().run_in_executor(self._writer, self._writer_engine.dispose)
        self._writer.shutdown()
        self._writer = None
        self._writer_engine = None

    def _sqlite_pragmas(self, dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    async def upgrade(self) -> int:
        """Apply pending migrations; return the schema version now in force."""
        if not self.is_sqlite:
            return await self._migrate()
        # SQLite has no advisory lock: when another process migrates the same file at the
        # same moment, one of the two fails on "already exists", "locked" or the unique
        # schema version it also inserted, and tries again, then finds the migrations applied.
        for attempt in range(_BUSY_RETRIES):
            try:
                return await self._migrate()
            except (OperationalError, IntegrityError) as exc:
                message = str(exc).lower()
                if not any(sign in message for sign in ("already exists", "locked", "unique")):
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
        async def select_one(conn: AsyncConnection) -> None:
            await conn.execute(select(1))

        try:
            await self._read(select_one)
        except (SQLAlchemyError, OSError, StoreError):
            return False
        return True

    # --- transactions ------------------------------------------------------

    async def _read(self, action: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``action`` on a pooled connection, once more on a new one if the first was dead.

        The pool does not test a connection before handing it out, so after a
        PostgreSQL restart or an idle-connection timeout the first query on each
        old connection fails. SQLAlchemy then discards the pool's older connections,
        and a read is safe to repeat.
        """
        try:
            async with self.engine.connect() as conn:
                return await action(conn)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            logger.warning("store_reconnect op=read error=%s", type(exc.orig).__name__)
        async with self.engine.connect() as conn:
            return await action(conn)

    async def _first(self, query: Executable) -> Row[Any] | None:
        async def run(conn: AsyncConnection) -> Row[Any] | None:
            return (await conn.execute(query)).first()

        return await self._read(run)

    async def _all(self, query: Executable) -> Sequence[Row[Any]]:
        async def run(conn: AsyncConnection) -> Sequence[Row[Any]]:
            return (await conn.execute(query)).all()

        return await self._read(run)

    async def _scalar(self, query: Executable) -> Any:
        async def run(conn: AsyncConnection) -> Any:
            return (await conn.execute(query)).scalar()

        return await self._read(run)

    async def _transaction(self, body: Callable[[Connection], T]) -> T:
        """Run ``body`` in one write transaction: all of its statements commit, or none.

        ``body`` is blocking code on a SQLAlchemy ``Connection``. On a SQLite file
        it runs in the writer thread, so the whole transaction costs one thread
        switch. On PostgreSQL it runs through the async engine, and a transaction
        whose connection turns out dead before COMMIT is sent is run once more on a
        new connection. A failure during COMMIT is raised, because the outcome is
        unknown. Raises whatever ``body`` raises, after rolling back.
        """
        if self._writer is not None:
            async with self._write_lock:
                return await self._run_in_writer(body)
        if self.is_sqlite:
            async with self._write_lock:
                async with self.engine.begin() as conn:
                    return await conn.run_sync(body)

        committing = False
        try:
            async with self.engine.begin() as conn:
                result = await conn.run_sync(body)
                committing = True
            return result
        except DBAPIError as exc:
            if committing or not exc.connection_invalidated:
                raise
            logger.warning("store_reconnect op=write error=%s", type(exc.orig).__name__)
        async with self.engine.begin() as conn:
            return await conn.run_sync(body)

    async def _run_in_writer(self, body: Callable[[Connection], T]) -> T:
        assert self._writer is not None and self._writer_engine is not None
        engine = self._writer_engine

        def run() -> T:
            with engine.begin() as conn:
                return body(conn)

        future = asyncio.get_running_loop().run_in_executor(self._writer, run)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The thread cannot be stopped: keep the write lock until its transaction ends.
            await asyncio.wait([future])
            raise

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
        row = await self._first(query)
        return _user(row) if row else None

    async def user_by_email(self, email: str) -> UserRecord | None:
        query = select(schema.users).where(schema.users.c.email == email.lower())
        row = await self._first(query)
        return _user(row) if row else None

    async def user_by_id(self, user_id: int) -> UserRecord | None:
        row = await self._first(select(schema.users).where(schema.users.c.id == user_id))
        return _user(row) if row else None

    async def user_by_username(self, username: str) -> UserRecord | None:
        query = select(schema.users).where(schema.users.c.username == username)
        row = await self._first(query)
        return _user(row) if row else None

    async def list_users(self, limit: int = 1000, offset: int = 0) -> list[UserRecord]:
        query = select(schema.users).order_by(schema.users.c.id).limit(limit).offset(offset)
        return [_user(row) for row in await self._all(query)]

    async def identities_of(self, user_id: int) -> list[IdentityRecord]:
        query = (
            select(schema.identities)
            .where(schema.identities.c.user_id == user_id)
            .order_by(schema.identities.c.id)
        )
        return [_identity(row) for row in await self._all(query)]

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
        ``False``. Raises :class:`EmailTaken` when another user has the email.
        """

        async def attempt() -> tuple[UserRecord, bool]:
            now = utcnow()

            def body(conn: Connection) -> int:
                result = conn.execute(
                    insert(schema.users).values(
                        username=username, email=email.lower() if email else None,
                        display_name=display_name, roles=_roles_to_text(roles),
                        disabled=False, created_at=now, last_login_at=now,
                    )
                )
                user_id = int(result.inserted_primary_key[0])
                conn.execute(
                    insert(schema.identities).values(
                        user_id=user_id, provider=provider, subject=subject,
                        email=identity_email, created_at=now, last_login_at=now,
                    )
                )
                return user_id

            try:
                user_id = await self._transaction(body)
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
            statement = insert(schema.identities).values(
                user_id=user_id, provider=provider, subject=subject, email=email,
                created_at=now, last_login_at=now,
            )
            try:
                await self._transaction(lambda conn: conn.execute(statement))
            except IntegrityError:
                pass
            query = select(schema.identities).where(
                schema.identities.c.provider == provider, schema.identities.c.subject == subject
            )
            row = await self._first(query)
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
            changed = await self._transaction(lambda conn: conn.execute(query).rowcount)
            return int(changed or 0)

        return await self._retry("unlink_identity", attempt)

    async def prune_audit(self, before: datetime) -> int:
        """Delete audit rows older than ``before``; return how many."""

        async def attempt() -> int:
            statement = (
                delete(schema.audit_log).where(schema.audit_log.c.at < to_utc(before))
            )
            changed = await self._transaction(lambda conn: conn.execute(statement).rowcount)
            return int(changed or 0)

        return await self._retry("prune_audit", attempt)

    async def record_login(self, user_id: int, provider: str, subject: str) -> None:
        async def attempt() -> None:
            now = utcnow()

            def body(conn: Connection) -> None:
                conn.execute(
                    update(schema.users).where(schema.users.c.id == user_id).values(last_login_at=now)
                )
                conn.execute(
                    update(schema.identities)
                    .where(schema.identities.c.provider == provider,
                           schema.identities.c.subject == subject)
                    .values(last_login_at=now)
                )

            await self._transaction(body)

        await self._retry("record_login", attempt)

    async def sign_in(
        self,
        plan: SignInPlan,
        *,
        record_login: bool = True,
        session: SessionRow | None = None,
        audit: Sequence[dict[str, Any]] = (),
        finish: Callable[[UserRecord], T] | None = None,
    ) -> tuple[UserRecord, T | None]:
        """Write one sign-in in a single transaction and return its user and ``finish``'s result.

        The transaction creates the user and identity of ``plan.new_user``, or
        links the identity, replaces the roles and records the login time of
        ``plan.user``. Then it inserts ``session`` and the ``audit`` rows, each
        with the user's id. ``finish`` is called inside the transaction once the
        user's id is known. On SQLite it runs in the writer thread, so it must be
        quick blocking code, and an error it raises rolls everything back.

        Raises :class:`SignInConflict` when a concurrent request changed the rows
        the plan was made from (plan again), :class:`EmailTaken` when another user
        has a new user's email, and :class:`StoreError` for other failures. In
        every case nothing was written.
        """

        def body(conn: Connection) -> tuple[UserRecord, T | None]:
            now = utcnow()
            user = _write_sign_in_user(conn, plan, now, record_login)
            result = finish(user) if finish is not None else None
            if session is not None:
                conn.execute(insert(schema.sessions), {
                    "id": session.id, "user_id": user.id, "provider": session.provider,
                    "created_at": to_utc(session.created_at),
                    "expires_at": to_utc(session.expires_at), "client_ip": session.client_ip,
                    "user_agent": session.user_agent, "provider_sid": session.provider_sid,
                })
            if audit:
                rows = [{**row, "user_id": user.id} for row in audit]
                conn.execute(insert(schema.audit_log), rows)
            return user, result

        async def attempt() -> tuple[UserRecord, T | None]:
            try:
                return await self._transaction(body)
            except IntegrityError as exc:
                error = await self._sign_in_failure(plan, exc)
            logger.info("sign_in_rejected provider=%s error=%s detail=%s", plan.provider,
                        type(error).__name__, error.detail)
            raise error

        # A first sign-in keeps the operation name of create_user_with_identity in the logs.
        return await self._retry("create_user" if plan.new_user else "sign_in", attempt)

    async def _sign_in_failure(self, plan: SignInPlan, exc: IntegrityError) -> StoreError:
        """Return the error for a sign-in whose transaction broke a constraint and rolled back."""
        if plan.new_user is not None or plan.link:
            if await self.user_for_identity(plan.provider, plan.subject) is not None:
                return SignInConflict("another request linked the identity first")
        if plan.new_user is not None:
            email = plan.new_user.email
            owner = await self.user_by_email(email) if email else None
            if owner is not None:
                return EmailTaken(owner.id)
            if await self.user_by_username(plan.new_user.username) is not None:
                return StoreError("create_user", "username is already taken")
        elif plan.user is not None and await self.user_by_id(plan.user.id) is None:
            return SignInConflict(f"user {plan.user.id} was deleted during the sign-in")
        return StoreError("sign_in", _short(exc))

    async def set_disabled(self, user_id: int, disabled: bool) -> bool:
        async def attempt() -> bool:
            statement = (
                update(schema.users).where(schema.users.c.id == user_id).values(disabled=disabled)
            )
            changed = await self._transaction(lambda conn: conn.execute(statement).rowcount)
            return bool(changed)

        return await self._retry("set_disabled", attempt)

    async def set_roles(self, user_id: int, roles: Sequence[str]) -> bool:
        async def attempt() -> bool:
            statement = (
                update(schema.users)
                .where(schema.users.c.id == user_id)
                .values(roles=_roles_to_text(roles))
            )
            changed = await self._transaction(lambda conn: conn.execute(statement).rowcount)
            return bool(changed)

        return await self._retry("set_roles", attempt)

    # --- sessions ------------------------------------------------------------

    async def create_session(
        self, *, session_id: str, user_id: int, provider: str, created_at: datetime,
        expires_at: datetime, client_ip: str | None, user_agent: str | None,
        provider_sid: str | None = None,
    ) -> None:
        async def attempt() -> None:
            statement = insert(schema.sessions).values(
                id=session_id, user_id=user_id, provider=provider,
                created_at=to_utc(created_at), expires_at=to_utc(expires_at),
                client_ip=client_ip, user_agent=user_agent, provider_sid=provider_sid,
            )
            await self._transaction(lambda conn: conn.execute(statement))

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

            def body(conn: Connection) -> list[str]:
                ids = [row.id for row in conn.execute(query)]
                if ids:
                    conn.execute(update(table).where(table.c.id.in_(ids)).values(revoked_at=now))
                return ids

            return await self._transaction(body)

        return await self._retry("revoke_provider_sessions", attempt)

    async def revoke_session(self, session_id: str) -> bool:
        async def attempt() -> bool:
            statement = (
                update(schema.sessions)
                .where(schema.sessions.c.id == session_id, schema.sessions.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            changed = await self._transaction(lambda conn: conn.execute(statement).rowcount)
            return bool(changed)

        return await self._retry("revoke_session", attempt)

    async def revoke_user_sessions(self, user_id: int) -> list[str]:
        """Revoke every live session of a user; return their ids."""

        async def attempt() -> list[str]:
            now = utcnow()

            def body(conn: Connection) -> list[str]:
                rows = conn.execute(
                    select(schema.sessions.c.id).where(
                        schema.sessions.c.user_id == user_id,
                        schema.sessions.c.revoked_at.is_(None),
                        schema.sessions.c.expires_at > now,
                    )
                )
                ids = [row.id for row in rows]
                if ids:
                    conn.execute(
                        update(schema.sessions)
                        .where(schema.sessions.c.id.in_(ids))
                        .values(revoked_at=now)
                    )
                return ids

            return await self._transaction(body)

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
        return [(row.id, row.expires_at, row.revoked_at) for row in await self._all(query)]

    async def count_active_sessions(self) -> int:
        table = schema.sessions
        query = select(func.count()).select_from(table).where(
            table.c.revoked_at.is_(None), table.c.expires_at > utcnow())
        return int(await self._scalar(query) or 0)

    async def is_session_active(self, session_id: str) -> bool:
        query = select(schema.sessions.c.revoked_at, schema.sessions.c.expires_at).where(
            schema.sessions.c.id == session_id
        )
        row = await self._first(query)
        return row is not None and row.revoked_at is None and row.expires_at > utcnow()

    # --- audit log -----------------------------------------------------------

    async def add_audit(self, values: dict[str, Any]) -> None:
        async def attempt() -> None:
            await self._transaction(lambda conn: conn.execute(insert(schema.audit_log), values))

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
        return [AuditRecord(**row._asdict()) for row in await self._all(query)]

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
        return [(str(row.day), row.outcome, int(row.n)) for row in await self._all(query)]

    async def count_audit(self, event: str | None = None) -> int:
        query = select(func.count()).select_from(schema.audit_log)
        if event is not None:
            query = query.where(schema.audit_log.c.event == event)
        return int(await self._scalar(query) or 0)


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
