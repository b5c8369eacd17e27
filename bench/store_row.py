"""Row 6: the store at scale on SQLite and PostgreSQL.

The product's own ``Store`` creates the schema (all migrations) and runs the
measured queries: ``user_for_identity`` (the sign-in lookup of a provider
identity) and ``list_audit`` by user and time range (the admin page and
``moko-guard audit list --user``). The identity lookup is also timed through
the bare driver, which shows what the Store's own layers add. The rows are bulk-loaded past the product:
SQLite through ``executemany`` and PostgreSQL through asyncpg's
``copy_records_to_table``, in batches, with the secondary indexes dropped
during the load and created again afterwards from their own definitions.

Data: ``users`` users with one identity each, and ``audit_rows`` audit rows
spread evenly over the last 365 days, each for a random user (fixed seed).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from harness import BrokenRun, median
from http_rows import RowContext

from moko_guard.store import AuditFilter, Store

BATCH_ROWS = 50_000
SPAN = timedelta(days=365)
QUERY_WINDOW = timedelta(days=30)
PROVIDER = "corp"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36"

USER_COLUMNS = ["id", "username", "email", "display_name", "roles", "disabled", "created_at", "last_login_at"]
IDENTITY_COLUMNS = ["id", "user_id", "provider", "subject", "email", "created_at", "last_login_at"]
AUDIT_COLUMNS = ["id", "at", "event", "outcome", "reason", "provider", "subject", "user_id", "email",
                 "client_ip", "user_agent", "request_id", "detail"]
INDEXED_TABLES = ("moko_identities", "moko_audit_log")


def _naive_utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


# --- data -----------------------------------------------------------------------------


def _user_batches(users: int, created: datetime) -> Iterator[tuple[list[tuple], list[tuple]]]:
    """Yield (user rows, identity rows) in batches; user n has identity subject ``sub-n``."""
    for first in range(1, users + 1, BATCH_ROWS):
        user_rows, identity_rows = [], []
        for number in range(first, min(first + BATCH_ROWS, users + 1)):
            email = f"user{number:07d}@example.com"
            user_rows.append((number, email, email, f"User {number}", "user", False, created, created))
            identity_rows.append((number, number, PROVIDER, f"sub-{number}", email, created, created))
        yield user_rows, identity_rows


def _audit_batches(rows: int, users: int, start: datetime) -> Iterator[list[tuple]]:
    """Yield audit rows in id and time order, each for a random user (seeded, so both stores match)."""
    rng = random.Random(6)
    step = SPAN / rows
    for first in range(1, rows + 1, BATCH_ROWS):
        batch = []
        for number in range(first, min(first + BATCH_ROWS, rows + 1)):
            user_id = rng.randint(1, users)
            at = start + step * number
            roll = rng.random()
            if roll < 0.90:
                event, outcome, reason = "login.success", "success", None
            elif roll < 0.95:
                event, outcome, reason = "login.failure", "failure", "state_mismatch"
            else:
                event, outcome, reason = "sign_out", "info", None
            batch.append((number, at, event, outcome, reason, PROVIDER, f"sub-{user_id}", user_id,
                          f"user{user_id:07d}@example.com", f"10.{number % 250}.{user_id % 250}.7",
                          USER_AGENT, f"{number:016x}", None))
        yield batch


IDENTITY_SQL = ("SELECT u.* FROM moko_users u JOIN moko_identities i ON i.user_id = u.id "
                "WHERE i.provider = {0} AND i.subject = {1}")


def _percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50": median(ordered) * 1000, "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
            "max": ordered[-1] * 1000, "count": len(ordered)}


async def _measure_queries(store: Store, users: int, start: datetime, lookups: int, audit_queries: int) -> dict:
    """Time the product's identity lookup and audit query one at a time (each a full round trip)."""
    rng = random.Random(7)
    for _ in range(100):  # warm the connection pool and the statement caches
        await store.user_for_identity(PROVIDER, f"sub-{rng.randint(1, users)}")
    identity_times = []
    for _ in range(lookups):
        subject = f"sub-{rng.randint(1, users)}"
        started = time.perf_counter()
        user = await store.user_for_identity(PROVIDER, subject)
        identity_times.append(time.perf_counter() - started)
        if user is None:
            raise BrokenRun(f"row 6: identity {subject} not found after the load")
    audit_times, found = [], 0
    window_starts = (SPAN - QUERY_WINDOW).total_seconds()
    for _ in range(audit_queries):
        user_id = rng.randint(1, users)
        since = start + timedelta(seconds=rng.uniform(0, window_starts))
        started = time.perf_counter()
        records = await store.list_audit(AuditFilter(user_id=user_id, since=since, until=since + QUERY_WINDOW))
        audit_times.append(time.perf_counter() - started)
        found += len(records)
    if found == 0:
        raise BrokenRun("row 6: no audit query returned a row; the load or the query is wrong")
    return {
        "identity_lookup_ms": _percentiles(identity_times),
        "audit_query_ms": {**_percentiles(audit_times), "rows_returned": found,
                           "window_days": QUERY_WINDOW.days},
    }


