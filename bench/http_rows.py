"""Rows 1-4 and 7: request throughput of each mode against its baseline, and memory.

Each row starts its servers, loads the guarded target and its baseline
interleaved (see ``harness.measure_interleaved``), stops the servers by PID and
returns the ratios measured in that one run.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fixtures import issue_sessions, write_config
from harness import (
    BENCH_DIR,
    WRK_DIR,
    BrokenRun,
    LoadSettings,
    Server,
    Target,
    UvicornOptions,
    free_port,
    measure_interleaved,
    probe,
    require_nginx,
    rss_mib,
    run_wrk,
    summarise,
    uvicorn_server,
)

PRIMARY = UvicornOptions("uvloop", "httptools", 1)
SERVER_VARIANTS = (PRIMARY, UvicornOptions("asyncio", "h11", 1), UvicornOptions("uvloop", "httptools", 2))
STATIC_BODY = "ok\n"


@dataclass
class RowContext:
    """Inputs shared by every row: wrk, load settings, a scratch folder and the secrets' environment."""

    wrk: str
    load: LoadSettings
    work_dir: Path
    env: dict[str, str]
    log: Callable[[str], None]
    # When set, rows 1 and 5 also record the guard with py-spy into this folder.
    profile_dir: Path | None = None


def log_profile(ctx: RowContext, title: str, summary: dict, lines: int = 15) -> None:
    """Log the moko_guard functions by inclusive share, then the top functions by self share."""
    ctx.log(f"{title}: {summary['samples']} samples; moko_guard functions by inclusive share")
    own_code = [(name, percent) for name, percent in summary["inclusive_percent"] if "moko_guard/" in name]
    for name, percent in own_code[:lines]:
        ctx.log(f"    {percent:5.1f}%  {name}")
    ctx.log(f"{title}: top functions by self share")
    for name, percent in summary["self_percent"][:lines]:
        ctx.log(f"    {percent:5.1f}%  {name}")


def _guard_config(ctx: RowContext, name: str, port: int, *, upstream: str | None = None) -> Path:
    store = ctx.work_dir / f"{name}.db"
    # The provider port is never contacted in rows 1-4 and 7: no sign-in happens there.
    return write_config(ctx.work_dir / f"{name}.toml", public_port=port, provider_port=free_port(),
                        store_url=f"sqlite:///{store}", upstream=upstream)


def _forward_auth_headers(cookie: str, port: int) -> dict[str, str]:
    """Return the headers nginx's auth_request sub-request carries (see nginx.conf.in)."""
    return {
        "Cookie": cookie, "X-Original-URI": "/ok.txt", "X-Forwarded-Host": f"127.0.0.1:{port}",
        "X-Forwarded-Proto": "http",
    }


def _stop_all(servers: list[Server]) -> None:
    for server in reversed(servers):
        server.stop()


def _comparison(runs: dict[str, list[dict]], guarded: str, baseline: str) -> dict:
    guarded_summary, baseline_summary = summarise(runs[guarded]), summarise(runs[baseline])
    return {
        "guarded": guarded_summary,
        "baseline": baseline_summary,
        "ratio": guarded_summary["requests_per_second"] / baseline_summary["requests_per_second"],
        "added_p50_ms": guarded_summary["p50_ms"] - baseline_summary["p50_ms"],
        "added_cpu_us_per_request": (guarded_summary["server_cpu_us_per_request"]
                                     - baseline_summary["server_cpu_us_per_request"]),
        "runs": runs,
    }


# --- row 1 ----------------------------------------------------------------------------


