"""End to end: two `moko-guard serve` replicas sharing one store, signing in at oidc-provider.

Each deployment is two forward-auth processes on 127.0.0.1, A and B, with the
same config apart from their store connection: one session secret, one
``public_url`` (A's, where a load balancer would sit), one store. They run
against PostgreSQL (127.0.0.1:5432, database ``test``, a schema of their own
dropped afterwards), with ``session.revocation_poll_interval`` set to 1 s and
left at its 5 s default, and against one SQLite file. Each PostgreSQL replica
reaches the server through its own statement-counting proxy
(support/pg_statement_proxy.py), so the tests can tell which replica sent
which statements.

A session revoked through one process is rejected there at once and by every
other process after its next revocation poll. The tests check that bound as
the poll interval plus 1 s, measured from the session's ``revoked_at`` in the
store to the first 401 of ``/oauth2/auth``, which is checked every 100 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import pytest
from support.e2e import new_client, provider_client, signed_in
from support.oidc_provider import OidcProvider, free_port, run_oidc_provider
from support.pg_statement_proxy import StatementCountingProxy
from support.processes import RunningProcess, run_cli
from support.replicas import (
    POSTGRES_DSN,
    POSTGRES_PORT,
    cookie_client,
    database_transactions,
    drop_schema,
    latest_revocation_postgres,
    latest_revocation_sqlite,
    run_replicas,
    wait_for_rejections,
    write_replica_config,
)

from moko_guard.store import Store

pytestmark = pytest.mark.e2e

# The type of pytest's record_property fixture, which pytest does not export.
RecordProperty = Callable[[str, object], None]

DEFAULT_POLL_INTERVAL_SECONDS = 5.0  # session.revocation_poll_interval when the config omits it
BOUND_MARGIN_SECONDS = 1.0
CHECKED_REQUESTS = 200
READINESS_REQUESTS = 10
# One revocation poll runs two reads (revoked sessions, then the active-session
# count for the metrics gauge). Through SQLAlchemy and asyncpg each read is 6
# statements: a pre-ping (BEGIN, ";", ROLLBACK) and the query (BEGIN, SELECT,
# ROLLBACK), so a poll sent 12 when this test was written. The limit doubles
# that to allow for the set-up statements of a new pooled connection.
STATEMENT_LIMIT_PER_POLL = 24
MIGRATION_ROUNDS = 5
CONCURRENT_STORES = 3


@dataclass(frozen=True)
class Variant:
    """One deployment's store backend and revocation poll setting."""

    backend: Literal["postgresql", "sqlite"]
    poll_interval: str | None  # the TOML value; None leaves the setting out

    @property
    def poll_seconds(self) -> float:
        if self.poll_interval is None:
            return DEFAULT_POLL_INTERVAL_SECONDS
        assert self.poll_interval.endswith("s"), self.poll_interval
        return float(self.poll_interval[:-1])

    @property
    def rejection_bound(self) -> float:
        return self.poll_seconds + BOUND_MARGIN_SECONDS


VARIANTS = {
    "postgresql-poll-1s": Variant("postgresql", "1s"),
    "postgresql-poll-default": Variant("postgresql", None),
    "sqlite-poll-1s": Variant("sqlite", "1s"),
}
# Each test names the variants it runs on. A variant's replicas start for the
# first test that uses them and stop when the module ends.
ALL_VARIANTS = list(VARIANTS)
POSTGRESQL_VARIANTS = ["postgresql-poll-1s", "postgresql-poll-default"]


@dataclass
class Deployment:
    """Two running replicas, the provider they use and where their store lives."""

    variant: Variant
    provider: OidcProvider
    a: RunningProcess
    b: RunningProcess
    config_a: Path
    schema: str | None = None
    sqlite_path: Path | None = None
    statements_b: StatementCountingProxy | None = None

    def latest_revocation(self, user_id: int) -> float | None:
        """Return when the user's newest revoked session was revoked, from the store (Unix time)."""
        if self.schema is not None:
            return latest_revocation_postgres(self.schema, user_id)
        assert self.sqlite_path is not None
        return latest_revocation_sqlite(self.sqlite_path, user_id)


