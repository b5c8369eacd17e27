"""Row 5: full sign-in callbacks per second on SQLite, against the demo provider.

Each sign-in is prepared untimed: ``/oauth2/start`` on the guard (flow cookie
and the provider URL with state, nonce and PKCE challenge), then the demo
provider's form is posted, which returns the callback URL with a code. The
timed part is ``GET /oauth2/callback`` alone: the code exchange at the
provider's token endpoint, the ID token check against its JWKS, the userinfo
call, the user lookup or provisioning, the session row and the audit rows.

The first half of the sign-ins creates new users, the second half signs the
same users in again. Both the guard and the provider run in their own uvicorn
process; this process is the client (httpx, bounded concurrency).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from http.cookiejar import CookieJar, DefaultCookiePolicy
from urllib.parse import parse_qsl, urlsplit

import httpx

from fixtures import CLIENT_ID, CLIENT_SECRET_VARIABLE, EMAIL_DOMAIN, PROVIDER_ID, issue_sessions, write_config
from harness import BrokenRun, cpu_seconds, free_port, median, uvicorn_server
from http_rows import PRIMARY, RowContext, _stop_all

# Demo provider codes expire 60 s after they are issued, so sign-ins are
# prepared and finished in batches well inside that.
BATCH_SIZE = 250


def _no_cookie_jar() -> CookieJar:
    """Return a cookie jar that stores nothing: each request carries only the Cookie it is given."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def _first_cookie(response: httpx.Response, prefix: str) -> str:
    for header in response.headers.get_list("set-cookie"):
        pair = header.split(";", 1)[0]
        if pair.startswith(prefix):
            return pair
    raise BrokenRun(f"{response.request.url.path}: no Set-Cookie starting with {prefix!r}")


async def _prepare(client: httpx.AsyncClient, guard_url: str, provider_url: str, email: str) -> tuple[str, str]:
    """Start a sign-in and pass the provider's form; return the callback URL and the flow cookie."""
    start = await client.get(f"{guard_url}/oauth2/start", params={"provider": PROVIDER_ID, "rd": "/"})
    if start.status_code != 302:
        raise BrokenRun(f"/oauth2/start returned {start.status_code}: {start.text[:200]!r}")
    flow_cookie = _first_cookie(start, "moko_flow_")
    authorize = urlsplit(start.headers["location"])
    if f"{authorize.scheme}://{authorize.netloc}" != provider_url:
        raise BrokenRun(f"/oauth2/start redirected off the demo provider: {authorize.netloc}")
    params = dict(parse_qsl(authorize.query))
    form = await client.post(f"{provider_url}/authorize", data={**params, "email": email})
    if form.status_code != 302:
        raise BrokenRun(f"demo provider /authorize returned {form.status_code}: {form.text[:200]!r}")
    callback = form.headers["location"]
    if not callback.startswith(f"{guard_url}/oauth2/callback?"):
        raise BrokenRun(f"demo provider redirected to {callback[:80]!r}, not the guard's callback")
    return callback, flow_cookie


async def _finish(client: httpx.AsyncClient, callback: str, flow_cookie: str) -> float:
    """Send the callback; return its latency in seconds after checking that a session was set."""
    started = time.perf_counter()
    response = await client.get(callback, headers={"Cookie": flow_cookie})
    elapsed = time.perf_counter() - started
    if response.status_code != 302 or response.headers.get("location") != "/":
        raise BrokenRun(f"/oauth2/callback returned {response.status_code}: {response.text[:300]!r}")
    _first_cookie(response, "moko_session=")
    return elapsed


async def _bounded(concurrency: int, jobs: list) -> list:
    semaphore = asyncio.Semaphore(concurrency)

    async def run(job):  # type: ignore[no-untyped-def]
        async with semaphore:
            return await job

    return await asyncio.gather(*(run(job) for job in jobs))


async def _sign_in_phase(guard_url: str, provider_url: str, emails: list[str], concurrency: int,
                         cpu_roots: dict[str, int]) -> dict:
    latencies: list[float] = []
    timed_seconds = 0.0
    cpu_used = {name: 0.0 for name in cpu_roots}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(cookies=_no_cookie_jar(), limits=limits, timeout=30.0) as client:
        for offset in range(0, len(emails), BATCH_SIZE):
            batch = emails[offset:offset + BATCH_SIZE]
            prepared = await _bounded(concurrency, [_prepare(client, guard_url, provider_url, e) for e in batch])
            before = {name: cpu_seconds([pid]) for name, pid in cpu_roots.items()}
            started = time.perf_counter()
            latencies += await _bounded(concurrency, [_finish(client, url, cookie) for url, cookie in prepared])
            timed_seconds += time.perf_counter() - started
            for name, pid in cpu_roots.items():
                cpu_used[name] += cpu_seconds([pid]) - before[name]
    ordered = sorted(latencies)
    count = len(ordered)
    return {
        "count": count,
        "timed_seconds": timed_seconds,
        "callbacks_per_second": count / timed_seconds,
        "latency_ms": {
            "p50": median(ordered) * 1000,
            "p99": ordered[min(count - 1, int(count * 0.99))] * 1000,
            "max": ordered[-1] * 1000,
        },
        "guard_cpu_us_per_callback": cpu_used["guard"] / count * 1e6,
        "provider_cpu_us_per_callback": cpu_used["provider"] / count * 1e6,
        "_latencies": latencies,
    }


