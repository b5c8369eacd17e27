"""Benchmark moko_guard on 127.0.0.1: print a table and write bench/results/<time>.json.

    python bench/run.py            # full run (about 10-15 minutes on 2 cores)
    python bench/run.py --quick    # smoke run (about 2-3 minutes)
    python bench/run.py --rows 1,3 # a subset

Every figure is a ratio or comparison measured in this run. A missed target
prints FAIL but does not change the exit code. The exit code is 1 only when a
measurement could not be taken: a server did not start, a probe got the wrong
status, wrk is missing, and the like.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import bench_environment  # noqa: E402
from harness import BENCH_DIR, BrokenRun, LoadSettings, require_wrk  # noqa: E402
from http_rows import (  # noqa: E402
    PRIMARY,
    RowContext,
    row_forward_auth,
    row_memory,
    row_middleware,
    row_nginx,
    row_reverse_proxy,
)
from report import render_table, table_rows  # noqa: E402

ALL_ROWS = (1, 2, 3, 4, 5, 6, 7)
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repetition of 2 s loads, 400 sign-ins, 100k users / 1M audit rows")
    parser.add_argument("--rows", default=",".join(map(str, ALL_ROWS)),
                        help="comma-separated row numbers to run (default: all)")
    parser.add_argument("--duration", type=int, help="seconds of each measured wrk run (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up before each run (default 2, quick 1)")
    parser.add_argument("--repetitions", type=int, help="measured runs per configuration (default 3, quick 1)")
    parser.add_argument("--sign-ins", type=int, help="sign-ins for row 5 (default 2000, quick 400)")
    parser.add_argument("--users", type=int, help="users for row 6 (default 1,000,000, quick 100,000)")
    parser.add_argument("--audit-rows", type=int,
                        help="audit rows for row 6 (default 10,000,000, quick 1,000,000)")

    parser.add_argument("--postgres-url", default=os.environ.get("MOKO_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
                        help="PostgreSQL for row 6; a schema of its own is created and dropped "
                             f"(default {DEFAULT_POSTGRES_URL}, or $MOKO_BENCH_POSTGRES_URL)")
    parser.add_argument("--no-postgres", action="store_true", help="row 6 on SQLite only")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results",
                        help="where the JSON result goes (default bench/results)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="also record the guard with py-spy in rows 1 and 5 (one extra load each, "
                             "not counted in the figures) and write the raw samples to DIR")
    parser.add_argument("--keep-work-dir", action="store_true",
                        help="keep the temporary folder with configs, databases and server logs")
    args = parser.parse_args(argv)

    try:
        args.row_numbers = sorted({int(item) for item in args.rows.split(",") if item.strip()})
    except ValueError:
        parser.error(f"--rows must be numbers like 1,3,5; got {args.rows!r}")
    unknown = [n for n in args.row_numbers if n not in ALL_ROWS]
    if unknown:
        parser.error(f"--rows: no row {unknown[0]}; rows are 1 to 7")
    return args


def machine_info() -> dict:
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    versions = {}
    for package in ("moko-guard", "starlette", "uvicorn", "uvloop", "httptools", "h11", "httpx",
                    "sqlalchemy", "aiosqlite", "asyncpg", "cryptography"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    for tool, command in (("wrk", ["dpkg-query", "-W", "-f=${Version}", "wrk"]),
                          ("nginx", ["dpkg-query", "-W", "-f=${Version}", "nginx"])):
        try:
            versions[tool] = subprocess.run(command, capture_output=True, text=True).stdout.strip()
        except OSError:
            versions[tool] = "unknown"
    return {
        "code": code_version(),
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def code_version() -> dict:
    """Return the commit and the moko_guard files changed since it, which the servers import."""
    root = BENCH_DIR.parent

    def git(*arguments: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *arguments], capture_output=True,
                                  text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    # Porcelain lines are "XY PATH": two status letters (either may be a space), a space, the path.
    changed = [line[3:] for line in git("status", "--porcelain", "--", "moko_guard").splitlines() if line]
    return {"commit": git("rev-parse", "HEAD").strip(), "moko_guard_changes": changed}


def run(args: argparse.Namespace) -> int:
    wrk = require_wrk()
    quick = args.quick
    warmup = args.warmup
    if warmup is None:
        warmup = 1 if quick else 2
    load = LoadSettings(
        duration=args.duration or (2 if quick else 5),
        warmup=warmup,
        repetitions=args.repetitions or (1 if quick else 3),
    )
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    work_dir = Path(tempfile.mkdtemp(prefix="moko-bench-"))
    env = bench_environment()

    def log(message: str) -> None:
        print(f"[bench {time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    ctx = RowContext(wrk=wrk, load=load, work_dir=work_dir, env=env, log=log, profile_dir=args.profile)
    results: dict = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "load": {**load.__dict__, "tool": "wrk", "primary_server": PRIMARY.label},
        "rows": {},
    }
    log(f"work folder {work_dir}; load -t{load.threads} -c{load.connections} -d{load.duration}s "
        f"after {load.warmup} s warm-up, {load.repetitions} repetition(s)")
    try:
        for number in args.row_numbers:
            row_started = time.monotonic()
            results["rows"][str(number)] = run_row(number, ctx, args)
            results["rows"][str(number)]["seconds"] = round(time.monotonic() - row_started, 1)
    finally:
        if args.keep_work_dir:
            log(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started, 1)
    results["table"] = table_rows(results["rows"])
    print(render_table(results["table"]))
    print(f"\nTotal time {results['seconds'] / 60:.1f} min on {results['machine']['cores']} cores "
          f"({results['machine']['cpu_model']}).")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    output = args.results_dir / f"{stamp}{'-quick' if quick else ''}.json"
    output.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"Results: {output}")
    return 0


def run_row(number: int, ctx: RowContext, args: argparse.Namespace) -> dict:
    quick = args.quick
    if number == 1:
        return {"variants": row_forward_auth(ctx)}
    if number == 2:
        return row_middleware(ctx)
    if number == 3:
        return row_nginx(ctx)
    if number == 4:
        return row_reverse_proxy(ctx)
    if number == 5:
        from signin_row import row_sign_in

        return row_sign_in(ctx, count=args.sign_ins or (400 if quick else 2000))
    if number == 6:
        from store_row import row_store

        return row_store(ctx, users=args.users or (100_000 if quick else 1_000_000),
                         audit_rows=args.audit_rows or (1_000_000 if quick else 10_000_000),
                         postgres_url=None if args.no_postgres else args.postgres_url)
    return row_memory(ctx)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BrokenRun as exc:
        print(f"benchmark run broken: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmark interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