@pytest.fixture(scope="module")
def public_ports() -> dict[str, int]:
    """Pick replica A's port per variant before the provider starts, so it can register them."""
    return {name: free_port() for name in VARIANTS}


@pytest.fixture(scope="module")
def provider(public_ports: dict[str, int]) -> Iterator[OidcProvider]:
    redirect_uris = [f"http://127.0.0.1:{port}/oauth2/callback" for port in public_ports.values()]
    client = {**provider_client(redirect_uris[0]), "redirect_uris": redirect_uris}
    with run_oidc_provider([client]) as running:
        yield running


@contextlib.contextmanager
def _deploy(name: str, provider: OidcProvider, port_a: int, work: Path) -> Iterator[Deployment]:
    """Run replicas A (on ``port_a``) and B of variant ``name``, started together."""
    variant = VARIANTS[name]
    public_url = f"http://127.0.0.1:{port_a}"
    secret = secrets.token_urlsafe(36)

    def config(replica: str, store_url: str, schema: str | None) -> Path:
        return write_replica_config(
            work / f"guard-{replica}.toml", public_url=public_url, issuer=provider.issuer,
            secret=secret, store_url=store_url, schema=schema,
            revocation_poll_interval=variant.poll_interval,
        )

    if variant.backend == "sqlite":
        sqlite_path = work / "guard.db"
        config_a = config("a", f"sqlite:///{sqlite_path}", None)
        config_b = config("b", f"sqlite:///{sqlite_path}", None)
        with run_replicas("guard", [(config_a, port_a), (config_b, free_port())], work) as (a, b):
            yield Deployment(variant, provider, a, b, config_a, sqlite_path=sqlite_path)
        return

    schema = f"moko_replicas_{secrets.token_hex(6)}"
    try:
        with (StatementCountingProxy(POSTGRES_PORT) as proxy_a,
              StatementCountingProxy(POSTGRES_PORT) as proxy_b):
            config_a = config("a", f"postgresql://postgres@127.0.0.1:{proxy_a.port}/test", schema)
            config_b = config("b", f"postgresql://postgres@127.0.0.1:{proxy_b.port}/test", schema)
            with run_replicas("guard", [(config_a, port_a), (config_b, free_port())],
                              work) as (a, b):
                yield Deployment(variant, provider, a, b, config_a, schema=schema,
                                 statements_b=proxy_b)
    finally:
        drop_schema(schema)


@dataclass
class DeploymentRegistry:
    """Deployments by variant, each started by the first test that needs it."""

    provider: OidcProvider
    public_ports: dict[str, int]
    tmp_path_factory: pytest.TempPathFactory
    stack: contextlib.ExitStack
    running: dict[str, Deployment] = field(default_factory=dict)

    def get(self, name: str) -> Deployment:
        if name not in self.running:
            work = self.tmp_path_factory.mktemp(f"replicas-{name}")
            self.running[name] = self.stack.enter_context(
                _deploy(name, self.provider, self.public_ports[name], work))
        return self.running[name]


@pytest.fixture(scope="module")
def deployments(provider: OidcProvider, public_ports: dict[str, int],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeploymentRegistry]:
    with contextlib.ExitStack() as stack:
        yield DeploymentRegistry(provider, public_ports, tmp_path_factory, stack)


@pytest.fixture
def deployment(request: pytest.FixtureRequest, deployments: DeploymentRegistry) -> Deployment:
    """Return the deployment of the variant named by the test's indirect parameter."""
    name: str = request.param
    return deployments.get(name)


def _report(capsys: pytest.CaptureFixture[str], record_property: RecordProperty,
            name: str, value: float, text: str) -> None:
    """Print a measurement next to the test's result line and keep it in the JUnit XML."""
    record_property(name, value)
    with capsys.disabled():
        print(f"\n    {text}")


def _sign_in_through_a(deployment: Deployment, login: str) -> tuple[str, int]:
    """Sign in as ``login`` through replica A; return the session cookie and the user id."""
    with new_client(deployment.a.url) as browser:
        cookie = signed_in(browser, deployment.provider, login)
        userinfo = browser.get("/oauth2/userinfo")
    assert userinfo.status_code == 200, userinfo.text
    user_id = userinfo.json()["user_id"]
    assert isinstance(user_id, int)
    return cookie, user_id