def row_forward_auth(ctx: RowContext, variants: tuple[UvicornOptions, ...] = SERVER_VARIANTS) -> dict:
    """Row 1: /oauth2/auth with a valid session vs a bare Starlette 202, per uvicorn setting."""
    results = {}
    for options in variants:
        ctx.log(f"row 1: /oauth2/auth vs bare 202 under {options.label}")
        guard_port, bare_port = free_port(), free_port()
        config = _guard_config(ctx, "row1", guard_port)
        cookie = issue_sessions(config, 1)[0]
        env = {**ctx.env, "MOKO_BENCH_CONFIG": str(config)}
        servers = [
            uvicorn_server("row1-guard", "guard_server", guard_port, options, env=env, log_dir=ctx.work_dir),
            uvicorn_server("row1-bare", "bare_auth_app", bare_port, options, env=env, log_dir=ctx.work_dir),
        ]
        try:
            for server in servers:
                server.start()
            targets = [
                Target("guard", f"moko_guard /oauth2/auth ({options.label})",
                       f"http://127.0.0.1:{guard_port}/oauth2/auth",
                       _forward_auth_headers(cookie, guard_port), [servers[0].pid], 202),
                Target("bare", f"bare Starlette 202 ({options.label})",
                       f"http://127.0.0.1:{bare_port}/oauth2/auth",
                       _forward_auth_headers(cookie, bare_port), [servers[1].pid], 202),
            ]
            runs = measure_interleaved(ctx.wrk, targets, ctx.load, ctx.log)
            profile = None
            if ctx.profile_dir is not None and options == PRIMARY:
                profile = _profile_load(ctx, targets[0], servers[0].pid, "row1-guard")
        finally:
            _stop_all(servers)
        results[options.label] = {"options": options.__dict__, **_comparison(runs, "guard", "bare")}
        if profile is not None:
            results[options.label]["profile"] = profile
    return results


def _profile_load(ctx: RowContext, target: Target, pid: int, name: str) -> dict:
    """Record ``pid`` with py-spy during one extra load of ``target``; the figures above exclude it."""
    from profiling import Profiler

    assert ctx.profile_dir is not None
    seconds = max(3, ctx.load.duration)
    profiler = Profiler(pid, seconds, ctx.profile_dir / f"{name}.raw")
    time.sleep(0.5)  # let py-spy attach before the load starts
    run_wrk(ctx.wrk, target.url, target.headers, threads=ctx.load.threads,
            connections=ctx.load.connections, duration=seconds, cpu_roots=[pid])
    summary = profiler.finish()
    log_profile(ctx, f"py-spy {name}", summary)
    return summary


# --- row 2 ----------------------------------------------------------------------------


def row_middleware(ctx: RowContext) -> dict:
    """Row 2: an app behind GuardMiddleware with a valid session vs the same app without it.

    The saturating load (``ctx.load``) gives the throughput ratio. One extra
    pair of runs with a single connection gives the added latency of one
    request when nothing queues.
    """
    ctx.log("row 2: app behind GuardMiddleware vs the same app without it")
    guarded_port, plain_port = free_port(), free_port()
    config = _guard_config(ctx, "row2", guarded_port)
    cookie = issue_sessions(config, 1)[0]
    env = {**ctx.env, "MOKO_BENCH_CONFIG": str(config)}
    servers = [
        uvicorn_server("row2-guarded", "guarded_app", guarded_port, PRIMARY, env=env, log_dir=ctx.work_dir),
        uvicorn_server("row2-plain", "plain_app", plain_port, PRIMARY, env=env, log_dir=ctx.work_dir),
    ]
    headers = {"Cookie": cookie, "Accept": "text/html"}
    try:
        for server in servers:
            server.start()
        targets = [
            Target("guarded", "Starlette app behind GuardMiddleware",
                   f"http://127.0.0.1:{guarded_port}/", headers, [servers[0].pid]),
            Target("plain", "the same Starlette app alone", f"http://127.0.0.1:{plain_port}/",
                   headers, [servers[1].pid]),
        ]
        saturated = measure_interleaved(ctx.wrk, targets, ctx.load, ctx.log)
        single = LoadSettings(threads=1, connections=1, duration=ctx.load.duration, warmup=1,
                              repetitions=ctx.load.repetitions)
        ctx.log("row 2: one connection, for the added latency of a single request")
        one_connection = measure_interleaved(ctx.wrk, targets, single, ctx.log)
    finally:
        _stop_all(servers)
    return {
        "saturated": _comparison(saturated, "guarded", "plain"),
        "one_connection": _comparison(one_connection, "guarded", "plain"),
    }


# --- row 3 ----------------------------------------------------------------------------


