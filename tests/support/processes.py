"""Start and stop the server processes of the end-to-end tests.

Each process runs with its output in a log file, is waited for until its port
answers, and is stopped by its own PID: SIGTERM, then SIGKILL after a grace
period. A process that exits early or never opens its port raises
RuntimeError carrying the tail of its log, so a failed start says why.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_SECONDS = 60.0
SHUTDOWN_TIMEOUT_SECONDS = 5.0
LOG_TAIL_CHARACTERS = 4000


@dataclass
class RunningProcess:
    """A started server: its process, where it listens and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return read_tail(self.log_path)


def read_tail(path: Path, limit: int = LOG_TAIL_CHARACTERS) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    text = text.strip()
    if not text:
        return "(log is empty)"
    return text if len(text) <= limit else "...\n" + text[-limit:]


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def _wait_until_ready(running: RunningProcess, health_path: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_problem = "port closed"
    while time.monotonic() < deadline:
        exit_code = running.process.poll()
        if exit_code is not None:
            raise RuntimeError(
                f"{running.name} exited with code {exit_code} before it was ready; "
                f"log {running.log_path}:\n{running.log_tail()}"
            )
        if port_is_open(running.port):
            if health_path is None:
                return
            try:
                response = httpx.get(running.url + health_path, timeout=2.0)
            except httpx.HTTPError as exc:
                last_problem = f"GET {health_path} failed: {exc!r}"
            else:
                if response.status_code == 200:
                    return
                last_problem = f"GET {health_path} answered {response.status_code}"
        time.sleep(0.05)
    raise RuntimeError(
        f"{running.name} was not ready on port {running.port} within {timeout:.0f} s "
        f"({last_problem}); log {running.log_path}:\n{running.log_tail()}"
    )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop one process by its PID: SIGTERM, then SIGKILL after the grace period."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)


@contextlib.contextmanager
def run_process(
    name: str,
    command: Sequence[str],
    *,
    port: int,
    log_path: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    health_path: str | None = None,
    timeout: float = STARTUP_TIMEOUT_SECONDS,
) -> Iterator[RunningProcess]:
    """Run ``command`` until the block ends; ready once ``port`` (and ``health_path``) answer."""
    if port_is_open(port):
        raise RuntimeError(f"cannot start {name}: port {port} on 127.0.0.1 is already in use")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    running = RunningProcess(name, process, port, log_path)
    try:
        _wait_until_ready(running, health_path, timeout)
        yield running
    finally:
        stop_process(process)


def python_environment(**extra: str) -> dict[str, str]:
    """This interpreter's environment with unbuffered output, plus ``extra``.

    ``MOKO_GUARD_*`` variables are dropped so a developer's shell cannot
    change the settings the tests write into their config file.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOKO_GUARD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@contextlib.contextmanager
def run_guard(config_path: Path, port: int, log_path: Path) -> Iterator[RunningProcess]:
    """``moko-guard serve --config FILE`` (forward-auth mode), ready once /healthz answers."""
    command = [sys.executable, "-m", "moko_guard.cli", "serve",
               "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
    with run_process("moko-guard serve", command, port=port, log_path=log_path,
                     env=python_environment(), health_path="/healthz") as running:
        yield running


@contextlib.contextmanager
def run_uvicorn(
    factory: str,
    port: int,
    log_path: Path,
    *,
    app_dir: Path,
    env: dict[str, str] | None = None,
    health_path: str | None = None,
) -> Iterator[RunningProcess]:
    """Serve the ASGI app that ``factory`` ("module:function") builds, on 127.0.0.1.

    Uvicorn's own X-Forwarded-* handling is off, so the app sees the real peer.
    """
    command = [sys.executable, "-m", "uvicorn", "--factory", factory,
               "--app-dir", str(app_dir), "--host", "127.0.0.1", "--port", str(port),
               "--no-proxy-headers", "--no-server-header", "--log-level", "warning",
               "--lifespan", "on"]
    with run_process(f"uvicorn {factory}", command, port=port, log_path=log_path,
                     env=python_environment(**(env or {})), health_path=health_path) as running:
        yield running


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``moko-guard ARGS`` to completion; raise AssertionError if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "moko_guard.cli", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
        env=python_environment(), stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"moko-guard {' '.join(args)} exited with {result.returncode}:\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result