# --- SQLite ---------------------------------------------------------------------------


def _sqlite_load(path: Path, users: int, audit_rows: int, start: datetime, created: datetime) -> None:
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("PRAGMA cache_size=-262144")  # 256 MiB, for the index builds
        indexes = connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
            f"AND tbl_name IN ({','.join('?' * len(INDEXED_TABLES))})", INDEXED_TABLES).fetchall()
        for name, _sql in indexes:
            connection.execute(f'DROP INDEX "{name}"')

        def text(value: datetime) -> str:
            # SQLAlchemy's SQLite DateTime storage format, so range queries compare as text correctly.
            return value.isoformat(sep=" ", timespec="microseconds")

        created_text = text(created)
        user_sql = f"INSERT INTO moko_users ({','.join(USER_COLUMNS)}) VALUES ({','.join('?' * len(USER_COLUMNS))})"
        identity_sql = (f"INSERT INTO moko_identities ({','.join(IDENTITY_COLUMNS)}) "
                        f"VALUES ({','.join('?' * len(IDENTITY_COLUMNS))})")
        audit_sql = (f"INSERT INTO moko_audit_log ({','.join(AUDIT_COLUMNS)}) "
                     f"VALUES ({','.join('?' * len(AUDIT_COLUMNS))})")
        for user_rows, identity_rows in _user_batches(users, created):
            connection.executemany(user_sql, [(*r[:5], 0, created_text, created_text) for r in user_rows])
            connection.executemany(identity_sql, [(*r[:5], created_text, created_text) for r in identity_rows])
            connection.commit()
        for batch in _audit_batches(audit_rows, users, start):
            connection.executemany(audit_sql, [(r[0], text(r[1]), *r[2:]) for r in batch])
            connection.commit()
        for _name, sql in indexes:
            connection.execute(sql)
        connection.commit()
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


async def _sqlite_row(ctx: RowContext, users: int, audit_rows: int, lookups: int, audit_queries: int) -> dict:
    path = ctx.work_dir / "row6.db"
    store = Store(f"sqlite:///{path}")
    await store.open()
    await store.close()

    now = _naive_utc_now()
    start, created = now - SPAN, now - SPAN - timedelta(days=1)
    started = time.monotonic()
    await asyncio.to_thread(_sqlite_load, path, users, audit_rows, start, created)
    load_seconds = time.monotonic() - started
    ctx.log(f"  sqlite: loaded in {load_seconds:.0f} s")

    store = Store(f"sqlite:///{path}")
    await store.open()
    try:
        queries = await _measure_queries(store, users, start, lookups, audit_queries)
    finally:
        await store.close()

    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    with sqlite3.connect(path) as connection:
        rng, raw_times = random.Random(8), []
        sql = IDENTITY_SQL.format("?", "?")
        for _ in range(lookups):
            subject = f"sub-{rng.randint(1, users)}"
            started = time.perf_counter()
            connection.execute(sql, (PROVIDER, subject)).fetchone()
            raw_times.append(time.perf_counter() - started)
        plan = connection.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM moko_audit_log WHERE at >= ? AND at < ? AND user_id = ? "
            "ORDER BY at DESC, id DESC LIMIT 100", ("a", "b", 1)).fetchall()
    return {"users": users, "audit_rows": audit_rows, "load_seconds": load_seconds,
            "size_mib": size / 2**20, "audit_query_plan": [row[-1] for row in plan],
            "identity_lookup_driver_ms": _percentiles(raw_times), **queries}