def _auth_status(base_url: str, cookie: str) -> int:
    with cookie_client(base_url, cookie) as client:
        return client.get("/oauth2/auth").status_code


@pytest.mark.parametrize("deployment", ALL_VARIANTS, indirect=True)
def test_cookie_from_a_accepted_by_b(deployment: Deployment) -> None:
    cookie, user_id = _sign_in_through_a(deployment, "alice")

    with cookie_client(deployment.b.url, cookie) as replica_b:
        auth = replica_b.get("/oauth2/auth")
        userinfo = replica_b.get("/oauth2/userinfo")

    assert auth.status_code == 202
    assert auth.headers["x-auth-request-user"] == "alice@example.com"
    assert auth.headers["x-auth-request-provider"] == "op"
    assert userinfo.status_code == 200
    assert userinfo.headers["content-type"] == "application/json"
    assert userinfo.json()["user"] == "alice@example.com"
    assert userinfo.json()["user_id"] == user_id


@pytest.mark.parametrize("deployment", ALL_VARIANTS, indirect=True)
def test_anonymous_request_rejected_by_both(deployment: Deployment) -> None:
    with httpx.Client(timeout=5.0, headers={"X-Original-URI": "/deals"}) as client:
        statuses = {name: client.get(f"{replica.url}/oauth2/auth").status_code
                    for name, replica in (("A", deployment.a), ("B", deployment.b))}
        userinfo = client.get(f"{deployment.b.url}/oauth2/userinfo")

    assert statuses == {"A": 401, "B": 401}
    assert userinfo.status_code == 401
    assert userinfo.json()["error"] == "unauthenticated"


@pytest.mark.parametrize("deployment", ALL_VARIANTS, indirect=True)
def test_sign_out_on_a_reaches_b_within_bound(
    deployment: Deployment, capsys: pytest.CaptureFixture[str],
    record_property: RecordProperty,
) -> None:
    variant = deployment.variant
    cookie, user_id = _sign_in_through_a(deployment, "bob")
    assert _auth_status(deployment.b.url, cookie) == 202

    with cookie_client(deployment.a.url, cookie) as replica_a:
        signed_out = replica_a.post("/oauth2/sign_out")
        a_after = replica_a.get("/oauth2/auth")
    rejected = wait_for_rejections({"B": deployment.b.url}, cookie,
                                   timeout=variant.rejection_bound + 2)
    revoked_at = deployment.latest_revocation(user_id)

    assert signed_out.status_code == 200
    assert a_after.status_code == 401
    assert revoked_at is not None
    assert "B" in rejected, f"B still accepted the cookie {variant.rejection_bound + 2:.0f} s later"
    delay = rejected["B"] - revoked_at
    _report(capsys, record_property, "sign_out_delay_b_seconds", delay,
            f"sign-out on A rejected by B after {delay:.2f} s "
            f"(poll interval {variant.poll_seconds:g} s, bound {variant.rejection_bound:g} s)")
    assert delay <= variant.rejection_bound


# The default interval's sign-out test already waits out a 5 s poll, so this one
# runs on the 1 s variants to keep the module near a minute.
@pytest.mark.parametrize("deployment", ["postgresql-poll-1s", "sqlite-poll-1s"], indirect=True)
def test_cli_revoke_reaches_both_within_bound(
    deployment: Deployment, capsys: pytest.CaptureFixture[str],
    record_property: RecordProperty,
) -> None:
    variant = deployment.variant
    cookie, user_id = _sign_in_through_a(deployment, "carol")
    assert _auth_status(deployment.a.url, cookie) == 202
    assert _auth_status(deployment.b.url, cookie) == 202

    result = run_cli("sessions", "revoke", "--user", "carol@example.com",
                     "--config", str(deployment.config_a))
    rejected = wait_for_rejections({"A": deployment.a.url, "B": deployment.b.url}, cookie,
                                   timeout=variant.rejection_bound + 2)
    revoked_at = deployment.latest_revocation(user_id)

    assert result.stdout.strip() == f"sessions of user {user_id} ended: 1"
    assert revoked_at is not None
    assert sorted(rejected) == ["A", "B"], f"replicas that rejected: {sorted(rejected)}"
    delays = {name: at - revoked_at for name, at in rejected.items()}
    _report(capsys, record_property, "cli_revoke_delay_max_seconds", max(delays.values()),
            f"CLI revoke rejected by A after {delays['A']:.2f} s, by B after {delays['B']:.2f} s "
            f"(poll interval {variant.poll_seconds:g} s, bound {variant.rejection_bound:g} s)")
    assert delays["A"] <= variant.rejection_bound
    assert delays["B"] <= variant.rejection_bound


