"""Process, port and load-generator helpers shared by the benchmark rows.

Every server started here listens on 127.0.0.1, runs as a child of this
process, and is stopped by its PID. Every wrk run is bounded by ``-d``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

BENCH_DIR = Path(__file__).resolve().parent
WRK_DIR = BENCH_DIR / "wrk"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"


class BrokenRun(RuntimeError):
    """A measurement could not be taken: a server did not start, or a check failed."""


# --- tools ----------------------------------------------------------------------


def require_wrk() -> str:
    """Return the path of wrk, or raise BrokenRun with the install command."""
    path = shutil.which("wrk") or ("/usr/bin/wrk" if os.access("/usr/bin/wrk", os.X_OK) else None)
    if path is None:
        raise BrokenRun(
            "wrk not found (looked in PATH and /usr/bin/wrk): install Debian's wrk "
            "with 'apt-get install wrk', then run the benchmark again"
        )
    return path


def require_nginx() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if path is None:
        raise BrokenRun("nginx not found: install Debian's nginx-light with 'apt-get install nginx-light'")
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokenRun(f"process {process.pid} exited with code {process.returncode} "
                            f"before listening on {LOOPBACK}:{port}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise BrokenRun(f"nothing listens on {LOOPBACK}:{port} after {timeout:.0f} s")


# --- /proc ----------------------------------------------------------------------


def _parse_stat(pid: int) -> tuple[int, int, str] | None:
    """Return (parent pid, utime + stime in clock ticks, state) of a process, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), fields[0]


def is_alive(pid: int) -> bool:
    """Return True while the process exists and is not a zombie."""
    stat = _parse_stat(pid)
    return stat is not None and stat[2] != "Z"


def process_tree(root: int) -> list[int]:
    """Return the PID of ``root`` and of all its living descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _parse_stat(int(entry))
            if stat is not None and stat[2] != "Z":
                children.setdefault(stat[0], []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def cpu_seconds(roots: list[int]) -> float:
    """Return the CPU time (user + system) used so far by the process trees under ``roots``."""
    ticks = 0
    for root in roots:
        for pid in process_tree(root):
            stat = _parse_stat(pid)
            if stat is not None:
                ticks += stat[1]
    return ticks / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """Return the CPU time all cores have spent outside idle and iowait since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    """Return the resident set size of one process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BrokenRun(f"no VmRSS for process {pid}")


# --- servers --------------------------------------------------------------------


@dataclass
class Server:
    """A child process listening on 127.0.0.1:port, stopped by PID."""

    name: str
    command: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Server:
        if self.log_path is not None:
            self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command, env={**os.environ, **self.env}, stdin=subprocess.DEVNULL,
            stdout=self.log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(self.port, timeout, self.process)
        except BrokenRun as exc:
            self.stop()
            tail = self.log_tail()
            raise BrokenRun(f"{self.name}: {exc}" + (f"\n--- {self.log_path} ---\n{tail}" if tail else "")) from None
        return self

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BrokenRun(f"{self.name} is not running")
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Send SIGTERM to this server's PID, then SIGKILL to it and its workers if still alive."""
        if self.process is None or self.process.poll() is not None:
            self._close_log()
            return
        workers = process_tree(self.process.pid)[1:]
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        # uvicorn stops its own workers on SIGTERM; wait for them, and kill any that stay.
        deadline = time.monotonic() + timeout
        for worker in workers:
            while is_alive(worker):
                if time.monotonic() > deadline:
                    os.kill(worker, signal.SIGKILL)
                    break
                time.sleep(0.05)
        self._close_log()

    def _close_log(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None


@dataclass(frozen=True)
class UvicornOptions:
    loop: str = "uvloop"
    http: str = "httptools"
    workers: int = 1

    @property
    def label(self) -> str:
        return f"{self.loop}+{self.http}, {self.workers} worker{'s' if self.workers > 1 else ''}"


def uvicorn_server(name: str, factory: str, port: int, options: UvicornOptions, *,
                   env: dict[str, str], log_dir: Path) -> Server:
    """Return a Server that runs ``bench/apps.py:<factory>`` under uvicorn with the given options.

    Every server gets the same flags, so two apps differ only in the app:
    no access log, no Server or proxy headers, lifespan off (see apps.py).
    """
    command = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(BENCH_DIR), f"apps:{factory}", "--factory",
        "--host", LOOPBACK, "--port", str(port), "--loop", options.loop, "--http", options.http,
        "--workers", str(options.workers), "--no-access-log", "--no-server-header",
        "--no-proxy-headers", "--lifespan", "off", "--log-level", "warning",
    ]
    return Server(name, command, port, env=env, log_path=log_dir / f"{name}.log")


# --- wrk ------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSettings:
    threads: int = 2
    connections: int = 50
    duration: int = 5
    warmup: int = 2
    repetitions: int = 3


def _wrk_command(wrk: str, url: str, headers: dict[str, str], *, threads: int, connections: int,
                 duration: int, script: Path, script_args: list[str] | None = None) -> list[str]:
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
               "-s", str(script)]
    for key, value in headers.items():
        command += ["-H", f"{key}: {value}"]
    command.append(url)
    if script_args:
        command += ["--", *script_args]
    return command