def _nginx_server(ctx: RowContext, guard_port: int, bare_port: int) -> tuple[Server, int, int, int]:
    """Render nginx.conf.in; return nginx and its static, guarded and stand-in ports."""
    nginx = require_nginx()
    prefix = ctx.work_dir / "nginx"
    for folder in ("www", "tmp"):
        (prefix / folder).mkdir(parents=True, exist_ok=True)
    (prefix / "www" / "ok.txt").write_text(STATIC_BODY)
    # nginx's workers run as an unprivileged user when started by root: they must reach the file.
    for path in (ctx.work_dir, prefix, prefix / "www", prefix / "www" / "ok.txt"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    static_port, auth_port, stand_in_port = free_port(), free_port(), free_port()
    text = (BENCH_DIR / "nginx.conf.in").read_text()
    for key, value in (("PREFIX", prefix), ("STATIC_PORT", static_port), ("AUTH_PORT", auth_port),
                       ("GUARD_PORT", guard_port), ("STANDIN_PORT", stand_in_port),
                       ("BARE_PORT", bare_port)):
        text = text.replace(f"@{key}@", str(value))
    config = prefix / "nginx.conf"
    config.write_text(text)
    base = [nginx, "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log")]
    checked = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True)
    if checked.returncode != 0:
        raise BrokenRun(f"nginx rejected {config}: {checked.stderr.strip()}")
    server = Server("row3-nginx", [*base, "-g", "daemon off;"], auth_port,
                    log_path=ctx.work_dir / "row3-nginx.log")
    return server, static_port, auth_port, stand_in_port


def row_nginx(ctx: RowContext) -> dict:
    """Row 3: nginx auth_request -> moko_guard -> static file vs nginx serving the file alone.

    A third target puts a do-nothing endpoint (``apps:bare_auth_app``, always
    202, same uvicorn settings as the guard) in the guard's place, as the
    anchor harness's stand-in does. The sub-request costs the same on both
    sides, so the ratio against it shows the cost of the guard's own work.
    """
    ctx.log("row 3: nginx auth_request -> moko_guard -> static file vs nginx static file "
            "and vs a do-nothing auth endpoint")
    guard_port, bare_port = free_port(), free_port()
    config = _guard_config(ctx, "row3", guard_port)
    cookie = issue_sessions(config, 1)[0]
    env = {**ctx.env, "MOKO_BENCH_CONFIG": str(config)}
    guard = uvicorn_server("row3-guard", "guard_server", guard_port, PRIMARY, env=env, log_dir=ctx.work_dir)
    bare = uvicorn_server("row3-bare", "bare_auth_app", bare_port, PRIMARY, env=env, log_dir=ctx.work_dir)
    nginx, static_port, auth_port, stand_in_port = _nginx_server(ctx, guard_port, bare_port)
    servers = [guard, bare, nginx]
    headers = {"Cookie": cookie}
    try:
        for server in servers:
            server.start()
        targets = [
            Target("auth", "nginx auth_request -> moko_guard -> static file",
                   f"http://127.0.0.1:{auth_port}/ok.txt", headers, [nginx.pid, guard.pid]),
            Target("stand_in", "nginx auth_request -> do-nothing 202 endpoint -> static file",
                   f"http://127.0.0.1:{stand_in_port}/ok.txt", headers, [nginx.pid, bare.pid]),
            Target("static", "nginx static file, no auth", f"http://127.0.0.1:{static_port}/ok.txt",
                   headers, [nginx.pid]),
        ]
        # Without the cookie the guard must return 401, which nginx passes on.
        probe(targets[0].url, {}, 401)
        runs = measure_interleaved(ctx.wrk, targets, ctx.load, ctx.log)
    finally:
        _stop_all(servers)
    return {**_comparison(runs, "auth", "static"),
            "do_nothing": _comparison(runs, "auth", "stand_in")}


# --- row 4 ----------------------------------------------------------------------------


def row_reverse_proxy(ctx: RowContext) -> dict:
    """Row 4: reverse-proxy mode -> upstream vs the upstream called directly."""
    ctx.log("row 4: moko_guard reverse proxy -> upstream vs the upstream directly")
    guard_port, upstream_port = free_port(), free_port()
    config = _guard_config(ctx, "row4", guard_port, upstream=f"http://127.0.0.1:{upstream_port}")
    cookie = issue_sessions(config, 1)[0]
    env = {**ctx.env, "MOKO_BENCH_CONFIG": str(config)}
    upstream = uvicorn_server("row4-upstream", "plain_app", upstream_port, PRIMARY, env=env,
                              log_dir=ctx.work_dir)
    guard = uvicorn_server("row4-guard", "guard_server", guard_port, PRIMARY, env=env, log_dir=ctx.work_dir)
    servers = [upstream, guard]
    headers = {"Cookie": cookie, "Accept": "text/html"}
    try:
        upstream.start()
        guard.start()
        targets = [
            Target("proxy", "moko_guard reverse proxy -> upstream", f"http://127.0.0.1:{guard_port}/",
                   headers, [guard.pid, upstream.pid]),
            Target("direct", "upstream directly", f"http://127.0.0.1:{upstream_port}/", headers,
                   [upstream.pid]),
        ]
        runs = measure_interleaved(ctx.wrk, targets, ctx.load, ctx.log)
    finally:
        _stop_all(servers)
    return _comparison(runs, "proxy", "direct")


