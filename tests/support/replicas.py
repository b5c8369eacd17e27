"""Steps of the multi-replica end-to-end tests: config files, revocation times and rejections.

Several ``moko-guard serve`` processes that share one store and one session
secret act as replicas behind a load balancer. The tests sign in through one
replica, revoke the session, and watch when each replica starts to reject the
copied cookie.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx

from .e2e import CLIENT_ID, CLIENT_SECRET, PROVIDER_ID, SESSION_COOKIE
from .processes import RunningProcess, run_guard

POSTGRES_PORT = 5432
POSTGRES_DSN = f"postgresql://postgres@127.0.0.1:{POSTGRES_PORT}/test"
REJECTION_CHECK_INTERVAL_SECONDS = 0.1
REQUEST_TIMEOUT_SECONDS = 5.0


def write_replica_config(path: Path, *, public_url: str, issuer: str, secret: str,
                         store_url: str, schema: str | None = None,
                         revocation_poll_interval: str | None = None) -> Path:
    """Write one replica's TOML config for plain http on loopback; return ``path``.

    Replicas of one deployment get the same ``public_url``, ``secret`` and
    store. ``schema`` and ``revocation_poll_interval`` are left out when None,
    so the defaults apply. ``moko-guard serve`` validates the file when it starts.
    """
    store_lines = f"url = {json.dumps(store_url)}\n"
    if schema is not None:
        store_lines += f"schema = {json.dumps(schema)}\n"
    session_lines = f"secrets = [{json.dumps(secret)}]\n"
    if revocation_poll_interval is not None:
        session_lines += f"revocation_poll_interval = {json.dumps(revocation_poll_interval)}\n"
    path.write_text(
        "[server]\n"
        f"public_url = {json.dumps(public_url)}\n"
        "enforce_https = false\n"
        "insecure_allow_http = true\n"
        "trusted_proxies = [\"127.0.0.1/32\"]\n"
        f"\n[session]\n{session_lines}"
        f"\n[store]\n{store_lines}"
        "\n[access]\n"
        "auto_provision = true\n"
        'provision_email_domains = ["example.com"]\n'
        "\n[[providers]]\n"
        f"id = {json.dumps(PROVIDER_ID)}\n"
        'type = "oidc"\n'
        'name = "Test OP"\n'
        f"issuer = {json.dumps(issuer)}\n"
        "insecure_allow_http_issuer = true\n"
        f"client_id = {json.dumps(CLIENT_ID)}\n"
        f"client_secret = {json.dumps(CLIENT_SECRET)}\n",
        encoding="utf-8",
    )
    return path


@contextlib.contextmanager
def run_replicas(name: str, replicas: list[tuple[Path, int]],
                 log_dir: Path) -> Iterator[list[RunningProcess]]:
    """Start ``moko-guard serve`` for each ``(config, port)`` at the same time, as a rollout does.

    Logs go to ``log_dir/<name>-<index>.log``. When one replica fails to
    start, the others are stopped and the first error is raised.
    """
    with contextlib.ExitStack() as running:
        stacks = [running.enter_context(contextlib.ExitStack()) for _ in replicas]
        with ThreadPoolExecutor(max_workers=len(replicas)) as pool:
            futures = [
                pool.submit(stack.enter_context,
                            run_guard(config, port, log_dir / f"{name}-{index}.log"))
                for index, (stack, (config, port)) in enumerate(zip(stacks, replicas, strict=True))
            ]
        yield [future.result() for future in futures]


def cookie_client(base_url: str, cookie: str) -> httpx.Client:
    """Open a client that sends the session cookie ``cookie``, like a copied cookie.

    It also names the checked request with ``X-Original-URI``, as nginx does; the
    replicas trust 127.0.0.1 as their proxy.
    """
    return httpx.Client(base_url=base_url, follow_redirects=False,
                        timeout=REQUEST_TIMEOUT_SECONDS,
                        headers={"Cookie": f"{SESSION_COOKIE}={cookie}",
                                 "X-Original-URI": "/deals"})


def wait_for_rejections(base_urls: dict[str, str], cookie: str, timeout: float) -> dict[str, float]:
    """Check ``/oauth2/auth`` on each replica every 100 ms until it returns 401.

    Returns the ``time.time()`` at which each replica's first 401 arrived.
    A replica that still returns 202 when ``timeout`` seconds have passed is
    missing from the result. Any status other than 202 or 401 raises
    AssertionError.
    """
    rejected: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    with contextlib.ExitStack() as stack:
        clients = {name: stack.enter_context(cookie_client(url, cookie))
                   for name, url in base_urls.items()}
        while len(rejected) < len(clients) and time.monotonic() < deadline:
            for name, client in clients.items():
                if name in rejected:
                    continue
                status = client.get("/oauth2/auth").status_code
                if status == 401:
                    rejected[name] = time.time()
                elif status != 202:
                    raise AssertionError(f"replica {name} returned {status} for /oauth2/auth, "
                                         "expected 202 or 401")
            time.sleep(REJECTION_CHECK_INTERVAL_SECONDS)
    return rejected


def _as_utc_timestamp(value: datetime | str | None) -> float | None:
    """Turn a naive-UTC ``revoked_at`` value (SQLite returns text) into a Unix timestamp."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC).timestamp()


def latest_revocation_sqlite(database: Path, user_id: int) -> float | None:
    """Return the newest ``revoked_at`` of the user's sessions in a SQLite store, as Unix time."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        row = connection.execute(
            "SELECT max(revoked_at) FROM moko_sessions WHERE user_id = ?", (user_id,)
        ).fetchone()
    return _as_utc_timestamp(row[0])


async def _latest_revocation_postgres(schema: str, user_id: int) -> float | None:
    connection = await asyncpg.connect(POSTGRES_DSN)
    try:
        value = await connection.fetchval(
            f'SELECT max(revoked_at) FROM "{schema}".moko_sessions WHERE user_id = $1', user_id
        )
    finally:
        await connection.close()
    return _as_utc_timestamp(value)


def latest_revocation_postgres(schema: str, user_id: int) -> float | None:
    """Return the newest ``revoked_at`` of the user's sessions in a PostgreSQL schema."""
    return asyncio.run(_latest_revocation_postgres(schema, user_id))


async def _database_transactions() -> int:
    connection = await asyncpg.connect(POSTGRES_DSN)
    try:
        value = await connection.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        )
    finally:
        await connection.close()
    return int(value)


def database_transactions() -> int:
    """Return the committed plus rolled-back transactions of database ``test``, all clients.

    PostgreSQL 15 and later update these counters when a backend flushes its
    statistics, at most once a second and up to 10 s late for an idle
    backend, so a reading right after a burst can miss part of it.
    """
    return asyncio.run(_database_transactions())


async def _drop_schema(schema: str) -> None:
    connection = await asyncpg.connect(POSTGRES_DSN)
    try:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await connection.close()


def drop_schema(schema: str) -> None:
    asyncio.run(_drop_schema(schema))