def run_wrk(wrk: str, url: str, headers: dict[str, str], *, threads: int, connections: int,
            duration: int, cpu_roots: list[int], script: Path | None = None,
            script_args: list[str] | None = None) -> dict:
    """Run wrk once against ``url`` and return its report plus the servers' CPU seconds.

    The report comes from the Lua ``done`` hook as one ``MOKO_WRK_JSON`` line.
    """
    if not url.startswith(f"http://{LOOPBACK}:"):
        raise BrokenRun(f"refusing to load a URL off loopback: {url}")
    command = _wrk_command(wrk, url, headers, threads=threads, connections=connections,
                           duration=duration, script=script or WRK_DIR / "report.lua",
                           script_args=script_args)
    cpu_before = cpu_seconds(cpu_roots)
    busy_before = machine_busy_seconds()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=duration + 30)
    elapsed = time.monotonic() - started
    cpu_used = cpu_seconds(cpu_roots) - cpu_before
    busy = machine_busy_seconds() - busy_before
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (children_after.ru_utime - children_before.ru_utime
               + children_after.ru_stime - children_before.ru_stime)
    line = next((ln for ln in completed.stdout.splitlines() if ln.startswith("MOKO_WRK_JSON ")), None)
    if completed.returncode != 0 or line is None:
        raise BrokenRun(f"wrk failed (exit {completed.returncode}) on {url}: "
                        f"{completed.stderr.strip() or completed.stdout.strip()[-400:]}")
    report = json.loads(line.removeprefix("MOKO_WRK_JSON "))
    seconds = report["duration_us"] / 1e6
    requests = report["requests"]
    report.update(
        url=url, wall_seconds=round(elapsed, 3), requests_per_second=requests / seconds,
        server_cpu_seconds=round(cpu_used, 3),
        server_cpu_us_per_request=(cpu_used / requests * 1e6) if requests else None,
        errors_total=sum(report["errors"].values()),
        wrk_cpu_seconds=round(wrk_cpu, 3),
        machine_busy_cores=round(busy / elapsed, 2),
        # CPU used by processes outside this benchmark (other jobs on the machine), in cores.
        other_busy_cores=round(max(0.0, busy - cpu_used - wrk_cpu) / elapsed, 2),
    )
    return report


def probe(url: str, headers: dict[str, str], expected_status: int) -> None:
    """Send one request like wrk's; raise BrokenRun unless it returns ``expected_status``."""
    response = httpx.get(url, headers=headers, timeout=5.0, follow_redirects=False)
    if response.status_code != expected_status:
        raise BrokenRun(f"probe {url} returned {response.status_code}, expected {expected_status}: "
                        f"{response.text[:200]!r}")


@dataclass
class Target:
    """One configuration to load: a URL, its request headers and the servers behind it."""

    key: str
    label: str
    url: str
    headers: dict[str, str]
    cpu_roots: list[int]
    expected_status: int = 200


def measure_interleaved(wrk: str, targets: list[Target], load: LoadSettings,
                        log: Callable[[str], None] = print) -> dict[str, list[dict]]:
    """Load each target once per repetition, rotating the order, and return the runs per target.

    Each measured run follows a warm-up of the same load and is bracketed by
    probes. A run with any status error (non-2xx/3xx) raises BrokenRun.
    """
    runs: dict[str, list[dict]] = {t.key: [] for t in targets}
    for repetition in range(load.repetitions):
        shift = repetition % len(targets)
        for target in targets[shift:] + targets[:shift]:
            probe(target.url, target.headers, target.expected_status)
            if load.warmup > 0:
                run_wrk(wrk, target.url, target.headers, threads=load.threads,
                        connections=load.connections, duration=load.warmup, cpu_roots=[])
            result = run_wrk(wrk, target.url, target.headers, threads=load.threads,
                             connections=load.connections, duration=load.duration,
                             cpu_roots=target.cpu_roots)
            probe(target.url, target.headers, target.expected_status)
            if result["errors"]["status"]:
                raise BrokenRun(f"{target.label}: {result['errors']['status']} responses with a "
                                f"status other than 2xx/3xx during the run")
            result["repetition"] = repetition + 1
            runs[target.key].append(result)
            log(f"  {target.label}: {result['requests_per_second']:,.0f} req/s, "
                f"p50 {result['latency_us']['p50'] / 1000:.2f} ms, "
                f"p99 {result['latency_us']['p99'] / 1000:.2f} ms, "
                f"{result['server_cpu_us_per_request'] or 0:.0f} µs CPU/req, "
                f"errors {result['errors_total']}, other load {result['other_busy_cores']:.2f} cores")
    return runs


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def summarise(runs: list[dict]) -> dict:
    """Return the medians over repetitions of one target's runs."""
    return {
        "requests_per_second": median([r["requests_per_second"] for r in runs]),
        "requests_per_second_min": min(r["requests_per_second"] for r in runs),
        "requests_per_second_max": max(r["requests_per_second"] for r in runs),
        "p50_ms": median([r["latency_us"]["p50"] for r in runs]) / 1000,
        "p99_ms": median([r["latency_us"]["p99"] for r in runs]) / 1000,
        "server_cpu_us_per_request": median([r["server_cpu_us_per_request"] or 0 for r in runs]),
        "errors_total": sum(r["errors_total"] for r in runs),
        "other_busy_cores_max": max(r["other_busy_cores"] for r in runs),
        "repetitions": len(runs),
    }