@pytest.mark.parametrize("deployment", POSTGRESQL_VARIANTS, indirect=True)
def test_b_checks_cookies_without_queries(
    deployment: Deployment, capsys: pytest.CaptureFixture[str],
    record_property: RecordProperty,
) -> None:
    """200 cookie checks on B send no more statements than B's revocation polls do.

    B reaches PostgreSQL only through its own counting proxy, so the count is
    B's alone. A query per request would add at least 200 statements. The
    revocation poller waits one interval between polls, so at most
    ceil(window / interval) + 1 polls overlap the window, counting one that
    started just before it. Each sends at most STATEMENT_LIMIT_PER_POLL
    statements. Ten /readyz requests, which ping the store each time, show
    that the proxy does see B's queries.

    The database-wide transaction counters of ``pg_stat_database`` are printed
    for comparison, not asserted: they include every other client of database
    ``test`` and PostgreSQL 15 updates them up to 10 s late.
    """
    statements = deployment.statements_b
    assert statements is not None
    variant = deployment.variant
    cookie, _user_id = _sign_in_through_a(deployment, "dave")
    transactions_before = database_transactions()

    with cookie_client(deployment.b.url, cookie) as replica_b:
        assert replica_b.get("/oauth2/auth").status_code == 202
        started = time.monotonic()
        statuses = [replica_b.get("/oauth2/auth").status_code for _ in range(CHECKED_REQUESTS)]
        finished = time.monotonic()
        readiness_started = time.monotonic()
        readiness = [replica_b.get("/readyz").status_code for _ in range(READINESS_REQUESTS)]
        readiness_finished = time.monotonic()
    transactions_after = database_transactions()

    window = finished - started
    checked = len(statements.statement_times(started, finished))
    polls = math.ceil(window / variant.poll_seconds) + 1
    pinged = len(statements.statement_times(readiness_started, readiness_finished))
    _report(capsys, record_property, "statements_during_checks", checked,
            f"{CHECKED_REQUESTS} cookie checks on B in {window:.2f} s: {checked} statements from B "
            f"(limit {polls * STATEMENT_LIMIT_PER_POLL}); {READINESS_REQUESTS} /readyz: "
            f"{pinged} statements; database-wide transactions "
            f"+{transactions_after - transactions_before}")
    assert statuses == [202] * CHECKED_REQUESTS
    assert readiness == [200] * READINESS_REQUESTS
    assert pinged >= READINESS_REQUESTS
    assert checked <= polls * STATEMENT_LIMIT_PER_POLL


async def _open_stores_together(schema: str) -> list[str]:
    """Open CONCURRENT_STORES stores on ``schema`` at once; return the errors as text."""
    stores = [Store(POSTGRES_DSN, schema=schema) for _ in range(CONCURRENT_STORES)]
    try:
        results = await asyncio.gather(*(store.open() for store in stores),
                                       return_exceptions=True)
    finally:
        for store in stores:
            await store.close()
    return [repr(result) for result in results if isinstance(result, BaseException)]


def test_replicas_create_fresh_schema_together() -> None:
    """Replicas that start together on a new PostgreSQL schema all finish the migration.

    Without the migration lock around CREATE SCHEMA IF NOT EXISTS, most rounds
    fail with a unique violation on pg_namespace_nspname_index.
    """
    schemas = [f"moko_replicas_{secrets.token_hex(6)}" for _ in range(MIGRATION_ROUNDS)]
    errors: list[str] = []

    try:
        for schema in schemas:
            errors += asyncio.run(_open_stores_together(schema))
    finally:
        for schema in schemas:
            drop_schema(schema)

    assert errors == []
