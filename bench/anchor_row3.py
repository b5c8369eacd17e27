"""Serve row 3's path (nginx auth_request -> moko_guard -> static file) for the anchor harness.

The anchor harness (../shared/bench-anchors) measures Apache + mod_auth_openidc
and nginx auth_request to a do-nothing endpoint. Its ``loads.py --add`` option
loads any further configuration in the same run. This script starts that
configuration and prints the ``--add`` value for it:

    python bench/anchor_row3.py --state /tmp/moko-row3 &
    bash ../shared/bench-anchors/run-anchors.sh --add "$(cat /tmp/moko-row3/add.txt)"
    kill %1

It starts two servers on free ports of 127.0.0.1: the guard's forward-auth
server (``moko-guard serve`` without an upstream, uvloop and httptools, one
worker) and nginx from ``bench/nginx.conf.in``. Then it writes three things
into the state folder. ``add.txt`` contains the ``--add`` value. ``cookie.txt``
is a valid session cookie, issued straight from the guard's store rather
than through a sign-in, which the harness does not measure. The two PID
files are where the harness reads CPU time from. The script stays in the
foreground until SIGTERM or SIGINT, then stops both servers by PID.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
from pathlib import Path

from fixtures import bench_environment, issue_sessions
from harness import BrokenRun, LoadSettings, free_port, probe, uvicorn_server
from http_rows import PRIMARY, RowContext, _guard_config, _nginx_server

# Marks a state folder as this script's, so a later run may empty it.
MARKER = "anchor_row3.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, required=True,
                        help="new or empty folder for add.txt, cookie.txt, PID files and logs")
    parser.add_argument("--id", default="m3", help="row id in the harness's table (default m3)")
    args = parser.parse_args(argv)

    state: Path = args.state.resolve()
    if state.exists() and any(state.iterdir()):
        if not (state / MARKER).exists():
            print(f"anchor_row3: {state} is not empty and was not made by this script; "
                  "name a new or empty folder", file=sys.stderr)
            return 2
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    (state / MARKER).write_text("made by bench/anchor_row3.py; emptied on its next run\n")
    env = bench_environment()
    ctx = RowContext(wrk="wrk", load=LoadSettings(), work_dir=state, env=env, log=print)

    guard_port, bare_port = free_port(), free_port()
    config = _guard_config(ctx, "anchor-row3", guard_port)
    cookie = issue_sessions(config, 1)[0]
    guard = uvicorn_server("anchor-row3-guard", "guard_server", guard_port, PRIMARY,
                           env={**env, "MOKO_BENCH_CONFIG": str(config)}, log_dir=state)
    # nginx.conf.in also names a do-nothing endpoint; the harness has its own, so none runs here.
    nginx, _static_port, auth_port, _stand_in_port = _nginx_server(ctx, guard_port, bare_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        guard.start()
        nginx.start()
        url = f"http://127.0.0.1:{auth_port}/ok.txt"
        probe(url, {"Cookie": cookie}, 200)
        probe(url, {}, 401)
        (state / "cookie.txt").write_text(cookie + "\n")
        (state / "guard.pid").write_text(f"{guard.pid}\n")
        nginx_pid = state / "nginx" / "nginx.pid"
        add = (f"id={args.id},label=nginx auth_request -> moko_guard -> static file,url={url},"
               f"cookie_file={state / 'cookie.txt'},pid_files={nginx_pid}:{state / 'guard.pid'}")
        (state / "add.txt").write_text(add + "\n")
        print(f"anchor_row3: ready; --add value in {state / 'add.txt'}", flush=True)
        stop.wait()
    except BrokenRun as exc:
        print(f"anchor_row3: {exc}", file=sys.stderr)
        return 1
    finally:
        nginx.stop()
        guard.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