# --- PostgreSQL -----------------------------------------------------------------------


async def _postgres_row(ctx: RowContext, url: str, users: int, audit_rows: int, lookups: int,
                        audit_queries: int) -> dict:
    import asyncpg

    schema = f"moko_bench_{int(time.time())}_{random.randrange(16**6):06x}"
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    try:
        admin = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise BrokenRun(f"row 6: cannot connect to PostgreSQL at {url}: {exc}; "
                        "start it or pass --no-postgres") from None
    try:
        store = Store(url, schema=schema)
        await store.open()
        await store.close()
        now = _naive_utc_now()
        start, created = now - SPAN, now - SPAN - timedelta(days=1)
        started = time.monotonic()
        await admin.execute(f'SET search_path TO "{schema}"')
        indexes = await admin.fetch(
            "SELECT indexname, indexdef FROM pg_indexes i JOIN pg_class c ON c.relname = i.indexname "
            "JOIN pg_index x ON x.indexrelid = c.oid WHERE i.schemaname = $1 AND i.tablename = ANY($2) "
            "AND NOT x.indisunique AND c.relnamespace = $1::regnamespace", schema, list(INDEXED_TABLES))
        for index in indexes:
            await admin.execute(f'DROP INDEX "{schema}"."{index["indexname"]}"')
        for user_rows, identity_rows in _user_batches(users, created):
            await admin.copy_records_to_table("moko_users", records=user_rows, columns=USER_COLUMNS,
                                              schema_name=schema)
            await admin.copy_records_to_table("moko_identities", records=identity_rows,
                                              columns=IDENTITY_COLUMNS, schema_name=schema)
        for batch in _audit_batches(audit_rows, users, start):
            await admin.copy_records_to_table("moko_audit_log", records=batch, columns=AUDIT_COLUMNS,
                                              schema_name=schema)
        await admin.execute("SET maintenance_work_mem = '256MB'")
        for index in indexes:
            await admin.execute(index["indexdef"])
        await admin.execute("ANALYZE")
        load_seconds = time.monotonic() - started
        ctx.log(f"  postgresql: loaded in {load_seconds:.0f} s (schema {schema})")
        store = Store(url, schema=schema)
        await store.open()
        try:
            queries = await _measure_queries(store, users, start, lookups, audit_queries)
        finally:
            await store.close()
        rng, raw_times = random.Random(8), []
        statement = await admin.prepare(IDENTITY_SQL.format("$1", "$2"))
        for _ in range(lookups):
            subject = f"sub-{rng.randint(1, users)}"
            started = time.perf_counter()
            await statement.fetchrow(PROVIDER, subject)
            raw_times.append(time.perf_counter() - started)
        size = await admin.fetchval(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
            "WHERE c.relnamespace = $1::regnamespace AND c.relkind = 'r'", schema)
        return {"users": users, "audit_rows": audit_rows, "load_seconds": load_seconds,
                "size_mib": float(size) / 2**20, "schema": schema,
                "identity_lookup_driver_ms": _percentiles(raw_times), **queries}
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


def row_store(ctx: RowContext, users: int, audit_rows: int, postgres_url: str | None,
              lookups: int = 2000, audit_queries: int = 1000) -> dict:
    """Row 6: bulk-load both stores, then time identity lookups and audit queries through Store."""
    backends = {}
    ctx.log(f"row 6: store at {users:,} users / {audit_rows:,} audit rows on SQLite"
            + (" and PostgreSQL" if postgres_url else ""))
    backends["sqlite"] = asyncio.run(_sqlite_row(ctx, users, audit_rows, lookups, audit_queries))
    (ctx.work_dir / "row6.db").unlink(missing_ok=True)
    if postgres_url:
        backends["postgresql"] = asyncio.run(
            _postgres_row(ctx, postgres_url, users, audit_rows, lookups, audit_queries))
    for name, data in backends.items():
        ctx.log(f"  {name}: identity lookup p99 {data['identity_lookup_ms']['p99']:.2f} ms "
                f"(driver alone {data['identity_lookup_driver_ms']['p99']:.2f} ms), "
                f"audit query p99 {data['audit_query_ms']['p99']:.2f} ms, {data['size_mib']:,.0f} MiB")
    return {"backends": backends}