# --- row 7 ----------------------------------------------------------------------------


def _counted_load(ctx: RowContext, url: str, headers: dict[str, str], cookie_file: Path,
                  total: int, pid: int, chunk_seconds: int = 2, max_chunks: int = 60) -> dict:
    """Send about ``total`` requests in wrk runs of ``chunk_seconds`` each, and add up the runs.

    wrk always runs for its whole ``-d`` even when count.lua has stopped every
    thread, so short runs keep the wait after the last request short.
    """
    threads = ctx.load.threads
    merged: dict = {"requests": 0, "duration_us": 0, "server_cpu_seconds": 0.0, "chunks": 0,
                    "errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}}
    while merged["requests"] < total and merged["chunks"] < max_chunks:
        per_thread = max(1, (total - merged["requests"]) // threads)
        run = run_wrk(ctx.wrk, url, headers, threads=threads, connections=ctx.load.connections,
                      duration=chunk_seconds, cpu_roots=[pid], script=WRK_DIR / "count.lua",
                      script_args=[str(per_thread), str(cookie_file)])
        merged["chunks"] += 1
        merged["requests"] += run["requests"]
        merged["duration_us"] += run["duration_us"]
        merged["server_cpu_seconds"] += run["server_cpu_seconds"]
        for kind, count in run["errors"].items():
            merged["errors"][kind] += count
        if run["requests"] == 0:
            raise BrokenRun(f"row 7: a wrk run against {url} completed no request")
    merged["server_cpu_us_per_request"] = merged["server_cpu_seconds"] / merged["requests"] * 1e6
    return merged


def row_memory(ctx: RowContext, sessions: int = 1000, early: int = 1_000, late: int = 100_000) -> dict:
    """Row 7: RSS of the forward-auth server after ``late`` requests vs after ``early`` requests.

    The requests rotate over ``sessions`` different session cookies, so a cache
    keyed by session would show up as growth.
    """
    ctx.log(f"row 7: RSS after {early:,} and after {late:,} /oauth2/auth requests "
            f"over {sessions:,} sessions")
    port = free_port()
    config = _guard_config(ctx, "row7", port)
    cookies = issue_sessions(config, sessions)
    cookie_file = ctx.work_dir / "row7-cookies.txt"
    cookie_file.write_text("\n".join(cookies) + "\n")
    env = {**ctx.env, "MOKO_BENCH_CONFIG": str(config)}
    guard = uvicorn_server("row7-guard", "guard_server", port, PRIMARY, env=env, log_dir=ctx.work_dir)
    url = f"http://127.0.0.1:{port}/oauth2/auth"
    headers = _forward_auth_headers(cookies[0], port)
    headers.pop("Cookie")
    try:
        guard.start()
        rss_started = rss_mib(guard.pid)
        first = _counted_load(ctx, url, headers, cookie_file, early, guard.pid, chunk_seconds=1)
        time.sleep(0.5)
        rss_early = rss_mib(guard.pid)
        second = _counted_load(ctx, url, headers, cookie_file, late - first["requests"], guard.pid)
        time.sleep(0.5)
        rss_late = rss_mib(guard.pid)
        probe(url, {**headers, "Cookie": cookies[-1]}, 202)
    finally:
        guard.stop()
    for run in (first, second):
        if run["errors"]["status"]:
            raise BrokenRun(f"row 7: {run['errors']['status']} responses other than 2xx/3xx")
    total = first["requests"] + second["requests"]
    return {
        "sessions": sessions,
        "requests_early": first["requests"],
        "requests_total": total,
        "rss_started_mib": rss_started,
        "rss_early_mib": rss_early,
        "rss_late_mib": rss_late,
        "growth_mib": rss_late - rss_early,
        "ratio": rss_late / rss_early,
        "server_cpu_us_per_request": second["server_cpu_us_per_request"],
        "runs": [first, second],
    }
