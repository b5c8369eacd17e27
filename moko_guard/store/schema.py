"""Tables of the store and their versioned migrations (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    text,
)
from sqlalchemy.engine import Connection

metadata = MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY, so BigInteger becomes Integer there.
_Id = BigInteger().with_variant(Integer(), "sqlite")

schema_version = Table(
    "moko_schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", DateTime, nullable=False),
)

users = Table(
    "moko_users",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("username", String(320), nullable=False, unique=True),
    # Lower-cased verified email; the one column emails are matched on.
    Column("email", String(320), nullable=True, unique=True),
    Column("display_name", String(255), nullable=True),
    Column("roles", Text, nullable=False, default=""),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", DateTime, nullable=False),
    Column("last_login_at", DateTime, nullable=True),
)

identities = Table(
    "moko_identities",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("user_id", _Id, ForeignKey("moko_users.id", ondelete="CASCADE"), nullable=False),
    Column("provider", String(40), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("email", String(320), nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("last_login_at", DateTime, nullable=True),
    UniqueConstraint("provider", "subject", name="uq_moko_identities_provider_subject"),
    Index("ix_moko_identities_user", "user_id"),
)

sessions = Table(
    "moko_sessions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("user_id", _Id, ForeignKey("moko_users.id", ondelete="CASCADE"), nullable=False),
    Column("provider", String(40), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False),
    Column("revoked_at", DateTime, nullable=True),
    Column("client_ip", String(64), nullable=True),
    Column("user_agent", String(512), nullable=True),
    # The provider's session id ("sid"), matched by back-channel logout (schema version 2).
    Column("provider_sid", String(255), nullable=True),
    Index("ix_moko_sessions_user", "user_id"),
    Index("ix_moko_sessions_revoked", "revoked_at"),
)

audit_log = Table(
    "moko_audit_log",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("at", DateTime, nullable=False),
    Column("event", String(40), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("reason", String(64), nullable=True),
    Column("provider", String(40), nullable=True),
    Column("subject", String(255), nullable=True),
    Column("user_id", _Id, nullable=True),
    Column("email", String(320), nullable=True),
    Column("client_ip", String(64), nullable=True),
    Column("user_agent", String(512), nullable=True),
    Column("request_id", String(64), nullable=True),
    Column("detail", Text, nullable=True),
    Index("ix_moko_audit_at", "at"),
    Index("ix_moko_audit_user_at", "user_id", "at"),
)

def _create_tables(connection: Connection) -> None:
    metadata.create_all(connection, tables=[users, identities, sessions, audit_log],
                        checkfirst=True)


def _add_provider_sid(connection: Connection) -> None:
    # A database created at version 2 or later already has the column from _create_tables.
    columns = {c["name"] for c in inspect(connection).get_columns("moko_sessions")}
    if "provider_sid" not in columns:
        connection.execute(text("ALTER TABLE moko_sessions ADD COLUMN provider_sid VARCHAR(255)"))
    connection.execute(text(
        "CREATE INDEX IF NOT EXISTS ix_moko_sessions_provider_sid ON moko_sessions (provider_sid)"
    ))


# Each migration runs once, in order, inside one transaction. Later versions add
# entries here and never edit an applied one.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _create_tables,
    2: _add_provider_sid,
}
LATEST_VERSION = max(MIGRATIONS)