def _count_rows(database: str) -> dict[str, int]:
    with sqlite3.connect(database) as connection:
        counts = dict(connection.execute("SELECT event, COUNT(*) FROM moko_audit_log GROUP BY event"))
        counts["users"] = connection.execute("SELECT COUNT(*) FROM moko_users").fetchone()[0]
        counts["sessions"] = connection.execute("SELECT COUNT(*) FROM moko_sessions").fetchone()[0]
    return counts


def row_sign_in(ctx: RowContext, count: int, concurrency: int = 16) -> dict:
    """Row 5: sign-in callbacks per second; half provision new users, half are returning users."""
    ctx.log(f"row 5: {count} sign-in callbacks on SQLite, concurrency {concurrency}")
    guard_port, provider_port = free_port(), free_port()
    database = ctx.work_dir / "row5.db"
    config = write_config(ctx.work_dir / "row5.toml", public_port=guard_port, provider_port=provider_port,
                          store_url=f"sqlite:///{database}", sign_in_rate_limit=False)
    issue_sessions(config, 0)  # creates the schema before the server starts
    guard_url, provider_url = f"http://127.0.0.1:{guard_port}", f"http://127.0.0.1:{provider_port}"
    env = {
        **ctx.env, "MOKO_BENCH_CONFIG": str(config),
        "MOKO_BENCH_PROVIDER_ISSUER": provider_url, "MOKO_BENCH_PROVIDER_CLIENT_ID": CLIENT_ID,
        "MOKO_BENCH_PROVIDER_CLIENT_SECRET": ctx.env[CLIENT_SECRET_VARIABLE],
        "MOKO_BENCH_PROVIDER_REDIRECT_URI": f"{guard_url}/oauth2/callback",
    }
    provider = uvicorn_server("row5-provider", "demo_provider", provider_port, PRIMARY, env=env,
                              log_dir=ctx.work_dir)
    guard = uvicorn_server("row5-guard", "guard_server", guard_port, PRIMARY, env=env, log_dir=ctx.work_dir)
    servers = [provider, guard]
    users = count // 2
    emails = [f"signin{number}@{EMAIL_DOMAIN}" for number in range(users)]
    profile = None
    try:
        provider.start()
        guard.start()
        roots = {"guard": guard.pid, "provider": provider.pid}
        phases = {}
        for phase in ("provisioning", "returning"):
            phases[phase] = asyncio.run(_sign_in_phase(guard_url, provider_url, emails, concurrency, roots))
            ctx.log(f"  {phase}: {phases[phase]['callbacks_per_second']:,.0f} callbacks/s, "
                    f"p99 {phases[phase]['latency_ms']['p99']:.1f} ms, "
                    f"guard {phases[phase]['guard_cpu_us_per_callback']:,.0f} µs CPU per callback")
        counts = _count_rows(str(database))
        expected = {"users": users, "login.success": 2 * users, "user.provisioned": users,
                    "sessions": 2 * users}
        wrong = {key: (counts.get(key, 0), value) for key, value in expected.items()
                 if counts.get(key, 0) != value}
        if wrong:
            raise BrokenRun(f"row 5: store rows after the sign-ins (found, expected): {wrong}")
        if ctx.profile_dir is not None:
            profile = _profile_sign_ins(ctx, guard.pid, guard_url, provider_url, emails, concurrency, roots)
    finally:
        _stop_all(servers)

    latencies = sorted(phases["provisioning"].pop("_latencies") + phases["returning"].pop("_latencies"))
    timed = phases["provisioning"]["timed_seconds"] + phases["returning"]["timed_seconds"]
    total = len(latencies)
    guard_cpu = sum(p["guard_cpu_us_per_callback"] * p["count"] for p in phases.values()) / total
    provider_cpu = sum(p["provider_cpu_us_per_callback"] * p["count"] for p in phases.values()) / total
    return {
        "count": total,
        "concurrency": concurrency,
        "callbacks_per_second": total / timed,
        "latency_ms": {"p50": median(latencies) * 1000,
                       "p99": latencies[min(total - 1, int(total * 0.99))] * 1000},
        "guard_cpu_us_per_callback": guard_cpu,
        "provider_cpu_us_per_callback": provider_cpu,
        "store_rows": counts,
        "phases": phases,
        **({"profile": profile} if profile is not None else {}),
    }


def _profile_sign_ins(ctx: RowContext, pid: int, guard_url: str, provider_url: str, emails: list[str],
                      concurrency: int, roots: dict[str, int]) -> dict:
    """Record the guard with py-spy during one extra pass of returning sign-ins (not counted above)."""
    from http_rows import log_profile
    from profiling import Profiler

    assert ctx.profile_dir is not None
    profiler = Profiler(pid, 8, ctx.profile_dir / "row5-guard.raw")
    time.sleep(0.5)
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        asyncio.run(_sign_in_phase(guard_url, provider_url, emails[:BATCH_SIZE], concurrency, roots))
    summary = profiler.finish()
    log_profile(ctx, "py-spy row5-guard (callbacks and their preparation)", summary, lines=30)
    return summary
